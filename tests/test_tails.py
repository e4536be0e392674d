"""Whole-history prefix sharing: a finished request's residual page cached as a bf16 tail.

Real SGLang objects (``ReqToTokenPool``, ``PagedTokenToKVPoolAllocator`` over the oscar pool,
``Req``, ``match_kv_cache``, ``release_kv_cache``, ``ForwardBatch``, ``RadixAttention``) with
``OscarRadixCache`` and ``OscarAttnBackend``, driven in the order SGLang's scheduler uses:
match, lock, ``prefix_device_indices`` (``alloc_for_extend``), ``ReqToTokenPool.alloc``
(``alloc_req_slots``), ``alloc_extend`` with the prefix's last location, forward, release.
The reference attends to dequantized whole pages, the bf16 tail as stored, and the new tokens.
"""

from __future__ import annotations

import math
from array import array
from types import SimpleNamespace

import pytest
import torch

from kernel_cases import bf16_round, exact_causal
from oscar_kv import OscarConfig
from oscar_kv.ref import dequantize_kv, quantize_kv
from oscar_kv.sglang.tails import TailStore

sg = pytest.importorskip("oscar_kv.sglang._testing")
try:
    sg.import_sglang_cache()
except ImportError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"sglang not installed: {e}", allow_module_level=True)

from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from oscar_kv.sglang.attention import OscarAttnBackend
from oscar_kv.sglang.pool import OscarTokenToKVPool
from oscar_kv.sglang.radix import OscarRadixCache

HQ, HK, D = 4, 2, 64
PAGE = 128


# ------------------------------------------------------------------------------ TailStore
def test_tail_store_match_add_and_lru():
    s = TailStore()
    g = (5, None)
    assert s.add(g, [1, 2, 3], page=0) == []
    assert s.add(g, [1, 2], page=1) == [1]  # a prefix of a cached tail: redundant
    assert s.add(g, [1, 2, 3, 4], page=2) == [0]  # extends tail 0: it goes
    assert s.add(g, [7, 8], page=3) == []
    tail, k = s.match(g, [1, 2, 3, 9])
    assert (tail.page, k) == (2, 3)
    assert s.match((5, "ns"), [1, 2, 3]) == (None, 0)  # namespaces never share
    assert s.match(g, [9]) == (None, 0)
    # tail 2 was just used: tail 3 is the least recently used
    assert [t.page for t in s.lru(1, protect=set())] == [3]
    assert [t.page for t in s.lru(2, protect={id(tail)})] == [3]
    s.remove(tail)
    assert not tail.alive and len(s) == 1
    with pytest.raises(ValueError, match="not cached"):
        s.remove(tail)
    assert s.drop_groups([g]) == [3] and len(s) == 0


