"""CPU decode-attention benchmark: the fused C++ kernel vs the batched torch ops vs SDPA.

One attention layer on this machine's CPU, side by side in one run, for the shapes served on
CPU: SmolLM2-135M (9 q heads, 3 KV heads, head_dim 64) and a Qwen3-8B-like layer (32 / 8 /
128). Packed OScaR-2 pages through `oscar_kv.ops` with backend "cpu" (C++, fused) and
"torch" (batched torch: dequantize, then attend), against torch SDPA over a dense fp32 and a
dense bf16 cache (what a bf16 KV cache costs on this CPU). Per call: median ms over repeats,
bytes of KV read, GB/s, and speedups over the fastest SDPA.

    python benches/bench_decode_cpu.py [--threads N]   # writes benches/results/decode_cpu.*
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import PAGE, RESULTS, git_commit, write_results

from oscar_kv import OscarConfig, ops
from oscar_kv.layout import PageLayout
from oscar_kv.paged import PagedKV

COLUMNS = ["device", "commit", "threads", "shape", "impl", "batch", "context", "ms", "mb_read",
           "gb_per_s"]  # fmt: skip
SHAPES = {"smollm2": (9, 3, 64), "qwen3-8b": (32, 8, 128)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def packed(cfg: OscarConfig, hkv: int, d: int, batch: int, context: int):
    """Pages of real quantized blocks (a few tiled) + an empty tail, like bench_decode."""
    layout = PageLayout.of(cfg, hkv, d)
    n_pages = context // PAGE
    pool = layout.alloc_pool(max(1, batch * n_pages))
    seed = min(8, pool.shape[0])
    k = torch.randn(seed, PAGE, hkv, d)
    k[..., 5] *= 20.0
    ops.quantize_page(k.bfloat16(), torch.randn_like(k).bfloat16(), pool, torch.arange(seed), cfg,
                      backend="torch")  # fmt: skip
    pool.copy_(pool[:seed].repeat(-(-pool.shape[0] // seed), 1)[: pool.shape[0]])
    i32 = {"dtype": torch.int32}
    pt = (
        torch.arange(pool.shape[0], **i32).view(batch, -1)
        if n_pages
        else torch.zeros(batch, 1, **i32)
    )
    tail = torch.zeros(batch, PAGE, hkv, d)
    tail_len = torch.full((batch,), context % PAGE, **i32)
    nbytes = batch * n_pages * layout.page_bytes
    num_pages = torch.full((batch,), n_pages, **i32)
    return PagedKV.single_layer(layout, pool, tail, tail.clone(), pt, num_pages, tail_len), nbytes


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    dev, commit = cpu_name(), git_commit()
    print(f"device: {dev}; {args.threads} thread(s); commit {commit}")
    cfg = OscarConfig()
    rows = []
    for shape in args.shape:
        hq, hkv, d = SHAPES[shape]
        for batch in args.batch:
            for context in args.context:
                q = torch.randn(batch, hq, d)
                cache, nbytes = packed(cfg, hkv, d, batch, context)
                impls = {}
                for backend in ("cpu", "torch"):
                    impls[f"oscar-{backend}"] = (
                        lambda b=backend, q=q, c=cache: ops.decode_attention(q, c, backend=b),
                        nbytes,
                    )
                k = torch.randn(batch, hkv, context, d)
                v = torch.randn_like(k)
                for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                    kk, vv, qq = k.to(dt), v.to(dt), q.to(dt).view(batch, hq, 1, d)
                    impls[f"{name}-sdpa"] = (
                        lambda kk=kk, vv=vv, qq=qq: torch.nn.functional.scaled_dot_product_attention(
                            qq, kk, vv, enable_gqa=True),
                        kk.numel() * kk.element_size() * 2,
                    )  # fmt: skip
                for impl, (fn, nb) in impls.items():
                    ms = median_ms(fn, args.reps)
                    rows.append({"device": dev, "commit": commit, "threads": args.threads,
                                 "shape": shape, "impl": impl, "batch": batch,
                                 "context": context, "ms": round(ms, 4),
                                 "mb_read": round(nb / 1e6, 2),
                                 "gb_per_s": round(nb / (ms * 1e-3) / 1e9, 2)})  # fmt: skip
                    print(f"  {shape:8s} B={batch:2d} ctx={context:6d} {impl:12s} {ms:9.3f} ms "
                          f"{nb / 1e6:8.2f} MB")  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> str:
    keys = sorted({(r["shape"], r["batch"], r["context"]) for r in rows})
    lines = [("| shape | batch | context | oscar-cpu (ms) | oscar-torch (ms) | fp32-sdpa (ms) | "
             "bf16-sdpa (ms) | oscar-cpu vs best sdpa | oscar-cpu vs oscar-torch |"),
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in keys:
        h = {r["impl"]: r["ms"] for r in rows if (r["shape"], r["batch"], r["context"]) == key}
        best = min(h["fp32-sdpa"], h["bf16-sdpa"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {h['oscar-cpu']:.3f} | "
                     f"{h['oscar-torch']:.3f} | {h['fp32-sdpa']:.3f} | {h['bf16-sdpa']:.3f} | "
                     f"{best / h['oscar-cpu']:.2f}x | {h['oscar-torch'] / h['oscar-cpu']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["shape"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (shape, b) in zip(axes[0], panels, strict=True):
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["context"], r["ms"]) for r in rows
                         if r["shape"] == shape and r["batch"] == b and r["impl"] == impl)  # fmt: skip
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl,
                    linestyle="--" if "sdpa" in impl else "-")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape}, batch {b}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode call (one layer)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = run(args)
    summary = summarize(rows)
    print(summary)
    write_results(args.out, "decode_cpu", rows, COLUMNS, summary, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
