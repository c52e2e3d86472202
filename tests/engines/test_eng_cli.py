"""`guidance engines` (list/build) and the engines benchmark, run as the user runs them."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from guidance import bench_engines
from guidance.cli import main


def test_eng_cli_lists_backends_and_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["engines"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out
    assert "tensorrt" in out
    assert "unavailable: tensorrt is not installed" in out
    assert "auto -> " in out
    assert main(["engines", "list"]) == 0


def test_eng_cli_build_says_why_it_cannot(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["engines", "build"]) == 1
    err = capsys.readouterr().err
    assert "cannot build a TensorRT engine: tensorrt is not installed" in err


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_eng_bench_engines_writes_json_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bench sets OMP_WAIT_POLICY; setenv first so monkeypatch restores the original state afterwards.
    monkeypatch.setenv("OMP_WAIT_POLICY", "unset-by-test")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench_engines.add_engines_bench(sub)
    args = parser.parse_args(
        [
            "engines",
            "--json",
            str(tmp_path / "r.json"),
            "--report",
            str(tmp_path / "rep"),
            "--sizes",
            "32",
            "--iterations",
            "3",
            "--warmup",
            "1",
            "--tiny",
            "--backends",
            "onnxruntime,torch",
        ]
    )
    assert args.func(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    names = {r["backend"] for r in data["results"]}
    assert names == {"onnxruntime", "torch", "torch-eager"}
    eager = next(r for r in data["results"] if r["backend"] == "torch-eager")
    assert eager["vs_torch_eager"] == pytest.approx(1.0)
    for r in data["results"]:
        assert r["count"] == 3
        assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert (tmp_path / "rep" / "engines_latency.png").stat().st_size > 0
    assert "torch-eager" in (tmp_path / "rep" / "engines.html").read_text()
    assert "vs eager" in capsys.readouterr().out
    assert data["meta"]["omp_wait_policy"] == "PASSIVE"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_eng_bench_engines_runs_a_second_model_in_the_same_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--versus CARD``: a second model on onnxruntime is timed interleaved with the first, at its size."""
    from engines.assets import make_random_model

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    other = make_random_model(tmp_path / "other", 32, 32, tiny=True, seed=3, name="other")
    parser = argparse.ArgumentParser()
    bench_engines.add_engines_bench(parser.add_subparsers())
    args = parser.parse_args(
        [
            *("engines", "--json", str(tmp_path / "r.json"), "--sizes", "32,64", "--iterations", "2"),
            *("--warmup", "0", "--tiny", "--backends", "onnxruntime", "--versus", str(other)),
        ]
    )
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    by_size = {s: {r["backend"]: r for r in rows if r["size"] == s} for s in (32, 64)}
    assert set(by_size[32]) == {"onnxruntime", "onnxruntime:versus"}
    assert by_size[32]["onnxruntime:versus"]["model"].startswith("other")
    assert by_size[32]["onnxruntime:versus"]["count"] == 2
    assert set(by_size[64]) == {"onnxruntime"}  # the second model is 32x32: nothing to compare at 64