# ------------------------------------------------------------------------------ the flow
class Flow:
    """One layer served as SGLang's scheduler drives it (see the module docstring)."""

    def __init__(self, num_tokens: int = 16 * PAGE, slots: int = 4, residual_pages: int = 4):
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=PAGE))
        self.cfg = OscarConfig()
        self.rtp = ReqToTokenPool(
            size=slots, max_context_len=8 * PAGE, device="cpu", enable_memory_saver=False
        )
        self.pool = OscarTokenToKVPool(
            num_tokens, PAGE, torch.bfloat16, HK, D, 1, "cpu", config=self.cfg,
            residual_pages=residual_pages,
        )  # fmt: skip
        self.pool.attach(self.rtp)
        self.allocator = PagedTokenToKVPoolAllocator(
            num_tokens, PAGE, torch.bfloat16, "cpu", self.pool, need_sort=False
        )
        self.cache = OscarRadixCache(
            CacheInitParams(
                disable=False,
                req_to_token_pool=self.rtp,
                token_to_kv_pool_allocator=self.allocator,
                page_size=PAGE,
            )
        )
        runner = SimpleNamespace(
            device="cpu", req_to_token_pool=self.rtp, token_to_kv_pool=self.pool,
            model_config=SimpleNamespace(num_attention_heads=HQ),
        )  # fmt: skip
        self.backend = OscarAttnBackend(runner)
        self.layer = RadixAttention(HQ, D, 1 / math.sqrt(D), HK, layer_id=0)
        self._rid = 0

    def request(self, tokens: list[int]):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.mem_cache.common import match_kv_cache
        from sglang.srt.sampling.sampling_params import SamplingParams

        req = Req(
            rid=str(self._rid), origin_input_text="", origin_input_ids=array("q", tokens),
            sampling_params=SamplingParams(temperature=0, max_new_tokens=1),
        )  # fmt: skip
        self._rid += 1
        req.output_ids = array("q")
        req.full_untruncated_fill_ids = array("q", tokens)
        # SGLang matches all but the last prompt token (one must be computed).
        m = match_kv_cache(
            req, self.cache, token_ids=req.origin_input_ids, max_prefix_len=len(tokens) - 1
        )
        if m.cache_protected_len is None:  # as Req.init_next_round_input
            req.kv.cache_protected_len = req.prefix_len
        req.lock = self.cache.lock(req.last_node)
        return req

    def prefill(self, reqs, q, k, v):
        """One extend batch over ``reqs`` (admitted by `request`): q/k/v rows of the new
        tokens in batch order. Returns the attention output [N, HQ, D]."""
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        empty = torch.empty(0, dtype=torch.int64)
        prefix = [self.cache.prefix_device_indices(r) if r.prefix_len else empty for r in reqs]
        slots = self.rtp.alloc(reqs)
        assert slots is not None
        pre = [r.prefix_len for r in reqs]
        seq = [len(r.origin_input_ids) for r in reqs]
        new = [s - p for s, p in zip(seq, pre, strict=True)]
        last = torch.tensor([int(t[-1]) if len(t) else -1 for t in prefix], dtype=torch.int64)
        pre_t, seq_t = torch.tensor(pre), torch.tensor(seq)
        out_loc = self.allocator.alloc_extend(pre_t, pre_t, seq_t, seq_t, last, sum(new))
        assert out_loc is not None
        off = 0
        for r, p, s, n, pr in zip(reqs, pre, seq, new, prefix, strict=True):
            row = self.rtp.req_to_token[r.kv.req_pool_idx]
            row[:p] = pr.to(row.dtype)
            row[p:s] = out_loc[off : off + n].to(row.dtype)
            off += n
            r.kv.kv_committed_len = r.kv.kv_allocated_len = s
        fb = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=len(reqs),
            input_ids=torch.zeros(sum(new), dtype=torch.int64),
            req_pool_indices=torch.tensor(slots, dtype=torch.int64),
            seq_lens=seq_t, seq_lens_cpu=seq_t, out_cache_loc=out_loc, seq_lens_sum=sum(seq),
            extend_seq_lens=torch.tensor(new, dtype=torch.int32), extend_seq_lens_cpu=new,
            extend_prefix_lens_cpu=pre,
        )  # fmt: skip
        self.backend.init_forward_metadata(fb)
        out = self.backend.forward(
            q.reshape(len(q), HQ * D), k.reshape(len(k), HK * D), v.reshape(len(v), HK * D),
            self.layer, fb,
        )  # fmt: skip
        return out.view(-1, HQ, D)

    def history(self, tokens: list[int]):
        """A request over ``tokens`` prefilled with random K/V and finished (its history
        cached); returns its k, v."""
        req = self.request(tokens)
        q, k, v = _data(len(tokens))
        self.prefill([req], q, k, v)
        self.finish(req)
        return k, v

    def finish(self, req) -> None:
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH
        from sglang.srt.mem_cache.common import release_kv_cache

        req.finished_reason = FINISH_LENGTH(length=0)
        release_kv_cache(req, self.cache, checkpoint=True)

    def flush_is_clean(self) -> None:
        assert self.cache.pool_state()["locked"] == 0
        self.cache.reset()
        self.allocator.clear()
        self.rtp.clear()
        assert self.pool.residual_state()["free"] == self.pool.residual_pages
        assert self.allocator.available_size() == self.allocator.size


