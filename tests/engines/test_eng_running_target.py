"""A running target (card ``test_time.fusion`` = "running"): the state machine, the card, the exported graph,
and every backend that runs it on this machine agreeing with the arithmetic the evaluation scores (torch
against ONNX Runtime: ``test_eng_views``, beside the alternating views)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines import assets
from engines.backends import onnxruntime_backend, tensorrt_backend
from engines.views import FusionState

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
SHARE = 0.7


def test_eng_running_state_stays_plain_and_weighs_the_previous_average() -> None:
    views = FusionState(alternate=False, previous_share=SHARE)
    seen = []
    for key in ("a", "a", "a", "b", "b"):
        views.begin(key)
        seen.append((float(views.mirror[0]), round(float(views.weight[0]), 6)))
        views.end()
    assert seen == [(0.0, 0.0), (0.0, SHARE), (0.0, SHARE), (0.0, 0.0), (0.0, SHARE)]
    views.reset()
    views.begin("b")
    assert float(views.weight[0]) == 0.0
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="previous_share must be in"):
            FusionState(alternate=False, previous_share=bad)


@needs_torch
def test_eng_running_card_is_parsed_and_bad_ones_refused(tmp_path: Path) -> None:
    card = assets.make_random_model(tmp_path, 32, 32, tiny=True, running_target=SHARE, name="run")
    parsed = assets.load_model_card(card)
    assert parsed.running_target == SHARE
    assert parsed.fuses_frames
    assert not parsed.alternate
    assert not parsed.mirror
    assert not parsed.fuse_instrument
    assert parsed.label == "run 0.0.0-random (running target 0.7)"
    assert parsed.state_inputs == ("previous_target", "previous_weight")
    assert parsed.state_pairs == (("previous_target", "target_log_odds"),)
    assert parsed.output_names()[-1] == "target_log_odds"
    views = parsed.frame_state()
    assert views is not None
    assert not views.alternate
    assert views.previous_share == SHARE
    data = json.loads(card.read_text())
    tt: dict[str, Any] = data["test_time"]
    assert (tt["fusion"], tt["fused_classes"], tt["fuse_weights"]) == (
        "running",
        ["target"],
        {"target": SHARE},
    )
    assert [t["name"] for t in tt["state_inputs"]] == list(parsed.state_inputs)
    assert tt["passes_per_frame"] == 1
    bad: list[tuple[dict[str, Any], str]] = [
        ({"fusion": "median"}, "fusion 'median' is not supported"),
        ({"mirror": "alternate"}, "runs the plain view only"),
        ({"fused_classes": ["instrument", "target"]}, "is not supported with fusion 'running'"),
        ({"fuse_weights": {"target": 1.0}}, "give the running target a weight"),
        ({"fuse_weights": {"target": True}}, "give the running target a weight"),
        ({"fuse_weights": {}}, "give the running target a weight"),
    ]
    for change, message in bad:
        card.write_text(json.dumps({**data, "test_time": {**tt, **change}}))
        with pytest.raises(assets.ModelAssetError, match=message):
            assets.load_model_card(card, verify=False)


def _sequence() -> list[np.ndarray]:
    """Frames at the network's size, a bright bar moving over a textured background that flickers."""
    rng = np.random.default_rng(7)
    base = rng.integers(40, 120, size=(64, 64)).astype(np.float32)
    frames = []
    for k in range(5):
        f = base + rng.normal(0, 12, size=base.shape)
        f[20:26, 10 + 3 * k : 40 + 3 * k] = 230
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return frames


