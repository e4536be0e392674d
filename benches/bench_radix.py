"""Prefix-cache benchmark: oscar-kv's Rust cache manager vs SGLang's RadixCache (Python) vs
SGLang's UnifiedRadixCache on its Rust tree core, on one multi-turn serving trace.

Trace (deterministic from --seed): --conversations conversations of 4-16 turns, each on one
of --system-prompts system prompts of 1-8K tokens (Zipf-popular), turns of 16-256 user and
32-512 assistant tokens, every turn's prompt being the whole conversation so far; 10% of the
conversations run under one of three LoRA namespaces (extra_key). Up to --active
conversations are open at once and their turns interleave. Then SGLang's
generated-shared-prefix shape (64 groups x 16 prompts, 2048-token system prompt, 128-token
question, 256 output tokens, shuffled). Requests run --batch at a time, like a running
batch: a request is admitted (match, lock, evict the shortfall, allocate its pages) and
finished when --batch newer ones are running (insert its whole pages, free duplicates and
the partial last page, unlock). The pool (--pool-pages pages of 128 tokens) is far smaller
than the trace, so eviction runs throughout.

Every implementation does the same bookkeeping through its Python-facing API, token ids
passed as array('q') buffers, and only those calls are timed:
- oscar: ``oscar_kv._native.PrefixCache`` (Rust tree + Rust page allocator) through its
  request-level calls ``admit`` / ``release``;
- oscar-fine (detail CSV only): the same cache through one call per step (match_prefix,
  lock, evict, alloc, insert, free, unlock), as the SGLang drivers below make them;
- sglang-python: ``RadixCache`` + SGLang's ``PagedTokenToKVPoolAllocator`` (CPU tensors);
- sglang-rust: ``UnifiedRadixCache`` with tree_core_backend="rust" + the same allocator;
- oscar-sglang-backend (detail CSV only): what a ``--kv-quant oscar`` server builds:
  ``oscar_kv.sglang.radix.OscarRadixCache`` over ``oscar_kv.sglang.allocator.OscarPageAllocator``
  (the Rust page allocator), driven through the same SGLang calls as the two above.
All implementations run in one process on the same event stream, each event handed to
each of them in turn (rotating order), so machine noise hits them alike; then each runs
alone in a subprocess (same imports everywhere) for its peak RSS. The matched length of
every request, the evicted token total and the op count must agree across implementations.

ops = match_prefix + insert + evict calls. Writes benches/results/radix.csv
(device,commit,impl,ops_per_s,matched_tokens_per_s,hit_rate,peak_rss_mb), radix_detail.csv
and radix.png; commit is the checkout's HEAD (run it on committed code).

    python benches/bench_radix.py                 # full run (about 4 minutes on 2 cores)
    python benches/bench_radix.py --conversations 200 --gsp-groups 8   # quick
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from pathlib import Path

import numpy as np

PAGE = 128
VOCAB = 32000
IMPLS = ["oscar", "sglang-python", "sglang-rust", "oscar-fine", "oscar-sglang-backend"]
HEADLINE = ["oscar", "sglang-python", "sglang-rust"]


# ----- trace -----------------------------------------------------------------------------


def trace(args):
    """Yields ("admit", rid, tokens, prompt_len, namespace) and ("finish", rid) events."""
    rng = np.random.default_rng(args.seed)

    def tokens(n: int) -> array:
        return array("q", rng.integers(1, VOCAB, n, dtype=np.int64).tobytes())

    sys_lens = rng.integers(1024, 8193, args.system_prompts)
    systems = [tokens(int(n)) for n in sys_lens]
    popularity = 1.0 / np.arange(1, args.system_prompts + 1) ** 0.8
    popularity /= popularity.sum()

    running: deque[int] = deque()
    rid = 0

    def admit(toks: array, prompt_len: int, ns):
        nonlocal rid
        events = []
        if len(running) >= args.batch:
            events.append(("finish", running.popleft()))
        events.append(("admit", rid, toks, prompt_len, ns))
        running.append(rid)
        rid += 1
        return events

    # Multi-turn conversations, interleaved.
    started = 0
    active: list[dict] = []
    while started < args.conversations or active:
        while len(active) < args.active and started < args.conversations:
            ns = None
            if rng.random() < 0.1:
                ns = f"lora-{int(rng.integers(1, 4))}"
            s = int(rng.choice(args.system_prompts, p=popularity))
            active.append(
                {"history": array("q", systems[s]), "turns": int(rng.integers(4, 17)), "ns": ns}
            )
            started += 1
        i = int(rng.integers(len(active)))
        conv = active[i]
        prompt = conv["history"] + tokens(int(rng.integers(16, 257)))
        full = prompt + tokens(int(rng.integers(32, 513)))
        yield from admit(full, len(prompt), conv["ns"])
        conv["history"] = full
        conv["turns"] -= 1
        if conv["turns"] == 0:
            active.pop(i)

    # SGLang's generated-shared-prefix dataset shape.
    groups = [tokens(2048) for _ in range(args.gsp_groups)]
    reqs = [(g, q) for g in range(args.gsp_groups) for q in range(16)]
    order = rng.permutation(len(reqs))
    questions = {r: tokens(128) for r in reqs}
    for k in order:
        g, q = reqs[k]
        prompt = groups[g] + questions[(g, q)]
        yield from admit(prompt + tokens(256), len(prompt), None)
    while running:
        yield ("finish", running.popleft())


# ----- implementations -------------------------------------------------------------------


class Oscar:
    """oscar_kv._native.PrefixCache (Rust tree + Rust page allocator), request-level calls:
    ``admit`` (match, lock, evict the shortfall, allocate) and ``release`` (insert whole
    pages, free duplicates and the partial page, unlock)."""

    def __init__(self, pool_pages: int):
        from oscar_kv import _native

        self.n = _native
        self.c = _native.PrefixCache(pool_pages, page_size=PAGE)
        self.evictions = 0
        self.evicted_tokens = 0

    def admit(self, toks: array, prompt_len: int, ns):
        try:
            pages, matched, node, evicted = self.c.admit(toks, len(toks), ns, prompt_len)
        except self.n.OutOfPages:
            # admit() refuses before evicting; the others evict, then fail to allocate.
            return self._rejected(toks, prompt_len, ns)
        if evicted:
            self.evictions += 1
            self.evicted_tokens += evicted * PAGE
        return matched, (toks, ns, node, pages)

    def _rejected(self, toks, prompt_len, ns):
        _, matched, node = self.c.match_prefix(toks, ns, prompt_len, lock=True)
        need = -(-(len(toks) - matched) // PAGE)
        short = need - self.c.available
        if short > 0:
            self.evictions += 1
            self.evicted_tokens += self.c.evict(short) * PAGE
        self.c.unlock(node)
        return matched, None

    def finish(self, state) -> None:
        toks, ns, node, pages = state
        self.c.release(toks, pages, node, ns)

    def check(self) -> None:
        self.c.check_all_invariants()
        assert self.c.protected_pages == 0


class OscarFine(Oscar):
    """The same cache through its fine-grained calls, one per step, as a scheduler written
    against SGLang's BasePrefixCache would make them."""

    def admit(self, toks: array, prompt_len: int, ns):
        c = self.c
        pages, matched, node = c.match_prefix(toks, ns, prompt_len)
        c.lock(node)
        need = -(-(len(toks) - matched) // PAGE)
        short = need - c.available
        if short > 0:
            self.evicted_tokens += c.evict(short) * PAGE
            self.evictions += 1
        try:
            fresh = c.alloc(need)
        except self.n.OutOfPages:
            c.unlock(node)
            return matched, None
        return matched, (toks, ns, node, pages + fresh)

    def finish(self, state) -> None:
        toks, ns, node, pages = state
        c = self.c
        whole = len(toks) // PAGE
        c.insert(toks, pages[:whole], ns)
        if len(pages) > whole:
            c.free(pages[whole:])
        c.unlock(node)


class Sglang:
    """A SGLang BasePrefixCache over SGLang's paged allocator (CPU tensors)."""

    def __init__(self, pool_pages: int, kind: str):
        import torch
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.base_prefix_cache import (
            EvictParams,
            InsertParams,
            MatchPrefixParams,
        )
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=PAGE))
        self.torch = torch
        self.EvictParams, self.InsertParams = EvictParams, InsertParams
        self.MatchPrefixParams, self.RadixKey = MatchPrefixParams, RadixKey
        size = pool_pages * PAGE
        kv = MHATokenToKVPool(
            size=size,
            page_size=PAGE,
            dtype=torch.bfloat16,
            head_num=1,
            head_dim=4,
            layer_num=1,
            device="cpu",
            enable_memory_saver=False,
        )
        # Pages 1..pool_pages are allocatable (page 0 is the padding page): the same pool
        # size as oscar's. The oscar backend gets the allocator a --kv-quant oscar server
        # builds (oscar_kv.sglang.plugin): the Rust one.
        if kind == "oscar-sglang-backend":
            from oscar_kv.sglang.allocator import OscarPageAllocator

            alloc_cls = OscarPageAllocator
        else:
            alloc_cls = PagedTokenToKVPoolAllocator
        self.alloc = alloc_cls(size, PAGE, torch.bfloat16, "cpu", kv, need_sort=False)
        params = CacheInitParams(
            disable=False,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=self.alloc,
            page_size=PAGE,
        )
        self.unified = kind == "sglang-rust"
        if kind == "sglang-python":
            self.cache = RadixCache(params)
        elif kind == "sglang-rust":
            import dataclasses

            from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
            from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

            params = dataclasses.replace(
                params, tree_components=(ComponentType.FULL,), tree_core_backend="rust"
            )
            self.cache = UnifiedRadixCache(params)
            core = type(self.cache.tree_core).__name__
            assert core == "RustUnifiedTreeCore", f"rust tree core not in use: {core}"
        else:
            from oscar_kv.sglang.radix import OscarRadixCache

            self.cache = OscarRadixCache(params)
        self.evictions = 0
        self.evicted_tokens = 0

    def admit(self, toks: array, prompt_len: int, ns):
        cache, alloc = self.cache, self.alloc
        key = self.RadixKey(toks, extra_key=ns, limit=prompt_len)
        m = cache.match_prefix(self.MatchPrefixParams(key=key))
        matched, node = m.device_prefix_len, m.last_device_node
        lock = cache.lock(node)
        prefix = cache.path_device_indices(node)[:matched]
        need = -(-(len(toks) - matched) // PAGE) * PAGE
        short = need - alloc.available_size()
        if short > 0:
            res = cache.evict(self.EvictParams(num_tokens=short))
            self.evicted_tokens += res.num_tokens_evicted
            self.evictions += 1
        fresh = alloc.alloc(need)
        if fresh is None:
            cache.unlock(lock)
            return matched, None
        return matched, (toks, ns, lock, self.torch.cat([prefix, fresh]), matched)

    def finish(self, state) -> None:
        toks, ns, lock, kv, matched = state
        cache, alloc = self.cache, self.alloc
        whole = len(toks) // PAGE * PAGE
        key = self.RadixKey(toks, extra_key=ns, limit=whole)
        if self.unified:
            # The unified tree frees the request's duplicates itself past prev_prefix_len.
            cache.insert(self.InsertParams(key=key, value=kv[:whole], prev_prefix_len=matched))
        else:
            res = cache.insert(self.InsertParams(key=key, value=kv[:whole]))
            if res.prefix_len > matched:
                alloc.free_segment(kv[matched : res.prefix_len], start_pos=matched)
        if len(kv) > whole:
            alloc.free_segment(kv[whole:], start_pos=whole)
        cache.unlock(lock)

    def check(self) -> None:
        assert self.cache.protected_size() == 0


def sglang_importable() -> bool:
    try:
        from oscar_kv.sglang._testing import import_sglang_cache

        import_sglang_cache()
        import sglang.srt.mem_cache.unified_radix_cache  # noqa: F401 - same imports everywhere
    except ImportError:
        return False
    return True


def make_impl(name: str, pool_pages: int):
    if name == "oscar":
        return Oscar(pool_pages)
    if name == "oscar-fine":
        return OscarFine(pool_pages)
    return Sglang(pool_pages, name)


_KEEP: list = []


def run_trace(args, names: list[str], keep: bool = False) -> dict[str, dict]:
    """Feeds every event of the trace to every implementation in turn (the order rotating
    from event to event), timing each call: machine noise hits all of them alike. With
    `keep`, the caches stay alive after the call (for measuring their memory)."""
    impls = {n: make_impl(n, args.pool_pages) for n in names}
    res = {
        n: {
            "states": {},
            "log": array("q"),
            "prompt": 0,
            "matched": 0,
            "ops": 0,
            "rejected": 0,
            "requests": 0,
            "seconds": 0.0,
        }
        for n in names
    }
    clock = time.perf_counter
    for k, ev in enumerate(trace(args)):
        for j in range(len(names)):
            n = names[(k + j) % len(names)]
            impl, r = impls[n], res[n]
            if ev[0] == "admit":
                _, rid, toks, prompt_len, ns = ev
                evictions = impl.evictions
                t0 = clock()
                matched, state = impl.admit(toks, prompt_len, ns)
                r["seconds"] += clock() - t0
                r["ops"] += 1 + (impl.evictions - evictions)
                r["requests"] += 1
                r["prompt"] += prompt_len
                r["matched"] += matched
                r["log"].append(matched)
                if state is None:
                    r["rejected"] += 1
                else:
                    r["states"][rid] = state
            else:
                state = r["states"].pop(ev[1], None)
                if state is not None:
                    t0 = clock()
                    impl.finish(state)
                    r["seconds"] += clock() - t0
                    r["ops"] += 1
    if keep:
        _KEEP.append(impls)
    out = {}
    for n, impl in impls.items():
        impl.check()
        r = res[n]
        out[n] = {
            "impl": n,
            "requests": r["requests"],
            "rejected": r["rejected"],
            "ops": r["ops"],
            "evict_calls": impl.evictions,
            "evicted_tokens": impl.evicted_tokens,
            "seconds": r["seconds"],
            "prompt_tokens": r["prompt"],
            "matched_tokens": r["matched"],
            "hit_rate": r["matched"] / max(r["prompt"], 1),
            "ops_per_s": r["ops"] / r["seconds"],
            "matched_tokens_per_s": r["matched"] / r["seconds"],
            "matched_sha1": hashlib.sha1(r["log"].tobytes()).hexdigest(),
        }
    return out


def worker(args) -> dict:
    """One implementation alone in this process: its peak RSS (all workers import the same
    modules first, so the numbers compare)."""
    sglang_importable()
    rss_before = rss_mb()
    r = run_trace(args, [args.worker], keep=True)[args.worker]
    # Resident growth while the cache is still alive: its own data structures (plus the
    # small, equal share of the trace generator's conversation state).
    r["cache_rss_mb"] = rss_mb() - rss_before
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["rss_before_trace_mb"] = rss_before
    r["seconds_alone"] = r.pop("seconds")
    return r


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----- driver ----------------------------------------------------------------------------


def check_agree(results: list[dict]) -> None:
    first = results[0]
    for r in results[1:]:
        assert r["matched_sha1"] == first["matched_sha1"], (
            f"{r['impl']} matched other lengths than {first['impl']}"
        )
        for key in ("hit_rate", "evicted_tokens", "rejected", "ops", "requests"):
            assert r[key] == first[key], (key, r["impl"], r[key], first["impl"], first[key])


def run_all(args) -> list[dict]:
    names = list(args.impls)
    if not sglang_importable():
        skipped = [n for n in names if n not in ("oscar", "oscar-fine")]
        print(f"[bench_radix] sglang not importable: skipping {skipped}", flush=True)
        names = [n for n in names if n not in skipped]
    t0 = time.time()
    timed = run_trace(args, names)
    print(f"[bench_radix] interleaved timing run: {time.time() - t0:.0f} s", flush=True)
    check_agree(list(timed.values()))
    results = []
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--worker", name, "--result", f.name]
            cmd += [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in TRACE_ARGS
            ]
            t0 = time.time()
            subprocess.run(cmd, check=True, env=os.environ.copy())
            alone = json.loads(Path(f.name).read_text())
        check_agree([timed[name], alone])
        keys = ("peak_rss_mb", "rss_before_trace_mb", "cache_rss_mb")
        r = {**timed[name], **{k: alone[k] for k in keys}}
        r["seconds_alone"] = alone["seconds_alone"]
        print(f"[bench_radix] {name}: {json.dumps(r)} ({time.time() - t0:.0f} s)", flush=True)
        results.append(r)
    return results


def git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    )
    return out.stdout.strip() or "unknown"


