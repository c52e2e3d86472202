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

    def reset(self) -> None: ...

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
    # Two sequences, both with a lesion in view: an interval over sequences, and a perfect one.
    assert r.target_dice_ci95 == (pytest.approx(1.0), pytest.approx(1.0))
    assert r.instrument_dice == pytest.approx(1.0) or math.isnan(r.instrument_dice)
    assert r.false_detection_rate == 0.0 or math.isnan(r.false_detection_rate)
    if r.instrument_frames:
        assert r.tip_error_mm_median < 1.0


def test_model_evaluation_command_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    # The card takes only the whole acceptance set's figures: refused here, in one line, before any work.
    assert main([*args, "--update-card", str(card_copy)]) == 1
    assert "whole held-out set only (192 sequences of 30 frames), not 1 of 3" in capsys.readouterr().err
    assert not out.exists()
    args += ["--grid", str(tmp_path / "grid.png")]
    assert main(args) == 0
    report = json.loads(out.read_text())
    evaluation.attach_evaluation(card_copy, report)  # what --update-card does with the full set's report
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
        "tip_direction_error_deg_median",
        "false_detection_rate",
    ):
        assert key in report["model"]["us"]
        assert key in report["baseline"]["us"]
    assert report["heldout_seeds"]["us"] == [evaluation.HELDOUT_SEED_BASE]
    figures = {(r["modality"], r["figure"]) for r in report["targets"]}
    assert ("us", "instrument_dice") in figures
    assert (("plus", "false_detection_rate") in figures) == ("plus" in report)
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


def test_model_evaluation_dice_interval_resamples_sequences() -> None:
    inter = np.array([90, 40, 80, 0, 70], np.int64)
    total = np.array([200, 100, 180, 0, 150], np.int64)  # the fourth has no pixel of the class
    pooled = 2 * inter.sum() / total.sum()
    lo, hi = evaluation.bootstrap_dice_ci(inter, total) or (math.nan, math.nan)
    assert lo < pooled < hi
    per_seq = 2 * inter[:3] / total[:3]  # no resample can leave the range of the sequences' own Dice
    assert per_seq.min() - 1e-12 <= lo
    assert hi <= max(per_seq.max(), 2 * 70 / 150) + 1e-12
    assert evaluation.bootstrap_dice_ci(inter, total) == (lo, hi)  # deterministic
    # Identical sequences leave nothing to vary; a wider spread gives a wider interval.
    same = evaluation.bootstrap_dice_ci(np.full(6, 45, np.int64), np.full(6, 100, np.int64))
    assert same == (pytest.approx(0.9), pytest.approx(0.9))
    spread = np.array([10, 90, 20, 80, 50, 45], np.int64)
    wide = evaluation.bootstrap_dice_ci(spread, np.full(6, 100, np.int64)) or (math.nan, math.nan)
    assert wide[1] - wide[0] > 0.2
    # One sequence (or none with pixels): no interval.
    assert evaluation.bootstrap_dice_ci(np.array([5, 0]), np.array([10, 0])) is None


def test_model_evaluation_report_carries_dice_intervals() -> None:
    import dataclasses

    from guidance.phantoms import make_phantom

    blank = make_phantom("us", seed=1, width=32, height=32).frame(0)
    acc = evaluation._Accumulator()
    rng = np.random.default_rng(3)
    for k in range(4):
        acc.start_sequence()
        for _ in range(3):
            truth = np.zeros((32, 32), np.uint8)
            truth[8 : 20 + k, 8 : 20 + k] = 2
            pred = truth.copy()
            pred[rng.integers(0, 32, 40), rng.integers(0, 32, 40)] = 0  # holes, more or fewer per frame
            frame = dataclasses.replace(blank, labels=truth, instrument_present=False, tip_px=None)
            acc.add(frame, pred, evaluation.Geometry(False), 1.0)
    r = acc.report()
    assert r.target_dice_ci95 is not None
    assert r.target_dice_ci95[0] <= r.target_dice <= r.target_dice_ci95[1]
    assert r.instrument_dice_ci95 is None  # no instrument pixel anywhere
    rows = evaluation.check_targets({"model": {"us": r.to_dict()}})
    row = next(x for x in rows if x["figure"] == "target_dice")
    assert row["ci95"] == r.target_dice_ci95
    assert any("-" in line and "target_dice " in line for line in evaluation.summary_lines({"targets": rows}))


