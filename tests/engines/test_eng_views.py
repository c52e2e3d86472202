"""Alternating views (card ``test_time.mirror`` = "alternate"): the state machine, the exported graph, and
every backend that runs it on this machine agreeing with the arithmetic calibration scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines import assets
from engines.backends import onnxruntime_backend, tensorrt_backend, torch_backend
from engines.base import EngineError
from engines.views import FusionState

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")


def test_eng_views_alternate_and_start_again_on_reset_or_new_geometry() -> None:
    views = FusionState()
    seen = []
    for key in ("a", "a", "a", "b", "b"):
        views.begin(key)
        seen.append((float(views.mirror[0]), float(views.weight[0])))
        views.end()
    assert seen == [
        (0.0, 0.0),  # first frame: plain, nothing to fuse with
        (1.0, 0.5),
        (0.0, 0.5),
        (0.0, 0.0),  # another geometry: a new stream
        (1.0, 0.5),
    ]
    views.reset()
    views.begin("b")
    assert (views.mirror[0], views.weight[0]) == (0.0, 0.0)
    assert not views.mirrored


def test_eng_views_write_into_caller_buffers_and_check_them() -> None:
    mirror = np.full(1, -1.0, dtype=np.float32)
    weight = np.full(1, -1.0, dtype=np.float32)
    views = FusionState(mirror=mirror, weight=weight)
    views.begin()
    views.end()
    views.begin()
    assert (mirror[0], weight[0]) == (1.0, 0.5)
    with pytest.raises(ValueError, match="view_mirrored buffer must be float32"):
        FusionState(mirror=np.zeros(1, dtype=np.float64))


def test_eng_card_alternate_is_parsed_and_other_fusions_refused(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    card = assets.make_random_model(tmp_path, 32, 32, tiny=True, alternate=True, name="alt")
    parsed = assets.load_model_card(card)
    assert parsed.alternate
    assert not parsed.mirror
    data = json.loads(card.read_text())
    assert data["test_time"]["passes_per_frame"] == 1
    assert [t["name"] for t in data["test_time"]["state_inputs"]] == [
        "view_mirrored",
        "previous_target",
        "previous_weight",
    ]
    assert parsed.state_pairs == (("previous_target", "target_log_odds"),)
    assert parsed.label.endswith(" (alternating views)")
    assert not parsed.fuse_instrument
    data["test_time"]["fused_classes"] = ["background", "target"]
    card.write_text(json.dumps(data))
    with pytest.raises(
        assets.ModelAssetError, match="fused_classes \\['background', 'target'\\] is not supported"
    ):
        assets.load_model_card(card)


def test_eng_card_with_the_instrument_fused_names_its_state_and_weight(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    card = assets.make_random_model(
        tmp_path, 32, 32, tiny=True, alternate=True, instrument_weight=0.25, name="alt"
    )
    parsed = assets.load_model_card(card)
    assert parsed.fuse_instrument
    assert parsed.instrument_fuse_weight == 0.25
    assert parsed.label == "alt 0.0.0-random (alternating views, instrument fused 0.25)"
    assert parsed.state_inputs == (
        "view_mirrored",
        "previous_target",
        "previous_weight",
        "previous_instrument",
    )
    assert parsed.state_pairs == (
        ("previous_target", "target_log_odds"),
        ("previous_instrument", "instrument_log_odds"),
    )
    data = json.loads(card.read_text())
    assert data["test_time"]["fused_classes"] == ["instrument", "target"]
    assert data["test_time"]["fuse_weights"] == {"target": 0.5, "instrument": 0.25}
    assert data["test_time"]["state_outputs"] == ["target_log_odds", "instrument_log_odds"]
    assert [t["name"] for t in data["test_time"]["state_inputs"]] == list(parsed.state_inputs)
    assert parsed.output_names()[-2:] == ("target_log_odds", "instrument_log_odds")
    for weights in ({"target": 0.5}, {"target": 0.5, "instrument": 1.0}, {"instrument": "a quarter"}):
        data["test_time"]["fuse_weights"] = weights
        card.write_text(json.dumps(data))
        with pytest.raises(assets.ModelAssetError, match="give the fused instrument a weight"):
            assets.load_model_card(card, verify=False)


def test_eng_single_view_card_beside_an_alternating_graph_is_refused(tmp_path: Path) -> None:
    """A card that does not say "alternate" cannot drive a graph that needs the state inputs."""
    pytest.importorskip("torch")
    card = assets.make_random_model(tmp_path, 32, 32, tiny=True, alternate=True, name="alt")
    data = json.loads(card.read_text())
    del data["test_time"]
    card.write_text(json.dumps(data))
    engine = onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu")
    with pytest.raises(EngineError, match="its card asks for 1"):
        engine.load()


def _sequence() -> list[np.ndarray]:
    """Frames at the network's size (nothing resized), a bright bar moving over a textured background."""
    rng = np.random.default_rng(5)
    base = rng.integers(40, 120, size=(64, 64)).astype(np.float32)
    frames = []
    for k in range(5):
        f = base.copy()
        f[20:26, 10 + 3 * k : 40 + 3 * k] = 230
        frames.append(f.astype(np.uint8))
    return frames


