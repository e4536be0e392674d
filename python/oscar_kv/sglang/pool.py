"""``OscarTokenToKVPool``: SGLang's KV pool holding packed OScaR pages + bf16 tails.

Per layer (one allocation for all layers, viewed per layer):
- ``pages[layer]``: uint8 [num_pages + 1, page_bytes], the paged pool `oscar_kv.ops`
  documents (row = page id = token location // 128; row 0 is SGLang's padding page);
- ``k_tail[layer]`` / ``v_tail[layer]``: [tail_slots, 128, H_kv, D] in the model dtype, the
  partial last page of each running request, indexed by its ``req_pool_idx``.

SGLang's location space is unchanged (token slots, ``page_size = 128``), so the paged
allocator, ``req_to_token`` and the radix tree work as they are; the bytes behind a slot
just do not exist individually. Tokens enter through `store`, which the attention backend
calls with the batch (a bare ``set_kv_buffer(loc, k, v)`` cannot tell whose tail a token
belongs to): completed 128-token blocks are quantized into their pages with
`oscar_kv.ops.quantize_page`, the rest stays in the request's tail.

Capacity: `bytes_per_token` (packed bytes of all layers, exact) is what the plugin hands
SGLang's capacity planner instead of the bf16 cell size; the tails are a fixed cost of
``tail_slots`` requests (`tail_bytes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from oscar_kv import ops
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.plan import bf16_bytes_per_token, oscar_bytes_per_token, tail_bytes_per_sequence

logger = logging.getLogger(__name__)


@dataclass
class DecodeStep:
    """Where one decode step's new tokens go, worked out once per step for all layers."""

    slots: torch.Tensor  # long [B]: each request's tail slot
    pos: torch.Tensor  # long [B]: the new token's position in that tail
    done_slots: torch.Tensor  # int32 [n]: slots whose tail this step completes
    done_pages: torch.Tensor  # int32 [n]: the pages those tails are quantized into


def pool_base() -> type:
    from sglang.srt.mem_cache.memory_pool import KVCache

    return KVCache


