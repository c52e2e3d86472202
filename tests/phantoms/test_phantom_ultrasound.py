"""Ultrasound phantom: determinism, random access, ground truth consistent with the label map."""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest

from engines.base import INSTRUMENT, TARGET
from guidance.phantoms import PhantomFrame, UltrasoundConfig, UltrasoundPhantom, make_phantom


def test_phantom_frames_are_deterministic_and_random_access() -> None:
    a = UltrasoundPhantom(seed=7)
    b = UltrasoundPhantom(seed=7)
    for i in (120, 3, 57):
        fa, fb = a.frame(i), b.frame(i)
        assert np.array_equal(fa.image, fb.image)
        assert np.array_equal(fa.labels, fb.labels)
        assert fa.tip_px == fb.tip_px
    it = iter(a)
    first = [next(it) for _ in range(3)]
    assert [f.index for f in first] == [0, 1, 2]
    assert np.array_equal(first[2].image, a.frame(2).image)
    assert not np.array_equal(a.frame(100).image, UltrasoundPhantom(seed=8).frame(100).image)


def test_phantom_frame_types_and_geometry() -> None:
    p = UltrasoundPhantom(seed=1, width=200, height=160, fps=20.0, spacing_mm=(0.3, 0.25))
    f = p.frame(40)
    assert isinstance(f, PhantomFrame)
    assert f.image.shape == (160, 200)
    assert f.image.dtype == np.uint8
    assert f.labels.shape == (160, 200)
    assert f.labels.dtype == np.uint8
    assert set(np.unique(f.labels)) <= {0, 1, 2}
    assert f.time_s == pytest.approx(2.0)
    assert f.spacing_mm == (0.3, 0.25)
    assert f.modality == "us"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_phantom_ground_truth_matches_labels(seed: int) -> None:
    p = UltrasoundPhantom(seed=seed)
    seen_needle = seen_empty = 0
    for i in range(0, 330, 11):
        f = p.frame(i)
        inst = f.labels == INSTRUMENT
        assert f.instrument_present == bool(inst.any())
        if not f.instrument_present:
            seen_empty += 1
            assert f.tip_px is None
            assert f.entry_px is None
            assert f.axis_angle_deg is None
            continue
        seen_needle += 1
        assert f.tip_px is not None
        assert f.entry_px is not None
        assert f.axis_angle_deg is not None
        ys, xs = np.nonzero(inst)
        # the tip is at the end of the labelled shaft: some label pixel within 1.5 px, none far beyond it
        d_tip = np.hypot(xs - f.tip_px[0], ys - f.tip_px[1])
        assert d_tip.min() <= 1.5
        direction = np.array([f.tip_px[0] - f.entry_px[0], f.tip_px[1] - f.entry_px[1]])
        direction /= np.linalg.norm(direction)
        along = (np.stack([xs, ys], 1) - np.array(f.entry_px)) @ direction
        length = math.hypot(f.tip_px[0] - f.entry_px[0], f.tip_px[1] - f.entry_px[1])
        assert along.max() <= length + 1.0
        angle = math.degrees(math.atan2(direction[1], direction[0])) % 180.0
        assert abs(angle - f.axis_angle_deg) < 1e-6
        assert f.tip_direction_deg == f.axis_angle_deg  # a straight needle heads along its axis
        # the needle enters from the top half and goes down
        assert direction[1] > 0
    assert seen_needle > 5 or not p.config.needle
    assert seen_empty >= 1  # every sequence has frames without a needle (lead-in / withdrawn)


def test_phantom_target_centroid_and_radius() -> None:
    p = UltrasoundPhantom(seed=0, geometry="linear", target_kind="hypo")
    f = p.frame(0)
    assert f.target_centroid_px is not None
    ys, xs = np.nonzero(f.labels == TARGET)
    assert abs(xs.mean() - f.target_centroid_px[0]) < 1.0
    assert abs(ys.mean() - f.target_centroid_px[1]) < 1.0
    assert f.target_radius_px == pytest.approx(math.sqrt(xs.size / math.pi), rel=0.1)
    # hypo-echoic: darker inside than around
    ring = np.hypot(
        *np.meshgrid(np.arange(256) - f.target_centroid_px[0], np.arange(256) - f.target_centroid_px[1])
    )
    outside = (ring > f.target_radius_px * 1.5) & (ring < f.target_radius_px * 2.5)
    assert f.image[f.labels == TARGET].mean() < f.image[outside].mean() - 15


