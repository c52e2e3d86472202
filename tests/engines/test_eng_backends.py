"""Registry selection, probe messages, and every available backend agreeing with torch eager."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines import assets, registry
from engines.assets import make_random_model
from engines.backends import onnxruntime_backend, tensorrt_backend, torch_backend
from engines.base import EngineError, EngineUnavailable, SegmentationEngine
from engines.models import preprocess as model_pre

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    # zero head bias would make every class plausible; the random model's background prior is kept,
    # so also compare the probabilities, which carry the real signal.
    make_random_model(d, 64, 64, tiny=True, seed=1, name="labels")
    make_random_model(d, 64, 64, tiny=True, seed=1, name="logits", include_argmax=False)
    return d


def _frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        rng.integers(0, 256, size=(80, 100), dtype=np.uint8),
        rng.integers(0, 4096, size=(64, 64), dtype=np.uint16),
        rng.random((50, 70, 3), dtype=np.float32),
    ]


def _run(engine: SegmentationEngine) -> list[tuple[np.ndarray, np.ndarray]]:
    engine.load()
    try:
        engine.warm_up()
        out = []
        for f in _frames():
            r = engine.infer(f)
            assert r.labels.shape == f.shape[:2]
            assert r.labels.dtype == np.uint8
            assert r.instrument_prob is not None
            out.append((r.labels, r.instrument_prob))
        return out
    finally:
        engine.close()


def test_eng_registry_lists_backends_in_priority_order() -> None:
    names = [s.name for s in registry.backends()]
    assert {"onnxruntime", "torch", "tensorrt"} <= set(names)
    prios = [s.priority for s in registry.backends()]
    assert prios == sorted(prios, reverse=True)
    trt = next(s for s in registry.backends() if s.name == "tensorrt")
    assert not trt.available
    assert trt.reason  # one-line reason


def test_eng_auto_prefers_onnxruntime_over_torch_on_cpu() -> None:
    if torch_backend.cuda_likely():
        pytest.skip("CUDA machine: torch outranks onnxruntime there")
    assert registry.resolve("auto") == "onnxruntime"


def test_eng_named_backend_errors_are_one_line() -> None:
    with pytest.raises(EngineUnavailable, match=r"unknown engine backend 'nope'; known: .*onnxruntime"):
        registry.resolve("nope")
    with pytest.raises(
        EngineUnavailable, match="engine backend 'tensorrt' is not available: tensorrt is not"
    ):
        registry.create("tensorrt")


def test_eng_probe_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def no_torch(name: str, *a: object) -> object:
        return None if name == "torch" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", no_torch)
    assert torch_backend.probe() == "torch is not installed (pip install 'guidance[train]')"
    if HAS_TORCH:
        monkeypatch.setattr(importlib.util, "find_spec", real)
        reason = torch_backend.probe_cuda()
        import torch

        if not torch.cuda.is_available():
            assert reason is not None
            assert reason.startswith("no CUDA device")


@needs_torch
def test_eng_onnxruntime_agrees_with_torch_eager(model_dir: Path) -> None:
    ref = _run(torch_backend.TorchEngine(model_dir / "labels.json", device="cpu", optimize=False))
    for model in ("labels.json", "logits.json"):  # in-graph outputs from export, or appended at load
        got = _run(onnxruntime_backend.OnnxRuntimeEngine(model_dir / model, device="cpu"))
        for (la, pa), (lb, pb) in zip(ref, got, strict=True):
            assert (la == lb).mean() >= 0.999
            np.testing.assert_allclose(pa, pb, atol=1e-4)


@needs_torch
def test_eng_torch_optimised_agrees_with_torch_eager(model_dir: Path) -> None:
    ref = _run(torch_backend.TorchEngine(model_dir / "labels.json", device="cpu", optimize=False))
    got = _run(torch_backend.TorchEngine(model_dir / "labels.json", device="cpu"))
    for (la, pa), (lb, pb) in zip(ref, got, strict=True):
        assert (la == lb).mean() >= 0.999
        np.testing.assert_allclose(pa, pb, atol=1e-4)


def test_eng_describe_and_lifecycle(model_dir: Path) -> None:
    eng = registry.create("onnxruntime", model=model_dir / "labels.json")
    assert isinstance(eng, SegmentationEngine)
    eng.load()
    info = eng.describe()
    assert info.backend == "onnxruntime"
    assert info.input_size == (64, 64)
    assert info.precision == "fp32"
    eng.close()
    assert tensorrt_backend.probe() is not None


@needs_torch
def test_eng_torch_applies_the_calibrated_decision_bias(model_dir: Path, tmp_path: Path) -> None:
    """A card's logit biases (built into the exported graph's labels) move torch's labels the same way."""
    import torch

    from engines.models import unet

    model = unet.build_model(unet.TINY_CONFIG)
    model.load_state_dict(torch.load(model_dir / "labels.pt", weights_only=True))
    model.eval()
    info = unet.CardInfo(name="biased", version="0", training={}, limits=())
    _, card = unet.export_model_asset(
        model, tmp_path, info, height=64, width=64, instrument_logit_bias=0.6, target_logit_bias=-3.0
    )
    torch.save(model.state_dict(), card.with_suffix(".pt"))
    assert assets.load_model_card(card).decision_bias == (0.0, 0.6, -3.0)
    plain = _run(torch_backend.TorchEngine(model_dir / "labels.json", device="cpu", optimize=False))
    ref = _run(onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu"))
    for engine in (
        torch_backend.TorchEngine(card, device="cpu", optimize=False),
        torch_backend.TorchEngine(card, device="cpu"),
    ):
        for (la, pa), (lb, pb), (lp, _) in zip(ref, _run(engine), plain, strict=True):
            assert (la == lb).mean() >= 0.999
            np.testing.assert_allclose(pa, pb, atol=1e-4)  # the probability carries no bias
            assert (lb != lp).mean() > 0.01  # the bias did move labels


@needs_torch
def test_eng_presence_score_and_gate_agree_across_backends(tmp_path: Path) -> None:
    """A presence model: ONNX Runtime and torch report the same score and gate the same frames."""
    import dataclasses

    import torch

    from engines.base import PRESENCE
    from engines.models import unet

    torch.manual_seed(2)
    model = unet.build_model(dataclasses.replace(unet.TINY_CONFIG, presence_head=True)).eval()
    bias = model.head.bias
    assert bias is not None
    with torch.no_grad():
        bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # instrument everywhere until gated
    cards = {}
    for name, threshold in (("open", 0.0), ("shut", 1.0)):  # a sigmoid is always under 1: all gated
        _, card = unet.export_model_asset(
            model,
            tmp_path,
            unet.CardInfo(name=name, version="0"),
            height=64,
            width=64,
            presence_threshold=threshold,
        )
        torch.save(model.state_dict(), card.with_suffix(".pt"))
        cards[name] = card
    assert assets.load_model_card(cards["shut"]).presence_threshold == 1.0
    for name, card in cards.items():
        outs = {}
        for engine in (
            onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu"),
            torch_backend.TorchEngine(card, device="cpu", optimize=False),
            torch_backend.TorchEngine(card, device="cpu"),
        ):
            engine.load()
            try:
                outs[engine] = [engine.infer(f) for f in _frames()]
            finally:
                engine.close()
        ref, *others = outs.values()
        for got in others:
            for a, b in zip(ref, got, strict=True):
                assert 0.0 < a.scores[PRESENCE] < 1.0
                assert b.scores[PRESENCE] == pytest.approx(a.scores[PRESENCE], abs=1e-4)
                assert (a.labels == b.labels).mean() >= 0.999
        instrument = sum(int((r.labels == 1).sum()) for r in ref)
        assert (instrument > 0) if name == "open" else (instrument == 0)


@needs_torch
def test_eng_instrument_seed_rule_is_applied_by_every_backend(tmp_path: Path) -> None:
    """Card ``postprocess.instrument_seed_prob``: an instrument region stays whole when one of its pixels
    reaches the seed (hysteresis, not a per-pixel threshold) and goes when none does, in ONNX Runtime and
    torch alike (TensorRT shares the same ``Preprocessor.restore_labels``)."""
    import torch

    from engines.models import unet

    torch.manual_seed(3)
    model = unet.build_model(unet.TINY_CONFIG).eval()
    bias = model.head.bias
    assert bias is not None
    with torch.no_grad():
        bias.copy_(torch.tensor([0.0, 3.0, 0.0]))  # instrument nearly everywhere, at varied probability
    _, card = unet.export_model_asset(
        model, tmp_path, unet.CardInfo(name="open", version="0"), height=64, width=64
    )
    torch.save(model.state_dict(), card.with_suffix(".pt"))

    def with_seed(name: str, seed: float) -> Path:
        data = json.loads(card.read_text())
        data["postprocess"] = {"instrument_seed_prob": seed}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        return path

    ort = lambda p: onnxruntime_backend.OnnxRuntimeEngine(p, device="cpu")  # noqa: E731
    eager = lambda p: torch_backend.TorchEngine(p, device="cpu", optimize=False)  # noqa: E731
    opened = _run(ort(card))
    open_labels = [lab for lab, _ in opened]
    inst = np.concatenate([(lab == 1).ravel() for lab, _ in opened])
    assert inst.mean() > 0.5  # the premise: a large instrument region
    p_inst = np.concatenate([p.ravel() for _, p in opened])[inst]
    median = float(np.median(p_inst))
    assert float(p_inst.min()) < median < 0.999
    assert assets.load_model_card(with_seed("median", median)).instrument_seed_prob == median
    for make in (ort, eager):
        kept = [lab for lab, _ in _run(make(with_seed("median", median)))]
        gone = [lab for lab, _ in _run(make(with_seed("sure", 0.999999)))]
        for lo, lk, lg in zip(open_labels, kept, gone, strict=True):
            # half the instrument pixels are under the seed, and their regions are kept whole
            assert (lo == lk).mean() >= 0.999
            assert not (lg == 1).any()
            assert np.array_equal(lg == 2, lo == 2)  # the target is untouched
            assert (lg[lo == 1] == 0).all()


# ---------------------------------------------------------------------------------------- temporal models
@pytest.fixture(scope="module")
def temporal_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 2-channel network exported with a temporal card (ONNX + card + state dict)."""
    if not HAS_TORCH:
        pytest.skip("torch not installed")
    import dataclasses

    import torch

    from engines.models import unet

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(3)
        model = unet.build_model(dataclasses.replace(unet.TINY_CONFIG, in_channels=2)).eval()
    finally:
        torch.random.set_rng_state(state)
    d = tmp_path_factory.mktemp("temporal")
    _, card = unet.export_model_asset(
        model, d, unet.CardInfo(name="temporal", version="0"), height=64, width=64
    )
    data = json.loads(card.read_text())
    data["input"]["channel_meaning"] = list(model_pre.TEMPORAL_CHANNELS)
    card.write_text(json.dumps(data))
    torch.save(model.state_dict(), card.with_suffix(".pt"))
    return card


def _temporal_reference(
    card: Path, current: np.ndarray, previous: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and instrument probability at the frame's size: the torch network run on
    ``temporal_input`` of the training preprocessing, resized back as the training code does."""
    import torch

    from engines.models import unet

    arch: Any = json.loads(card.read_text())["architecture"]["config"]
    model = unet.build_model(arch)
    model.load_state_dict(torch.load(card.with_suffix(".pt"), weights_only=True))
    model.eval()
    prev = None if previous is None else model_pre.to_input(previous, 64, 64)[0, 0]
    x = model_pre.temporal_input(model_pre.to_input(current, 64, 64)[0, 0], prev)
    with torch.no_grad():
        logits = model(torch.from_numpy(x[np.newaxis]))
    labels = torch.argmax(logits, dim=1).to(torch.uint8).numpy()[0]
    prob = torch.softmax(logits, dim=1)[0, 1].numpy()
    h, w = current.shape[:2]
    return model_pre.labels_to_frame(labels, h, w), model_pre.prob_to_frame(prob, h, w)


def _stream(dtype: type = np.uint8, shape: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    """Three frames of one stream: a needle-like line advancing over noise."""
    rng = np.random.default_rng(11)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    top = 4000 if dtype is np.uint16 else 255
    out = []
    for i in range(3):
        img = rng.integers(0, top // 3, size=shape) + (top // 2) * (np.abs(yy - 0.5 * xx - 5 - 6 * i) < 2)
        out.append(img.astype(dtype))
    return out


@needs_torch
@pytest.mark.parametrize(
    "make",
    [
        lambda card: onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu"),
        lambda card: torch_backend.TorchEngine(card, device="cpu", optimize=False),
        lambda card: torch_backend.TorchEngine(card, device="cpu"),
    ],
    ids=["onnxruntime", "torch-eager", "torch"],
)
def test_eng_temporal_model_sees_the_previous_frame_until_reset(make: Any, temporal_card: Path) -> None:
    """Each frame is segmented as the network does on ``temporal_input(current, previous)``. A stream's
    first frame has a zero difference: the first after warm-up (whose frames have the same size and type as
    these), the first after ``reset()``, and the first of another frame size (uint16, resized)."""
    a, b, c = _stream()
    d, e, _ = _stream(np.uint16, (80, 100))
    engine: SegmentationEngine = make(temporal_card)
    engine.load()
    try:
        engine.warm_up()
        got = [engine.infer(f) for f in (a, b, c)]
        engine.reset()
        got += [engine.infer(f) for f in (b, d, e)]
    finally:
        engine.close()
    pairs = [(a, None), (b, a), (c, b), (b, None), (d, None), (e, d)]
    want = [_temporal_reference(temporal_card, cur, prev) for cur, prev in pairs]
    for out, (labels, prob) in zip(got, want, strict=True):
        assert out.instrument_prob is not None
        assert out.labels.shape == labels.shape
        assert (out.labels == labels).mean() >= 0.999
        np.testing.assert_allclose(out.instrument_prob, prob, atol=1e-4)
    # The difference channel matters: b after a is not b on its own.
    assert np.abs(want[1][1] - want[3][1]).max() > 1e-3


def test_eng_single_frame_model_keeps_no_state_between_frames(model_dir: Path) -> None:
    a, b, _ = _stream()
    engine = onnxruntime_backend.OnnxRuntimeEngine(model_dir / "labels.json", device="cpu")
    engine.load()
    try:
        engine.warm_up()
        fresh = engine.infer(b)
        engine.infer(a)
        after_a = engine.infer(b)
        engine.reset()
        after_reset = engine.infer(b)
    finally:
        engine.close()
    for out in (after_a, after_reset):
        np.testing.assert_array_equal(out.labels, fresh.labels)
        assert out.instrument_prob is not None
        assert fresh.instrument_prob is not None
        np.testing.assert_array_equal(out.instrument_prob, fresh.instrument_prob)


@needs_torch
def test_eng_card_channels_must_match_the_onnx_input(model_dir: Path, tmp_path: Path) -> None:
    """A temporal card beside a single-frame ONNX file is refused at load, saying both channel counts."""
    import shutil

    for suffix in (".onnx", ".pt"):
        shutil.copy(model_dir / f"labels{suffix}", tmp_path / f"labels{suffix}")
    data = json.loads((model_dir / "labels.json").read_text())
    data["input"].update(channels=2, channel_meaning=list(model_pre.TEMPORAL_CHANNELS))
    (tmp_path / "labels.json").write_text(json.dumps(data))
    engine = onnxruntime_backend.OnnxRuntimeEngine(tmp_path / "labels.json", device="cpu")
    with pytest.raises(EngineError, match="has 1 channels, the card says 2"):
        engine.load()
    engine.close()


@needs_torch
def test_eng_mirrored_model_agrees_across_backends(model_dir: Path, tmp_path: Path) -> None:
    """A card whose graph averages the mirrored view: torch (which runs the network itself) averages it
    too, so both backends give the same labels and probabilities, and they differ from one view's."""
    import torch

    from engines.models import unet

    model = unet.build_model(unet.TINY_CONFIG)
    model.load_state_dict(torch.load(model_dir / "labels.pt", weights_only=True))
    model.eval()
    _, card = unet.export_model_asset(
        model, tmp_path, unet.CardInfo(name="mirrored", version="0"), height=64, width=64, mirror=True
    )
    torch.save(model.state_dict(), card.with_suffix(".pt"))
    assert isinstance(torch_backend.build_torch_model(assets.load_model_card(card)), unet.MirrorEnsemble)
    single = _run(onnxruntime_backend.OnnxRuntimeEngine(model_dir / "labels.json", device="cpu"))
    ref = _run(onnxruntime_backend.OnnxRuntimeEngine(card, device="cpu"))
    for engine in (
        torch_backend.TorchEngine(card, device="cpu", optimize=False),
        torch_backend.TorchEngine(card, device="cpu"),
    ):
        for (la, pa), (lb, pb) in zip(ref, _run(engine), strict=True):
            assert (la == lb).mean() >= 0.999
            np.testing.assert_allclose(pa, pb, atol=1e-4)
    assert max(float(np.abs(pa - ps).max()) for (_, pa), (_, ps) in zip(ref, single, strict=True)) > 1e-3
