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
    keep_seeded_regions,
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


def test_keep_seeded_regions_keeps_whole_regions_that_reach_the_seed() -> None:
    lab = np.zeros((32, 32), np.uint8)
    prob = np.full((32, 32), 0.6, np.float32)
    lab[4, 2:30] = INSTRUMENT  # a needle: one sure pixel, the rest weak
    prob[4, 20] = 0.999
    lab[20:22, 5:15] = INSTRUMENT  # a distractor: weak everywhere
    lab[25:30, 25:30] = TARGET
    prob[25:30, 25:30] = 0.999  # the target's pixels are never instrument seeds
    before = lab.copy()
    keep_seeded_regions(lab, prob, INSTRUMENT, 0.99)
    assert (lab[4, 2:30] == INSTRUMENT).all()  # kept whole, weak pixels included
    assert not (lab[20:22] == INSTRUMENT).any()
    assert np.array_equal(lab == TARGET, before == TARGET)
    keep_seeded_regions(lab, prob, INSTRUMENT, 0.9999)  # no seed anywhere: nothing is left
    assert not (lab == INSTRUMENT).any()


def test_instrument_seed_rule_applies_at_network_resolution_before_restoring() -> None:
    with pytest.raises(PreprocessError, match="seed"):
        Preprocessor((16, 16), 1, Normalization(), instrument_seed_prob=1.0)
    pre = Preprocessor((16, 16), 1, Normalization(), instrument_seed_prob=0.9)
    pre.prepare(np.zeros((32, 32), np.uint8))
    net = np.zeros((1, 16, 16), np.uint8)
    net[0, 2, 1:15] = INSTRUMENT
    net[0, 10, 1:8] = INSTRUMENT
    prob = np.full((1, 16, 16), 0.5, np.float32)
    prob[0, 2, 7] = 0.95
    kept = net.copy()
    out = pre.restore_labels(net, prob)
    assert np.array_equal(net, kept)  # the caller's (possibly bound) buffer is not written
    assert (out == INSTRUMENT).sum() == 14 * 2 * 2  # the seeded row, upsampled; the other is gone
    assert (pre.restore_labels(net) == INSTRUMENT).sum() == 21 * 4  # without the map: no rule


# ---------------------------------------------------------------------------------------- temporal input
def _reference_plane(img: np.ndarray, hw: tuple[int, int] = (64, 64)) -> np.ndarray:
    return model_pre.to_input(img, *hw)[0, 0]


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [(np.uint8, (64, 64)), (np.uint16, (64, 64)), (np.uint8, (120, 80)), (np.uint16, (40, 50))],
)
def test_eng_temporal_prepare_matches_reference_temporal_input(dtype: type, shape: tuple[int, int]) -> None:
    """Channel 0 is the training plane, channel 1 the plane minus the previous frame's, as
    ``engines.models.preprocess.temporal_input`` defines them (uint16 percentile rule, resize included)."""
    frames = [_frame(*shape, dtype=dtype, seed=s) for s in (0, 1, 2)]
    pre = Preprocessor((64, 64), 2, PCT, temporal=True)
    previous = None
    for img in frames:
        got = pre.prepare(img)
        current = _reference_plane(img)
        want = model_pre.temporal_input(current, previous)
        assert got.shape == (1, *want.shape) == (1, 2, 64, 64)
        np.testing.assert_allclose(got[0], want, atol=1e-6)
        previous = current


def test_eng_temporal_difference_is_zero_on_first_frame_after_reset_and_on_new_geometry() -> None:
    pre = Preprocessor((32, 32), 2, PCT, temporal=True)
    a, b, c = (_frame(48, 48, seed=s) for s in (0, 1, 2))
    t = pre.prepare(a)
    assert not t[0, 1].any(), "first frame of a stream: zero difference"
    plane_a = t[0, 0].copy()
    t = pre.prepare(b)
    np.testing.assert_array_equal(t[0, 1], t[0, 0] - plane_a)
    assert np.abs(t[0, 1]).max() > 0.1
    pre.reset()
    t = pre.prepare(c)
    assert not t[0, 1].any(), "reset(): the next frame is a first frame"
    np.testing.assert_allclose(t[0, 0], _reference_plane(c, (32, 32)), atol=1e-6)
    assert pre.prepare(a)[0, 1].any()
    assert not pre.prepare(_frame(40, 56, seed=3))[0, 1].any(), "a new frame size starts a new stream"
    assert pre.prepare(_frame(40, 56, seed=4))[0, 1].any()
    u16 = _frame(40, 56, np.uint16, seed=4)
    assert not pre.prepare(u16)[0, 1].any(), "a new pixel type starts a new stream"


def test_eng_temporal_buffers_are_reused() -> None:
    pre = Preprocessor((32, 32), 2, PCT, temporal=True)
    first = pre.prepare(_frame(48, 48))
    previous = pre._previous
    for seed in range(1, 4):
        assert pre.prepare(_frame(48, 48, seed=seed)) is first
    pre.reset()
    pre.prepare(_frame(60, 60))
    assert pre._previous is previous, "the previous plane is allocated once, whatever the geometry"


def test_eng_temporal_letterbox_padding_has_zero_difference() -> None:
    """Both planes carry the pad value (here non-zero: an offset rule), so their difference there is 0."""
    norm = Normalization.from_card({"kind": "scale", "scale": 1 / 255, "offset": -0.5})
    pre = Preprocessor((64, 64), 2, norm, geometry="letterbox", temporal=True)
    pre.prepare(_frame(100, 200, seed=0))
    t = pre.prepare(_frame(100, 200, seed=1))
    geom = pre.geometry
    assert geom is not None
    assert (geom.y0, geom.nh) == (16, 32)
    np.testing.assert_array_equal(t[0, 0, :16], -0.5)  # the pad value of this rule
    pad = np.ones((64, 64), bool)
    pad[geom.y0 : geom.y0 + geom.nh, geom.x0 : geom.x0 + geom.nw] = False
    assert not t[0, 1][pad].any()
    assert t[0, 1][~pad].any()


def test_eng_temporal_needs_two_channels_and_single_frame_repeats() -> None:
    with pytest.raises(PreprocessError, match="2 input channels"):
        Preprocessor((16, 16), 1, PCT, temporal=True)
    img = _frame(16, 16)
    pre = Preprocessor((16, 16), 2, PCT)  # not temporal: the plane in both channels, as before
    pre.prepare(_frame(16, 16, seed=9))
    t = pre.prepare(img)
    np.testing.assert_array_equal(t[0, 0], t[0, 1])
    pre.reset()  # harmless without temporal state
    np.testing.assert_allclose(pre.prepare(img)[0, 0], _reference_plane(img, (16, 16)), atol=1e-6)
