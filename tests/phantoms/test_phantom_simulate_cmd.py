"""``guidance simulate``: writes a recording (read back with the real reader) and a ground-truth sidecar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guidance.phantoms import FluoroPhantom, UltrasoundPhantom
from guidance.phantoms.export import load_truth, truth_path, write_recording
from streaming.recording import RecordingReader

REPO = Path(__file__).resolve().parents[2]


def test_phantom_simulate_us_recording_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "us.mcap"
    seen: list[int] = []
    sidecar = write_recording(
        out, modality="us", frames=12, seed=4, fps=20.0, progress=lambda done, total: seen.append(done)
    )
    assert sidecar == truth_path(out)
    assert seen[-1] == 12
    frames = list(RecordingReader(out).open().frames())
    assert len(frames) == 12
    ph = UltrasoundPhantom(seed=4, fps=20.0)
    for k in (0, 11):
        assert np.array_equal(np.asarray(frames[k].pixels), ph.frame(k).image)
        assert frames[k].metadata["FrameIndex"] == str(k)
        assert frames[k].spacing_mm == pytest.approx(ph.spacing_mm)
    dt = (frames[11].receive_ns - frames[0].receive_ns) / 1e9
    assert dt == pytest.approx(11 / 20.0, abs=1e-6)
    truth = load_truth(sidecar)
    assert truth["labels"].shape == (12, 256, 256)
    assert np.array_equal(truth["labels"][11], ph.frame(11).labels)
    meta = json.loads(str(truth["meta"]))
    assert meta["seed"] == 4
    assert meta["modality"] == "us"
    for k in range(12):
        f = ph.frame(k)
        assert bool(truth["instrument_present"][k]) == f.instrument_present
        if f.tip_px is None:
            assert np.isnan(truth["tip_px"][k]).all()
        else:
            assert tuple(truth["tip_px"][k]) == pytest.approx(f.tip_px)


def test_phantom_simulate_fluoro_16bit_without_truth(tmp_path: Path) -> None:
    out = tmp_path / "fl.mcap"
    assert write_recording(out, modality="fluoro", frames=3, bit_depth=16, write_truth=False) is None
    frames = list(RecordingReader(out).open().frames())
    assert frames[2].pixels.dtype == np.uint16
    assert np.array_equal(
        np.asarray(frames[2].pixels), FluoroPhantom(seed=0, fps=15.0, bit_depth=16).frame(2).image
    )
    assert not truth_path(out).exists()


def test_phantom_simulate_refuses_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "x.mcap"
    out.write_bytes(b"")
    with pytest.raises(FileExistsError):
        write_recording(out, frames=2)
    with pytest.raises(ValueError, match="frames"):
        write_recording(tmp_path / "y.mcap", frames=0)
    with pytest.raises(ValueError, match="modality"):
        write_recording(tmp_path / "z.mcap", modality="mri", frames=1)
    for name in ("seq.igs.nrrd", "seq.mha", "frame.png", "noext"):
        with pytest.raises(ValueError, match=r"name the file \*\.mcap"):
            write_recording(tmp_path / name, frames=1)
        assert not (tmp_path / name).exists()


def test_phantom_simulate_cli_entry_point(tmp_path: Path) -> None:
    """The real command line, in its own process (exit codes and the one-line failure reason)."""
    out = tmp_path / "cli.mcap"
    cmd = [sys.executable, "-m", "guidance", "simulate", "--frames", "4", "--out", str(out), "--seed", "2"]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 4 us frames" in ok.stderr
    assert out.exists()
    assert truth_path(out).exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert "Traceback" not in again.stderr
