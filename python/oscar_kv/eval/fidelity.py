"""Fidelity harness: how far each quantizer moves K, V, attention logits and outputs.

``python -m oscar_kv fidelity`` runs every method of `oscar_kv.baselines.method_configs` on
(a) seeded synthetic K/V with the structure that breaks per-channel quantization and
(b) real post-RoPE Q/K/V captured from SmolLM2 on English prose, and writes a markdown table,
a CSV and PNG plots. Every full page is quantized (harsher than serving, where the newest
<128 tokens stay exact), and queries are the last ``queries`` positions, decode-style.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from oscar_kv import _native as native
from oscar_kv import _needs_extra
from oscar_kv.baselines import BF16, method_configs
from oscar_kv.config import OscarConfig
from oscar_kv.eval import pyplot
from oscar_kv.ref import attention, dequantize_kv, fwht, quantize_kv

with _needs_extra("eval", "oscar_kv.eval.fidelity (`python -m oscar_kv fidelity`)"):
    from tqdm import tqdm

LayerQKV = dict[str, torch.Tensor]  # "q" [T, Hq, D], "k"/"v" [T, H, D], fp32, post-RoPE


@dataclass
class Row:
    source: str
    method: str
    family: str
    bits: int
    k_group: int
    norm: str
    layer: int
    k_err: float
    v_err: float
    logit_err: float
    out_err: float
    bytes_per_token: float


def synthetic_layers(
    layers: int = 4,
    tokens: int = 2048,
    kv_heads: int = 4,
    q_per_kv: int = 4,
    head_dim: int = 128,
    seed: int = 0,
) -> list[LayerQKV]:
    """K/V with a few outlier channels, sparse near-zero-norm "sink" tokens and heavy-tailed
    (log-normal) token norms; Q shares the outlier channels so logits depend on them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        k = torch.randn(tokens, kv_heads, head_dim, generator=g)
        outliers = torch.randperm(head_dim, generator=g)[:4]
        k[:, :, outliers] = k[:, :, outliers] * 8.0 + 12.0
        k = k * torch.exp(0.8 * torch.randn(tokens, 1, 1, generator=g))
        sinks = torch.cat((torch.tensor([0]), torch.randperm(tokens, generator=g)[: tokens // 64]))
        k[sinks] *= 0.02
        v = torch.randn(tokens, kv_heads, head_dim, generator=g)
        v[torch.randperm(tokens, generator=g)[:8]] *= 20.0
        q = torch.randn(tokens, kv_heads * q_per_kv, head_dim, generator=g)
        q[:, :, outliers] *= 2.0
        out.append({"q": q * 0.5, "k": k, "v": v})
    return out


def real_layers(tokens: int) -> list[LayerQKV]:
    """Post-RoPE Q/K/V of every SmolLM2 layer on the first `tokens` tokens of English prose."""
    from oscar_kv.eval import smollm2
    from oscar_kv.eval.texts import english_text

    model, tokenizer = smollm2.load_model(progress=True)
    text = english_text(min_chars=tokens * 8)
    return smollm2.capture_qkv(model, tokenizer, text, max_tokens=tokens)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def causal_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled logits of the last q.shape[0] positions over k, masked entries set to 0."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, 1)
    logits = torch.einsum("qhd,thd->hqt", q, kk) / math.sqrt(q.shape[2])
    t, tq = k.shape[0], q.shape[0]
    visible = torch.ones(tq, t, dtype=torch.bool).tril(t - tq)
    return logits * visible


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.repeat_interleave(group, 1).transpose(0, 1)[None],
        v.repeat_interleave(group, 1).transpose(0, 1)[None],
        attn_mask=torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(
            k.shape[0] - q.shape[0]
        ),
    )[0].transpose(0, 1)


def evaluate_layer(
    layer: LayerQKV,
    cfg: OscarConfig | None,
    queries: int,
    exact: tuple[torch.Tensor, torch.Tensor],
) -> tuple[float, float, float, float, float]:
    """Errors of one method on one layer against ``exact`` = (logits, attention output)."""
    q, k, v = layer["q"][-queries:], layer["k"], layer["v"]
    exact_logits, exact_out = exact
    if cfg is None:
        k_hat, v_hat = k.bfloat16().float(), v.bfloat16().float()
        out = exact_attention(q.bfloat16().float(), k_hat, v_hat)
        bpt = float(native.bf16_bytes_per_token(k.shape[1], k.shape[2]))
    else:
        qkv = quantize_kv(k, v, cfg)
        k_hat, v_hat = dequantize_kv(qkv)
        out = attention(q, qkv, causal=True)
        bpt = qkv.page_nbytes / qkv.config.block
    return (
        rel(k_hat, k),
        rel(v_hat, v),
        rel(causal_logits(q, k_hat), exact_logits),
        rel(out, exact_out),
        bpt,
    )


def run_methods(
    source: str,
    layers: list[LayerQKV],
    methods: dict[str, OscarConfig | None],
    queries: int,
) -> list[Row]:
    rows = []
    with tqdm(total=len(methods) * len(layers), desc=f"fidelity[{source}]", unit="layer") as bar:
        for i, layer in enumerate(layers):
            q = layer["q"][-queries:]
            exact = (causal_logits(q, layer["k"]), exact_attention(q, layer["k"], layer["v"]))
            for label, cfg in methods.items():
                errs = evaluate_layer(layer, cfg, queries, exact)
                rows.append(
                    Row(
                        source=source,
                        method=label,
                        family=BF16 if cfg is None else cfg.method,
                        bits=16 if cfg is None else cfg.bits,
                        k_group=0 if cfg is None else cfg.k_group,
                        norm="-" if cfg is None else cfg.norm,
                        layer=i,
                        k_err=errs[0],
                        v_err=errs[1],
                        logit_err=errs[2],
                        out_err=errs[3],
                        bytes_per_token=errs[4],
                    )
                )
                bar.update()
    return rows


def summarize(rows: Iterable[Row]) -> list[dict[str, object]]:
    """Mean over layers per (source, method)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.source, r.method), []).append(r)
    out = []
    for (source, method), rs in groups.items():
        n = len(rs)
        out.append(
            {
                "source": source,
                "method": method,
                "bits": rs[0].bits,
                "bytes_per_token": rs[0].bytes_per_token,
                "k_err": sum(r.k_err for r in rs) / n,
                "v_err": sum(r.v_err for r in rs) / n,
                "logit_err": sum(r.logit_err for r in rs) / n,
                "out_err": sum(r.out_err for r in rs) / n,
                "worst_layer_out_err": max(r.out_err for r in rs),
            }
        )
    return out


def markdown_table(summary: list[dict[str, object]]) -> str:
    cols = ["source", "method", "bytes_per_token", "k_err", "v_err", "logit_err", "out_err",
            "worst_layer_out_err"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        cells = [f"{s[c]:.4f}" if isinstance(s[c], float) else str(s[c]) for c in cols]
        cells[2] = f"{s['bytes_per_token']:.1f}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage_views(k: torch.Tensor) -> dict[str, torch.Tensor]:
    """K [T, H, D] at each stage: original, scaling only, rotation only, OScaR (rotate+scale)."""

    def scale(x: torch.Tensor) -> torch.Tensor:
        n = x.square().sum(dim=(1, 2), keepdim=True).sqrt()
        return x / n.clamp_min(1e-30)

    rot = fwht(k)
    return {"original": k, "scaling only": scale(k), "rotation only": rot, "OScaR": scale(rot)}


def write_plots(rows: list[Row], layers: dict[str, list[LayerQKV]], out_dir: Path) -> list[Path]:
    plt = pyplot()

    paths = []
    for source, src_layers in layers.items():
        k = src_layers[len(src_layers) // 2]["k"]
        views = stage_views(k)
        fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
        for j, (name, x) in enumerate(views.items()):
            head_norms = x.norm(dim=2).flatten()
            axes[0, j].hist(head_norms.numpy(), bins=80, color="tab:blue")
            axes[0, j].set_title(f"{name}: per-(token, head) L2 norm")
            chan_absmax = x.abs().amax(dim=0).flatten()  # per (head, channel) over tokens
            chan_rms = x.square().mean(dim=0).sqrt().flatten()
            axes[1, j].plot(sorted(chan_absmax.tolist(), reverse=True), label="max |k| over tokens")
            axes[1, j].plot(sorted(chan_rms.tolist(), reverse=True), label="rms over tokens")
            axes[1, j].set_yscale("log")
            axes[1, j].set_title(f"{name}: channel magnitude (sorted)")
            axes[1, j].legend(fontsize=7)
        fig.suptitle(f"Key distributions by stage ({source}, layer {len(src_layers) // 2})")
        fig.tight_layout()
        path = out_dir / f"norms_{source}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

        fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
        src_rows = [r for r in rows if r.source == source and r.bits == 2 and r.k_group == 32]
        for method in dict.fromkeys(r.method for r in src_rows):
            rs = [r for r in src_rows if r.method == method]
            axes[0].plot([r.layer for r in rs], [r.logit_err for r in rs], marker=".", label=method)
            axes[1].plot([r.layer for r in rs], [r.out_err for r in rs], marker=".", label=method)
        for ax, what in zip(axes, ("attention logits", "attention output"), strict=True):
            ax.set_xlabel("layer")
            ax.set_ylabel(f"relative error of {what}")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.suptitle(f"Error by layer, 2-bit, k_group 32 ({source})")
        fig.tight_layout()
        path = out_dir / f"error_by_layer_{source}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(1, len(layers), figsize=(7 * len(layers), 5), squeeze=False)
    for ax, source in zip(axes[0], layers, strict=True):
        summary = [s for s in summarize(rows) if s["source"] == source and s["method"] != BF16]
        families = ("kivi", "rotation-only", "direct-scaling", "oscar")
        for fam, marker in zip(families, "os^D", strict=True):
            pts = [s for s in summary if str(s["method"]).startswith(fam)]
            ax.scatter(
                [s["bytes_per_token"] for s in pts],
                [s["out_err"] for s in pts],
                marker=marker,
                label=fam,
            )
            for s in pts:
                ax.annotate(str(s["method"]).removeprefix(fam + "-"), (s["bytes_per_token"],
                            s["out_err"]), fontsize=6)  # fmt: skip
        ax.set_xlabel("bytes per token per layer")
        ax.set_ylabel("mean relative error of attention output")
        ax.set_yscale("log")
        ax.set_title(source)
        ax.legend()
    fig.suptitle("Error vs bytes per token")
    fig.tight_layout()
    path = out_dir / "error_vs_bytes.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
    return paths


def run(
    out_dir: Path, tokens: int = 2048, queries: int = 256, synthetic_only: bool = False
) -> list[dict[str, object]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = method_configs()
    sources = {"synthetic": synthetic_layers(tokens=tokens)}
    if not synthetic_only:
        sources["smollm2"] = real_layers(tokens)
    rows: list[Row] = []
    for source, src_layers in sources.items():
        rows += run_methods(source, src_layers, methods, queries)
    with open(out_dir / "fidelity.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    summary = summarize(rows)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    table = markdown_table(summary)
    header = (
        f"# Fidelity ({tokens} tokens, last {queries} positions as queries, all pages "
        "quantized)\n\nMean relative error over layers; bytes per token per layer.\n\n"
    )
    (out_dir / "fidelity.md").write_text(header + table)
    write_plots(rows, sources, out_dir)
    print(table)
    print(f"wrote {out_dir}/fidelity.md, fidelity.csv, summary.csv and PNG plots")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oscar_kv fidelity", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benches/results/fidelity"))
    parser.add_argument("--tokens", type=int, default=2048, help="sequence length (>= 256)")
    parser.add_argument("--queries", type=int, default=256, help="query positions scored")
    parser.add_argument("--synthetic-only", action="store_true", help="skip the SmolLM2 capture")
    args = parser.parse_args(argv)
    if args.tokens < 256:
        parser.error(f"--tokens must be >= 256, got {args.tokens}")
    if not 1 <= args.queries <= args.tokens:
        parser.error(f"--queries must be in 1..--tokens, got {args.queries}")
    run(args.out, args.tokens, args.queries, args.synthetic_only)
    return 0
