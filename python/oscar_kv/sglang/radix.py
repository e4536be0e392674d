"""SGLang prefix-cache backend over the Rust radix tree (``oscar_kv._native.RadixTree``).

``OscarRadixCache`` implements SGLang 0.5.23's ``BasePrefixCache`` contract the way its own
``RadixCache`` does for a plain full-attention model with ``page_size`` > 1 (under
``--kv-quant oscar``: 128, one page = one quantization block), with the tree walks, LRU
bookkeeping and lock counting in Rust:

- ``match_prefix(MatchPrefixParams) -> MatchResult``: longest page-aligned cached prefix;
  the node handle (an int) goes into ``req.last_node`` and ``MatchResult.*_node``.
- ``insert(InsertParams) -> InsertResult``; ``checkpoint(req, up_to=...)`` (what the
  scheduler calls for chunked, decode and finishing requests): insert the request's whole
  pages, free its duplicates of cached pages, repoint its KV row onto the tree's pages and
  move its lock, with ``RadixCache.checkpoint``'s outcome and recency. On the host that is
  one binding call (``RadixTree.checkpoint_row``): the row's own pages identify its cached
  prefix by page id (no second comparison of the history's tokens, no re-match), and the
  row is rewritten only when the request had duplicates. The partial last page of a request
  is never inserted. ``cache_finished_req`` / ``cache_unfinished_req`` are kept as
  aliases for callers written against older SGLang.
- ``evict(EvictParams) -> EvictResult``: least recently used unlocked leaves first, whole
  leaves, the freed pages returned to SGLang's allocator in one call.
- ``free_kv_row(kv, ranges)`` (what ``release_kv_cache`` calls for the rest of the row): on
  the host the ranges' page ids go from a numpy view of the row to the Rust allocator.
- ``inc_lock_ref`` / ``dec_lock_ref`` (and the base ``lock`` / ``unlock``), sizes,
  ``reset``, ``path_device_indices``, ``dfs_weight_order``, ``all_values_flatten``,
  ``sanity_check``, ``pretty_print``.

The tree holds page ids (``kv_index // page_size``), one per whole page of the key. Over
`oscar_kv.sglang.allocator.OscarPageAllocator` (what ``--kv-quant oscar`` builds) evicted
and duplicate pages go back through its host path (``free_pages``: page ids, no tensor),
the allocator may ask the tree for pages (``reclaim_pages``) when a sequence's first page
needs companion pages, and a page counts its companions in the tree's sizes (evictable,
protected: SGLang's idle check and the leak line stay exact). Over SGLang's
own paged allocator everything works as well, through its tensor calls.

Prefixes that end inside a page (over an ``OscarTokenToKVPool``): a finished request's
partial last page (its bf16 residual page) stays cached as a tail of the node where its
whole pages end (`oscar_kv.sglang.tails`), so the next turn of a chat hits everything the
previous turn held; and a key that shares only the first tokens of a cached page (a system
prompt that ends mid-page, shared by requests with different questions) takes those tokens
from that packed page, dequantized, as SGLang's own token-granular cache would. The longer
of the two wins (the tail on a tie: it is exact). Copy-on-write: the request gets a fresh
allocator page for its own copy of the partial page (``prefix_device_indices``; SGLang's
admission reserves one page per request for this alignment) and, once SGLang gives it a
request slot (``ReqToTokenPool.alloc``), its residual page gets the tail's page copied or
the packed page's tokens dequantized. When residual pages run out, least recently used
tails are given back, and a tail whose page is needed moves to the request continuing it.
A source page stays unwritten until the batch's forward even if the tree evicts it in the
meantime (pages are written by forwards only), so the copy always reads what was matched. Namespaces: ``RadixKey.extra_key`` and
``cache_salt`` together, so different LoRA adapters or salts never share pages.
Unsupported (rejected at construction with a clear message): EAGLE bigram keys, eviction
policies other than LRU, hybrid SWA/Mamba models, HiCache, KV events.

``register_backend()`` registers the factory as ``--radix-cache-backend oscar``.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
    TreeLock,
)
from sglang.srt.mem_cache.common import coalesce_ranges
from sglang.srt.mem_cache.radix_cache import RadixKey

from oscar_kv import _native
from oscar_kv.sglang.tails import Tail, TailStore

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)

BACKEND_NAME = "oscar"
ROOT = _native.ROOT_NODE


@dataclass(frozen=True)
class PartialPage:
    """Where a prefix ending inside a page gets that page's first ``length`` tokens: a
    cached tail (its bf16 residual page, copied) or a packed page of the tree (dequantized)."""

    length: int
    tail: Tail | None = None
    page: int = -1


def _tree_namespace(extra_key: str | None, cache_salt: str | None) -> str | None:
    if extra_key is None and cache_salt is None:
        return None
    # repr of the pair is injective over (str | None, str | None).
    return repr((extra_key, cache_salt))


def _namespace(key: RadixKey) -> str | None:
    return _tree_namespace(key.extra_key, key.cache_salt)


def _request_namespace(req: Req) -> str | None:
    """The namespace of a request's keys (``RadixKey`` maps an empty salt to None)."""
    return _tree_namespace(req.extra_key, req.cache_salt or None)


