"""Transport benchmark: our :class:`IGTLClient` vs pyigtl's client, side by side, on loopback.

For each image size, this process runs an :class:`IGTLServer` that sends IMAGE messages at ``fps``; a
*separate receiver process* (spawned, so its CPU time is the receiver's alone) runs one client
implementation and records, per frame, the latency from the sender's header timestamp (stamped just
before the message is queued for sending) to the moment the decoded image is available to the
application (``on_frame`` for ours; ``wait_for_message`` returning for pyigtl), on the same wall clock.

Row: ``{size, impl, sent, received, dropped, p50_ms, p99_ms, max_ms, cpu_s_per_frame}``. ``dropped`` is
sent minus received (pyigtl keeps only the newest message per device; ours delivers every frame).

pyigtl is imported only inside the pyigtl receiver (it is a dev/test dependency, not a runtime one); when
it is missing that implementation is reported as skipped.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import resource
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from streaming.frame import Frame
from streaming.igtl.codec import AnyMessage, StringMessage, encode_image, encode_string, ns_to_igtl_timestamp
from streaming.igtl.server import IGTLServer

logger = logging.getLogger(__name__)

#: name -> (rows, cols, components)
SIZES: dict[str, tuple[int, int, int]] = {
    "256x256": (256, 256, 1),
    "640x480": (480, 640, 1),
    "1024x768": (768, 1024, 1),
    "1920x1080x3": (1080, 1920, 3),
}
IMPLS: tuple[str, ...] = ("guidance", "pyigtl")
DEVICE = "BENCH"
END_DEVICE = "BENCH_END"
_TS_OFFSET = 34  # header: version(2) + type(12) + device(20), then the u64 timestamp
_TS = struct.Struct(">Q")

Summarizer = Callable[[Sequence[int]], dict[str, float]]


def percentile_summary(latencies_ns: Sequence[int]) -> dict[str, float]:
    """Default summary: exact p50/p99/max in ms (NaN when empty)."""
    if not latencies_ns:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _receive_guidance(port: int, deadline_s: float) -> dict[str, Any]:
    from streaming.igtl.client import IGTLClient

    lat: list[int] = []
    ids: set[int] = set()
    done = threading.Event()

    def on_frame(frame: Frame) -> None:
        now = time.time_ns()
        if frame.sender_time_ns is not None:
            lat.append(now - frame.sender_time_ns)
        ids.add(frame.message_id)

    def on_message(msg: AnyMessage) -> None:
        if isinstance(msg, StringMessage) and msg.device == END_DEVICE:
            done.set()

    client = IGTLClient(
        "127.0.0.1", port, on_frame=on_frame, on_message=on_message, name="guidance-bench-client"
    )
    cpu0 = _cpu_s()
    client.start()
    done.wait(deadline_s)
    cpu = _cpu_s() - cpu0
    client.stop()
    return {"latencies_ns": lat, "ids": len(ids), "cpu_s": cpu, "completed": done.is_set()}


def _receive_pyigtl(port: int, deadline_s: float) -> dict[str, Any]:
    import pyigtl

    lat: list[int] = []
    ids: set[int] = set()
    cpu0 = _cpu_s()
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", port)
    end = time.monotonic() + deadline_s
    completed = False
    while time.monotonic() < end:
        msg = client.wait_for_message(DEVICE, timeout=0.05)
        if msg is not None:
            now = time.time_ns()
            lat.append(now - round(msg.timestamp * 1e9))
            ids.add(int(msg.message_id))
        if client.wait_for_message(END_DEVICE, timeout=0) is not None:
            completed = True
            break
    cpu = _cpu_s() - cpu0
    client.stop()
    return {"latencies_ns": lat, "ids": len(ids), "cpu_s": cpu, "completed": completed}


def _receiver_main(impl: str, port: int, deadline_s: float, out: Any) -> None:
    try:
        fn = _receive_guidance if impl == "guidance" else _receive_pyigtl
        out.put(fn(port, deadline_s))
    except Exception as exc:
        logger.exception("receiver %s failed", impl)
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def run_one(
    size: str, impl: str, *, fps: float = 30.0, seconds: float = 3.0, summarize: Summarizer | None = None
) -> dict[str, Any]:
    """Benchmark one (size, implementation) pair; see the module docstring for the row's fields."""
    rows, cols, comps = SIZES[size]
    shape = (rows, cols) if comps == 1 else (rows, cols, comps)
    pixels = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    n_frames = max(1, round(fps * seconds))
    summarize = summarize or percentile_summary
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    server = IGTLServer(name="guidance-bench-server", send_queue=4)
    server.start()
    proc = ctx.Process(target=_receiver_main, args=(impl, server.port, seconds + 20.0, out), daemon=True)
    proc.start()
    sent = 0
    try:
        if not server.wait_for_clients(1, 20.0):
            raise RuntimeError(f"{impl} receiver did not connect")
        time.sleep(0.3)  # let the receiver settle (pyigtl's first polls, our hello)
        period = 1.0 / fps
        t0 = time.perf_counter()
        for i in range(n_frames):
            delay = t0 + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # benchmark pacing on the sender side, not a library hot path
            msg = encode_image(pixels, DEVICE, message_id=i)
            _TS.pack_into(msg, _TS_OFFSET, ns_to_igtl_timestamp(time.time_ns()))  # header only: CRC unchanged
            sent += server.send(msg)
        time.sleep(0.3)
        server.send(encode_string("end", END_DEVICE))
        result: dict[str, Any] = out.get(timeout=seconds + 30.0)
    finally:
        proc.join(10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        server.stop()
    if "error" in result:
        return {"size": size, "impl": impl, "error": result["error"]}
    received = int(result["ids"])
    row: dict[str, Any] = {"size": size, "impl": impl, "sent": n_frames, "received": received}
    row.update(summarize(result["latencies_ns"]))
    row["dropped"] = n_frames - received
    row["cpu_s_per_frame"] = result["cpu_s"] / received if received else float("nan")
    row["completed"] = bool(result["completed"])
    return row


def run_transport_bench(
    sizes: Sequence[str] = tuple(SIZES),
    fps: float = 30.0,
    seconds: float = 3.0,
    *,
    impls: Sequence[str] = IMPLS,
    summarize: Summarizer | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (size, implementation) pair; returns ``{"transport": [rows...], "fps", "seconds"}``."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
        for impl in impls:
            if impl not in IMPLS:
                raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
            if impl == "pyigtl" and not _have_pyigtl():
                rows.append({"size": size, "impl": impl, "error": "pyigtl is not installed"})
                continue
            if progress is not None:
                progress(f"{size} {impl} ({seconds:g} s at {fps:g} fps)")
            rows.append(run_one(size, impl, fps=fps, seconds=seconds, summarize=summarize))
    return {"transport": rows, "fps": fps, "seconds": seconds}


def _have_pyigtl() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyigtl") is not None
