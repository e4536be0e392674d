"""``OscarPageAllocator``: SGLang 0.5.23's ``PagedTokenToKVPoolAllocator`` over the Rust page
allocator (``oscar_kv._native.PageAllocator``), the allocator of every ``--kv-quant oscar``
process (`oscar_kv.sglang.plugin` installs it where SGLang builds its own).

The free list and the reference counts live in Rust, on the host; SGLang's token location
space is unchanged (page ``p`` holds locations ``p * page_size ...``; pages
``1..size // page_size``, page 0 stays SGLang's padding page). What runs where:

- ``alloc_extend`` / ``alloc_decode`` (every scheduling step) read only the host lengths
  (``prefix_lens_cpu``, ``seq_lens_cpu``). Rust takes the pages and describes every new
  location as ``value + (last_loc[owner] + 1)``; one host-to-device copy of those pairs and
  two device ops give ``out_cache_loc`` from the device ``last_loc``, never read back. A
  decode step that opens no page copies nothing: ``last_loc + 1``.
- ``free`` of a device tensor reads it back (it runs in the scheduler, between forwards);
  ``free_pages`` takes host page ids and is what the radix cache uses for evictions and
  duplicate pages, without a tensor on the way.
- Companion pages: a sequence's first page (page index 0 of its KV row) may need
  ``kvcache.sink_companions`` extra pages (0 unless the pool asks). They come with the page
  in ``alloc_extend`` (a request without prefix), ``alloc_decode`` (a first token) and
  ``alloc(n, first_page=True)``; the pool learns them through ``kvcache.set_companions``; they
  never appear in a location SGLang sees, and Rust frees them with their page. When pages
  run short, ``reclaim_pages(n)`` (set by the radix cache: evict n pages' worth) runs once
  before the call gives up with None (SGLang's out-of-memory path).

``available_size()`` is free pages * page_size, as SGLang's.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator

from oscar_kv import _native

if TYPE_CHECKING:
    from sglang.srt.mem_cache.memory_pool import KVCache

_Ints = Any  # array('q'), numpy int array, list of ints


def _host(t: torch.Tensor) -> np.ndarray:
    return (t if t.device.type == "cpu" else t.cpu()).numpy()


class OscarPageAllocator(BaseTokenToKVPoolAllocator):
    """Drop-in for SGLang's ``PagedTokenToKVPoolAllocator``; see the module docstring."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        kvcache: KVCache,
        need_sort: bool,
    ):
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)
        # The base class keeps its torch free list in `free_pages`; here that name is the
        # host free path, and the free list is in Rust.
        del self.free_pages
        self.num_pages = size // page_size
        self._device = torch.device(device)
        self._on_host = self._device.type == "cpu"
        self.reclaim_pages: Callable[[int], int] | None = None
        self._companions_of: Any = None
        self._companions_n = 0
        self._pages = _native.PageAllocator(self.num_pages + 1, reserved=1)
        self.clear()

    # ----- state ------------------------------------------------------------------------

    def clear(self) -> None:
        if self._pages.num_pages != self.num_pages + 1:  # resize() changed the pool
            self._pages = _native.PageAllocator(self.num_pages + 1, reserved=1)
        self._pages.reset()
        self.free_group = None
        self._group_pages: list[Any] = []

    def available_size(self) -> int:
        return self._pages.available * self.page_size

    def get_all_free_pages(self) -> torch.Tensor:
        return self._tensor(self._pages.free_list())

    def merge_and_sort_free(self) -> None:
        self._pages.sort_free()

    def backup_state(self) -> Any:
        return self._pages.backup()

    def restore_state(self, state: Any) -> None:
        self._pages.restore(state)

    @property
    def companion_pages(self) -> int:
        """Companion pages allocated now (not free, in no location SGLang sees)."""
        return self._pages.companion_pages

    def count_companions(self, pages: _Ints) -> int:
        """Companions of the listed (host) page ids."""
        return self._pages.count_companions(pages)

    def page_weights(self, pages: _Ints) -> np.ndarray | None:
        """1 + companions per listed page (what the page frees when it goes), or None when no
        page has companions."""
        if not self._pages.companion_pages:
            return None
        return np.frombuffer(self._pages.companion_counts(pages), dtype=np.int64) + 1

    # ----- allocation -------------------------------------------------------------------

    def _companions(self) -> int:
        # Fixed by the pool at construction; read once per pool (a getattr that misses, on
        # SGLang's own pools, costs more than the allocation it guards).
        if self._companions_of is not self._kvcache:
            self._companions_of = self._kvcache
            self._companions_n = int(getattr(self._kvcache, "sink_companions", 0) or 0)
        return self._companions_n

    def _tensor(self, values: array | bytearray) -> torch.Tensor:
        if not len(values):
            return torch.empty((0,), dtype=torch.int64, device=self._device)
        t = torch.frombuffer(values, dtype=torch.int64)
        return t if self._on_host else t.to(self._device, non_blocking=True)

    def _reclaim(self, short: int) -> bool:
        """Asks the radix cache to free ``short`` pages; whether it freed any."""
        if short <= 0 or self.reclaim_pages is None:
            return False
        return self.reclaim_pages(short) > 0

    def _publish(self, first_pages: array, companions: array, per_page: int) -> None:
        if len(first_pages):
            comp = companions.tolist()
            rows = [comp[i * per_page : (i + 1) * per_page] for i in range(len(first_pages))]
            self._kvcache.set_companions(first_pages.tolist(), rows)

    def alloc(self, need_size: int, first_page: bool = False) -> torch.Tensor | None:
        """``need_size // page_size`` whole pages as their token locations; with
        ``first_page`` (the pages start a request's KV row) the first gets its companions."""
        n = need_size // self.page_size
        comp = self._companions() if first_page and n else 0
        short = n + comp - self._pages.available
        if short > 0 and not (self._reclaim(short) and n + comp <= self._pages.available):
            return None
        locs = self._pages.alloc_token_buffer(n, self.page_size)
        if comp:
            first = array("q", [memoryview(locs).cast("q")[0] // self.page_size])
            self._publish(first, self._pages.alloc_companions(first, comp), comp)
        return self._tensor(locs)

    def _place(self, placement: tuple, last_loc: torch.Tensor, per_page: int) -> torch.Tensor:
        values, continuing, first_pages, companions = placement
        self._publish(first_pages, companions, per_page)
        n = len(values) // 2
        if n == 0:
            return torch.empty((0,), dtype=torch.int64, device=self._device)
        host = torch.frombuffer(values, dtype=torch.int64).view(2, n)
        if not continuing:
            return host[0] if self._on_host else host[0].to(self._device, non_blocking=True)
        if self._on_host:
            # The same gather-add in numpy: each host torch op costs more than the work.
            loc, owner = host.numpy()
            base = np.append(_host(last_loc).astype(np.int64) + 1, 0)
            return torch.from_numpy(loc + base[owner])
        dev = host.to(self._device, non_blocking=True)
        # Owner == batch size points at the appended 0 - 1 + 1 = 0: a fresh page's location.
        base = F.pad(last_loc.to(torch.int64) + 1, (0, 1))
        return dev[0] + base[dev[1]]

    def _extend_need(self, prefix: np.ndarray, seq: np.ndarray, per_page: int) -> int:
        ps = self.page_size
        pages = int(((seq + ps - 1) // ps - (prefix + ps - 1) // ps).sum())
        return pages + per_page * int(((prefix == 0) & (seq > 0)).sum())

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        prefix, seq = _host(prefix_lens_cpu), _host(seq_lens_cpu)
        if int((seq - prefix).sum()) != extend_num_tokens:
            raise ValueError(
                f"extend_num_tokens {extend_num_tokens} != sum(seq_lens - prefix_lens) "
                f"{int((seq - prefix).sum())}"
            )
        comp = self._companions()
        try:
            placement = self._pages.alloc_extend(prefix, seq, self.page_size, comp)
        except _native.OutOfPages:
            short = self._extend_need(prefix, seq, comp) - self._pages.available
            if not self._reclaim(short):
                return None
            try:
                placement = self._pages.alloc_extend(prefix, seq, self.page_size, comp)
            except _native.OutOfPages:
                return None
        return self._place(placement, last_loc, comp)

    def alloc_decode(
        self,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
    ) -> torch.Tensor | None:
        seq = _host(seq_lens_cpu)
        comp = self._companions()
        before = self._pages.available
        try:
            placement = self._pages.alloc_decode(seq, self.page_size, comp)
        except _native.OutOfPages:
            opens = (seq - 1) % self.page_size == 0
            short = int(opens.sum()) + comp * int((seq == 1).sum()) - before
            if not self._reclaim(short):
                return None
            try:
                placement = self._pages.alloc_decode(seq, self.page_size, comp)
            except _native.OutOfPages:
                return None
            before = -1
        if before == self._pages.available:
            # No request opened a page: SGLang's own continuation, nothing to copy.
            return last_loc.to(torch.int64) + 1
        return self._place(placement, last_loc, comp)

    # ----- freeing ----------------------------------------------------------------------

    def free(self, free_index: torch.Tensor) -> None:
        """Frees the pages of these token locations, each page once."""
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        self._pages.free_tokens(_host(free_index), self.page_size)

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        """``kv_row[start_pos : start_pos + n]`` of one request: one location per page."""
        if not free_index.shape[0]:
            return
        assert start_pos % self.page_size == 0, f"segment start {start_pos} is not page-aligned"
        heads = (free_index.numpy() if self._on_host else free_index.cpu().numpy())[
            :: self.page_size
        ]
        self.free_page_heads(heads)

    def free_page_ids(self, page_ids: torch.Tensor) -> None:
        """Frees exactly these pages (a tensor of page ids)."""
        if page_ids.numel():
            self.free_pages(_host(page_ids))

    def free_pages(self, pages: _Ints) -> None:
        """The host path: frees these page ids (array('q'), numpy, list), no tensor."""
        if not len(pages):
            return
        if self.free_group is None:
            self._pages.free(pages)
        else:
            self._group_pages.append(np.array(pages, dtype=np.int64))

    def free_page_heads(self, heads: np.ndarray) -> None:
        """The host path for a KV row's page-aligned segment: its first location of each
        page (the row read every page_size slots), each page once, no tensor."""
        if not len(heads):
            return
        if self.free_group is None:
            self._pages.free_tokens(heads, self.page_size)
        else:
            self._group_pages.append(heads // self.page_size)

    def free_group_begin(self) -> None:
        super().free_group_begin()
        self._group_pages = []

    def free_group_end(self) -> None:
        super().free_group_end()
        if self._group_pages:
            pages, self._group_pages = np.concatenate(self._group_pages), []
            self._pages.free(pages)

    # ----- the rest of SGLang's paged allocator -----------------------------------------

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        return self._kvcache.get_cpu_copy(
            indices, mamba_indices=mamba_indices, req_pool_index=req_pool_index
        )

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        return self._kvcache.load_cpu_copy(
            kv_cache_cpu, indices, mamba_indices=mamba_indices, req_pool_index=req_pool_index
        )

    def check_invariants(self) -> None:
        """Raises RuntimeError if the Rust free list, counts and companions disagree."""
        self._pages.check_invariants()
