"""The KV caches the model-level eval compares, and what each costs per token.

Methods: bf16, KIVI, rotation-only, direct scaling and OScaR from `OscarConfig`, transformers'
own `QuantizedCache` (quanto backend, per-token groups of 64 channels, residual 128) when
`optimum-quanto` is installed, and the beyond-the-paper variants (`OscarConfig.sink_bits`: the
first page at higher precision; `Method.window`: a wider bf16 window). `analysis_methods` are
attribution runs, not storage formats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.eval.caches import Bf16Layer, ExactHalfLayer, LayersCache, OscarLayer, WindowLayer

PAPER_FAMILIES = ("bf16", "kivi", "rotation-only", "direct-scaling", "oscar")

# The CLI's default method lists (the plots draw DEFAULT_LONG's curves solid).
DEFAULT_LONG = ("bf16", "kivi-2b-g32-none", "oscar-2b-g32-token")
DEFAULT_NEEDLE = ("bf16", "kivi-2b-g32-none", "kivi-4b-g32-none", "oscar-2b-g32-token",
                  "oscar-4b-g32-token", "quanto-2b", "oscar-2b-g32-token+sink4")  # fmt: skip
DEFAULT_AGREE = ("bf16", "kivi-2b-g32-none", "oscar-2b-g32-token", "oscar-4b-g32-token",
                 "oscar-2b-g32-token+sink4")  # fmt: skip


def _page_bytes(config: OscarConfig, kv_heads: int, head_dim: int) -> int:
    from oscar_kv.ref import quantize_kv

    z = torch.zeros(BLOCK_TOKENS, kv_heads, head_dim)
    return quantize_kv(z, z, config).page_nbytes


@dataclass(frozen=True)
class Method:
    """One compared KV cache: its label, family and how to build a cache layer.

    config: the quantizer (None: the bf16 cache or quanto).
    quanto_bits: transformers' `QuantizedCache` with the quanto backend at these bits.
    window: beyond the paper: tokens kept in bf16 beyond the 128-token tail (0 or 128), i.e. a
        page is quantized only once ``128 + window`` newer tokens follow its start.
    exact: attribution only, not a storage format: "k" or "v" keeps that half of every page
        exact (bf16) while the other half is quantized by ``config``.
    """

    label: str
    family: str
    bits: int
    config: OscarConfig | None = None
    quanto_bits: int | None = None
    window: int = 0
    exact: str = ""

    @property
    def k_group(self) -> int | None:
        return None if self.config is None else self.config.k_group

    @property
    def norm(self) -> str:
        return "none" if self.config is None else self.config.norm

    @property
    def is_paper(self) -> bool:
        """A configuration of the paper's comparison (a row of ppl.csv)."""
        return (
            self.family in PAPER_FAMILIES
            and (self.config is None or self.config.sink_bits is None)
            and self.window == 0
            and not self.exact
            and (self.config is None or self.config.v_group == 32)
        )

    def make_layer(self) -> Any:
        if self.quanto_bits is not None:
            from transformers.cache_utils import QuantoQuantizedLayer

            return QuantoQuantizedLayer(nbits=self.quanto_bits, residual_length=BLOCK_TOKENS)
        if self.config is None:
            return Bf16Layer()
        if self.window:
            return WindowLayer(self.config, self.window)
        if self.exact:
            return ExactHalfLayer(self.config, self.exact)
        return OscarLayer(self.config)

    def make_cache(self, model_config: Any) -> LayersCache:
        layers = model_config.get_text_config(decoder=True).num_hidden_layers
        return LayersCache([self.make_layer() for _ in range(layers)])

    def bytes_per_token(self, kv_heads: int, head_dim: int, context: int | None = None) -> float:
        """Bytes per token per layer of a full cache: ``page_nbytes / 128`` for a paged method.

        With ``context`` given, the beyond-the-paper variants count what they hold at that
        context on top of full pages: the sink page's extra bytes and the extra bf16 window,
        spread over the context.
        """
        bf16 = 4 * kv_heads * head_dim
        if self.config is None and self.quanto_bits is None:
            return float(bf16)
        if self.quanto_bits is not None:
            # Per (token, head, 64 channels) an fp32 scale and shift (the model runs in fp32),
            # for K and for V, plus the codes.
            codes = 2 * kv_heads * head_dim * self.quanto_bits / 8
            return codes + 2 * 2 * 4 * kv_heads * math.ceil(head_dim / 64)
        page = _page_bytes(self.config.page_config, kv_heads, head_dim) / BLOCK_TOKENS
        if context is None or context < BLOCK_TOKENS:
            return page
        extra = 0.0
        if self.config.sink_bits is not None:
            sink_cfg = self.config.sink_config
            if sink_cfg is None:  # kept exact
                sink = float(bf16)
            else:
                sink = _page_bytes(sink_cfg, kv_heads, head_dim) / BLOCK_TOKENS
            extra += (sink - page) * BLOCK_TOKENS / context
        if self.window:
            extra += (bf16 - page) * min(self.window, context) / context
        return page + extra


