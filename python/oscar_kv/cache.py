"""transformers KV caches backed by the oscar-kv reference: `OscarCache` and the `Bf16Cache` baseline.

`OscarCache` behaves like the SGLang integration described in docs/design.md, one sequence per batch
row: per layer, new K/V tokens accumulate in a bf16 tail; as soon as the tail holds >= 128
tokens, its first whole multiple of 128 tokens is quantized with `oscar_kv.ref.quantize_kv` into
pages and dropped from the tail, so after every update the tail holds < 128 tokens. Attention
sees the dequantized pages (original basis) followed by the bf16 tail and the new tokens, in the
model's dtype. Like SGLang's extend, a forward attends to its own new tokens at bf16 precision
and quantizes the pages they complete afterwards, for the following forwards.

KIVI and the ablations are the same class with another `OscarConfig`
(`OscarCache(OscarConfig.kivi(2))`).

Use with ``model.generate(input_ids, past_key_values=cache, ...)``; for a multi-turn chat pass
the same cache again with the whole conversation as ``input_ids`` (the tokens of every earlier
turn first, exactly as before): generate feeds only the tokens the cache does not hold yet.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from oscar_kv import _needs_extra
from oscar_kv.config import BLOCK_TOKENS, OscarConfig

with _needs_extra("hf", "oscar_kv.cache (the transformers KV caches)"):
    from transformers.cache_utils import Cache, DynamicLayer

TAIL_DTYPE = torch.bfloat16


def _layer_count(model_config: Any) -> int:
    text_config = model_config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        bad = sorted({t for t in layer_types if t != "full_attention"})
        raise ValueError(
            f"model_config has layer types {bad}; only full_attention layers are supported"
        )
    if getattr(text_config, "sliding_window", None) is not None:
        raise ValueError(
            "model_config uses sliding-window attention, which this cache does not support"
        )
    return text_config.num_hidden_layers


class OscarLayer(DynamicLayer):
    """One layer of `OscarCache`: packed pages per batch row plus a bf16 tail.

    Attributes (batch layout [B, H_kv, tokens, D], as transformers uses):
      keys, values: the bf16 tail, fewer than 128 tokens after every update.
      pages: one `QuantizedKV` per batch row holding the quantized pages (empty tails), or None.
      k_pages, v_pages: the pages dequantized once, fp32 [B, H_kv, pages * 128, D] -- a working
        copy so that a step does not dequantize everything again; not counted in `kv_bytes`.
    """

    is_croppable = False

    def __init__(self, config: OscarConfig, **kwargs: Any):
        super().__init__()
        if not isinstance(config, OscarConfig):
            raise ValueError(f"config must be an OscarConfig, got {type(config).__name__}")  # noqa: TRY004
        self.config = config
        self.cumulative_length = 0
        self.pages: list[Any] | None = None
        self.k_pages: torch.Tensor | None = None
        self.v_pages: torch.Tensor | None = None
        self.sink_nbytes = 0  # the first page's bytes under config.sink_bits (else in pages)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros((batch, heads, 0, dim), dtype=TAIL_DTYPE)
        self.values = value_states.new_zeros(
            (batch, heads, 0, value_states.shape[-1]), dtype=TAIL_DTYPE
        )
        self.k_pages = key_states.new_zeros((batch, heads, 0, dim), dtype=torch.float32)
        self.v_pages = value_states.new_zeros(
            (batch, heads, 0, value_states.shape[-1]), dtype=torch.float32
        )
        self.pages = [None] * batch
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"key_states has batch size {key_states.shape[0]}, the cache holds {self.keys.shape[0]}"
            )
        new_k = key_states.to(TAIL_DTYPE)
        new_v = value_states.to(TAIL_DTYPE)
        self.keys = torch.cat([self.keys, new_k], dim=-2)
        self.values = torch.cat([self.values, new_v], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        # What this forward attends to: the pages quantized before it, then the exact bf16 tokens.
        dtype = key_states.dtype
        keys_out = torch.cat([self.k_pages.to(dtype), self.keys.to(dtype)], dim=-2)
        values_out = torch.cat([self.v_pages.to(dtype), self.values.to(dtype)], dim=-2)
        self._flush_full_pages()
        return keys_out, values_out

    def _flush_sink_page(self) -> None:
        """``config.sink_bits``: the sequence's first page, at its own width (or exact)."""
        from oscar_kv.ref import dequantize_kv, quantize_kv

        k0 = self.keys[:, :, :BLOCK_TOKENS]
        v0 = self.values[:, :, :BLOCK_TOKENS]
        sink = self.config.sink_config
        if sink is None:  # sink_bits 16: kept exact
            k_hat, v_hat = k0.float(), v0.float()
            self.sink_nbytes = k0.numel() * k0.element_size() + v0.numel() * v0.element_size()
        else:
            ks, vs = [], []
            for b in range(k0.shape[0]):
                q = quantize_kv(k0[b].transpose(0, 1), v0[b].transpose(0, 1), sink)
                kh, vh = dequantize_kv(q)
                ks.append(kh.transpose(0, 1))
                vs.append(vh.transpose(0, 1))
                self.sink_nbytes += q.nbytes
            k_hat, v_hat = torch.stack(ks), torch.stack(vs)
        self.k_pages = torch.cat([self.k_pages, k_hat.to(self.k_pages)], dim=-2)
        self.v_pages = torch.cat([self.v_pages, v_hat.to(self.v_pages)], dim=-2)
        self.keys = self.keys[:, :, BLOCK_TOKENS:].contiguous()
        self.values = self.values[:, :, BLOCK_TOKENS:].contiguous()

    def _flush_full_pages(self) -> None:
        """Quantize the tail's first whole multiple of 128 tokens into pages."""
        from oscar_kv.ref import QuantizedKV, dequantize_kv, quantize_kv

        if (
            self.config.sink_bits is not None
            and self.num_pages() == 0
            and self.keys.shape[-2] >= BLOCK_TOKENS
        ):
            self._flush_sink_page()
        full = (self.keys.shape[-2] // BLOCK_TOKENS) * BLOCK_TOKENS
        if full == 0:
            return
        k_new, v_new = [], []
        for b in range(self.keys.shape[0]):
            qkv = quantize_kv(
                self.keys[b, :, :full].transpose(0, 1),
                self.values[b, :, :full].transpose(0, 1),
                self.config.page_config,
            )
            k_hat, v_hat = dequantize_kv(qkv)  # fp32 [full, H, D], original basis
            k_new.append(k_hat.transpose(0, 1))
            v_new.append(v_hat.transpose(0, 1))
            old = self.pages[b]
            self.pages[b] = qkv if old is None else QuantizedKV.cat([old, qkv])
        self.k_pages = torch.cat([self.k_pages, torch.stack(k_new).to(self.device)], dim=-2)
        self.v_pages = torch.cat([self.v_pages, torch.stack(v_new).to(self.device)], dim=-2)
        self.keys = self.keys[:, :, full:].contiguous()
        self.values = self.values[:, :, full:].contiguous()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def num_pages(self) -> int:
        return 0 if self.k_pages is None else self.k_pages.shape[-2] // BLOCK_TOKENS

    def tail_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def kv_bytes(self) -> int:
        """Packed page bytes (every batch row) plus the bf16 tail bytes."""
        if not self.is_initialized:
            return 0
        pages = sum(q.nbytes for q in self.pages if q is not None)
        tail = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return pages + tail + self.sink_nbytes

    def reset(self) -> None:
        self.cumulative_length = 0
        self.pages = None
        self.k_pages = self.v_pages = None
        self.sink_nbytes = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        if remove > self.tail_length():
            raise NotImplementedError(
                "OscarCache cannot crop tokens that are already quantized into pages"
            )
        self.keys = self.keys[:, :, : self.tail_length() - remove]
        self.values = self.values[:, :, : self.values.shape[-2] - remove]
        self.cumulative_length -= remove

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("OscarCache does not support beam search or batch reshuffling")

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


class OscarCache(Cache):
    """A transformers `Cache` whose full 128-token pages are quantized with the oscar-kv reference.

    Args:
        config: the quantizer (`OscarConfig()` is OScaR 2-bit; `OscarConfig.kivi(2)` is KIVI).
        model_config: the model's config; when given, one layer per decoder layer is created up
            front and models with non-full attention layers are rejected. Otherwise layers are
            created lazily.

    `kv_bytes()` counts the bytes a serving system holds: every packed page (`QuantizedKV.nbytes`,
    scales, zeros and norms included) plus the bf16 tail. The fp32 dequantized working copy of
    the pages kept for the plain-torch attention is not counted: a serving kernel reads the
    packed pages directly.
    """

    def __init__(self, config: OscarConfig | None = None, model_config: Any = None):
        config = OscarConfig() if config is None else config
        if not isinstance(config, OscarConfig):
            raise ValueError(f"config must be an OscarConfig, got {type(config).__name__}")  # noqa: TRY004
        self.config = config
        if model_config is not None:
            layers = [OscarLayer(self.config) for _ in range(_layer_count(model_config))]
            super().__init__(layers=layers)
        else:
            super().__init__(layer_class_to_replicate=partial(OscarLayer, self.config))

    def kv_bytes(self) -> int:
        """Bytes held: packed pages + bf16 tail over all layers (not the fp32 working copy)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def num_pages(self, layer_idx: int = 0) -> int:
        """Quantized pages held by one layer (per batch row)."""
        return self.layers[layer_idx].num_pages() if layer_idx < len(self.layers) else 0

    def tail_length(self, layer_idx: int = 0) -> int:
        """Tokens held in the bf16 tail of one layer (always < 128 between forwards)."""
        return self.layers[layer_idx].tail_length() if layer_idx < len(self.layers) else 0


class Bf16Layer(DynamicLayer):
    """A `DynamicLayer` storing K/V in bf16 and returning them in the model's dtype."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states.to(TAIL_DTYPE), value_states.to(TAIL_DTYPE))
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class Bf16Cache(Cache):
    """The bf16 KV-cache baseline for a model running in fp32: K/V held rounded to bf16."""

    def __init__(self, model_config: Any = None):
        if model_config is not None:
            super().__init__(layers=[Bf16Layer() for _ in range(_layer_count(model_config))])
        else:
            super().__init__(layer_class_to_replicate=Bf16Layer)

    def kv_bytes(self) -> int:
        """Bytes of the bf16 K and V held over all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)
