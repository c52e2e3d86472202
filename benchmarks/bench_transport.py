"""Transport benchmark: our OpenIGTLink client vs pyigtl's, side by side (256x256 .. 1920x1080x3 at 30 fps).

    .venv/bin/python benchmarks/bench_transport.py --seconds 5 --json transport.json

Same as ``guidance bench transport``; the logic is in :mod:`streaming.igtl.bench`
(:func:`run_transport_bench`), re-exported here.
"""

from __future__ import annotations

import sys

from guidance.commands.bench_transport import histogram_summary
from streaming.igtl.bench import run_transport_bench

__all__ = ["histogram_summary", "main", "run_transport_bench"]


def main(argv: list[str] | None = None) -> int:
    from guidance.cli import main as cli_main

    return cli_main(["bench", "transport", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