def write_outputs(results: list[dict], out: Path) -> None:
    # Imported here, after the timing: the workers' imports stay the same for every impl.
    from bench_decode_cpu import cpu_name

    out.mkdir(parents=True, exist_ok=True)
    ran = {r["impl"]: r for r in results if "skipped" not in r}
    run = {"device": cpu_name(), "commit": git_commit()}
    cols = ["device", "commit", "impl", "ops_per_s", "matched_tokens_per_s", "hit_rate"]
    cols.append("peak_rss_mb")
    with open(out / "radix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for name in HEADLINE:
            if name in ran:
                r = ran[name]
                w.writerow(
                    [
                        run["device"],
                        run["commit"],
                        name,
                        f"{r['ops_per_s']:.1f}",
                        f"{r['matched_tokens_per_s']:.1f}",
                        f"{r['hit_rate']:.6f}",
                        f"{r['peak_rss_mb']:.1f}",
                    ]
                )
    detail = cols + [
        "requests",
        "rejected",
        "ops",
        "evict_calls",
        "evicted_tokens",
        "seconds",
        "seconds_alone",
        "rss_before_trace_mb",
        "cache_rss_mb",
        "speedup_vs_sglang_python",
        "speedup_vs_sglang_rust",
    ]
    with open(out / "radix_detail.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(detail)
        for name, r in ran.items():
            row = {**r, **run}
            for base, col in [
                ("sglang-python", "speedup_vs_sglang_python"),
                ("sglang-rust", "speedup_vs_sglang_rust"),
            ]:
                row[col] = f"{r['ops_per_s'] / ran[base]['ops_per_s']:.2f}" if base in ran else ""
            w.writerow(
                [row[c] if not isinstance(row[c], float) else f"{row[c]:.4f}" for c in detail]
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ran)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["#1b7837" if n.startswith("oscar") else "#762a83" for n in names]
    vals = [ran[n]["ops_per_s"] for n in names]
    axes[0].bar(names, vals, color=colors)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("cache operations / s (log)")
    base = ran.get("sglang-python")
    for i, v in enumerate(vals):
        label = f"{v:,.0f}" + (f"\n{v / base['ops_per_s']:.1f}x py" if base else "")
        axes[0].text(i, v, label, ha="center", va="bottom", fontsize=8)
    axes[1].bar(names, [ran[n]["cache_rss_mb"] for n in names], color=colors)
    axes[1].set_ylabel("RSS growth while the cache is alive (MB)")
    peak = max(ran[n]["peak_rss_mb"] for n in names)
    axes[1].set_title(f"process peak RSS (torch + sglang imported): <= {peak:.0f} MB", fontsize=9)
    hit = next(iter(ran.values()))["hit_rate"]
    reqs = next(iter(ran.values()))["requests"]
    fig.suptitle(
        f"Prefix cache on a multi-turn + shared-prefix trace ({reqs} requests, "
        f"hit rate {hit:.1%}, page 128)"
    )
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(out / "radix.png", dpi=120)


TRACE_ARGS = {
    "seed",
    "conversations",
    "system_prompts",
    "active",
    "batch",
    "gsp_groups",
    "pool_pages",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--system-prompts", type=int, default=32)
    p.add_argument("--active", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gsp-groups", type=int, default=64)
    p.add_argument("--pool-pages", type=int, default=4096)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(worker(args)))
        return
    results = run_all(args)
    write_outputs(results, args.out)
    ran = {r["impl"]: r for r in results if "skipped" not in r}
    for name in ("oscar", "oscar-sglang-backend"):
        for base in ["sglang-python", "sglang-rust"]:
            if name in ran and base in ran:
                ratio = ran[name]["ops_per_s"] / ran[base]["ops_per_s"]
                print(f"[bench_radix] {name} vs {base}: {ratio:.2f}x ops/s")


if __name__ == "__main__":
    main()
