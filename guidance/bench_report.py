"""Pictures for ``guidance bench pipeline --report DIR``: PNG plots and a one-page HTML summary."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guidance.bench_series import RESULT_COLUMNS, SAMPLE_COLUMNS

STAGES = ("queue", "infer", "interpret", "receive_to_result", "sent_to_result")


def write_pipeline_report(
    directory: Path,
    report: dict[str, Any],
    results: npt.NDArray[np.float64],
    samples: npt.NDArray[np.float64],
) -> Path:
    """Write ``latency_cdf.png``, ``timeline.png``, ``drops.png``, ``memory.png`` and ``index.html``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    budget = float(report["budget_ms"])
    col = {name: i for i, name in enumerate(RESULT_COLUMNS)}
    scol = {name: i for i, name in enumerate(SAMPLE_COLUMNS)}
    images: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for stage in STAGES:
        v = np.sort(results[:, col[stage]][np.isfinite(results[:, col[stage]])])
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=stage.replace("_", " "))
    ax.axvline(budget, color="red", linestyle="--", label=f"budget {budget:.1f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of results")
    ax.set_title("Latency CDF per stage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "latency_cdf.png", dpi=110)
    plt.close(fig)
    images.append(("latency_cdf.png", "Latency CDF per stage, with the budget"))

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    if len(results):
        a1.plot(results[:, 0], results[:, col["receive_to_result"]], ".", ms=2, label="receive→result")
        a1.plot(results[:, 0], results[:, col["infer"]], ".", ms=2, alpha=0.6, label="inference")
    a1.axhline(budget, color="red", linestyle="--", label="budget")
    a1.set_ylabel("ms")
    a1.set_title("Latency over time")
    a1.legend(fontsize=8, loc="upper right")
    a1.grid(True, alpha=0.3)
    if len(samples):
        a2.plot(samples[:, 0], samples[:, scol["input_fps"]], label="input fps")
        a2.plot(samples[:, 0], samples[:, scol["processed_fps"]], label="AI fps")
    a2.set_xlabel("time (s)")
    a2.set_ylabel("frames/s")
    a2.legend(fontsize=8)
    a2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "timeline.png", dpi=110)
    plt.close(fig)
    images.append(("timeline.png", "Latency and frame rate over time"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    if len(samples):
        ax.plot(samples[:, 0], samples[:, scol["skipped"]], label="skipped by the AI (cumulative)")
        ax.plot(samples[:, 0], samples[:, scol["over_budget"]], label="results over budget (cumulative)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frames")
    ax.set_title("Dropped and late frames over time")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "drops.png", dpi=110)
    plt.close(fig)
    images.append(("drops.png", "Dropped (skipped) and over-budget frames over time"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    if len(samples):
        ax.plot(samples[:, 0], samples[:, scol["rss_mb"]])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title("Resident memory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "memory.png", dpi=110)
    plt.close(fig)
    images.append(("memory.png", "Resident memory over time"))

    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{v.get(k, float('nan')):.2f}</td>" for k in ("p50", "p90", "p99", "p99.9", "max"))
        + "</tr>"
        for name, v in report["latency_ms"].items()
    )
    facts = [
        ("engine", report["engine"]),
        ("source", f"{report['size']} {report['modality']} at {report['fps']:g} fps"),
        (
            "frames sent / received / processed",
            f"{report['frames_sent']} / {report['frames_received']} / {report['frames_processed']}",
        ),
        ("dropped (skipped by AI + lost in transport)", f"{report['frames_dropped']}"),
        ("over budget", f"{report['over_budget']} (budget {budget:.1f} ms)"),
        ("duration", f"{report['wall_s']:.1f} s"),
    ]
    if "soak" in report:
        facts.append(("soak", html.escape(json.dumps(report["soak"]))))
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    figs = "".join(
        f'<figure><img src="{name}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for name, cap in images
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Pipeline benchmark</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{text-align:left;background:#f4f4f4}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head><body>
<h1>Pipeline benchmark</h1><table>{fact_rows}</table>
<h2>Latency (ms)</h2><table><tr><th>stage</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>
{rows}</table>{figs}</body></html>"""
    index = directory / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
