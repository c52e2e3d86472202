from __future__ import annotations

import math

import numpy as np
import pytest

from guidance.latency import LatencyHistogram, LatencyMonitor, RateMeter, StageTimes


def test_histogram_percentiles_within_one_percent() -> None:
    rng = np.random.default_rng(0)
    values_ms = rng.lognormal(mean=2.0, sigma=0.6, size=20_000)
    h = LatencyHistogram("x")
    for v in values_ms:
        h.record_ms(float(v))
    for q in (50, 90, 99, 99.9):
        exact = float(np.percentile(values_ms, q, method="inverted_cdf"))
        # bucket upper edges: at most ~1 % high, never low by more than rounding
        assert exact * 0.999 <= h.percentile_ms(q) <= exact * 1.011, q
    assert h.max_ms == pytest.approx(values_ms.max(), rel=1e-6)
    assert h.count == 20_000
    assert h.summary()["p99"] == h.percentile_ms(99)


def test_histogram_empty_and_extremes() -> None:
    h = LatencyHistogram()
    assert math.isnan(h.percentile_ms(50))
    h.record_ns(-5)  # clock went backwards: clamped, not a crash
    h.record_ns(10**15)  # 11 days: lands in the last bucket, max stays exact
    assert h.count == 2
    assert h.max_ms == 1e9
    assert h.percentile_ms(100) == 1e9
    h.reset()
    assert h.count == 0


def test_monitor_and_rate_meter() -> None:
    m = LatencyMonitor(["a"])
    m.record_ns("a", 2_000_000)
    m.record_ns("b", 1_000_000)
    assert set(m.summary()) == {"a", "b"}
    r = RateMeter(10)
    for i in range(10):
        r.tick(i * 33_333_333)
    assert r.rate() == pytest.approx(30.0, rel=1e-3)
    assert r.rate(now_ns=10 * 10**9) == 0.0  # stale: nothing for seconds


def test_stage_times_intervals() -> None:
    t = StageTimes(
        received=0, infer_start=1_000_000, infer_end=6_000_000, interpreted=7_000_000, published=7_500_000
    )
    assert (t.queue_ms, t.infer_ms, t.interpret_ms, t.receive_to_result_ms) == (1.0, 5.0, 1.0, 7.5)
    assert math.isnan(StageTimes(received=5).infer_ms)
