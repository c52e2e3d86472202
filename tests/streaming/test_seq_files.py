"""PLUS / Slicer sequence files: read every shared sample, check against its header; round-trip writes."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from streaming.sequence import SequenceFile, SequenceFormatError, read_sequence, write_sequence
from tests.conftest import PLUS_DATA

SAMPLES = sorted(p for p in PLUS_DATA.glob("*") if p.name.endswith((".mha", ".nrrd")))


def _mha_header(path: Path) -> tuple[dict[str, str], int]:
    """Independent, naive MetaImage header parse: ``key = value`` lines up to ElementDataFile."""
    data = path.read_bytes()
    end = data.index(b"ElementDataFile")
    end = data.index(b"\n", end) + 1
    fields = {}
    for line in data[:end].decode("latin-1").splitlines():
        k, _, v = line.partition("=")
        fields[k.strip()] = v.strip()
    return fields, end


def test_seq_all_shared_samples_present() -> None:
    names = {p.name for p in SAMPLES}
    assert {
        "BkCurvilinearScanConvertedData.igs.mha",
        "ColorNrrdSample.igs.nrrd",
        "NrrdSample.igs.nrrd",
        "NwirePhantomFreehand.igs.mha",
    } <= names


@pytest.mark.parametrize("path", [p for p in SAMPLES if p.suffix == ".mha"], ids=lambda p: p.name)
def test_seq_read_plus_mha_matches_header(path: Path) -> None:
    fields, data_start = _mha_header(path)
    dims = [int(v) for v in fields["DimSize"].split()]
    n = dims[2] if len(dims) == 3 else 1
    seq = read_sequence(path)
    assert seq.frames.shape[:3] == (n, dims[1], dims[0])
    assert seq.frames.dtype == np.uint8
    assert not seq.frames.flags.writeable
    # Timestamps, statuses and transforms from the raw text.
    for i in (0, n - 1):
        assert seq.timestamps[i] == pytest.approx(float(fields[f"Seq_Frame{i:04d}_Timestamp"]))
        assert seq.image_status[i] == fields[f"Seq_Frame{i:04d}_ImageStatus"]
    tf_names = {m.group(1) for k in fields if (m := re.match(r"Seq_Frame0000_(\w+)Transform$", k))}
    assert set(seq.transforms) == tf_names
    for name in tf_names:
        for i in (0, n - 1):
            expect = np.array(
                [float(v) for v in fields[f"Seq_Frame{i:04d}_{name}Transform"].split()]
            ).reshape(4, 4)
            np.testing.assert_array_equal(seq.transforms[name][i], expect)
            assert seq.transform_status[name][i] == fields[f"Seq_Frame{i:04d}_{name}TransformStatus"]
    # Pixels: decode the payload independently.
    payload = path.read_bytes()[data_start:]
    if fields["CompressedData"] == "True":
        payload = zlib.decompress(payload[: int(fields["CompressedDataSize"])])
    raw = np.frombuffer(payload[: seq.frames.nbytes], dtype=np.uint8).reshape(seq.frames.shape)
    np.testing.assert_array_equal(seq.frames, raw)
    assert seq.spacing == (1.0, 1.0)
    assert seq.metadata["UltrasoundImageOrientation"] == "MFA"


def test_seq_nwire_specifics() -> None:
    seq = read_sequence(PLUS_DATA / "NwirePhantomFreehand.igs.mha")
    assert len(seq) == 97
    assert set(seq.transforms) == {"ProbeToTracker", "ReferenceToTracker", "StylusToTracker"}
    assert seq.transform_status["StylusToTracker"][0] == "INVALID"
    assert seq.transform_status["ProbeToTracker"][0] == "OK"
    assert np.all(np.diff(seq.timestamps) > 0)
    assert seq.timestamps[0] == pytest.approx(345.627957)
    assert seq.transforms["ProbeToTracker"][0][0, 3] == pytest.approx(-190.886)


@pytest.mark.parametrize("path", [p for p in SAMPLES if p.suffix == ".nrrd"], ids=lambda p: p.name)
def test_seq_read_plus_nrrd_matches_pynrrd(path: Path) -> None:
    nrrd = pytest.importorskip("nrrd")
    data, header = nrrd.read(str(path), index_order="C")
    seq = read_sequence(path)
    assert len(seq) == 1
    assert seq.timestamps_synthetic  # these samples carry no timestamps
    assert seq.image_status == ("OK",)
    expect = data.reshape(seq.frames.shape)
    assert seq.frames.dtype == expect.dtype
    np.testing.assert_array_equal(seq.frames, expect)
    sizes = list(header["sizes"])
    if "vector" in header["kinds"]:
        assert seq.components == sizes[0]
        assert (seq.cols, seq.rows) == (sizes[1], sizes[2])
    else:
        assert seq.components == 1
        assert (seq.cols, seq.rows) == (sizes[0], sizes[1])


def test_seq_color_sample_is_rgb() -> None:
    seq = read_sequence(PLUS_DATA / "ColorNrrdSample.igs.nrrd")
    assert seq.frames.shape == (1, 648, 1152, 3)
    frames = list(seq.iter_frames("Video"))
    assert frames[0].components == 3
    assert frames[0].pixels.shape == (648, 1152, 3)


def _synthetic(n: int = 5, rgb: bool = False, dtype: type = np.uint8) -> SequenceFile:
    rng = np.random.default_rng(3)
    shape = (n, 24, 32, 3) if rgb else (n, 24, 32)
    frames = rng.integers(0, 200, size=shape).astype(dtype)
    mats = np.tile(np.eye(4), (n, 1, 1))
    mats[:, :3, 3] = rng.normal(size=(n, 3)) * 100.0
    mats[:, 0, 1] = 1.0 / 3.0
    stylus = np.tile(np.eye(4), (n, 1, 1))
    return SequenceFile(
        frames=frames,
        timestamps=1_700_000_000.0 + np.arange(n) * 0.033_333_333_3,
        image_status=tuple("INVALID" if i == 2 else "OK" for i in range(n)),
        transforms={"ProbeToTracker": mats, "StylusToTracker": stylus},
        transform_status={"ProbeToTracker": ("OK",) * n, "StylusToTracker": ("INVALID",) * n},
        spacing=(0.25, 0.3),
        metadata={"UltrasoundImageOrientation": "MFA"},
    )


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("a.igs.mha", False),
        ("a.igs.mha", True),
        ("a.igs.nrrd", True),
        ("a.seq.nrrd", True),
        ("a.seq.nrrd", False),
    ],
)
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_seq_round_trip(tmp_path: Path, name: str, compress: bool, rgb: bool) -> None:
    src = _synthetic(rgb=rgb)
    out = write_sequence(src, tmp_path / name, compress=compress)
    back = read_sequence(out)
    np.testing.assert_array_equal(back.frames, src.frames)
    assert back.frames.dtype == src.frames.dtype
    np.testing.assert_array_equal(back.timestamps, src.timestamps)  # exact, not approx
    assert not back.timestamps_synthetic
    assert back.image_status == src.image_status
    assert set(back.transforms) == set(src.transforms)
    for k in src.transforms:
        np.testing.assert_array_equal(back.transforms[k], src.transforms[k])
        assert back.transform_status[k] == src.transform_status[k]
    assert back.spacing == src.spacing
    assert back.metadata.get("UltrasoundImageOrientation") == "MFA"


def test_seq_round_trip_int16_and_mha_compressed_flag(tmp_path: Path) -> None:
    src = _synthetic(dtype=np.int16)
    out = write_sequence(src, tmp_path / "b.igs.mha", compress=True)
    fields, _ = _mha_header(out)
    assert fields["CompressedData"] == "True"
    assert fields["ElementType"] == "MET_SHORT"
    assert fields["DimSize"] == "32 24 5"
    back = read_sequence(out)
    np.testing.assert_array_equal(back.frames, src.frames)


def test_seq_slicer_file_is_readable_by_pynrrd(tmp_path: Path) -> None:
    nrrd = pytest.importorskip("nrrd")
    src = _synthetic()
    out = write_sequence(src, tmp_path / "c.seq.nrrd")
    data, header = nrrd.read(str(out), index_order="C")
    assert list(header["kinds"]) == ["domain", "domain", "domain", "list"]
    assert list(header["sizes"]) == [32, 24, 1, 5]
    np.testing.assert_array_equal(data.reshape(src.frames.shape), src.frames)
    values = [float(v) for v in header["axis 3 index values"].split()]
    np.testing.assert_array_equal(values, src.timestamps)


def test_seq_raw_mha_is_memory_mapped(tmp_path: Path) -> None:
    out = write_sequence(_synthetic(), tmp_path / "d.igs.mha", compress=False)
    back = read_sequence(out)
    assert isinstance(back.frames, np.memmap) or isinstance(back.frames.base, np.memmap)


def test_seq_iter_frames_carries_geometry(tmp_path: Path) -> None:
    src = _synthetic()
    frames = list(src.iter_frames("Image_Reference", image_to_reference="ProbeToTracker"))
    assert [f.seq for f in frames] == list(range(5))
    assert frames[1].spacing_mm == (0.25, 0.3)
    np.testing.assert_array_equal(frames[3].image_to_reference, src.transforms["ProbeToTracker"][3])
    assert frames[2].metadata["ImageStatus"] == "INVALID"
    assert float(frames[4].metadata["Timestamp"]) == src.timestamps[4]


def test_seq_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.igs.mha"
    bad.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 2\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(SequenceFormatError, match="truncated"):
        read_sequence(bad)
    with pytest.raises(SequenceFormatError, match="unknown sequence file type"):
        read_sequence(tmp_path / "x.png")
    trunc = tmp_path / "t.igs.nrrd"
    good = write_sequence(_synthetic(), tmp_path / "g.igs.nrrd")
    trunc.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(SequenceFormatError):
        read_sequence(trunc)


def test_seq_reads_older_slicer_list_first_layout(tmp_path: Path) -> None:
    """Slicer before 5.x wrote ``kinds: list domain domain domain`` (frame index fastest, "axis 0")."""
    nrrd = pytest.importorskip("nrrd")
    src = _synthetic(n=4)
    data = np.ascontiguousarray(np.moveaxis(src.frames, 0, 2))[..., np.newaxis, :]  # (rows, cols, 1, N)
    path = tmp_path / "old.seq.nrrd"
    header = {
        "kinds": ["list", "domain", "domain", "domain"],
        "space": "right-anterior-superior",
        "space directions": [[np.nan] * 3, [0.25, 0, 0], [0, 0.3, 0], [0, 0, 1]],
        "encoding": "gzip",
        "axis 0 index type": "numeric",
        "axis 0 index values": " ".join(repr(float(t)) for t in src.timestamps),
        "DataNodeClassName": "vtkMRMLScalarVolumeNode",
    }
    # pynrrd with index_order="C" writes the last numpy axis as the fastest NRRD axis.
    nrrd.write(
        str(path),
        np.transpose(data, (2, 0, 1, 3)),
        header,
        index_order="C",
        custom_field_map={
            "axis 0 index type": "string",
            "axis 0 index values": "string",
            "DataNodeClassName": "string",
        },
    )
    back = read_sequence(path)
    assert back.frames.shape == src.frames.shape
    np.testing.assert_array_equal(back.frames, src.frames)
    np.testing.assert_array_equal(back.timestamps, src.timestamps)
    assert back.spacing == (0.25, 0.3)
