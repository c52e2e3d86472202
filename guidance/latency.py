"""Per-frame stage timelines and HDR-style latency histograms.

Every stage stamps ``time.perf_counter_ns()``. Histograms are log-bucketed (1 % relative precision,
1 µs .. ~100 s), so recording is O(1) with a fixed memory footprint however long the session runs: a
soak test of hours costs the same few kilobytes as a one-minute run.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)

# Stage names, in pipeline order. Stamps are perf_counter_ns unless noted.
STAGES: tuple[str, ...] = (
    "sent",  # sender wall clock (ns since epoch) from the OpenIGTLink header
    "received",
    "infer_start",
    "infer_end",
    "interpreted",
    "published",
    "painted",
)


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Stamps of one frame through the pipeline (perf_counter_ns; 0 = not reached)."""

    received: int
    infer_start: int = 0
    infer_end: int = 0
    interpreted: int = 0
    published: int = 0

    @property
    def queue_ms(self) -> float:
        """Time the frame waited in the slot before inference started."""
        return (self.infer_start - self.received) / 1e6 if self.infer_start else math.nan

    @property
    def infer_ms(self) -> float:
        return (self.infer_end - self.infer_start) / 1e6 if self.infer_end else math.nan

    @property
    def interpret_ms(self) -> float:
        return (self.interpreted - self.infer_end) / 1e6 if self.interpreted else math.nan

    @property
    def receive_to_result_ms(self) -> float:
        return (self.published - self.received) / 1e6 if self.published else math.nan


class LatencyHistogram:
    """Log-bucketed histogram of durations (HDR-style), with exact min/max and count.

    One writer thread at a time per histogram (each pipeline stage owns its own); readers take a
    consistent snapshot under a short lock.
    """

    _BASE = math.log(1.01)
    _MIN_NS = 1_000  # 1 µs
    _NBUCKETS = int(math.log(100e9 / 1_000) / math.log(1.01)) + 2  # up to 100 s

    __slots__ = ("_counts", "_lock", "_max", "_min", "_n", "_sum", "name")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._counts: npt.NDArray[np.int64] = np.zeros(self._NBUCKETS, dtype=np.int64)
        self._lock = threading.Lock()
        self._n = 0
        self._sum = 0
        self._min = 0
        self._max = 0

    def record_ns(self, value_ns: int) -> None:
        """Record one duration in nanoseconds (negative values are clamped to 0)."""
        v = max(int(value_ns), 0)
        idx = (
            0
            if v <= self._MIN_NS
            else min(int(math.log(v / self._MIN_NS) / self._BASE) + 1, self._NBUCKETS - 1)
        )
        with self._lock:
            self._counts[idx] += 1
            if self._n == 0 or v < self._min:
                self._min = v
            self._max = max(self._max, v)
            self._n += 1
            self._sum += v

    def record_ms(self, value_ms: float) -> None:
        self.record_ns(int(value_ms * 1e6))

    @property
    def count(self) -> int:
        return self._n

    def _bucket_upper_ns(self, idx: int) -> float:
        return self._MIN_NS if idx == 0 else self._MIN_NS * math.exp(idx * self._BASE)

    def percentile_ms(self, q: float) -> float:
        """Value (ms) below which ``q`` percent of the recorded durations fall; NaN when empty.

        Reported as the upper edge of the bucket (≤1 % high), clamped to the exact max.
        """
        with self._lock:
            if self._n == 0:
                return math.nan
            rank = max(1, math.ceil(q / 100.0 * self._n))
            idx = int(np.searchsorted(np.cumsum(self._counts), rank))
            # the last bucket is the overflow bucket: its only honest bound is the exact max
            upper = float(self._max) if idx >= self._NBUCKETS - 1 else self._bucket_upper_ns(idx)
            value = min(upper, float(self._max))
            value = max(value, float(self._min))
        return value / 1e6

    @property
    def max_ms(self) -> float:
        return self._max / 1e6 if self._n else math.nan

    @property
    def mean_ms(self) -> float:
        return self._sum / self._n / 1e6 if self._n else math.nan

    def summary(self) -> dict[str, float]:
        """``{"p50", "p90", "p99", "p99.9", "max", "mean", "count"}`` in milliseconds."""
        out = {f"p{q:g}": self.percentile_ms(q) for q in PERCENTILES}
        out["max"] = self.max_ms
        out["mean"] = self.mean_ms
        out["count"] = float(self._n)
        return out

    def reset(self) -> None:
        with self._lock:
            self._counts[:] = 0
            self._n = self._sum = self._min = self._max = 0


class LatencyMonitor:
    """A named set of histograms, one per measured interval (e.g. ``infer``, ``receive_to_result``)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._hists: dict[str, LatencyHistogram] = {n: LatencyHistogram(n) for n in names}
        self._lock = threading.Lock()

    def hist(self, name: str) -> LatencyHistogram:
        h = self._hists.get(name)
        if h is None:
            with self._lock:
                h = self._hists.setdefault(name, LatencyHistogram(name))
        return h

    def record_ns(self, name: str, value_ns: int) -> None:
        self.hist(name).record_ns(value_ns)

    def names(self) -> list[str]:
        return list(self._hists)

    def summary(self) -> Mapping[str, dict[str, float]]:
        return {name: h.summary() for name, h in list(self._hists.items())}

    def reset(self) -> None:
        for h in list(self._hists.values()):
            h.reset()


class RateMeter:
    """Events per second over a sliding window of the last ``window`` events (for fps readouts)."""

    __slots__ = ("_i", "_n", "_stamps")

    def __init__(self, window: int = 30) -> None:
        self._stamps = np.zeros(window, dtype=np.int64)
        self._i = 0
        self._n = 0

    def tick(self, now_ns: int) -> None:
        self._stamps[self._i] = now_ns
        self._i = (self._i + 1) % len(self._stamps)
        self._n += 1

    def rate(self, now_ns: int | None = None) -> float:
        """Events/s over the window; 0 when fewer than two events or the last is older than 2 s."""
        k = min(self._n, len(self._stamps))
        if k < 2:
            return 0.0
        newest = int(self._stamps[(self._i - 1) % len(self._stamps)])
        oldest = int(self._stamps[(self._i - k) % len(self._stamps)])
        if now_ns is not None and now_ns - newest > 2_000_000_000:
            return 0.0
        span = newest - oldest
        return (k - 1) * 1e9 / span if span > 0 else 0.0

    @property
    def count(self) -> int:
        return self._n