def test_phantom_config_sampling_and_overrides() -> None:
    cfgs = [UltrasoundConfig.sample(s) for s in range(20)]
    assert len({c.geometry for c in cfgs}) == 2
    assert len({c.target_kind for c in cfgs}) >= 3
    assert all(15.0 <= c.needle_angle_deg <= 70.0 for c in cfgs)
    assert UltrasoundConfig.sample(3) == UltrasoundConfig.sample(3)
    p = UltrasoundPhantom(seed=3, geometry="curvilinear", needle_angle_deg=30.0)
    assert p.config.geometry == "curvilinear"
    assert p.config.needle_angle_deg == 30.0
    f = p.frame(0)
    assert f.image[0, 0] == 0  # outside the sector
    assert f.labels[0, 0] == 0


def test_phantom_insertion_schedule_advances_and_withdraws() -> None:
    cfg = UltrasoundConfig(lead_in_s=0.5, cycle_s=8.0)
    assert cfg.insertion_fraction(0.0) == 0.0
    fr = [cfg.insertion_fraction(0.5 + 8.0 * k / 100) for k in range(100)]
    assert max(fr) == pytest.approx(1.0)
    peak = int(np.argmax(fr))
    assert all(b >= a for a, b in itertools.pairwise(fr[: peak + 1]))  # advancing
    assert fr[-1] == 0.0  # withdrawn again at the end of a cycle
    assert UltrasoundConfig(needle=False).insertion_fraction(3.0) == 0.0


def test_make_phantom() -> None:
    assert isinstance(make_phantom("us", seed=2, width=64, height=64), UltrasoundPhantom)
    with pytest.raises(ValueError, match="modality"):
        make_phantom("mri")


def _shaft_brightness(p: UltrasoundPhantom, index: int) -> float:
    f = p.frame(index)
    assert f.instrument_present
    return float(f.image[f.labels == INSTRUMENT].mean())


def test_phantom_needle_visibility_falls_with_angle() -> None:
    common = {
        "geometry": "linear",
        "bone": False,
        "n_distractors": 0,
        "out_of_plane_frac": 0.0,
        "lead_in_s": 0.0,
    }
    shallow = UltrasoundPhantom(seed=1, needle_angle_deg=20.0, **common)
    steep = UltrasoundPhantom(seed=1, needle_angle_deg=65.0, **common)
    i = 120  # well inserted in both
    assert _shaft_brightness(shallow, i) > _shaft_brightness(steep, i) + 10


def test_phantom_out_of_plane_gap_and_distractors_unlabelled() -> None:
    p = UltrasoundPhantom(seed=2, geometry="linear", out_of_plane_frac=0.45, oop_period_s=2.0, lead_in_s=0.0)
    import cv2

    pieces = set()
    for i in range(60, 240, 4):
        f = p.frame(i)
        if f.instrument_present:
            n, _ = cv2.connectedComponents((f.labels == INSTRUMENT).astype(np.uint8))
            pieces.add(n - 1)
    assert 1 in pieces
    assert 2 in pieces  # sometimes a middle stretch of the shaft is out of plane
    # bright distractors and a bone surface are in the image but never labelled as instrument
    q = UltrasoundPhantom(seed=2, geometry="linear", needle=False, bone=True, n_distractors=3)
    f = q.frame(50)
    assert not f.instrument_present
    assert not (f.labels == INSTRUMENT).any()
    assert int(f.image.max()) >= 220


@pytest.mark.parametrize(("kind", "darker"), [("hypo", True), ("hyper", False)])
def test_phantom_lesion_echogenicity(kind: str, darker: bool) -> None:
    contrast = 0.15 if kind == "hypo" else 3.0
    f = UltrasoundPhantom(
        seed=4, geometry="linear", target_kind=kind, target_contrast=contrast, bone=False, n_distractors=0
    ).frame(0)
    inside = f.image[f.labels == TARGET].mean()
    assert f.target_centroid_px is not None
    yy, xx = np.mgrid[0:256, 0:256]
    r = np.hypot(xx - f.target_centroid_px[0], yy - f.target_centroid_px[1])
    ring = (r > 1.6 * f.target_radius_px) & (r < 2.6 * f.target_radius_px) & (f.labels == 0)
    assert (inside < f.image[ring].mean()) == darker
    none = UltrasoundPhantom(seed=4, target_kind="none").frame(0)
    assert none.target_centroid_px is None
    assert none.target_radius_px == 0.0


