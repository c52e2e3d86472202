"""``guidance archive``: send a recording to PACS as DICOM through the store-and-forward spool.

* ``guidance archive RECORDING --host H --port P --aec AET [--aet AET] [--spool DIR]``: write the DICOM
  objects (US cine or fluoroscopy SC, plus SEG when the recording has label maps) into the spool and send
  everything due; what cannot be sent now stays spooled and is sent by the next run (or ``--resume``).
* ``guidance archive --echo --host H --port P --aec AET``: test the connection (C-ECHO).
* ``guidance archive --resume --host H --port P --aec AET``: send what is left in the spool.

Patient/study: ``--worklist`` (C-FIND on the same node for ``--modality``/``--station`` on ``--date``,
today by default; ``--accession`` picks one), or ``--patient-name``/``--patient-id`` typed, else the
recording's metadata. DICOM TLS: ``--tls-ca`` (PACS certificate to trust) [``--tls-cert``/``--tls-key``].
``--overlay`` adds the burned-in AI overlay series; ``--compress`` sends lossless compressed where accepted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import ssl
import sys
from pathlib import Path

from guidance.cli import CommandError
from guidance.config import config_dir
from guidance.dicom.export import ExportOptions, archive
from guidance.dicom.network import (
    DicomNetworkError,
    DicomNode,
    WorklistQuery,
    echo,
    find_worklist,
    make_tls_context,
    today,
)
from guidance.dicom.spool import Archiver, RetryPolicy, SendEvent, Spool, SpoolFullError
from guidance.dicom.study import PatientStudy, StudyValidationError, manual_entry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("archive", help="archive a recording to PACS (DICOM C-STORE via a spool), or --echo")
    p.add_argument("recording", type=Path, nargs="?", help="recording (.mcap) to archive")
    p.add_argument("--host", required=True, help="PACS host")
    p.add_argument("--port", type=int, required=True, help="PACS DICOM port")
    p.add_argument("--aec", required=True, help="PACS AE title (called AE)")
    p.add_argument("--aet", default="GUIDANCE", help="our AE title (calling AE, default GUIDANCE)")
    p.add_argument(
        "--spool", type=Path, default=None, help="spool folder (default: <config dir>/dicom-spool)"
    )
    p.add_argument("--quota-mb", type=float, default=None, help="refuse to spool beyond this many MB")
    p.add_argument("--echo", action="store_true", help="only test the connection (C-ECHO)")
    p.add_argument("--resume", action="store_true", help="only send what is left in the spool")
    p.add_argument("--wait", type=float, default=0.0, metavar="S", help="keep retrying up to S seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    p.add_argument(
        "--tls-ca", type=Path, default=None, help="use DICOM TLS; trust the PACS certificate(s) in FILE"
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="TLS: our certificate (PEM), if the PACS asks")
    p.add_argument("--tls-key", type=Path, default=None, help="TLS: the private key of --tls-cert (PEM)")
    p.add_argument("--tls-hostname", default=None, help="TLS: name on the PACS certificate (default --host)")
    p.add_argument("--modality", default="US", help="US (cine) or XF (frame-grabbed fluoroscopy -> SC)")
    p.add_argument("--device", default=None, help="IMAGE device in the recording")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also archive a burned-in copy with the AI contours (derived RGB Secondary Capture series)",
    )
    p.add_argument(
        "--compress",
        action="store_true",
        help="send lossless compressed (RLE / JPEG-LS) whenever the PACS accepts it, not only when it must",
    )
    p.add_argument("--worklist", action="store_true", help="take the patient from the Modality Worklist")
    p.add_argument("--station", default="", help="worklist: scheduled station AE title")
    p.add_argument(
        "--date",
        default="today",
        help="worklist: scheduled date YYYYMMDD, a range YYYYMMDD-YYYYMMDD, 'today' (default) or 'any'",
    )
    p.add_argument("--accession", default="", help="worklist: pick the item with this accession number")
    p.add_argument("--patient-name", default="", help="typed patient name (Family^Given or 'Family, Given')")
    p.add_argument("--patient-id", default="", help="typed patient ID")
    p.add_argument("--birth-date", default="", help="typed birth date YYYYMMDD")
    p.add_argument("--sex", default="", help="typed sex M/F/O")
    p.set_defaults(func=run)


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _on_event(ev: SendEvent) -> None:
    if ev.kind in ("sending", "stored", "retry", "parked", "unreachable"):
        size = f" ({ev.job.size / 1e6:.1f} MB)" if ev.job is not None and ev.kind == "sending" else ""
        _say(f"  {ev.kind}: {ev.message}{size}")


def _progress(stage: str, done: int) -> None:
    _say(f"  {stage}: {done} frames" if done else f"  {stage}...")


def _study(args: argparse.Namespace, node: DicomNode) -> PatientStudy | None:
    if args.patient_name or args.patient_id:
        return manual_entry(args.patient_name, args.patient_id, birth_date=args.birth_date, sex=args.sex)
    if not args.worklist:
        return None
    date = worklist_date(args.date)
    items = find_worklist(node, WorklistQuery(modality=args.modality, station_aet=args.station, date=date))
    if args.accession:
        items = [i for i in items if i.accession_number == args.accession]
    if len(items) != 1:
        when = "today" if date == today() else f"date {date}" if date else "any date"
        raise CommandError(
            f"the worklist has {len(items)} matching item(s) for {when}; "
            + (
                "use --accession to pick one"
                if items
                else "type the patient instead (--patient-name/--patient-id)"
            )
        )
    return items[0]


_DATE = re.compile(r"^\d{8}$")


def worklist_date(text: str) -> str:
    """``--date`` -> the C-FIND Scheduled Procedure Step Start Date: ``YYYYMMDD``, a range ``A-B`` (either
    side may be open), ``today`` or ``any`` (empty: no filter)."""
    t = text.strip().lower()
    if t == "today":
        return today()
    if t in ("any", "all", ""):
        return ""
    parts = t.split("-")
    if len(parts) > 2 or not all(_DATE.match(p) or (p == "" and len(parts) == 2) for p in parts):
        raise CommandError("--date must be YYYYMMDD, YYYYMMDD-YYYYMMDD, 'today' or 'any'")
    for p in parts:
        if p:
            try:
                _dt.datetime.strptime(p, "%Y%m%d")
            except ValueError:
                raise CommandError(f"--date: {p} is not a calendar date") from None
    return t


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise CommandError("--tls-cert/--tls-key need --tls-ca (the PACS certificate to trust)")
        return None
    try:
        return make_tls_context(args.tls_ca, args.tls_cert, args.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load the TLS certificates: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    node = DicomNode(
        args.host,
        args.port,
        args.aec,
        args.aet,
        connect_timeout_s=min(args.timeout, 10.0),
        acse_timeout_s=args.timeout,
        network_timeout_s=args.timeout,
        dimse_timeout_s=max(args.timeout, 60.0),
        prefer_compression=args.compress,
        tls=_tls(args),
        tls_server_hostname=args.tls_hostname,
    )
    if args.echo:
        res = echo(node)
        _say(res.message)
        if not res.ok:
            raise CommandError(res.message)
        return 0
    spool_dir: Path = args.spool or (config_dir() / "dicom-spool")
    quota = int(args.quota_mb * 1e6) if args.quota_mb else None
    if args.resume:
        with Spool(spool_dir, quota) as spool:
            spool.retry_now()
            sender = Archiver(spool, node, on_event=_on_event)
            ok = sender.drain(args.wait) if args.wait > 0 else sender.send_due().error == ""
            counts = spool.counts()
        return _finish(counts.get("pending", 0), counts.get("parked", 0), sender.last_error, ok)
    if args.recording is None:
        raise CommandError("name a RECORDING to archive (or --echo / --resume)")
    if not args.recording.exists():
        raise CommandError(f"{args.recording} does not exist")
    try:
        study = _study(args, node)
        _say(f"archiving {args.recording.name} to {node.label()} (spool {spool_dir})")
        result = archive(
            args.recording,
            node,
            spool_dir,
            study,
            options=ExportOptions(modality=args.modality, device=args.device, overlay=args.overlay),
            quota_bytes=quota,
            policy=RetryPolicy(),
            wait_s=args.wait,
            progress=_progress,
            on_event=_on_event,
        )
    except (StudyValidationError, SpoolFullError, DicomNetworkError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    _say(f"wrote {len(result.objects)} object(s)")
    return _finish(result.pending, result.parked, result.report.error, result.report.error == "")


def _finish(pending: int, parked: int, error: str, ok: bool) -> int:
    if parked:
        raise CommandError(
            f"{parked} object(s) refused by the PACS and parked in the spool; see the log above"
        )
    if pending:
        raise CommandError(
            f"{pending} object(s) kept in the spool for a later retry (guidance archive --resume): "
            f"{error or 'not sent yet'}"
        )
    if not ok and error:
        raise CommandError(error)
    _say("all objects archived")
    return 0