@needs_torch
@pytest.mark.parametrize("instrument_weight", [0.0, 0.25])
def test_eng_onnxruntime_alternating_engine_matches_the_calibration_arithmetic(
    tmp_path: Path, instrument_weight: float
) -> None:
    """Frame by frame, the engine's labels and instrument probability are what calibration scores: the
    network on the frame in this frame's view, the target log-odds averaged with the predecessor's in the
    other view and the instrument's fused at ``instrument_weight``
    (:func:`guidance.calibration.fuse_alternating`), decided with the card's biases. After ``reset()``
    the next frame is the plain single view again."""
    import torch

    from engines.models import unet
    from engines.models.preprocess import normalize
    from guidance import calibration

    card = assets.make_random_model(
        tmp_path, 64, 64, tiny=True, seed=4, alternate=True, instrument_weight=instrument_weight, name="alt"
    )
    model = unet.build_model(unet.TINY_CONFIG)
    model.load_state_dict(torch.load(card.with_suffix(".pt"), weights_only=True))
    model.eval()

    def logits(img: np.ndarray, mirrored: bool) -> np.ndarray:
        x = normalize(img)[None, None]
        if mirrored:
            x = np.ascontiguousarray(x[..., ::-1])
        with torch.inference_mode():
            out = model(torch.from_numpy(x))[0].numpy()
        return np.ascontiguousarray(out[..., ::-1]) if mirrored else out

    frames = _sequence()
    engine = onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu")
    engine.load()
    try:
        engine.warm_up()
        stream = [*frames[:3], None, *frames[3:]]  # None: a reset
        expected, got, prev, view = [], [], None, 0
        for img in stream:
            if img is None:
                engine.reset()
                prev, view = None, 0
                continue
            own = logits(img, view == 1)
            fused = calibration.fuse_alternating(own, prev, instrument_weight)
            expected.append(calibration.decide(fused, 0.0, False))
            out = engine.infer(img)
            assert out.instrument_prob is not None
            got.append((out.labels, out.instrument_prob))
            prev, view = own, 1 - view
        for (el, ep), (gl, gp) in zip(expected, got, strict=True):
            np.testing.assert_allclose(gp, ep, atol=2e-5)
            assert (gl == el).mean() >= 0.999
        # the fusion is not a no-op: frame 1 differs from its single plain view ...
        single = calibration.decide(logits(frames[1], False), 0.0, False)[1]
        assert float(np.abs(got[1][1] - single).max()) > 1e-4
        # ... and the first frame after the reset is the single plain view
        after_reset = calibration.decide(logits(frames[3], False), 0.0, False)[1]
        np.testing.assert_allclose(got[3][1], after_reset, atol=2e-5)
        # the instrument weight is in the graph: the weight-0 arithmetic misses a fused engine's frame 1
        unfused = calibration.decide(
            calibration.fuse_alternating(logits(frames[1], True), logits(frames[0], False)), 0.0, False
        )[1]
        assert np.allclose(got[1][1], unfused, atol=2e-5) == (instrument_weight == 0.0)
    finally:
        engine.close()


