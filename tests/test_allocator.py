"""``oscar_kv.sglang.allocator.OscarPageAllocator`` against SGLang 0.5.23's
``PagedTokenToKVPoolAllocator``.

Differential: both allocators get the same random extend / decode / free batches (prefixes
that end inside a page, fresh requests, chunked continuations, decode steps opening pages,
free groups) and must hand out the same locations modulo the choice of page ids: the same
slot in the page for every token, a one-to-one map between their live pages and ours, no
live page twice, the same available_size and the same out-of-memory answers. Then the
companion pages (one set per first page, freed with it, never in a location, the reclaim
callback, None when out), backup / restore, clear and the error paths.

Skipped, with the install command, when sglang is not importable.
"""

import random

import numpy as np
import pytest
import torch

from oscar_kv import _native
from oscar_kv.sglang._testing import import_sglang_cache

try:
    import_sglang_cache()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)

from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

from oscar_kv.sglang.allocator import OscarPageAllocator


class FakePool:
    """What the allocator reads of an OscarTokenToKVPool: ``sink_companions`` and
    ``set_companions`` (the device table, here a dict)."""

    def __init__(self, companions: int = 0) -> None:
        self.sink_companions = companions
        self.table: dict[int, list[int]] = {}
        self.calls = 0

    def set_companions(self, first_pages: list[int], companions: list[list[int]]) -> None:
        assert isinstance(first_pages, list) and isinstance(companions, list)
        assert len(first_pages) == len(companions)
        self.calls += 1
        for p, c in zip(first_pages, companions):
            assert len(c) == self.sink_companions
            self.table[p] = list(c)


def make(kind: str, pages: int, ps: int, pool=None):
    cls = OscarPageAllocator if kind == "oscar" else PagedTokenToKVPoolAllocator
    return cls(pages * ps, ps, torch.bfloat16, "cpu", pool, need_sort=False)


