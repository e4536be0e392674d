"""``oscar_kv.sglang.radix.OscarRadixCache`` against SGLang 0.5.23's own prefix caches.

The differential tests drive SGLang's ``RadixCache`` (Python), its ``UnifiedRadixCache`` on
the Rust tree core, and ours with page_size 128 through the same random request sequences,
the way the scheduler does (``SchedulerHarness``: real ``Req``, ``ReqToTokenPool``, paged
allocator, ``match_kv_cache``, ``checkpoint``, ``release_kv_cache``), and assert identical
matched lengths, eviction-freed counts, free pages and evictable / protected sizes after
every step.

Skipped, with the install command, when sglang is not importable (it is not part of the
default install: on this CPU machine it needs ``--no-deps`` and a list of small
dependencies: ``bash scripts/install_sglang.sh``).
"""

import dataclasses
import random
from array import array

import pytest

from oscar_kv.sglang._testing import SchedulerHarness, import_sglang_cache

try:
    import_sglang_cache()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)

from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from oscar_kv import _native
from oscar_kv.sglang import radix
from oscar_kv.sglang.radix import OscarRadixCache

PS = 128


def unified_rust(params):
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    cache = UnifiedRadixCache(
        dataclasses.replace(params, tree_components=(ComponentType.FULL,), tree_core_backend="rust")
    )
    assert type(cache.tree_core).__name__ == "RustUnifiedTreeCore"
    return cache


def served(h: SchedulerHarness) -> SchedulerHarness:
    """The harness with what a --kv-quant oscar server builds: OscarRadixCache over
    OscarPageAllocator (same pool, same size) instead of SGLang's paged allocator."""
    import torch

    from oscar_kv.sglang.allocator import OscarPageAllocator

    old = h.allocator
    h.allocator = OscarPageAllocator(
        old.size, old.page_size, torch.bfloat16, "cpu", old.get_kvcache(), need_sort=False
    )
    h.params = dataclasses.replace(h.params, token_to_kv_pool_allocator=h.allocator)
    h.cache = OscarRadixCache(h.params)
    return h


SERVED = "oscar over OscarPageAllocator"


def state(h: SchedulerHarness) -> tuple:
    c = h.cache
    return (h.available(), c.evictable_size(), c.protected_size())


def run_sequence(seed: int, makers: dict, steps: int, pool_pages: int) -> dict:
    """Drives one harness per maker through the same random scheduler sequence; returns
    counters of what happened (for checking the sequence exercised everything)."""
    rng = random.Random(seed)
    hs = {
        name: SchedulerHarness(OscarRadixCache if make == SERVED else make, pool_pages * PS, PS, 16)
        for name, make in makers.items()
    }
    for name, make in makers.items():
        if make == SERVED:
            served(hs[name])
    # Few symbols: requests share prefixes that end at arbitrary token positions.
    systems = [[rng.randrange(40) for _ in range(rng.randrange(200, 700))] for _ in range(3)]
    running: list[dict] = []  # per request: {name: Req}
    seen = {"admitted": 0, "hits": 0, "rejected": 0, "evicted": 0, "checkpoints": 0}

    def same(what: str, values: dict) -> None:
        first = next(iter(values.values()))
        assert all(v == first for v in values.values()), (seed, what, values)

    for step in range(steps):
        op = rng.random()
        if op < 0.35 or not running:
            prompt = rng.choice(systems)[: rng.randrange(0, 700)]
            prompt = prompt + [rng.randrange(40) for _ in range(rng.randrange(1, 400))]
            ns = rng.choice([None, None, "lora-a"])
            reqs = {n: h.admit(array("q", prompt), extra_key=ns) for n, h in hs.items()}
            same(f"admit {step}", {n: None if r is None else r.prefix_len for n, r in reqs.items()})
            if next(iter(reqs.values())) is None:
                seen["rejected"] += 1
            else:
                seen["admitted"] += 1
                seen["hits"] += next(iter(reqs.values())).prefix_len > 0
                running.append(reqs)
            if len(running) > 5:
                for n, r in running.pop(0).items():
                    hs[n].finish(r)
        elif op < 0.6:
            reqs = rng.choice(running)
            out = [rng.randrange(40) for _ in range(rng.randrange(1, 300))]
            same(f"generate {step}", {n: hs[n].generate(r, out) for n, r in reqs.items()})
        elif op < 0.75:
            reqs = rng.choice(running)
            for n, r in reqs.items():
                hs[n].checkpoint(r)
            seen["checkpoints"] += 1
        elif op < 0.9:
            reqs = running.pop(rng.randrange(len(running)))
            insert = rng.random() < 0.85
            for n, r in reqs.items():
                hs[n].finish(r, insert=insert)
        else:
            k = rng.randrange(1, 20 * PS)
            freed = {n: h.evict(k) for n, h in hs.items()}
            same(f"evict {step}", freed)
            seen["evicted"] += next(iter(freed.values()))
        same(f"state after step {step}", {n: state(h) for n, h in hs.items()})
    for reqs in running:
        for n, r in reqs.items():
            hs[n].finish(r)
    same("final state", {n: state(h) for n, h in hs.items()})
    same("drained", {n: h.evict(1 << 30) for n, h in hs.items()})
    for n, h in hs.items():
        assert h.available() == pool_pages * PS, n
    hs["oscar"].cache.sanity_check()
    for h in hs.values():
        if hasattr(h.allocator, "check_invariants"):
            h.allocator.check_invariants()
            pool = h.cache.pool_state()
            assert pool["leaked"] == 0 and pool["free"] == pool["total"], pool
    return seen


