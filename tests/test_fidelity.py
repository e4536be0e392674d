"""The fidelity harness runs end to end on small synthetic data and writes its outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from oscar_kv import OscarConfig
from oscar_kv.eval import fidelity


def test_synthetic_data_has_the_hard_structure() -> None:
    layer = fidelity.synthetic_layers(layers=1, tokens=512, seed=1)[0]
    k = layer["k"]
    norms = k.norm(dim=(1, 2))
    assert norms.min() < 0.05 * norms.median()  # near-zero-norm sinks
    assert norms.max() > 3 * norms.median()  # heavy tail
    chan = k.abs().amax(dim=(0, 1))
    assert chan.max() > 5 * chan.median()  # outlier channels


def test_bf16_is_near_exact_and_oscar_beats_kivi_on_logits() -> None:
    layers = fidelity.synthetic_layers(layers=1, tokens=512, seed=2)
    methods = {"bf16": None, "kivi": OscarConfig.kivi(2), "oscar": OscarConfig()}
    rows = {r.method: r for r in fidelity.run_methods("synthetic", layers, methods, 64)}
    assert rows["bf16"].out_err < 0.02
    assert rows["oscar"].logit_err < rows["kivi"].logit_err
    assert rows["oscar"].bytes_per_token == 388 and rows["bf16"].bytes_per_token == 2048


def test_cli_writes_table_csv_and_plots(tmp_path: Path, monkeypatch) -> None:
    small = fidelity.synthetic_layers(layers=2, tokens=256, kv_heads=2, head_dim=64)
    monkeypatch.setattr(fidelity, "synthetic_layers", lambda tokens: small)
    assert fidelity.main(["--synthetic-only", "--tokens", "256", "--queries", "32",
                          "--out", str(tmp_path)]) == 0  # fmt: skip
    for name in ("fidelity.md", "fidelity.csv", "summary.csv", "norms_synthetic.png",
                 "error_by_layer_synthetic.png", "error_vs_bytes.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "fidelity.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 21
    assert all(torch.isfinite(torch.tensor(float(r["out_err"]))) for r in rows)
