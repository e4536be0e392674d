"""The transformers caches the model-level eval runs: one per method, or all methods in one batch.

- `LayersCache`: a `Cache` over given layer objects; `bf16_cache` is the exact reference.
- `WindowLayer`, `ExactHalfLayer`: `OscarLayer` variants behind `Method.window` (a wider bf16
  window) and `Method.exact` (attribution: K or V of every page kept exact).
- `RowsCache`: batch row i cached by method i, so every method answers in one forward.
- `bf16_extend`, `cache_kv`, `bf16_cache_from`: prefill exactly once, then hand the K/V on (the
  document-in-the-prefix-cache situation of the passkey and chat evals).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from oscar_kv import _needs_extra
from oscar_kv.config import BLOCK_TOKENS, OscarConfig

with _needs_extra("eval", "oscar_kv.eval.caches (`python -m oscar_kv eval`)"):
    from transformers.cache_utils import Cache, DynamicLayer

    from oscar_kv.cache import Bf16Layer, OscarLayer

if TYPE_CHECKING:
    from oscar_kv.eval.methods import Method


class ExactHalfLayer(OscarLayer):
    """Attribution: an `OscarLayer` whose pages keep K (``part="k"``) or V exact (bf16)."""

    def __init__(self, config: OscarConfig, part: str, **kwargs: Any):
        super().__init__(config, **kwargs)
        if part not in ("k", "v"):
            raise ValueError(f"part must be 'k' or 'v', got {part!r}")
        self.part = part

    def _flush_full_pages(self) -> None:
        full = (self.keys.shape[-2] // BLOCK_TOKENS) * BLOCK_TOKENS
        if full == 0:
            return
        exact = (self.keys if self.part == "k" else self.values)[:, :, :full].float()
        super()._flush_full_pages()
        pages = self.k_pages if self.part == "k" else self.v_pages
        pages[:, :, pages.shape[-2] - full :] = exact


class WindowLayer(OscarLayer):
    """`OscarLayer` that keeps ``window`` more tokens in bf16: the tail holds window..window+127."""

    def __init__(self, config: OscarConfig, window: int, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.window = window

    def _flush_full_pages(self) -> None:
        if self.keys.shape[-2] < BLOCK_TOKENS + self.window:
            return
        keep_k = self.keys[:, :, -self.window :]
        keep_v = self.values[:, :, -self.window :]
        self.keys = self.keys[:, :, : -self.window]
        self.values = self.values[:, :, : -self.window]
        super()._flush_full_pages()
        self.keys = torch.cat([self.keys, keep_k], dim=-2)
        self.values = torch.cat([self.values, keep_v], dim=-2)


def _tensor_nbytes(t: Any) -> int:
    """Storage bytes of a tensor or of a quanto tensor subclass (its inner tensors)."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensor_nbytes(getattr(t, n)) for n in names)


def layer_kv_bytes(layer: Any) -> int:
    """Bytes a cache layer holds (packed pages / quanto tensors + bf16 tail)."""
    if hasattr(layer, "kv_bytes"):
        return layer.kv_bytes()
    total = 0
    for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor):
            total += _tensor_nbytes(t)
    return total


class LayersCache(Cache):
    """A transformers `Cache` over given layer objects (one per decoder layer)."""

    def __init__(self, layers: list[Any]):
        super().__init__(layers=layers)

    def kv_bytes(self) -> int:
        return sum(layer_kv_bytes(layer) for layer in self.layers)


def bf16_cache(model_config: Any) -> LayersCache:
    """The exact reference cache: a `Bf16Layer` per decoder layer (the "bf16" method's cache)."""
    layers = model_config.get_text_config(decoder=True).num_hidden_layers
    return LayersCache([Bf16Layer() for _ in range(layers)])


class RowsLayer(DynamicLayer):
    """One decoder layer of `RowsCache`: batch row i is stored by its own layer ``rows[i]``."""

    is_croppable = False

    def __init__(self, rows: list[Any]):
        super().__init__()
        self.rows = rows

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != len(self.rows):
            raise ValueError(
                f"key_states has batch size {key_states.shape[0]}, the cache has "
                f"{len(self.rows)} rows"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        outs = [
            row.update(key_states[i : i + 1], value_states[i : i + 1], *args, **kwargs)
            for i, row in enumerate(self.rows)
        ]
        dtype = key_states.dtype
        keys = torch.cat([k.to(dtype) for k, _ in outs], dim=0)
        values = torch.cat([v.to(dtype) for _, v in outs], dim=0)
        return keys, values

    def get_seq_length(self) -> int:
        return self.rows[0].get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class RowsCache(Cache):
    """A batch whose row i is cached by method ``methods[i]``: all methods in one forward.

    Every row must hold the same number of tokens (the rows are fed the same-length inputs).
    """

    def __init__(self, methods: Sequence[Method], model_config: Any):
        n = model_config.get_text_config(decoder=True).num_hidden_layers
        self.methods = list(methods)
        super().__init__(layers=[RowsLayer([m.make_layer() for m in methods]) for _ in range(n)])

    def row_kv_bytes(self, row: int) -> int:
        return sum(layer_kv_bytes(layer.rows[row]) for layer in self.layers)

    def load(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store precomputed per-layer K/V ([1, H, T, D], e.g. a bf16 prefill) in every row."""
        rows = len(self.methods)
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            # fp32 like the model's own K/V (the bf16 rows round them again)
            layer.update(k.float().expand(rows, -1, -1, -1), v.float().expand(rows, -1, -1, -1))


def bf16_extend(
    model: Any, cache: Cache, ids: torch.Tensor, chunk: int = 1024
) -> torch.Tensor | None:
    """Feed ``ids`` [T] into a bf16 cache in chunks; return the last position's logits."""
    logits = None
    with torch.no_grad():
        for a in range(0, ids.shape[0], chunk):
            logits = model(
                input_ids=ids[None, a : a + chunk],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[0, -1]
    return logits


def cache_kv(cache: Cache, upto: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (K, V) a bf16 cache holds, the first ``upto`` tokens (None: all)."""
    return [(layer.keys[:, :, :upto], layer.values[:, :, :upto]) for layer in cache.layers]


def bf16_cache_from(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    """A fresh bf16 cache holding ``kv`` (a copy of another cache's prefix, see `cache_kv`)."""
    cache = bf16_cache(model.config)
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.update(k, v)
    return cache