@pytest.mark.parametrize("seed", range(4))
def test_differential_vs_sglang_radix_cache(seed):
    seen = run_sequence(
        seed,
        {
            "sglang": RadixCache,
            "sglang-rust": unified_rust,
            "oscar": OscarRadixCache,
            "oscar-served": SERVED,
        },
        steps=150,
        pool_pages=40,
    )
    assert seen["hits"] > 5 and seen["checkpoints"] > 5 and seen["evicted"] > 0, seen


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 24))
def test_differential_long(seed):
    run_sequence(
        seed,
        {"sglang": RadixCache, "oscar": OscarRadixCache, "oscar-served": SERVED},
        steps=600,
        pool_pages=24 + seed,
    )


@pytest.fixture
def pair():
    return (
        SchedulerHarness(RadixCache, 32 * PS, PS, max_reqs=8),
        SchedulerHarness(OscarRadixCache, 32 * PS, PS, max_reqs=8),
    )


def fill(h: SchedulerHarness) -> list:
    """A finished request (in the tree, unlocked), a checkpointed running one and a running
    one that matched the shared prefix; returns the two running requests."""
    base = list(range(3 * PS))
    done = h.admit(array("q", base + [1] * (2 * PS + 5)))
    h.generate(done, [9] * 40)
    h.finish(done)
    a = h.admit(array("q", base + [2] * PS))
    h.generate(a, [9] * 40)
    h.checkpoint(a)
    b = h.admit(array("q", base + [3] * (PS // 2)))
    assert a.prefix_len == b.prefix_len == 3 * PS
    return [a, b]


def test_direct_api_matches_radix_cache(pair):
    """match_prefix / insert / evict / lock refs called directly, as SGLang's own tests do."""
    for h in pair:
        fill(h)
    sg, us = (h.cache for h in pair)
    for tokens in (list(range(3 * PS)) + [1] * 300, list(range(2 * PS + 7)), [5] * 1000, []):
        key = RadixKey(array("q", tokens))
        a = sg.match_prefix(MatchPrefixParams(key=key))
        b = us.match_prefix(MatchPrefixParams(key=key))
        assert a.device_prefix_len == b.device_prefix_len
        assert a.device_prefix_len == 0 or b.last_device_node != _native.ROOT_NODE
        assert (
            sg.path_device_indices(a.last_device_node).shape
            == us.path_device_indices(b.last_device_node).shape
        )
        ra, rb = sg.inc_lock_ref(a.last_device_node), us.inc_lock_ref(b.last_device_node)
        assert ra.delta == rb.delta
        assert sg.protected_size() == us.protected_size()
        assert (
            sg.dec_lock_ref(a.last_device_node).delta == us.dec_lock_ref(b.last_device_node).delta
        )
    assert sg.total_size() == us.total_size()
    assert sorted(sg.all_values_flatten().tolist()) == sorted(us.all_values_flatten().tolist())
    for n in (1, PS, 5 * PS):
        a = sg.evict(EvictParams(num_tokens=n)).num_tokens_evicted
        assert a == us.evict(EvictParams(num_tokens=n)).num_tokens_evicted
    assert pair[0].available() == pair[1].available()


def test_dfs_weight_order_matches(pair):
    handles = {}
    for h in pair:
        reqs = fill(h)
        handles[h] = [r.last_node for r in reqs] + [h.cache.root_node_handle()]
    sg_h, us_h = pair
    assert sg_h.cache.dfs_weight_order(handles[sg_h]) == us_h.cache.dfs_weight_order(handles[us_h])


def test_bad_input_clear_errors_state_unchanged(pair):
    _, h = pair
    fill(h)
    c = h.cache
    unlocked = RadixKey(array("q", list(range(3 * PS)) + [1] * (2 * PS)))
    node = c.match_prefix(MatchPrefixParams(key=unlocked)).last_device_node
    assert c.tree.lock_ref(node) == 0
    before = (c.tree.nodes(), h.available(), c.evictable_size(), c.protected_size())
    with pytest.raises(_native.LockUnderflow):
        c.dec_lock_ref(node)
    with pytest.raises(_native.InvalidNode):
        c.inc_lock_ref(12345)
    key = RadixKey(array("q", [1] * (2 * PS)))
    with pytest.raises(ValueError, match="value"):
        c.insert(InsertParams(key=key))
    import torch

    with pytest.raises(ValueError, match="holds 128 indices, key needs 256"):
        c.insert(InsertParams(key=key, value=torch.arange(PS, 2 * PS)))
    with pytest.raises(_native.InvalidPage):  # page 1 already belongs to the tree
        c.insert(InsertParams(key=key, value=torch.arange(PS, 3 * PS)))
    with pytest.raises(ValueError, match="token ids must be in"):
        c.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [-1] * PS))))
    assert (c.tree.nodes(), h.available(), c.evictable_size(), c.protected_size()) == before


