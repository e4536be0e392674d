"""Where the 2-bit error comes from: which layers, which tokens, K or V.

`python -m oscar_kv eval --sections attribution`: on post-RoPE Q/K/V captured from SmolLM2 (the
fidelity harness's per-layer view: every full page quantized, the last positions as queries),
the attention mass on token 0 and page 0 and the attention-output error with every page
quantized, page 0 exact, only K or only V quantized. Written to attribution.md,
attribution_layers.csv and attribution_layers.png, not to summary.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.eval import pyplot
from oscar_kv.eval.report import write_csv


def token_attribution(
    layers: Sequence[dict[str, torch.Tensor]], config: OscarConfig, queries: int = 256
) -> list[dict[str, float]]:
    """Per layer: attention mass of the last ``queries`` positions on token 0 and on page 0, and
    the relative attention-output error with every page quantized, with page 0 kept exact, with
    only K quantized (V exact) and with only V quantized (K exact)."""
    from oscar_kv.eval.fidelity import exact_attention, rel
    from oscar_kv.ref import dequantize_kv, quantize_kv

    rows = []
    for i, layer in enumerate(layers):
        q, k, v = layer["q"][-queries:], layer["k"], layer["v"]
        exact = exact_attention(q, k, v)
        k_hat, v_hat = dequantize_kv(quantize_kv(k, v, config))
        k0, v0 = k_hat.clone(), v_hat.clone()
        k0[:BLOCK_TOKENS], v0[:BLOCK_TOKENS] = k[:BLOCK_TOKENS], v[:BLOCK_TOKENS]
        group = q.shape[1] // k.shape[1]
        logits = torch.einsum("qhd,thd->hqt", q, k.repeat_interleave(group, 1))
        visible = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
        probs = torch.softmax(
            (logits / math.sqrt(q.shape[2])).masked_fill(~visible, float("-inf")), -1
        )
        rows.append({
            "layer": i,
            "mass_token0": probs[..., 0].mean().item(),
            "mass_page0": probs[..., :BLOCK_TOKENS].sum(-1).mean().item(),
            "out_err": rel(exact_attention(q, k_hat, v_hat), exact),
            "out_err_page0_exact": rel(exact_attention(q, k0, v0), exact),
            "out_err_k_only": rel(exact_attention(q, k_hat, v), exact),
            "out_err_v_only": rel(exact_attention(q, k, v_hat), exact),
        })  # fmt: skip
    return rows


def write_attribution(
    out: Path, results: dict[str, list[dict[str, float]]], tokens: int, queries: int
) -> None:
    plt = pyplot()

    keys = ("mass_token0", "mass_page0", "out_err", "out_err_page0_exact", "out_err_k_only",
            "out_err_v_only")  # fmt: skip
    rows = [[lab, r["layer"], *(f"{r[k]:.4f}" for k in keys)] for lab, rs in results.items()
            for r in rs]  # fmt: skip
    write_csv(out / "attribution_layers.csv", ("method", "layer", *keys), rows)
    lines = [
        "# Where the 2-bit error comes from (SmolLM2, captured post-RoPE Q/K/V)",
        "",
        (
            f"{tokens} tokens of pydoc prose, every full page quantized, the last {queries} positions "
            "as queries (the fidelity harness's setting); relative error of the attention output "
            "per layer, averaged over layers (worst layer in brackets)."
        ),
        "",
        "| method | all pages | page 0 exact | K only (V exact) | V only (K exact) |",
        "|---|---|---|---|---|",
    ]
    for lab, rs in results.items():
        cells = []
        for k in keys[2:]:
            vals = [r[k] for r in rs]
            worst = max(range(len(vals)), key=vals.__getitem__)
            cells.append(f"{sum(vals) / len(vals):.3f} ({vals[worst]:.2f} @L{worst})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    m0 = sum(r["mass_token0"] for r in first) / len(first)
    p0 = sum(r["mass_page0"] for r in first) / len(first)
    lines += ["", (f"Attention mass of the queries on token 0: {m0:.1%} on average over layers; "
              f"on page 0 (tokens 0-127): {p0:.1%}."), ""]  # fmt: skip
    (out / "attribution.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (lab, rs) in zip(axes, results.items(), strict=False):
        x = [r["layer"] for r in rs]
        for k in keys[2:]:
            ax.plot(x, [r[k] for r in rs], marker=".", label=k)
        ax.plot(x, [r["mass_page0"] for r in rs], "k:", label="attention mass on page 0")
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("relative attention-output error")
    fig.tight_layout()
    fig.savefig(out / "attribution_layers.png", dpi=110)
    plt.close(fig)