def test_phantom_iso_lesion_is_seen_by_its_halo() -> None:
    """An iso-echoic lesion matches its surroundings inside; its rim is clearly darker than both."""
    f = UltrasoundPhantom(
        seed=4, geometry="linear", target_kind="iso", target_contrast=1.0, bone=False, n_distractors=0
    ).frame(0)
    lesion = (f.labels == TARGET).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    rim = cv2.dilate(lesion, k) > lesion  # the 4 px band around the border (the halo is 5 px by default)
    outside = (cv2.dilate(lesion, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (41, 41))) > 0) & ~(
        cv2.dilate(lesion, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (21, 21))) > 0
    )
    img = f.image.astype(np.float64)
    inside_m, rim_m, out_m = img[lesion > 0].mean(), img[rim].mean(), img[outside].mean()
    speckle_sd = img[outside].std()
    assert abs(inside_m - out_m) < 0.5 * speckle_sd
    assert rim_m < out_m - 0.5 * speckle_sd
    assert rim_m < inside_m - 0.5 * speckle_sd


def test_phantom_config_draws_keep_their_order() -> None:
    """Fields added to the sampled config are drawn last: every earlier field of a seed stays put."""
    c = UltrasoundConfig.sample(10021)  # values drawn before halo_px / halo_factor existed
    assert (c.target_kind, c.geometry) == ("iso", "linear")
    assert (round(c.target_radius_px, 4), round(c.needle_angle_deg, 4)) == (19.6664, 52.6218)
    assert round(c.target_contrast, 4) == 0.9731
    assert 4.0 <= c.halo_px <= 7.0
    assert 0.03 <= c.halo_factor <= 0.1


@pytest.mark.parametrize("layout", ["rows", "scatter"])
def test_phantom_point_reflectors_are_bright_unlabelled_and_leave_the_rest(layout: str) -> None:
    """Wire / calcification echoes: bright, compact, never labelled; the speckle around them is unchanged."""
    assert UltrasoundConfig.sample(7).n_point_reflectors == 0  # sample() never draws them
    kw = {"geometry": "linear", "needle": False, "bone": False, "n_distractors": 0, "target_kind": "none"}
    plain = UltrasoundPhantom(seed=7, **kw).frame(30)
    dots = UltrasoundPhantom(seed=7, n_point_reflectors=6, point_layout=layout, **kw).frame(30)
    assert not (dots.labels == INSTRUMENT).any()
    assert np.array_equal(plain.labels, dots.labels)
    diff = np.abs(dots.image.astype(np.int16) - plain.image.astype(np.int16)) > 20
    _, _, stats, _ = cv2.connectedComponentsWithStats(diff.astype(np.uint8))
    blobs = [s for s in stats[1:] if s[cv2.CC_STAT_AREA] >= 4]
    assert 3 <= len(blobs) <= 6 * 4  # each reflector (and its ring-down) shows; none smears the frame
    assert diff.mean() < 0.02
    assert all(s[cv2.CC_STAT_WIDTH] <= 16 and s[cv2.CC_STAT_HEIGHT] <= 24 for s in blobs)
    assert int(dots.image[diff].mean()) > int(plain.image[diff].mean()) + 40
    # Away from the reflectors the tissue is as it was: the brightness scale comes from the speckle alone.
    far = cv2.dilate(diff.astype(np.uint8), np.ones((21, 21), np.uint8)) == 0
    assert np.abs(dots.image[far].astype(np.int16) - plain.image[far]).max() <= 1


