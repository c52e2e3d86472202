"""High-level export and archive: recording or frames -> DICOM files (-> spool -> PACS).

``export_dicom`` writes the objects to a folder (``guidance export RECORDING --dicom DIR``);
``archive`` writes them into the store-and-forward spool and sends them (``guidance archive``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.base import INSTRUMENT, TARGET, SegmentationEngine
from guidance.dicom.from_recording import (
    Progress,
    SpilledFrames,
    open_recording,
    spill_frames,
    study_from_metadata,
)
from guidance.dicom.network import DicomNode
from guidance.dicom.spool import Archiver, EventSink, RetryPolicy, SendReport, Spool, SpoolFullError
from guidance.dicom.study import PatientStudy
from guidance.dicom.writers import (
    DEFAULT_MAX_INSTANCE_BYTES,
    AlgorithmInfo,
    Equipment,
    SeriesInfo,
    WrittenObject,
    write_overlay,
    write_secondary_capture,
    write_segmentation,
    write_us_cine,
)
from streaming.frame import Frame

logger = logging.getLogger(__name__)

Source = str | Path | npt.NDArray[np.generic] | Sequence[Frame] | Iterable[Frame]
MaskSource = npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]] | None


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """How to write a recording. ``modality``: "US" (ultrasound cine) or "XF"/"RF"/"XA" (frame-grabbed
    fluoroscopy as Secondary Capture)."""

    modality: str = "US"
    times_s: Sequence[float] | npt.NDArray[np.floating] | None = None
    fps: float | None = None
    spacing_mm: tuple[float, float] | None = None
    device: str | None = None  # recording IMAGE device (default: all IMAGE messages)
    burned_in_annotation: bool = True  # frame-grabbed SC only (see write_secondary_capture)
    algorithm: AlgorithmInfo = field(default_factory=AlgorithmInfo)
    equipment: Equipment = field(default_factory=Equipment)
    labels: tuple[int, ...] = (INSTRUMENT, TARGET)
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    overlay: bool = False  # also write the burned-in AI overlay copy (RGB Secondary Capture series)


def _estimate_bytes(
    n: int, rows: int, cols: int, *, itemsize: int, nseg: int, with_masks: bool, overlay: bool = False
) -> int:
    pixels = n * rows * cols * itemsize
    seg = (n * nseg * rows * cols + 7) // 8 + n * nseg * 400 if with_masks else 0
    rgb = n * rows * cols * 3 if overlay and with_masks else 0
    return pixels + seg + rgb + 64_000  # headers: a few kB per object


def write_objects(
    source: Source,
    out_dir: Path,
    study: PatientStudy | None = None,
    *,
    masks: MaskSource = None,
    engine: SegmentationEngine | None = None,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
    before_write: Callable[[int], None] | None = None,
) -> list[WrittenObject]:
    """Write the image series (+ SEG when masks are known or ``engine`` is given) into ``out_dir``.

    ``before_write(estimated_bytes)`` is called once the size is known and before anything is written
    (the spool uses it to refuse what would not fit).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spilled: SpilledFrames | None = None
    times = options.times_s
    spacing = options.spacing_mm
    start: _dt.datetime | None = None
    meta: dict[str, Any] = {}
    try:
        images: npt.NDArray[np.generic] | Sequence[Frame]
        if isinstance(source, str | Path):
            spilled, rec_masks, rec_meta = open_recording(Path(source), options.device, out_dir, progress)
            meta = dict(rec_meta)
            masks = masks if masks is not None else rec_masks
        elif isinstance(source, np.ndarray | Sequence):
            pass
        else:
            spilled = spill_frames(source, out_dir, progress)
        if spilled is not None:
            images = spilled.pixels
            times = times if times is not None else spilled.times_s
            spacing = spacing or spilled.spacing_mm
            start = spilled.start_time
        else:
            images = source  # type: ignore[assignment]
        if study is None:
            study = study_from_metadata(meta)
        if study is None:
            raise ValueError("no patient/study: pick one from the worklist or type it in")
        study = study.resolved()
        if engine is not None and masks is None:
            masks = _segment(images, engine, progress)
        if options.overlay and masks is None:
            raise ValueError(
                "the AI overlay needs label maps: the recording holds none and no engine was given"
            )
        first = images[0] if isinstance(images, np.ndarray) else images[0].pixels
        n, rows, cols = len(images), int(first.shape[0]), int(first.shape[1])
        if before_write is not None:
            before_write(
                _estimate_bytes(
                    n,
                    rows,
                    cols,
                    itemsize=first.dtype.itemsize,
                    nseg=len(options.labels),
                    with_masks=masks is not None,
                    overlay=options.overlay,
                )
            )
        if progress is not None:
            progress("writing images", 0)
        if options.modality.upper() == "US":
            objs = write_us_cine(
                images,
                out_dir,
                study,
                times_s=times,
                fps=options.fps,
                spacing_mm=spacing,
                equipment=options.equipment,
                start_time=start,
                max_instance_bytes=options.max_instance_bytes,
            )
        else:
            objs = write_secondary_capture(
                images,
                out_dir,
                study,
                modality=options.modality,
                times_s=times,
                fps=options.fps,
                spacing_mm=spacing,
                burned_in_annotation=options.burned_in_annotation,
                equipment=options.equipment,
                start_time=start,
                max_instance_bytes=options.max_instance_bytes,
            )
        if masks is not None:
            if progress is not None:
                progress("writing segmentation", 0)
            sources = list(objs)
            objs += write_segmentation(
                masks,
                sources,
                out_dir,
                study,
                algorithm=options.algorithm,
                labels=options.labels,
                series=SeriesInfo(100, "Needle and target segmentation (AI)"),
                equipment=options.equipment,
            )
            if options.overlay:
                if progress is not None:
                    progress("writing AI overlay", 0)
                objs += write_overlay(
                    images,
                    masks,
                    sources,
                    out_dir,
                    study,
                    labels=options.labels,
                    modality=options.modality,
                    times_s=times,
                    fps=options.fps,
                    equipment=options.equipment,
                    start_time=start,
                    max_instance_bytes=options.max_instance_bytes,
                )
        return objs
    finally:
        if spilled is not None:
            spilled.release()


