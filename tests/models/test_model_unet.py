"""The segmentation network: shapes, compute budget, MAC counter, ONNX export and model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from engines.models import preprocess  # noqa: E402
from engines.models.unet import (  # noqa: E402
    TINY_CONFIG,
    CardInfo,
    UNetConfig,
    build_model,
    count_macs,
    export_model_asset,
    export_onnx,
    export_test_model,
    sha256_file,
)


def test_model_mac_counter_matches_hand_count() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),  # 8*16*16 * 1*9
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 8*16*16 * 1*9
        nn.Conv2d(8, 4, 1, stride=2),  # 4*8*8 * 8
        nn.ConvTranspose2d(4, 2, 2, stride=2),  # 4*8*8 * 2*2*2
        nn.Flatten(),
        nn.Linear(2 * 16 * 16, 10),  # 512*10
    )
    expected = 8 * 256 * 9 + 8 * 256 * 9 + 4 * 64 * 8 + 4 * 64 * 2 * 4 + 512 * 10
    assert count_macs(net, (1, 1, 16, 16)) == expected
    # Hooks are removed afterwards: counting twice gives the same figure.
    assert count_macs(net, (1, 1, 16, 16)) == expected


def test_model_default_is_within_compute_budget() -> None:
    model = build_model(UNetConfig())
    macs = count_macs(model, (1, 1, 256, 256))
    assert 0.1e9 < macs <= 0.5e9


def test_model_output_shape_and_aux_head() -> None:
    model = build_model(TINY_CONFIG).eval()
    x = torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        logits = model(x)
        logits2, tip, presence = model.forward_with_aux(x)
    assert logits.shape == (2, 3, 32, 48)
    assert presence is None  # no presence head unless asked for
    assert tip is not None
    assert tip.shape == (2, 1, 32, 48)
    assert torch.equal(logits, logits2)


def test_model_build_from_card_dict_round_trips() -> None:
    cfg = UNetConfig(widths=(8, 16, 16), bottleneck_dilations=(1, 2))
    again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def _small_model_with_bn_stats(seed: int) -> nn.Module:
    """A small network in eval mode with non-trivial BatchNorm statistics, so the export's BN folding is
    exercised."""
    torch.manual_seed(seed)
    model = build_model(UNetConfig(widths=(8, 16, 16, 32), bottleneck_dilations=(1, 2)))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 1, 64, 64))
    return model.eval()


@pytest.mark.parametrize("include_argmax", [True, False])
def test_model_onnx_export_matches_torch(tmp_path: Path, include_argmax: bool) -> None:
    model = _small_model_with_bn_stats(3)
    path = export_onnx(
        model, tmp_path / "m.onnx", opset=17, height=64, width=96, include_argmax=include_argmax
    )
    x = np.random.default_rng(0).random((1, 1, 64, 96), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"image": x})
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    # Tolerance: fp32 with BN folding and a different conv kernel order -> 1e-4 absolute on logits.
    np.testing.assert_allclose(outs[0], ref, atol=1e-4, rtol=1e-4)
    names = [o.name for o in sess.get_outputs()]
    if include_argmax:
        assert names == ["logits", "labels", "instrument_prob"]
        assert outs[1].dtype == np.uint8
        assert outs[1].shape == (1, 64, 96)
        assert outs[2].dtype == np.float32
        assert outs[2].shape == (1, 64, 96)
        # argmax may differ only where two logits are within float noise of each other.
        top2 = np.sort(ref[0], axis=0)
        decisive = (top2[-1] - top2[-2]) > 1e-3
        np.testing.assert_array_equal(outs[1][0][decisive], ref[0].argmax(0)[decisive])
        prob = torch.softmax(torch.from_numpy(ref), dim=1)[:, 1].numpy()
        np.testing.assert_allclose(outs[2], prob, atol=1e-5)
    else:
        assert names == ["logits"]


def test_model_card_fields_and_hash(tmp_path: Path) -> None:
    model = build_model(TINY_CONFIG)
    info = CardInfo(name="unit", version="1.2.3", training={"seed": 1}, evaluation={"us": {"dice": 0.5}})
    onnx_path, card_path = export_model_asset(model, tmp_path, info, height=32, width=32)
    card = json.loads(card_path.read_text())
    assert card["name"] == "unit"
    assert card["version"] == "1.2.3"
    assert card["classes"] == ["background", "instrument", "target"]
    assert card["input"] == {
        "name": "image",
        "height": 32,
        "width": 32,
        "channels": 1,
        "channel_meaning": ["current frame"],
        "layout": "NCHW",
        "dtype": "float32",
        "shape": [1, 1, 32, 32],
    }
    assert card["normalization"]["id"] == preprocess.NORMALIZATION_ID
    assert card["output"]["names"] == ["logits", "labels", "instrument_prob"]
    assert card["onnx"]["sha256"] == sha256_file(onnx_path)
    assert card["onnx"]["opset"] >= 17
    assert card["architecture"]["macs_per_frame"] == count_macs(model, (1, 1, 32, 32))
    assert card["evaluation"] == {"us": {"dice": 0.5}}
    assert "intended_use" in card
    assert "limits" in card
    assert "training" in card


def test_model_tiny_test_model_runs_in_onnxruntime(tmp_path: Path) -> None:
    onnx_path, card_path = export_test_model(tmp_path, height=64, width=64)
    card = json.loads(card_path.read_text())
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    image = (np.arange(100 * 120, dtype=np.uint32) % 256).astype(np.uint8).reshape(100, 120)
    x = preprocess.to_input(image, card["input"]["height"], card["input"]["width"])
    logits, labels, _prob = sess.run(None, {"image": x})
    assert logits.shape == (1, 3, 64, 64)
    back = preprocess.labels_to_frame(labels, 100, 120)
    assert back.shape == (100, 120)
    assert back.dtype == np.uint8
    assert int(back.max()) <= 2
    # Same seed -> same file contents (reproducible test asset).
    other = export_test_model(tmp_path / "again", height=64, width=64)[0]
    assert sha256_file(other) == sha256_file(onnx_path)


def test_model_preprocess_normalisation_rules() -> None:
    u8 = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    np.testing.assert_allclose(preprocess.normalize(u8), u8 / 255.0, atol=1e-7)
    u16 = np.linspace(1000, 5000, 10_000).astype(np.uint16).reshape(100, 100)
    n = preprocess.normalize(u16)
    assert n.dtype == np.float32
    assert n.min() == 0.0
    assert n.max() == 1.0
    assert abs(float(np.median(n)) - 0.5) < 0.01
    flat = np.full((8, 8), 700, dtype=np.uint16)
    assert float(preprocess.normalize(flat).max()) == 0.0
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    np.testing.assert_allclose(preprocess.normalize(rgb), np.full((4, 4), 150 / 255.0), atol=1e-6)
    x = preprocess.to_input(np.zeros((300, 200), np.uint8), 128, 96)
    assert x.shape == (1, 1, 128, 96)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous


def test_model_instrument_logit_bias_only_changes_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG).eval()
    bias = model.head.bias
    assert bias is not None
    with torch.no_grad():
        bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # instrument everywhere without the bias
    x = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    plain = export_onnx(model, tmp_path / "a.onnx", height=32, width=32, include_argmax=True)
    biased = export_onnx(model, tmp_path / "b.onnx", height=32, width=32, instrument_logit_bias=100.0)
    pa = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    pb = ort.InferenceSession(str(biased), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    np.testing.assert_allclose(pa[0], pb[0], atol=1e-6)
    np.testing.assert_allclose(pa[2], pb[2], atol=1e-6)
    assert int((pa[1] == 1).sum()) > 0
    assert int((pb[1] == 1).sum()) == 0


def test_model_presence_head_exports_its_score_and_gates_the_instrument(tmp_path: Path) -> None:
    """The presence head's sigmoid is an output; a threshold over it clears instrument labels, nothing else."""
    import dataclasses

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY_CONFIG, presence_head=True)).eval()
    bias = model.head.bias
    assert bias is not None
    with torch.no_grad():
        bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # instrument everywhere
    x = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        _, presence = model.forward_with_presence(torch.from_numpy(x))
    assert presence is not None
    p_ref = float(torch.sigmoid(presence)[0])
    runs = {}
    for threshold in (0.0, p_ref - 0.01, p_ref + 0.01):
        info = CardInfo(name=f"p{len(runs)}", version="0")
        onnx_path, card_path = export_model_asset(
            model, tmp_path, info, height=32, width=32, presence_threshold=threshold
        )
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == [
            "logits",
            "labels",
            "instrument_prob",
            "instrument_present",
        ]
        runs[threshold] = sess.run(None, {"image": x})
        card = json.loads(card_path.read_text())
        assert card["output"]["presence_threshold"] == threshold
        assert card["output"]["names"][-1] == "instrument_present"
        assert card["architecture"]["config"]["presence_head"] is True
    open_, below, above = runs.values()
    assert open_[3].shape == (1,)
    assert open_[3][0] == pytest.approx(p_ref, abs=1e-5)
    assert int((open_[1] == 1).sum()) > 0
    np.testing.assert_array_equal(below[1], open_[1])  # scored above the threshold: untouched
    assert int((above[1] == 1).sum()) == 0  # scored below it: no instrument left
    np.testing.assert_array_equal(above[1][open_[1] != 1], open_[1][open_[1] != 1])
    np.testing.assert_allclose(above[2], open_[2], atol=1e-6)  # the probability is not gated
    # The head's MACs are counted: (2 * 8 + 4) pooled features -> 32 -> 1.
    plain = count_macs(build_model(TINY_CONFIG), (1, 1, 32, 32))
    assert count_macs(model, (1, 1, 32, 32)) - plain == 20 * 32 + 32


