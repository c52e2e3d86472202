"""guidance calibrate: the bias sweep and single-region decision on validation phantoms, and the re-export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from engines.assets import load_model_card  # noqa: E402
from engines.base import INSTRUMENT, TARGET  # noqa: E402
from engines.models.unet import (  # noqa: E402
    TINY_CONFIG,
    CardInfo,
    build_model,
    export_model_asset,
    export_test_model,
)
from guidance import calibration  # noqa: E402
from guidance.evaluation import HELDOUT_SEED_BASE  # noqa: E402


def test_decide_matches_the_exported_graph_rule() -> None:
    logits = np.zeros((3, 6, 6), np.float32)
    logits[INSTRUMENT, 0, 0] = 2.0  # instrument by 2 over background
    logits[TARGET, 1:3, 1:3] = 1.0
    logits[TARGET, 5, 5] = 1.0  # a stray target pixel, apart from the 2x2 region
    labels, prob = calibration.decide(logits, bias=0.0, single_target=False)
    assert labels[0, 0] == INSTRUMENT
    assert (labels == TARGET).sum() == 5
    assert prob[0, 0] == pytest.approx(np.exp(2.0) / (np.exp(2.0) + 2.0), rel=1e-6)
    labels, _ = calibration.decide(logits, bias=3.0, single_target=True)
    assert labels[0, 0] == 0  # the bias moved the decision, not the probability
    assert (labels == TARGET).sum() == 4  # the stray pixel is gone
    grown, _ = calibration.decide(logits, bias=3.0, single_target=False, target_bias=-100.0)
    assert (grown == TARGET).all()  # a target bias moves the target's decision the same way
    # the seeded-region rule, as the engines apply it: p = 0.79 at (0, 0) is a seed at 0.75, not at 0.8
    seeded, _ = calibration.decide(logits, bias=0.0, single_target=False, seed_prob=0.75)
    assert seeded[0, 0] == INSTRUMENT
    unseeded, _ = calibration.decide(logits, bias=0.0, single_target=False, seed_prob=0.8)
    assert unseeded[0, 0] == 0
    assert (unseeded == TARGET).sum() == 5


def test_calibration_sweeps_validation_seeds_and_reexports(tmp_path: Path) -> None:
    cfg = calibration.CalibrationConfig(
        biases=(0.0, 50.0),
        target_biases=(-0.5, 0.0),
        sequences=1,
        frames=3,
        stride=5,
        seed_biases=(0.0,),
        seed_probs=(0.999,),
    )
    seeds = calibration.validation_seeds(cfg, 0) + calibration.validation_seeds(cfg, 1)
    assert all(s > HELDOUT_SEED_BASE + 10_000 for s in seeds)  # never an evaluation seed
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG)
    report = calibration.calibrate(model, cfg)
    assert [(row["bias"], row["instrument_seed_prob"]) for row in report["sweep"]] == [
        (0.0, 0.0),
        (50.0, 0.0),
        (0.0, 0.999),
    ]
    assert set(report["sweep"][0]) == {"bias", "presence_threshold", "instrument_seed_prob", "us", "fluoro"}
    assert report["instrument_seed_prob"] in (0.0, 0.999)
    assert report["presence_gate"] == {"enabled": False}  # no presence head, no gate
    assert report["instrument_logit_bias"] in (0.0, 50.0)
    assert [row["target_bias"] for row in report["target_sweep"]] == [-0.5, 0.0]
    assert report["target_logit_bias"] in (-0.5, 0.0)
    assert isinstance(report["single_region_target"]["enabled"], bool)
    json.dumps(report)  # JSON-ready
    # Against itself as the reference, the same model meets it at the same operating point.
    ref = calibration.reference_row({"name": "m", "version": "v1", "calibration": report}, cfg)
    again = calibration.calibrate(model, cfg, ref)
    assert again["reference"]["met"] is True
    assert again["reference"]["version"] == "v1"
    assert (again["instrument_logit_bias"], again["instrument_seed_prob"]) == (
        report["instrument_logit_bias"],
        report["instrument_seed_prob"],
    )

    _, card_path = export_test_model(tmp_path / "run", name="m")
    state = build_model(TINY_CONFIG).state_dict()
    torch.save(state, card_path.with_suffix(".pt"))
    forced = {
        **report,
        "instrument_logit_bias": 50.0,
        "target_logit_bias": -0.5,
        "instrument_seed_prob": 0.997,
        "single_region_target": {"enabled": True},
    }
    onnx_path, new_card = calibration.apply_calibration(card_path, tmp_path / "out", forced)
    card = load_model_card(new_card)  # sha256 verified
    assert card.single_region_classes == (TARGET,)
    assert card.instrument_seed_prob == 0.997
    assert "seed probability 0.997" in calibration.operating_point_limit(forced)
    data = json.loads(new_card.read_text())
    assert data["output"]["instrument_logit_bias"] == 50.0
    assert card.decision_bias == (0.0, 50.0, -0.5)
    assert data["calibration"]["instrument_logit_bias"] == 50.0
    assert data["limits"][-1] == calibration.operating_point_limit(forced)
    assert "bias 50" in data["limits"][-1]
    _, again = calibration.apply_calibration(
        new_card, tmp_path / "again", {**forced, "instrument_logit_bias": 4.0, "instrument_seed_prob": 0.0}
    )
    assert load_model_card(again).instrument_seed_prob == 0.0  # re-calibrating can drop the rule
    limits = json.loads(again.read_text())["limits"]
    assert [x for x in limits if x.startswith("One operating point")] == [
        calibration.operating_point_limit(
            {**forced, "instrument_logit_bias": 4.0, "instrument_seed_prob": 0.0}
        )
    ]
    assert (tmp_path / "out" / "m.pt").is_file()
    assert onnx_path.parent == tmp_path / "out"


def _row(bias: float, fd: tuple[float, float], dice: tuple[float, float]) -> dict[str, object]:
    return {
        "bias": bias,
        "us": {"false_detection_rate": fd[0], "instrument_dice": dice[0]},
        "fluoro": {"false_detection_rate": fd[1], "instrument_dice": dice[1]},
    }


def test_choose_bias_prefers_dice_under_the_target_then_near_the_floor() -> None:
    mods = ("us", "fluoro")
    feasible = [
        _row(0, (0.05, 0.0), (0.9, 0.9)),
        _row(2, (0.01, 0.0), (0.85, 0.88)),
        _row(4, (0.0, 0.0), (0.8, 0.8)),
    ]
    row, rule = calibration.choose_bias(feasible, mods, 0.02)
    assert row["bias"] == 2
    assert rule.startswith("best mean instrument Dice")
    # None meets 2 %: the best Dice within 2 points of the lowest reachable rate (0.106), not the lowest.
    infeasible = [
        _row(0, (0.18, 0.0), (0.88, 0.88)),
        _row(3, (0.115, 0.0), (0.895, 0.89)),
        _row(6, (0.106, 0.0), (0.88, 0.87)),
    ]
    row, rule = calibration.choose_bias(infeasible, mods, 0.02)
    assert row["bias"] == 3
    assert "lowest reachable rate elsewhere (us 0.106)" in rule
    # One modality's unreachable floor does not loosen the other's limit: fluoroscopy can reach 1 %, so
    # bias 2 (fluoro 3 %, within 2 points of the US floor) is out although its mean Dice is best.
    mixed = [
        _row(0, (0.05, 0.12), (0.91, 0.90)),
        _row(2, (0.04, 0.03), (0.91, 0.90)),
        _row(4, (0.04, 0.01), (0.89, 0.88)),
        _row(6, (0.04, 0.01), (0.87, 0.87)),
    ]
    row, rule = calibration.choose_bias(mixed, mods, 0.02)
    assert row["bias"] == 4
    assert "us 0.040" in rule
    assert "fluoro" not in rule
    # Floors at different biases: the rows nearest to every limit at once.
    apart = [
        _row(0, (0.0, 0.10), (0.9, 0.9)),
        _row(6, (0.10, 0.0), (0.8, 0.8)),
        _row(3, (0.03, 0.03), (0.85, 0.85)),
    ]
    row, _ = calibration.choose_bias(apart, mods, 0.02)
    assert row["bias"] == 3
    with pytest.raises(calibration.CalibrationError):
        calibration.choose_bias([], mods, 0.02)


def _full(bias: float, seed: float, us: tuple[float, ...], fluoro: tuple[float, ...]) -> dict[str, object]:
    """A sweep row: (instrument Dice, target Dice, false detections, tip p95) per modality."""
    keys = ("instrument_dice", "target_dice", "false_detection_rate", "tip_error_mm_p95")
    return {
        "bias": bias,
        "instrument_seed_prob": seed,
        "presence_threshold": 0.0,
        "us": dict(zip(keys, us, strict=True)),
        "fluoro": dict(zip(keys, fluoro, strict=True)),
    }


def test_choose_bias_with_a_reference_prefers_rows_no_worse_on_any_figure() -> None:
    mods = ("us", "fluoro")
    ref = {
        "version": "v-ref",
        **{
            k: v
            for k, v in _full(1, 0.9997, (0.90, 0.91, 0.0, 0.65), (0.91, 0.92, 0.006, 0.78)).items()
            if k in mods
        },
    }
    sweep = [
        # best mean instrument Dice, but its ultrasound tip p95 is worse than the reference's
        _full(2, 0.9997, (0.905, 0.92, 0.0, 0.67), (0.915, 0.93, 0.0, 0.75)),
        # no worse anywhere (equal false detections and tip p95 count as no worse)
        _full(1, 0.9999, (0.902, 0.91, 0.0, 0.65), (0.912, 0.92, 0.006, 0.76)),
        # no worse on the figures it has, but it has no tip figure: worse
        _full(0, 0.0, (0.903, 0.92, 0.0, None), (0.913, 0.93, 0.0, 0.70)),
    ]
    row, rule = calibration.choose_bias(sweep, mods, 0.02)
    assert row["bias"] == 2  # without a reference: mean instrument Dice alone
    row, rule = calibration.choose_bias(sweep, mods, 0.02, ref)
    assert (row["bias"], row["instrument_seed_prob"]) == (1, 0.9999)
    assert rule.endswith("no worse than v-ref on any validation figure")
    assert calibration.no_worse_than(sweep[1], ref, mods)
    assert not calibration.no_worse_than(sweep[0], ref, mods)
    # None as good: the usual rule, and the rule says so.
    row, rule = calibration.choose_bias(sweep[:1], mods, 0.02, ref)
    assert row["bias"] == 2
    assert "no row was as good as v-ref" in rule


def test_reference_row_reads_a_calibrated_card_measured_on_the_same_frames() -> None:
    cfg = calibration.CalibrationConfig()
    chosen = _full(1, 0.9997, (0.90, 0.91, 0.0, 0.65), (0.91, 0.92, 0.006, 0.78))
    report = {
        "config": dataclasses.asdict(cfg),
        "sweep": [_full(1, 0.0, (0.1, 0.1, 0.5, 9.0), (0.1, 0.1, 0.5, 9.0)), chosen],
        "instrument_logit_bias": 1.0,
        "instrument_seed_prob": 0.9997,
        "presence_gate": {"enabled": False},
    }
    card = {"name": "m", "version": "v1", "calibration": json.loads(json.dumps(report))}
    ref = calibration.reference_row(card, cfg)
    assert ref["version"] == "v1"
    assert ref["fluoro"]["tip_error_mm_p95"] == 0.78  # the chosen row's, not the first row's
    with pytest.raises(calibration.CalibrationError, match="sequences 48, this calibration uses 16"):
        calibration.reference_row(card, dataclasses.replace(cfg, sequences=16))
    with pytest.raises(calibration.CalibrationError, match="not calibrated"):
        calibration.reference_row({"name": "m", "version": "v0"}, cfg)
    lost = {**card, "calibration": {**report, "instrument_logit_bias": 5.0}}
    with pytest.raises(calibration.CalibrationError, match="does not list its own operating point"):
        calibration.reference_row(json.loads(json.dumps(lost)), cfg)


def test_choose_presence_threshold_keeps_the_frames_with_an_instrument() -> None:
    # us: 100 instrument frames, two scored low (0.04, 0.15); fluoro: all instrument frames above 0.3.
    us_p = np.concatenate([np.full(98, 0.9, np.float32), np.array([0.04, 0.15], np.float32)])
    us_free = np.array([0.01, 0.03, 0.08, 0.6], np.float32)
    fl_p = np.full(50, 0.95, np.float32)
    present = {"us": [us_p, us_free], "fluoro": [fl_p]}
    visible = {"us": [np.ones(100, bool), np.zeros(4, bool)], "fluoro": [np.ones(50, bool)]}
    t, table = calibration.choose_presence_threshold(present, visible, (0.02, 0.05, 0.1, 0.2), 0.01)
    # 0.05 drops 1 of 100 (allowed), 0.1 still 1, 0.2 drops 2: the largest allowed is 0.1
    assert t == 0.1
    row = next(r for r in table if r["presence_threshold"] == 0.1)
    assert row["us"]["instrument_frames_gated"] == pytest.approx(0.01)
    assert row["us"]["instrument_free_frames_gated"] == pytest.approx(0.75)
    assert row["fluoro"]["instrument_frames_gated"] == 0.0
    # None allowed: no gate.
    t, _ = calibration.choose_presence_threshold(present, visible, (0.2, 0.5), 0.0)
    assert t == 0.0


def test_decide_applies_the_presence_gate_to_the_instrument_only() -> None:
    logits = np.zeros((3, 4, 4), np.float32)
    logits[INSTRUMENT, 0, :] = 3.0
    logits[TARGET, 2:, 2:] = 3.0
    kept, _ = calibration.decide(logits, 0.0, False, present=0.5, presence_threshold=0.3)
    gated, _ = calibration.decide(logits, 0.0, False, present=0.2, presence_threshold=0.3)
    assert (kept == INSTRUMENT).sum() == 4
    assert (gated == INSTRUMENT).sum() == 0
    assert (gated == TARGET).sum() == (kept == TARGET).sum() == 4


def test_calibration_of_a_presence_model_sweeps_the_gate_and_exports_it(tmp_path: Path) -> None:
    cfg = calibration.CalibrationConfig(
        biases=(0.0, 50.0),
        target_biases=(0.0,),
        sequences=1,
        frames=3,
        stride=5,
        presence_thresholds=(0.001,),
        max_presence_miss=1.0,  # any threshold is allowed: the gated rows must be swept
        seed_probs=(),
    )
    config = dataclasses.replace(TINY_CONFIG, presence_head=True)
    torch.manual_seed(0)
    report = calibration.calibrate(build_model(config), cfg)
    assert report["presence_gate"]["candidate"] == 0.001
    assert [(r["bias"], r["presence_threshold"]) for r in report["sweep"]] == [
        (0.0, 0.0),
        (50.0, 0.0),
        (0.0, 0.001),
        (50.0, 0.001),
    ]
    assert len(report["presence_gate"]["table"]) == 1
    json.dumps(report)

    run = tmp_path / "run"
    run.mkdir()
    model = build_model(config).eval()
    _, card_path = export_model_asset(model, run, CardInfo(name="p", version="0"), height=64, width=64)
    torch.save(model.state_dict(), card_path.with_suffix(".pt"))
    forced = {
        **report,
        "instrument_logit_bias": 0.0,
        "target_logit_bias": 0.0,
        "presence_gate": {**report["presence_gate"], "enabled": True, "presence_threshold": 0.75},
        "single_region_target": {"enabled": False},
    }
    _, new_card = calibration.apply_calibration(card_path, tmp_path / "out", forced)
    card = load_model_card(new_card)
    assert card.presence_threshold == 0.75
    assert "instrument_present" in card.output_names()


def test_calibration_feeds_a_temporal_model_the_frame_before_each_one() -> None:
    from engines.models.preprocess import normalize, temporal_input
    from guidance.phantoms import make_phantom

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY_CONFIG, in_channels=2)).eval()
    ph = make_phantom("us", seed=5, width=64, height=64)
    frames = [ph.frame(j * 5) for j in range(3)]
    prevs = [None, ph.frame(4), ph.frame(9)]
    logits, _ = calibration._outputs(model, frames, 64, prevs)
    x = np.stack(
        [
            temporal_input(normalize(f.image), None if p is None else normalize(p.image))
            for f, p in zip(frames, prevs, strict=True)
        ]
    )
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    alone, _ = calibration._outputs(model, frames, 64, [None, None, None])
    np.testing.assert_allclose(alone[0], logits[0], atol=1e-6)  # the first frame has no predecessor
    assert not np.allclose(alone[1:], logits[1:])

    cfg = calibration.CalibrationConfig(
        biases=(0.0,), target_biases=(0.0,), sequences=1, frames=3, stride=5, size=64, seed_probs=()
    )
    report = calibration.calibrate(model, cfg)
    assert [row["bias"] for row in report["sweep"]] == [0.0]


def test_calibration_with_mirror_scores_and_exports_the_mirrored_graph(tmp_path: Path) -> None:
    """``mirror=True``: the sweep runs on the mirror-averaged logits and the re-export carries them."""
    import onnxruntime as ort

    from engines.models.unet import MirrorEnsemble

    cfg = calibration.CalibrationConfig(
        biases=(0.0,),
        target_biases=(0.0,),
        sequences=1,
        frames=2,
        stride=5,
        seed_biases=(0.0,),
        seed_probs=(0.999,),
    )
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG)
    frames = [calibration.make_phantom("us", seed=1, width=256, height=256).frame(0)]
    plain, _ = calibration._outputs(model.eval(), frames, 256)
    mirrored, _ = calibration._outputs(MirrorEnsemble(model).eval(), frames, 256)
    assert np.abs(plain - mirrored).max() > 1e-3
    report = calibration.calibrate(model, dataclasses.replace(cfg, mirror=True))
    assert report["mirror"] is True
    assert report["config"]["mirror"] is True
    assert calibration.calibrate(model, cfg)["mirror"] is False

    _, card_path = export_test_model(tmp_path / "run", name="m")
    torch.save(model.state_dict(), card_path.with_suffix(".pt"))
    onnx_path, new_card = calibration.apply_calibration(card_path, tmp_path / "out", report)
    card = load_model_card(new_card)
    assert card.mirror is True
    x = np.random.default_rng(2).random((1, 1, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    a = sess.run(["logits"], {"image": x})[0]
    b = sess.run(["logits"], {"image": np.ascontiguousarray(x[..., ::-1])})[0]
    np.testing.assert_allclose(b[..., ::-1], a, atol=1e-5)


def test_calibrate_command_refuses_a_missing_or_uncalibrated_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guidance.cli import main

    _, card = export_test_model(tmp_path / "run", name="m")
    args = ["calibrate", str(card), "--out", str(tmp_path / "out"), "--reference"]
    assert main([*args, str(tmp_path / "nope.json")]) == 1
    assert "nope.json not found" in capsys.readouterr().err
    assert main([*args, str(card)]) == 1  # a training run's card: no calibration block
    assert "is not calibrated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("instrument_weight", [0.0, 0.25])
def test_alternating_calibration_scores_what_the_evaluated_engine_outputs(
    tmp_path: Path, instrument_weight: float
) -> None:
    """``alternate=True``: the logits calibration decides on are, frame for frame, what an ONNX Runtime
    engine computes when the evaluation feeds it as it does (two predecessors before each scored frame),
    so the operating point is chosen on the frames and views the held-out figures come from. The scored
    frames alternate between the plain and the mirrored view. The re-export carries the graph, with the
    instrument fused too where calibration fused it (``fuse_instrument``)."""
    from engines.backends.onnxruntime_backend import OnnxRuntimeEngine
    from guidance import evaluation

    cfg = evaluation.EvalConfig(
        modalities=("us",), sequences=1, frames=4, stride=6, width=64, height=64, plus_dir=None
    )
    torch.manual_seed(3)
    model = build_model(TINY_CONFIG).eval()
    _, card_path = export_model_asset(
        model,
        tmp_path / "m",
        CardInfo(name="m", version="0"),
        height=64,
        width=64,
        alternate=True,
        instrument_weight=instrument_weight,
    )
    assert evaluation.predecessors_for(card_path) == 2
    seq = evaluation.heldout_sequences(cfg)["us"][0]
    before = evaluation.heldout_predecessors(cfg, card_path)
    assert before is not None
    assert [[p.index for p in b] for b in before["us"][0]] == [[], [4, 5], [10, 11], [16, 17]]
    assert [calibration.alternating_views(j)[0] for j in range(4)] == [False, True, False, True]

    fused, _ = calibration._alternating_outputs(
        model, seq, 64, [b[-1] if b else None for b in before["us"][0]], instrument_weight
    )
    engine = OnnxRuntimeEngine(card_path, device="cpu")
    engine.load()
    try:
        engine.reset()
        for j, fr in enumerate(seq):
            for p in before["us"][0][j]:
                engine.infer(p.image)
            out = engine.infer(fr.image)
            labels, prob = calibration.decide(fused[j], 0.0, False)
            assert out.instrument_prob is not None
            np.testing.assert_allclose(out.instrument_prob, prob, atol=2e-5)
            assert (out.labels == labels).mean() >= 0.999
    finally:
        engine.close()
    plain, _ = calibration._outputs(model, seq, 64)
    np.testing.assert_allclose(fused[0], plain[0], atol=1e-5)  # the first frame: alone, plain
    assert np.abs(fused[1:] - plain[1:]).max() > 1e-4
    # the instrument is fused exactly when asked; the target is fused the same either way
    target_only, _ = calibration._alternating_outputs(
        model, seq, 64, [b[-1] if b else None for b in before["us"][0]]
    )
    np.testing.assert_allclose(fused[:, 2], target_only[:, 2], atol=1e-5)
    assert (np.abs(fused[1:, 1] - target_only[1:, 1]).max() > 1e-4) == (instrument_weight > 0.0)

    small = calibration.CalibrationConfig(
        biases=(0.0,), target_biases=(0.0,), sequences=1, frames=3, stride=5, size=64, seed_probs=()
    )
    small = dataclasses.replace(small, alternate=True, fuse_instrument=instrument_weight)
    report = calibration.calibrate(model, small)
    assert report["alternate"] is True
    assert report["fuse_instrument"] == instrument_weight
    with pytest.raises(calibration.CalibrationError, match="exclude each other"):
        calibration.calibrate(model, dataclasses.replace(small, mirror=True))
    with pytest.raises(calibration.CalibrationError, match="setting of alternating views"):
        calibration.calibrate(model, dataclasses.replace(small, alternate=False, fuse_instrument=0.25))
    with pytest.raises(calibration.CalibrationError, match=r"must be in \[0, 1\)"):
        calibration.calibrate(model, dataclasses.replace(small, fuse_instrument=1.0))
    torch.save(model.state_dict(), card_path.with_suffix(".pt"))
    _, new_card = calibration.apply_calibration(card_path, tmp_path / "out", report)
    loaded = load_model_card(new_card)
    assert loaded.alternate is True
    assert loaded.instrument_fuse_weight == instrument_weight


def test_running_target_reexport_keeps_the_operating_point_and_is_fed_every_frame(tmp_path: Path) -> None:
    """``with_running_target`` re-exports a calibrated single-view card with a running target at the
    card's own operating point (no sweep), and refuses what it cannot do. The evaluation feeds such a model
    every frame between two scored ones, so the scored frame's running average is a live stream's: the
    engine's labels there equal the running average over all the frames before, worked out by hand."""
    from engines.backends.onnxruntime_backend import OnnxRuntimeEngine
    from guidance import evaluation

    torch.manual_seed(5)
    model = build_model(TINY_CONFIG).eval()
    _, card_path = export_model_asset(
        model, tmp_path / "m", CardInfo(name="m", version="0"), height=64, width=64
    )
    torch.save(model.state_dict(), card_path.with_suffix(".pt"))
    with pytest.raises(calibration.CalibrationError, match="no calibration block"):
        calibration.with_running_target(card_path, tmp_path / "bad", 0.7)
    small = calibration.CalibrationConfig(
        biases=(1.0,), target_biases=(0.5,), sequences=1, frames=2, stride=5, size=64, seed_probs=()
    )
    _, calibrated = calibration.apply_calibration(
        card_path, tmp_path / "cal", calibration.calibrate(model, small)
    )
    with pytest.raises(calibration.CalibrationError, match="above 0 and below 1"):
        calibration.with_running_target(calibrated, tmp_path / "bad", 1.0)
    _, running = calibration.with_running_target(calibrated, tmp_path / "run", 0.7)
    before, after = json.loads(calibrated.read_text()), json.loads(running.read_text())
    assert after["output"]["instrument_logit_bias"] == before["output"]["instrument_logit_bias"] == 1.0
    assert after["output"]["target_logit_bias"] == before["output"]["target_logit_bias"] == 0.5
    assert after["calibration"]["running_target"] == 0.7
    assert {k: v for k, v in after["calibration"].items() if not k.startswith("running_target")} == before[
        "calibration"
    ]
    card = load_model_card(running)
    assert card.running_target == 0.7
    with pytest.raises(calibration.CalibrationError, match="needs a single-view model"):
        calibration.with_running_target(running, tmp_path / "again", 0.5)

    cfg = evaluation.EvalConfig(
        modalities=("us",), sequences=1, frames=3, stride=4, width=64, height=64, plus_dir=None
    )
    assert evaluation.predecessors_for(running, cfg.stride) == 3
    assert evaluation.predecessors_for(running) == evaluation.EvalConfig().stride - 1
    seq = evaluation.heldout_sequences(cfg)["us"][0]
    previous = evaluation.heldout_predecessors(cfg, running)
    assert previous is not None
    feed = previous["us"][0]
    assert len(feed) == 3
    assert [p.index for p in feed[-1]] == [5, 6, 7]
    assert len(feed[0:2]) == 2
    assert [[p.index for p in b] for b in feed] == [[], [1, 2, 3], [5, 6, 7]]  # every frame, in order
    every = [seq[0], *feed[1], seq[1], *feed[2], seq[2]]
    logits, _ = calibration._outputs(model, every, 64)
    engine = OnnxRuntimeEngine(running, device="cpu")
    engine.load()
    try:
        engine.reset()
        average = None
        for j, fr in enumerate(every):
            odds = logits[j, TARGET] - logits[j, 0]
            average = odds if average is None else odds + np.float32(0.7) * (average - odds)
            out = engine.infer(fr.image)
            if fr.index % 4 == 0:  # a scored frame
                fused = logits[j].copy()
                fused[TARGET] = logits[j, 0] + average
                _labels, prob = calibration.decide(fused, 1.0, False, 0.5)
                assert out.instrument_prob is not None
                np.testing.assert_allclose(out.instrument_prob, prob, atol=2e-5)
    finally:
        engine.close()


