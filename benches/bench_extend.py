"""Extend-attention benchmark: the fused Triton kernel vs dequantize-to-workspace + SDPA.

A chunk of new tokens per request attends to a cached prefix (packed 2-bit OScaR pages) and
causally to itself: the multi-turn / chunked-prefill case. One attention layer, Qwen3-8B /
Llama-3.1-8B shape (32 q heads, 8 KV heads, head_dim 128). Side by side on one device:

  oscar-triton-fused       `oscar_kv.triton.extend` (pages dequantized in registers)
  oscar-cuda-workspace     CUDA dequantize of the prefix into fp32, then torch SDPA
  oscar-triton-workspace   Triton dequantize of the prefix, then torch SDPA
  bf16-sdpa                torch SDPA over the bf16 prefix + chunk (what bf16 serving reads)
  bf16-flashinfer          FlashInfer paged prefill with causal offset (when importable)

Per call: median ms, prefix bytes read once (packed pages, or bf16 K/V), and the speedup
of the fused kernel over the workspace route (the issue's bar: the fused version must beat
it).

    python benches/bench_extend.py                  # GPU: writes benches/results/extend.*
    python benches/bench_extend.py --smoke --out /tmp/x   # CPU: tiny shapes, interpreter
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (
    PAGE,
    RESULTS,
    Case,
    Shape,
    git_commit,
    gpu_or_smoke,
    packed_bytes,
    packed_inputs,
    time_ms,
    write_results,
)

from oscar_kv import OscarConfig, ops

COLUMNS = ["device", "commit", "impl", "batch", "context", "new_tokens", "ms", "prefix_mb"]


def oscar_impls(shape: Shape, case: Case, new: int, device: torch.device,
                q: torch.Tensor, kv_new: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:  # fmt: skip
    cfg = OscarConfig()
    inp = packed_inputs(cfg, shape, case, device)
    layout = inp["layout"]
    nbytes = packed_bytes(layout, case)
    cu = torch.arange(case.batch + 1, dtype=torch.int32, device=device) * new
    scale = shape.head_dim**-0.5
    kv = inp["kv"]
    # The fused kernel's work list, planned once from the host-known chunk lengths (as the
    # serving path does once per forward): no device-to-host read of cu_seqlens per call.
    planned = ops.plan_extend(kv, [new] * case.batch, q.shape[1])
    from oscar_kv import triton as tri

    def fused():
        return tri.extend_attention(q, kv_new[0], kv_new[1], cu, planned, 0, scale)

    def workspace(which: str) -> Callable[[], object]:
        return lambda: ops._extend_via_workspace(which, q, kv_new[0], kv_new[1], cu, kv, scale)

    out = {
        "oscar-triton-fused": (fused, nbytes),
        "oscar-triton-workspace": (workspace("triton"), nbytes),
    }
    if device.type == "cuda" and ops._cuda_ops() is not None:
        out["oscar-cuda-workspace"] = (workspace("cuda"), nbytes)
    return out


def bf16_impls(shape: Shape, case: Case, new: int, device: torch.device,
               q: torch.Tensor, kv_new: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:  # fmt: skip
    b, t = case.batch, case.context + new
    k = torch.randn(b, shape.kv_heads, t, shape.head_dim, device=device).bfloat16()
    v = torch.randn_like(k)
    qs = q.view(b, new, shape.q_heads, shape.head_dim).transpose(1, 2)
    mask = (
        torch.arange(t, device=device)[None, :]
        <= torch.arange(case.context, t, device=device)[:, None]
    )
    nbytes = b * case.context * 4 * shape.kv_heads * shape.head_dim

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=mask,
                                                                enable_gqa=True)  # fmt: skip

    out = {"bf16-sdpa": (sdpa, nbytes)}
    fi = flashinfer_prefill(shape, case, new, device, q)
    if fi is not None:
        out["bf16-flashinfer"] = (fi, nbytes)
    return out


def flashinfer_prefill(shape: Shape, case: Case, new: int, device: torch.device,
                       q: torch.Tensor) -> Callable[[], object] | None:  # fmt: skip
    if device.type != "cuda":
        return None
    try:
        import flashinfer
    except ImportError:
        return None
    try:
        t = case.context + new
        pages = -(-t // PAGE)
        i32 = {"dtype": torch.int32, "device": device}
        k_cache = torch.randn(case.batch * pages, PAGE, shape.kv_heads, shape.head_dim,
                              device=device).bfloat16()  # fmt: skip
        v_cache = torch.randn_like(k_cache)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        wrapper.plan(
            torch.arange(case.batch + 1, **i32) * new,
            torch.arange(case.batch + 1, **i32) * pages,
            torch.arange(case.batch * pages, **i32),
            torch.full((case.batch,), t - (pages - 1) * PAGE, **i32),
            shape.q_heads, shape.kv_heads, shape.head_dim, PAGE, causal=True,
            q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
        )  # fmt: skip
        return lambda: wrapper.run(q, (k_cache, v_cache))
    except Exception as e:  # noqa: BLE001 (a baseline that cannot run is reported, not fatal)
        print(f"  flashinfer unavailable: {type(e).__name__}: {e}")
        return None


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = Shape(4, 2, 64) if args.smoke else Shape()
    dev_name = (
        "cpu (Triton interpreter; smoke run, not a measurement)"
        if args.smoke
        else torch.cuda.get_device_name(device)
    )
    commit = git_commit()
    print(f"device: {dev_name}; commit {commit}")
    rows: list[dict] = []
    for batch in args.batch:
        for context in args.context:
            for new in args.new:
                case = Case(batch, context, context // PAGE, context % PAGE)
                gen = torch.Generator(device=device).manual_seed(0)
                n = batch * new
                q = torch.randn(n, shape.q_heads, shape.head_dim, device=device, generator=gen)
                kv = torch.randn(2, n, shape.kv_heads, shape.head_dim, device=device,
                                 generator=gen)  # fmt: skip
                q, kv = q.bfloat16(), kv.bfloat16()
                impls = oscar_impls(shape, case, new, device, q, kv)
                impls.update(bf16_impls(shape, case, new, device, q, kv))
                for impl, (fn, nbytes) in impls.items():
                    try:
                        ms = time_ms(fn, device, graphs=False)
                    except Exception as e:  # noqa: BLE001 (one failing impl must not end the run)
                        print(f"  {impl}: failed: {type(e).__name__}: {e}")
                        continue
                    rows.append({"device": dev_name, "commit": commit, "impl": impl,
                                 "batch": batch, "context": context, "new_tokens": new,
                                 "ms": round(ms, 5), "prefix_mb": round(nbytes / 1e6, 2)})  # fmt: skip
                    print(f"  B={batch:2d} ctx={context:6d} new={new:5d} {impl:24s} "
                          f"{ms:9.4f} ms")  # fmt: skip
                del impls
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> str:
    keys = sorted({(r["batch"], r["context"], r["new_tokens"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    lines = ["| batch | context | new | " + " | ".join(f"{i} (ms)" for i in impls)
             + " | fused vs best workspace |", "|---|---|---|" + "---|" * (len(impls) + 1)]  # fmt: skip
    for key in keys:
        here = {
            r["impl"]: r["ms"] for r in rows if (r["batch"], r["context"], r["new_tokens"]) == key
        }
        cells = [f"{here[i]:.4f}" if i in here else "-" for i in impls]
        ws = [ms for i, ms in here.items() if i.endswith("-workspace")]
        fused = here.get("oscar-triton-fused")
        ratio = f"{min(ws) / fused:.2f}x" if ws and fused else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    news = sorted({r["new_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(news), figsize=(4.5 * len(news), 4), squeeze=False)
    for ax, new in zip(axes[0], news, strict=True):
        for impl in sorted({r["impl"] for r in rows}):
            for b in sorted({r["batch"] for r in rows}):
                pts = sorted((r["context"], r["ms"]) for r in rows
                             if r["new_tokens"] == new and r["impl"] == impl and r["batch"] == b)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=f"{impl} B{b}",
                            linestyle="--" if impl.startswith("bf16") else "-")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{new} new tokens per request")
        ax.set_xlabel("cached prefix (tokens)")
        ax.set_ylabel("ms per extend call (one layer)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(rows[0]["device"] if rows else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--context", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--new", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter")
    args = ap.parse_args(argv)
    if not gpu_or_smoke(args):
        return 2
    if args.smoke:
        args.context = [c for c in args.context if c <= 300] or [200]
        args.new = [n for n in args.new if n <= 40] or [20]
    rows = run(args)
    print(summarize(rows))
    write_results(args.out, "extend", rows, COLUMNS, summarize(rows), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