def test_model_mirrored_export_averages_both_views_and_is_mirror_equivariant(tmp_path: Path) -> None:
    """``mirror=True``: the graph's logits are the mean of f(x) and the mirrored f(mirrored x), so a
    mirrored frame gives exactly the mirrored result (a single view does not); the card says so."""
    from engines.assets import load_model_card
    from engines.models.unet import MirrorEnsemble

    model = _small_model_with_bn_stats(4)
    info = CardInfo(name="mirrored", version="0")
    onnx_path, card_path = export_model_asset(
        model, tmp_path, info, height=64, width=96, instrument_logit_bias=0.5, mirror=True
    )
    x = np.random.default_rng(5).random((1, 1, 64, 96), dtype=np.float32)
    xm = np.ascontiguousarray(x[..., ::-1])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, labels, prob = sess.run(None, {"image": x})
    with torch.no_grad():
        single = model(torch.from_numpy(x)).numpy()
        single_m = model(torch.from_numpy(xm)).numpy()
        wrapped = MirrorEnsemble(model).eval()(torch.from_numpy(x)).numpy()
    by_hand = 0.5 * (single + single_m[..., ::-1])
    np.testing.assert_allclose(logits, by_hand, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(wrapped, by_hand, atol=1e-5)
    assert logits.shape == (1, 3, 64, 96)
    assert labels.shape == prob.shape == (1, 64, 96)
    logits_m, labels_m, prob_m = sess.run(None, {"image": xm})
    np.testing.assert_allclose(logits_m[..., ::-1], logits, atol=1e-5)
    np.testing.assert_allclose(prob_m[..., ::-1], prob, atol=1e-6)
    top2 = np.sort(logits[0] - np.array([0.0, 0.5, 0.0], np.float32)[:, None, None], axis=0)
    decisive = (top2[-1] - top2[-2]) > 1e-4
    np.testing.assert_array_equal(labels_m[0][:, ::-1][decisive], labels[0][decisive])
    assert np.abs(single_m[..., ::-1] - single).max() > 1e-2  # one view alone is not equivariant

    card = json.loads(card_path.read_text())
    macs = card["architecture"]["macs_per_frame"]
    assert card["test_time"]["mirror"] == "horizontal"
    assert card["test_time"]["passes_per_frame"] == 2
    assert card["test_time"]["macs_per_frame"] == 2 * macs
    assert load_model_card(card_path).mirror is True
    _, plain_card = export_model_asset(
        model, tmp_path, CardInfo(name="plain", version="0"), height=64, width=96
    )
    assert "test_time" not in json.loads(plain_card.read_text())
    assert load_model_card(plain_card).mirror is False