def _make_class() -> type:
    KVCache = pool_base()

    class OscarTokenToKVPool(KVCache):
        """See the module docstring."""

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
            tail_slots: int,
            start_layer: int | None = None,
            end_layer: int | None = None,
            **_ignored: Any,
        ) -> None:
            if page_size != BLOCK_TOKENS:
                raise ValueError(f"OscarTokenToKVPool needs page_size {BLOCK_TOKENS}")
            if dtype not in (torch.bfloat16, torch.float16, torch.float32):
                dtype = torch.bfloat16
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
            self.tail_slots = tail_slots
            self.pages = torch.zeros(
                (layer_num, self.num_pages + 1, self.layout.page_bytes),
                dtype=torch.uint8,
                device=device,
            )
            tail_shape = (layer_num, tail_slots, BLOCK_TOKENS, head_num, head_dim)
            self.k_tail = torch.zeros(tail_shape, dtype=dtype, device=device)
            self.v_tail = torch.zeros(tail_shape, dtype=dtype, device=device)
            self.mem_usage = self.get_kv_size_bytes() / 2**30
            logger.info(
                "oscar-kv pool: %s, %d tokens (%d pages) x %d layers, %.3f GiB packed + "
                "%.3f GiB bf16 tails for %d requests",
                config.label, size, self.num_pages, layer_num,
                self.pages.numel() / 2**30,
                (self.k_tail.numel() + self.v_tail.numel()) * self.k_tail.element_size() / 2**30,
                tail_slots,
            )  # fmt: skip

        # -- sizes ---------------------------------------------------------------------
        def get_kv_size_bytes(self) -> int:
            tails = (self.k_tail.numel() + self.v_tail.numel()) * self.k_tail.element_size()
            return self.pages.numel() + tails

        def _layer(self, layer_id: int) -> int:
            return layer_id - self.start_layer

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

        def tails(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
            i = self._layer(layer_id)
            return self.k_tail[i], self.v_tail[i]

        # -- writes --------------------------------------------------------------------
        def store(
            self,
            layer_id: int,
            req_to_token: torch.Tensor,
            req_pool_indices: list[int],
            prefix_lens: list[int],
            new_lens: list[int],
            k: torch.Tensor,
            v: torch.Tensor,
        ) -> None:
            """Appends ``new_lens[b]`` tokens (rows of k, v [N, H, D] in batch order) to
            request b, which already holds ``prefix_lens[b]`` tokens; completed pages are
            quantized into ``req_to_token[slot, page * 128] // 128``."""
            pages = self.pages[self._layer(layer_id)]
            k_tail, v_tail = self.tails(layer_id)
            k = k.view(-1, self.head_num, self.head_dim)
            v = v.view(-1, self.head_num, self.head_dim)
            blocks_k, blocks_v, page_ids = [], [], []
            off = 0
            for slot, pre, n in zip(req_pool_indices, prefix_lens, new_lens, strict=True):
                kt = k[off : off + n]
                vt = v[off : off + n]
                off += n
                have = pre % BLOCK_TOKENS
                first_page = pre // BLOCK_TOKENS
                if have:
                    kt = torch.cat((k_tail[slot, :have].to(kt.dtype), kt))
                    vt = torch.cat((v_tail[slot, :have].to(vt.dtype), vt))
                full = kt.shape[0] // BLOCK_TOKENS
                for j in range(full):
                    s = slice(j * BLOCK_TOKENS, (j + 1) * BLOCK_TOKENS)
                    blocks_k.append(kt[s])
                    blocks_v.append(vt[s])
                    loc = int(req_to_token[slot, (first_page + j) * BLOCK_TOKENS])
                    page_ids.append(loc // BLOCK_TOKENS)
                rest = kt.shape[0] - full * BLOCK_TOKENS
                if rest:
                    k_tail[slot, :rest] = kt[full * BLOCK_TOKENS :].to(k_tail.dtype)
                    v_tail[slot, :rest] = vt[full * BLOCK_TOKENS :].to(v_tail.dtype)
            if page_ids:
                ops.quantize_page(
                    torch.stack(blocks_k),
                    torch.stack(blocks_v),
                    pages,
                    torch.tensor(page_ids, dtype=torch.int32, device=pages.device),
                    self.config,
                )

        def decode_step(
            self, req_to_token: torch.Tensor, slots: torch.Tensor, prefix_lens: torch.Tensor
        ) -> DecodeStep:
            """One new token per request, request b holding ``prefix_lens[b]`` (CPU) tokens
            in slot ``slots[b]``: its tail position, and the pages of the tails it completes
            (page id = location of the page's first token // 128)."""
            dev = self.k_tail.device
            slots_l = slots.to(device=dev, dtype=torch.long)
            pos = (prefix_lens % BLOCK_TOKENS).to(device=dev, dtype=torch.long)
            done = (prefix_lens % BLOCK_TOKENS == BLOCK_TOKENS - 1).nonzero().flatten()
            first_loc = (prefix_lens[done] // BLOCK_TOKENS * BLOCK_TOKENS).long()
            rows = slots_l[done.to(dev)].to(req_to_token.device)
            page_ids = req_to_token[rows, first_loc.to(req_to_token.device)] // BLOCK_TOKENS
            return DecodeStep(
                slots=slots_l,
                pos=pos,
                done_slots=slots_l[done.to(dev)].to(torch.int32),
                done_pages=page_ids.to(device=self.pages.device, dtype=torch.int32),
            )

        def store_decode(
            self, layer_id: int, step: DecodeStep, k: torch.Tensor, v: torch.Tensor
        ) -> None:
            """One new token per request (a decode step), without a loop over requests: row b
            of k, v [B, H, D] goes to position ``step.pos[b]`` of slot ``step.slots[b]``'s
            tail; the tails it completes are quantized into their pages in one call."""
            pages = self.pages[self._layer(layer_id)]
            k_tail, v_tail = self.tails(layer_id)
            k_tail[step.slots, step.pos] = k.view(-1, self.head_num, self.head_dim).to(k_tail.dtype)
            v_tail[step.slots, step.pos] = v.view(-1, self.head_num, self.head_dim).to(v_tail.dtype)
            if step.done_pages.numel():
                ops.quantize_page(
                    k_tail, v_tail, pages, step.done_pages, self.config, src_index=step.done_slots
                )

    return OscarTokenToKVPool


_CLASS: type | None = None


def oscar_pool_class() -> type:
    """The pool class (a subclass of SGLang's ``KVCache``; built on first use so that
    importing this module does not import SGLang)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def capacity_report(
    layers: int, kv_heads: int, head_dim: int, config: OscarConfig, available_bytes: int
) -> str:
    """The start-up line: bytes per token and tokens that fit, OScaR vs bf16."""
    bf = bf16_bytes_per_token(layers, kv_heads, head_dim)
    ob = oscar_bytes_per_token(layers, kv_heads, head_dim, config)
    tb, to = available_bytes // bf, available_bytes // ob
    return (
        f"oscar-kv capacity ({config.label}, {layers} layers x {kv_heads} KV heads x "
        f"D={head_dim}): {ob} B/token vs bf16 {bf} B/token; {to} tokens fit vs {tb} with "
        f"bf16 ({to / max(tb, 1):.2f}x) in {available_bytes / 2**30:.2f} GiB; bf16 tail "
        f"{tail_bytes_per_sequence(layers, kv_heads, head_dim)} B per running request"
    )
