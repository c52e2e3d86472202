"""engines.assets: model cards, sha256 verification, model resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engines.assets import ModelAssetError, load_model_card, make_random_model, resolve_model, sha256_file


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("model"), 32, 32, tiny=True, name="tiny")


def _copy(src_card: Path, dst: Path) -> Path:
    for suffix in (".json", ".onnx", ".pt"):
        shutil.copy(src_card.with_suffix(suffix), dst / f"tiny{suffix}")
    return dst / "tiny.json"


def test_eng_card_loads_and_describes_model(tiny_model: Path) -> None:
    card = load_model_card(tiny_model)
    assert card.name == "tiny"
    assert card.classes == ("background", "instrument", "target")
    assert card.input_hw == (32, 32)
    assert card.channels == 1
    assert card.normalization.kind == "percentile"
    assert {"labels", "instrument_prob"} <= set(card.output_names())
    assert card.sha256 == sha256_file(card.onnx_path)
    assert card.torch_weights_path.is_file()
    assert load_model_card(tiny_model.with_suffix(".onnx")).name == "tiny"


def test_eng_tampered_onnx_is_rejected_with_both_hashes(tiny_model: Path, tmp_path: Path) -> None:
    card_path = _copy(tiny_model, tmp_path)
    onnx_path = tmp_path / "tiny.onnx"
    expected = sha256_file(onnx_path)
    with open(onnx_path, "ab") as fh:
        fh.write(b"\0")
    actual = sha256_file(onnx_path)
    with pytest.raises(ModelAssetError) as info:
        load_model_card(card_path)
    msg = str(info.value)
    assert str(onnx_path) in msg
    assert f"expected sha256 {expected}" in msg
    assert f"actual {actual}" in msg


def test_eng_missing_and_malformed_cards(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelAssetError, match="not found"):
        load_model_card(tmp_path / "nothing.json")
    card_path = _copy(tiny_model, tmp_path)
    (tmp_path / "tiny.onnx").unlink()
    with pytest.raises(ModelAssetError, match=r"tiny\.onnx.*not found"):
        load_model_card(card_path)
    data = json.loads(tiny_model.read_text())
    del data["onnx"]
    bad = tmp_path / "nohash.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ModelAssetError, match="no sha256"):
        load_model_card(bad)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ModelAssetError, match="unreadable"):
        load_model_card(tmp_path / "junk.json")


def test_eng_resolve_model_by_name_and_default(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUIDANCE_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelAssetError, match="no shipped model"):
        resolve_model(None)
    _copy(tiny_model, tmp_path)
    assert resolve_model("tiny") == tmp_path / "tiny.json"
    assert resolve_model(None) == tmp_path / "tiny.json"  # the only card
    with pytest.raises(ModelAssetError, match="not found"):
        resolve_model("absent-model")


def test_eng_card_postprocess_names_foreground_classes(tiny_model: Path, tmp_path: Path) -> None:
    card_path = _copy(tiny_model, tmp_path)
    assert load_model_card(card_path).single_region_classes == ()
    data = json.loads(card_path.read_text())
    data["postprocess"] = {"single_region_classes": ["target"]}
    card_path.write_text(json.dumps(data))
    assert load_model_card(card_path).single_region_classes == (2,)
    data["postprocess"] = {"single_region_classes": ["lesion"]}
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelAssetError, match="not foreground classes"):
        load_model_card(card_path)
    data["postprocess"] = {"instrument_seed_prob": 0.997}
    card_path.write_text(json.dumps(data))
    card = load_model_card(card_path)
    assert (card.instrument_seed_prob, card.single_region_classes) == (0.997, ())
    data["postprocess"] = {"instrument_seed_prob": 1.5}
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelAssetError, match=r"instrument_seed_prob 1\.5 is not in"):
        load_model_card(card_path)


def _with_input(card_path: Path, **fields: object) -> Path:
    data = json.loads(card_path.read_text())
    for key, value in fields.items():
        if value is None:
            data["input"].pop(key, None)
        else:
            data["input"][key] = value
    card_path.write_text(json.dumps(data))
    return card_path


def test_eng_card_channel_meaning_says_whether_the_model_is_temporal(
    tiny_model: Path, tmp_path: Path
) -> None:
    from engines.models.preprocess import SINGLE_FRAME_CHANNELS, TEMPORAL_CHANNELS

    card_path = _copy(tiny_model, tmp_path)
    card = load_model_card(card_path)
    assert (card.channels, card.temporal) == (1, False)
    _with_input(card_path, channels=2, channel_meaning=list(TEMPORAL_CHANNELS))
    card = load_model_card(card_path)
    assert (card.channels, card.temporal) == (2, True)
    _with_input(card_path, channels=1, channel_meaning=list(SINGLE_FRAME_CHANNELS))
    assert not load_model_card(card_path).temporal
    _with_input(card_path, channels=3, channel_meaning=None)  # older cards: the frame in every channel
    card = load_model_card(card_path)
    assert (card.channels, card.temporal) == (3, False)


@pytest.mark.parametrize(
    ("channels", "meaning"),
    [
        (2, ["current frame", "previous frame"]),
        (1, ["current frame", "current frame minus previous frame"]),
        (2, ["current frame"]),
        (1, "current frame"),
    ],
)
def test_eng_card_with_an_unknown_channel_meaning_is_refused(
    tiny_model: Path, tmp_path: Path, channels: int, meaning: object
) -> None:
    card_path = _with_input(_copy(tiny_model, tmp_path), channels=channels, channel_meaning=meaning)
    with pytest.raises(ModelAssetError) as info:
        load_model_card(card_path)
    msg = str(info.value)
    assert str(card_path) in msg
    assert "understands only ['current frame'] with 1 channel" in msg
    assert "['current frame', 'current frame minus previous frame'] with 2 channels" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("mirror", ["vertical", "both", 1])
def test_eng_card_with_an_unknown_test_time_mirror_is_refused(
    tiny_model: Path, tmp_path: Path, mirror: object
) -> None:
    """A graph this build does not know how to reproduce in torch is refused, not run half-right."""
    card_path = _copy(tiny_model, tmp_path)
    data = json.loads(card_path.read_text())
    data["test_time"] = {"mirror": mirror}
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelAssetError) as info:
        load_model_card(card_path)
    msg = str(info.value)
    assert str(card_path) in msg
    assert "mirror" in msg
    assert "horizontal" in msg
    assert "\n" not in msg
    data["test_time"] = {"mirror": "horizontal"}
    card_path.write_text(json.dumps(data))
    assert load_model_card(card_path).mirror is True


def test_eng_every_shipped_candidate_card_loads_and_matches_its_onnx() -> None:
    """The candidates the README offers (``--model assets/models/candidates/NAME/...``) load, their ONNX
    files match their cards' sha256, and each carries held-out figures."""
    root = Path(__file__).resolve().parents[2] / "assets" / "models" / "candidates"
    cards = sorted(root.glob("*/guidance-unet.json"))
    assert len(cards) >= 1
    for card_path in cards:
        card = load_model_card(card_path)  # verifies the sha256
        assert card.onnx_path.is_file()
        assert json.loads(card_path.read_text()).get("evaluation"), f"{card_path} has no evaluation"
    alternate = load_model_card(root / "s45-alternate" / "guidance-unet.json")
    assert alternate.alternate
