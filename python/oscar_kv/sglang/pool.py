"""``OscarTokenToKVPool``: SGLang's KV pool holding packed OScaR pages + bf16 residual pages.

Per layer (one allocation for all layers, viewed per layer):
- ``pages[layer]``: uint8 [num_pages + 1, page_bytes], the packed pages
  (`oscar_kv.layout.PageLayout`; row = page id = token location // 128; row 0 is SGLang's
  padding page);
- ``k_res[layer]`` / ``v_res[layer]``: [residual_pages + 1, 128, H_kv, D], 16-bit
  (`oscar_kv.sglang.budget.residual_dtype`): the residual pages, where a running request's
  partial last page lives, and one padding residual page (the last row) that CUDA-graph
  padding rows (request slot 0) write to, as SGLang's own padding rows write token slot 0.

A request slot (``req_pool_idx``) takes a residual page when SGLang allocates the slot (the
``ReqToTokenPool`` alloc hook, on the host, outside any forward) and gives it back when SGLang
frees the slot (`attach`). ``residual_of_slot`` (int32, on the pool's device) maps slots to
residual pages; a forward only gathers from it, so no forward reads ownership on the host.
A finished request's residual page may instead pass to the prefix cache
(`detach_residual`), which keeps it as the bf16 tail of that history and gives it back
(`release_cached_residual`) when it evicts the tail; a residual page is therefore free,
held by a request slot, or cached, and ``residual_state`` counts all three. When no page is
free, the pool asks the prefix cache to give cached pages back (``reclaim_residual``).

Both kinds come out of one budget (`oscar_kv.sglang.budget.KVBudget`): the pool allocates
exactly ``budget.nbytes`` of pages and nothing else (plus the slot map, one int32 per request
slot). SGLang's location space is unchanged (token slots, ``page_size = 128``), so the paged
allocator, ``req_to_token`` and the radix tree work as they are; the bytes behind a slot just
do not exist individually. Tokens enter through `store_extend` / `store_decode`, which the
attention backend calls with a `oscar_kv.sglang.forward_plan` plan built once per forward
(a bare ``set_kv_buffer(loc, k, v)`` cannot tell whose residual page a token belongs to):
completed 128-token blocks are quantized into their pages with `oscar_kv.ops.quantize_page`,
the rest goes into the request's residual page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.mem_cache.memory_pool import KVCache

from oscar_kv import ops
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.layout import PageLayout
from oscar_kv.sglang.budget import KVBudget, residual_dtype
from oscar_kv.sglang.forward_plan import DecodePlan, ExtendPlan
from oscar_kv.sink import SinkLayout

logger = logging.getLogger(__name__)


class OscarTokenToKVPool(KVCache):
    """See the module docstring. ``size`` (tokens) and ``residual_pages`` come from one
    `KVBudget`; `from_budget` builds the pool from it."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool = False,
        *,
        config: OscarConfig,
        residual_pages: int,
        start_layer: int | None = None,
        end_layer: int | None = None,
        **_ignored: Any,
    ) -> None:
        if page_size != BLOCK_TOKENS:
            raise ValueError(f"OscarTokenToKVPool needs page_size {BLOCK_TOKENS}")
        if residual_pages < 1:
            raise ValueError(f"residual_pages must be >= 1, got {residual_pages}")
        dtype = residual_dtype(dtype)
        super().__init__(
            size, page_size, dtype, layer_num, device, enable_memory_saver,
            start_layer, end_layer,
        )  # fmt: skip
        self.config = config
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = head_dim
        self.layout = PageLayout.of(config.page_config, head_num, head_dim)
        # A sequence's first page at config.sink_bits spans its row and `sink_companions`
        # more rows the allocator takes with it (`oscar_kv.sink`); `sink_table[page]` lists them.
        self.sink = SinkLayout.of(config, head_num, head_dim, dtype)
        self.sink_companions = 0 if self.sink is None else self.sink.companions
        self.num_pages = size // page_size
        self.residual_pages = residual_pages
        self.padding_residual = residual_pages  # the last row
        self.pages = torch.zeros(
            (layer_num, self.num_pages + 1, self.layout.page_bytes),
            dtype=torch.uint8,
            device=device,
        )
        res_shape = (layer_num, residual_pages + 1, BLOCK_TOKENS, head_num, head_dim)
        self.k_res = torch.zeros(res_shape, dtype=dtype, device=device)
        self.v_res = torch.zeros(res_shape, dtype=dtype, device=device)
        self.sink_table = torch.zeros(
            (self.num_pages + 1, self.sink_companions) if self.sink else (0, 0),
            dtype=torch.int32,
            device=device,
        )
        # Slot -> residual page, on the device; sized by `attach`.
        self.residual_of_slot = torch.full(
            (0,), self.padding_residual, dtype=torch.int32, device=device
        )
        self._slot_map_host: Any = None
        self._owner: dict[int, int] = {}  # slot -> residual page (host bookkeeping)
        self._free_residual = list(range(residual_pages - 1, -1, -1))
        self._cached: set[int] = set()  # pages the prefix cache holds as tails
        # Set by the prefix cache: gives back up to n cached pages, returns how many it did.
        self.reclaim_residual: Callable[[int], int] | None = None
        self.mem_usage = self.get_kv_size_bytes() / 2**30
        logger.info(
            "oscar-kv pool: %s, %d tokens (%d pages) x %d layers, %.3f GiB packed + "
            "%.3f GiB in %d %s residual pages (+1 padding page)",
            config.label, size, self.num_pages, layer_num,
            self.pages.numel() / 2**30, self.residual_nbytes() / 2**30,
            residual_pages, str(dtype).removeprefix("torch."),
        )  # fmt: skip

    @classmethod
    def from_budget(
        cls, budget: KVBudget, device: Any, start_layer: int | None = None
    ) -> OscarTokenToKVPool:
        s = budget.shape
        return cls(
            budget.tokens, BLOCK_TOKENS, s.residual_dtype, s.kv_heads, s.head_dim,
            s.layers, device, config=s.config, residual_pages=budget.residual_pages,
            start_layer=start_layer,
        )  # fmt: skip

    # -- sizes -------------------------------------------------------------------------
    def residual_nbytes(self) -> int:
        return (self.k_res.numel() + self.v_res.numel()) * self.k_res.element_size()

    def get_kv_size_bytes(self) -> int:
        return self.pages.numel() + self.residual_nbytes()

    def metadata_nbytes(self) -> int:
        """What the pool holds beside the budget's pages: the slot map and the sink table
        (int32 per request slot and per page companion)."""
        return self.residual_of_slot.nbytes + self.sink_table.nbytes

    # -- sink pages --------------------------------------------------------------------
    def set_companions(self, first_pages: list[int], companions: list[list[int]]) -> None:
        """The allocator took ``companions[i]`` with first page ``first_pages[i]``: the rows
        its sink page spans past its own (one small host-to-device write)."""
        if self.sink is None or not first_pages:
            return
        dev = self.pages.device
        idx = torch.tensor(first_pages, dtype=torch.long).to(dev)
        rows = torch.tensor(companions, dtype=torch.int32).view(len(first_pages), -1)
        if rows.shape[1] != self.sink_companions:
            raise ValueError(
                f"a sink page takes {self.sink_companions} companion pages, got {rows.shape[1]}"
            )
        self.sink_table[idx] = rows.to(dev)

    def _layer(self, layer_id: int) -> int:
        return layer_id - self.start_layer

    # -- residual pages ----------------------------------------------------------------
    def attach(self, req_to_token_pool: Any) -> None:
        """Binds the pool to SGLang's request slots: a slot takes its residual page when
        ``alloc_rows`` hands it out and returns it when SGLang frees the slot (``free_rows``,
        which ``free`` also goes through, or ``clear``). The wraps are on this one
        ReqToTokenPool object, which only exists in a ``--kv-quant oscar`` process. Slot 0,
        SGLang's padding row, maps to the padding residual page for good."""
        rows = int(req_to_token_pool.req_to_token.shape[0])
        self.residual_of_slot = torch.full(
            (rows,), self.padding_residual, dtype=torch.int32, device=self.pages.device
        )
        # On the host the map is written through a numpy view (a torch index costs more).
        self._slot_map_host = (
            self.residual_of_slot.numpy() if self.residual_of_slot.device.type == "cpu" else None
        )
        free_rows, clear = req_to_token_pool.free_rows, req_to_token_pool.clear
        on_alloc = getattr(req_to_token_pool, "_on_alloc_rows", None)

        def alloc_hook(indices: list[int]) -> None:
            if on_alloc is not None:
                on_alloc(indices)
            self.assign_residual(indices)

        def free_rows_and_residual(indices: list[int]) -> None:
            free_rows(indices)
            self.release_residual(indices)

        def clear_and_residual() -> None:
            clear()
            self.release_residual(list(self._owner))

        req_to_token_pool._on_alloc_rows = alloc_hook
        req_to_token_pool.free_rows = free_rows_and_residual
        req_to_token_pool.clear = clear_and_residual

    def free_residual_count(self) -> int:
        return len(self._free_residual)

    def _take_residual(self, slot: int) -> int:
        if not self._free_residual and self.reclaim_residual is not None:
            self.reclaim_residual(1)
        if not self._free_residual:
            raise RuntimeError(
                f"oscar-kv: no free residual page for request slot {slot} "
                f"({self.residual_pages} pages: {len(self._owner)} held by running requests, "
                f"{len(self._cached)} cached and in use); --max-running-requests must not "
                "exceed the residual pages"
            )
        return self._free_residual.pop()

    def assign_residual(self, slots: list[int]) -> list[int]:
        """Each slot's residual page, taking a free one for a slot that has none."""
        if self.residual_of_slot.numel() == 0:
            raise RuntimeError("OscarTokenToKVPool.attach(req_to_token_pool) not called")
        out = []
        fresh = []
        for slot in slots:
            page = self._owner.get(slot)
            if page is None:
                if slot == 0:
                    raise ValueError("request slot 0 is SGLang's padding row; it has no page")
                page = self._take_residual(slot)
                self._owner[slot] = page
                fresh.append((slot, page))
            out.append(page)
        self._write_slot_map(fresh)
        return out

    def _write_slot_map(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        if self._slot_map_host is not None:
            for slot, page in pairs:
                self._slot_map_host[slot] = page
            return
        if len(pairs) == 1:
            # One slot (a request's slot taken or given back): a scalar fill, no index or
            # value tensors built and copied to the device.
            ((slot, page),) = pairs
            self.residual_of_slot[slot] = page
            return
        dev = self.pages.device
        idx = torch.tensor([p[0] for p in pairs], dtype=torch.long).to(dev)
        pages = torch.tensor([p[1] for p in pairs], dtype=torch.int32).to(dev)
        self.residual_of_slot[idx] = pages

    def release_residual(self, slots: list[int]) -> None:
        gone = [s for s in slots if s in self._owner]
        for slot in gone:
            self._free_residual.append(self._owner.pop(slot))
        self._write_slot_map([(s, self.padding_residual) for s in gone])

    def detach_residual(self, slot: int) -> int | None:
        """Hands slot's residual page to the prefix cache (the slot keeps none); None if
        the slot holds no page."""
        page = self._owner.pop(slot, None)
        if page is None:
            return None
        self._cached.add(page)
        self._write_slot_map([(slot, self.padding_residual)])
        return page

    def release_cached_residual(self, pages: list[int]) -> None:
        """The prefix cache gives cached pages back (a tail evicted or adopted whole)."""
        for page in pages:
            if page not in self._cached:
                raise ValueError(f"residual page {page} is not cached")
        for page in pages:
            self._cached.discard(page)
            self._free_residual.append(page)

    def give_page(self, slot: int, page: int) -> None:
        """Slot takes ``page`` in place of its own page: a tail's page, given back by the
        prefix cache in the same allocation, that is now free or another new slot's (no
        token written in either yet), so the tail moves to slot with no copy."""
        own = self._owner[slot]
        if own == page:
            return
        other = next((s for s, p in self._owner.items() if p == page), None)
        pairs = [(slot, page)]
        if other is not None:
            self._owner[other] = own
            pairs.append((other, own))
        else:
            self._free_residual.remove(page)
            self._free_residual.append(own)
        self._owner[slot] = page
        self._write_slot_map(pairs)

    def copy_residual(self, src_page: int, slot: int) -> None:
        """Copies a cached page into slot's own page, every layer (the copy-on-write of a
        shared tail before the request extends it)."""
        dst = self._owner[slot]
        self.k_res[:, dst] = self.k_res[:, src_page]
        self.v_res[:, dst] = self.v_res[:, src_page]

    def dequantize_into_residual(self, page: int, slot: int, *, first_page: bool = False) -> None:
        """Packed page ``page`` of every layer, dequantized into slot's own residual page:
        a prefix that ends inside a cached page continues from those tokens (as the packed
        page holds them), and its page is quantized again when it completes.
        ``first_page``: the page is a sequence's first (a sink page under sink_bits)."""
        dst = self._owner[slot]
        if first_page and self.sink is not None:
            ids = torch.tensor([page], dtype=torch.int32, device=self.pages.device)
            for layer in range(self.layer_num):
                k, v = self.sink.dequantize(self.pages[layer], ids, self.sink_table)
                self.k_res[layer, dst] = k[0].to(self.k_res.dtype)
                self.v_res[layer, dst] = v[0].to(self.v_res.dtype)
            return
        # Every layer's copy of the page in one call (one kernel on a GPU, not one per
        # layer): the pool's [layers, pages] rows read as one list of pages.
        rows = self.num_pages + 1
        ids = torch.arange(self.layer_num, dtype=torch.int32) * rows + page
        k, v = ops.dequantize_pages(
            self.pages.view(self.layer_num * rows, -1),
            ids.to(self.pages.device),
            self.layout.config,
            self.head_num,
            self.head_dim,
        )
        self.k_res[:, dst] = k.to(self.k_res.dtype)
        self.v_res[:, dst] = v.to(self.v_res.dtype)

    def residual_state(self) -> dict[str, int]:
        """total / free / held (by request slots) / cached (tails in the prefix cache): the
        leak line's second kind; after all requests finished, held = 0 and
        free + cached = total."""
        return {
            "total": self.residual_pages,
            "free": len(self._free_residual),
            "held": len(self._owner),
            "cached": len(self._cached),
        }

    # -- the KVCache interface ---------------------------------------------------------
    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.pages[self._layer(layer_id)]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.pages[self._layer(layer_id)]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pages[self._layer(layer_id)]
        return p, p

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs) -> None:
        raise NotImplementedError(
            "OscarTokenToKVPool stores tokens through store_extend/store_decode from the "
            "'oscar' attention backend; another backend cannot write packed pages"
        )

    def residual(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's residual pages, K and V: [residual_pages + 1, 128, H_kv, D]."""
        i = self._layer(layer_id)
        return self.k_res[i], self.v_res[i]

    # -- writes ------------------------------------------------------------------------
    def store_extend(
        self, layer_id: int, plan: ExtendPlan, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Appends the new tokens (rows of k, v [N, H, D] in batch order) of every request
        of an extend or mixed batch, as `ExtendPlan` placed them: the pages they complete
        are quantized in one call, each residual page is rewritten whole in one scatter."""
        pages = self.pages[self._layer(layer_id)]
        k_res, v_res = self.residual(layer_id)
        h, d = self.head_num, self.head_dim
        k = k.view(-1, h, d)
        v = v.view(-1, h, d)
        b = plan.residual.shape[0]
        if b == 0:
            return
        src_k = torch.cat((k_res[plan.residual].view(-1, h, d).to(k.dtype), k))
        src_v = torch.cat((v_res[plan.residual].view(-1, h, d).to(v.dtype), v))
        if plan.page_ids.shape[0]:
            blocks_k = src_k[plan.page_src].view(-1, BLOCK_TOKENS, h, d)
            blocks_v = src_v[plan.page_src].view(-1, BLOCK_TOKENS, h, d)
            ops.quantize_page(blocks_k, blocks_v, pages, plan.page_ids, self.layout.config)
            if self.sink is not None and plan.sink_first.shape[0]:
                self.sink.quantize(
                    blocks_k, blocks_v, pages, plan.sink_first, self.sink_table,
                    src_index=plan.sink_blocks,
                )  # fmt: skip
        k_res[plan.residual] = src_k[plan.residual_src].view(b, BLOCK_TOKENS, h, d).to(k_res.dtype)
        v_res[plan.residual] = src_v[plan.residual_src].view(b, BLOCK_TOKENS, h, d).to(v_res.dtype)

    def store_decode(
        self, layer_id: int, plan: DecodePlan, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """One new token per request (a decode step), without a loop over requests: row b
        of k, v [B, H, D] goes to position ``plan.pos[b]`` of residual page
        ``plan.residual[b]``; the residual pages it completes are quantized by one call over
        every request (``plan.done_pages[b] < 0``: nothing completes, the kernel exits); a first
        page that completes goes to its sink page instead (``plan.done_sink``)."""
        pages = self.pages[self._layer(layer_id)]
        k_res, v_res = self.residual(layer_id)
        h, d = self.head_num, self.head_dim
        k_res[plan.residual, plan.pos] = k.view(-1, h, d).to(k_res.dtype)
        v_res[plan.residual, plan.pos] = v.view(-1, h, d).to(v_res.dtype)
        ops.quantize_page(
            k_res, v_res, pages, plan.done_pages, self.layout.config, src_index=plan.residual
        )
        if self.sink is not None:
            self.sink.quantize(
                k_res, v_res, pages, plan.done_sink, self.sink_table, src_index=plan.residual
            )