def test_model_evaluation_feeds_a_temporal_model_the_frame_before_each_one(tmp_path: Path) -> None:
    """A temporal ONNX model through the real ONNX Runtime engine: each evaluated frame's labels are what the
    network gives for that frame and the one just before it (run first, unscored); a new sequence starts
    from a reset engine."""
    import dataclasses

    import torch

    from engines import registry
    from engines.models.preprocess import normalize, temporal_input
    from engines.models.unet import TINY_CONFIG, CardInfo, build_model, export_model_asset

    torch.manual_seed(3)
    model = build_model(dataclasses.replace(TINY_CONFIG, in_channels=2)).eval()
    _, card = export_model_asset(model, tmp_path, CardInfo(name="t", version="0"), height=64, width=64)
    assert evaluation.model_is_temporal(card)
    cfg = evaluation.EvalConfig(
        modalities=("us",), sequences=2, frames=3, stride=6, width=64, height=64, plus_dir=None
    )
    data = evaluation.heldout_sequences(cfg)
    previous = evaluation.heldout_previous_frames(cfg)
    assert [[len(p) for p in s] for s in previous["us"]] == [[0, 1, 1]] * 2
    assert [p[0].index for p in previous["us"][0][1:]] == [5, 11]
    again = evaluation.heldout_predecessors(cfg, card)
    assert again is not None
    assert [[[p.index for p in b] for b in s] for s in again["us"]] == [[[], [5], [11]]] * 2

    seen: list[np.ndarray] = []

    class Recorder:
        """The ONNX Runtime engine, keeping each frame's labels."""

        def __init__(self) -> None:
            self.inner = registry.create("onnxruntime", model=str(card))
            self.inner.load()
            self.name = self.inner.name

        def __getattr__(self, item: str) -> object:
            return getattr(self.inner, item)

        def infer(self, image: np.ndarray) -> SegmentationOutput:
            out = self.inner.infer(image)
            seen.append(out.labels)
            return out

    evaluation.evaluate_engine(
        lambda m: Recorder(),  # type: ignore[arg-type,return-value]
        data,
        evaluation.geometry_reader_factory()[0],
        previous=previous,
    )
    assert len(seen) == 2 * (3 + 2)  # three frames per sequence, two of them preceded by their predecessor
    expected = []
    for seq, prevs in zip(data["us"], previous["us"], strict=True):
        for fr, prev in zip(seq, prevs, strict=True):
            x = temporal_input(normalize(fr.image), normalize(prev[0].image) if prev else None)
            with torch.inference_mode():
                expected.append(model(torch.from_numpy(x[None])).argmax(1)[0].numpy().astype(np.uint8))
    got = [seen[i] for i in (0, 2, 4, 5, 7, 9)]  # skip the priming calls
    for g, e in zip(got, expected, strict=True):
        assert (g == e).mean() > 0.999


