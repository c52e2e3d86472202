"""``guidance segment``: images, folders and sequence files -> label-map PNGs + per-frame JSON."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from guidance.cli import main
from guidance.phantoms import make_phantom

PLUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "plus"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from engines.models.unet import export_test_model

    _, card = export_test_model(tmp_path_factory.mktemp("model"), height=64, width=64)
    return card


def test_model_segment_folder_of_8_and_16_bit_images(tmp_path: Path, tiny_model: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(src / "a.png"), rng.integers(0, 65535, (90, 120), dtype=np.uint16))
    np.save(src / "b.npy", rng.integers(0, 255, (70, 50), dtype=np.uint8))
    cv2.imwrite(str(src / "c.tif"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    out = tmp_path / "out"
    rc = main(["segment", str(src), "--out", str(out), "--engine", "onnxruntime", "--model", str(tiny_model)])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert [f["frame"] for f in summary["frames"]] == ["a", "b", "c"]
    for name, shape in (("a", (90, 120)), ("b", (70, 50)), ("c", (40, 40))):
        lab = np.asarray(cv2.imread(str(out / f"{name}.png"), cv2.IMREAD_UNCHANGED))
        assert lab.shape == shape
        assert lab.dtype == np.uint8
        assert int(lab.max()) <= 2
        per = json.loads((out / f"{name}.json").read_text())
        for key in (
            "instrument_present",
            "tip_px",
            "tip_mm",
            "axis_angle_deg",
            "tip_direction_deg",
            "target_centroid_px",
            "target_area_mm2",
            "tip_to_target_mm",
            "confidence",
        ):
            assert key in per


def test_model_segment_phantom_image_with_classical_finds_the_needle(tmp_path: Path) -> None:
    ph = make_phantom("us", seed=11, width=256, height=256, needle=True, n_distractors=0, bone=False)
    frame = next(f for f in (ph.frame(i) for i in range(0, 600, 15)) if f.instrument_present)
    img = tmp_path / "us.png"
    cv2.imwrite(str(img), np.asarray(frame.image))
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            str(img),
            "--out",
            str(out),
            "--engine",
            "classical",
            "--modality",
            "us",
            "--spacing",
            "0.2",
            "0.2",
        ]
    )
    assert rc == 0
    per = json.loads((out / "us.json").read_text())
    assert per["spacing_mm"] == [0.2, 0.2]
    assert (out / "us.png").exists()
    if per["instrument_present"]:
        assert per["tip_mm"] == pytest.approx([per["tip_px"][0] * 0.2, per["tip_px"][1] * 0.2], abs=1e-2)


@pytest.mark.skipif(not (PLUS / "NrrdSample.igs.nrrd").exists(), reason="shared PLUS samples not present")
def test_model_segment_plus_sequence_file(tmp_path: Path) -> None:
    from streaming.sequence import read_sequence

    src = PLUS / "NrrdSample.igs.nrrd"
    n = len(read_sequence(src).frames)
    out = tmp_path / "out"
    assert main(["segment", str(src), "--out", str(out), "--engine", "classical"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["frames"]) == n
    assert len(list(out.glob("frame_*.png"))) == n


def test_model_segment_bad_input_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.txt").write_text("nope")
    rc = main(["segment", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o"), "--engine", "classical"])
    assert rc == 1
    assert "unsupported input" in capsys.readouterr().err


def test_model_segment_new_stream_per_folder_image_per_file_and_after_a_gap(tmp_path: Path) -> None:
    """The engine forgets the previous frame before every image of a folder (unrelated images), at the
    start of a sequence file or recording, and after a gap in its timestamps (as the live pipeline does)."""
    from guidance.commands.segment import iter_input
    from guidance.phantoms.export import write_recording
    from streaming.sequence import SequenceFile, write_sequence

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        np.save(folder / f"{name}.npy", np.zeros((16, 16), np.uint8))
    assert [f.new_stream for f in iter_input(folder, None, 30.0)] == [True, True, True]
    seq = SequenceFile(
        frames=np.zeros((5, 16, 16), np.uint8), timestamps=np.array([10.0, 10.033, 10.066, 12.0, 12.033])
    )
    path = write_sequence(seq, tmp_path / "s.igs.mha")
    assert [f.new_stream for f in iter_input(path, None, 30.0)] == [True, False, False, True, False]
    rec = tmp_path / "r.mcap"
    write_recording(rec, frames=4, width=64, height=64, write_truth=False)
    assert [f.new_stream for f in iter_input(rec, None, 30.0)] == [True, False, False, False]


def test_model_segment_runs_a_temporal_model_over_a_sequence(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    import dataclasses

    from engines.models import preprocess as model_pre
    from engines.models import unet
    from streaming.sequence import SequenceFile, write_sequence

    torch.manual_seed(0)
    model = unet.build_model(dataclasses.replace(unet.TINY_CONFIG, in_channels=2)).eval()
    _, card = unet.export_model_asset(
        model, tmp_path / "model", unet.CardInfo(name="temporal", version="0"), height=64, width=64
    )
    data = json.loads(card.read_text())
    data["input"]["channel_meaning"] = list(model_pre.TEMPORAL_CHANNELS)
    card.write_text(json.dumps(data))
    frames = np.random.default_rng(0).integers(0, 255, (4, 48, 40), dtype=np.uint8)
    path = write_sequence(SequenceFile(frames=frames, timestamps=np.arange(4) / 30.0), tmp_path / "s.igs.mha")
    out = tmp_path / "out"
    assert (
        main(["segment", str(path), "--out", str(out), "--engine", "onnxruntime", "--model", str(card)]) == 0
    )
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["frames"]) == 4
    assert summary["model"].startswith("temporal")
