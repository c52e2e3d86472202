"""Fluoroscopy phantom: determinism, bit depths, dark instrument, ground truth vs labels."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from engines.base import INSTRUMENT, TARGET
from guidance.phantoms import FluoroConfig, FluoroPhantom, make_phantom


def test_phantom_fluoro_deterministic_and_bit_depths() -> None:
    a, b = FluoroPhantom(seed=5), FluoroPhantom(seed=5)
    assert np.array_equal(a.frame(33).image, b.frame(33).image)
    assert np.array_equal(a.frame(33).labels, b.frame(33).labels)
    f8 = a.frame(33)
    assert f8.image.dtype == np.uint8
    assert f8.modality == "fluoro"
    f16 = FluoroPhantom(seed=5, bit_depth=16).frame(33)
    assert f16.image.dtype == np.uint16
    assert int(f16.image.max()) > 255
    assert np.array_equal(f16.labels, f8.labels)
    with pytest.raises(ValueError, match="bit_depth"):
        FluoroPhantom(bit_depth=12)
    assert isinstance(make_phantom("fluoro", seed=1, width=64, height=64), FluoroPhantom)


@pytest.mark.parametrize("kind", ["needle", "catheter", "guidewire"])
def test_phantom_fluoro_instrument_truth(kind: str) -> None:
    p = FluoroPhantom(
        seed=11, instrument=True, instrument_kind=kind, curvature=0.0 if kind == "needle" else 0.25
    )
    seen = empty = 0
    for i in range(0, 200, 7):
        f = p.frame(i)
        inst = f.labels == INSTRUMENT
        assert f.instrument_present == bool(inst.any())
        if not f.instrument_present:
            empty += 1
            assert f.tip_px is None
            continue
        seen += 1
        assert f.tip_px is not None
        assert f.entry_px is not None
        assert f.centerline_px is not None
        assert f.centerline_px.shape[1] == 2
        ys, xs = np.nonzero(inst)
        assert np.hypot(xs - f.tip_px[0], ys - f.tip_px[1]).min() <= 1.5
        # dark instrument on a brighter background (X-ray attenuation)
        ring = np.zeros_like(inst)
        y0, x0 = round(f.tip_px[1]), round(f.tip_px[0])
        ring[max(0, y0 - 8) : y0 + 9, max(0, x0 - 8) : x0 + 9] = True
        around = ring & (f.labels == 0)
        assert f.image[inst & ring].mean() < f.image[around].mean()
        assert f.axis_angle_deg is not None
        ang = math.degrees(math.atan2(f.tip_px[1] - f.entry_px[1], f.tip_px[0] - f.entry_px[0])) % 180.0
        assert abs(ang - f.axis_angle_deg) < 1e-6
    assert seen >= 5
    assert empty >= 1


def test_phantom_fluoro_target_and_variety() -> None:
    f = FluoroPhantom(seed=2, target_kind="lesion").frame(0)
    assert f.target_centroid_px is not None
    _, xs = np.nonzero(f.labels == TARGET)
    assert abs(xs.mean() - f.target_centroid_px[0]) < 1.0
    assert f.target_radius_px > 3
    cfgs = [FluoroConfig.sample(s) for s in range(30)]
    assert {c.instrument_kind for c in cfgs} == {"needle", "catheter", "guidewire"}
    assert {c.collimator for c in cfgs} == {"none", "rect", "iris"}
    assert min(c.dose_photons for c in cfgs) < 400 < max(c.dose_photons for c in cfgs)
    g = FluoroPhantom(seed=0, collimator="rect", collimator_margin_frac=0.1).frame(0)
    assert g.image[0, 0] < g.image[128, 128]
    assert g.labels[0, 0] == 0


@pytest.mark.parametrize("kind", ["lesion", "vessel"])
def test_phantom_fluoro_faintest_target_is_visible_at_low_dose(kind: str) -> None:
    """The faintest target the sampler draws stays above the quantum noise at the lowest sampled dose."""
    f = FluoroPhantom(
        seed=3,
        target_kind=kind,
        target_mu=0.4,
        dose_photons=150.0,
        spine=False,
        n_ribs=0,
        n_vessels=0,
        collimator="none",
        instrument=False,
    ).frame(0)
    target = (f.labels == TARGET).astype(np.uint8)
    near = (cv2.dilate(target, np.ones((15, 15), np.uint8)) > 0) & ~(
        cv2.dilate(target, np.ones((7, 7), np.uint8)) > 0
    )
    img = f.image.astype(np.float64)
    contrast = img[near].mean() - img[target > 0].mean()
    assert contrast > 1.0 * img[near].std()  # per-pixel contrast-to-noise above one
    assert all(0.4 <= FluoroConfig.sample(s).target_mu <= 0.8 for s in range(40))


@pytest.mark.parametrize("kind", ["needle", "catheter"])
def test_phantom_fluoro_tip_direction_is_the_tangent_at_the_tip(kind: str) -> None:
    """``tip_direction_deg`` is the path's heading at the tip: the needle's axis; for a curved catheter
    the direction of the centreline's last stretch, which differs from the entry -> tip chord."""
    p = FluoroPhantom(seed=4, instrument=True, instrument_kind=kind, curvature=0.4)
    bends = []
    for i in range(20, 150, 10):
        f = p.frame(i)
        if not f.instrument_present:
            continue
        assert f.tip_direction_deg is not None
        assert f.axis_angle_deg is not None
        assert f.centerline_px is not None
        assert f.tip_px is not None
        line = f.centerline_px
        back = line[np.hypot(line[:, 0] - f.tip_px[0], line[:, 1] - f.tip_px[1]) >= 3.0]
        if not len(back):
            continue
        dx, dy = f.tip_px[0] - back[-1][0], f.tip_px[1] - back[-1][1]
        last = math.degrees(math.atan2(dy, dx)) % 180.0
        d = abs(last - f.tip_direction_deg) % 180.0
        assert min(d, 180.0 - d) <= 3.0
        b = abs(f.tip_direction_deg - f.axis_angle_deg) % 180.0
        bends.append(min(b, 180.0 - b))
    assert len(bends) >= 5
    if kind == "needle":
        assert max(bends) < 1e-6
    else:
        assert max(bends) > 5.0