def test_unsupported_configurations_fail_clearly(pair):
    params = pair[1].params
    for change, message in [
        ({"is_eagle": True}, "EAGLE"),
        ({"eviction_policy": "lfu"}, "LRU only"),
        ({"sliding_window_size": 4096}, "sliding windows"),
    ]:
        with pytest.raises(ValueError, match=message):
            OscarRadixCache(dataclasses.replace(params, **change))


def test_registered_as_radix_cache_backend(pair):
    from sglang.srt.mem_cache.registry import (
        TreeCacheBuildContext,
        get_radix_cache_factory,
    )

    radix.register_backend()
    assert radix.register_backend() is False  # idempotent
    factory = get_radix_cache_factory("oscar")
    assert factory is radix.create_oscar_radix_cache
    ctx = TreeCacheBuildContext(
        server_args=None,
        params=pair[1].params,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=False,
        disable_radix_cache=False,
        tp_worker=None,
        model_config=None,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )
    assert isinstance(factory(ctx), OscarRadixCache)
    with pytest.raises(ValueError, match="hybrid sliding-window"):
        factory(dataclasses.replace(ctx, is_hybrid_swa=True))
    with pytest.raises(ValueError, match="hierarchical"):
        factory(dataclasses.replace(ctx, enable_hierarchical_cache=True))


def test_pretty_print_and_aliases(pair, capsys):
    _, h = pair
    reqs = fill(h)
    h.cache.pretty_print()
    assert "#tokens:" in capsys.readouterr().out
    # Pre-0.5.23 names: cache_finished_req releases the request like release_kv_cache.
    r = reqs[0]
    r.refresh_fill_ids()
    h.cache.cache_finished_req(r)
    assert not r.kv.holds_kv


