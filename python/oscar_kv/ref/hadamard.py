"""Fast Walsh-Hadamard transform and the Hadamard fold of V into W_V / W_O.

The rotation is the normalized Sylvester-ordered Hadamard matrix H_D / sqrt(D):
H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]. It is symmetric and orthogonal, so the
normalized transform is its own inverse: ``fwht(fwht(x)) == x``.
"""

from __future__ import annotations

import math

import torch


def check_head_dim(head_dim: int, name: str = "head_dim") -> None:
    if head_dim < 1 or head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"{name} must be a power of two in 16..256, got {head_dim}")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform over the last dimension, in O(D log D).

    Computes ``x @ H_D / sqrt(D)`` in fp32 (fp64 inputs stay fp64, for exact weight folds).
    """
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"the last dimension must be a power of two, got {d}")
    lead = x.shape[:-1]
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, d)
    h = 1
    while h < d:
        # Butterfly on bit `h` of the index: pairs (i, i + h) inside blocks of 2h.
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, d)
        h *= 2
    return (y * (1.0 / math.sqrt(d))).view(*lead, d)


def hadamard_matrix(d: int) -> torch.Tensor:
    """Dense normalized Sylvester Hadamard matrix (for tests and small folds only)."""
    return fwht(torch.eye(d))


def fold_v_hadamard(
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    num_kv_heads: int,
    num_q_heads: int,
    b_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fold H into a layer's V projection and output projection.

    ``w_v`` is an nn.Linear weight [num_kv_heads * D, hidden] (output rows per KV head),
    ``w_o`` is [hidden, num_q_heads * D] (input columns per query head), ``b_v`` the V bias.
    Returns (w_v', w_o', b_v') with w_v'[h] = H w_v[h], b_v'[h] = H b_v[h] and
    w_o'[:, j] = w_o[:, j] H, so the layer's output is unchanged while the V the cache sees
    is rotated (attention mixes tokens, not channels, so H passes through it).
    """
    if w_v.dim() != 2 or w_o.dim() != 2:
        raise ValueError(f"w_v and w_o must be 2-D, got {tuple(w_v.shape)} and {tuple(w_o.shape)}")
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads})"
        )
    if w_v.shape[0] % num_kv_heads:
        raise ValueError(
            f"w_v rows ({w_v.shape[0]}) not divisible by num_kv_heads ({num_kv_heads})"
        )
    d = w_v.shape[0] // num_kv_heads
    check_head_dim(d)
    if w_o.shape[1] != num_q_heads * d:
        raise ValueError(
            f"w_o must have num_q_heads * head_dim = {num_q_heads * d} columns, got {w_o.shape[1]}"
        )
    hidden = w_v.shape[1]
    # H is symmetric, so H @ W per head equals fwht applied to W's columns.
    w_v_rot = fwht(w_v.view(num_kv_heads, d, hidden).transpose(1, 2)).transpose(1, 2)
    w_o_rot = fwht(w_o.view(-1, num_q_heads, d))
    b_v_rot = None
    if b_v is not None:
        if b_v.shape != (num_kv_heads * d,):
            raise ValueError(f"b_v must have shape ({num_kv_heads * d},), got {tuple(b_v.shape)}")
        b_v_rot = fwht(b_v.view(num_kv_heads, d)).reshape(-1).to(b_v.dtype)
    return (
        w_v_rot.reshape(w_v.shape).to(w_v.dtype),
        w_o_rot.reshape(w_o.shape).to(w_o.dtype),
        b_v_rot,
    )
