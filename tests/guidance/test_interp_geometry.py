"""Interpreter on synthetic label maps with known geometry, and the one-euro tip filter."""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest

from engines.base import INSTRUMENT, TARGET
from guidance.interpretation import Interpreter, OneEuroFilter, TipFilterParams
from guidance.phantoms.base import fill_segment

W, H = 256, 256


def needle_labels(
    entry: tuple[float, float], tip: tuple[float, float], width: float = 4.0, shape: tuple[int, int] = (H, W)
) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    fill_segment(lab, entry, tip, width, INSTRUMENT)
    return lab


def add_disk(lab: np.ndarray, c: tuple[float, float], r: float) -> None:
    yy, xx = np.mgrid[0 : lab.shape[0], 0 : lab.shape[1]]
    disk = np.hypot(xx - c[0], yy - c[1]) <= r
    lab[disk & (lab == 0)] = TARGET


@pytest.mark.parametrize(
    ("entry", "tip"),
    [((0.0, 40.0), (150.3, 120.7)), ((255.0, 10.0), (120.2, 190.6)), ((60.0, 0.0), (100.5, 160.2))],
)
def test_interp_tip_angle_entry(entry: tuple[float, float], tip: tuple[float, float]) -> None:
    interp = Interpreter(tip_filter=None)
    res = interp.update(needle_labels(entry, tip), (0.2, 0.2), 0.0)
    inst = res.instrument
    assert inst is not None
    assert math.dist(inst.raw_tip_px, tip) <= 1.0
    assert math.dist(inst.tip_px, tip) <= 1.0
    assert math.dist(inst.entry_px, entry) <= 2.5
    true_angle = math.degrees(math.atan2(tip[1] - entry[1], tip[0] - entry[0])) % 180.0
    assert abs(inst.angle_deg - true_angle) <= 1.0
    assert inst.direction[0] * (tip[0] - entry[0]) + inst.direction[1] * (tip[1] - entry[1]) > 0
    assert inst.length_mm == pytest.approx(math.dist(entry, tip) * 0.2, abs=0.5)
    assert inst.confidence > 0.8
    assert inst.centerline_px.shape == (2, 2)
    assert inst.centerline_px.dtype == np.float32
    ex, ey = inst.trajectory_end_px
    assert min(ex, ey, W - 1 - ex, H - 1 - ey) < 1e-3  # the projected path ends on the border
    assert res.instrument_contours
    assert all(c.dtype == np.float32 and c.shape[1] == 2 for c in res.instrument_contours)
    assert res.status == "no target"


def test_interp_distances_and_on_path_with_anisotropic_spacing() -> None:
    entry, tip = (0.0, 30.0), (110.0, 100.0)
    d = np.subtract(tip, entry) / math.dist(entry, tip)
    centre = (tip[0] + 60 * d[0], tip[1] + 60 * d[1])
    lab = needle_labels(entry, tip)
    add_disk(lab, centre, 20.0)
    spacing = (0.2, 0.3)
    res = Interpreter(tip_filter=None).update(lab, spacing, 0.0)
    assert res.instrument is not None
    assert res.target is not None
    assert math.dist(res.target.centroid_px, centre) < 0.2
    expected = math.hypot((centre[0] - tip[0]) * spacing[0], (centre[1] - tip[1]) * spacing[1])
    assert res.tip_to_target_mm == pytest.approx(expected, abs=0.1)
    assert res.tip_to_boundary_mm is not None
    assert 0.0 < res.tip_to_boundary_mm < expected
    assert res.on_path is True
    assert res.status == "ok"
    assert res.target.area_mm2 == pytest.approx(math.pi * 20**2 * 0.06, rel=0.05)
    assert res.target.equivalent_diameter_mm == pytest.approx(2 * math.sqrt(res.target.area_mm2 / math.pi))
    assert res.target_contours

    # target moved off the path: not on path; tip inside the target: negative boundary distance
    lab2 = needle_labels(entry, tip)
    add_disk(lab2, (centre[0] + 50 * d[1], centre[1] - 50 * d[0]), 15.0)
    assert Interpreter(tip_filter=None).update(lab2, spacing, 0.0).on_path is False
    lab3 = np.zeros_like(lab)
    add_disk(lab3, tip, 25.0)
    fill_segment(lab3, entry, tip, 4.0, INSTRUMENT)
    res3 = Interpreter(tip_filter=None).update(lab3, spacing, 0.0)
    assert res3.tip_to_boundary_mm is not None
    assert res3.tip_to_boundary_mm < 0