@needs_torch
@pytest.mark.parametrize(
    ("optimize", "views"),
    [
        (False, {"alternate": True}),
        (True, {"alternate": True}),
        (True, {"alternate": True, "instrument_weight": 0.25}),
        (False, {"running_target": 0.7}),
        (True, {"running_target": 0.7}),
    ],
)
def test_eng_torch_engine_that_fuses_frames_agrees_with_onnxruntime(
    tmp_path: Path, optimize: bool, views: dict[str, Any]
) -> None:
    """torch runs :class:`AlternatingMirror` (or :class:`RunningTarget`) itself, keeping the state on its
    device; over a stream with a reset and a change of frame size it gives ONNX Runtime's results."""
    from engines.models import unet

    card = assets.make_random_model(tmp_path, 64, 64, tiny=True, seed=6, name="alt", **views)
    net = torch_backend.build_torch_model(assets.load_model_card(card))
    if views.get("alternate"):
        assert isinstance(net, unet.AlternatingMirror)
        assert net.instrument_weight == views.get("instrument_weight", 0.0)
    else:
        assert isinstance(net, unet.RunningTarget)
    frames = _sequence()
    big = np.kron(frames[4], np.ones((2, 2), dtype=np.uint8))
    stream = [*frames[:3], None, frames[3], big, frames[4]]
    results = []
    for engine in (
        onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu"),
        torch_backend.TorchEngine(card, device="cpu", optimize=optimize),
    ):
        engine.load()
        engine.warm_up()
        out = []
        for img in stream:
            if img is None:
                engine.reset()
                continue
            r = engine.infer(img)
            out.append((r.labels, r.instrument_prob))
        engine.close()
        results.append(out)
    for (la, pa), (lb, pb) in zip(*results, strict=True):
        assert (la == lb).mean() >= 0.999
        np.testing.assert_allclose(pa, pb, atol=1e-4)


@needs_torch
@pytest.mark.parametrize("instrument_weight", [0.0, 0.25])
def test_eng_tensorrt_variant_of_an_alternating_model_keeps_its_state_and_agrees(
    tmp_path: Path, instrument_weight: float
) -> None:
    """What TensorRT would parse (checked on ONNX Runtime, as TensorRT itself needs a GPU): the state
    inputs and the state output survive the output pruning, the FP16 variant keeps FP32 I/O, and with the
    same state both variants decide the same labels."""
    import onnxruntime as ort

    card = assets.load_model_card(
        assets.make_random_model(
            tmp_path,
            64,
            64,
            tiny=True,
            seed=2,
            alternate=True,
            instrument_weight=instrument_weight,
            name="alt",
        )
    )
    rng = np.random.default_rng(1)
    feed = {
        "image": rng.random((1, 1, 64, 64), dtype=np.float32),
        "view_mirrored": np.ones(1, dtype=np.float32),
        "previous_target": rng.normal(size=(1, 64, 64)).astype(np.float32),
        "previous_weight": np.array([0.5], dtype=np.float32),
    }
    if instrument_weight:
        feed["previous_instrument"] = rng.normal(size=(1, 64, 64)).astype(np.float32)
    state_outputs = [out for _, out in card.state_pairs]
    outs = []
    for precision in ("fp32", "fp16"):
        sess = ort.InferenceSession(
            tensorrt_backend.model_for_precision(card, precision), providers=["CPUExecutionProvider"]
        )
        assert [i.name for i in sess.get_inputs()] == list(feed)
        types = {i.name: i.type for i in sess.get_inputs()}
        assert all(types[name] == "tensor(float)" for name, _ in card.state_pairs)
        names = sorted(o.name for o in sess.get_outputs())
        assert names == sorted(["instrument_prob", "labels_int32", *state_outputs])
        outs.append(sess.run(["labels_int32", "instrument_prob", *state_outputs], feed))
    (l32, p32, *s32), (l16, p16, *s16) = outs
    v = tensorrt_backend.compare_outputs(l32[0], p32[0], l16[0], p16[0])
    assert v.ok, v.reason
    for a, b in zip(s16, s32, strict=True):
        np.testing.assert_allclose(a, b, atol=0.05)
