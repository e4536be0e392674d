"""``OscarTokenToKVPool``: SGLang's KV pool holding packed OScaR pages + bf16 residual pages.

Per layer (one allocation for all layers, viewed per layer):
- ``pages[layer]``: uint8 [num_pages + 1, page_bytes], the paged pool `oscar_kv.ops`
  documents (row = page id = token location // 128; row 0 is SGLang's padding page);
- ``k_res[layer]`` / ``v_res[layer]``: [residual_pages, 128, H_kv, D], 16-bit
  (`oscar_kv.sglang.budget.residual_dtype`): the residual pages, where a running request's
  partial last page lives. A request slot (``req_pool_idx``) takes a residual page at its
  first store and gives it back when SGLang frees the slot (`attach`); ``residual_of_slot``
  maps slots to pages and is what the kernels' ``tail_index`` reads.

Both kinds come out of one budget (`oscar_kv.sglang.budget.KVBudget`): the pool allocates
exactly ``budget.nbytes`` and nothing else. SGLang's location space is unchanged (token slots,
``page_size = 128``), so the paged allocator, ``req_to_token`` and the radix tree work as
they are; the bytes behind a slot just do not exist individually. Tokens enter through
`store`, which the attention backend calls with the batch (a bare
``set_kv_buffer(loc, k, v)`` cannot tell whose residual page a token belongs to): completed
128-token blocks are quantized into their pages with `oscar_kv.ops.quantize_page`, the rest
stays in the request's residual page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from oscar_kv import ops
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.sglang.budget import KVBudget, residual_dtype

logger = logging.getLogger(__name__)


@dataclass
class DecodeStep:
    """Where one decode step's new tokens go, worked out once per step for all layers."""

    residual: torch.Tensor  # long [B]: each request's residual page
    pos: torch.Tensor  # long [B]: the new token's position in that page
    done_residual: torch.Tensor  # int32 [n]: residual pages this step completes
    done_pages: torch.Tensor  # int32 [n]: the packed pages they are quantized into


def pool_base() -> type:
    from sglang.srt.mem_cache.memory_pool import KVCache

    return KVCache


