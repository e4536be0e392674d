"""Reference quantizer of the KV cache and the packed page layout every kernel must reproduce.

Procedure (all arithmetic in fp32, on post-RoPE K and V of one layer, [tokens, H, D])
------------------------------------------------------------------------------------
Only whole pages of 128 tokens are quantized; the last ``tokens % 128`` tokens stay exact in
their input dtype (the tail). For each page:

1. Rotation. ``rotation="hadamard"``: K <- fwht(K) (normalized Sylvester H_D / sqrt(D)); V is
   rotated the same way unless ``fold_v`` (V already rotated by folded weights).
2. Norm. ``norm="token"``: n[t] = sqrt(sum over heads and channels of K[t]^2) (fp32, one per
   token); ``"head"``: n[t, h] = ||K[t, h]||; ``"none"``: no norm. The fp32 summation order
   is pinned (see `token_norms`) so kernels can match the bytes exactly. K <- K / n, with K <- 0 where
   n == 0 (the norm is stored, so an all-zero token dequantizes to zero).
3. K: per (head, channel) over groups of ``k_group`` consecutive tokens; V: per (token, head)
   over groups of ``v_group`` consecutive channels. For a group x with min m and max M:
       zero  = fp16(m)
       scale = fp16((M - float(zero)) / (2^bits - 1))
       code  = clamp(round_half_to_even((x - float(zero)) / float(scale)), 0, 2^bits - 1)
   with code = 0 where scale == 0. Dequantized: code * float(scale) + float(zero)
   (then times the norm, then H again to undo the rotation).

Packed page layout (one page = 128 tokens of one layer, all KV heads; little-endian)
-------------------------------------------------------------------------------------
Sections, contiguous and in this order (byte offsets from ``oscar_kv._native.page_sections``):

    k_codes  uint8 [H, 128, D * bits / 8]   codes of token t, head h, channel c
    v_codes  uint8 [H, 128, D * bits / 8]
    k_scale  fp16  [H, 128 / k_group, D]     per (head, token group, channel)
    k_zero   fp16  [H, 128 / k_group, D]
    v_scale  fp16  [H, 128, D / v_group]     per (head, token, channel group)
    v_zero   fp16  [H, 128, D / v_group]
    norms    fp32  [128] ("token"), [H, 128] ("head"), absent ("none")

Bit order: channel c of a (head, token) row lives in byte ``c * bits // 8`` at bit offset
``(c * bits) % 8``, lowest bits first (2-bit: channel 4j+i in bits 2i..2i+1 of byte j).
Bytes per token per layer = 2*H*D*bits/8 + 4*H*D/k_group + 4*H*D/v_group + norm bytes/128
(H=8, D=128, 2 bits, groups 32: 772 B vs 4096 B in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.ref.hadamard import check_head_dim, fwht

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class QuantizedKV:
    """One layer's quantized K/V: ``num_pages`` packed pages and an exact tail.

    Tensors carry a leading page dimension P in front of the per-page shapes of the layout.
    """

    config: OscarConfig
    kv_heads: int
    head_dim: int
    k_codes: torch.Tensor  # uint8 [P, H, 128, D*bits/8]
    v_codes: torch.Tensor  # uint8 [P, H, 128, D*bits/8]
    k_scale: torch.Tensor  # fp16 [P, H, 128/k_group, D]
    k_zero: torch.Tensor  # fp16 [P, H, 128/k_group, D]
    v_scale: torch.Tensor  # fp16 [P, H, 128, D/v_group]
    v_zero: torch.Tensor  # fp16 [P, H, 128, D/v_group]
    norms: torch.Tensor | None  # fp32 [P, 128] or [P, H, 128]; None for norm="none"
    k_tail: torch.Tensor  # [tokens % 128, H, D], input dtype, exact
    v_tail: torch.Tensor

    @property
    def num_pages(self) -> int:
        return self.k_codes.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.num_pages * BLOCK_TOKENS + self.k_tail.shape[0]

    @property
    def page_nbytes(self) -> int:
        """Bytes of one packed page (equals ``oscar_kv._native.page_bytes`` for this config)."""
        return sum(t[0].numel() * t.element_size() for t in self._page_sections() if t is not None)

    @property
    def nbytes(self) -> int:
        """Every byte held: packed pages plus the tail at its own dtype's size."""
        tail = sum(t.numel() * t.element_size() for t in (self.k_tail, self.v_tail))
        return self.num_pages * self.page_nbytes + tail

    def _page_sections(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.k_codes,
            self.v_codes,
            self.k_scale,
            self.k_zero,
            self.v_scale,
            self.v_zero,
            self.norms,
        )

    def packed_pages(self) -> torch.Tensor:
        """The pages as raw bytes in the documented layout: uint8 [P, page_nbytes]."""
        parts = [
            t.contiguous().view(torch.uint8).reshape(self.num_pages, -1)
            for t in self._page_sections()
            if t is not None
        ]
        return torch.cat(parts, dim=1)

    @staticmethod
    def cat(parts: list[QuantizedKV]) -> QuantizedKV:
        """Concatenate page-aligned pieces (all but the last must have an empty tail)."""
        if not parts:
            raise ValueError("parts must not be empty")
        first = parts[0]
        for p in parts:
            if (p.config, p.kv_heads, p.head_dim) != (first.config, first.kv_heads, first.head_dim):
                raise ValueError("parts must share config, kv_heads and head_dim")
        for p in parts[:-1]:
            if p.k_tail.shape[0]:
                raise ValueError("only the last part may have a tail (parts must be page-aligned)")

        def cat_field(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors, dim=0)

        return QuantizedKV(
            config=first.config,
            kv_heads=first.kv_heads,
            head_dim=first.head_dim,
            k_codes=cat_field("k_codes"),
            v_codes=cat_field("v_codes"),
            k_scale=cat_field("k_scale"),
            k_zero=cat_field("k_zero"),
            v_scale=cat_field("v_scale"),
            v_zero=cat_field("v_zero"),
            norms=cat_field("norms"),
            k_tail=parts[-1].k_tail,
            v_tail=parts[-1].v_tail,
        )


