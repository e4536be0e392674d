"""Attention backend "oscar": extend, decode and mixed batches over packed + residual pages.

Built on `oscar_kv.ops` (CUDA > Triton on a GPU, C++ CPU kernels > batched torch on a CPU,
chosen by tensor device and ``OSCAR_KV_BACKEND``). Per batch, `init_forward_metadata` reads
the request slots and lengths once and builds the page table from SGLang's ``req_to_token``
(page id = location of the page's first token // 128). Then per layer:

- extend (and mixed; SGLang routes mixed batches to ``forward_extend`` off NPU): the new
  tokens attend to their request's cached pages, its residual page and themselves
  (`ops.extend_attention`), then are stored (`OscarTokenToKVPool.store`: completed pages
  quantized, the rest into the residual page);
- decode: the new token is stored first, then `ops.decode_attention` reads pages + residual
  page (the ops' "tail", indexed by each request's residual page id).

A request's residual page is assigned in `init_forward_metadata` (once per batch) from the
pool's free list and returned when SGLang frees the request slot.

Q/K rotation and the norm descale happen inside the ops; V is un-rotated there unless the
pool's config says V was folded into the weights (`oscar_kv.sglang.weights`). GQA is the ops'
(query head j reads KV head j // group). CUDA graphs are not captured by this backend: the
plugin disables them with a logged notice when ``--kv-quant oscar`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from oscar_kv import ops
from oscar_kv.config import BLOCK_TOKENS


@dataclass
class OscarForwardMetadata:
    slots: list[int]
    prefix_lens: list[int]  # tokens cached before this forward
    new_lens: list[int]  # tokens this forward adds
    residual: list[int]  # each request's residual page
    residual_t: torch.Tensor  # int32 [B]
    prefix_lens_t: torch.Tensor  # int32 [B], on the CPU
    page_table: torch.Tensor  # int32 [B, max_pages]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    # Decode only (None otherwise), the same for every layer: where the new tokens go, and
    # each request's pages / tail length once they are stored.
    decode_step: Any = None
    num_pages_t: torch.Tensor | None = None  # int32 [B]
    tail_len_t: torch.Tensor | None = None  # int32 [B]


def _backend_base() -> type:
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    return AttentionBackend


def _make_class() -> type:
    AttentionBackend = _backend_base()

    class OscarAttnBackend(AttentionBackend):
        """See the module docstring. ``model_runner`` needs ``device``,
        ``req_to_token_pool`` and ``token_to_kv_pool`` (an `OscarTokenToKVPool`)."""

        def __init__(self, model_runner: Any) -> None:
            super().__init__()
            self.device = model_runner.device
            self.req_to_token_pool = model_runner.req_to_token_pool
            self.pool = model_runner.token_to_kv_pool
            if not hasattr(self.pool, "store"):
                raise ValueError(
                    "attention backend 'oscar' needs the oscar-kv pool (start the server with "
                    f"--kv-quant oscar); got {type(self.pool).__name__}"
                )
            self.config = self.pool.config
            self.forward_metadata: OscarForwardMetadata | None = None

        def init_forward_metadata(self, forward_batch: Any) -> None:
            slots = forward_batch.req_pool_indices.tolist()
            seq_lens = forward_batch.seq_lens.tolist()
            if forward_batch.forward_mode.is_decode():
                new_lens = [1] * len(slots)
            else:
                new_lens = [int(x) for x in forward_batch.extend_seq_lens_cpu]
            prefix_lens = [s - n for s, n in zip(seq_lens, new_lens, strict=True)]
            max_pages = max([-(-s // BLOCK_TOKENS) for s in seq_lens] + [1])
            rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices.long()]
            cols = rows[:, : max_pages * BLOCK_TOKENS : BLOCK_TOKENS]
            cu = [0]
            for n in new_lens:
                cu.append(cu[-1] + n)
            dev = self.pool.pages.device
            residual = self.pool.assign_residual(slots)
            md = OscarForwardMetadata(
                slots=slots,
                residual=residual,
                residual_t=torch.tensor(residual, dtype=torch.int32, device=dev),
                prefix_lens=prefix_lens,
                new_lens=new_lens,
                prefix_lens_t=torch.tensor(prefix_lens, dtype=torch.int32),
                page_table=(cols // BLOCK_TOKENS).to(device=dev, dtype=torch.int32),
                cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
            )
            if forward_batch.forward_mode.is_decode():
                md.decode_step = self.pool.decode_step(
                    self.req_to_token_pool.req_to_token,
                    forward_batch.req_pool_indices,
                    md.residual_t,
                    md.prefix_lens_t,
                )
                seq = md.prefix_lens_t + 1
                md.num_pages_t = (seq // BLOCK_TOKENS).to(dev)
                md.tail_len_t = (seq % BLOCK_TOKENS).to(dev)
            self.forward_metadata = md

        def _store(self, layer: Any, k: torch.Tensor, v: torch.Tensor) -> None:
            md = self.forward_metadata
            self.pool.store(
                layer.layer_id,
                self.req_to_token_pool.req_to_token,
                md.slots,
                md.residual,
                md.prefix_lens,
                md.new_lens,
                k,
                v,
            )

        def _shapes(self, layer: Any, q, k, v):
            hq, hk, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
            return q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
            md = self.forward_metadata
            q3, k3, v3 = self._shapes(layer, q, k, v)
            k_tail, v_tail = self.pool.residual(layer.layer_id)
            pre = md.prefix_lens_t
            out = ops.extend_attention(
                q3,
                k3,
                v3,
                md.cu_seqlens,
                self.pool.get_key_buffer(layer.layer_id),
                md.page_table,
                pre // BLOCK_TOKENS,
                k_tail,
                v_tail,
                pre % BLOCK_TOKENS,
                self.config,
                tail_index=md.residual_t,
                scale=layer.scaling,
            )
            if save_kv_cache:
                self._store(layer, k3, v3)
            return out.flatten(1)  # [tokens, heads * D], also for 0 tokens

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
            md = self.forward_metadata
            q3, k3, v3 = self._shapes(layer, q, k, v)
            if save_kv_cache:
                self.pool.store_decode(layer.layer_id, md.decode_step, k3, v3)
            k_tail, v_tail = self.pool.residual(layer.layer_id)
            out = ops.decode_attention(
                q3,
                self.pool.get_key_buffer(layer.layer_id),
                md.page_table,
                md.num_pages_t,
                k_tail,
                v_tail,
                md.tail_len_t,
                self.config,
                tail_index=md.residual_t,
                scale=layer.scaling,
            )
            return out.flatten(1)  # [tokens, heads * D], also for 0 tokens

        def get_cuda_graph_seq_len_fill_value(self):
            return 1

    return OscarAttnBackend


_CLASS: type | None = None


def oscar_backend_class() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def create_backend(model_runner: Any) -> Any:
    """The factory SGLang's attention registry calls."""
    return oscar_backend_class()(model_runner)