def _make_class() -> type:
    KVCache = pool_base()

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
            self.layout = ops.PageLayout.of(config, head_num, head_dim)
            self.num_pages = size // page_size
            self.residual_pages = residual_pages
            self.pages = torch.zeros(
                (layer_num, self.num_pages + 1, self.layout.page_bytes),
                dtype=torch.uint8,
                device=device,
            )
            res_shape = (layer_num, residual_pages, BLOCK_TOKENS, head_num, head_dim)
            self.k_res = torch.zeros(res_shape, dtype=dtype, device=device)
            self.v_res = torch.zeros(res_shape, dtype=dtype, device=device)
            # Host-side ownership: which slot holds which residual page. Sized on `attach`.
            self.residual_of_slot = torch.full((0,), -1, dtype=torch.int32, device=device)
            self._owner: dict[int, int] = {}  # slot -> residual page
            self._free_residual = list(range(residual_pages - 1, -1, -1))
            self.mem_usage = self.get_kv_size_bytes() / 2**30
            logger.info(
                "oscar-kv pool: %s, %d tokens (%d pages) x %d layers, %.3f GiB packed + "
                "%.3f GiB in %d %s residual pages",
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

        # -- sizes ---------------------------------------------------------------------
        def residual_nbytes(self) -> int:
            return (self.k_res.numel() + self.v_res.numel()) * self.k_res.element_size()

        def get_kv_size_bytes(self) -> int:
            return self.pages.numel() + self.residual_nbytes()

        def _layer(self, layer_id: int) -> int:
            return layer_id - self.start_layer

        # -- residual pages ------------------------------------------------------------
        def attach(self, req_to_token_pool: Any) -> None:
            """Binds the pool to SGLang's request slots: a slot's residual page is returned
            when SGLang frees the slot (``free_rows``, which ``free`` also goes through, or
            ``clear``). The wrap is on this one ReqToTokenPool object, which only exists in a
            ``--kv-quant oscar`` process."""
            rows = int(req_to_token_pool.req_to_token.shape[0])
            self.residual_of_slot = torch.full(
                (rows,), -1, dtype=torch.int32, device=self.pages.device
            )
            free_rows, clear = req_to_token_pool.free_rows, req_to_token_pool.clear

            def free_rows_and_residual(indices: list[int]) -> None:
                free_rows(indices)
                self.release_residual(indices)

            def clear_and_residual() -> None:
                clear()
                self.release_residual(list(self._owner))

            req_to_token_pool.free_rows = free_rows_and_residual
            req_to_token_pool.clear = clear_and_residual

        def assign_residual(self, slots: list[int]) -> list[int]:
            """Each slot's residual page, taking a free one for a slot that has none."""
            out = []
            fresh = []
            for slot in slots:
                page = self._owner.get(slot)
                if page is None:
                    if not self._free_residual:
                        raise RuntimeError(
                            f"oscar-kv: no free residual page for request slot {slot} "
                            f"({self.residual_pages} pages, all held by running requests); "
                            "--max-running-requests must not exceed the residual pages"
                        )
                    page = self._free_residual.pop()
                    self._owner[slot] = page
                    fresh.append((slot, page))
                out.append(page)
            if fresh:
                if self.residual_of_slot.numel() == 0:
                    raise RuntimeError("OscarTokenToKVPool.attach(req_to_token_pool) not called")
                idx = torch.tensor([f[0] for f in fresh], dtype=torch.long)
                val = torch.tensor([f[1] for f in fresh], dtype=torch.int32)
                self.residual_of_slot[idx.to(self.pages.device)] = val.to(self.pages.device)
            return out

        def release_residual(self, slots: list[int]) -> None:
            gone = [s for s in slots if s in self._owner]
            for slot in gone:
                self._free_residual.append(self._owner.pop(slot))
            if gone:
                idx = torch.tensor(gone, dtype=torch.long, device=self.pages.device)
                self.residual_of_slot[idx] = -1

        def residual_state(self) -> dict[str, int]:
            """total / free / held residual pages (the leak line's second kind)."""
            return {
                "total": self.residual_pages,
                "free": len(self._free_residual),
                "held": len(self._owner),
            }

        # -- the KVCache interface -----------------------------------------------------
        def get_key_buffer(self, layer_id: int) -> torch.Tensor:
            return self.pages[self._layer(layer_id)]

        def get_value_buffer(self, layer_id: int) -> torch.Tensor:
            return self.pages[self._layer(layer_id)]

        def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
            p = self.pages[self._layer(layer_id)]
            return p, p

        def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs) -> None:
            raise NotImplementedError(
                "OscarTokenToKVPool stores tokens through store(layer_id, batch, k, v) from the "
                "'oscar' attention backend; another backend cannot write packed pages"
            )

        def residual(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
            """This layer's residual pages, K and V: [residual_pages, 128, H_kv, D]."""
            i = self._layer(layer_id)
            return self.k_res[i], self.v_res[i]

        # -- writes --------------------------------------------------------------------
        def store(
            self,
            layer_id: int,
            req_to_token: torch.Tensor,
            req_pool_indices: list[int],
            residual_ids: list[int],
            prefix_lens: list[int],
            new_lens: list[int],
            k: torch.Tensor,
            v: torch.Tensor,
        ) -> None:
            """Appends ``new_lens[b]`` tokens (rows of k, v [N, H, D] in batch order) to
            request b (slot ``req_pool_indices[b]``, residual page ``residual_ids[b]``),
            which already holds ``prefix_lens[b]`` tokens; completed pages are quantized into
            ``req_to_token[slot, page * 128] // 128``."""
            pages = self.pages[self._layer(layer_id)]
            k_res, v_res = self.residual(layer_id)
            k = k.view(-1, self.head_num, self.head_dim)
            v = v.view(-1, self.head_num, self.head_dim)
            blocks_k, blocks_v, page_ids = [], [], []
            off = 0
            batch = zip(req_pool_indices, residual_ids, prefix_lens, new_lens, strict=True)
            for slot, res, pre, n in batch:
                kt = k[off : off + n]
                vt = v[off : off + n]
                off += n
                have = pre % BLOCK_TOKENS
                first_page = pre // BLOCK_TOKENS
                if have:
                    kt = torch.cat((k_res[res, :have].to(kt.dtype), kt))
                    vt = torch.cat((v_res[res, :have].to(vt.dtype), vt))
                full = kt.shape[0] // BLOCK_TOKENS
                for j in range(full):
                    s = slice(j * BLOCK_TOKENS, (j + 1) * BLOCK_TOKENS)
                    blocks_k.append(kt[s])
                    blocks_v.append(vt[s])
                    loc = int(req_to_token[slot, (first_page + j) * BLOCK_TOKENS])
                    page_ids.append(loc // BLOCK_TOKENS)
                rest = kt.shape[0] - full * BLOCK_TOKENS
                if rest:
                    k_res[res, :rest] = kt[full * BLOCK_TOKENS :].to(k_res.dtype)
                    v_res[res, :rest] = vt[full * BLOCK_TOKENS :].to(v_res.dtype)
            if page_ids:
                ops.quantize_page(
                    torch.stack(blocks_k),
                    torch.stack(blocks_v),
                    pages,
                    torch.tensor(page_ids, dtype=torch.int32, device=pages.device),
                    self.config,
                )

        def decode_step(
            self,
            req_to_token: torch.Tensor,
            slots: torch.Tensor,
            residual_ids: torch.Tensor,
            prefix_lens: torch.Tensor,
        ) -> DecodeStep:
            """One new token per request, request b holding ``prefix_lens[b]`` (CPU) tokens
            in slot ``slots[b]`` with residual page ``residual_ids[b]``: its position in that
            page, and the packed pages of the residual pages it completes (page id = location
            of the page's first token // 128)."""
            dev = self.k_res.device
            res = residual_ids.to(device=dev, dtype=torch.long)
            pos = (prefix_lens % BLOCK_TOKENS).to(device=dev, dtype=torch.long)
            done = (prefix_lens % BLOCK_TOKENS == BLOCK_TOKENS - 1).nonzero().flatten()
            first_loc = (prefix_lens[done] // BLOCK_TOKENS * BLOCK_TOKENS).long()
            rows = slots.to(device=req_to_token.device, dtype=torch.long)[
                done.to(req_to_token.device)
            ]
            page_ids = req_to_token[rows, first_loc.to(req_to_token.device)] // BLOCK_TOKENS
            return DecodeStep(
                residual=res,
                pos=pos,
                done_residual=res[done.to(dev)].to(torch.int32),
                done_pages=page_ids.to(device=self.pages.device, dtype=torch.int32),
            )

        def store_decode(
            self, layer_id: int, step: DecodeStep, k: torch.Tensor, v: torch.Tensor
        ) -> None:
            """One new token per request (a decode step), without a loop over requests: row b
            of k, v [B, H, D] goes to position ``step.pos[b]`` of residual page
            ``step.residual[b]``; the pages it completes are quantized in one call."""
            pages = self.pages[self._layer(layer_id)]
            k_res, v_res = self.residual(layer_id)
            k_res[step.residual, step.pos] = k.view(-1, self.head_num, self.head_dim).to(
                k_res.dtype
            )
            v_res[step.residual, step.pos] = v.view(-1, self.head_num, self.head_dim).to(
                v_res.dtype
            )
            if step.done_pages.numel():
                ops.quantize_page(
                    k_res, v_res, pages, step.done_pages, self.config,
                    src_index=step.done_residual,
                )  # fmt: skip

    return OscarTokenToKVPool


_CLASS: type | None = None


def oscar_pool_class() -> type:
    """The pool class (a subclass of SGLang's ``KVCache``; built on first use so that
    importing this module does not import SGLang)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS
