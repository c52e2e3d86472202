"""guidance soup: weight averaging of training runs, its card, its ONNX and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from engines.assets import load_model_card  # noqa: E402
from engines.models.unet import (  # noqa: E402
    TINY_CONFIG,
    UNetConfig,
    build_model,
    export_test_model,
)
from guidance import soup  # noqa: E402
from guidance.cli import main  # noqa: E402


def _run(directory: Path, seed: int, config: UNetConfig = TINY_CONFIG) -> Path:
    """A 'training run': card + ONNX + a .pt of a network with its own random weights and BN statistics."""
    _, card = export_test_model(directory, name="m", seed=seed)
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():  # BatchNorm statistics that differ between runs, as trained ones do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(100 + seed)
    torch.save(model.state_dict(), card.with_suffix(".pt"))
    if config != TINY_CONFIG:
        data = json.loads(card.read_text())
        data["architecture"]["config"] = config.to_dict()
        card.write_text(json.dumps(data))
    return card


def test_average_is_the_weighted_mean_and_keeps_integer_buffers() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(9)}
    out = soup.average_state_dicts([a, b], [3.0, 1.0])
    assert torch.equal(out["w"], torch.tensor([2.0, 3.0]))  # 0.75 a + 0.25 b
    assert int(out["n"]) == 7  # a step count is not averaged
    with pytest.raises(soup.SoupError, match="w has shape"):
        soup.average_state_dicts([a, {"w": torch.zeros(3), "n": torch.tensor(1)}], [1.0, 1.0])
    with pytest.raises(soup.SoupError, match="other layers"):
        soup.average_state_dicts([a, {"v": torch.zeros(2), "n": torch.tensor(1)}], [1.0, 1.0])


def test_parse_ingredient_reads_an_optional_share() -> None:
    assert soup.parse_ingredient("runs/a/m.json") == soup.Ingredient(Path("runs/a/m.json"), 1.0)
    assert soup.parse_ingredient("runs/a/m.json=2.5") == soup.Ingredient(Path("runs/a/m.json"), 2.5)
    with pytest.raises(soup.SoupError, match="must be a number"):
        soup.parse_ingredient("m.json=half")
    with pytest.raises(soup.SoupError, match="positive"):
        soup.parse_ingredient("m.json=0")


def test_soup_writes_the_averaged_network_its_onnx_and_a_card_naming_the_ingredients(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    calibrated = json.loads(a.read_text())  # a calibrated ingredient: its operating point is not the soup's
    calibrated["limits"] = ["kept", "One operating point for every modality (instrument logit bias 2)"]
    a.write_text(json.dumps(calibrated))
    onnx_path, card_path = soup.make_soup([soup.Ingredient(a, 3.0), soup.Ingredient(b, 1.0)], tmp_path / "s")

    sa = torch.load(a.with_suffix(".pt"), weights_only=True)
    sb = torch.load(b.with_suffix(".pt"), weights_only=True)
    ss = torch.load(tmp_path / "s" / "m.pt", weights_only=True)
    key = "stem.0.1.running_var"
    torch.testing.assert_close(ss[key], 0.75 * sa[key] + 0.25 * sb[key])
    assert not torch.allclose(ss[key], sa[key])  # the two runs differ, so the test can fail

    # The exported graph is the averaged network, not either ingredient.
    model = build_model(TINY_CONFIG)
    model.load_state_dict(ss)
    model.eval()
    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    want_logits = (want[0] if isinstance(want, tuple) else want).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x}), strict=True))
    np.testing.assert_allclose(got["logits"], want_logits, rtol=1e-4, atol=1e-4)

    card = load_model_card(card_path)  # sha256 of the ONNX verified
    assert "-soup-" in card.version
    data = json.loads(card_path.read_text())
    ingredients = data["training"]["soup"]["ingredients"]
    assert [i["share"] for i in ingredients] == [0.75, 0.25]
    assert ingredients[0]["card"] == str(a)
    assert len(ingredients[1]["weights_sha256"]) == 64
    assert len(data["training"]["ingredients_training"]) == 2
    assert data["limits"] == ["kept"]


def test_soup_refuses_what_cannot_be_averaged(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", 0)
    with pytest.raises(soup.SoupError, match="at least two"):
        soup.make_soup([soup.Ingredient(a)], tmp_path / "s")
    wide = _run(tmp_path / "w", 1, UNetConfig(widths=(4, 8, 12), bottleneck_dilations=(1,), tip_head=True))
    with pytest.raises(soup.SoupError, match="different architectures"):
        soup.make_soup([soup.Ingredient(a), soup.Ingredient(wide)], tmp_path / "s")
    lone = tmp_path / "lone"
    _, card = export_test_model(lone, name="m")  # a card without its weights
    with pytest.raises(soup.SoupError, match=r"m\.pt not found"):
        soup.make_soup([soup.Ingredient(a), soup.Ingredient(card)], tmp_path / "s")
    assert not (tmp_path / "s").exists()  # nothing written


def test_soup_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    assert main(["soup", str(a), f"{b}=2", "--out", str(tmp_path / "s")]) == 0
    card = json.loads((tmp_path / "s" / "m.json").read_text())
    shares = [i["share"] for i in card["training"]["soup"]["ingredients"]]
    assert shares == pytest.approx([1 / 3, 2 / 3], abs=1e-6)
    assert main(["soup", str(a), "--out", str(tmp_path / "t")]) == 1
    assert "at least two" in capsys.readouterr().err