def _data(n: int):
    return (
        torch.randn(n, HQ, D),
        bf16_round(torch.randn(n, HK, D)),
        bf16_round(torch.randn(n, HK, D)),
    )


def _reference(q, k_hist, v_hist, k_new, v_new, cfg, cached: int):
    """Attention of the new tokens over the history's first `cached` tokens as the pool holds
    them (whole pages quantized, the rest bf16 as stored) and the new tokens exact."""
    whole = cached // PAGE * PAGE
    kp, vp = dequantize_kv(quantize_kv(k_hist[:whole], v_hist[:whole], cfg))
    k = torch.cat((kp.float(), k_hist[whole:cached], k_new))
    v = torch.cat((vp.float(), v_hist[whole:cached], v_new))
    return exact_causal(q, k, v, 1 / math.sqrt(D))


def test_next_turn_reuses_the_whole_history(monkeypatch):
    """Turn 1 holds 200 tokens (a page + a 72-token tail); turn 2 (turn 1 + 50 tokens) and a
    branch (turn 1 + 30 other tokens) in one batch both hit all 200, attend to the tail as
    stored, and each continues its own copy: the cached tail stays as it was."""
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(0)
    f = Flow()
    t1 = list(range(1000, 1200))
    q1, k1, v1 = _data(200)
    r1 = f.request(t1)
    assert r1.prefix_len == 0
    f.prefill([r1], q1, k1, v1)
    f.finish(r1)
    assert f.pool.residual_state() == {"total": 4, "free": 3, "held": 0, "cached": 1}
    (tail,) = list(f.cache.tails)
    tail_k = f.pool.k_res[0, tail.page].clone()

    q2, k2, v2 = _data(50)
    q3, k3, v3 = _data(30)
    r2 = f.request(t1 + list(range(5000, 5050)))
    r3 = f.request(t1 + list(range(7000, 7030)))
    assert (r2.prefix_len, r3.prefix_len) == (200, 200)  # the old cache stopped at 128
    out = f.prefill([r2, r3], torch.cat((q2, q3)), torch.cat((k2, k3)), torch.cat((v2, v3)))
    torch.testing.assert_close(
        out[:50].float(), _reference(q2, k1, v1, k2, v2, f.cfg, 200), atol=2e-3, rtol=2e-3
    )
    torch.testing.assert_close(
        out[50:].float(), _reference(q3, k1, v1, k3, v3, f.cfg, 200), atol=2e-3, rtol=2e-3
    )
    assert torch.equal(f.pool.k_res[0, tail.page], tail_k) and tail.alive
    pages = [int(f.rtp.req_to_token[r.kv.req_pool_idx, PAGE]) // PAGE for r in (r2, r3)]
    assert pages[0] != pages[1]  # each continues the partial page in a page of its own

    f.finish(r2)  # 250 tokens: its 122-token tail extends turn 1's, which goes
    f.finish(r3)
    assert not tail.alive and len(f.cache.tails) == 2
    assert f.pool.residual_state() == {"total": 4, "free": 2, "held": 0, "cached": 2}
    r4 = f.request(t1 + list(range(5000, 5050)) + [9, 9, 9])
    assert r4.prefix_len == 250
    f.cache.unlock(r4.lock)
    f.flush_is_clean()


def test_short_history_under_the_root_and_eviction_drops_orphans(monkeypatch):
    """A history shorter than a page is a tail of the root; evicting the tree node a tail
    hangs from gives the tail's residual page back."""
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(1)
    f = Flow()
    short = list(range(60))
    k, v = f.history(short)
    q2, k2, v2 = _data(20)
    r2 = f.request(short + list(range(100, 120)))
    assert r2.prefix_len == 60
    out = f.prefill([r2], q2, k2, v2)
    torch.testing.assert_close(
        out.float(), _reference(q2, k, v, k2, v2, f.cfg, 60), atol=2e-3, rtol=2e-3
    )
    f.finish(r2)

    long = list(range(300, 600))
    f.history(long)
    assert f.pool.residual_state()["cached"] == 2
    f.cache.evict(EvictParams(num_tokens=10**6))
    # The long history's node is gone, and with it its tail; the root's tail stays.
    assert f.pool.residual_state() == {"total": 4, "free": 3, "held": 0, "cached": 1}
    f.flush_is_clean()


def test_prefix_ending_inside_a_packed_page(monkeypatch):
    """Request A held 300 tokens (two packed pages + a tail); B shares A's first 200 tokens
    and then differs, inside A's second page: B hits all 200 (the 72 tokens of that page
    dequantized into B's residual page, as SGLang's token-granular cache would hit them),
    and A's pages are left as they were."""
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(4)
    f = Flow()
    ta = list(range(300))
    ka, va = f.history(ta)
    before = f.pool.pages[0].clone()
    qb, kb, vb = _data(40)
    b = f.request(ta[:200] + list(range(8000, 8040)))
    assert b.prefix_len == 200
    out = f.prefill([b], qb, kb, vb)
    kp, vp = dequantize_kv(quantize_kv(ka[:256], va[:256], f.cfg))
    want = exact_causal(
        qb, torch.cat((kp[:200].float(), kb)), torch.cat((vp[:200].float(), vb)), 1 / math.sqrt(D)
    )
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)
    assert torch.equal(f.pool.pages[0], before)
    f.finish(b)
    f.flush_is_clean()


