"""Smoke test of the real app in a real X window: `guidance demo --frames 60 --screenshot` under Xvfb."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.xvfb
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def xvfb_display() -> Iterator[str]:
    exe = shutil.which("Xvfb")
    if exe is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb xauth; .ci/run installs it)")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [exe, "-displayfd", str(w), "-screen", "0", "1400x900x24", "-nolisten", "tcp"],
        pass_fds=(w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    try:
        with os.fdopen(r) as fh:
            number = fh.readline().strip()  # Xvfb writes the display number once it accepts clients
        if not number:
            pytest.fail("Xvfb did not start")
        yield f":{number}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_demo_window_screenshot_is_a_real_window(xvfb_display: str, tmp_path: Path) -> None:
    shot = tmp_path / "demo.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUIDANCE_") or k == "GUIDANCE_CONFIG_DIR"}
    env.update(DISPLAY=xvfb_display, QT_QPA_PLATFORM="xcb")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidance",
            "demo",
            "--engine",
            "classical",
            "--frames",
            "60",
            "--screenshot",
            str(shot),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img is not None, "screenshot is a readable PNG"
    h, w = img.shape[:2]
    assert w >= 800, (w, h)
    assert h >= 500, (w, h)
    # Not blank: a real window has the image, text and overlay colours, not one flat fill.
    assert float(img.std()) > 10.0
    colours = np.unique(img.reshape(-1, 3)[:: max(1, (h * w) // 50_000)], axis=0)
    assert len(colours) > 100, len(colours)