def test_model_evaluation_compares_each_angle_with_the_truth_it_estimates() -> None:
    """The axis (entry -> tip chord) is scored against the phantom's chord, the heading at the tip against
    the path's tangent there; a curved catheter's two truths differ, and a heading is not charged the bend."""
    from guidance.phantoms import FluoroPhantom

    p = FluoroPhantom(seed=4, instrument=True, instrument_kind="catheter", curvature=0.4)
    frame = next(
        f
        for f in (p.frame(i) for i in range(40, 200, 5))
        if f.instrument_present
        and f.axis_angle_deg is not None
        and f.tip_direction_deg is not None
        and evaluation._angle_between(f.axis_angle_deg, f.tip_direction_deg) > 5.0
    )
    assert frame.tip_px is not None
    assert frame.axis_angle_deg is not None
    assert frame.tip_direction_deg is not None
    bend = evaluation._angle_between(frame.axis_angle_deg, frame.tip_direction_deg)

    def score(axis: float, heading: float) -> evaluation.ModalityReport:
        acc = evaluation._Accumulator()
        acc.start_sequence()
        geo = evaluation.Geometry(True, frame.tip_px, axis_angle_deg=axis, direction_deg=heading)
        acc.add(frame, frame.labels, geo, 1.0)
        return acc.report()

    exact = score(frame.axis_angle_deg, frame.tip_direction_deg)
    assert exact.angle_error_deg_median == pytest.approx(0.0, abs=1e-9)
    assert exact.tip_direction_error_deg_median == pytest.approx(0.0, abs=1e-9)
    chord_only = score(frame.axis_angle_deg, frame.axis_angle_deg)  # a reader that ignores the bend
    assert chord_only.angle_error_deg_median == pytest.approx(0.0, abs=1e-9)
    assert chord_only.tip_direction_error_deg_median == pytest.approx(bend)
    assert evaluation._angle_between(179.0, 1.0) == pytest.approx(2.0)
    rows = evaluation.check_targets(
        {"model": {"fluoro": exact.to_dict()}, "baseline": {"fluoro": chord_only.to_dict()}}
    )
    row = next(r for r in rows if r["figure"] == "tip_direction_error_deg_median")
    assert row["better_than_baseline"] is True


def test_model_evaluation_false_detections_are_counted_per_sequence() -> None:
    """Six flagged frames in one of four sequences: the rate says 25 %, the sequence count says it rests
    on one draw, and the interval that resamples sequences is wider than the one that counts frames."""
    import dataclasses

    from guidance.phantoms import make_phantom

    blank = make_phantom("fluoro", seed=1, width=32, height=32).frame(0)
    free = dataclasses.replace(
        blank, labels=np.zeros((32, 32), np.uint8), instrument_present=False, tip_px=None
    )
    acc = evaluation._Accumulator()
    for k in range(4):
        acc.start_sequence()
        for _ in range(6):
            acc.add(free, free.labels, evaluation.Geometry(k == 2), 1.0)
    r = acc.report()
    assert r.false_detection_rate == pytest.approx(0.25)
    assert r.false_detection_sequences == (1, 4)
    wilson, by_seq = r.false_detection_ci95, r.false_detection_ci95_by_sequence
    assert wilson is not None
    assert by_seq is not None
    assert by_seq[0] == pytest.approx(0.0)  # resamples without the bad sequence exist
    assert by_seq[1] - by_seq[0] > wilson[1] - wilson[0]
    np.testing.assert_allclose(
        by_seq, evaluation.bootstrap_ratio_ci(np.array([0, 0, 6, 0]), np.array([6, 6, 6, 6])) or ()
    )
    rows = evaluation.check_targets({"model": {"fluoro": r.to_dict()}})
    row = next(x for x in rows if x["figure"] == "false_detection_rate")
    assert row["sequences"] == (1, 4)
    assert row["ci95_by_sequence"] == by_seq
    line = next(x for x in evaluation.summary_lines({"targets": rows}) if "false_detection_rate" in x)
    assert "1 of 4 sequences" in line
    clean = evaluation._Accumulator()
    clean.start_sequence()
    clean.add(free, free.labels, evaluation.Geometry(False), 1.0)
    assert clean.report().false_detection_sequences == (0, 1)


