"""DICOM archive benchmark: 1,800 frames 512x512 uint8 at 30 fps with masks -> US cine + SEG -> Orthanc.

Frames arrive as a stream of ``Frame`` objects (as from a recording), so the export path is the real one
(spilled to disk, written streaming). Reports wall time per phase and peak RSS of this process; prints a
summary and writes JSON. Targets: total <= 20 s, peak RSS <= 1 GB. CPU seconds of this process (and of the
private Orthanc) are reported beside wall time because the machine may be shared.

    .venv/bin/python benchmarks/bench_dicom.py [--frames 1800] [--json out.json]
    .venv/bin/python benchmarks/bench_dicom.py --host H --port P --aec AET   # an existing PACS

Without --host it starts a private Orthanc (``Orthanc`` on PATH) on free loopback ports and stops it after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guidance.dicom.export import ExportOptions, spool_objects
from guidance.dicom.network import DicomNode
from guidance.dicom.spool import Archiver, Spool
from guidance.dicom.study import manual_entry
from streaming.frame import Frame

ROWS = COLS = 512
FPS = 30.0


def _pool(k: int = 30) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (k, ROWS, COLS), dtype=np.uint8)
    masks = np.zeros((k, ROWS, COLS), np.uint8)
    for i in range(k):
        masks[i, 100 + i : 110 + i, 50:300] = 1
        masks[i, 300:360, 300:360] = 2
    return imgs, masks


def frames(n: int, pool: npt.NDArray[np.uint8]) -> Iterator[Frame]:
    t0 = 10**12
    for i in range(n):
        yield Frame(
            seq=i,
            device="Image",
            pixels=pool[i % len(pool)],
            spacing_mm=(0.2, 0.2),
            receive_ns=t0 + int(i * 1e9 / FPS),
            receive_wall_ns=1_700_000_000 * 10**9 + int(i * 1e9 / FPS),
        )


class LazyMasks(Sequence[npt.NDArray[np.uint8]]):
    """Label maps generated on access (the benchmark's stand-in for recorded results)."""

    def __init__(self, n: int, pool: npt.NDArray[np.uint8]) -> None:
        self._n, self._pool = n, pool

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> npt.NDArray[np.uint8]: ...
    @overload
    def __getitem__(self, i: slice) -> list[npt.NDArray[np.uint8]]: ...
    def __getitem__(self, i: int | slice) -> npt.NDArray[np.uint8] | list[npt.NDArray[np.uint8]]:
        if isinstance(i, slice):
            return [self._pool[j % len(self._pool)] for j in range(*i.indices(self._n))]
        frame: npt.NDArray[np.uint8] = self._pool[i % len(self._pool)]
        return frame


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s() -> float:
    """User + system CPU seconds of this process (the box is shared: wall time alone misleads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc), e.g. the local Orthanc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_orthanc(work: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    exe = shutil.which("Orthanc")
    if exe is None:
        raise SystemExit("Orthanc is not installed; pass --host/--port/--aec of a PACS")
    work.mkdir(parents=True, exist_ok=True)
    dicom, http = _free_port(), _free_port()
    cfg = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "DicomAet": "ORTHANC_BENCH",
        "DicomPort": dicom,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        # A local archive tuned for ingest: no compression, no MD5, no fsync per file (the benchmark measures
        # our side; a hospital PACS has its own settings), and the largest PDU Orthanc allows (128 KiB)
        # so a 470 MB cine crosses in ~3,600 PDUs instead of ~29,000.
        "StorageCompression": False,
        "StoreMD5ForAttachments": False,
        "SyncStorageArea": False,
        "OverwriteInstances": False,
        "MaximumPduLength": 131072,
        "SaveJobs": False,
    }
    (work / "orthanc.json").write_text(json.dumps(cfg))
    log = open(work / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([exe, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1).close()
            return proc, dicom, http
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("Orthanc did not start")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1800)
    ap.add_argument("--json", type=Path, default=Path("bench_dicom.json"))
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--aec", default="ORTHANC_BENCH")
    ap.add_argument("--aet", default="GUIDANCE")
    ap.add_argument("--compress", action="store_true", help="send lossless compressed (RLE) copies")
    args = ap.parse_args(argv)

    imgs, mpool = _pool()
    work = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    orthanc: subprocess.Popen[bytes] | None = None
    try:
        if args.host:
            host, port, http = args.host, args.port, None
        else:
            orthanc, port, http = start_orthanc(work / "orthanc")
            host = "127.0.0.1"
        node = DicomNode(host, port, args.aec, args.aet, prefer_compression=args.compress)
        study = manual_entry("Bench^Mark", "BENCH-1").resolved()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pacs_cpu0 = _proc_cpu_s(orthanc.pid) if orthanc is not None else None
        c0 = _cpu_s()
        t0 = time.perf_counter()
        with Spool(work / "spool") as spool:
            objs = spool_objects(
                frames(args.frames, imgs),
                spool,
                study,
                masks=LazyMasks(args.frames, mpool),
                options=ExportOptions(modality="US"),
            )
            t1 = time.perf_counter()
            c1 = _cpu_s()
            report = Archiver(spool, node).send_due()
            t2 = time.perf_counter()
            c2 = _cpu_s()
            counts = spool.counts()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        stored_on_pacs = None
        if http is not None:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=10) as r:
                stored_on_pacs = int(json.loads(r.read())["CountInstances"])
        total_bytes = sum(o.size_bytes for o in objs)
        result: dict[str, Any] = {
            "frames": args.frames,
            "compress": args.compress,
            "rows": ROWS,
            "cols": COLS,
            "fps": FPS,
            "objects": [{"kind": o.kind, "frames": o.frames, "bytes": o.size_bytes} for o in objs],
            "export_s": round(t1 - t0, 3),
            "send_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0, 3),
            "cpu_export_s": round(c1 - c0, 3),
            "cpu_send_s": round(c2 - c1, 3),
            "cpu_total_s": round(c2 - c0, 3),
            "pacs_cpu_s": (
                round(_proc_cpu_s(orthanc.pid) - pacs_cpu0, 3)
                if orthanc is not None and pacs_cpu0 is not None
                else None
            ),
            "send_MB_per_s": round(total_bytes / 1e6 / max(t2 - t1, 1e-9), 1),
            "peak_rss_MB": round(peak_mb, 1),
            "rss_before_MB": round(rss0 / 1024, 1),
            "stored": report.stored,
            "spool_counts": counts,
            "instances_on_pacs": stored_on_pacs,
            "targets": {"total_s": 20.0, "peak_rss_MB": 1024.0},
        }
        result["pass"] = result["total_s"] <= 20.0 and peak_mb <= 1024.0 and report.stored == len(objs)
        print(json.dumps(result, indent=2))
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if result["pass"] else 1
    finally:
        if orthanc is not None:
            orthanc.send_signal(signal.SIGTERM)
            try:
                orthanc.wait(30)
            except subprocess.TimeoutExpired:
                orthanc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
