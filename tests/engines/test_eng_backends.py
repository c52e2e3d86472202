"""Registry selection, probe messages, and every available backend agreeing with torch eager."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engines import assets, registry
from engines.assets import make_random_model
from engines.backends import onnxruntime_backend, tensorrt_backend, torch_backend
from engines.base import EngineUnavailable, SegmentationEngine

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
