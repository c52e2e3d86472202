"""Evaluation: figures per modality for the model and the classical baseline, targets, PLUS false alarms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from engines.base import EngineInfo, SegmentationOutput
from guidance import evaluation
from guidance.cli import main

PLUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "plus"


class _Oracle:
    """An engine that returns the phantom's own truth (to check the figures are computed right)."""

    name = "oracle"

    def __init__(self, frames: dict[int, np.ndarray]) -> None:
        self.frames = frames

    def load(self) -> None: ...

    def warm_up(self) -> None: ...

    def describe(self) -> EngineInfo:
        return EngineInfo("oracle", "cpu", "n/a", None, "truth")

    def close(self) -> None: ...

    def infer(self, image: np.ndarray) -> SegmentationOutput:
        return SegmentationOutput(labels=self.frames[id(image)])


def test_model_evaluation_oracle_scores_perfect() -> None:
    cfg = evaluation.EvalConfig(modalities=("us",), sequences=2, frames=12, stride=20, plus_dir=None)
    data = evaluation.heldout_sequences(cfg)
    truth = {id(f.image): f.labels for seq in data["us"] for f in seq}
    kinds = evaluation.heldout_target_kinds(cfg, data)
    reports = evaluation.evaluate_engine(
        lambda m: _Oracle(truth), data, evaluation.geometry_reader_factory()[0], kinds
    )
    r = reports["us"]
    assert len(kinds["us"]) == 2
    assert set(r.target_dice_by_kind) == set(kinds["us"])
    assert all(v is None or v == pytest.approx(1.0) for v in r.target_dice_by_kind.values())
    rows = evaluation.check_targets({"model": {"us": r.to_dict()}})
    assert {f"target_dice[{k}]" for k in kinds["us"]} <= {row["figure"] for row in rows}
    assert r.frames == 24
    assert r.instrument_dice == pytest.approx(1.0) or math.isnan(r.instrument_dice)
    assert r.false_detection_rate == 0.0 or math.isnan(r.false_detection_rate)
    if r.instrument_frames:
        assert r.tip_error_mm_median < 1.0


def test_model_evaluation_command_writes_report(tmp_path: Path) -> None:
    from engines.models.unet import export_test_model

    _, card = export_test_model(tmp_path / "m", height=64, width=64)
    out = tmp_path / "report.json"
    args = [
        "evaluate",
        "--model",
        str(card),
        "--json",
        str(out),
        "--modality",
        "us",
        "--sequences",
        "1",
        "--frames",
        "3",
    ]
    if (PLUS / "NrrdSample.igs.nrrd").exists():
        plus = tmp_path / "plus"
        plus.mkdir()
        (plus / "NrrdSample.igs.nrrd").symlink_to(PLUS / "NrrdSample.igs.nrrd")
        args += ["--plus-dir", str(plus)]
    else:
        args += ["--no-plus"]
    card_copy = tmp_path / "card.json"
    card_copy.write_text(card.read_text())
    args += ["--update-card", str(card_copy), "--grid", str(tmp_path / "grid.png")]
    assert main(args) == 0
    report = json.loads(out.read_text())
    updated = json.loads(card_copy.read_text())
    assert updated["evaluation"]["model"] == report["model"]
    assert updated["onnx"] == json.loads(card.read_text())["onnx"]
    grid = cv2.imread(str(tmp_path / "grid.png"))
    assert grid is not None
    assert grid.shape[0] == 256
    assert set(report["model"]) == {"us"}
    assert set(report["baseline"]) == {"us"}
    for key in (
        "instrument_dice",
        "target_dice",
        "tip_error_mm_median",
        "tip_error_mm_p95",
        "angle_error_deg_median",
        "false_detection_rate",
    ):
        assert key in report["model"]["us"]
        assert key in report["baseline"]["us"]
    assert report["heldout_seeds"]["us"] == [evaluation.HELDOUT_SEED_BASE]
    figures = {(r["modality"], r["figure"]) for r in report["targets"]}
    assert ("us", "instrument_dice") in figures
    assert ("plus", "false_detection_rate") in figures
    if "plus" in report:
        assert report["plus"]["model"]["frames"] > 0


def test_model_evaluation_wilson_interval() -> None:
    z2 = 1.959964**2
    lo, hi = evaluation.wilson_interval(0, 125) or (math.nan, math.nan)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(z2 / (125 + z2))  # closed form when nothing was hit
    lo, hi = evaluation.wilson_interval(7, 125) or (math.nan, math.nan)
    assert lo < 7 / 125 < hi
    assert 0.02 < lo < 0.03
    assert 0.10 < hi < 0.12
    assert evaluation.wilson_interval(0, 0) is None
