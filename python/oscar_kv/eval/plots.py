"""The model-level eval's PNGs: passkey heatmaps, perplexity vs context, the Pareto plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oscar_kv.eval import pyplot
from oscar_kv.eval.methods import DEFAULT_LONG

if TYPE_CHECKING:
    from oscar_kv.eval.passkey import NeedleTrial


def plot_needle(path: Path, trials: list[NeedleTrial], label: str, accuracy: float) -> None:
    plt = pyplot()

    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    grid = torch.zeros(len(depths), len(lengths))
    count = torch.zeros_like(grid)
    for t in trials:
        i, j = depths.index(t.depth), lengths.index(t.length)
        grid[i, j] += t.correct(label)
        count[i, j] += 1
    grid = grid / count.clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.5 * len(depths)))
    ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{label}: passkey accuracy {accuracy:.0%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_contexts(path: Path, table: list[dict[str, Any]]) -> None:
    """Perplexity increase over bf16 vs context for the paper's methods (prefixes of one
    document)."""
    plt = pyplot()

    bf16 = {t["context"]: t["ppl"] for t in table if t["label"] == "bf16"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels = [x for x in dict.fromkeys(t["label"] for t in table if t["paper"]) if x != "bf16"]
    for lab in labels:
        pts = sorted(
            (t["context"], 100 * (t["ppl"] / bf16[t["context"]] - 1))
            for t in table
            if t["label"] == lab and t["context"] in bf16
        )
        style = "-" if lab in DEFAULT_LONG else ":"
        ax.plot([c for c, _ in pts], [p for _, p in pts], style, marker="o", ms=3,
                label=short_label(lab))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("context (tokens; perplexity of the first N tokens of one document)")
    ax.set_ylabel("perplexity increase over bf16 (%, symlog)")
    ax.set_title("SmolLM2-135M, pydoc prose: cost of the quantized cache vs context", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def short_label(label: str) -> str:
    """``oscar-2b-g32-token+sink4`` -> ``oscar-2+sink4``; g32/token defaults dropped."""
    for a, b in (("-2b", "-2"), ("-4b", "-4"), ("-g32", ""), ("-token", ""), ("-none", ""),
                 ("-g128", " g128"), ("-head", " head"), ("direct-scaling", "DS"),
                 ("rotation-only", "rot-only")):  # fmt: skip
        label = label.replace(a, b)
    return label


def plot_pareto(path: Path, table: list[dict[str, Any]], context: int) -> None:
    """Perplexity vs bytes per token at ``context`` (all methods, and a zoom on 2-4 bits), with
    the Pareto front."""
    plt = pyplot()

    pts = [t for t in table if t["context"] == context and t["family"] != "analysis"]
    if not pts:
        return
    colors = {"bf16": "black", "kivi": "tab:red", "rotation-only": "tab:orange",
              "direct-scaling": "tab:purple", "oscar": "tab:blue", "quanto": "tab:gray"}  # fmt: skip
    pts = sorted(pts, key=lambda x: (x["bytes_per_token"], x["ppl"]))
    front, best = [], float("inf")
    for t in pts:
        if t["ppl"] < best:
            front.append(t)
            best = t["ppl"]
    bf16 = next((t["ppl"] for t in pts if t["family"] == "bf16"), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.4]})
    for zoom, ax in enumerate(axes):
        shown = pts
        if zoom:
            lo, hi = 120, 260
            top = (bf16 or min(t["ppl"] for t in pts)) * 1.22
            shown = [t for t in pts if lo <= t["bytes_per_token"] <= hi and t["ppl"] <= top]
        for n, t in enumerate(shown):
            marker = "o" if t["paper"] else ("s" if t["family"] == "quanto" else "*")
            ax.scatter(t["bytes_per_token"], t["ppl"], color=colors.get(t["family"], "green"),
                       marker=marker, s=70 if marker == "*" else 30, zorder=3)  # fmt: skip
            if zoom or t["paper"] or t["family"] == "quanto":
                dy = (4, -10)[n % 2] if zoom else 3
                ax.annotate(short_label(t["label"]), (t["bytes_per_token"], t["ppl"]),
                            fontsize=7, xytext=(4, dy), textcoords="offset points")  # fmt: skip
        fx = [t for t in front if t in shown]
        ax.plot([t["bytes_per_token"] for t in fx], [t["ppl"] for t in fx], "k--", lw=0.8,
                zorder=2, label="Pareto front")  # fmt: skip
        if bf16:
            ax.axhline(bf16, color="black", lw=0.5, ls=":", label="bf16")
        if zoom:
            above = [t for t in pts if lo <= t["bytes_per_token"] <= hi and t["ppl"] > top]
            for k, t in enumerate(above):  # off the zoom: listed under the top edge
                ax.annotate(f"\u2191 {short_label(t['label'])} ({t['bytes_per_token']:.0f} B): "
                            f"{t['ppl']:.1f}", (lo, top), xytext=(6, -12 - 11 * k),
                            textcoords="offset points", fontsize=7,
                            color=colors.get(t["family"], "green"))  # fmt: skip
            ax.set_ylim(top=top)
            ax.set_xlim(lo, hi)
            ax.set_title("zoom: 2-4 bits (stars: beyond the paper)", fontsize=9)
            ax.set_xlabel("KV bytes per token per layer")
        else:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title("all methods (log-log)", fontsize=9)
            ax.set_xlabel("KV bytes per token per layer (log)")
        ax.set_ylabel(f"perplexity of the first {context} tokens")
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M on pydoc prose, {context}-token context: quality vs KV bytes",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def common_context(table: list[dict[str, Any]]) -> int:
    """The longest context every method of ``table`` ran."""
    labels = {t["label"] for t in table}
    return min(max(t["context"] for t in table if t["label"] == x) for x in labels)


def draw_ppl_plots(out: Path, table: list[dict[str, Any]]) -> None:
    """pareto.png at the longest context every method ran, and ppl_vs_context.png."""
    plot_pareto(out / "pareto.png", table, common_context(table))
    plot_contexts(out / "ppl_vs_context.png", table)
