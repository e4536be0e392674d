"""benches/bench_decode.py runs end to end on CPU (--smoke) and refuses GPU claims without one."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benches" / "bench_decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_decode"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_csv_png_summary(bench, tmp_path, monkeypatch):
    # What --smoke would set, but undone after the test (main() sets it process-wide).
    monkeypatch.setenv("OSCAR_KV_BACKEND", "triton")
    assert bench.main(["--smoke", "--out", str(tmp_path), "--batch", "1", "--context", "200"]) == 0
    with (tmp_path / "decode.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.COLUMNS
    impls = {r["impl"] for r in rows}
    assert {"oscar-triton", "kivi-2bit-triton", "bf16-triton", "bf16-sdpa"} <= impls
    assert all("smoke" in r["device"] for r in rows)
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert "oscar-triton" in (tmp_path / "decode_summary.md").read_text()


def test_smoke_never_writes_into_results(bench):
    assert bench.main(["--smoke"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_gpu_numbers_without_gpu(bench, tmp_path):
    assert bench.main(["--out", str(tmp_path)]) == 2
    assert not (tmp_path / "decode.csv").exists()


@pytest.fixture(scope="module")
def bench_extend():
    path = BENCH.parent / "bench_extend.py"
    spec = importlib.util.spec_from_file_location("bench_extend", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_extend"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_extend_smoke_run_writes_csv_png_summary(bench_extend, tmp_path, monkeypatch):
    # What --smoke would set, but undone after the test (main() sets it process-wide).
    monkeypatch.setenv("OSCAR_KV_BACKEND", "triton")
    assert bench_extend.main(["--smoke", "--out", str(tmp_path)]) == 0
    with (tmp_path / "extend.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench_extend.COLUMNS
    impls = {r["impl"] for r in rows}
    assert {"oscar-triton-fused", "oscar-triton-workspace", "bf16-sdpa"} <= impls
    assert all("smoke" in r["device"] for r in rows)
    assert (tmp_path / "extend.png").stat().st_size > 0
    assert "fused vs best workspace" in (tmp_path / "extend_summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_extend_refuses_gpu_numbers_without_gpu(bench_extend, tmp_path):
    assert bench_extend.main(["--out", str(tmp_path)]) == 2
    assert bench_extend.main(["--smoke"]) == 2
