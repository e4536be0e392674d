"""Public entry points of the oscar-kv kernels; each dispatches CUDA > Triton > torch > ref.

Paged pool (what the SGLang pool allocates, one per layer)
-----------------------------------------------------------
``pool``: uint8 tensor [num_pages, page_bytes] (row stride may exceed page_bytes, e.g. a
view of one layer of a [layers, num_pages, page_bytes] allocation; rows themselves must be
contiguous). Row ``p`` holds page ``p`` byte for byte in the reference layout
(`oscar_kv.ref.quant`), i.e. exactly a row of ``QuantizedKV.packed_pages()``; section offsets
come from `PageLayout` (= ``oscar_kv._native.page_sections``). Every section size is a
multiple of 16 bytes, so the fp16/fp32 sections of every row are aligned.

Per request the cache is: ``num_pages[b]`` full pages listed in ``page_table[b, :]`` (int32
page ids, oldest first), then ``tail_len[b]`` (0..127) exact tokens in the bf16 tail buffer
``k_tail/v_tail [slots, 128, H_kv, D]`` at slot ``tail_index[b]`` (default ``b``). A decode
query is the last token of its request: its own K/V must already be in the tail (or be the
last token of the last page). Tensors of one call live on one device.

Dispatch: ``backend=None`` reads ``OSCAR_KV_BACKEND`` (cuda, triton, cpu, torch, ref), else
picks CUDA for CUDA tensors when the extension builds, then Triton; for CPU tensors "cpu":
the C++ kernels of `oscar_kv.cpu_kernels` (fused decode; the other ops of that backend are
the torch ones) when they build, else "torch": `oscar_kv.torchops`, plain torch vectorized
over the whole batch. "ref" drives the reference
(`oscar_kv.ref`) one request and one page at a time: the slow, obviously-right path that the
other backends are tested against. "torch" also runs on CUDA tensors when asked for by name.
``backend="triton"`` on CPU tensors runs Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from oscar_kv import _native
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.ref import attention as ref_attention
from oscar_kv.ref import fwht as ref_fwht
from oscar_kv.ref import quantize_kv
from oscar_kv.ref.hadamard import check_head_dim
from oscar_kv.ref.quant import QuantizedKV, dequantize_kv

BACKENDS = ("cuda", "triton", "cpu", "torch", "ref")
_SECTION_DTYPES = {
    "k_codes": torch.uint8,
    "v_codes": torch.uint8,
    "k_scale": torch.float16,
    "k_zero": torch.float16,
    "v_scale": torch.float16,
    "v_zero": torch.float16,
    "norms": torch.float32,
}


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of one packed page for (config, kv_heads, head_dim)."""

    config: OscarConfig
    kv_heads: int
    head_dim: int
    page_bytes: int
    offsets: dict[str, int]
    nbytes: dict[str, int]

    @staticmethod
    @functools.cache
    def of(config: OscarConfig, kv_heads: int, head_dim: int) -> PageLayout:
        if not isinstance(config, OscarConfig):
            raise ValueError(f"config must be an OscarConfig, got {type(config).__name__}")  # noqa: TRY004
        config.require_uniform_pages("the paged pool")
        check_head_dim(head_dim)
        if kv_heads < 1:
            raise ValueError(f"kv_heads must be >= 1, got {kv_heads}")
        if head_dim % config.v_group:
            raise ValueError(f"v_group ({config.v_group}) must divide head_dim ({head_dim})")
        args = (kv_heads, head_dim, config.bits, config.k_group, config.v_group, config.norm)
        secs = _native.page_sections(*args)
        return PageLayout(
            config=config,
            kv_heads=kv_heads,
            head_dim=head_dim,
            page_bytes=_native.page_bytes(*args),
            offsets={name: off for name, off, _ in secs},
            nbytes={name: n for name, _, n in secs},
        )

    def section_shape(self, name: str) -> tuple[int, ...]:
        h, d, cfg = self.kv_heads, self.head_dim, self.config
        return {
            "k_codes": (h, BLOCK_TOKENS, d * cfg.bits // 8),
            "v_codes": (h, BLOCK_TOKENS, d * cfg.bits // 8),
            "k_scale": (h, BLOCK_TOKENS // cfg.k_group, d),
            "k_zero": (h, BLOCK_TOKENS // cfg.k_group, d),
            "v_scale": (h, BLOCK_TOKENS, d // cfg.v_group),
            "v_zero": (h, BLOCK_TOKENS, d // cfg.v_group),
            "norms": (BLOCK_TOKENS,) if cfg.norm == "token" else (h, BLOCK_TOKENS),
        }[name]

    def alloc_pool(self, num_pages: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zeroed pool of ``num_pages`` pages: uint8 [num_pages, page_bytes]."""
        return torch.zeros((num_pages, self.page_bytes), dtype=torch.uint8, device=device)

    def pages_to_qkv(
        self,
        pool: torch.Tensor,
        page_ids: torch.Tensor,
        k_tail: torch.Tensor | None = None,
        v_tail: torch.Tensor | None = None,
    ) -> QuantizedKV:
        """The pages ``pool[page_ids]`` (and an optional tail) as a reference QuantizedKV."""
        rows = pool[page_ids.long()].cpu()
        n = rows.shape[0]
        fields: dict[str, torch.Tensor | None] = {}
        for name, dtype in _SECTION_DTYPES.items():
            size = self.nbytes[name]
            if size == 0:
                fields[name] = None
                continue
            off = self.offsets[name]
            raw = rows[:, off : off + size].contiguous()
            fields[name] = raw.view(dtype).reshape(n, *self.section_shape(name))
        empty = torch.zeros((0, self.kv_heads, self.head_dim), dtype=torch.bfloat16)
        return QuantizedKV(
            config=self.config,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            k_tail=empty if k_tail is None else k_tail.cpu(),
            v_tail=empty if v_tail is None else v_tail.cpu(),
            **fields,  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------- dispatch


@functools.cache
def _cuda_ops() -> object | None:
    """The CUDA ops, built and checked against the reference once per process; None (and one
    warning saying why) when they cannot be built or disagree: the ops then use Triton.
    ``OSCAR_KV_CUDA_SELFCHECK=0`` skips the check."""
    if not torch.cuda.is_available():
        return None
    try:
        from oscar_kv.cuda import jit, selfcheck

        cuda = jit.load()
        problem = None
        if os.environ.get("OSCAR_KV_CUDA_SELFCHECK", "1") != "0":
            found = selfcheck.disagreement(cuda, torch.device("cuda"))
            problem = found and f"disagree with the reference: {found}"
    except Exception as e:  # noqa: BLE001 (any build failure means: fall back to Triton)
        problem = f"unavailable: {type(e).__name__}: {e}"
    if problem is None:
        return cuda
    warnings.warn(f"oscar_kv CUDA ops {problem}; using Triton", RuntimeWarning, stacklevel=3)
    return None


def _cpu_ops() -> object | None:
    from oscar_kv import cpu_kernels

    return cpu_kernels.ops_or_none()


def _triton():
    import oscar_kv.triton as tri

    return tri


def _torchops() -> ModuleType:
    # Imported late: torchops builds on PageLayout from this module.
    import oscar_kv.torchops as tops

    return tops


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call with tensors on ``device`` runs on."""
    choice = backend or os.environ.get("OSCAR_KV_BACKEND") or None
    if choice is not None:
        if choice not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
        if choice == "cuda" and (device.type != "cuda" or _cuda_ops() is None):
            raise ValueError("backend 'cuda' needs CUDA tensors and a built oscar_kv CUDA ext")
        if choice == "triton" and device.type != "cuda" and not _triton().INTERPRETED:
            raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        if choice == "cpu" and (device.type != "cpu" or _cpu_ops() is None):
            raise ValueError("backend 'cpu' needs CPU tensors and the built oscar_kv CPU kernels")
        return choice
    if device.type == "cuda":
        return "cuda" if _cuda_ops() is not None else "triton"
    return "cpu" if _cpu_ops() is not None else "torch"


def _torch_for_cpu(which: str) -> str:
    """Ops without a C++ CPU kernel run the batched torch ops under backend "cpu"."""
    return "torch" if which == "cpu" else which


def _check_layout_tensors(pool: torch.Tensor, layout: PageLayout) -> None:
    if pool.dtype != torch.uint8 or pool.dim() != 2 or pool.shape[1] != layout.page_bytes:
        raise ValueError(
            f"pool must be uint8 [num_pages, {layout.page_bytes}], got {pool.dtype} "
            f"{tuple(pool.shape)}"
        )
    if pool.stride(1) != 1 or pool.stride(0) % 16:
        raise ValueError("pool rows must be contiguous with a row stride that is a multiple of 16")


def _as_index(t: torch.Tensor | None, n: int, device: torch.device, name: str) -> torch.Tensor:
    if t is None:
        return torch.arange(n, dtype=torch.int32, device=device)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    return t.to(device=device, dtype=torch.int32).contiguous()


# ---------------------------------------------------------------------------- ops


def quantize_page(
    k: torch.Tensor,
    v: torch.Tensor,
    pool: torch.Tensor,
    page_ids: torch.Tensor,
    config: OscarConfig,
    *,
    src_index: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Quantize completed 128-token blocks of K and V into pool rows ``page_ids``.

    ``k``, ``v``: [n_src, 128, H_kv, D] (or [128, H_kv, D]), any float dtype, post-RoPE, in
    the model's basis; block ``src_index[i]`` (default ``i``) is written to page
    ``page_ids[i]``, so a tail buffer [slots, 128, H, D] can be passed whole with the slots
    whose tails completed. The kernels' pages are byte-identical to
    ``quantize_kv(...).packed_pages()`` (the
    reference's own torch norm may differ from it in the last bit; see there).
    """
    if k.dim() == 3:
        k, v = k.unsqueeze(0), v.unsqueeze(0)
    if k.dim() != 4 or k.shape[1] != BLOCK_TOKENS:
        raise ValueError(f"k must be [n, {BLOCK_TOKENS}, kv_heads, head_dim], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must match k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    layout = PageLayout.of(config, k.shape[2], k.shape[3])
    _check_layout_tensors(pool, layout)
    if page_ids.dim() != 1:
        raise ValueError(f"page_ids must be 1-D, got shape {tuple(page_ids.shape)}")
    n = page_ids.shape[0]
    src = _as_index(src_index, n, k.device, "src_index")
    if src_index is None and n != k.shape[0]:
        raise ValueError(f"page_ids has {n} entries but k holds {k.shape[0]} blocks")
    pid = page_ids.to(device=pool.device, dtype=torch.int32).contiguous()
    which = _torch_for_cpu(resolve_backend(backend, k.device))
    if which == "cuda":
        _cuda_ops().quantize_pages(k, v, src, pid, pool, *_native_layout_args(layout))  # type: ignore[attr-defined]
    elif which == "triton":
        if k.stride(3) != 1 or v.stride(3) != 1:
            k, v = k.contiguous(), v.contiguous()
        _triton().quantize_pages(k, v, pool, pid, layout, src)
    elif which == "torch":
        _torchops().quantize_pages(k, v, pool, pid, layout, src)
    else:
        for i in range(n):
            s = int(src[i])
            q = quantize_kv(k[s].cpu(), v[s].cpu(), config)
            pool[int(pid[i])] = q.packed_pages()[0].to(pool.device)


def rotate_q(q: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Normalized Hadamard H_D / sqrt(D) of the last dim, fp32 out (bit-equal to the ref)."""
    check_head_dim(q.shape[-1], "q head_dim")
    which = resolve_backend(backend, q.device)
    if which == "cuda":
        return _cuda_ops().rotate_q(q)  # type: ignore[attr-defined]
    if which == "triton":
        return _triton().fwht(q, torch.float32)
    return ref_fwht(q.float())


def _check_decode_args(
    q: torch.Tensor,
    layout: PageLayout,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    tail_len: torch.Tensor,
    batch: int,
) -> None:
    hq, d = q.shape[-2:]
    if d != layout.head_dim or hq % layout.kv_heads:
        raise ValueError(
            f"q heads/dim ({hq}, {d}) must be a multiple of kv_heads ({layout.kv_heads}) "
            f"and head_dim {layout.head_dim}"
        )
    if page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be [{batch}, max_pages], got {tuple(page_table.shape)}")
    for name, t in (("num_pages", num_pages), ("tail_len", tail_len)):
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"{name} must be 1-D of length {batch}, got {tuple(t.shape)}")
    want = (BLOCK_TOKENS, layout.kv_heads, layout.head_dim)
    for name, t in (("k_tail", k_tail), ("v_tail", v_tail)):
        if t.dim() != 4 or tuple(t.shape[1:]) != want:
            raise ValueError(
                f"{name} must be [slots, {', '.join(map(str, want))}], got {tuple(t.shape)}"
            )


def decode_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    tail_len: torch.Tensor,
    config: OscarConfig,
    *,
    tail_index: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One decode query per request over its pages and tail: q [B, Hq, D] -> [B, Hq, D].

    Equals ``oscar_kv.ref.attention(q[b:b+1], qkv_b)`` for each request (qkv_b: its pages
    plus its tail). Output in q's dtype. GQA: query head j reads KV head j // (Hq / H_kv).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
    batch = q.shape[0]
    layout = PageLayout.of(config, k_tail.shape[2], q.shape[2])
    _check_layout_tensors(pool, layout)
    _check_decode_args(q, layout, page_table, num_pages, k_tail, v_tail, tail_len, batch)
    tidx = _as_index(tail_index, batch, q.device, "tail_index")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    which = resolve_backend(backend, q.device)
    if which == "ref":
        return _ref_decode(
            q, pool, layout, page_table, num_pages, k_tail, v_tail, tidx, tail_len, scale
        )
    if which == "torch":
        return _torchops().decode_attention(
            q, pool, layout, page_table, num_pages, k_tail, v_tail, tidx, tail_len, scale
        )
    pt = page_table.to(torch.int32)
    if pt.stride(1) != 1:
        pt = pt.contiguous()
    np_ = num_pages.to(torch.int32).contiguous()
    tl_ = tail_len.to(torch.int32).contiguous()
    qc = q if q.stride(2) == 1 else q.contiguous()
    if which == "cpu":
        # fp32 q (a small copy at most) whatever the tails' dtype: no rounding of q.
        out = _cpu_ops().decode_attention(  # type: ignore[attr-defined]
            qc.float(), pool, pt, np_, k_tail, v_tail, tidx, tl_, scale,
            *_native_layout_args(layout),
        )  # fmt: skip
        return out.to(q.dtype)
    if which == "cuda":
        # The CUDA kernels take q in the tails' dtype (one template parameter for both).
        out = _cuda_ops().decode_attention(  # type: ignore[attr-defined]
            qc.to(k_tail.dtype), pool, pt, np_, k_tail, v_tail, tidx, tl_, scale,
            num_splits or 0, *_native_layout_args(layout),
        )  # fmt: skip
        return out.to(q.dtype)
    return _triton().decode_attention(
        qc, pool, layout, pt, np_, k_tail, v_tail, tidx, tl_, scale, num_splits
    )


def _ref_decode(
    q: torch.Tensor,
    pool: torch.Tensor,
    layout: PageLayout,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    tidx: torch.Tensor,
    tail_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for b in range(q.shape[0]):
        npg, nt, slot = int(num_pages[b]), int(tail_len[b]), int(tidx[b])
        qkv = layout.pages_to_qkv(pool, page_table[b, :npg], k_tail[slot, :nt], v_tail[slot, :nt])
        out[b] = ref_attention(q[b : b + 1].cpu(), qkv, causal=True, scale=scale)[0]
    return out.to(device=q.device, dtype=q.dtype)


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    tail_len: torch.Tensor,
    config: OscarConfig,
    *,
    tail_index: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """New tokens attend causally to their request's pages, tail, and themselves.

    ``q`` [N, Hq, D], ``k_new``/``v_new`` [N, H_kv, D]: the new tokens of all requests,
    request b owning rows cu_seqlens[b]:cu_seqlens[b+1]; they follow the request's
    num_pages[b] * 128 + tail_len[b] cached tokens and are NOT in the tail yet. Equals
    ``oscar_kv.ref.attention(q_b, qkv_b)`` where qkv_b's tail is (tail ++ new tokens).

    cuda and triton: one fused Triton kernel (`oscar_kv.triton.extend`) that dequantizes pages
    in registers; csrc has no extend kernel, so the CUDA backend falls through to it. The
    alternative, dequantizing the prefix into an fp32 workspace and calling SDPA
    (`_extend_via_workspace`, the baseline benches/bench_extend.py times), holds 8 KiB per
    prefix token per layer at 8 KV heads x 128: 1 GiB for a 128K prefix.
    """
    if q.dim() != 3 or k_new.dim() != 3 or v_new.shape != k_new.shape:
        raise ValueError("q must be [N, Hq, D] and k_new/v_new [N, H_kv, D] of equal shape")
    if q.shape[0] != k_new.shape[0]:
        raise ValueError(f"q ({q.shape[0]}) and k_new ({k_new.shape[0]}) token counts differ")
    batch = cu_seqlens.shape[0] - 1
    layout = PageLayout.of(config, k_new.shape[1], q.shape[2])
    _check_layout_tensors(pool, layout)
    _check_decode_args(q, layout, page_table, num_pages, k_tail, v_tail, tail_len, batch)
    tidx = _as_index(tail_index, batch, q.device, "tail_index")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    which = _torch_for_cpu(resolve_backend(backend, q.device))
    if which == "torch":
        return _torchops().extend_attention(
            q, k_new, v_new, cu_seqlens, pool, layout, page_table, num_pages, k_tail, v_tail,
            tidx, tail_len, scale,
        )  # fmt: skip
    if which in ("cuda", "triton"):
        return _triton().extend_attention(
            q, k_new, v_new, cu_seqlens, pool, layout, page_table, num_pages, k_tail, v_tail,
            tidx, tail_len, scale,
        )  # fmt: skip
    return _extend_via_workspace(
        which, q, k_new, v_new, cu_seqlens, pool, layout, page_table, num_pages, k_tail, v_tail,
        tidx, tail_len, scale,
    )  # fmt: skip


def _extend_via_workspace(
    which: str,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pool: torch.Tensor,
    layout: PageLayout,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    tidx: torch.Tensor,
    tail_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Per request: prefix pages dequantized by ``which`` (cuda, triton; ref: the reference
    attention itself) into fp32, then SDPA over [prefix, tail, new] with the causal offset."""
    batch = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.tolist()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group = q.shape[1] // layout.kv_heads
    for b in range(batch):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        npg, nt, slot = int(num_pages[b]), int(tail_len[b]), int(tidx[b])
        kt = torch.cat((k_tail[slot, :nt].to(k_new.dtype), k_new[lo:hi]))
        vt = torch.cat((v_tail[slot, :nt].to(v_new.dtype), v_new[lo:hi]))
        if which == "ref":
            qkv = layout.pages_to_qkv(pool, page_table[b, :npg], kt, vt)
            o = ref_attention(q[lo:hi].cpu(), qkv, causal=True, scale=scale)
            out[lo:hi] = o.to(device=q.device, dtype=q.dtype)
            continue
        ids = page_table[b, :npg].to(torch.int32).contiguous()
        if which == "cuda":
            kp, vp = _cuda_ops().dequantize_pages(pool, ids, *_native_layout_args(layout))  # type: ignore[attr-defined]
        else:
            kp, vp = _triton().dequantize_pages(pool, ids, layout, torch.float32)
        kk = torch.cat((kp.reshape(-1, layout.kv_heads, layout.head_dim), kt.float()))
        vv = torch.cat((vp.reshape(-1, layout.kv_heads, layout.head_dim), vt.float()))
        out[lo:hi] = _sdpa_causal_suffix(q[lo:hi].float(), kk, vv, group, scale).to(q.dtype)
    return out


def _sdpa_causal_suffix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float
) -> torch.Tensor:
    """q [n, Hq, D] are the last n of k's T positions; causal attention, fp32."""
    n, t = q.shape[0], k.shape[0]
    mask = (
        torch.arange(t, device=q.device)[None, :]
        <= torch.arange(t - n, t, device=q.device)[:, None]
    )
    kk = k.transpose(0, 1).repeat_interleave(group, dim=0)
    vv = v.transpose(0, 1).repeat_interleave(group, dim=0)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk, vv, attn_mask=mask, scale=scale
    )
    return o.transpose(0, 1)


def dequantize_pages(
    pool: torch.Tensor,
    page_ids: torch.Tensor,
    config: OscarConfig,
    kv_heads: int,
    head_dim: int,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages back to fp32 K, V [n, 128, H_kv, D] in the model's basis (= ref dequantize_kv)."""
    layout = PageLayout.of(config, kv_heads, head_dim)
    _check_layout_tensors(pool, layout)
    ids = page_ids.to(device=pool.device, dtype=torch.int32).contiguous()
    which = _torch_for_cpu(resolve_backend(backend, pool.device))
    if which == "cuda":
        return _cuda_ops().dequantize_pages(pool, ids, *_native_layout_args(layout))  # type: ignore[attr-defined]
    if which == "triton":
        return _triton().dequantize_pages(pool, ids, layout, torch.float32)
    if which == "torch":
        return _torchops().dequantize_pages(pool, ids, layout)
    k, v = dequantize_kv(layout.pages_to_qkv(pool, ids))
    n = ids.shape[0]
    shape = (n, BLOCK_TOKENS, kv_heads, head_dim)
    return k.reshape(shape).to(pool.device), v.reshape(shape).to(pool.device)


def _native_layout_args(layout: PageLayout) -> tuple[int, ...]:
    """The layout as the C++ ops (CUDA and CPU) take it: kv_heads, head_dim, bits, k_group,
    v_group, norm code (0 none, 1 token, 2 head), rotate K, rotate V online."""
    cfg = layout.config
    return (
        layout.kv_heads,
        layout.head_dim,
        cfg.bits,
        cfg.k_group,
        cfg.v_group,
        {"none": 0, "token": 1, "head": 2}[cfg.norm],
        int(cfg.rotation == "hadamard"),
        int(cfg.rotates_v_online),
    )
