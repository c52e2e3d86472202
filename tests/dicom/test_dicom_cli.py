"""``guidance archive`` / ``export_dicom`` on a real recording file (MCAP written by RecordingWriter)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from guidance.cli import CommandError, main
from guidance.commands.archive import worklist_date
from guidance.dicom.export import export_dicom
from guidance.dicom.from_recording import LABELS_ENCODING
from guidance.dicom.network import today
from guidance.dicom.study import new_uid
from guidance.dicom.transcode import RLE_LOSSLESS
from guidance.dicom.writers import SC_MULTIFRAME_RGB, SEGMENTATION, US_MULTIFRAME
from streaming.igtl import encode_image
from streaming.igtl.wire import RawMessage
from streaming.recording import RecordingWriter

N, SHAPE = 9, (40, 56)


@pytest.fixture
def recording(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, str]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (N, *SHAPE), dtype=np.uint8)
    masks = np.zeros((N, *SHAPE), np.uint8)
    for i in range(N):
        masks[i, 4 + i : 8 + i, 5:30] = 1
        masks[i, 20:30, 35:45] = 2
    study_uid = new_uid()
    meta = {"study": {"patient_name": "Rec^Patient", "patient_id": "REC-1", "study_instance_uid": study_uid}}
    path = tmp_path / "session.mcap"
    with RecordingWriter(path, meta) as w:
        for i in range(N):
            msg = encode_image(images[i], "Image", spacing_mm=(0.3, 0.3), timestamp_ns=1_700_000_000 * 10**9)
            t = i * 33_333_333 + (i % 3) * 1_000_000
            w.write_message(
                RawMessage(bytes(msg[:58]), bytes(msg[58:]), 1_700_000_000 * 10**9 + t, 10**12 + t)
            )
            w.write_result(i, 10**12 + t, zlib.compress(masks[i].tobytes()), LABELS_ENCODING)
    return path, images, masks, study_uid


def test_dicom_export_recording(recording: Any, tmp_path: Path, dciodvfy: Any) -> None:
    path, images, masks, study_uid = recording
    out = tmp_path / "dicom"
    files = export_dicom(path, out)
    assert [p.name for p in files] == ["US_001_0001.dcm", "SEG_100_0001.dcm"]
    assert sorted(out.iterdir()) == sorted(files)  # no temporary files left behind
    for f in files:
        assert dciodvfy(f) == []
    us = pydicom.dcmread(files[0])
    np.testing.assert_array_equal(us.pixel_array, images)
    assert us.StudyInstanceUID == study_uid
    assert float(us.SequenceOfUltrasoundRegions[0].PhysicalDeltaX) == pytest.approx(0.03)
    seg = hd.seg.segread(files[1])
    got = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=us.SOPInstanceUID,
        source_frame_numbers=list(range(1, N + 1)),
        combine_segments=True,
    )
    np.testing.assert_array_equal(got, masks)


def test_dicom_cli_echo(
    orthanc: Any, our_aet: str, pacs_aet: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["archive", "--echo", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port), "--aet", our_aet]
    assert main([*base, "--aec", pacs_aet]) == 0
    assert main([*base, "--aec", "WRONG"]) == 1
    assert "does not answer to AE title 'WRONG'" in capsys.readouterr().err


def test_dicom_cli_archive_recording(  # noqa: PLR0917 - fixtures
    orthanc: Any,
    our_aet: str,
    pacs_aet: str,
    recording: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _, _, study_uid = recording
    args = [
        "archive",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(orthanc.dicom_port),
        "--aec",
        pacs_aet,
        "--aet",
        our_aet,
        "--spool",
        str(tmp_path / "spool"),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "all objects archived" in err
    assert "Rec^Patient" not in err
    assert "REC-1" not in err
    assert len(orthanc.instance_uids(study_uid)) == 2


def test_dicom_cli_archive_pacs_down_keeps_spool(
    recording: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = recording[0]
    args = [
        "archive",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--aec",
        "PACS",
        "--spool",
        str(tmp_path / "spool"),
    ]
    assert main(args) == 1
    assert "kept in the spool" in capsys.readouterr().err
    assert len(list((tmp_path / "spool" / "objects").iterdir())) == 2


def test_dicom_cli_archive_overlay_compressed(  # noqa: PLR0917 - fixtures
    orthanc: Any, our_aet: str, pacs_aet: str, recording: Any, tmp_path: Path, dciodvfy: Any
) -> None:
    """--overlay adds the burned-in RGB series; --compress sends lossless RLE where Orthanc accepts it."""
    path, images, _, study_uid = recording
    args = [
        "archive",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(orthanc.dicom_port),
        "--aec",
        pacs_aet,
        "--aet",
        our_aet,
        "--spool",
        str(tmp_path / "spool"),
        "--overlay",
        "--compress",
    ]
    assert main(args) == 0
    found = orthanc.post(
        "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    )
    by_class = {i["MainDicomTags"].get("SOPInstanceUID"): i["ID"] for i in found}
    assert len(by_class) == 3
    syntaxes = {}
    for oid in by_class.values():
        f = tmp_path / f"{oid}.dcm"
        f.write_bytes(orthanc.get_bytes(f"/instances/{oid}/file"))
        ds = pydicom.dcmread(f)
        syntaxes[str(ds.SOPClassUID)] = str(ds.file_meta.TransferSyntaxUID)
        assert dciodvfy(f) == [], ds.SOPClassUID
        if ds.SOPClassUID == SC_MULTIFRAME_RGB:
            assert ds.pixel_array.shape == (*images.shape, 3)
            assert "AI overlay" in ds.SeriesDescription
    assert syntaxes == {
        US_MULTIFRAME: RLE_LOSSLESS,
        SC_MULTIFRAME_RGB: RLE_LOSSLESS,
        SEGMENTATION: str(ExplicitVRLittleEndian),
    }


def test_dicom_cli_worklist_date_filter(  # noqa: PLR0917 - fixtures
    orthanc: Any,
    our_aet: str,
    pacs_aet: str,
    recording: Any,
    tmp_path: Path,
    make_worklist_item: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--date picks the worklist item scheduled that day (default today); 'any' sees both."""
    path = recording[0]
    uid_old, uid_today = new_uid(), new_uid()
    station = "DATE_ROOM"
    orthanc.add_worklist(
        "dated",
        make_worklist_item(uid_old, modality="US", station=station, date="20240102", pid="D1", name="Da^One"),
    )
    orthanc.add_worklist(
        "today",
        make_worklist_item(uid_today, modality="US", station=station, date=today(), pid="D2", name="Da^Two"),
    )
    base = [
        "archive",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(orthanc.dicom_port),
        "--aec",
        pacs_aet,
        "--aet",
        our_aet,
        "--spool",
        str(tmp_path / "spool"),
        "--worklist",
        "--station",
        station,
    ]
    assert main([*base, "--date", "20240101-20240131"]) == 0
    assert len(orthanc.instance_uids(uid_old)) == 2
    assert main(base) == 0  # default: today
    assert len(orthanc.instance_uids(uid_today)) == 2
    assert main([*base, "--date", "any"]) == 1
    err = capsys.readouterr().err
    assert "2 matching item(s) for any date" in err
    assert "Da^" not in err  # never log patient data
    assert main([*base, "--date", "2024-01-02"]) == 1
    assert "--date must be" in capsys.readouterr().err


def test_dicom_worklist_date_values() -> None:
    assert worklist_date("today") == today()
    assert worklist_date("any") == ""
    assert worklist_date("20240102") == "20240102"
    assert worklist_date("20240101-") == "20240101-"
    for bad in ("2024", "20241301", "1-2-3", "yesterday"):
        with pytest.raises(CommandError):
            worklist_date(bad)