def test_out_of_residual_pages_a_tail_moves_to_its_continuation(monkeypatch):
    """Two residual pages: one held by a running request, one by a cached tail. The next
    turn of that tail needs a page: nothing else is free, so the tail's page moves to it
    (no copy) and the answer is the same as with a copy."""
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(2)
    f = Flow(residual_pages=2)
    t1 = list(range(200))
    k1, v1 = f.history(t1)
    running = f.request(list(range(900, 910)))
    f.prefill([running], *_data(10))
    assert f.pool.residual_state() == {"total": 2, "free": 0, "held": 1, "cached": 1}
    (tail,) = list(f.cache.tails)
    q2, k2, v2 = _data(40)
    r2 = f.request(t1 + list(range(5000, 5040)))
    assert r2.prefix_len == 200
    out = f.prefill([r2], q2, k2, v2)
    torch.testing.assert_close(
        out.float(), _reference(q2, k1, v1, k2, v2, f.cfg, 200), atol=2e-3, rtol=2e-3
    )
    assert not tail.alive and f.pool.residual_state()["cached"] == 0
    assert int(f.pool.residual_of_slot[r2.kv.req_pool_idx]) == tail.page
    f.finish(running)
    f.finish(r2)
    f.flush_is_clean()


def test_unused_tails_are_reclaimed_for_new_requests(monkeypatch):
    """Cached tails never block a new request: the least recently used gives its page."""
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(3)
    f = Flow(residual_pages=2)
    for base in (0, 1000):
        f.history(list(range(base, base + 150)))
    assert f.pool.residual_state() == {"total": 2, "free": 0, "held": 0, "cached": 2}
    a, b = f.request(list(range(3000, 3010))), f.request(list(range(4000, 4010)))
    f.prefill([a, b], *_data(20))
    assert f.pool.residual_state() == {"total": 2, "free": 0, "held": 2, "cached": 0}
    f.finish(a)
    f.finish(b)
    f.flush_is_clean()


def test_duplicate_of_a_partial_page_copy_is_repointed_whole(monkeypatch):
    """Two requests continue one tail identically in one batch, each completing the partial
    page in its own copy. When the second publishes, its copy duplicates the first's page in
    the tree: it is freed and the request's row points at the tree's page from the page's
    first token on (the prefix's part of that page included), so no page-table head is left
    on the freed copy."""
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(5)
    f = Flow()
    t1 = list(range(200))
    f.history(t1)
    more = list(range(6000, 6060))
    b, c = f.request(t1 + more), f.request(t1 + more)
    q, k, v = _data(60)
    f.prefill([b, c], torch.cat((q, q)), torch.cat((k, k)), torch.cat((v, v)))
    copy_c = int(f.rtp.req_to_token[c.kv.req_pool_idx, PAGE]) // PAGE
    f.finish(b)
    c.full_untruncated_fill_ids = array("q", t1 + more)
    f.cache.checkpoint(c, up_to=260)
    row = f.rtp.req_to_token[c.kv.req_pool_idx]
    tree_page = int(row[PAGE + 127]) // PAGE
    assert tree_page != copy_c
    assert torch.equal(row[PAGE : 2 * PAGE], torch.arange(PAGE, dtype=row.dtype) + tree_page * PAGE)
    assert copy_c in f.allocator.free_pages.tolist()
    f.finish(c)
    f.flush_is_clean()


