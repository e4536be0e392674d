"""Prefix-cache benchmark: oscar-kv's Rust cache manager vs SGLang's RadixCache (Python) vs
SGLang's UnifiedRadixCache on its Rust tree core, on one multi-turn serving trace.

Trace (deterministic from --seed): --conversations conversations of 4-16 turns, each on one
of --system-prompts system prompts of 1-8K tokens (Zipf-popular), turns of 16-256 user and
32-512 assistant tokens, every turn's prompt being the whole conversation so far; 10% of the
conversations run under one of three LoRA namespaces (extra_key). Up to --active
conversations are open at once and their turns interleave. Then SGLang's
generated-shared-prefix shape (--gsp-groups groups x 16 prompts, 2048-token system prompt, 128-token
question, 256 output tokens, shuffled). Requests run --batch at a time, like a running
batch: a request is admitted when it arrives and finished when --batch newer ones are
running; its whole KV (prompt and output) is allocated at admission. The pool (--pool-pages
pages of 128 tokens) is far smaller than the trace, so eviction runs throughout.

Every implementation does the same bookkeeping through its Python-facing API, token ids
passed as array('q') buffers, and only those calls (and what the scheduler does around
them) are timed; building requests and token arrays is not:
- oscar: ``oscar_kv._native.PrefixCache`` (Rust tree + Rust page allocator) through its
  request-level calls ``admit`` (match, lock, evict the shortfall, allocate) / ``release``
  (insert the whole pages, free duplicates and the partial last page, unlock);
- oscar-fine (detail CSV only): the same cache through one call per step (match_prefix,
  lock, evict, alloc, insert, free, unlock);
- sglang-python: ``RadixCache`` + SGLang's ``PagedTokenToKVPoolAllocator`` (CPU tensors);
- sglang-rust: ``UnifiedRadixCache`` with tree_core_backend="rust" + the same allocator;
- oscar-sglang-backend (detail CSV only): the prefix cache and allocator a ``--kv-quant
  oscar`` server builds, ``oscar_kv.sglang.radix.OscarRadixCache`` over
  ``oscar_kv.sglang.allocator.OscarPageAllocator`` (the Rust page allocator), over SGLang's
  bf16 pool: without residual pages, so its prefixes are whole pages and it does exactly
  the work SGLang's caches do;
- oscar-sglang-tails (detail CSV only): the same over the oscar pool
  (``OscarTokenToKVPool``, one bf16 residual page per request slot), i.e. what a
  ``--kv-quant oscar`` server runs: a prefix may end inside a page (a cached tail copied,
  or a packed page dequantized, into the request's residual page; on this host the torch
  dequantization, which a GPU does in one kernel), a finished request's partial page is
  kept as a tail, and the new tokens continue a partial page through ``alloc_extend`` (on
  this allocator the Rust path a server runs). Its prefixes are longer, so its matches,
  evictions and op counts are its own; a request is admitted only if its pages fit in what
  is free or evictable (PrefillAdder's check), since its copy of a partial page is taken
  before any eviction.
The SGLang-API caches run one driver, the calls a live SGLang 0.5.23 scheduler makes,
on SGLang ``Req`` objects and a CPU ``ReqToTokenPool`` (--batch + 4 rows of MAX_CONTEXT):
- admission (``Sglang.admit``): ``common.match_kv_cache`` (``match_prefix`` with
  ``MatchPrefixParams(key=RadixKey(...), req=req)``, as ``Req.init_next_round_input``),
  ``req.lock = cache.lock(req.last_node)`` (``PrefillAdder``), then ``alloc_for_extend``'s
  steps: ``cache.prefix_device_indices(req)``, ``ReqToTokenPool.alloc([req])``,
  ``cache.evict_for_alloc`` of the shortfall (``allocator.evict_to_free_tokens``), the
  allocator's page-aligned ``alloc``, ``ReqToTokenPool.write`` of the row,
  ``cache.maybe_hand_to_session(req)``;
- finish (``Sglang.finish``): the server's release path, ``common.release_kv_cache(req,
  cache, checkpoint=True)``: ``claim_kv_row``, ``cache.checkpoint(req, up_to=owned_kv_len)``
  (``RadixCache.checkpoint``: ``_insert_cache`` -- insert the whole pages, split the leaf at
  the prompt boundary, free the request's duplicates -- then ``match_prefix``,
  ``path_device_indices``, ``ReqToTokenPool.write`` of the row onto the tree's pages,
  ``unlock`` / ``lock`` onto the new node; the other two take the same steps their own
  way), ``free_kv_row`` of the rest of the row, ``unlock(req.lock)``, ``on_release``,
  ``ReqToTokenPool.free(req)``.
Where this differs from a server: the match is capped at the prompt (the server's
``_compute_max_prefix_len`` caps it one token earlier), the eviction is the exact shortfall
(``alloc_paged_token_slots_extend`` asks for one spare page per request), pages come from
``alloc`` (``alloc_extend`` takes the same pages; on a host without Triton it runs a torch
fallback no GPU server runs) and the output's KV is allocated with the prompt's.

All implementations run in one process on the same event stream, each event handed to
each of them in turn (rotating order), so machine noise hits them alike; then each runs
alone in a subprocess (same imports everywhere) for its peak RSS and its time alone. The
interleaved run also makes every cache start each call with caches (CPU) the others just
filled, which costs the fast ones most; the speedup_* columns are interleaved ops/s
ratios, speedup_alone_* the ratios of the runs alone (a server runs one cache, between
other scheduler work): the truth for a live scheduler lies between the two. The matched
length of every request, the rejected requests and the evicted token total must agree
across all implementations but oscar-sglang-tails; the op count (and evict calls) across
those with the same driver (the three whole-page SGLang-API caches; oscar and oscar-fine): the SGLang checkpoint's split at the prompt
boundary leaves the output its own leaf, so LRU eviction frees fewer tokens per call than
the Rust PrefixCache (one leaf per request) and evicts more often.

A third run, the split run, repeats the interleaved one for the SGLang-API caches with
every public method of each cache and of its KV allocator timed (``CallTimer``; a call one
makes into the other counts once, in the outer call). ``ReqToTokenPool.alloc`` and ``free`` are
timed as their own part, request slots: SGLang's code on every row, wrapped by the oscar
cache and pool when there are residual pages (a slot's page, a continued tail's copy).
What the timed steps spend outside all of those is the scheduler's own code (the row
writes, ``Req`` state, the glue in ``match_kv_cache`` and ``release_kv_cache``), the same
work for every cache. The
speedup_cache_* columns are the ratios of the time inside the cache and allocator calls;
ceiling_* is what a row's split-run speedup would be if its cache and allocator calls took
no time at all. The timers add a fraction of a microsecond per call to every row.

An op is one request admission (1 + the evict calls it makes) or one request finish (1);
ops_per_s is ops over the timed seconds. Writes benches/results/radix.csv
(device,commit,impl,ops_per_s,matched_tokens_per_s,hit_rate,peak_rss_mb), radix_detail.csv,
radix_split.csv (the split run per method, and the scheduler's share) and radix.png; commit
is the checkout's HEAD (run it on committed code).

    python benches/bench_radix.py                 # full run (about 8 minutes on 2 cores)
    python benches/bench_radix.py --conversations 200 --gsp-groups 8   # quick
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter, defaultdict, deque
from pathlib import Path

import numpy as np

PAGE = 128
VOCAB = 32000
# Trace shape, inclusive ranges: system prompt, turns per conversation, user and assistant
# tokens per turn; SGLang's generated-shared-prefix system prompt, question and output.
SYSTEM_TOKENS = (1024, 8192)
TURNS = (4, 16)
USER_TOKENS = (16, 256)
ASSISTANT_TOKENS = (32, 512)
GSP_SYSTEM, GSP_QUESTION, GSP_OUTPUT = 2048, 128, 256
# The longest request of any trace: the ReqToTokenPool's row length.
MAX_CONTEXT = max(
    SYSTEM_TOKENS[1] + TURNS[1] * (USER_TOKENS[1] + ASSISTANT_TOKENS[1]),
    GSP_SYSTEM + GSP_QUESTION + GSP_OUTPUT,
)
IMPLS = [
    "oscar",
    "sglang-python",
    "sglang-rust",
    "oscar-fine",
    "oscar-sglang-backend",
    "oscar-sglang-tails",
]
HEADLINE = ["oscar", "sglang-python", "sglang-rust"]


# ----- trace -----------------------------------------------------------------------------


def trace(args):
    """Yields ("admit", rid, tokens, prompt_len, namespace) and ("finish", rid) events."""
    rng = np.random.default_rng(args.seed)

    def tokens(n: int) -> array:
        return array("q", rng.integers(1, VOCAB, n, dtype=np.int64).tobytes())

    sys_lens = rng.integers(SYSTEM_TOKENS[0], SYSTEM_TOKENS[1] + 1, args.system_prompts)
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
                {
                    "history": array("q", systems[s]),
                    "turns": int(rng.integers(TURNS[0], TURNS[1] + 1)),
                    "ns": ns,
                }
            )
            started += 1
        i = int(rng.integers(len(active)))
        conv = active[i]
        prompt = conv["history"] + tokens(int(rng.integers(USER_TOKENS[0], USER_TOKENS[1] + 1)))
        full = prompt + tokens(int(rng.integers(ASSISTANT_TOKENS[0], ASSISTANT_TOKENS[1] + 1)))
        yield from admit(full, len(prompt), conv["ns"])
        conv["history"] = full
        conv["turns"] -= 1
        if conv["turns"] == 0:
            active.pop(i)

    # SGLang's generated-shared-prefix dataset shape.
    groups = [tokens(GSP_SYSTEM) for _ in range(args.gsp_groups)]
    reqs = [(g, q) for g in range(args.gsp_groups) for q in range(16)]
    order = rng.permutation(len(reqs))
    questions = {r: tokens(GSP_QUESTION) for r in reqs}
    for k in order:
        g, q = reqs[k]
        prompt = groups[g] + questions[(g, q)]
        yield from admit(prompt + tokens(GSP_OUTPUT), len(prompt), None)
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

    def request(self, rid: int, toks: array, prompt_len: int, ns):
        return toks, prompt_len, ns

    def admit(self, request):
        toks, prompt_len, ns = request
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

    def finishing(self, state) -> None:
        pass

    def finish(self, state) -> None:
        toks, ns, node, pages = state
        self.c.release(toks, pages, node, ns)

    def check(self) -> None:
        self.c.check_all_invariants()
        assert self.c.protected_pages == 0


class OscarFine(Oscar):
    """The same cache through its fine-grained calls, one per step, as a scheduler written
    against SGLang's BasePrefixCache would make them."""

    def admit(self, request):
        toks, prompt_len, ns = request
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


