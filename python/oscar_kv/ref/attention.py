"""Reference attention over a quantized KV cache, computed the way the kernels compute it.

Logits over packed pages are taken in the rotated, unit-scaled basis and descaled in fp32:
``logit = (H q) . k_unit_hat * norm * scale``; the tail is exact. Values are summed in the
stored basis and the output is un-rotated when V was rotated online.
"""

from __future__ import annotations

import math

import torch

from oscar_kv.ref.hadamard import fwht
from oscar_kv.ref.quant import FLOAT_DTYPES, QuantizedKV, dequantize_pages, page_norms


def check_query(q: torch.Tensor, qkv: QuantizedKV, causal: bool) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be [q_tokens, q_heads, head_dim], got {shape}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must have a floating dtype, got {q.dtype}")
    if q.shape[2] != qkv.head_dim:
        raise ValueError(f"q head_dim ({q.shape[2]}) must equal the cache's ({qkv.head_dim})")
    if q.shape[1] < 1 or q.shape[1] % qkv.kv_heads:
        raise ValueError(
            f"q_heads ({q.shape[1]}) must be a positive multiple of kv_heads ({qkv.kv_heads})"
        )
    if causal and q.shape[0] > qkv.num_tokens:
        raise ValueError(
            f"causal q_tokens ({q.shape[0]}) cannot exceed the cached tokens ({qkv.num_tokens})"
        )
    if not torch.isfinite(q).all():
        raise ValueError("q contains NaN or inf")


def attention(
    q: torch.Tensor, qkv: QuantizedKV, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of q [q_tokens, q_heads, D] over the cache; returns fp32, q's shape.

    Query head j reads KV head j // (q_heads / kv_heads). When causal, the q tokens are the
    last q_tokens positions of the cached sequence.
    """
    check_query(q, qkv, causal)
    cfg = qkv.config
    q_tokens, q_heads, dim = q.shape
    group = q_heads // qkv.kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    qf = q.to(torch.float32)

    k_pages, v_pages = dequantize_pages(qkv)  # [Tp, H, D], quantized basis
    n = page_norms(qkv)
    q_rot = fwht(qf) if cfg.rotation == "hadamard" else qf

    def per_kv_head(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [H*group, T, D]
        return x.transpose(0, 1).repeat_interleave(group, dim=0)

    logits_pages = torch.matmul(q_rot.transpose(0, 1), per_kv_head(k_pages).transpose(1, 2))
    if n is not None:
        # [Tp, 1 or H, 1] -> [q_heads or 1, 1, Tp]
        logits_pages = logits_pages * per_kv_head(n.expand(-1, qkv.kv_heads, 1)).transpose(1, 2)
    logits_tail = torch.matmul(qf.transpose(0, 1), per_kv_head(qkv.k_tail.float()).transpose(1, 2))
    logits = torch.cat((logits_pages, logits_tail), dim=2) * scale  # [q_heads, q_tokens, T]

    total = qkv.num_tokens
    if causal:
        pos_q = torch.arange(total - q_tokens, total)[:, None]
        visible = torch.arange(total)[None, :] <= pos_q
        logits = logits.masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    tp = k_pages.shape[0]
    out_pages = torch.matmul(p[:, :, :tp], per_kv_head(v_pages))
    if cfg.rotates_v_online:
        out_pages = fwht(out_pages)
    out = out_pages + torch.matmul(p[:, :, tp:], per_kv_head(qkv.v_tail.float()))
    return out.transpose(0, 1).contiguous()
