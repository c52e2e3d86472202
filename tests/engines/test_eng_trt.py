"""TensorRT backend pieces that run without a GPU: cache keys/invalidation, golden check, FP16 conversion,
background-build lifecycle, probe messages. (The builder/runtime itself needs an NVIDIA GPU.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest

from engines.assets import load_model_card, make_random_model
from engines.backends import tensorrt_backend as trtb
from engines.base import EngineError
from engines.trt_cache import EngineCache, EngineKey, atomic_write_bytes, load_or_invalidate

KEY = EngineKey(
    "guidance-unet", "ab" * 32, "NVIDIA H100 80GB HBM3", (9, 0), "10.7.0", (1, 1, 256, 256), "fp16"
)


@pytest.mark.parametrize(
    "change",
    [
        {"gpu_name": "NVIDIA A100"},
        {"compute_capability": (8, 0)},
        {"trt_version": "11.0.0"},
        {"input_shape": (1, 1, 512, 512)},
        {"precision": "fp32"},
        {"model_sha256": "cd" * 32},
    ],
)
def test_eng_engine_key_changes_with_every_field(change: dict[str, object]) -> None:
    other = dataclasses.replace(KEY, **change)  # type: ignore[arg-type]
    assert other.digest() != KEY.digest()
    assert other.filename() != KEY.filename()
    assert KEY.timing_key().filename() == dataclasses.replace(KEY, precision="fp32").timing_key().filename()


def test_eng_engine_key_is_stable_and_round_trips() -> None:
    assert KEY.digest() == dataclasses.replace(KEY).digest()
    assert EngineKey.from_dict(KEY.to_dict()) == KEY
    assert KEY.filename().startswith("guidance-unet-fp16-1x1x256x256-")
    assert "sm90" in KEY.timing_key().filename()


def test_eng_cache_store_load_and_invalidate(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    assert cache.load(KEY) is None
    cache.store(KEY, b"engine-bytes")
    assert cache.load(KEY) == b"engine-bytes"
    assert cache.entries() == [KEY]
    # a new model hash misses the cache; pruning removes the stale entry
    new = dataclasses.replace(KEY, model_sha256="ef" * 32)
    assert cache.load(new) is None
    cache.store(new, b"new")
    assert cache.prune_model(new) == 1
    assert cache.entries() == [new]
    assert not cache.engine_path(KEY).exists()


def test_eng_cache_rejects_foreign_or_corrupt_sidecar(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"x")
    cache.meta_path(KEY).write_text("{broken")
    assert cache.load(KEY) is None
    assert not cache.engine_path(KEY).exists()
    cache.store(KEY, b"x")
    other = dataclasses.replace(KEY, trt_version="9.9")
    cache.meta_path(KEY).write_text(__import__("json").dumps(other.to_dict()))
    assert cache.load(KEY) is None


def test_eng_deserialize_none_means_rebuild(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"stale")
    assert load_or_invalidate(cache, KEY, lambda blob: None) is None
    assert not cache.engine_path(KEY).exists()  # removed so the rebuild replaces it
    cache.store(KEY, b"good")
    assert load_or_invalidate(cache, KEY, lambda blob: ("engine", blob)) == ("engine", b"good")


def test_eng_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"1")
    atomic_write_bytes(target, b"22")
    assert target.read_bytes() == b"22"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_eng_timing_cache_round_trip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    assert cache.load_timing_cache(KEY) == b""
    cache.store_timing_cache(KEY, b"tactics")
    assert cache.load_timing_cache(KEY.timing_key()) == b"tactics"


def test_eng_golden_check_decisions() -> None:
    ref_l = np.zeros((8, 8), np.uint8)
    ref_l[2:4, 2:6] = 1
    ref_p = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert trtb.compare_outputs(ref_l, ref_p, ref_l.astype(np.int32), ref_p + 0.01).ok
    flipped = ref_l.copy()
    flipped[0, :] = 2
    v = trtb.compare_outputs(ref_l, ref_p, flipped, ref_p)
    assert not v.ok
    assert "labels agree" in v.reason
    v = trtb.compare_outputs(ref_l, ref_p, ref_l, ref_p + 0.2)
    assert not v.ok
    assert "probability differs" in v.reason
    nan = ref_p.copy()
    nan[0, 0] = np.nan
    assert "NaN" in trtb.compare_outputs(ref_l, ref_p, ref_l, nan).reason
    assert not trtb.compare_outputs(ref_l, ref_p, ref_l[:4], ref_p[:4]).ok


def test_eng_fp16_falls_back_to_fp32_when_golden_check_fails() -> None:
    built: list[str] = []

    def build(p: str) -> str:
        built.append(p)
        return p

    def check(engine: str) -> trtb.GoldenVerdict:
        return trtb.GoldenVerdict(engine == "fp32", 1.0, 0.0, "ok" if engine == "fp32" else "fp16 drift")

    precision, engine, _ = trtb.choose_precision(build, check)
    assert (precision, engine, built) == ("fp32", "fp32", ["fp16", "fp32"])
    with pytest.raises(EngineError, match=r"fp16: bad; fp32: bad"):
        trtb.choose_precision(build, lambda e: trtb.GoldenVerdict(False, 0, 1, "bad"))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_eng_fp16_onnx_variant_agrees_with_fp32_on_onnxruntime(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    card = load_model_card(make_random_model(tmp_path, 64, 64, tiny=True, seed=2, name="m"))
    fp32 = trtb.model_for_precision(card, "fp32")
    fp16 = trtb.model_for_precision(card, "fp16")
    m16 = onnx.load_from_string(fp16)
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in m16.graph.initializer)
    # The head after the logits (label decision, instrument probability) stays in FP32.
    inferred = onnx.shape_inference.infer_shapes(m16)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    head = [o for n in m16.graph.node if n.op_type in ("Exp", "Reciprocal") for o in n.output]
    assert head
    assert all(types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for o in head)
    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    outs = []
    for blob in (fp32, fp16):
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        assert sorted(o.name for o in sess.get_outputs()) == ["instrument_prob", "labels_int32"]
        assert sess.get_inputs()[0].type == "tensor(float)"  # FP32 I/O
        outs.append(sess.run(["labels_int32", "instrument_prob"], {sess.get_inputs()[0].name: x}))
    (l32, p32), (l16, p16) = outs
    assert l16.dtype == np.int32
    v = trtb.compare_outputs(l32[0], p32[0], l16[0], p16[0])
    assert v.ok, v.reason


def test_eng_trt_probe_messages() -> None:
    real = importlib.util.find_spec
    assert trtb.probe() is not None  # nothing NVIDIA here
    assert trtb.probe(find_spec=lambda n: None) == trtb.INSTALL_HINT
    assert trtb.INSTALL_HINT.startswith("tensorrt is not installed")

    def only_trt(n: str) -> object:
        return object() if n == "tensorrt" else real(n)

    def no_cuda(n: str) -> object:
        return None if n.startswith("cuda") else object()

    assert trtb.probe(find_spec=only_trt, driver_present=lambda: False) == "no NVIDIA GPU/driver"
    msg = trtb.probe(find_spec=no_cuda, driver_present=lambda: True)
    assert msg == "cuda-bindings is not installed (pip install cuda-python)"


def test_eng_background_build_reports_progress_and_ready() -> None:
    seen: list[str] = []

    def build(rep: trtb.BuildReporter) -> tuple[str, str]:
        for i in range(3):
            rep.phase("tactics", i + 1, 3)
        return "fp16", "/cache/x.engine"

    job = trtb.BuildJob(build)
    job.subscribe(lambda s: seen.append(s.state))
    job.start()
    status = job.wait(5)
    assert job.stop()
    assert status.state == "ready"
    assert status.done
    assert (status.precision, status.engine_path, status.phase) == ("fp16", "/cache/x.engine", "tactics")
    assert seen[0] == "building"
    assert seen[-1] == "ready"


def test_eng_background_build_cancel_and_failure_surface() -> None:
    started = threading.Event()

    def slow(rep: trtb.BuildReporter) -> tuple[str, str]:
        started.set()
        while not rep.cancelled:
            rep.job._cancel.wait(0.01)
        raise trtb.BuildCancelledError("cancelled")

    job = trtb.BuildJob(slow)
    job.start()
    assert started.wait(5)
    assert job.stop(timeout=5)
    assert job.status().state == "cancelled"

    def broken(rep: trtb.BuildReporter) -> tuple[str, str]:
        raise EngineError("parser: unsupported op Foo")

    job = trtb.BuildJob(broken)
    job.start()
    st = job.wait(5)
    job.stop()
    assert st.state == "failed"
    assert "unsupported op Foo" in st.message


def test_eng_golden_frame_is_deterministic(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    card = load_model_card(make_random_model(tmp_path, 32, 48, tiny=True, name="g"))
    a, b = trtb.golden_frame(card), trtb.golden_frame(card)
    assert a.shape == (32, 48)
    np.testing.assert_array_equal(a, b)
    stored = np.full((32, 48), 7, np.uint8)
    np.save(card.onnx_path.with_suffix(".golden.npy"), stored)
    np.testing.assert_array_equal(trtb.golden_frame(card), stored)
    labels, prob = trtb.reference_outputs(card)
    assert labels.shape == (1, 32, 48)
    assert prob.shape == (1, 32, 48)
