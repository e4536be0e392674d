"""benches/bench_radix.py on a tiny trace: every implementation agrees, the SGLang-API caches
finish requests through the server's release path (checkpoint included) and end leak-free."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parents[1] / "benches"
SGLANG_API = ["sglang-python", "sglang-rust", "oscar-sglang-backend", "oscar-sglang-tails"]


@pytest.fixture(scope="module")
def bench():
    from oscar_kv.sglang._testing import import_sglang_cache

    try:
        import_sglang_cache()
    except ImportError as e:
        pytest.skip(str(e))
    sys.path.insert(0, str(BENCHES))
    try:
        import bench_radix
    finally:
        sys.path.remove(str(BENCHES))
    return bench_radix


def tiny_trace(conversations: int, gsp_groups: int) -> argparse.Namespace:
    """The benchmark's trace arguments at test size: 256 pages of 128 tokens against
    requests of up to 20K tokens."""
    return argparse.Namespace(
        seed=0,
        conversations=conversations,
        system_prompts=32,
        active=64,
        batch=8,
        gsp_groups=gsp_groups,
        pool_pages=256,
    )


def checkpoint_classes() -> list[type]:
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    from oscar_kv.sglang.radix import OscarRadixCache

    return [RadixCache, UnifiedRadixCache, OscarRadixCache]


def test_tiny_trace_agrees_and_releases_through_checkpoint(bench, monkeypatch):
    # Counted per cache object on the classes themselves, so a driver that finished one
    # implementation some other way (a bare insert, release_kv_cache(checkpoint=False))
    # leaves its count short.
    calls: Counter[int] = Counter()
    for cls in checkpoint_classes():
        orig = cls.checkpoint

        def counted(self, req, *, up_to, _orig=orig, **kwargs):
            calls[id(self)] += 1
            return _orig(self, req, up_to=up_to, **kwargs)

        monkeypatch.setattr(cls, "checkpoint", counted)

    # 256 pages of 128 tokens against requests of up to 20K tokens: eviction throughout,
    # and some requests do not fit (the rejection path runs too).
    args = tiny_trace(conversations=20, gsp_groups=2)
    bench._KEEP.clear()
    try:
        results = bench.run_trace(args, bench.IMPLS, keep=True)
        impls = bench._KEEP[-1]
        bench.check_agree(list(results.values()))
        for name, r in results.items():
            assert r["hit_rate"] > 0, name
            assert r["evicted_tokens"] > 0 and r["evict_calls"] > 0, name
            assert 0 <= r["rejected"] < r["requests"], name
        for name in SGLANG_API:
            impl = impls[name]
            finished = results[name]["requests"] - results[name]["rejected"]
            assert calls[id(impl.cache)] == finished, (name, calls[id(impl.cache)], finished)
            cache, alloc = impl.cache, impl.alloc
            assert cache.protected_size() == 0, name
            assert impl.req_to_token_pool.available_size() == impl.rows, name
            free, evictable = alloc.available_size(), cache.evictable_size()
            assert evictable > 0, name
            assert free + evictable == args.pool_pages * bench.PAGE, (name, free, evictable)
        # The row with tails is what a --kv-quant oscar server runs: its prefixes may end
        # inside a page, so it matches at least what the whole-page caches do.
        tails, whole = results["oscar-sglang-tails"], results["oscar-sglang-backend"]
        assert tails["matched_tokens"] > whole["matched_tokens"], (tails, whole)
        res = impls["oscar-sglang-tails"].kv.residual_state()
        assert res["held"] == 0 and res["cached"] > 0, res
    finally:
        bench._KEEP.clear()


def test_split_run_times_each_cache_call_once_and_leaves_the_rest_to_the_scheduler(bench):
    # The split run must do the same work as the plain one (same matches and evictions) and
    # count a cache's calls into itself or its allocator once: RadixCache.checkpoint
    # re-matches its key and RadixCache.evict frees through the allocator, so counting
    # nested calls would give match_prefix two calls per request and alloc more than one.
    args = tiny_trace(conversations=12, gsp_groups=1)
    plain = bench.run_trace(args, SGLANG_API)
    timers = {n: bench.CallTimer() for n in SGLANG_API}
    split = bench.run_trace(args, SGLANG_API, split=timers)
    bench.check_agree(list(plain.values()) + list(split.values()))
    for name in SGLANG_API:
        r, timer = split[name], timers[name]
        admitted = r["requests"]
        finished = admitted - r["rejected"]
        assert timer.calls["cache.match_prefix"] == admitted, (name, timer.calls)
        assert timer.calls["cache.checkpoint"] == finished, (name, timer.calls)
        assert timer.calls["cache.evict_for_alloc"] == r["evict_calls"], (name, timer.calls)
        # The row with tails turns away what cannot fit before allocating (its prefix may
        # need a page for a copy) and continues a partial page with alloc_extend.
        allocs = timer.calls["allocator.alloc"] + timer.calls["allocator.alloc_extend"]
        assert allocs == (admitted if bench.same_work(name) else finished), (name, allocs)
        assert timer.calls["request_slots.alloc"] == allocs, (name, timer.calls)
        assert timer.calls["request_slots.free"] == allocs, (name, timer.calls)
        cache = timer.seconds_of(("cache", "allocator"))
        slots = timer.seconds_of(("request_slots",))
        assert 0 < cache and 0 < slots and cache + slots < r["seconds"], (name, cache, slots)