def test_request_released_without_insert_frees_its_partial_page_copy(monkeypatch):
    """A request that continued a tail and is released without publishing (aborted, or
    barred from the tree) frees its own copy of the partial page and nothing of the tree:
    the tree protects the whole pages only."""
    from sglang.srt.mem_cache.common import release_kv_cache

    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(6)
    f = Flow()
    t1 = list(range(200))
    f.history(t1)
    free_before = f.allocator.available_size()
    b = f.request(t1 + list(range(50)))
    assert b.prefix_len == 200 and b.kv.cache_protected_len == PAGE
    f.prefill([b], *_data(50))
    release_kv_cache(b, f.cache, checkpoint=False)
    assert f.allocator.available_size() == free_before
    assert len(f.cache.tails) == 1 and f.cache.pool_state()["leaked"] == 0
    f.flush_is_clean()


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_dequantize_into_residual_fills_every_layer_from_its_own_page(monkeypatch, backend):
    # One call dequantizes the page of every layer: each layer's residual page must hold
    # that layer's page (not the first layer's, not a neighbouring page's).
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    monkeypatch.setenv("OSCAR_KV_BACKEND", backend)
    torch.manual_seed(7)
    cfg, layers, pages = OscarConfig(), 3, 4
    pool = OscarTokenToKVPool(
        pages * PAGE, PAGE, torch.bfloat16, HK, D, layers, "cpu", config=cfg, residual_pages=2
    )
    rtp = ReqToTokenPool(size=2, max_context_len=PAGE, device="cpu", enable_memory_saver=False)
    pool.attach(rtp)
    want = {}
    for layer in range(layers):
        for page in range(1, pages + 1):
            k, v = bf16_round(torch.randn(2, PAGE, HK, D)).unbind(0)
            pool.pages[layer, page] = quantize_kv(k, v, cfg).packed_pages()[0]
            want[layer, page] = dequantize_kv(quantize_kv(k, v, cfg))
    (dst,) = pool.assign_residual([1])
    pool.dequantize_into_residual(3, 1)
    for layer in range(layers):
        k_res, v_res = pool.residual(layer)
        kw, vw = want[layer, 3]
        torch.testing.assert_close(k_res[dst].float(), bf16_round(kw.reshape(PAGE, HK, D)))
        torch.testing.assert_close(v_res[dst].float(), bf16_round(vw.reshape(PAGE, HK, D)))
    assert int(pool.residual_of_slot[1]) == dst


def test_tail_store_lru_and_count_follow_every_use_add_and_removal():
    # The store keeps its LRU order and count incrementally; after any sequence of matches,
    # adds, removals and group drops they must equal a recount sorted by last use.
    import random

    rng = random.Random(3)
    s = TailStore()
    pages = iter(range(10**6))
    for _ in range(3000):
        group = (rng.randrange(6), rng.choice([None, "ns"]))
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
        op = rng.random()
        if op < 0.45:
            s.add(group, tokens, next(pages))
        elif op < 0.75:
            s.match(group, tokens)
        elif op < 0.9 and len(s):
            s.remove(rng.choice(list(s)))
        else:
            s.drop_groups([group])
        tails = list(s)
        assert len(s) == len(tails)
        assert all(t.alive for t in tails)
        protect = {id(t) for t in tails if rng.random() < 0.2}
        n = rng.randrange(0, len(tails) + 2)
        want = sorted((t for t in tails if id(t) not in protect), key=lambda t: t.last_used)
        assert s.lru(n, protect) == want[:n]