def test_calibrate_command_running_target_re_exports_or_says_why_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``guidance calibrate CARD --running-target W``: a re-export in seconds, or a plain refusal."""
    from guidance.cli import main

    torch.manual_seed(2)
    model = build_model(TINY_CONFIG).eval()
    _, card_path = export_model_asset(
        model, tmp_path / "m", CardInfo(name="m", version="0"), height=64, width=64
    )
    torch.save(model.state_dict(), card_path.with_suffix(".pt"))
    assert (
        main(
            ["calibrate", str(card_path), "--running-target", "0.5", "--mirror", "--out", str(tmp_path / "x")]
        )
        == 1
    )
    assert "takes no --mirror" in capsys.readouterr().err
    assert main(["calibrate", str(card_path), "--running-target", "0.5", "--out", str(tmp_path / "x")]) == 1
    assert "no calibration block" in capsys.readouterr().err
    small = calibration.CalibrationConfig(
        biases=(1.0,), target_biases=(0.0,), sequences=1, frames=2, stride=5, size=64, seed_probs=()
    )
    _, calibrated = calibration.apply_calibration(
        card_path, tmp_path / "cal", calibration.calibrate(model, small)
    )
    assert (
        main(["calibrate", str(calibrated), "--running-target", "0.5", "--out", str(tmp_path / "run")]) == 0
    )
    assert load_model_card(tmp_path / "run" / "m.json").running_target == 0.5