class OscarRadixCache(BasePrefixCache):
    """SGLang prefix cache whose radix tree lives in Rust; see the module docstring."""

    def __init__(self, params: CacheInitParams):
        self.disable = params.disable
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = params.page_size
        self.is_eagle = params.is_eagle
        self.eviction_policy = params.eviction_policy.lower()
        self.sliding_window_size = None
        if self.is_eagle:
            raise ValueError(
                "radix cache backend 'oscar' does not support EAGLE bigram keys; "
                "drop --speculative-algorithm EAGLE or use the default radix cache"
            )
        if self.eviction_policy != "lru":
            raise ValueError(
                f"radix cache backend 'oscar' evicts LRU only, got --radix-eviction-policy "
                f"{params.eviction_policy!r}; use 'lru'"
            )
        if params.enable_kv_cache_events:
            raise ValueError("radix cache backend 'oscar' does not publish KV cache events")
        if params.sliding_window_size is not None:
            raise ValueError("radix cache backend 'oscar' does not support sliding windows")
        if params.enable_metrics:
            self.init_metrics_collector()

        allocator = self.token_to_kv_pool_allocator
        dev = getattr(allocator, "device", "cpu") if allocator is not None else "cpu"
        self.device = torch.device(dev if isinstance(dev, (str, torch.device)) else "cpu")
        # KV index tensors live on the allocator's device; on the host they are read as numpy.
        self._on_host = self.device.type == "cpu"
        size = getattr(allocator, "size", None) if allocator is not None else None
        # Token index i lives in page i // page_size; paged allocators hand out pages
        # 1..size // page_size (page 0 is padding), so this bound covers every index.
        num_pages = (size // self.page_size + 2) if size else (1 << 20)
        self.tree = _native.RadixTree(num_pages, page_size=self.page_size)
        self._free_page_ids = getattr(allocator, "free_page_ids", None) if allocator else None
        host_free = getattr(allocator, "free_pages", None) if allocator else None
        # SGLang's paged allocator has a tensor under that name; OscarPageAllocator a method.
        self._host_free = host_free if callable(host_free) else None
        self._free_heads = getattr(allocator, "free_page_heads", None) if self._host_free else None
        if hasattr(allocator, "reclaim_pages"):
            allocator.reclaim_pages = self._reclaim_pages
        self.tails = TailStore()
        kvcache = getattr(allocator, "get_kvcache", lambda: None)() if allocator else None
        self._residual = (
            kvcache
            if not self.disable and self.page_size > 1 and hasattr(kvcache, "detach_residual")
            else None
        )
        # Requests whose match ends inside a page, until their prefix is allocated; then
        # until SGLang gives them a request slot. Weak: a request dropped while waiting leaves.
        self._matched: weakref.WeakKeyDictionary[Req, PartialPage] = weakref.WeakKeyDictionary()
        self._pending: weakref.WeakKeyDictionary[Req, PartialPage] = weakref.WeakKeyDictionary()
        self._protect: set[int] = set()
        self._rows_of: torch.Tensor | None = None  # the table self._rows views
        self._rows: np.ndarray | None = None
        self._receipt = DecLockRefParams()
        if self._residual is not None:
            self._residual.reclaim_residual = self._reclaim_residual
            self._wrap_slot_alloc()
        self.reset()

    # ----- helpers --------------------------------------------------------------------------

    def _indices(self, pages_or_tokens: Any) -> torch.Tensor:
        """A tensor on the device of an int64 buffer (array('q'), bytearray)."""
        if not len(pages_or_tokens):
            return self._empty_device_indices
        t = torch.frombuffer(pages_or_tokens, dtype=torch.int64)
        return t if self._on_host else t.to(self.device)

    def _pages_of(self, value: torch.Tensor, n_tokens: int) -> Any:
        """Page ids of the first n_tokens KV indices (page-aligned segments)."""
        # Sliced and divided in numpy: each host torch op costs more than the tree walk.
        if self._on_host:
            heads = value.numpy()[: n_tokens : self.page_size]
        else:
            heads = value[: n_tokens : self.page_size].cpu().numpy()
        return heads // self.page_size if self.page_size > 1 else heads

    def _host_row(self, idx: int) -> np.ndarray:
        """Row ``idx`` of the host ``req_to_token`` table as a numpy view (a torch index
        and ``.numpy()`` per call cost more than what reads the row)."""
        table = self.req_to_token_pool.req_to_token
        if self._rows_of is not table:
            self._rows_of, self._rows = table, table.numpy()
        return self._rows[idx]

    def _unit_weights(self) -> bool:
        """Whether every page weighs 1 (no companion pages anywhere), so the tree can read
        the page ids off the KV locations itself (`_weights` would give None)."""
        return self._host_free is None or not self.token_to_kv_pool_allocator.companion_pages

    def _weights(self, pages: Any) -> Any:
        """Per page, 1 + its companion pages (OscarPageAllocator), so that the tree's sizes,
        lock deltas and eviction targets count what a page holds; None when no page has
        companions (every weight 1)."""
        if self._host_free is None:
            return None
        return self.token_to_kv_pool_allocator.page_weights(pages)

    def _free_pages(self, pages: Any) -> None:
        if not len(pages):
            return
        if self._host_free is not None:
            self._host_free(pages)
            return
        ids = self._indices(pages)
        if self._free_page_ids is not None:
            self._free_page_ids(ids)
        else:
            # Page size 1 (token allocator): a page id is the token index.
            self.token_to_kv_pool_allocator.free(ids)

    def pool_state(self) -> dict[str, int]:
        """Token accounting of the pool: every slot is free in the allocator, held by the
        tree (evictable or locked by a running request), or leaked."""
        alloc = self.token_to_kv_pool_allocator
        total = int(getattr(alloc, "size", 0) or 0)
        free = int(alloc.available_size()) if alloc is not None else 0
        # Tree pages count their companions (`_weights`); a running request's companions
        # count with its pages, in `leaked` until it ends.
        evictable, locked = self.evictable_size(), self.protected_size()
        return {
            "total": total,
            "free": free,
            "evictable": evictable,
            "locked": locked,
            "leaked": total - free - evictable - locked,
        }

    def _log_pool_state(self, when: str) -> None:
        """One line per flush (``/flush_cache``), read by the end-to-end leak test: after all
        requests finished, ``locked`` and ``leaked`` must be 0."""
        if self.token_to_kv_pool_allocator is None or getattr(self, "tree", None) is None:
            return
        state = " ".join(f"{k}={v}" for k, v in self.pool_state().items())
        logger.info("oscar-kv pool state at %s: %s (tokens)", when, state)
        kvcache = getattr(self.token_to_kv_pool_allocator, "get_kvcache", lambda: None)()
        if hasattr(kvcache, "residual_state"):
            # Residual pages belong to running requests only; after all finished, held=0.
            res = " ".join(f"{k}={v}" for k, v in kvcache.residual_state().items())
            logger.info("oscar-kv residual pages at %s: %s", when, res)

    # ----- BasePrefixCache ------------------------------------------------------------------

    def reset(self) -> None:
        # Like RadixCache.reset: drop the tree; the scheduler clears the allocator itself.
        self._log_pool_state("flush" if getattr(self, "root_node", None) is not None else "start")
        self.tree.reset()
        self._release_tail_pages(self.tails.clear())
        self.root_node = ROOT
        self._empty_device_indices = torch.empty((0,), dtype=torch.int64, device=self.device)
        self._empty_match_result = MatchResult(
            device_prefix_len=0,
            last_device_node=ROOT,
            last_host_node=ROOT,
            best_match_node=ROOT,
        )

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key = params.key
        if self.disable or key.is_bigram:
            return self._empty_match_result
        # RadixKey.__len__ for a key that is not a bigram, without its two Python calls.
        n = len(key.token_ids)
        if key.limit is not None and key.limit < n:
            n = key.limit
        ns = _namespace(key)
        if n < self.page_size:
            matched, node = 0, ROOT
        else:
            matched, node = self.tree.match_len(key.token_ids, ns, n)
        partial = 0
        req = params.req
        if req is not None and self._residual is not None:
            self._matched.pop(req, None)
            if matched < n:
                # A partial match is shorter than a page: no need to copy the whole rest.
                end = min(n, matched + self.page_size - 1)
                found = self._match_partial(node, ns, key.token_ids[matched:end])
                if found is not None:
                    self._matched[req] = found
                    partial = found.length
        if matched + partial == 0:
            return self._empty_match_result
        # The tree owns the whole pages only: the partial page is the request's own copy,
        # which its release frees (SGLang would protect the whole prefix otherwise).
        return MatchResult(
            device_prefix_len=matched + partial,
            last_device_node=node,
            last_host_node=node,
            best_match_node=node,
            cache_protected_len=matched if partial else None,
        )

    def _match_partial(self, node: int, ns: str | None, rest: Any) -> PartialPage | None:
        tail, k = self.tails.match((node, ns), rest) if len(self.tails) else (None, 0)
        packed = self.tree.partial_child(node, rest, ns)
        if packed is not None and packed[1] > k:
            return PartialPage(length=packed[1], page=packed[0])
        return PartialPage(length=k, tail=tail) if tail is not None else None

    def touch_prefix(self, key: RadixKey) -> None:
        if self.disable or len(key) < self.page_size:
            return
        self.tree.match_len(key.token_ids, _namespace(key), len(key))

    def insert(self, params: InsertParams) -> InsertResult:
        if self.disable:
            return InsertResult(prefix_len=0)
        key = params.key
        if key.is_bigram:
            raise ValueError("radix cache backend 'oscar' does not support bigram keys")
        if params.value is None:
            raise ValueError("InsertParams.value (the KV indices of the key) is required")
        n = len(key) // self.page_size * self.page_size
        if params.value.shape[0] < n:
            raise ValueError(f"InsertParams.value holds {len(params.value)} indices, key needs {n}")
        ns = _namespace(key)
        if self._unit_weights():
            # No page weighs more than 1: the binding reads the pages off the locations.
            value = params.value
            locs = value.numpy() if self._on_host else value[:n].cpu().numpy()
            prefix, _duplicates, node = self.tree.insert_locations(key.token_ids, locs, ns, n)
        else:
            pages = self._pages_of(params.value, n)
            prefix, _duplicates, node = self.tree.insert(
                key.token_ids, pages, ns, n, self._weights(pages)
            )
        # Like RadixCache.insert, the caller frees its duplicates (see _insert_cache).
        return InsertResult(prefix_len=prefix, last_device_node=node)

    def _insert_cache(
        self, req: Req, token_ids: Any, total: int, *, key_limit: int | None = None
    ) -> tuple[str | None, int, int, bool]:
        """RadixCache._insert_cache and the rest of its checkpoint's tree work for the first
        ``total`` of ``token_ids``: insert the page-aligned key, split it at the prompt
        boundary, stamp the key's path as its re-match would, move the request's lock to
        the key's node, free the request's duplicates of cached pages. Returns the
        namespace, the key's length, the node where it ends and whether the request had
        duplicates. The pages are the request's KV row, so its matched prefix (the tree's
        own pages) is not compared token by token again."""
        kv = req.kv
        n = total // self.page_size * self.page_size
        if key_limit is not None:
            n = min(n, key_limit)
        ns = _request_namespace(req)
        prompt_len = len(req.origin_input_ids) // self.page_size * self.page_size
        split = prompt_len if 0 < prompt_len < n else 0
        if self._on_host and self._unit_weights():
            # Every page weighs 1: one call, and the tree reads the page ids off the row in
            # place.
            old = req.lock.node if req.lock is not None else ROOT
            prefix, dups, node = self.tree.checkpoint_row(
                token_ids, self._host_row(kv.req_pool_idx)[:total], ns, n, split, old
            )
            req.lock = TreeLock(node, self._receipt)
        else:
            kv_indices = self.req_to_token_pool.req_to_token[kv.req_pool_idx, :total]
            pages = self._pages_of(kv_indices, n)
            prefix, dups, node = self.tree.insert(
                token_ids, pages, ns, n, self._weights(pages), kv_row=True
            )
            if split:
                # Split the leaf at the prompt boundary so eviction can drop the output KV
                # without the prompt; the re-insert only changes topology.
                self.tree.insert(
                    token_ids, pages[: split // self.page_size], ns, split, kv_row=True
                )
            # RadixCache.checkpoint matches the key it just inserted, for the node and to
            # stamp the path; the insert's node (kept by the prompt split, which splits
            # above it) and a stamp of its path give both without a second walk.
            self.tree.touch_path(node)
            self.unlock(req.lock)
            req.lock = self.lock(node)
        kv.cache_inserted_len = max(kv.cache_inserted_len, n)
        had_duplicates = dups is not None and len(dups) > 0
        if prefix > kv.cache_protected_len and self._host_free is not None:
            # The request's own pages inside the cached prefix are exactly the duplicates.
            if had_duplicates:
                self._host_free(dups)
        elif prefix > kv.cache_protected_len:
            start = kv.cache_protected_len
            dup_indices = self.req_to_token_pool.req_to_token[kv.req_pool_idx, start:prefix]
            self.token_to_kv_pool_allocator.free_segment(dup_indices, start_pos=start)
        return ns, n, node, had_duplicates

    def checkpoint(self, req: Req, *, up_to: int, **kwargs: Any) -> None:
        if self.disable:
            return
        # The fill ids are read up to `total` in place (RadixCache copies the slice).
        token_ids = req.full_untruncated_fill_ids
        total = min(up_to, len(token_ids))
        floor = req.kv.swa_evict_floor
        key_limit = math.ceil(floor / self.page_size) * self.page_size if floor > 0 else None
        protected = req.kv.cache_protected_len
        ns, n, node, had_duplicates = self._insert_cache(req, token_ids, total, key_limit=key_limit)
        if n > protected and had_duplicates:
            # Repoint the row onto the tree's pages. Without duplicates the row already is
            # the tree's path: its protected prefix came from the tree, and the tree adopted
            # every page past it.
            new_indices = self._indices(self.tree.path_token_buffer(node))
            self.req_to_token_pool.write(
                (req.kv.req_pool_idx, slice(protected, n)), new_indices[protected:]
            )
        # The partial last page stays in the request's row, not in the tree; a finished
        # request's residual page (that partial page's KV) becomes a tail of node.
        req.kv.cache_protected_len = n
        req.last_node = node
        finished = self._residual is not None and req.finished() and key_limit is None
        if finished and total > n:
            self._cache_tail(req, (node, ns), token_ids[n:total])

    def cache_unfinished_req(self, req: Req, chunked: bool = False) -> None:
        """Pre-0.5.23 name: publish what a running request computed so far."""
        self.checkpoint(req, up_to=req.extend_end)

    def cache_finished_req(self, req: Req, is_insert: bool = True) -> None:
        """Pre-0.5.23 name: insert (optionally) and release a finished request's KV."""
        from sglang.srt.mem_cache.common import release_kv_cache

        release_kv_cache(req, self, checkpoint=is_insert)

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable or params.num_tokens <= 0:
            return EvictResult()
        start = time.perf_counter()
        freed = self.tree.evict(-(-params.num_tokens // self.page_size))
        self._free_pages(freed)
        if len(freed) and len(self.tails):
            self._drop_orphan_tails()
        num_evicted = len(freed) * self.page_size
        self.update_eviction_metrics(num_evicted, start)
        return EvictResult(num_tokens_evicted=num_evicted)

    def lock(self, node: Any) -> TreeLock:
        # The base class builds an IncLockRefResult and a DecLockRefParams per lock; this
        # tree's unlock replays nothing from the receipt, so every lock shares one.
        if not self.disable:
            self.tree.lock(node)
        return TreeLock(node, self._receipt)

    def unlock(self, lock: TreeLock | None) -> None:
        if lock is not None and not self.disable:
            self.tree.unlock(lock.node)

    def inc_lock_ref(self, node: Any) -> IncLockRefResult:
        if self.disable:
            return IncLockRefResult(delta=0)
        return IncLockRefResult(delta=-self.tree.lock(node) * self.page_size)

    def dec_lock_ref(self, node: Any, params: DecLockRefParams | None = None) -> DecLockRefResult:
        if self.disable:
            return DecLockRefResult(delta=0)
        return DecLockRefResult(delta=self.tree.unlock(node) * self.page_size)

    def path_device_indices(self, node: Any) -> torch.Tensor:
        if node == ROOT:
            return self._empty_device_indices
        return self._indices(self.tree.path_token_buffer(node))

    def prefix_device_indices(self, req: Req) -> torch.Tensor:
        """The matched prefix's KV indices (what ``alloc_for_extend`` writes into the row).
        A prefix ending inside a page gets a fresh page for its own copy of that page; the
        request's residual page is filled from the source once the request holds a slot."""
        path = self.path_device_indices(req.last_node)
        k = req.prefix_len - path.shape[0]
        partial = self._matched.pop(req, None) if self._residual is not None else None
        if k == 0:
            return path
        if k < 0:
            return path[: req.prefix_len]
        if partial is None or partial.length < k or not self._source_cached(partial):
            raise RuntimeError(
                f"oscar-kv: request {req.rid} matched {k} tokens inside a cached page that is "
                "no longer cached when its prefix is allocated"
            )
        locs = self._alloc_one_page(first_page=len(path) == 0)
        if req.kv.req_pool_idx is not None:
            self._fill_residual([(req, partial)], moves=[])
        else:
            self._pending[req] = partial
        return torch.cat((path, locs[:k].to(path.dtype)))

    def _source_cached(self, partial: PartialPage) -> bool:
        if partial.tail is not None:
            return partial.tail.alive
        return self.tree.contains_page(partial.page)

    def free_kv_row(self, kv: Any, ranges: list[tuple[int, int]]) -> None:
        """``BasePrefixCache.free_kv_row`` on the host path: the page ids of the ranges go
        straight from the row to the Rust allocator (the base class slices tensors and
        routes each range through SGLang's segment helpers, which cost more than the
        free). Same contract: ascending, disjoint ranges, each page freed once (adjacent
        ranges merged first), starts page-aligned. Sliding windows never reach this cache
        (rejected at construction), so nothing is SWA-dead."""
        if self._free_heads is None or not self._on_host:
            super().free_kv_row(kv, ranges)
            return
        ps = self.page_size
        row = self._host_row(kv.req_pool_idx)
        heads = []
        prev_end = None
        # Adjacent ranges merge first, so a seam inside a page frees that page once.
        for start, end in coalesce_ranges(ranges):
            if end <= start:
                continue
            if start % ps or (prev_end is not None and start // ps <= (prev_end - 1) // ps):
                raise ValueError(
                    f"oscar-kv: row range [{start}, {end}) is not page-aligned or shares a "
                    f"page with the range ending at {prev_end}"
                )
            prev_end = end
            heads.append(row[start:end:ps])
        if heads:
            self._free_heads(heads[0] if len(heads) == 1 else np.concatenate(heads))

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        if self._residual is not None:  # the only case that keeps per-request state
            self._matched.pop(req, None)
            self._pending.pop(req, None)

    # ----- tails ----------------------------------------------------------------------------

    def _alloc_one_page(self, *, first_page: bool) -> torch.Tensor:
        """A fresh page for a request's copy of a partial page; ``first_page``: it is page 0
        of the request's KV row (its companions come with it, on OscarPageAllocator)."""
        alloc = self.token_to_kv_pool_allocator
        kwargs = {"first_page": True} if first_page and self._host_free is not None else {}
        locs = alloc.alloc(self.page_size, **kwargs)
        if locs is None:
            self.evict(EvictParams(num_tokens=self.page_size))
            locs = alloc.alloc(self.page_size, **kwargs)
        if locs is None:
            raise RuntimeError(
                "oscar-kv: no free page for a request's copy of a cached partial page "
                f"({alloc.available_size()} tokens free, nothing evictable)"
            )
        return locs.to(self.device)

    def _wrap_slot_alloc(self) -> None:
        """Wraps this ReqToTokenPool's ``alloc(reqs)`` (the one SGLang calls in
        ``alloc_req_slots``): the slots' residual pages are taken inside it (the pool's
        alloc hook); the requests that continue a tail get the tail's page copied after."""
        rtp = self.req_to_token_pool
        alloc = rtp.alloc

        def alloc_filling_partial_pages(reqs: list[Req]) -> list[int] | None:
            partials = [(r, p) for r in reqs if (p := self._pending.pop(r, None)) is not None]
            continued = [(r, p.tail) for r, p in partials if p.tail is not None]
            for r, tail in continued:
                if not tail.alive:
                    raise RuntimeError(
                        f"oscar-kv: the cached tail request {r.rid} continues was evicted "
                        "before the request got its slot"
                    )
            self._protect = {id(t) for _, t in continued}
            try:
                new = sum(1 for r in reqs if not r.kv.holds_kv)
                moves = self._make_residual_room(new, continued)
                out = alloc(reqs)
            finally:
                self._protect = set()
            if out is not None:
                self._fill_residual(partials, moves)
            return out

        rtp.alloc = alloc_filling_partial_pages

    def _make_residual_room(
        self, new: int, adopters: list[tuple[Req, Tail]]
    ) -> list[tuple[Req, Tail]]:
        """Frees residual pages for ``new`` slots: least recently used tails no request of
        this allocation continues; if that is not enough, a continued tail hands its page
        to (the last of) the requests continuing it, instead of a copy."""
        pool = self._residual
        short = new - pool.free_residual_count()
        if short > 0:
            short -= self._reclaim_residual(short)
        moves: list[tuple[Req, Tail]] = []
        if short > 0:
            last: dict[int, tuple[Req, Tail]] = {id(t): (r, t) for r, t in adopters}
            for r, t in reversed(list(last.values())):
                if short <= 0:
                    break
                self.tails.remove(t)
                pool.release_cached_residual([t.page])
                moves.append((r, t))
                short -= 1
        return moves

    def _fill_residual(
        self, partials: list[tuple[Req, PartialPage]], moves: list[tuple[Req, Tail]]
    ) -> None:
        # Moves first: a moved page is still unwritten wherever the slot alloc put it,
        # and the copies below read it; no copy writes into a moved page.
        pool = self._residual
        moved = {id(r) for r, _ in moves}
        for r, t in moves:
            pool.give_page(r.kv.req_pool_idx, t.page)
        for r, p in partials:
            if id(r) in moved:
                continue
            if p.tail is not None:
                pool.copy_residual(p.tail.page, r.kv.req_pool_idx)
            else:
                first = r.prefix_len < self.page_size  # a sink page under sink_bits
                pool.dequantize_into_residual(p.page, r.kv.req_pool_idx, first_page=first)

    def _cache_tail(self, req: Req, group: tuple[int, str | None], tokens: Any) -> None:
        page = self._residual.detach_residual(req.kv.req_pool_idx)
        if page is not None:
            self._release_tail_pages(self.tails.add(group, tokens, page))

    def _reclaim_pages(self, n: int) -> int:
        """The allocator's ``reclaim_pages``: evicts n pages' worth (LRU); returns the pages
        that went back to the free list, companions included."""
        alloc = self.token_to_kv_pool_allocator
        before = alloc.available_size()
        self.evict(EvictParams(num_tokens=n * self.page_size))
        return (alloc.available_size() - before) // self.page_size

    def _reclaim_residual(self, n: int) -> int:
        """Gives up to n least recently used tails' pages back to the pool (the pool's
        ``reclaim_residual``); tails a request of the running allocation continues stay."""
        victims = self.tails.lru(n, self._protect)
        for tail in victims:
            self.tails.remove(tail)
        self._release_tail_pages([t.page for t in victims])
        return len(victims)

    def _drop_orphan_tails(self) -> None:
        """Tails of nodes the tree evicted can no longer be matched: give their pages back."""
        dead = [g for g in self.tails.groups() if g[0] != ROOT and not self._node_alive(g[0])]
        self._release_tail_pages(self.tails.drop_groups(dead))

    def _node_alive(self, node: int) -> bool:
        try:
            self.tree.lock_ref(node)
        except ValueError:  # InvalidNode: the handle's node was evicted
            return False
        return True

    def _release_tail_pages(self, pages: list[int]) -> None:
        if pages and self._residual is not None:
            self._residual.release_cached_residual(pages)

    def supports_prefix_sharing(self) -> bool:
        return not self.disable

    def is_root(self, node: Any) -> bool:
        return node == ROOT

    def evictable_size(self) -> int:
        return self.tree.evictable_pages * self.page_size

    def protected_size(self) -> int:
        return self.tree.protected_pages * self.page_size

    def total_size(self) -> int:
        return self.tree.total_pages * self.page_size

    def all_values_flatten(self) -> torch.Tensor:
        pages = [p for node in self.tree.nodes() for p in node["pages"]]
        ps = self.page_size
        idx = torch.tensor(pages, dtype=torch.int64).repeat_interleave(ps) * ps
        return (idx + torch.arange(ps).repeat(len(pages))).to(self.device)

    def sanity_check(self) -> None:
        self.tree.check_invariants()

    def pretty_print(self) -> None:
        for node in self.tree.nodes():
            indent = " " * (node["depth_tokens"] // self.page_size)
            print(
                indent,
                node["num_tokens"],
                node["first_tokens"],
                f"r={node['lock_ref']}",
                f"ns={node['namespace']}",
            )
        print(f"#tokens: {self.total_size()}")

    def dfs_weight_order(self, node_handles: Sequence[Any]) -> list[int]:
        """Request indices in depth-first order, heavier subtrees first (as the base class)."""
        nodes = self.tree.nodes()
        children: dict[int, list[int]] = {}
        for d in nodes:
            children.setdefault(d["parent"], []).append(d["node"])
        at: dict[int, list[int]] = {}
        for i, h in enumerate(node_handles):
            at.setdefault(h, []).append(i)
        weight: dict[int, int] = {}

        def total(h: int) -> int:
            stack, post = [h], []
            while stack:
                x = stack.pop()
                post.append(x)
                stack.extend(children.get(x, ()))
            for x in reversed(post):
                weight[x] = len(at.get(x, ())) + sum(weight[c] for c in children.get(x, ()))
            return weight[h]

        total(ROOT)
        order: list[int] = []
        stack: list[tuple[int, bool]] = [(ROOT, False)]
        while stack:
            x, visited = stack.pop()
            if visited:
                order.extend(at.get(x, ()))
                continue
            stack.append((x, True))
            kids = sorted(children.get(x, ()), key=lambda c: -weight.get(c, 0))
            stack.extend((c, False) for c in reversed(kids))
        return order


def create_oscar_radix_cache(ctx: TreeCacheBuildContext) -> OscarRadixCache:
    """``--radix-cache-backend oscar`` factory: checks the model fits, builds the cache."""
    unsupported = [
        (ctx.is_hybrid_swa, "hybrid sliding-window models"),
        (ctx.is_hybrid_ssm, "hybrid Mamba/SSM models"),
        (ctx.enable_hierarchical_cache, "--enable-hierarchical-cache"),
        (getattr(ctx, "is_dsa", False), "DeepSeek sparse attention"),
    ]
    for flag, what in unsupported:
        if flag:
            raise ValueError(f"radix cache backend 'oscar' does not support {what}")
    if ctx.disable_radix_cache:
        ctx.params.disable = True
    return OscarRadixCache(ctx.params)


def register_backend() -> bool:
    """Registers ``--radix-cache-backend oscar``; False if it already was."""
    from sglang.srt.mem_cache.registry import (
        register_radix_cache_backend,
        registered_radix_cache_backends,
    )

    if BACKEND_NAME in registered_radix_cache_backends():
        return False
    register_radix_cache_backend(BACKEND_NAME, create_oscar_radix_cache)
    return True