class PageMap:
    """Live pages of ours <-> theirs: must stay a bijection while both are allocated."""

    def __init__(self) -> None:
        self.fwd: dict[int, int] = {}
        self.back: dict[int, int] = {}

    def check(self, ours: torch.Tensor, theirs: torch.Tensor, ps: int) -> None:
        assert ours.shape == theirs.shape and ours.dtype == torch.int64
        assert torch.equal(ours % ps, theirs % ps), "slot inside the page differs"
        for po, pt in zip((ours // ps).tolist(), (theirs // ps).tolist()):
            assert po >= 1, "page 0 is the padding page"
            assert self.fwd.setdefault(po, pt) == pt, f"our page {po} maps to two pages"
            assert self.back.setdefault(pt, po) == po, f"their page {pt} maps to two pages"

    def drop(self, ours: list[int], ps: int) -> None:
        for po in {x // ps for x in ours}:
            self.back.pop(self.fwd.pop(po))


def test_differential_vs_paged_allocator():
    rng = random.Random(0)
    ps, pages = 8, 48
    ours, theirs = make("oscar", pages, ps), make("sglang", pages, ps)
    pm = PageMap()
    rows: list[tuple[list[int], list[int]]] = []  # running requests: (our row, their row)
    stats = {"extend": 0, "decode": 0, "none": 0, "freed": 0, "continued": 0}

    def live_pages_unique() -> None:
        seen: set[int] = set()
        for row, _ in rows:
            ps_of = {x // ps for x in row}
            assert not ps_of & seen, "a page is held by two requests"
            seen |= ps_of

    for step in range(400):
        op = rng.random()
        if op < 0.4:
            # An extend batch: some running requests continue (chunked prefill), some new
            # ones arrive, with prefixes of their own (copied rows of a finished request
            # would be SGLang's radix hits; here the prefix is the request's own tokens).
            batch = [i for i in range(len(rows)) if rng.random() < 0.3]
            n_new = rng.randrange(0, 4)
            prefix = [len(rows[i][0]) for i in batch] + [0] * n_new
            seq = [p + rng.randrange(1, 3 * ps) for p in prefix]
            last_o = [rows[i][0][-1] if rows[i][0] else -1 for i in batch] + [-1] * n_new
            last_t = [rows[i][1][-1] if rows[i][1] else -1 for i in batch] + [-1] * n_new
            if not seq:
                continue
            args = [torch.tensor(prefix), torch.tensor(prefix), torch.tensor(seq)]
            args.append(torch.tensor(seq))
            n = sum(s - p for s, p in zip(seq, prefix))
            o = ours.alloc_extend(*args, torch.tensor(last_o), n)
            t = theirs.alloc_extend(*args, torch.tensor(last_t), n)
            assert (o is None) == (t is None), step
            if o is None:
                stats["none"] += 1
            else:
                stats["extend"] += 1
                stats["continued"] += sum(p % ps != 0 for p in prefix)
                pm.check(o, t, ps)
                at = 0
                for k, (p, s) in enumerate(zip(prefix, seq)):
                    seg_o, seg_t = o[at : at + s - p].tolist(), t[at : at + s - p].tolist()
                    at += s - p
                    if k < len(batch):
                        rows[batch[k]][0].extend(seg_o)
                        rows[batch[k]][1].extend(seg_t)
                    else:
                        rows.append((seg_o, seg_t))
        elif op < 0.7 and rows:
            batch = [i for i in range(len(rows)) if rng.random() < 0.6] or [0]
            seq = torch.tensor([len(rows[i][0]) + 1 for i in batch])
            lo = torch.tensor([rows[i][0][-1] for i in batch])
            lt = torch.tensor([rows[i][1][-1] for i in batch])
            o, t = ours.alloc_decode(seq, seq, lo), theirs.alloc_decode(seq, seq, lt)
            assert (o is None) == (t is None), step
            if o is None:
                stats["none"] += 1
            else:
                stats["decode"] += 1
                pm.check(o, t, ps)
                for i, a, b in zip(batch, o.tolist(), t.tolist()):
                    rows[i][0].append(a)
                    rows[i][1].append(b)
        elif rows:
            grouped = rng.random() < 0.3
            if grouped:
                ours.free_group_begin()
                theirs.free_group_begin()
            for _ in range(rng.randrange(1, 3 if grouped else 2)):
                if not rows:
                    break
                ro, rt = rows.pop(rng.randrange(len(rows)))
                pm.drop(ro, ps)
                if rng.random() < 0.5:
                    ours.free(torch.tensor(ro))
                    theirs.free(torch.tensor(rt))
                else:
                    ours.free_segment(torch.tensor(ro), start_pos=0)
                    theirs.free_segment(torch.tensor(rt), start_pos=0)
                stats["freed"] += 1
            if grouped:
                ours.free_group_end()
                theirs.free_group_end()
        live_pages_unique()
        assert ours.available_size() == theirs.available_size(), step
        ours.check_invariants()
    for ro, rt in rows:
        ours.free(torch.tensor(ro))
        theirs.free(torch.tensor(rt))
    assert ours.available_size() == theirs.available_size() == pages * ps
    assert min(stats.values()) > 3, stats


def test_alloc_and_free_page_ids_match():
    ps = 4
    ours, theirs = make("oscar", 10, ps), make("sglang", 10, ps)
    o, t = ours.alloc(12), theirs.alloc(12)
    PageMap().check(o, t, ps)
    assert ours.alloc(40) is None and theirs.alloc(40) is None
    assert ours.available_size() == theirs.available_size() == 28
    ours.free_page_ids(o[::ps] // ps)
    ours.free_pages(np.array([], dtype=np.int64))
    assert ours.available_size() == 40
    # The host path and the tensor path free the same way; a double free is refused.
    p = ours.alloc(8)
    ours.free_pages(np.unique(p.numpy() // ps))
    with pytest.raises(_native.InvalidPage):
        ours.free_pages(np.unique(p.numpy() // ps))
    with pytest.raises(_native.InvalidPage):
        ours.free_pages([0])  # the padding page
    assert ours.available_size() == 40
    assert sorted(ours.get_all_free_pages().tolist()) == list(range(1, 11))


def test_companions_come_and_go_with_first_pages():
    ps, c = 4, 2
    pool = FakePool(c)
    a = make("oscar", 32, ps, pool)
    # Two fresh requests (3 and 9 tokens), one continuing (prefix 2 -> 6).
    prefix = torch.tensor([0, 0, 2])
    seq = torch.tensor([3, 9, 6])
    held = a.alloc(ps)  # the continuing request's first page (not page 0 of a new row)
    last = torch.tensor([-1, -1, int(held[1])])
    out = a.alloc_extend(prefix, prefix, seq, seq, last, 16)
    assert out[12:14].tolist() == held[2:].tolist()
    first_o = [int(out[0]) // ps, int(out[3]) // ps]
    assert sorted(pool.table) == sorted(first_o) and pool.calls == 1
    comps = [p for f in first_o for p in pool.table[f]]
    pages_out = set((out // ps).tolist())
    assert not pages_out & set(comps), "a companion was handed to SGLang"
    # 1 + 3 + 1 pages plus 2 companions per first page.
    assert a.available_size() == (32 - 6 - 2 * c) * ps
    assert a.companion_pages == 2 * c
    assert a.count_companions(first_o) == 2 * c
    with pytest.raises(_native.InvalidPage):  # a companion is not SGLang's to free
        a.free_pages([comps[0]])
    # Decode: a first token opens page 0 (companions); others do not.
    d = a.alloc_decode(torch.tensor([1, 7]), torch.tensor([1, 7]), torch.tensor([-1, int(out[-1])]))
    assert int(d[1]) == int(out[-1]) + 1
    assert int(d[0]) // ps in pool.table and a.companion_pages == 3 * c
    # alloc(first_page=True): the copy-on-write page of a short prefix.
    one = a.alloc(ps, first_page=True)
    assert int(one[0]) // ps in pool.table and a.companion_pages == 4 * c
    plain = a.alloc(ps)
    assert a.companion_pages == 4 * c
    # Freed with their page, and only then.
    before = a.available_size()
    a.free(out[:3])
    assert a.available_size() == before + (1 + c) * ps
    a.free(out[3:12])
    a.free(torch.cat((held, out[12:], d[1:])))
    a.free(d[:1])
    a.free(one)
    a.free(plain)
    assert a.companion_pages == 0
    assert a.available_size() == 32 * ps
    a.check_invariants()


def test_no_companions_means_no_table_writes():
    pool = FakePool(0)
    a = make("oscar", 8, 4, pool)
    a.alloc_extend(*[torch.tensor([0])] * 2, *[torch.tensor([5])] * 2, torch.tensor([-1]), 5)
    a.alloc(4, first_page=True)
    assert pool.calls == 0 and a.companion_pages == 0


def test_reclaim_then_none_when_out():
    ps, c = 4, 3
    pool = FakePool(c)
    a = make("oscar", 10, ps, pool)
    held = a.alloc(7 * ps)  # 3 pages left: one page + companions does not fit
    calls = []

    def reclaim(n: int) -> int:
        calls.append(n)
        a.free(held[: n * ps])
        return n

    args = [torch.tensor([0])] * 2 + [torch.tensor([2])] * 2 + [torch.tensor([-1]), 2]
    assert a.alloc_extend(*args) is None, "no reclaim callback: out of memory"
    assert a.available_size() == 3 * ps and pool.calls == 0
    a.reclaim_pages = reclaim
    out = a.alloc_extend(*args)
    assert calls == [1] and out is not None and out.numel() == 2
    assert a.available_size() == 0
    # Reclaim frees nothing: None, nothing taken.
    a.reclaim_pages = lambda n: 0
    assert a.alloc(ps, first_page=True) is None
    seq = torch.tensor([1])
    assert a.alloc_decode(seq, seq, torch.tensor([-1])) is None
    assert a.available_size() == 0
    a.check_invariants()


def test_backup_restore_and_clear():
    ps = 4
    a = make("oscar", 8, ps, FakePool(1))
    a.alloc(2 * ps, first_page=True)
    state = a.backup_state()
    x = a.alloc(5 * ps)
    assert a.available_size() == 0
    a.restore_state(state)
    assert a.available_size() == 5 * ps and a.companion_pages == 1
    assert torch.equal(a.alloc(5 * ps), x), "the same pages again after restore"
    a.clear()
    assert a.available_size() == 8 * ps and a.companion_pages == 0
    assert sorted(a.get_all_free_pages().tolist()) == list(range(1, 9))
    a.merge_and_sort_free()
    assert a.alloc(ps).tolist() == [4, 5, 6, 7]


def test_extend_checks_token_count():
    a = make("oscar", 8, 4)
    with pytest.raises(ValueError, match="extend_num_tokens"):
        a.alloc_extend(*[torch.tensor([0])] * 2, *[torch.tensor([5])] * 2, torch.tensor([-1]), 4)


def test_plugin_installs_it_over_an_oscar_pool_only(monkeypatch):
    from oscar_kv.config import OscarConfig
    from oscar_kv.sglang import plugin
    from oscar_kv.sglang.args import ENV_VAR, KVQuantSpec
    from oscar_kv.sglang.pool import OscarTokenToKVPool

    ps = 128
    pool = OscarTokenToKVPool(
        8 * ps, ps, torch.bfloat16, 2, 64, 1, "cpu", config=OscarConfig(), residual_pages=2
    )

    def orig(self, *, token_to_kv_pool, **kwargs):
        return PagedTokenToKVPoolAllocator(
            8 * ps, ps, torch.bfloat16, "cpu", token_to_kv_pool, need_sort=False
        )

    monkeypatch.delenv(ENV_VAR, raising=False)
    off = plugin._hook_build_allocator(orig, None, token_to_kv_pool=pool)
    assert type(off) is PagedTokenToKVPoolAllocator, "without --kv-quant oscar: SGLang's"
    monkeypatch.setenv(ENV_VAR, KVQuantSpec("oscar", 2, 32).to_env())
    on = plugin._hook_build_allocator(orig, None, token_to_kv_pool=pool)
    assert isinstance(on, OscarPageAllocator) and on.get_kvcache() is pool
    assert (on.size, on.page_size, on.num_pages) == (8 * ps, ps, 8)
    assert on.available_size() == off.available_size()
    other = plugin._hook_build_allocator(orig, None, token_to_kv_pool=FakePool())
    assert type(other) is PagedTokenToKVPoolAllocator, "not an oscar pool: SGLang's"