def check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004 (API contract: ValueError)
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be [tokens, kv_heads, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    if k.shape[1] < 1:
        raise ValueError("k must have at least one kv head")
    check_head_dim(k.shape[2])
    for name, t in (("k", k), ("v", v)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., D] into uint8 [..., D * bits / 8], lowest bits first."""
    per_byte = 8 // bits
    c = codes.to(torch.uint8).view(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = torch.zeros(c.shape[:-1], dtype=torch.uint8)
    for i in range(per_byte):
        packed |= c[..., i] << (bits * i)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., B] -> uint8 codes [..., B * 8 / bits]."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def quantize_groups(
    x: torch.Tensor, dim: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of fp32 ``x`` reduced over ``dim``.

    Returns (codes uint8 like x, scale fp16, zero fp16) with scale/zero keeping ``dim`` as 1.
    """
    qmax = (1 << bits) - 1
    zero = x.amin(dim=dim, keepdim=True).to(torch.float16)
    zero_f = zero.float()
    scale = ((x.amax(dim=dim, keepdim=True) - zero_f) / qmax).to(torch.float16)
    scale_f = scale.float()
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    codes = torch.round((x - zero_f) / safe).clamp_(0, qmax)
    codes = torch.where(scale_f > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8), scale, zero


def token_norms(k_rot: torch.Tensor, norm: str) -> torch.Tensor | None:
    """Norms of [..., H, D] fp32 keys: [...] ("token"), [..., H] ("head") or None ("none").

    The summation order is part of the layout contract, since fp32 sums have no single
    answer and torch's CPU reduction order depends on the CPU's vector width: per (token,
    head) the squares are summed by a halves tree (x[:L/2] + x[L/2:] until one element is
    left: a warp xor-reduction on GPU), "token" then adds the heads left to right, and the
    sqrt is the correctly rounded fp32 one (fp64 sqrt rounded to fp32: torch 2.13's fp32 CPU
    sqrt is ~1 ulp off on ~17% of inputs).
    """
    if norm == "none":
        return None
    s = k_rot.square()
    while s.shape[-1] > 1:
        half = s.shape[-1] // 2
        s = s[..., :half] + s[..., half:]
    s = s[..., 0]
    if norm == "token":
        total = s[..., 0]
        for h in range(1, s.shape[-1]):
            total = total + s[..., h]
        s = total
    return s.double().sqrt().float()


def quantize_kv(k: torch.Tensor, v: torch.Tensor, config: OscarConfig) -> QuantizedKV:
    """Quantize one layer's post-RoPE K and V ([tokens, kv_heads, head_dim]) into pages."""
    if not isinstance(config, OscarConfig):
        raise ValueError(f"config must be an OscarConfig, got {type(config).__name__}")  # noqa: TRY004
    config.require_uniform_pages("quantize_kv")
    check_kv(k, v)
    tokens, heads, dim = k.shape
    if dim % config.v_group:
        raise ValueError(f"v_group ({config.v_group}) must divide head_dim ({dim})")
    bits = config.bits
    pages = tokens // BLOCK_TOKENS
    full = pages * BLOCK_TOKENS

    kp = k[:full].to(torch.float32).reshape(pages, BLOCK_TOKENS, heads, dim)
    vp = v[:full].to(torch.float32).reshape(pages, BLOCK_TOKENS, heads, dim)
    if config.rotation == "hadamard":
        kp = fwht(kp)
    if config.rotates_v_online:
        vp = fwht(vp)

    norms = token_norms(kp, config.norm)
    if norms is not None:
        n = norms[..., None, None] if config.norm == "token" else norms[..., None]
        kp = torch.where(
            n > 0, kp / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(kp)
        )
        # Stored head-major within a page: [P, H, 128] for "head".
        norms = norms if config.norm == "token" else norms.transpose(1, 2).contiguous()

    groups = BLOCK_TOKENS // config.k_group
    kg = kp.reshape(pages, groups, config.k_group, heads, dim)
    k_codes, k_scale, k_zero = quantize_groups(kg, dim=2, bits=bits)
    k_codes = k_codes.reshape(pages, BLOCK_TOKENS, heads, dim).transpose(1, 2)
    k_scale = k_scale.squeeze(2).transpose(1, 2).contiguous()  # [P, H, groups, D]
    k_zero = k_zero.squeeze(2).transpose(1, 2).contiguous()

    vg = vp.reshape(pages, BLOCK_TOKENS, heads, dim // config.v_group, config.v_group)
    v_codes, v_scale, v_zero = quantize_groups(vg, dim=4, bits=bits)
    v_codes = v_codes.reshape(pages, BLOCK_TOKENS, heads, dim).transpose(1, 2)
    v_scale = v_scale.squeeze(4).transpose(1, 2).contiguous()  # [P, H, 128, D/v_group]
    v_zero = v_zero.squeeze(4).transpose(1, 2).contiguous()

    return QuantizedKV(
        config=config,
        kv_heads=heads,
        head_dim=dim,
        k_codes=pack_codes(k_codes.contiguous(), bits),
        v_codes=pack_codes(v_codes.contiguous(), bits),
        k_scale=k_scale,
        k_zero=k_zero,
        v_scale=v_scale,
        v_zero=v_zero,
        norms=norms,
        k_tail=k[full:].clone(),
        v_tail=v[full:].clone(),
    )


def dequantize_pages(qkv: QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages in the quantized basis: unit-scaled rotated K and stored V, fp32 [P*128, H, D].

    This is what an attention kernel sees after unpacking; `dequantize_kv` then applies the
    norms and undoes the rotations.
    """
    cfg, pages, heads, dim = qkv.config, qkv.num_pages, qkv.kv_heads, qkv.head_dim
    groups = BLOCK_TOKENS // cfg.k_group
    kc = unpack_codes(qkv.k_codes, cfg.bits).float().view(pages, heads, groups, cfg.k_group, dim)
    k = kc * qkv.k_scale.float()[:, :, :, None, :] + qkv.k_zero.float()[:, :, :, None, :]
    k = k.view(pages, heads, BLOCK_TOKENS, dim).transpose(1, 2)
    n_vg = dim // cfg.v_group
    vc = (
        unpack_codes(qkv.v_codes, cfg.bits)
        .float()
        .view(pages, heads, BLOCK_TOKENS, n_vg, cfg.v_group)
    )
    v = vc * qkv.v_scale.float()[..., None] + qkv.v_zero.float()[..., None]
    v = v.view(pages, heads, BLOCK_TOKENS, dim).transpose(1, 2)
    return k.reshape(-1, heads, dim), v.reshape(-1, heads, dim)


def page_norms(qkv: QuantizedKV) -> torch.Tensor | None:
    """Norms broadcastable against [P*128, H, D] keys, or None."""
    if qkv.norms is None:
        return None
    if qkv.config.norm == "token":
        return qkv.norms.reshape(-1, 1, 1)
    return qkv.norms.transpose(1, 2).reshape(-1, qkv.kv_heads, 1)


def dequantize_kv(qkv: QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize to fp32 [tokens, kv_heads, head_dim] in the inputs' basis (tail exact)."""
    k, v = dequantize_pages(qkv)
    n = page_norms(qkv)
    if n is not None:
        k = k * n
    if qkv.config.rotation == "hadamard":
        k = fwht(k)
    if qkv.config.rotates_v_online:
        v = fwht(v)
    k = torch.cat((k, qkv.k_tail.float()), dim=0)
    v = torch.cat((v, qkv.v_tail.float()), dim=0)
    return k, v
