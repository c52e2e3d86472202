"""Tip steadiness: how much the reported needle tip moves from one frame to the next beyond the true tip.

The held-out evaluation scores frames 8 apart; a clinician sees every frame. This runs each model over
consecutive frames of phantom sequences (frames 60-119, at the phantom's own rate), through the same
interpretation the app uses (tip filter included), and reports, per modality and model:

* the tip error (mm, median / p95) against the true tip;
* the jitter: the frame-to-frame change of that error vector (mm, median / p95). A steady estimate that
  follows the needle has a small jitter even while the needle moves; a flickering one has a large one;
* the same two for the target's centroid (of the predicted target pixels, against the phantom's lesion
  centroid), the other end of the tip-to-target distance on screen;
* the target contour's flicker: 1 - IoU of the predicted target masks of consecutive frames (median /
  p95), beside the same for the true masks (the lesion's own motion).

Models run side by side in one process on the same frames (ONNX Runtime, CPU). Default sequences: the
evaluation's ``further-validation`` set (never trained on, calibrated on or held out).

    .venv/bin/python benchmarks/bench_tip_steadiness.py CARD [CARD ...] [--sequences 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.onnxruntime_backend import OnnxRuntimeEngine
from engines.base import TARGET
from guidance.evaluation import EvalConfig, geometry_reader_factory, heldout_seeds
from guidance.phantoms import make_phantom

FIRST_FRAME, FRAMES = 60, 60


def steadiness(card: Path, modality: str, seeds: list[int]) -> dict[str, Any]:
    """Tip error and jitter of ``card``'s model over consecutive frames of the sequences ``seeds``."""
    engine = OnnxRuntimeEngine(card, device="cpu")
    engine.load()
    engine.warm_up()
    errors: list[float] = []
    jitter: list[float] = []
    target_errors: list[float] = []
    target_jitter: list[float] = []
    flicker: list[float] = []
    true_flicker: list[float] = []
    try:
        for seed in seeds:
            phantom = make_phantom(modality, seed=seed, width=256, height=256)
            engine.reset()
            read = geometry_reader_factory()[0]()
            last: np.ndarray | None = None
            last_target: np.ndarray | None = None
            masks: tuple[np.ndarray, np.ndarray] | None = None
            for t in range(FIRST_FRAME, FIRST_FRAME + FRAMES):
                frame = phantom.frame(t)
                out = engine.infer(frame.image)
                geo = read(out, frame.spacing_mm, frame.time_s)
                spacing = np.asarray(frame.spacing_mm)
                predicted, true = out.labels == TARGET, frame.labels == TARGET
                if masks is not None and predicted.any() and true.any() and masks[0].any() and masks[1].any():
                    flicker.append(1.0 - _iou(predicted, masks[0]))
                    true_flicker.append(1.0 - _iou(true, masks[1]))
                masks = (predicted, true)
                if predicted.any() and frame.target_centroid_px is not None:
                    ys, xs = np.nonzero(predicted)
                    terr = (np.array([xs.mean(), ys.mean()]) - np.asarray(frame.target_centroid_px)) * spacing
                    target_errors.append(float(np.hypot(*terr)))
                    if last_target is not None:
                        target_jitter.append(float(np.hypot(*(terr - last_target))))
                    last_target = terr
                else:
                    last_target = None
                if geo.tip_px is None or frame.tip_px is None:
                    last = None
                    continue
                err = np.subtract(geo.tip_px, frame.tip_px) * spacing
                errors.append(float(np.hypot(*err)))
                if last is not None:
                    jitter.append(float(np.hypot(*(err - last))))
                last = err
    finally:
        engine.close()

    def q(values: list[float], p: float) -> float | None:
        return float(np.percentile(values, p)) if values else None

    return {
        "tip_error_mm_median": q(errors, 50),
        "tip_error_mm_p95": q(errors, 95),
        "jitter_mm_median": q(jitter, 50),
        "jitter_mm_p95": q(jitter, 95),
        "frame_pairs": len(jitter),
        "target_error_mm_median": q(target_errors, 50),
        "target_error_mm_p95": q(target_errors, 95),
        "target_jitter_mm_median": q(target_jitter, 50),
        "target_jitter_mm_p95": q(target_jitter, 95),
        "target_flicker_median": q(flicker, 50),
        "target_flicker_p95": q(flicker, 95),
        "true_target_flicker_median": q(true_flicker, 50),
        "true_target_flicker_p95": q(true_flicker, 95),
        "target_frame_pairs": len(flicker),
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(int(np.logical_or(a, b).sum()), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cards", type=Path, nargs="+", help="model cards to compare")
    parser.add_argument("--sequences", type=int, default=24, help="sequences per modality (default 24)")
    parser.add_argument("--modality", choices=("us", "fluoro", "both"), default="both")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    modalities = ("us", "fluoro") if args.modality == "both" else (args.modality,)
    cfg = EvalConfig(sequences=args.sequences, scenario="further-validation")
    results: dict[str, dict[str, Any]] = {}
    for mi, modality in enumerate(("us", "fluoro")):
        if modality not in modalities:
            continue
        seeds = heldout_seeds(cfg, mi)
        results[modality] = {str(card): steadiness(card, modality, seeds) for card in args.cards}

    def mm(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for modality, per_card in results.items():
        for card, r in per_card.items():
            sys.stdout.write(
                f"{modality:7s} {card}: tip error {mm(r['tip_error_mm_median'])} / {mm(r['tip_error_mm_p95'])} "
                f"mm, jitter {mm(r['jitter_mm_median'])} / {mm(r['jitter_mm_p95'])} mm (median / p95, "
                f"{r['frame_pairs']} frame pairs; n/a: no tip found)\n"
                f"{'':7s} target centroid error {mm(r['target_error_mm_median'])} / "
                f"{mm(r['target_error_mm_p95'])} mm, jitter {mm(r['target_jitter_mm_median'])} / "
                f"{mm(r['target_jitter_mm_p95'])} mm; contour flicker (1 - IoU) {mm(r['target_flicker_median'])} / "
                f"{mm(r['target_flicker_p95'])}, true masks {mm(r['true_target_flicker_median'])} / "
                f"{mm(r['true_target_flicker_p95'])}\n"
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"sequences": args.sequences, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
