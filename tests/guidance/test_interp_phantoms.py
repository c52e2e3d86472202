"""Interpreter on phantom label maps (straight needles in ultrasound, curved catheters in fluoroscopy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guidance.interpretation import Interpreter
from guidance.phantoms import FluoroPhantom, UltrasoundPhantom


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_interp_tip_on_ultrasound_truth_labels(seed: int) -> None:
    p = UltrasoundPhantom(seed=seed, out_of_plane_frac=0.0)
    interp = Interpreter(tip_filter=None)
    n = 0
    for i in range(0, 300, 6):
        f = p.frame(i)
        res = interp.update(f.labels, f.spacing_mm, f.time_s)
        if not f.instrument_present or f.tip_px is None or f.axis_angle_deg is None:
            continue
        assert f.entry_px is not None
        if math.dist(f.tip_px, f.entry_px) < 12:
            continue
        assert res.instrument is not None
        n += 1
        assert math.dist(res.instrument.raw_tip_px, f.tip_px) <= 1.5
        diff = abs(res.instrument.angle_deg - f.axis_angle_deg) % 180.0
        assert min(diff, 180.0 - diff) <= 2.0
        if f.target_centroid_px is not None and res.target is not None:
            assert math.dist(res.target.centroid_px, f.target_centroid_px) <= 3.0
    assert n >= 5 or not p.config.needle


@pytest.mark.parametrize("kind", ["catheter", "guidewire"])
def test_interp_tip_on_curved_fluoro_instruments(kind: str) -> None:
    p = FluoroPhantom(seed=5, instrument=True, instrument_kind=kind, curvature=0.3)
    interp = Interpreter(tip_filter=None)
    errs = []
    for i in range(0, 150, 5):
        f = p.frame(i)
        res = interp.update(f.labels, f.spacing_mm, f.time_s)
        if not f.instrument_present or f.tip_px is None or f.entry_px is None:
            continue
        if math.dist(f.tip_px, f.entry_px) < 20:
            continue
        assert res.instrument is not None
        errs.append(math.dist(res.instrument.raw_tip_px, f.tip_px))
        line = res.instrument.centerline_px
        assert line.ndim == 2
        assert line.shape[1] == 2
        assert line.shape[0] >= 2
    assert len(errs) >= 5
    assert float(np.median(errs)) <= 2.0
    assert max(errs) <= 5.0