def test_model_evaluation_low_dose_vessel_scenario_is_its_own_set(tmp_path: Path) -> None:
    """The development set has its own seeds (apart from held-out, calibration and training), forces its
    corner on every sequence, and its figures never go into a model card."""
    from guidance.phantoms import make_phantom

    cfg = evaluation.EvalConfig(
        modalities=("fluoro",), sequences=4, frames=2, plus_dir=None, scenario="low-dose-vessels"
    )
    seeds = evaluation.heldout_seeds(cfg, 0)
    assert seeds == [501_700, 501_701, 501_702, 501_703]
    heldout = evaluation.heldout_seeds(evaluation.EvalConfig(sequences=24), 1)
    assert not set(seeds) & set(heldout)
    assert all(not 500_000 + 1000 + 100 <= s < 500_000 + 1000 + 148 for s in seeds)  # calibration's
    data = evaluation.heldout_sequences(cfg)["fluoro"]
    assert not any(f.instrument_present for f in data[0])  # k even: no instrument
    for k, s in enumerate(seeds):
        ph = make_phantom(
            "fluoro", seed=s, width=256, height=256, **evaluation._low_dose_vessels("fluoro", s, k)
        )
        c = ph.config
        assert 150.0 <= c.dose_photons <= 400.0
        assert c.n_vessels >= 2
        assert 0.35 <= c.vessel_mu <= 0.5
        if k % 2 == 0:
            assert c.instrument is False
        np.testing.assert_array_equal(ph.frame(8).image, data[k][1].image)
    with pytest.raises(evaluation.EvaluationError, match="no us sequences"):
        evaluation.heldout_seeds(evaluation.EvalConfig(modalities=("us",), scenario="low-dose-vessels"), 0)
    card = tmp_path / "card.json"
    card.write_text("{}")
    with pytest.raises(evaluation.EvaluationError, match="held-out figures only"):
        evaluation.attach_evaluation(card, {"scenario": {"name": "low-dose-vessels"}, "model": {}})
    with pytest.raises(SystemExit):  # argparse refuses an unknown scenario
        main(["evaluate", "--json", str(tmp_path / "r.json"), "--scenario", "nope"])
    assert (
        main(
            [
                "evaluate",
                "--json",
                str(tmp_path / "r.json"),
                "--scenario",
                "low-dose-vessels",
                "--update-card",
                str(card),
            ]
        )
        == 1
    )


def test_model_evaluation_command_defaults_are_the_acceptance_set() -> None:
    from guidance.commands import evaluate as command

    cfg = evaluation.EvalConfig()
    assert (
        (command.ACCEPTANCE_SEQUENCES, command.ACCEPTANCE_FRAMES) == (cfg.sequences, cfg.frames) == (192, 30)
    )


def test_model_evaluation_further_validation_scenario_follows_calibrations_sequences() -> None:
    """The ``further-validation`` set continues the validation seeds just past the 48 calibration uses,
    and meets neither the held-out set nor the low-dose-vessels set; its figures never go into a card."""
    from guidance import calibration
    from guidance.phantoms import VALIDATION_SEED_BASE

    sc = evaluation.SCENARIOS["further-validation"]
    assert not sc.for_card
    for mi in (0, 1):
        seeds = evaluation.heldout_seeds(evaluation.EvalConfig(sequences=96, scenario=sc.name), mi)
        cal = calibration.validation_seeds(calibration.CalibrationConfig(), mi)
        assert seeds[0] == cal[-1] + 1 == VALIDATION_SEED_BASE + 1000 * mi + 148
        assert len(set(seeds)) == 96
        heldout = evaluation.heldout_seeds(evaluation.EvalConfig(), mi)
        assert not set(seeds) & set(heldout)
    low_dose = evaluation.heldout_seeds(
        evaluation.EvalConfig(modalities=("fluoro",), scenario="low-dose-vessels"), 0
    )
    fluoro = evaluation.heldout_seeds(evaluation.EvalConfig(sequences=96, scenario=sc.name), 1)
    assert not set(fluoro) & set(low_dose)


def test_model_evaluate_command_offers_every_scenario() -> None:
    from guidance.commands import evaluate as evaluate_command

    assert set(evaluate_command.SCENARIO_NAMES) == set(evaluation.SCENARIOS)
