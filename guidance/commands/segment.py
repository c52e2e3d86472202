"""``guidance segment INPUT --out DIR``: label maps and geometry for images, folders, recordings, sequences.

INPUT may be one image (PNG, TIFF, JPEG, NPY; 8- or 16-bit, grey or colour), a folder of them (sorted by
name), one of our recordings (``.mcap``) or a PLUS/Slicer sequence file (``.igs.mha``, ``.igs.nrrd``,
``.seq.nrrd``, ``.mha``, ``.nrrd``). For every frame it writes ``<name>.png`` (uint8 label map, value =
class index, same size as the input) and ``<name>.json`` (instrument present, tip in px and mm, axis angle
(entry -> tip chord) and tip direction (the heading at the tip, which the trajectory follows), target
centroid and area, tip-to-target distance, confidence), and a ``results.json`` with all frames.
Frames of one input go through one :class:`guidance.interpretation.Interpreter` in order, as in the app.
A recording or sequence file is one stream to the engine (a temporal model sees each frame's predecessor);
the images of a folder are segmented each on its own (see :func:`iter_input`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")
SEQUENCE_SUFFIXES = (".igs.mha", ".igs.nrrd", ".seq.nrrd", ".mha", ".nrrd")
RECORDING_SUFFIXES = (".mcap",)


@dataclass(frozen=True, slots=True)
class InputFrame:
    name: str
    pixels: npt.NDArray[np.generic]
    spacing_mm: tuple[float, float]
    time_s: float
    #: The engine forgets the previous frame before this one (``engine.reset()``).
    new_stream: bool = False


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment images, a folder, a recording or a PLUS/Slicer sequence to label maps + JSON",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("input", type=Path, help="image, folder of images, recording (.mcap) or sequence file")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--engine", default="auto", help="engine backend (auto, onnxruntime, torch, classical...)")
    p.add_argument("--model", default=None, help="model card / ONNX path or shipped name (default: shipped)")
    p.add_argument("--modality", choices=("us", "fluoro"), default=None, help="hint for the classical engine")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=2,
        metavar=("X_MM", "Y_MM"),
        default=None,
        help="pixel spacing for images",
    )
    p.add_argument("--fps", type=float, default=30.0, help="frame rate assumed for images (default 30)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------ reading
def _read_image(path: Path) -> npt.NDArray[np.generic]:
    if path.suffix.lower() == ".npy":
        arr: npt.NDArray[np.generic] = np.load(path, allow_pickle=False)
    else:
        import cv2

        read: Any = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if read is None:
            raise ValueError(f"cannot read image {path}")
        arr = np.asarray(read)
        if arr.ndim == 3 and arr.shape[2] >= 3:  # OpenCV gives BGR(A); the engines expect RGB(A)
            arr = arr[:, :, [2, 1, 0, *range(3, arr.shape[2])]]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return arr


def _lower(path: Path) -> str:
    return path.name.lower()


def iter_input(path: Path, spacing: tuple[float, float] | None, fps: float) -> Iterator[InputFrame]:
    """Frames of ``path`` in order (see the module docstring for what ``path`` may be)."""
    from guidance.pipeline import STREAM_GAP_S

    sp = spacing or (1.0, 1.0)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        # Each image is a stream of its own: a folder may hold unrelated images, and a temporal model given
        # the difference from an unrelated image can invent or hide an instrument, while a zero difference
        # is the first-frame input it was trained on (at worst single-frame quality). A sequence exported
        # as images keeps its temporal context only as a recording or sequence file.
        for i, f in enumerate(files):
            yield InputFrame(f.stem, _read_image(f), sp, i / fps, new_stream=True)
        return
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    name = _lower(path)
    if name.endswith(RECORDING_SUFFIXES):
        from streaming.recording import RecordingReader

        reader = RecordingReader(path).open()
        t0: float | None = None
        last: tuple[str, float] | None = None  # device and receive time of the previous frame
        for fr in reader.frames():
            t0 = fr.receive_ns / 1e9 if t0 is None else t0
            t = fr.receive_ns / 1e9 - t0
            # One stream per device and without gaps, as the live pipeline decides.
            new = last is None or fr.device != last[0] or t - last[1] > STREAM_GAP_S
            last = (fr.device, t)
            yield InputFrame(f"frame_{fr.seq:05d}", fr.pixels, spacing or fr.spacing_mm, t, new_stream=new)
        return
    if name.endswith(SEQUENCE_SUFFIXES):
        from streaming.sequence import read_sequence

        seq = read_sequence(path)
        ts = np.asarray(seq.timestamps, dtype=np.float64)
        t_prev = 0.0
        for i in range(len(seq.frames)):
            t = float(ts[i] - ts[0]) if len(ts) == len(seq.frames) else i / fps
            new = i == 0 or t - t_prev > STREAM_GAP_S
            t_prev = t
            yield InputFrame(
                f"frame_{i:05d}", np.asarray(seq.frames[i]), spacing or seq.spacing, t, new_stream=new
            )
        return
    if path.suffix.lower() in IMAGE_SUFFIXES:
        yield InputFrame(path.stem, _read_image(path), sp, 0.0, new_stream=True)
        return
    raise ValueError(f"unsupported input {path}: not an image, folder, recording or sequence file")


# ------------------------------------------------------------------------------------------ results
def _pt(p: tuple[float, float] | None) -> list[float] | None:
    return None if p is None else [round(float(p[0]), 3), round(float(p[1]), 3)]


def _num(v: float | None, nd: int = 3) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def frame_result(frame: InputFrame, interp: Any, scores: dict[str, float]) -> dict[str, Any]:
    """The per-frame JSON (units: px = (x, y) image pixels; mm via the frame's spacing)."""
    sx, sy = frame.spacing_mm
    inst = interp.instrument
    tgt = interp.target
    out: dict[str, Any] = {
        "frame": frame.name,
        "time_s": round(frame.time_s, 6),
        "size": [int(frame.pixels.shape[1]), int(frame.pixels.shape[0])],
        "spacing_mm": [sx, sy],
        "status": interp.status,
        "instrument_present": inst is not None,
        "tip_px": _pt(inst.tip_px) if inst else None,
        "tip_mm": [round(inst.tip_px[0] * sx, 3), round(inst.tip_px[1] * sy, 3)] if inst else None,
        "raw_tip_px": _pt(inst.raw_tip_px) if inst else None,
        "entry_px": _pt(inst.entry_px) if inst else None,
        "axis_angle_deg": _num(inst.axis_angle_deg) if inst else None,
        "tip_direction_deg": _num(inst.angle_deg) if inst else None,
        "instrument_length_mm": _num(inst.length_mm) if inst else None,
        "confidence": _num(inst.confidence) if inst else None,
        "target_present": tgt is not None,
        "target_centroid_px": _pt(tgt.centroid_px) if tgt else None,
        "target_centroid_mm": [round(tgt.centroid_px[0] * sx, 3), round(tgt.centroid_px[1] * sy, 3)]
        if tgt
        else None,
        "target_area_mm2": _num(tgt.area_mm2) if tgt else None,
        "target_diameter_mm": _num(tgt.equivalent_diameter_mm) if tgt else None,
        "tip_to_target_mm": _num(interp.tip_to_target_mm),
        "tip_to_target_boundary_mm": _num(interp.tip_to_boundary_mm),
        "on_path": interp.on_path,
        "scores": {k: _num(v, 4) for k, v in scores.items()},
    }
    return out


def segment(
    input_path: Path,
    out_dir: Path,
    *,
    engine_name: str = "auto",
    model: str | None = None,
    modality: str | None = None,
    spacing: tuple[float, float] | None = None,
    fps: float = 30.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment every frame of ``input_path`` into ``out_dir``; returns the ``results.json`` content."""
    import cv2

    from engines import registry
    from guidance.interpretation import Interpreter

    options: dict[str, Any] = {}
    if model is not None:
        options["model"] = model
    if modality is not None and registry.resolve(engine_name) == "classical":
        options["modality"] = modality
    engine = registry.create(engine_name, **options)
    engine.load()
    out_dir.mkdir(parents=True, exist_ok=True)
    interpreter = Interpreter()
    frames: list[dict[str, Any]] = []
    try:
        engine.warm_up()
        info = engine.describe()
        for fr in iter_input(input_path, spacing, fps):
            if fr.new_stream:
                engine.reset()
            out = engine.infer(fr.pixels)
            labels = np.ascontiguousarray(out.labels, dtype=np.uint8)
            interp = interpreter.update(labels, fr.spacing_mm, fr.time_s, out.instrument_prob)
            if not cv2.imwrite(str(out_dir / f"{fr.name}.png"), labels):
                raise OSError(f"cannot write {out_dir / (fr.name + '.png')}")
            res = frame_result(fr, interp, dict(out.scores))
            res["labels_png"] = f"{fr.name}.png"
            (out_dir / f"{fr.name}.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
            frames.append(res)
            if progress and len(frames) % 25 == 0:
                sys.stderr.write(f"segment: {len(frames)} frames\n")
    finally:
        engine.close()
    summary: dict[str, Any] = {
        "input": str(input_path),
        "engine": info.label(),
        "model": info.model,
        "classes": ["background", "instrument", "target"],
        "frames": frames,
        "frames_with_instrument": sum(1 for f in frames if f["instrument_present"]),
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def run(args: argparse.Namespace) -> int:
    from engines.base import EngineError
    from guidance.cli import CommandError

    try:
        summary = segment(
            args.input,
            args.out,
            engine_name=args.engine,
            model=args.model,
            modality=args.modality,
            spacing=tuple(args.spacing) if args.spacing else None,
            fps=args.fps,
        )
    except (EngineError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    sys.stderr.write(
        f"segment: {len(summary['frames'])} frames ({summary['frames_with_instrument']} with an instrument) "
        f"with {summary['engine']} -> {args.out}\n"
    )
    return 0
