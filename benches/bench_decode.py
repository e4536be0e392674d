"""Decode-attention benchmark: packed 2-bit OScaR (CUDA, Triton) and KIVI vs bf16 baselines.

One attention layer, Qwen3-8B / Llama-3.1-8B shape (32 q heads, 8 KV heads, head_dim 128:
the two models share it), contexts 1K..128K, batch 1..64 where memory allows. For every
(batch, context) all implementations run side by side on the same device:

  oscar-cuda, oscar-triton       packed pages (rotation + token norm), this repository
  kivi-2bit-cuda, kivi-2bit-triton  the same kernels with norm and rotation off
  bf16-flashinfer                 FlashInfer paged decode (when importable)
  bf16-sdpa                       torch SDPA over the dense bf16 cache
  bf16-triton                     our bf16 split-KV paged decode (same structure as ours)

Per call: median ms (one CUDA-graph replay per call, L2 flushed before each by triton.testing),
bytes read (packed pages + bf16 tail; or bf16 K/V), achieved GB/s and its fraction of the
device-to-device copy bandwidth measured in the same run. The quantize path (one page per
request, all heads) is timed too and reported as a fraction of one decode step.

    python benches/bench_decode.py                 # GPU: writes benches/results/decode.*
    python benches/bench_decode.py --smoke --out /tmp/x   # CPU: tiny shapes, interpreter

Without a GPU it refuses to write results (only --smoke runs, into --out, labelled so).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from oscar_kv import OscarConfig, ops
from oscar_kv.layout import PageLayout
from oscar_kv.paged import PagedKV

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["device", "commit", "impl", "batch", "context", "ms", "gb_per_s", "frac_peak"]
PAGE = 128


@dataclass
class Shape:
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], device: torch.device, graphs: bool = True) -> float:
    """Median ms per call with L2 flushed before every call.

    GPU: ``fn`` is captured once into a CUDA graph (so host-side dispatch is not timed) and
    the graph's replay is timed by ``triton.testing.do_bench``, which zeroes a buffer larger
    than L2 before each call and times each call with its own CUDA events.
    (``do_bench_cudagraph`` replays many calls back to back with L2 warm: not used.)"""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    call = fn
    if graphs:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            call = graph.replay
        except Exception as e:  # noqa: BLE001 (fall back to stream timing, and say so)
            print(f"  (no CUDA graph: {type(e).__name__}: {e}; timing on the stream)")
    return float(tt.do_bench(call, warmup=10, rep=100, return_mode="median"))


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, graphs=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- setup


@dataclass
class Case:
    batch: int
    context: int
    n_pages: int  # full pages per request
    tail: int  # tail tokens per request


def make_case(batch: int, context: int) -> Case:
    # Whole pages plus context % 128 tail tokens: at the power-of-two contexts of the sweep
    # the tail is empty (the decode token ends the last page). A mid-page decode would add
    # ~64 bf16 tokens per request: 2-3% of the bytes at 4K, 0.1% at 128K.
    return Case(batch, context, context // PAGE, context % PAGE)


def packed_inputs(cfg: OscarConfig, shape: Shape, case: Case, device: torch.device):
    """A pool of realistic pages (a few quantized blocks tiled), page table, tails."""
    layout = PageLayout.of(cfg, shape.kv_heads, shape.head_dim)
    n_total = max(1, case.batch * case.n_pages)
    pool = layout.alloc_pool(n_total, device)
    seed_pages = min(16, n_total)
    k = torch.randn(seed_pages, PAGE, shape.kv_heads, shape.head_dim, device=device)
    v = torch.randn_like(k)
    k[..., 5] *= 20.0  # an outlier channel, as real keys have
    ids = torch.arange(seed_pages, device=device)
    ops.quantize_page(k.bfloat16(), v.bfloat16(), pool, ids, cfg)
    reps = -(-n_total // seed_pages)
    pool.copy_(pool[:seed_pages].repeat(reps, 1)[:n_total])
    page_table = torch.arange(n_total, dtype=torch.int32, device=device).view(case.batch, -1)
    if case.n_pages == 0:
        page_table = torch.zeros(case.batch, 1, dtype=torch.int32, device=device)
    tails = torch.randn(
        2, case.batch, PAGE, shape.kv_heads, shape.head_dim, device=device
    ).bfloat16()
    i32 = {"dtype": torch.int32, "device": device}
    kv = PagedKV.single_layer(
        layout, pool, tails[0], tails[1], page_table,
        torch.full((case.batch,), case.n_pages, **i32), torch.full((case.batch,), case.tail, **i32),
    )  # fmt: skip
    return {"layout": layout, "kv": kv}


def packed_bytes(layout: PageLayout, case: Case) -> int:
    per_req = case.n_pages * layout.page_bytes + case.tail * 4 * layout.kv_heads * layout.head_dim
    return case.batch * per_req


def packed_impls(cfg: OscarConfig, name: str, shape: Shape, case: Case, device: torch.device,
                 q: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:  # fmt: skip
    inp = packed_inputs(cfg, shape, case, device)
    layout = inp["layout"]
    nbytes = packed_bytes(layout, case)
    scale = shape.head_dim**-0.5
    kv = inp["kv"]
    out: dict[str, tuple[Callable[[], object], int]] = {}
    if device.type == "cuda" and ops._cuda_ops() is not None:
        cuda = ops._cuda_ops()

        def run_cuda():
            return cuda.decode_attention(q, kv, 0, scale, 0)

        out[f"{name}-cuda"] = (run_cuda, nbytes)
    from oscar_kv import triton as tri

    def run_triton():
        return tri.decode_attention(q, kv, 0, scale)

    out[f"{name}-triton"] = (run_triton, nbytes)
    return out


def bf16_impls(shape: Shape, case: Case, device: torch.device, q: torch.Tensor):
    """bf16 paged cache [pages, 128, H, D] (requests' pages contiguous, so the same storage
    is the dense [B, T, H, D] cache SDPA reads)."""
    pages_per_req = -(-case.context // PAGE)
    n = case.batch * pages_per_req
    k_cache = torch.randn(n, PAGE, shape.kv_heads, shape.head_dim, device=device).bfloat16()
    v_cache = torch.randn_like(k_cache)
    page_table = torch.arange(n, dtype=torch.int32, device=device).view(case.batch, -1)
    seq_lens = torch.full((case.batch,), case.context, dtype=torch.int32, device=device)
    nbytes = case.batch * case.context * 4 * shape.kv_heads * shape.head_dim
    out = {}
    from oscar_kv import triton as tri

    out["bf16-triton"] = (
        lambda: tri.bf16_decode_attention(q, k_cache, v_cache, page_table, seq_lens),
        nbytes,
    )
    t_pad = pages_per_req * PAGE
    dense_k = k_cache.view(case.batch, t_pad, shape.kv_heads, shape.head_dim)[:, : case.context]
    dense_v = v_cache.view(case.batch, t_pad, shape.kv_heads, shape.head_dim)[:, : case.context]
    qs = q.view(case.batch, shape.q_heads, 1, shape.head_dim)
    kt, vt = dense_k.transpose(1, 2), dense_v.transpose(1, 2)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qs, kt, vt, enable_gqa=True)

    out["bf16-sdpa"] = (sdpa, nbytes)
    fi = flashinfer_impl(shape, case, device, q, k_cache, v_cache, pages_per_req)
    if fi is not None:
        out["bf16-flashinfer"] = (fi, nbytes)
    return out


def flashinfer_impl(shape, case, device, q, k_cache, v_cache, pages_per_req):
    if device.type != "cuda":
        return None
    try:
        import flashinfer
    except ImportError:
        return None
    try:
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        # Tensor cores pay from GQA 4 (FlashInfer's own advice); the fastest bf16 decode is
        # the baseline to beat.
        group = shape.q_heads // shape.kv_heads
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "NHD", use_tensor_cores=group >= 4
        )
        i32 = {"dtype": torch.int32, "device": device}
        indptr = torch.arange(case.batch + 1, **i32) * pages_per_req
        indices = torch.arange(case.batch * pages_per_req, **i32)
        last = case.context - (pages_per_req - 1) * PAGE
        last_len = torch.full((case.batch,), last, **i32)
        wrapper.plan(indptr, indices, last_len, shape.q_heads, shape.kv_heads, shape.head_dim,
                     PAGE, data_type=torch.bfloat16, q_data_type=torch.bfloat16)  # fmt: skip
        return lambda: wrapper.run(q, (k_cache, v_cache))
    except Exception as e:  # noqa: BLE001 (a baseline that cannot run is reported, not fatal)
        print(f"  flashinfer unavailable: {type(e).__name__}: {e}")
        return None


def quantize_ms(cfg: OscarConfig, shape: Shape, batch: int, device: torch.device,
                backend: str) -> float:  # fmt: skip
    """One completed page per request (all heads) quantized into the pool."""
    layout = PageLayout.of(cfg, shape.kv_heads, shape.head_dim)
    pool = layout.alloc_pool(batch, device)
    kv = torch.randn(2, batch, PAGE, shape.kv_heads, shape.head_dim, device=device).bfloat16()
    ids = torch.arange(batch, device=device)
    return time_ms(lambda: ops.quantize_page(kv[0], kv[1], pool, ids, cfg, backend=backend),
                   device)  # fmt: skip


# ----------------------------------------------------------------------------- run


def fits(shape: Shape, batch: int, context: int, device: torch.device, frac: float) -> bool:
    if device.type != "cuda":
        return True
    tokens = batch * context
    need = tokens * (4 * shape.kv_heads * shape.head_dim) * 1.05  # bf16 cache (+ padding)
    need += 2 * tokens * 6.1 * shape.kv_heads * shape.head_dim / 8  # two packed pools
    free, _ = torch.cuda.mem_get_info(device)
    return need < frac * free


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = Shape(*args.shape) if args.shape else Shape()
    if args.smoke:
        shape = Shape(4, 2, 64)
    dev_name = (
        "cpu (Triton interpreter; smoke run, not a measurement)"
        if args.smoke
        else torch.cuda.get_device_name(device)
    )
    commit = git_commit()
    peak = copy_bandwidth_gbs(device, 64 << 20 if args.smoke else 2 << 30)
    print(f"device: {dev_name}; copy bandwidth {peak:.0f} GB/s; commit {commit}")
    rows: list[dict] = []
    configs = {"oscar": OscarConfig(), "kivi-2bit": OscarConfig.kivi()}
    for batch in args.batch:
        for context in args.context:
            if not fits(shape, batch, context, device, args.mem_frac):
                print(f"batch {batch} context {context}: skipped (memory)")
                continue
            case = make_case(batch, context)
            gen = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(batch, shape.q_heads, shape.head_dim, device=device, generator=gen)
            q = q.bfloat16()
            impls = {}
            for name, cfg in configs.items():
                impls.update(packed_impls(cfg, name, shape, case, device, q))
            impls.update(bf16_impls(shape, case, device, q))
            for impl, (fn, nbytes) in impls.items():
                try:
                    ms = time_ms(fn, device)
                except Exception as e:  # noqa: BLE001 (one failing impl must not end the run)
                    print(f"  {impl}: failed: {type(e).__name__}: {e}")
                    continue
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"device": dev_name, "commit": commit, "impl": impl, "batch": batch,
                             "context": context, "ms": round(ms, 5), "gb_per_s": round(gbs, 1),
                             "frac_peak": round(gbs / peak, 3), "bytes": nbytes})  # fmt: skip
                print(f"  B={batch:3d} ctx={context:7d} {impl:18s} {ms:9.4f} ms "
                      f"{nbytes / 1e6:10.1f} MB {gbs:8.1f} GB/s ({gbs / peak:.0%})")  # fmt: skip
            del impls
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for backend in ("cuda", "triton") if device.type == "cuda" else ("triton",):
        if backend == "cuda" and ops._cuda_ops() is None:
            continue
        for batch in args.batch:
            ms = quantize_ms(OscarConfig(), shape, batch, device, backend)
            rows.append({"device": dev_name, "commit": commit,
                         "impl": f"oscar-{backend}-quantize", "batch": batch, "context": PAGE,
                         "ms": round(ms, 5), "gb_per_s": 0.0, "frac_peak": 0.0, "bytes": 0})  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> str:
    """Markdown: speedup of each packed impl over the best bf16 baseline, quantize cost."""
    dec = [r for r in rows if not r["impl"].endswith("-quantize")]
    keys = sorted({(r["batch"], r["context"]) for r in dec})
    impls = sorted({r["impl"] for r in dec if not r["impl"].startswith("bf16")})
    lines = ["| batch | context | best bf16 (ms) | " + " | ".join(impls) + " |",
             "|---|---|---|" + "---|" * len(impls)]  # fmt: skip
    for b, c in keys:
        here = {r["impl"]: r for r in dec if (r["batch"], r["context"]) == (b, c)}
        bf = [r["ms"] for i, r in here.items() if i.startswith("bf16")]
        if not bf:
            continue
        best = min(bf)
        cells = []
        for i in impls:
            r = here.get(i)
            cells.append(f"{best / r['ms']:.2f}x ({r['frac_peak']:.0%} bw)" if r else "-")
        lines.append(f"| {b} | {c} | {best:.4f} | " + " | ".join(cells) + " |")
    quant = [r for r in rows if r["impl"].endswith("-quantize")]
    if quant:
        head = (
            "| quantize | batch | ms | vs the largest-context decode step of that batch "
            "(every request completes a page / amortized over 128 steps) |"
        )
        lines += ["", head, "|---|---|---|---|"]
        for r in quant:
            impl = r["impl"].removesuffix("-quantize")
            step = [d["ms"] for d in dec if d["impl"] == impl and d["batch"] == r["batch"]]
            step_ms = step[-1] if step else math.nan
            frac = r["ms"] / step_ms
            lines.append(f"| {impl} | {r['batch']} | {r['ms']:.4f} | {frac:.1%} / "
                         f"{frac / PAGE:.2%} |")  # fmt: skip
    return "\n".join(lines)


def write_results(out: Path, name: str, rows: list[dict], columns: list[str], summary: str,
                  plot_fn: Callable[[list[dict], Path], None]) -> None:  # fmt: skip
    """``<name>.csv`` (these columns), ``<name>_summary.md`` and ``<name>.png`` under out."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / f"{name}_summary.md").write_text(summary + "\n")
    plot_fn(rows, out / f"{name}.png")
    print(f"wrote {out / name}.csv, {name}_summary.md, {name}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in rows if not r["impl"].endswith("-quantize")]
    batches = sorted({r["batch"] for r in dec})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for impl in sorted({r["impl"] for r in dec}):
            pts = sorted(
                (r["context"], r["ms"]) for r in dec if r["batch"] == b and r["impl"] == impl
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl,
                        linestyle="--" if impl.startswith("bf16") else "-")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode call (one layer)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(rows[0]["device"] if rows else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gpu_or_smoke(args: argparse.Namespace) -> bool:
    """Whether a GPU benchmark may run: on a GPU, or as a --smoke run on CPU (Triton
    interpreter, batch <= 2, never into benches/results). Says why not on stderr."""
    if args.smoke:
        if args.out.resolve() == RESULTS.resolve():
            print("--smoke never writes into benches/results; pass --out", file=sys.stderr)
            return False
        os.environ.setdefault("OSCAR_KV_BACKEND", "triton")
        args.batch = [b for b in args.batch if b <= 2] or [1]
        return True
    if not torch.cuda.is_available():
        print("no CUDA device: refusing to write GPU numbers (use --smoke for a CPU check)",
              file=sys.stderr)  # fmt: skip
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, nargs="+",
                    default=[1024, 4096, 16384, 32768, 65536, 131072])  # fmt: skip
    ap.add_argument("--shape", type=int, nargs=3, metavar=("QH", "KVH", "D"))
    ap.add_argument("--mem-frac", type=float, default=0.8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter")
    args = ap.parse_args(argv)
    if not gpu_or_smoke(args):
        return 2
    if args.smoke:
        args.context = [c for c in args.context if c <= 300] or [200]
    rows = run(args)
    print(summarize(rows))
    write_results(args.out, "decode", rows, COLUMNS, summarize(rows), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