def test_interp_no_instrument_and_empty() -> None:
    interp = Interpreter()
    res = interp.update(np.zeros((H, W), np.uint8), (0.2, 0.2), 0.0)
    assert res.instrument is None
    assert res.status == "no instrument"
    lab = np.zeros((H, W), np.uint8)
    add_disk(lab, (100, 100), 10)
    lab[5, 5] = INSTRUMENT  # a few stray pixels are no instrument
    res = interp.update(lab, (0.2, 0.2), 0.1)
    assert res.instrument is None
    assert res.target is not None
    assert res.status == "no instrument"


@pytest.mark.parametrize("shape", [(H, W), (616, 820)])
def test_interp_blobs_are_not_instruments_at_any_frame_size(shape: tuple[int, int]) -> None:
    """A dot has no axis: on the real PLUS N-wire recordings the network marked wire cross-sections, which
    the upscaling to a 616x820 frame made larger than the pixel floor. Shape decides, not pixel count."""
    k = shape[1] / W  # frame pixels per network pixel
    blob = np.zeros(shape, np.uint8)
    cv2.circle(blob, (shape[1] // 2, shape[0] // 3), round(3 * k), INSTRUMENT, -1)
    assert int(blob.sum()) >= 20  # above the pixel floor, so only the shape gate can reject it
    res = Interpreter(tip_filter=None).update(blob, (0.2, 0.2), 0.0)
    assert res.instrument is None
    assert res.status == "no instrument"
    stub = needle_labels((0.0, 40.0 * k), (4.0 * k, 42.0 * k), 3.0 * k, shape)  # under 6/256 of the frame
    assert Interpreter(tip_filter=None).update(stub, (0.2, 0.2), 0.0).instrument is None
    shaft = needle_labels((0.0, 40.0 * k), (20.0 * k, 50.0 * k), 3.0 * k, shape)  # short but a shaft
    found = Interpreter(tip_filter=None).update(shaft, (0.2, 0.2), 0.0).instrument
    assert found is not None
    assert math.dist(found.raw_tip_px, (20.0 * k, 50.0 * k)) < 2.0 * k


def test_interp_confidence_falls_for_fragmented_masks() -> None:
    entry, tip = (0.0, 40.0), (180.0, 150.0)
    clean = needle_labels(entry, tip)
    broken = clean.copy()
    d = np.subtract(tip, entry) / math.dist(entry, tip)
    for k in range(10, 200, 40):  # cut the shaft into five pieces
        p = (entry[0] + k * d[0], entry[1] + k * d[1])
        cv2.circle(broken, (round(p[0]), round(p[1])), 8, 0, -1)
    rng = np.random.default_rng(0)
    noisy = clean.copy()
    noisy[rng.uniform(size=clean.shape) < 0.01] = INSTRUMENT  # scattered false positives
    c_clean = Interpreter(tip_filter=None).update(clean, (0.2, 0.2), 0.0).instrument
    c_broken = Interpreter(tip_filter=None).update(broken, (0.2, 0.2), 0.0).instrument
    c_noisy = Interpreter(tip_filter=None).update(noisy, (0.2, 0.2), 0.0).instrument
    short = (
        Interpreter(tip_filter=None)
        .update(needle_labels(entry, (14.0, 48.0), 4.0), (0.2, 0.2), 0.0)
        .instrument
    )
    assert c_clean is not None
    assert c_broken is not None
    assert c_noisy is not None
    assert short is not None
    assert c_clean.confidence > 0.8
    assert c_broken.confidence < c_clean.confidence - 0.2
    assert c_noisy.confidence < c_clean.confidence - 0.2
    assert short.confidence < c_clean.confidence - 0.2
    prob = np.full(clean.shape, 0.2, np.float32)
    weak = Interpreter(tip_filter=None).update(clean, (0.2, 0.2), 0.0, prob).instrument
    assert weak is not None
    assert weak.confidence < 0.5
    # below the floor (0.25) the shaft is not reported at all
    prob[:] = 0.1
    assert Interpreter(tip_filter=None).update(clean, (0.2, 0.2), 0.0, prob).instrument is None
    assert Interpreter(tip_filter=None, low_confidence=0.9).update(broken, (0.2, 0.2), 0.0).status == (
        "low confidence"
    )


def test_interp_insertion_direction_stays_consistent() -> None:
    interp = Interpreter(tip_filter=None)
    # a shaft entering from the left edge: direction points right/down
    first = interp.update(needle_labels((0.0, 60.0), (120.0, 130.0)), (0.2, 0.2), 0.0).instrument
    assert first is not None
    assert first.direction[0] > 0
    # now a shaft fully inside the image, both ends equally far from the border: keep the direction
    mid = interp.update(needle_labels((78.0, 98.0), (178.0, 158.0)), (0.2, 0.2), 0.033).instrument
    assert mid is not None
    assert mid.direction[0] > 0
    assert math.dist(mid.raw_tip_px, (178.0, 158.0)) <= 1.0
    # fresh interpreter, entry from the right: direction points left
    right = Interpreter(tip_filter=None).update(needle_labels((255.0, 60.0), (130.0, 140.0)), (0.2, 0.2), 0.0)
    assert right.instrument is not None
    assert right.instrument.direction[0] < 0


def test_interp_one_euro_steady_on_noise_and_follows_a_step() -> None:
    f = OneEuroFilter(min_cutoff_hz=1.0, beta=0.05, d_cutoff_hz=1.0)
    rng = np.random.default_rng(1)
    raw, out = [], []
    for i in range(120):
        x = (100.0 + rng.normal(0, 1.0), 50.0 + rng.normal(0, 1.0))
        raw.append(x)
        out.append(f(i / 30.0, x))
    raw_a, out_a = np.asarray(raw[30:]), np.asarray(out[30:])
    assert out_a.std(axis=0).max() < 0.5 * raw_a.std(axis=0).min()
    # a step of 20 px: followed within 1 px after half a second, and no overshoot
    for i in range(120, 135):
        y = f(i / 30.0, (120.0, 50.0))
        assert y[0] <= 120.0 + 1e-6
    assert abs(y[0] - 120.0) < 1.0


def test_interp_filtered_tip_tracks_advancing_needle() -> None:
    interp = Interpreter(tip_filter=TipFilterParams())
    rng = np.random.default_rng(2)
    errs = []
    for i in range(60):
        depth = 40.0 + 1.5 * i  # 45 px/s
        tip = (depth * math.cos(0.6), 20.0 + depth * math.sin(0.6))
        jitter = tip[0] + rng.normal(0, 0.7), tip[1] + rng.normal(0, 0.7)
        res = interp.update(needle_labels((0.0, 20.0), jitter), (0.2, 0.2), i / 30.0)
        assert res.instrument is not None
        if i > 15:
            errs.append(math.dist(res.instrument.tip_px, tip))
    assert float(np.mean(errs)) < 2.5  # little lag while it moves
    # after the needle disappears for a while the filter restarts on the new position
    interp.update(np.zeros((H, W), np.uint8), (0.2, 0.2), 3.0)
    res = interp.update(needle_labels((0.0, 200.0), (60.0, 220.0)), (0.2, 0.2), 4.0)
    assert res.instrument is not None
    assert math.dist(res.instrument.tip_px, (60.0, 220.0)) <= 1.0
    interp.reset()


def test_interp_ignores_a_fragment_off_the_needle_line() -> None:
    # A needle plus a bright-distractor fragment elsewhere: a line through all pixels would put the tip
    # between them; the geometry must come from the needle and the pieces continuing it.
    entry, tip = (0.0, 40.0), (140.0, 120.0)
    lab = needle_labels(entry, tip)
    fill_segment(lab, (60.0, 220.0), (100.0, 200.0), 3.0, INSTRUMENT)  # fragment, off the needle's line
    res = Interpreter(tip_filter=None).update(lab, (0.2, 0.2), 0.0)
    assert res.instrument is not None
    assert math.dist(res.instrument.raw_tip_px, tip) <= 1.0
    assert len(res.instrument_contours) == 2  # still drawn: the geometry ignores it, the overlay does not


def test_interp_keeps_colinear_pieces_of_a_broken_shaft() -> None:
    # Out-of-plane gap: the shaft shows as two pieces on one line; the tip is the far end of the far piece,
    # even when the near piece is the bigger one.
    entry, tip = (0.0, 20.0), (200.0, 120.0)
    d = np.subtract(tip, entry) / math.dist(entry, tip)
    mid_a = tuple(np.add(entry, d * 130.0))
    mid_b = tuple(np.add(entry, d * 160.0))
    lab = np.zeros((H, W), np.uint8)
    fill_segment(lab, entry, mid_a, 4.0, INSTRUMENT)
    fill_segment(lab, mid_b, tip, 4.0, INSTRUMENT)
    res = Interpreter(tip_filter=None).update(lab, (0.2, 0.2), 0.0)
    assert res.instrument is not None
    assert math.dist(res.instrument.raw_tip_px, tip) <= 1.5


def _arc(center: tuple[float, float], r: float, a0: float, a1: float, n: int = 60) -> np.ndarray:
    a = np.radians(np.linspace(a0, a1, n))
    return np.stack([center[0] + r * np.cos(a), center[1] + r * np.sin(a)], axis=1)


def test_interp_follows_a_curved_catheter_across_a_gap() -> None:
    # A catheter bending across the picture, its mask broken for ~25 px where it crosses the spine: the
    # piece beyond the gap (with the tip) is neither on the seed's line nor next to its end, but it lies
    # along the end's tangent. A fragment beside the gap (a vessel edge) is not.
    lab = np.zeros((H, W), np.uint8)
    center, r = (128.0, 300.0), 220.0  # a gentle arc entering at the right border, tip towards the left
    near = _arc(center, r, -40.0, -92.0)
    far = _arc(center, r, -99.0, -112.0)
    for seg in (near, far):
        for p, q in itertools.pairwise(seg):
            fill_segment(lab, tuple(p), tuple(q), 3.0, INSTRUMENT)
    fill_segment(lab, (70.0, 140.0), (95.0, 150.0), 3.0, INSTRUMENT)  # off to the side of the gap
    tip = tuple(far[-1])
    res = Interpreter(tip_filter=None).update(lab, (0.3, 0.3), 0.0)
    assert res.instrument is not None
    assert math.dist(res.instrument.raw_tip_px, tip) <= 3.0
    without_far = lab.copy()
    for p, q in itertools.pairwise(far):
        fill_segment(without_far, tuple(p), tuple(q), 3.0, 0)
    res = Interpreter(tip_filter=None).update(without_far, (0.3, 0.3), 0.0)
    assert res.instrument is not None
    assert math.dist(res.instrument.raw_tip_px, tuple(near[-1])) <= 3.0  # the side fragment is not chained


@pytest.mark.parametrize("shape", [(256, 256), (616, 820)])
def test_interp_scattered_wire_echoes_are_no_instrument(shape: tuple[int, int]) -> None:
    """Rows of short bright dashes (wire cross-sections of an N-wire phantom, each long enough to pass the
    shape rule on its own) are scattered pieces, not a shaft: no instrument, no tip."""
    h, w = shape
    labels = np.zeros(shape, np.uint8)
    for row in (0.3, 0.45):
        for col in (0.2, 0.45, 0.7):
            x, y = round(col * w), round(row * h)
            cv2.line(labels, (x, y), (x + round(0.035 * w), y + 1), INSTRUMENT, max(2, round(0.008 * w)))
    interp = Interpreter(tip_filter=None)
    assert interp.update(labels, (0.2, 0.2), 0.0).instrument is None
    # one of the dashes alone would be reported (it is a short shaft)
    one = np.zeros(shape, np.uint8)
    cv2.line(one, (round(0.2 * w), round(0.3 * h)), (round(0.3 * w), round(0.3 * h) + 3), INSTRUMENT, 3)
    assert Interpreter(tip_filter=None).update(one, (0.2, 0.2), 0.0).instrument is not None


def _arc_labels(center: tuple[float, float], r: float, a0: float, a1: float, width: float) -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    for p, q in itertools.pairwise(_arc(center, r, a0, a1, n=120)):
        fill_segment(lab, tuple(p), tuple(q), width, INSTRUMENT)
    return lab


@pytest.mark.parametrize(
    ("arc", "width", "curved"),
    [
        # strongly curved (the interpreter's curved branch): 60 degrees of turn on screen
        (((128.0, 250.0), 150.0, -150.0, -90.0), 4.0, True),
        # gently bent, a thin guidewire: 2.4 px of sagitta over 110 px, within the line fit's tolerance,
        # so read as one line and then as a parabola; its tip points 5 degrees off its chord
        (((128.0, 760.0), 631.0, -100.0, -90.0), 2.0, False),
    ],
)
def test_interp_heading_at_the_tip_of_a_bent_shaft(
    arc: tuple[tuple[float, float], float, float, float], width: float, curved: bool
) -> None:
    """The direction (and the trajectory) follows the tangent at the tip, not the entry -> tip chord; the
    axis angle stays the chord's. ``arc``: centre, radius, start and end angle (degrees)."""
    center, r, a0, a1 = arc
    lab = _arc_labels(center, r, a0, a1, width)
    ends = _arc(center, r, a0, a1, n=2)
    entry, tip = tuple(ends[0]), tuple(ends[1])
    tangent = math.degrees(math.atan2(math.cos(math.radians(a1)), -math.sin(math.radians(a1)))) % 180.0
    chord = math.degrees(math.atan2(tip[1] - entry[1], tip[0] - entry[0])) % 180.0
    inst = Interpreter(tip_filter=None).update(lab, (0.2, 0.2), 0.0).instrument
    assert inst is not None
    assert (inst.centerline_px.shape[0] > 2) == curved

    def err(a: float, b: float) -> float:
        d = abs(a - b) % 180.0
        return min(d, 180.0 - d)

    assert err(tangent, chord) >= 4.5  # the two really differ here
    assert err(inst.angle_deg, tangent) <= 2.0
    assert err(inst.axis_angle_deg, chord) <= 1.5
    assert math.dist(inst.raw_tip_px, tip) <= 2.0
    # direction points onwards from the tip (away from the entry along the tangent)
    assert inst.direction[0] * (tip[0] - entry[0]) + inst.direction[1] * (tip[1] - entry[1]) > 0


def test_interp_straight_needle_heading_is_its_axis() -> None:
    # a slightly ragged straight needle: the parabola must not invent a bend
    rng = np.random.default_rng(0)
    lab = needle_labels((0.0, 60.0), (180.0, 150.0), width=4.0)
    ys, xs = np.nonzero(lab)
    drop = rng.random(xs.size) < 0.15
    lab[ys[drop], xs[drop]] = 0
    inst = Interpreter(tip_filter=None).update(lab, (0.2, 0.2), 0.0).instrument
    assert inst is not None
    true_angle = math.degrees(math.atan2(90.0, 180.0)) % 180.0
    assert abs(inst.angle_deg - true_angle) <= 0.5
    assert abs(inst.axis_angle_deg - true_angle) <= 0.5
