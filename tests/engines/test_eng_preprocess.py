"""engines.preprocess: geometry round trips, normalisation rules, buffer reuse."""

from __future__ import annotations

import numpy as np
import pytest

from engines.base import INSTRUMENT, TARGET
from engines.models import preprocess as model_pre
from engines.preprocess import (
    FrameGeometry,
    Normalization,
    PreprocessError,
    Preprocessor,
    keep_main_region,
    percentile_range,
)

PCT = Normalization(kind="percentile")


def _frame(h: int, w: int, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.float32:
        return rng.random((h, w), dtype=np.float32)
    hi = np.iinfo(dtype).max
    return rng.integers(0, hi, size=(h, w), endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("shape", [(64, 64), (120, 80), (40, 50)])
def test_eng_prepare_matches_training_preprocess(dtype: type, shape: tuple[int, int]) -> None:
    img = _frame(*shape, dtype=dtype)
    pre = Preprocessor((64, 64), 1, PCT)
    got = pre.prepare(img)
    want = model_pre.to_input(img, 64, 64)
    assert got.shape == want.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_eng_colour_frames_use_training_luminance() -> None:
    rgb = np.random.default_rng(3).integers(0, 255, size=(48, 64, 3)).astype(np.uint8)
    pre = Preprocessor((32, 32), 1, PCT)
    np.testing.assert_allclose(pre.prepare(rgb), model_pre.to_input(rgb, 32, 32), atol=1e-6)
    one = rgb[:, :, :1]
    np.testing.assert_allclose(pre.prepare(one), model_pre.to_input(one, 32, 32), atol=1e-6)


def test_eng_percentile_range_equals_numpy() -> None:
    img = _frame(100, 90, np.uint16, seed=5) // 16  # 12-bit detector
    lo, hi = percentile_range(img)
    want = np.percentile(img.astype(np.float64), (0.5, 99.5))
    assert lo == pytest.approx(want[0])
    assert hi == pytest.approx(want[1])


def test_eng_buffers_are_reused_for_steady_geometry() -> None:
    pre = Preprocessor((32, 32), 1, PCT)
    a = pre.prepare(_frame(64, 48))
    full = pre._full
    b = pre.prepare(_frame(64, 48, seed=1))
    assert a is b is pre.tensor
    assert pre._full is full  # no reallocation for the same geometry
    pre.prepare(_frame(50, 50))
    assert pre._full is not full


def test_eng_caller_owned_output_buffer() -> None:
    buf = np.zeros((1, 3, 16, 16), dtype=np.float32)
    pre = Preprocessor((16, 16), 3, Normalization(), out=buf)
    out = pre.prepare(_frame(16, 16))
    assert out is buf
    np.testing.assert_array_equal(buf[0, 0], buf[0, 2])
    with pytest.raises(PreprocessError, match="C-contiguous float32"):
        Preprocessor((16, 16), 1, Normalization(), out=np.zeros((1, 1, 16, 8), np.float32))


def test_eng_scale_normalisation_rules() -> None:
    norm = Normalization.from_card({"kind": "scale", "scale": 1 / 255, "offset": -0.5})
    pre = Preprocessor((2, 2), 1, norm)
    np.testing.assert_allclose(pre.prepare(np.full((2, 2), 255, np.uint8)), 0.5, atol=1e-6)
    # uint16 default rule: the full 16-bit range lands on the same range as 8 bits
    np.testing.assert_allclose(pre.prepare(np.full((2, 2), 65535, np.uint16)), 0.5, atol=1e-6)
    np.testing.assert_allclose(pre.prepare(np.full((2, 2), 0.25, np.float32)), -0.25, atol=1e-6)
    with pytest.raises(PreprocessError, match="unknown normalization"):
        Normalization.from_card({"kind": "zscore-ish"})


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (240, 320), (33, 47)])
def test_eng_label_round_trip_geometry(mode: str, shape: tuple[int, int]) -> None:
    """A rectangle drawn in frame coordinates comes back at the same place after a round trip."""
    h, w = shape
    frame = np.zeros(shape, np.uint8)
    r0, r1, c0, c1 = h // 4, h // 2, w // 3, 2 * w // 3
    frame[r0:r1, c0:c1] = 255
    pre = Preprocessor((64, 64), 1, Normalization(), geometry=mode)  # type: ignore[arg-type]
    tensor = pre.prepare(frame)
    labels = (tensor[0, 0] > 0.5).astype(np.uint8) * 2  # "target" where bright
    back = pre.restore_labels(labels)
    assert back.shape == shape
    assert back.dtype == np.uint8
    expect = frame > 0
    agree = (back.astype(bool) == expect).mean()
    assert agree > 0.97
    prob = pre.restore_prob(tensor[0, 0])
    assert prob.shape == shape
    assert abs(float(prob[(r0 + r1) // 2, (c0 + c1) // 2]) - 1.0) < 1e-3
    assert float(prob[0, 0]) < 1e-3


def test_eng_letterbox_geometry_is_centered() -> None:
    g = FrameGeometry.compute((100, 200), (64, 64), "letterbox")
    assert (g.nh, g.nw) == (32, 64)
    assert (g.y0, g.x0) == (16, 0)
    pre = Preprocessor((64, 64), 1, Normalization(), geometry="letterbox")
    t = pre.prepare(np.full((100, 200), 255, np.uint8))
    assert t[0, 0, :16].max() == 0.0  # padding
    assert t[0, 0, 16:48].min() == pytest.approx(1.0)


def test_eng_restored_maps_are_fresh_arrays() -> None:
    pre = Preprocessor((16, 16), 1, Normalization())
    pre.prepare(np.zeros((16, 16), np.uint8))
    lab = np.ones((1, 16, 16), np.uint8)
    out = pre.restore_labels(lab)
    lab[:] = 2
    assert int(out.max()) == 1  # results crossing threads never alias engine buffers


def test_eng_bad_frames_are_refused() -> None:
    pre = Preprocessor((16, 16), 1, Normalization())
    with pytest.raises(PreprocessError, match="image"):
        pre.prepare(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(PreprocessError, match="before prepare"):
        Preprocessor((16, 16)).restore_labels(np.zeros((16, 16), np.uint8))


def test_keep_main_region_drops_islands_but_keeps_a_lesion_cut_by_the_needle() -> None:
    lab = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    lab[np.hypot(xx - 30, yy - 30) <= 10] = TARGET  # the lesion
    lab[28:31, :] = INSTRUMENT  # a needle through it: two target halves joined only by the needle
    lab[2:5, 55:60] = TARGET  # a stray island in a corner
    before = lab.copy()
    keep_main_region(lab, TARGET)
    assert not (lab[2:5, 55:60] == TARGET).any()
    assert (lab[:28] == TARGET).sum() > 100
    assert (lab[31:] == TARGET).sum() > 100
    assert np.array_equal(lab == INSTRUMENT, before == INSTRUMENT)
    assert np.array_equal(lab[:, :50], before[:, :50])


def test_single_region_classes_apply_to_restored_labels() -> None:
    pre = Preprocessor((16, 16), 1, Normalization(), single_region_classes=(TARGET,))
    pre.prepare(np.zeros((32, 32), np.uint8))
    net = np.zeros((1, 16, 16), np.uint8)
    net[0, 2:8, 2:8] = TARGET
    net[0, 12:14, 12:14] = TARGET
    out = pre.restore_labels(net)
    assert out.shape == (32, 32)
    assert (out == TARGET).sum() == 12 * 12  # the island is gone, the main region upsampled
