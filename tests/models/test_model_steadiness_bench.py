"""``benchmarks/bench_tip_steadiness.py`` runs end to end on a tiny model (figures are not asserted: they
are reported by the benchmark)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from engines.assets import make_random_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_tip_steadiness.py"


def test_model_tip_steadiness_bench_compares_models_on_consecutive_frames(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_tip_steadiness", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plain = make_random_model(tmp_path / "a", 256, 256, tiny=True, seed=1, name="a")
    alternate = make_random_model(tmp_path / "b", 256, 256, tiny=True, seed=1, name="b", alternate=True)
    running = make_random_model(tmp_path / "c", 256, 256, tiny=True, seed=1, name="c", running_target=0.7)
    out = tmp_path / "steady.json"
    cards = [str(plain), str(alternate), str(running)]
    assert bench.main([*cards, "--sequences", "1", "--modality", "us", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]["us"]) == set(cards)
    for r in report["results"]["us"].values():
        assert set(r) == {
            "tip_error_mm_median",
            "tip_error_mm_p95",
            "jitter_mm_median",
            "jitter_mm_p95",
            "frame_pairs",
            "target_error_mm_median",
            "target_error_mm_p95",
            "target_jitter_mm_median",
            "target_jitter_mm_p95",
            "target_flicker_median",
            "target_flicker_p95",
            "true_target_flicker_median",
            "true_target_flicker_p95",
            "target_frame_pairs",
        }
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert bench._iou(a, b) == 4 / 12
    assert bench._iou(a, a) == 1.0