class CallTimer:
    """Wall time inside the outermost calls to the cache's and the KV allocator's own
    methods, per method. A call one of them makes into the other (RadixCache.evict freeing
    through the allocator, a checkpoint re-matching its key) counts once, in the outer
    call; everything else the timed scheduler steps do (the ReqToTokenPool, Req state,
    match_kv_cache's and release_kv_cache's own code) is the scheduler's share."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._inside = False

    def instrument(self, obj, owner: str, names: list[str] | None = None) -> None:
        """Times the listed methods of ``obj`` (all public methods of its class by default)
        through ``obj`` (an instance attribute shadowing the method, so SGLang's glue calls
        the timed one; a wrapper already set on ``obj`` is timed as it is)."""
        if names is None:
            members = inspect.getmembers(type(obj), inspect.isfunction)
            names = [n for n, _ in members if not n.startswith("_")]
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name), f"{owner}.{name}"))

    def seconds_of(self, owners: tuple[str, ...]) -> float:
        return sum(v for k, v in self.seconds.items() if k.split(".")[0] in owners)

    def _timed(self, f, label: str):
        clock = time.perf_counter

        def timed(*args, **kwargs):
            if self._inside:
                return f(*args, **kwargs)
            self._inside = True
            t0 = clock()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[label] += clock() - t0
                self.calls[label] += 1
                self._inside = False

        return timed


class Sglang:
    """A SGLang BasePrefixCache over a paged allocator (CPU tensors), driven through the
    scheduler's own entry points on SGLang ``Req`` objects and a real ``ReqToTokenPool``."""

    def __init__(self, pool_pages: int, kind: str, batch: int):
        import torch
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.common import match_kv_cache, release_kv_cache
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.mem_cache.radix_cache import RadixCache
        from sglang.srt.sampling.sampling_params import SamplingParams
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        # release_kv_cache reads get_spec() / get_serving(), which this publishes.
        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=PAGE))
        self.Req, self.FINISH_LENGTH = Req, FINISH_LENGTH
        self.EvictParams = EvictParams
        self.match_kv_cache, self.release_kv_cache = match_kv_cache, release_kv_cache
        self.sampling = SamplingParams(temperature=0, max_new_tokens=ASSISTANT_TOKENS[1])
        self.empty = torch.empty((0,), dtype=torch.int64)
        self.torch = torch
        self.size = pool_pages * PAGE
        # At most --batch requests hold a row at once (run_trace finishes one before the
        # next is admitted); the spare rows only guard against an off-by-one there.
        self.rows = batch + 4
        self.req_to_token_pool = ReqToTokenPool(
            size=self.rows,
            max_context_len=MAX_CONTEXT,
            device="cpu",
            enable_memory_saver=False,
        )
        self.tails = kind == "oscar-sglang-tails"
        if self.tails:
            # What a --kv-quant oscar server builds: the oscar pool, one bf16 residual page
            # per request slot (its KV budget's reservation), so a prefix may end inside a
            # page (a cached tail) and a finished request's partial page is kept as one.
            from oscar_kv import OscarConfig
            from oscar_kv.sglang.pool import OscarTokenToKVPool

            kv = OscarTokenToKVPool(
                self.size,
                PAGE,
                torch.bfloat16,
                1,
                64,
                1,
                "cpu",
                config=OscarConfig(),
                residual_pages=self.rows,
            )
            kv.attach(self.req_to_token_pool)
            # The server's attention backend picks (and loads) the kernels at start-up,
            # before any request: a partial page's dequantization then finds them loaded.
            from oscar_kv import ops

            ops.resolve_backend(None, torch.device("cpu"))
        else:
            from oscar_kv.sglang._testing import bookkeeping_kv_pool

            kv = bookkeeping_kv_pool(self.size, PAGE)
        self.kv = kv
        # Pages 1..pool_pages are allocatable (page 0 is the padding page): the same pool
        # size as oscar's. The oscar backends get the allocator a --kv-quant oscar server
        # builds (oscar_kv.sglang.plugin): the Rust one.
        if kind in ("oscar-sglang-backend", "oscar-sglang-tails"):
            from oscar_kv.sglang.allocator import OscarPageAllocator

            alloc_cls = OscarPageAllocator
        else:
            alloc_cls = PagedTokenToKVPoolAllocator
        self.alloc = alloc_cls(self.size, PAGE, torch.bfloat16, "cpu", kv, need_sort=False)
        params = CacheInitParams(
            disable=False,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.alloc,
            page_size=PAGE,
        )
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

    def request(self, rid: int, toks: array, prompt_len: int, ns):
        """The request as the scheduler holds it when it first tries to admit it (untimed):
        prompt in origin_input_ids, fill ids = the prompt (their own array, as
        refresh_fill_ids builds them), no output yet."""
        if len(toks) > MAX_CONTEXT:
            raise ValueError(f"request of {len(toks)} tokens > MAX_CONTEXT {MAX_CONTEXT}")
        req = self.Req(
            rid=str(rid),
            origin_input_text="",
            origin_input_ids=toks[:prompt_len],
            sampling_params=self.sampling,
            extra_key=ns,
        )
        req.full_untruncated_fill_ids = toks[:prompt_len]
        return req, toks

    def admit(self, request):
        """Req.init_next_round_input's match, PrefillAdder's lock, then alloc_for_extend:
        prefix_device_indices, a row (alloc_req_slots), eviction of the shortfall, the
        pages for the whole request (prompt and output at once), the row written."""
        req, toks = request
        cache, alloc, rtp = self.cache, self.alloc, self.req_to_token_pool
        prompt_len, seq_len = len(req.origin_input_ids), len(toks)
        # The server caps the match at prompt_len - 1 (_compute_max_prefix_len: one token
        # is always computed); the trace caps it at the prompt, like oscar's admit.
        m = self.match_kv_cache(
            req, cache, req.full_untruncated_fill_ids, max_prefix_len=prompt_len
        )
        if m.cache_protected_len is None:
            req.kv.cache_protected_len = req.prefix_len
        matched = req.prefix_len
        req.lock = cache.lock(req.last_node)
        if self.tails:
            # A prefix may end inside a page: prefix_device_indices takes a page for the
            # request's copy of it, and the new tokens continue that page, then take whole
            # ones. Admitted only if both fit in what is free or evictable (PrefillAdder's
            # check; the copy page is taken before any eviction of the shortfall).
            need = (-(-seq_len // PAGE) - -(-matched // PAGE)) * PAGE
            copy = PAGE if matched % PAGE else 0
            if need + copy > alloc.available_size() + cache.evictable_size():
                cache.unlock(req.lock)
                req.lock = None
                return matched, None
        else:
            need = -(-(seq_len - matched) // PAGE) * PAGE
        prefix = cache.prefix_device_indices(req) if matched else self.empty
        rtp.alloc([req])
        # allocator.evict_to_free_tokens's shortfall (without alloc_paged_token_slots_extend's
        # spare page per request, which oscar's admit does not take either).
        short = need - alloc.available_size()
        if short > 0:
            res = cache.evict_for_alloc(self.EvictParams(num_tokens=short))
            self.evicted_tokens += res.num_tokens_evicted
            self.evictions += 1
        # Page-aligned alloc() rather than alloc_extend(): on a host without Triton SGLang's
        # alloc_extend runs a torch fallback a GPU server never runs; a fresh page-aligned
        # extend takes exactly these pages either way.
        if self.tails:
            # alloc_extend continues the prefix's partial page (on this allocator it is the
            # Rust path a server runs, not SGLang's torch fallback).
            lens = self.torch.tensor([matched])
            last = prefix[-1:] if matched else self.torch.tensor([-1])
            seqs = self.torch.tensor([seq_len])
            fresh = alloc.alloc_extend(lens, lens, seqs, seqs, last, seq_len - matched)
        else:
            fresh = alloc.alloc(need)
        if fresh is None:
            # The scheduler would not have admitted it: give back the lock, the request's own
            # copy of a partial page, and the row.
            cache.unlock(req.lock)
            req.lock = None
            if matched > req.kv.cache_protected_len:
                alloc.free(prefix[req.kv.cache_protected_len :])
            rtp.free(req)
            return matched, None
        idx = req.kv.req_pool_idx
        rtp.write((idx, slice(0, matched)), prefix)
        rtp.write((idx, slice(matched, seq_len)), fresh[: seq_len - matched])
        req.kv.kv_allocated_len = req.kv.kv_committed_len = seq_len
        cache.maybe_hand_to_session(req)
        return matched, request

    def finishing(self, state) -> None:
        """What decoding left on the request (untimed): its output ids, a finish reason."""
        req, toks = state
        req.output_ids = toks[len(req.origin_input_ids) :]
        req.finished_reason = self.FINISH_LENGTH(length=len(req.output_ids))

    def finish(self, state) -> None:
        # The scheduler's finish: checkpoint (insert, free duplicates, repoint the row, move
        # the lock), free the rest of the row, unlock, on_release, free the row.
        self.release_kv_cache(state[0], self.cache, checkpoint=True)

    def check(self) -> None:
        """Nothing locked, no row held, and every page free or evictable (no leak)."""
        cache = self.cache
        assert cache.protected_size() == 0, cache.protected_size()
        assert self.req_to_token_pool.available_size() == self.rows
        free, evictable = self.alloc.available_size(), cache.evictable_size()
        assert free + evictable == self.size, (free, evictable, self.size)
        if self.tails:
            res = self.kv.residual_state()
            assert res["held"] == 0 and res["free"] + res["cached"] == res["total"], res


def sglang_importable() -> bool:
    try:
        from oscar_kv.sglang._testing import import_sglang_cache

        import_sglang_cache()
        import sglang.srt.mem_cache.unified_radix_cache  # noqa: F401 - same imports everywhere

        import oscar_kv.sglang.pool  # noqa: F401
    except ImportError:
        return False
    return True


def make_impl(name: str, pool_pages: int, batch: int):
    if name == "oscar":
        return Oscar(pool_pages)
    if name == "oscar-fine":
        return OscarFine(pool_pages)
    return Sglang(pool_pages, name, batch)


_KEEP: list = []


def run_trace(
    args, names: list[str], keep: bool = False, split: dict[str, CallTimer] | None = None
) -> dict[str, dict]:
    """Feeds every event of the trace to every implementation in turn (the order rotating
    from event to event), timing each call: machine noise hits all of them alike. With
    `keep`, the caches stay alive after the call (for measuring their memory); with
    `split`, each named SGLang-API implementation's cache and allocator calls are timed
    too (`CallTimer`)."""
    impls = {n: make_impl(n, args.pool_pages, args.batch) for n in names}
    for n, timer in (split or {}).items():
        timer.instrument(impls[n].cache, "cache")
        timer.instrument(impls[n].alloc, "allocator")
        # SGLang's own code on every row; with residual pages the oscar cache and pool wrap
        # both (a slot's residual page, a continued tail's copy), so they are their own part.
        timer.instrument(impls[n].req_to_token_pool, "request_slots", ["alloc", "free"])
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
                request = impl.request(rid, toks, prompt_len, ns)
                evictions = impl.evictions
                t0 = clock()
                matched, state = impl.admit(request)
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
                    impl.finishing(state)
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


def driver(impl: str) -> str:
    return "rust-prefix-cache" if impl in ("oscar", "oscar-fine") else "sglang-server"


def same_work(impl: str) -> bool:
    """Whether the implementation matches exactly SGLang's whole-page prefixes (all but the
    row with tails, whose prefixes may end inside a page)."""
    return impl != "oscar-sglang-tails"


def check_agree(results: list[dict]) -> None:
    """Same matches, rejections and evicted tokens among the same-work implementations (and
    between runs of one implementation); same ops and evict calls among the implementations
    one driver runs (see the module docstring)."""
    shared = [r for r in results if same_work(r["impl"])]
    for r in results:
        if not same_work(r["impl"]):
            own = [f for f in results if f["impl"] == r["impl"]]
            for key in ("matched_sha1", "evicted_tokens", "rejected", "requests", "ops"):
                assert all(f[key] == r[key] for f in own), (key, r["impl"])
    if not shared:
        return
    first = shared[0]
    for r in shared[1:]:
        assert r["matched_sha1"] == first["matched_sha1"], (
            f"{r['impl']} matched other lengths than {first['impl']}"
        )
        for key in ("hit_rate", "evicted_tokens", "rejected", "requests"):
            assert r[key] == first[key], (key, r["impl"], r[key], first["impl"], first[key])
    for r in shared:
        same = next(f for f in shared if driver(f["impl"]) == driver(r["impl"]))
        for key in ("ops", "evict_calls"):
            assert r[key] == same[key], (key, r["impl"], r[key], same["impl"], same[key])


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
    split_names = [n for n in names if driver(n) == "sglang-server"]
    timers = {n: CallTimer() for n in split_names}
    if split_names:
        t0 = time.time()
        split = run_trace(args, split_names, split=timers)
        print(f"[bench_radix] interleaved split run: {time.time() - t0:.0f} s", flush=True)
        check_agree([timed[n] for n in split_names] + list(split.values()))
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
        if name in timers:
            timer = timers[name]
            r["split_seconds"] = split[name]["seconds"]
            r["cache_seconds"] = timer.seconds_of(("cache", "allocator"))
            r["slots_seconds"] = timer.seconds_of(("request_slots",))
            r["split_calls"] = {k: timer.calls[k] for k in sorted(timer.calls)}
            r["split_method_seconds"] = {k: timer.seconds[k] for k in sorted(timer.seconds)}
        shown = {k: v for k, v in r.items() if not k.startswith("split_")}
        print(f"[bench_radix] {name}: {json.dumps(shown)} ({time.time() - t0:.0f} s)", flush=True)
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


def ops_alone(r: dict) -> float:
    """Operations per second of the implementation's run alone in a subprocess."""
    return r["ops"] / r["seconds_alone"]


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
        "speedup_alone_vs_sglang_python",
        "speedup_alone_vs_sglang_rust",
        "split_seconds",
        "cache_us_per_request",
        "slots_us_per_request",
        "scheduler_us_per_request",
        "speedup_cache_vs_sglang_python",
        "speedup_cache_vs_sglang_rust",
        "ceiling_vs_sglang_python",
        "ceiling_vs_sglang_rust",
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
                # Each alone in its own process: ops/s from its own run, no other cache
                # evicting its working set between calls (see the module docstring).
                row[col.replace("_vs_", "_alone_vs_")] = (
                    f"{ops_alone(r) / ops_alone(ran[base]):.2f}" if base in ran else ""
                )
                # The split run (see CallTimer): the same work on every SGLang-API row, so
                # time ratios are ops/s ratios. ceiling: this row's split-run speedup if its
                # cache and allocator calls took no time at all.
                split = "cache_seconds" in r and base in ran and "cache_seconds" in ran[base]
                b = ran.get(base, {})
                row[col.replace("speedup_", "speedup_cache_")] = (
                    f"{b['cache_seconds'] / r['cache_seconds']:.2f}" if split else ""
                )
                row[col.replace("speedup_", "ceiling_")] = (
                    f"{b['split_seconds'] / (r['split_seconds'] - r['cache_seconds']):.2f}"
                    if split
                    else ""
                )
            if "cache_seconds" in r:
                per_req = 1e6 / r["requests"]
                row["cache_us_per_request"] = r["cache_seconds"] * per_req
                row["slots_us_per_request"] = r["slots_seconds"] * per_req
                row["scheduler_us_per_request"] = (
                    r["split_seconds"] - r["cache_seconds"] - r["slots_seconds"]
                ) * per_req
            else:
                for c in (
                    "split_seconds",
                    "cache_us_per_request",
                    "slots_us_per_request",
                    "scheduler_us_per_request",
                ):
                    row[c] = ""
            w.writerow(
                [row[c] if not isinstance(row[c], float) else f"{row[c]:.4f}" for c in detail]
            )
    with open(out / "radix_split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "commit", "impl", "part", "calls", "seconds", "us_per_request"])
        for name, r in ran.items():
            if "cache_seconds" not in r:
                continue
            parts = [(k, r["split_calls"][k], v) for k, v in r["split_method_seconds"].items()]
            rest = r["split_seconds"] - r["cache_seconds"] - r["slots_seconds"]
            parts.append(("scheduler", "", rest))
            for part, calls, sec in parts:
                us = sec / r["requests"] * 1e6
                w.writerow(
                    [run["device"], run["commit"], name, part, calls, f"{sec:.6f}", f"{us:.2f}"]
                )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ran)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = ["#1b7837" if n.startswith("oscar") else "#762a83" for n in names]
    base = ran.get("sglang-python")
    x = np.arange(len(names))
    for shift, (what, ops, alpha) in zip(
        (-0.2, 0.2),
        [
            ("interleaved", lambda r: r["ops_per_s"], 1.0),
            ("alone", ops_alone, 0.45),
        ],
    ):
        vals = [ops(ran[n]) for n in names]
        axes[0].bar(x + shift, vals, width=0.4, color=colors, alpha=alpha, label=what)
        for i, v in enumerate(vals):
            label = f"{v:,.0f}" + (f"\n{v / ops(base):.1f}x" if base else "")
            axes[0].text(i + shift, v, label, ha="center", va="bottom", fontsize=7)
    axes[0].set_xticks(x, names)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("cache operations / s (log); x = vs sglang-python")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [ran[n]["cache_rss_mb"] for n in names], color=colors)
    axes[1].set_ylabel("RSS growth while the cache is alive (MB)")
    peak = max(ran[n]["peak_rss_mb"] for n in names)
    axes[1].set_title(f"process peak RSS (torch + sglang imported): <= {peak:.0f} MB", fontsize=9)
    split = [n for n in names if "cache_seconds" in ran[n]]
    cache_us = [ran[n]["cache_seconds"] / ran[n]["requests"] * 1e6 for n in split]
    slots_us = [ran[n]["slots_seconds"] / ran[n]["requests"] * 1e6 for n in split]
    sched_us = [
        (ran[n]["split_seconds"] - ran[n]["cache_seconds"] - ran[n]["slots_seconds"])
        / ran[n]["requests"]
        * 1e6
        for n in split
    ]
    below = [a + b for a, b in zip(sched_us, slots_us)]
    axes[2].bar(split, sched_us, color="#bbbbbb", label="scheduler's own code")
    axes[2].bar(split, slots_us, bottom=sched_us, color="#f4a582", label="request slots")
    axes[2].bar(split, cache_us, bottom=below, color="#4393c3", label="cache + allocator")
    for i, (a, c) in enumerate(zip(below, cache_us)):
        label = f"{c:.0f} + {slots_us[i]:.0f} + {sched_us[i]:.0f}"
        axes[2].text(i, a + c, label, ha="center", va="bottom", fontsize=7)
    axes[2].set_ylabel("µs per request (split run, interleaved)")
    axes[2].legend(fontsize=8)
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
                alone = ops_alone(ran[name]) / ops_alone(ran[base])
                print(
                    f"[bench_radix] {name} vs {base}: {ratio:.2f}x ops/s interleaved, "
                    f"{alone:.2f}x alone"
                )
                if "cache_seconds" in ran[name] and "cache_seconds" in ran[base]:
                    r, b = ran[name], ran[base]
                    cache = b["cache_seconds"] / r["cache_seconds"]
                    ceiling = b["split_seconds"] / (r["split_seconds"] - r["cache_seconds"])
                    print(
                        f"[bench_radix] {name} vs {base}: {cache:.2f}x in the cache and "
                        f"allocator calls alone (split run); {ceiling:.2f}x if they cost "
                        "nothing"
                    )


if __name__ == "__main__":
    main()
