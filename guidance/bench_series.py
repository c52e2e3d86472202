"""Time series for the pipeline benchmark: per-result latencies, per-second counters, resident memory.

Recorded from a result sink on the inference worker (per result: a few integers appended to preallocated
arrays that grow by doubling, so a 30-minute soak at 30 fps costs a few MB) and from a once-a-second
sample on the benchmark's own thread.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from guidance.results import GuidanceResult

#: Per-result columns (milliseconds except ``t_s``).
RESULT_COLUMNS = ("t_s", "queue", "infer", "interpret", "receive_to_result", "sent_to_result")
#: Per-second columns.
SAMPLE_COLUMNS = (
    "t_s",
    "rss_mb",
    "input_fps",
    "processed_fps",
    "received",
    "processed",
    "skipped",
    "over_budget",
)


class ResultSeries:
    """Append-only per-result latency columns; the sink runs on the inference worker."""

    def __init__(self, t0_ns: int, capacity: int = 4096) -> None:
        self._t0 = t0_ns
        self._data: npt.NDArray[np.float64] = np.full((capacity, len(RESULT_COLUMNS)), np.nan)
        self._n = 0
        self._lock = threading.Lock()

    def __call__(self, r: GuidanceResult) -> None:
        t = r.times
        f = r.frame
        sent = (
            (f.receive_wall_ns - f.sender_time_ns + t.published - f.receive_ns) / 1e6
            if f.sender_time_ns
            else math.nan
        )
        row = (
            (t.published - self._t0) / 1e9,
            t.queue_ms,
            t.infer_ms,
            t.interpret_ms,
            t.receive_to_result_ms,
            sent,
        )
        with self._lock:
            if self._n == len(self._data):
                grown = np.full((2 * len(self._data), len(RESULT_COLUMNS)), np.nan)
                grown[: self._n] = self._data
                self._data = grown
            self._data[self._n] = row
            self._n += 1

    def array(self) -> npt.NDArray[np.float64]:
        with self._lock:
            return self._data[: self._n].copy()


@dataclass
class SampleSeries:
    rows: list[tuple[float, ...]] = field(default_factory=list)

    def add(self, *values: float) -> None:
        self.rows.append(tuple(float(v) for v in values))

    def array(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.rows, dtype=np.float64).reshape(-1, len(SAMPLE_COLUMNS))


def soak_summary(
    results: npt.NDArray[np.float64], samples: npt.NDArray[np.float64], window_s: float
) -> dict[str, Any]:
    """Steadiness over a long run: resident memory after warm-up vs at the end, and receive->result p99
    of the first ``window_s`` (after warm-up) vs the last ``window_s``."""
    out: dict[str, Any] = {"window_s": window_s}
    if len(samples) >= 3:
        t = samples[:, 0]
        warm = t >= min(window_s / 5, t[-1] / 5)  # skip the first fifth of a window (imports, warm-up)
        rss = samples[warm, 1] if warm.any() else samples[:, 1]
        out["rss_mb_after_warmup"] = round(float(rss[0]), 1)
        out["rss_mb_end"] = round(float(rss[-1]), 1)
        out["rss_mb_max"] = round(float(rss.max()), 1)
        out["rss_growth_pct"] = round(100.0 * (float(rss[-1]) - float(rss[0])) / float(rss[0]), 2)
    if len(results) >= 20:
        t = results[:, 0]
        lat = results[:, 4]
        end = t[-1]
        first = lat[(t >= window_s / 5) & (t < window_s / 5 + window_s)]
        last = lat[t >= end - window_s]
        if len(first) and len(last):
            p_first = float(np.nanpercentile(first, 99))
            p_last = float(np.nanpercentile(last, 99))
            out["p99_first_ms"] = round(p_first, 3)
            out["p99_last_ms"] = round(p_last, 3)
            out["p99_change_pct"] = (
                round(100.0 * (p_last - p_first) / p_first, 2) if p_first > 0 else math.nan
            )
    return out
