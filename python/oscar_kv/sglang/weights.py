"""Fold the V Hadamard into W_V / W_O after SGLang loads the weights.

For every attention layer ``self_attn`` with a fused ``qkv_proj`` (rows: Q heads, K heads,
V heads of this TP rank) and an ``o_proj`` (columns: this rank's Q heads), the V rows and
O columns are replaced by `oscar_kv.ref.fold_v_hadamard`'s. The cache then stores V already
rotated and the attention output needs no un-rotation (``OscarConfig(fold_v=True)``).

All or nothing: if any attention layer cannot be folded (weights quantized to a non-float
dtype, an unknown module layout, biases we cannot see), no layer is changed and the pool
rotates V online instead (``fold_v=False``); the reason is logged. `fold_enabled` reports
the decision to the pool, which SGLang builds after loading the model. TP: each rank folds
its own slice (per-head rotation needs no other rank's rows).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from oscar_kv.ref import fold_v_hadamard

logger = logging.getLogger("oscar_kv.sglang")

_FOLDED = False


def fold_enabled() -> bool:
    return _FOLDED


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "qkv_proj") and hasattr(m, "o_proj")]


def _heads(attn: Any) -> tuple[int, int, int]:
    hq = getattr(attn, "num_heads", None)
    hk = getattr(attn, "num_kv_heads", None)
    d = getattr(attn, "head_dim", None)
    if None in (hq, hk, d):
        raise ValueError(f"{type(attn).__name__} lacks num_heads/num_kv_heads/head_dim")
    return int(hq), int(hk), int(d)


def _why_not(attn: Any) -> str | None:
    for name in ("qkv_proj", "o_proj"):
        w = getattr(getattr(attn, name), "weight", None)
        if not isinstance(w, torch.Tensor):
            return f"{name} has no weight tensor"
        if not w.dtype.is_floating_point or w.element_size() < 2:
            return f"{name}.weight is {w.dtype} (quantized)"
        if w.dim() != 2:
            return f"{name}.weight is not 2-D"
    try:
        hq, hk, d = _heads(attn)
    except ValueError as e:
        return str(e)
    qkv = attn.qkv_proj.weight
    if qkv.shape[0] != (hq + 2 * hk) * d or attn.o_proj.weight.shape[1] != hq * d:
        return "qkv_proj/o_proj shapes do not match the heads"
    return None


def fold_v_into_model(model: torch.nn.Module) -> bool:
    """Folds every attention layer of ``model``; returns whether it did (see module doc)."""
    global _FOLDED
    layers = _attention_modules(model)
    if not layers:
        logger.warning("oscar-kv: no qkv_proj/o_proj attention layers found; V rotated online")
        _FOLDED = False
        return False
    for attn in layers:
        reason = _why_not(attn)
        if reason:
            logger.warning("oscar-kv: V fold skipped (%s); V rotated online instead", reason)
            _FOLDED = False
            return False
    with torch.no_grad():
        for attn in layers:
            hq, hk, d = _heads(attn)
            qkv, o = attn.qkv_proj.weight, attn.o_proj.weight
            v_rows = slice((hq + hk) * d, (hq + 2 * hk) * d)
            bias = getattr(attn.qkv_proj, "bias", None)
            acc = torch.promote_types(qkv.dtype, torch.float32)  # fold in >= fp32
            b_v = bias[v_rows].to(acc) if isinstance(bias, torch.Tensor) else None
            w_v, w_o, b_v2 = fold_v_hadamard(qkv[v_rows].to(acc), o.to(acc), hk, hq, b_v)
            qkv[v_rows] = w_v.to(qkv.dtype)
            o.copy_(w_o.to(o.dtype))
            if b_v2 is not None:
                bias[v_rows] = b_v2.to(bias.dtype)
    logger.info("oscar-kv: V Hadamard folded into W_V/W_O of %d attention layers", len(layers))
    _FOLDED = True
    return True


def reset() -> None:
    """Forget the fold decision (tests)."""
    global _FOLDED
    _FOLDED = False
