"""`guidance bench pipeline` end to end: JSON with the promised keys, readable table, plots and HTML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2


def test_bench_pipeline_json_table_and_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    report = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidance",
            "bench",
            "pipeline",
            "--frames",
            "45",
            "--engine",
            "classical",
            "--json",
            str(out),
            "--report",
            str(report),
            "--duration",
            "0.1",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "receive_to_result" in proc.stdout  # the readable table
    data = json.loads(out.read_text())
    for key in ("frames_sent", "frames_received", "frames_processed", "frames_dropped", "engine"):
        assert key in data
    assert data["frames_sent"] == 180  # --duration 0.1 min at 30 fps (overrides --frames)
    assert data["frames_received"] == data["frames_sent"]
    for name in ("receive_to_result", "sent_to_result"):
        for q in ("p50", "p90", "p99", "max"):
            assert data["latency_ms"][name][q] > 0
    assert data["soak"]["rss_mb_after_warmup"] > 0
    for png in ("latency_cdf.png", "timeline.png", "drops.png", "memory.png"):
        img = cv2.imread(str(report / png))
        assert img is not None, png
        assert img.std() > 5, png  # a drawn plot, not an empty canvas
    page = (report / "index.html").read_text()
    assert "latency_cdf.png" in page
    assert "receive_to_result" in page