@needs_torch
def test_eng_onnxruntime_running_target_matches_the_arithmetic_and_leaves_the_instrument(
    tmp_path: Path,
) -> None:
    """Frame by frame the engine decides on the network's logits with the target log-odds replaced by
    their running average (the previous average weighted 0.7, none on a stream's first frame); the
    graph's instrument and background logits are the single view's, bit for bit in float32 terms."""
    import onnxruntime as ort
    import torch

    from engines.models import unet
    from engines.models.preprocess import normalize
    from guidance import calibration

    card = assets.make_random_model(tmp_path, 64, 64, tiny=True, seed=4, running_target=SHARE, name="run")
    model = unet.build_model(unet.TINY_CONFIG)
    model.load_state_dict(torch.load(card.with_suffix(".pt"), weights_only=True))
    model.eval()

    def logits(img: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = model(torch.from_numpy(normalize(img)[None, None]))[0].numpy()
        return out

    frames = _sequence()
    engine = onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu")
    engine.load()
    try:
        engine.warm_up()
        stream = [*frames[:3], None, *frames[3:]]  # None: a reset
        expected, got, average = [], [], None
        for img in stream:
            if img is None:
                engine.reset()
                average = None
                continue
            own = logits(img)
            odds = own[2] - own[0]
            average = odds if average is None else odds + SHARE * (average - odds)
            fused = own.copy()
            fused[2] = own[0] + average
            expected.append(calibration.decide(fused, 0.0, False))
            out = engine.infer(img)
            assert out.instrument_prob is not None
            got.append((out.labels, out.instrument_prob))
        for (el, ep), (gl, gp) in zip(expected, got, strict=True):
            np.testing.assert_allclose(gp, ep, atol=2e-5)
            assert (gl == el).mean() >= 0.999
        # not a no-op on the third frame, and the first frame after the reset is the single view again
        assert float(np.abs(got[2][1] - calibration.decide(logits(frames[2]), 0.0, False)[1]).max()) > 1e-4
        np.testing.assert_allclose(got[3][1], calibration.decide(logits(frames[3]), 0.0, False)[1], atol=2e-5)
    finally:
        engine.close()
    sess = ort.InferenceSession(str(card.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    feed = {
        "image": normalize(frames[1])[None, None],
        "previous_target": np.random.default_rng(0).normal(size=(1, 64, 64)).astype(np.float32),
        "previous_weight": np.array([SHARE], dtype=np.float32),
    }
    graph_logits, state = sess.run(["logits", "target_log_odds"], feed)
    own = logits(frames[1])
    np.testing.assert_allclose(graph_logits[0, :2], own[:2], atol=1e-5)  # instrument untouched
    np.testing.assert_allclose(state[0], graph_logits[0, 2] - graph_logits[0, 0], atol=1e-5)  # the average


@needs_torch
def test_eng_tensorrt_variant_of_a_running_target_keeps_its_state(tmp_path: Path) -> None:
    """What TensorRT would parse (checked on ONNX Runtime): no view flag, the state input and output
    survive the pruning, FP32 I/O in the FP16 variant, and both variants decide alike."""
    import onnxruntime as ort

    card = assets.load_model_card(
        assets.make_random_model(tmp_path, 64, 64, tiny=True, seed=2, running_target=SHARE, name="run")
    )
    rng = np.random.default_rng(1)
    feed = {
        "image": rng.random((1, 1, 64, 64), dtype=np.float32),
        "previous_target": rng.normal(size=(1, 64, 64)).astype(np.float32),
        "previous_weight": np.array([SHARE], dtype=np.float32),
    }
    outs = []
    for precision in ("fp32", "fp16"):
        sess = ort.InferenceSession(
            tensorrt_backend.model_for_precision(card, precision), providers=["CPUExecutionProvider"]
        )
        assert [i.name for i in sess.get_inputs()] == list(feed)
        assert all(i.type == "tensor(float)" for i in sess.get_inputs())
        assert sorted(o.name for o in sess.get_outputs()) == [
            "instrument_prob",
            "labels_int32",
            "target_log_odds",
        ]
        outs.append(sess.run(["labels_int32", "instrument_prob", "target_log_odds"], feed))
    (l32, p32, s32), (l16, p16, s16) = outs
    v = tensorrt_backend.compare_outputs(l32[0], p32[0], l16[0], p16[0])
    assert v.ok, v.reason
    np.testing.assert_allclose(s16, s32, atol=0.05)
