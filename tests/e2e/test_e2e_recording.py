"""Recording from a live session: the original messages land in the container with markers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from guidance.config import EngineSettings, Settings, SimulatorSettings
from guidance.phantoms import make_phantom
from guidance.session import LiveSession
from guidance.simulator import phantom_overrides
from streaming.recording import RecordingReader

SIM = SimulatorSettings(modality="us", fps=30.0, width=128, height=128, seed=1)


def test_session_records_original_frames_and_markers(tmp_path: Path) -> None:
    out = tmp_path / "session.mcap"
    settings = Settings(simulator=SIM, engine=EngineSettings(backend="classical", step_down=""))
    with LiveSession(settings, simulate=True, max_frames=40) as session:
        session.start_recording(out, {"operator_note": "test"})
        assert session.add_marker("needle in")
        sim = session.simulator
        assert sim is not None
        assert sim.done.wait(10)
        time.sleep(0.2)
        stats = session.stop_recording()
        assert stats is not None
        assert stats.dropped == 0
        assert not session.add_marker("after stop")
    rec = RecordingReader(out).open()
    frames = list(rec.frames())
    assert [m.label for m in rec.markers] == ["needle in"]
    assert rec.metadata["operator_note"] == "test"
    assert len(frames) >= 20  # recording started after the first frames may have gone by
    # The AI's label maps are stored beside their frames, paired by receive time (for the DICOM SEG).
    receive_times = {f.receive_ns for f in frames}
    results = list(rec.results())
    assert results
    assert all(r.encoding == "labels-u8-zlib" for r in results)
    assert {r.receive_ns for r in results} <= receive_times
    phantom = make_phantom(
        "us",
        seed=SIM.seed,
        width=SIM.width,
        height=SIM.height,
        fps=SIM.fps,
        **phantom_overrides("us", SIM.scene),
    )
    for f in frames:
        truth = phantom.frame(int(f.metadata["FrameIndex"]))
        assert np.array_equal(f.pixels, truth.image)


def test_live_recording_exports_to_dicom_cine_and_seg(tmp_path: Path) -> None:
    """Record a live session, then `guidance export --dicom`: the AI masks become a SEG beside the cine."""
    import subprocess
    import sys

    import pydicom

    out = tmp_path / "session.mcap"
    settings = Settings(simulator=SIM, engine=EngineSettings(backend="classical", step_down=""))
    with LiveSession(settings, simulate=True, max_frames=30) as session:
        session.start_recording(out, {})
        sim = session.simulator
        assert sim is not None
        assert sim.done.wait(10)
        time.sleep(0.2)
    dicom_dir = tmp_path / "dicom"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidance",
            "export",
            str(out),
            "--dicom",
            str(dicom_dir),
            "--patient-name",
            "Phantom^Test",
            "--patient-id",
            "PH-001",
            "--overlay",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    sop_classes = sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in dicom_dir.rglob("*.dcm")
    )
    assert "1.2.840.10008.5.1.4.1.1.3.1" in sop_classes  # US Multi-frame Image
    assert "1.2.840.10008.5.1.4.1.1.66.4" in sop_classes  # Segmentation
    assert "1.2.840.10008.5.1.4.1.1.7.4" in sop_classes  # Multi-frame True Color SC: the burned-in overlay