def test_phantom_water_bath_is_black_but_for_the_wires_and_the_needle() -> None:
    """A wire phantom in a water tank: no speckle, bright wire echoes, and a needle as bright as in tissue."""
    kw = {"geometry": "linear", "needle": True, "bone": False, "n_distractors": 0, "target_kind": "none"}
    tank = UltrasoundPhantom(seed=7, water_bath_db=40.0, n_point_reflectors=6, point_layout="rows", **kw)
    tissue = UltrasoundPhantom(seed=7, **kw)
    i = next(i for i in range(0, 300, 10) if tank.frame(i).instrument_present)
    f, g = tank.frame(i), tissue.frame(i)
    assert np.array_equal(f.labels, g.labels)
    bright = f.image > 100
    _, _, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8))
    needle = cv2.dilate((f.labels == INSTRUMENT).astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
    wires = [s for s in stats[1:] if s[cv2.CC_STAT_AREA] >= 3]
    assert len(wires) >= 4  # the needle, and the wires that the needle does not hide
    background = ~cv2.dilate(bright.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) & ~needle
    assert np.median(f.image[background]) <= 3  # water is black
    assert np.median(g.image[background]) >= 40  # tissue is not
    shaft = f.labels == INSTRUMENT
    assert f.image[shaft].mean() >= 0.8 * g.image[shaft].mean()  # the needle echoes as it does in tissue


@pytest.mark.parametrize("seed", [3, 8, 21])
def test_phantom_curved_walls_are_bright_unshadowed_and_miss_the_lesion(seed: int) -> None:
    """Curved specular walls (cavities, bowls): bright, never labelled, no shadow, off the lesion."""
    assert UltrasoundConfig.sample(seed).n_curved_walls == 0  # sample() never draws them
    ph = UltrasoundPhantom(seed=seed, n_curved_walls=3, target_kind="hypo", target_radius_px=14.0)
    h, w = ph.height, ph.width
    pad = 6
    yy = np.arange(h + 2 * pad, dtype=np.float32)[:, None] - pad
    xx = np.arange(w + 2 * pad, dtype=np.float32)[None, :] - pad
    flat = np.ones((h + 2 * pad, w + 2 * pad), np.float32)
    lesion = np.zeros(flat.shape, bool)
    cx, cy = w * 0.55 + pad, h * 0.6 + pad
    lesion[(yy + pad - cy) ** 2 + (xx + pad - cx) ** 2 <= 14.0**2] = True
    out = ph._curved_walls(flat.copy(), xx, yy, lesion)  # the echo map, before speckle
    wall = out > 3.0
    assert wall.sum() > 40  # at least one wall is there and bright
    assert out.max() > 8.0
    # No shadow: under the deepest wall pixel of every column the tissue is never darker than it was.
    for col in np.flatnonzero(wall.any(axis=0)):
        deepest = np.flatnonzero(wall[:, col]).max()
        assert out[deepest + 3 :, col].min() >= 0.999, f"shadow under a wall in column {col}"
    # The lesion's echo is neither darkened (no fluid) nor crossed by a wall (posterior enhancement, a
    # brightening of at most 2x, may reach it).
    ratio = out[lesion]
    assert ratio.min() >= 0.99
    assert ratio.max() <= 2.5
    # In the frame: the labels are those of the sequence without walls, and the walls show.
    plain = UltrasoundPhantom(seed=seed, target_kind="hypo", target_radius_px=14.0)
    f, g = ph.frame(40), plain.frame(40)
    assert np.array_equal(f.labels, g.labels)
    assert (f.image.astype(np.int16) - g.image > 60).sum() > 40


def test_phantom_line_reflectors_float_in_the_bath_unlabelled() -> None:
    """Straight reflectors in a water bath: bright, long, unlabelled, and never reaching the border."""
    assert UltrasoundConfig.sample(7).n_line_reflectors == 0  # sample() never draws them
    kw = {"geometry": "linear", "needle": False, "bone": False, "n_distractors": 0, "target_kind": "none"}
    for seed in range(12):
        tank = UltrasoundPhantom(seed=seed, water_bath_db=40.0, **kw).frame(20)
        lines = UltrasoundPhantom(seed=seed, water_bath_db=40.0, n_line_reflectors=2, **kw).frame(20)
        assert np.array_equal(tank.labels, lines.labels)
        assert not (lines.labels == INSTRUMENT).any()
        bright = (lines.image.astype(np.int16) - tank.image > 60).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(bright)
        extents = [max(s[cv2.CC_STAT_WIDTH], s[cv2.CC_STAT_HEIGHT]) for s in stats[1:]]
        assert max(extents) >= 35  # a line, not a dot
        border = np.ones_like(bright, dtype=bool)
        border[8:-8, 8:-8] = False
        assert not bright[border].any()  # it floats: a needle enters from the border, these do not