def _segment(
    images: npt.NDArray[np.generic] | Sequence[Frame], engine: SegmentationEngine, progress: Progress | None
) -> npt.NDArray[np.uint8]:
    n = len(images)
    first = images[0] if isinstance(images, np.ndarray) else images[0].pixels
    out = np.zeros((n, int(first.shape[0]), int(first.shape[1])), np.uint8)
    engine.reset()  # the frames are one stream, not the continuation of what the engine saw before
    for i in range(n):
        img = images[i] if isinstance(images, np.ndarray) else images[i].pixels
        out[i] = engine.infer(np.asarray(img)).labels
        if progress is not None and (i + 1) % 100 == 0:
            progress("segmenting", i + 1)
    return out


def export_dicom(
    recording_or_frames: Source,
    out_dir: Path,
    study: PatientStudy | None = None,
    *,
    masks: MaskSource = None,
    engine: SegmentationEngine | None = None,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
) -> list[Path]:
    """Write a recording (path) or frames ((N,rows,cols) array / Frames) as DICOM files into ``out_dir``.

    The patient/study comes from ``study``, else from the recording's metadata; masks from ``masks``, else
    the recording's label results, else ``engine`` (run now), else no SEG. Returns the written paths.
    """
    return [
        o.path
        for o in write_objects(
            recording_or_frames,
            Path(out_dir),
            study,
            masks=masks,
            engine=engine,
            options=options,
            progress=progress,
        )
    ]


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    objects: list[WrittenObject]
    report: SendReport
    pending: int  # still in the spool (will be retried)
    parked: int  # refused for good: needs the user


def spool_objects(
    source: Source,
    spool: Spool,
    study: PatientStudy | None = None,
    *,
    masks: MaskSource = None,
    engine: SegmentationEngine | None = None,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
) -> list[WrittenObject]:
    """Write the objects into the spool (atomically) and commit their jobs. Nothing is sent yet.

    Raises:
        SpoolFullError: the quota or the disk has no room; objects spooled earlier are untouched.
    """
    staging = spool.incoming / f"batch-{_dt.datetime.now():%Y%m%d%H%M%S%f}"
    try:
        objs = write_objects(
            source,
            staging,
            study,
            masks=masks,
            engine=engine,
            options=options,
            progress=progress,
            before_write=spool.check_room,
        )
    except OSError as exc:
        if isinstance(exc, SpoolFullError):
            raise
        raise SpoolFullError(
            exc.errno or 0, f"could not write into the archive spool: {exc.strerror or exc}"
        ) from exc
    try:
        for o in objs:
            spool.enqueue(o.path, check_quota=False)  # room was checked before writing
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return objs


def archive(
    source: Source,
    node: DicomNode,
    spool_dir: Path,
    study: PatientStudy | None = None,
    *,
    masks: MaskSource = None,
    engine: SegmentationEngine | None = None,
    options: ExportOptions = ExportOptions(),
    quota_bytes: int | None = None,
    policy: RetryPolicy | None = None,
    wait_s: float = 0.0,
    progress: Progress | None = None,
    on_event: EventSink | None = None,
) -> ArchiveResult:
    """Spool the objects of ``source`` and send everything due (this batch and any earlier leftovers).

    ``wait_s`` > 0 keeps retrying (with backoff) up to that long; what is left stays spooled for later.
    """
    with Spool(spool_dir, quota_bytes) as spool:
        objs = spool_objects(
            source, spool, study, masks=masks, engine=engine, options=options, progress=progress
        )
        sender = Archiver(spool, node, policy=policy or RetryPolicy(), on_event=on_event)
        if wait_s > 0:
            sender.drain(wait_s)
            report = SendReport(0, 0, 0, sender.last_error)
        else:
            report = sender.send_due()
        counts = spool.counts()
    return ArchiveResult(
        objs, report, counts.get("pending", 0) + counts.get("sending", 0), counts.get("parked", 0)
    )