def test_leak_line_counts_companions_with_their_page():
    h = served(SchedulerHarness(OscarRadixCache, 16 * PS, PS, max_reqs=4))
    cache, alloc = h.cache, h.allocator
    kv = alloc.get_kvcache()
    kv.sink_companions = 2  # as a sink pool would ask
    kv.set_companions = lambda first_pages, companions: None
    key = RadixKey(array("q", range(3 * PS)))
    locs = alloc.alloc(3 * PS, first_page=True)  # page 0 of a KV row: 2 companions
    cache.insert(InsertParams(key=key, value=locs))
    total = 16 * PS
    assert cache.pool_state() == {
        "total": total, "free": total - 5 * PS, "evictable": 5 * PS, "locked": 0, "leaked": 0
    }  # fmt: skip
    lock = cache.lock(cache.match_prefix(MatchPrefixParams(key=key)).last_device_node)
    assert cache.pool_state()["locked"] == 5 * PS and cache.pool_state()["leaked"] == 0
    cache.unlock(lock)
    # A running request's pages, companions included, are outside free and the tree.
    held = alloc.alloc(PS, first_page=True)
    assert cache.pool_state()["leaked"] == 3 * PS
    alloc.free(held)
    # Evicting the tree's page 0 frees its companions too.
    assert cache.evict(EvictParams(num_tokens=PS)).num_tokens_evicted == 3 * PS
    assert cache.pool_state() == {
        "total": total, "free": total, "evictable": 0, "locked": 0, "leaked": 0
    }  # fmt: skip
    alloc.check_invariants()


def test_a_partial_first_page_is_read_as_a_first_page(monkeypatch):
    """A prefix ending inside a cached packed page dequantizes that page with first_page
    set exactly when it is page 0 of the cached sequence (a sink page under sink_bits)."""
    from test_tails import Flow

    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    f = Flow()
    history = list(range(300))
    f.history(history)
    seen: list[bool] = []
    dequantize = f.pool.dequantize_into_residual

    def record(page: int, slot: int, *, first_page: bool = False) -> None:
        seen.append(first_page)
        dequantize(page, slot, first_page=first_page)

    monkeypatch.setattr(f.pool, "dequantize_into_residual", record)
    inside_first = f.request(history[:100] + [9000, 9001])
    inside_second = f.request(history[:200] + [9002, 9003])
    assert (inside_first.prefix_len, inside_second.prefix_len) == (100, 200)
    for r in (inside_first, inside_second):
        f.cache.prefix_device_indices(r)
    f.rtp.alloc([inside_first, inside_second])
    assert seen == [True, False]


def test_served_free_kv_row_frees_each_page_of_its_ranges_once():
    # The host path reads page ids straight off the row: one range (release_kv_cache's),
    # ranges meeting inside a page (that page once), a misaligned start refused.
    import types

    import torch

    h = served(SchedulerHarness(OscarRadixCache, 16 * PS, PS, 4))
    cache, alloc = h.cache, h.allocator
    row_idx = 1
    kv = types.SimpleNamespace(req_pool_idx=row_idx)

    def fill(pages: int) -> int:
        locs = alloc.alloc(pages * PS)
        h.req_to_token_pool.write((row_idx, slice(0, pages * PS)), locs.to(torch.int32))
        return alloc.available_size()

    free = fill(4)
    cache.free_kv_row(kv, [(PS, 3 * PS - 5)])  # pages 1 and 2 of the row
    assert alloc.available_size() == free + 2 * PS
    cache.free_kv_row(kv, [(0, PS - 7), (PS - 7, PS)])  # meet inside page 0: freed once
    assert alloc.available_size() == free + 3 * PS
    with pytest.raises(ValueError, match="not page-aligned"):
        cache.free_kv_row(kv, [(3 * PS + 1, 4 * PS)])
    with pytest.raises(ValueError, match="not page-aligned"):
        cache.free_kv_row(kv, [(3 * PS, 3 * PS + 4), (3 * PS + 4 + 1, 4 * PS)])
    assert alloc.available_size() == free + 3 * PS  # nothing freed by a refused call
    cache.free_kv_row(kv, [(3 * PS, 3 * PS)])  # empty range: nothing
    assert alloc.available_size() == free + 3 * PS
    alloc.free_group_begin()
    cache.free_kv_row(kv, [(3 * PS, 4 * PS)])
    assert alloc.available_size() == free + 3 * PS  # held until the group ends
    alloc.free_group_end()
    assert alloc.available_size() == free + 4 * PS
    with pytest.raises(Exception, match="(?i)free|page"):
        cache.free_kv_row(kv, [(3 * PS, 4 * PS)])  # its page is free already