def paper_methods(k_groups: Sequence[int] = (32, 128)) -> list[Method]:
    """The issue's comparison: bf16, KIVI-2/4, rotation-only-2, direct-scaling-2, OScaR-2 (token
    and head norm), OScaR-4, at K group 32 and (2-bit KIVI/OScaR) 128."""
    cfgs = [OscarConfig.kivi(2), OscarConfig.kivi(4)]
    cfgs += [OscarConfig.rotation_only(2), OscarConfig.direct_scaling(2)]
    cfgs += [OscarConfig(bits=2), OscarConfig(bits=2, norm="head"), OscarConfig(bits=4)]
    for g in k_groups:
        if g != 32:
            cfgs += [OscarConfig.kivi(2, g), OscarConfig(bits=2, k_group=g)]
    out = [Method("bf16", "bf16", 16)]
    out += [Method(c.label, c.method, c.bits, config=c) for c in cfgs]
    return out


def quanto_methods() -> list[Method]:
    """transformers' `QuantizedCache` (quanto backend) at 2 and 4 bits, if it can run here."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return []
    return [Method(f"quanto-{b}b", "quanto", b, quanto_bits=b) for b in (2, 4)]


def _config_method(config: OscarConfig) -> Method:
    return Method(config.label, config.method, config.bits, config=config)


def variant_methods() -> list[Method]:
    """Beyond the paper: ideas that could beat OScaR-2 at (about) its bytes per token."""
    base = OscarConfig(bits=2)
    g128 = OscarConfig(bits=2, k_group=128)
    g128v16 = OscarConfig(bits=2, k_group=128, v_group=16)
    vg16 = OscarConfig(bits=2, v_group=16)
    return [
        _config_method(replace(base, sink_bits=4)),
        _config_method(replace(g128, sink_bits=4)),
        Method(f"{g128v16.label}-v16", "oscar", 2, config=g128v16),
        Method(f"{base.label}+win256", "oscar", 2, config=base, window=BLOCK_TOKENS),
        _config_method(replace(base, sink_bits=16)),
        Method(f"{vg16.label}-v16", "oscar", 2, config=vg16),
    ]


def analysis_methods() -> list[Method]:
    """Attribution runs (not storage formats): OScaR-2 / KIVI-2 with exact K or exact V."""
    out = []
    for cfg in (OscarConfig(bits=2), OscarConfig.kivi(2)):
        for part in ("k", "v"):
            out.append(Method(f"{cfg.label}:exact-{part}", "analysis", 2, config=cfg, exact=part))
    return out


def all_methods() -> list[Method]:
    return paper_methods() + quanto_methods() + variant_methods() + analysis_methods()


def select(methods: Sequence[Method], labels: Sequence[str]) -> list[Method]:
    """The methods named by ``labels``; quanto labels are dropped when quanto is unavailable."""
    by_label = {m.label: m for m in methods}
    if not quanto_methods():
        labels = [x for x in labels if not x.startswith("quanto-")]
    missing = [x for x in labels if x not in by_label]
    if missing:
        raise ValueError(f"unknown methods {missing}; known: {sorted(by_label)}")
    return [by_label[x] for x in labels]
