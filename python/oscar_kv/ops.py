"""Public entry points of the oscar-kv kernels; each dispatches CUDA > Triton > torch > ref.

The cache an attention op reads is one `oscar_kv.paged.PagedKV` (packed pages, residual
pages, page table and lengths; see there). `quantize_page` writes packed pages in the
`oscar_kv.layout.PageLayout` byte layout, which is exactly a row of the reference's
``QuantizedKV.packed_pages()``.

Every op is a torch operator in the ``oscar`` namespace (``torch.ops.oscar.*``: schema, a
CPU and a CUDA kernel that dispatch as below, and a fake kernel that also serves the
``meta`` device). The fake kernels check that every tensor of a call is on one device and
return empty outputs of the right shape, so the SGLang backend can run a whole forward on
``meta`` tensors: any host read (``.item()``, ``.tolist()``, ``nonzero()``) or a tensor on
another device raises there, which is how the serving path is proven free of host syncs
without a GPU. ``torch.library.opcheck`` passes for each op (tests/test_ops_library.py).

Dispatch: ``backend=None`` reads ``OSCAR_KV_BACKEND`` (cuda, triton, cpu, torch, ref), else
picks CUDA for CUDA tensors when the extension builds, then Triton; for CPU tensors "cpu":
the C++ kernels of `oscar_kv.cpu_kernels` (fused decode; the other ops of that backend are
the torch ones) when they build, else "torch": `oscar_kv.torchops`, plain torch vectorized
over the whole batch. "ref" drives the reference (`oscar_kv.ref`) one request and one page
at a time: the slow, obviously-right path that the other backends are tested against.
"torch" also runs on CUDA tensors when asked for by name (it reads lengths on the host, so
it is not the graph path). ``backend="triton"`` on CPU tensors runs Triton's interpreter
(slow; for tests).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch

from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.layout import PageLayout
from oscar_kv.paged import PagedKV
from oscar_kv.ref import attention as ref_attention
from oscar_kv.ref import fwht as ref_fwht
from oscar_kv.ref import quantize_kv
from oscar_kv.ref.hadamard import check_head_dim
from oscar_kv.ref.quant import QuantizedKV, dequantize_kv

BACKENDS = ("cuda", "triton", "cpu", "torch", "ref")

__all__ = [
    "BACKENDS",
    "PageLayout",
    "PagedKV",
    "decode_attention",
    "dequantize_pages",
    "extend_attention",
    "quantize_page",
    "resolve_backend",
    "rotate_q",
]


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


def resolve_decode_backend(backend: str | None, device: torch.device) -> str:
    """Decode's backend: `resolve_backend`'s, except that on a GPU the default is Triton, not
    the CUDA extension: the static model puts the Triton 2-bit decode at ~77% of H100 HBM
    bandwidth and today's CUDA decode at ~5% (benches/results/kernels_static.csv; estimates
    from sm_90a SASS, not measurements). ``OSCAR_KV_BACKEND=cuda`` or ``backend="cuda"``
    still picks CUDA; quantize, rotate and dequantize keep `resolve_backend`'s choice."""
    which = resolve_backend(backend, device)
    if which == "cuda" and backend is None and not os.environ.get("OSCAR_KV_BACKEND"):
        return "triton"
    return which


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


def _check_pool(pool: torch.Tensor, layout: PageLayout) -> None:
    _check_layout_tensors(pool, layout)


def _index(t: torch.Tensor | None, n: int, device: torch.device, name: str) -> torch.Tensor:
    if t is None:
        return torch.arange(n, dtype=torch.int32, device=device)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    return t.to(device=device, dtype=torch.int32).contiguous()


def _which(backend: str | None, device: torch.device) -> str:
    """The backend name the operator receives; "" on ``meta`` (only the fake kernel runs)."""
    return "" if device.type == "meta" else resolve_backend(backend, device)


@functools.cache
def _layout_of(args: tuple[int, ...]) -> PageLayout:
    return PageLayout.from_native_args(args)


def _one_device(op: str, *tensors: torch.Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(
            f"oscar::{op}: tensors on {sorted(map(str, devices))}; every tensor of one call "
            "must be on the same device"
        )
    return devices.pop()


# ---------------------------------------------------------------------------- torch operators

_LIB = torch.library.Library("oscar", "DEF")
_LIB.define(
    "quantize_pages(Tensor k, Tensor v, Tensor src_index, Tensor page_ids, Tensor(a!) pool, "
    "int[] layout, str backend) -> ()"
)
_LIB.define("rotate_q(Tensor q, str backend) -> Tensor")
_LIB.define(
    "decode_attention(Tensor q, Tensor pool, Tensor k_tail, Tensor v_tail, Tensor page_table, "
    "Tensor num_pages, Tensor tail_len, Tensor tail_index, Tensor(a!)? mid_o, "
    "Tensor(b!)? mid_ml, float scale, int num_splits, int[] layout, str backend, "
    "Tensor(c!)? lse=None) -> Tensor"
)
_LIB.define(
    "extend_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor cu_seqlens, Tensor pool, "
    "Tensor k_tail, Tensor v_tail, Tensor page_table, Tensor num_pages, Tensor tail_len, "
    "Tensor tail_index, Tensor? work, int work_rows, float scale, int[] layout, str backend, "
    "Tensor(a!)? lse=None) -> Tensor"
)
_LIB.define(
    "dequantize_pages(Tensor pool, Tensor page_ids, int[] layout, str backend) -> (Tensor, Tensor)"
)


def _register(name: str, kernel, fake) -> None:
    _LIB.impl(name, kernel, "CPU")
    _LIB.impl(name, kernel, "CUDA")
    torch.library.register_fake(f"oscar::{name}", fake, lib=_LIB)


def _kv_of(
    layout: PageLayout,
    pool: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    tail_len: torch.Tensor,
    tail_index: torch.Tensor,
    **extra: object,
) -> PagedKV:
    return PagedKV(
        layout, pool[None], k_tail[None], v_tail[None], page_table, num_pages, tail_len,
        tail_index, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


# -- quantize_pages
def _quantize_kernel(k, v, src, pid, pool, layout_args, backend) -> None:
    layout = _layout_of(tuple(layout_args))
    which = _torch_for_cpu(backend or resolve_backend(None, k.device))
    if which == "cuda":
        _cuda_ops().quantize_pages(k, v, src, pid, pool, layout)  # type: ignore[attr-defined]
    elif which == "triton":
        if k.stride(3) != 1 or v.stride(3) != 1:
            k, v = k.contiguous(), v.contiguous()
        _triton().quantize_pages(k, v, pool, pid, layout, src)
    elif which == "torch":
        _torchops().quantize_pages(k, v, pool, pid, layout, src)
    else:
        for s, p in zip(src.tolist(), pid.tolist(), strict=True):
            if p >= 0:
                q = quantize_kv(k[s].cpu(), v[s].cpu(), layout.config)
                pool[p] = q.packed_pages()[0].to(pool.device)


def _quantize_fake(k, v, src, pid, pool, layout_args, backend) -> None:
    _one_device("quantize_pages", k, v, src, pid, pool)


_register("quantize_pages", _quantize_kernel, _quantize_fake)


# -- rotate_q
def _rotate_kernel(q: torch.Tensor, backend: str) -> torch.Tensor:
    which = backend or resolve_backend(None, q.device)
    if which == "cuda":
        return _cuda_ops().rotate_q(q)  # type: ignore[attr-defined]
    if which == "triton":
        return _triton().fwht(q, torch.float32)
    return ref_fwht(q.float())


def _rotate_fake(q: torch.Tensor, backend: str) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


_register("rotate_q", _rotate_kernel, _rotate_fake)


# -- decode_attention
def _decode_kernel(
    q,
    pool,
    k_tail,
    v_tail,
    page_table,
    num_pages,
    tail_len,
    tail_index,
    mid_o,
    mid_ml,
    scale,
    num_splits,
    layout_args,
    backend,
    lse=None,
):
    layout = _layout_of(tuple(layout_args))
    which = backend or resolve_backend(None, q.device)
    if which in ("ref", "torch"):
        kv = _kv_of(layout, pool, k_tail, v_tail, page_table, num_pages, tail_len, tail_index)
        if which == "ref":
            return _ref_decode(q, kv, scale, lse)
        return _torchops().decode_attention(q, kv, 0, scale, lse)
    qc = q if q.stride(2) == 1 else q.contiguous()
    pt = page_table if page_table.stride(1) == 1 else page_table.contiguous()
    if which == "cpu":
        # fp32 q (a small copy at most) whatever the tails' dtype: no rounding of q.
        out = _cpu_ops().decode_attention(  # type: ignore[attr-defined]
            qc.float(), pool, pt, num_pages, k_tail, v_tail, tail_index, tail_len, scale,
            *layout.native_args, lse,
        )  # fmt: skip
        return out.to(q.dtype)
    if which == "cuda":
        # The CUDA kernels take q in the tails' dtype (one template parameter for both).
        kv = _kv_of(layout, pool, k_tail, v_tail, pt, num_pages, tail_len, tail_index)
        out = _cuda_ops().decode_attention_lse(  # type: ignore[attr-defined]
            qc.to(k_tail.dtype), kv, 0, scale, num_splits, lse
        )
        return out.to(q.dtype)
    from oscar_kv.paged import DecodeScratch

    scratch = None if mid_o is None else DecodeScratch(mid_o, mid_ml)
    kv = _kv_of(
        layout, pool, k_tail, v_tail, pt, num_pages, tail_len, tail_index,
        num_splits=num_splits or None, scratch=scratch,
    )  # fmt: skip
    return _triton().decode_attention(qc, kv, 0, scale, lse=lse)


def _decode_fake(
    q,
    pool,
    k_tail,
    v_tail,
    page_table,
    num_pages,
    tail_len,
    tail_index,
    mid_o,
    mid_ml,
    scale,
    num_splits,
    layout_args,
    backend,
    lse=None,
):
    _one_device(
        "decode_attention", q, pool, k_tail, v_tail, page_table, num_pages, tail_len,
        tail_index, mid_o, mid_ml, lse,
    )  # fmt: skip
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


_register("decode_attention", _decode_kernel, _decode_fake)


# -- extend_attention
def _extend_kernel(
    q,
    k_new,
    v_new,
    cu_seqlens,
    pool,
    k_tail,
    v_tail,
    page_table,
    num_pages,
    tail_len,
    tail_index,
    work,
    work_rows,
    scale,
    layout_args,
    backend,
    lse=None,
):
    layout = _layout_of(tuple(layout_args))
    which = _torch_for_cpu(backend or resolve_backend(None, q.device))
    kv = _kv_of(
        layout, pool, k_tail, v_tail, page_table, num_pages, tail_len, tail_index,
        extend_work=work, extend_rows=work_rows,
    )  # fmt: skip
    if which == "torch":
        return _torchops().extend_attention(q, k_new, v_new, cu_seqlens, kv, 0, scale, lse)
    if which in ("cuda", "triton"):
        return _triton().extend_attention(q, k_new, v_new, cu_seqlens, kv, 0, scale, lse=lse)
    return _extend_via_workspace(which, q, k_new, v_new, cu_seqlens, kv, scale, lse)


def _extend_fake(
    q,
    k_new,
    v_new,
    cu_seqlens,
    pool,
    k_tail,
    v_tail,
    page_table,
    num_pages,
    tail_len,
    tail_index,
    work,
    work_rows,
    scale,
    layout_args,
    backend,
    lse=None,
):
    _one_device(
        "extend_attention", q, k_new, v_new, cu_seqlens, pool, k_tail, v_tail, page_table,
        num_pages, tail_len, tail_index, work, lse,
    )  # fmt: skip
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


_register("extend_attention", _extend_kernel, _extend_fake)


# -- dequantize_pages
def _dequantize_kernel(pool, page_ids, layout_args, backend):
    layout = _layout_of(tuple(layout_args))
    which = _torch_for_cpu(backend or resolve_backend(None, pool.device))
    if which == "cuda":
        return _cuda_ops().dequantize_pages(pool, page_ids, layout)  # type: ignore[attr-defined]
    if which == "triton":
        return _triton().dequantize_pages(pool, page_ids, layout, torch.float32)
    if which == "torch":
        return _torchops().dequantize_pages(pool, page_ids, layout)
    k, v = dequantize_kv(layout.pages_to_qkv(pool, page_ids))
    shape = (page_ids.shape[0], BLOCK_TOKENS, layout.kv_heads, layout.head_dim)
    return k.reshape(shape).to(pool.device), v.reshape(shape).to(pool.device)


def _dequantize_fake(pool, page_ids, layout_args, backend):
    _one_device("dequantize_pages", pool, page_ids)
    layout = _layout_of(tuple(layout_args))
    shape = (page_ids.shape[0], BLOCK_TOKENS, layout.kv_heads, layout.head_dim)
    k = torch.empty(shape, dtype=torch.float32, device=pool.device)
    return k, torch.empty_like(k)


_register("dequantize_pages", _dequantize_kernel, _dequantize_fake)


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
    ``page_ids[i]``; an entry ``page_ids[i] < 0`` writes nothing, so a caller can pass one
    entry per request every step (a fixed grid; the CUDA and Triton kernels exit early on
    those) instead of selecting the completed ones on the host. A residual-page buffer
    [R, 128, H, D] can be passed whole with the residual pages that completed. The kernels'
    pages are byte-identical to ``quantize_kv(...).packed_pages()`` (the reference's own
    torch norm may differ from it in the last bit; see there).
    """
    if k.dim() == 3:
        k, v = k.unsqueeze(0), v.unsqueeze(0)
    if k.dim() != 4 or k.shape[1] != BLOCK_TOKENS:
        raise ValueError(f"k must be [n, {BLOCK_TOKENS}, kv_heads, head_dim], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must match k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    layout = PageLayout.of(config, k.shape[2], k.shape[3])
    _check_pool(pool, layout)
    if page_ids.dim() != 1:
        raise ValueError(f"page_ids must be 1-D, got shape {tuple(page_ids.shape)}")
    n = page_ids.shape[0]
    src = _index(src_index, n, k.device, "src_index")
    if src_index is None and n != k.shape[0]:
        raise ValueError(f"page_ids has {n} entries but k holds {k.shape[0]} blocks")
    pid = page_ids.to(device=pool.device, dtype=torch.int32).contiguous()
    torch.ops.oscar.quantize_pages(
        k, v, src, pid, pool, layout.native_args, _which(backend, k.device)
    )


def rotate_q(q: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Normalized Hadamard H_D / sqrt(D) of the last dim, fp32 out (bit-equal to the ref)."""
    check_head_dim(q.shape[-1], "q head_dim")
    return torch.ops.oscar.rotate_q(q, _which(backend, q.device))


def _check_query(q: torch.Tensor, kv: PagedKV) -> None:
    hq, d = q.shape[-2:]
    lay = kv.layout
    if d != lay.head_dim or hq % lay.kv_heads:
        raise ValueError(
            f"q heads/dim ({hq}, {d}) must be a multiple of kv_heads ({lay.kv_heads}) "
            f"and head_dim {lay.head_dim}"
        )


def decode_attention(
    q: torch.Tensor,
    kv: PagedKV,
    *,
    layer: int = 0,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode query per request over its pages and residual page: q [B, Hq, D] ->
    [B, Hq, D] in q's dtype.

    Equals ``oscar_kv.ref.attention(q[b:b+1], qkv_b)`` for each request (qkv_b: its pages
    plus its tail). GQA: query head j reads KV head j // (Hq / H_kv). ``num_splits``
    overrides ``kv.num_splits`` (the split-KV count of the CUDA and Triton kernels).

    ``lse``: an out tensor, fp32 [B, Hq] on q's device; when given, every backend writes
    ``log(sum_j exp(scale * q . k_j))`` (natural log) over exactly the keys the output
    attended to, so that this attention can be merged with another over other keys
    (o = (o1 * e^lse1 + o2 * e^lse2) / (e^lse1 + e^lse2)). The output is unchanged.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
    if q.shape[0] != kv.batch:
        raise ValueError(f"q holds {q.shape[0]} queries for a batch of {kv.batch} requests")
    _check_query(q, kv)
    _check_lse(lse, q)
    pool, k_tail, v_tail = kv.layer(layer)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    s = kv.scratch
    return torch.ops.oscar.decode_attention(
        q, pool, k_tail, v_tail, kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index,
        None if s is None else s.mid_o, None if s is None else s.mid_ml, scale,
        num_splits or kv.num_splits or 0, kv.layout.native_args,
        "" if q.device.type == "meta" else resolve_decode_backend(backend, q.device), lse,
    )  # fmt: skip


def _check_lse(lse: torch.Tensor | None, q: torch.Tensor) -> None:
    if lse is None:
        return
    want = (q.shape[0], q.shape[1])
    if lse.dtype != torch.float32 or tuple(lse.shape) != want or lse.device != q.device:
        raise ValueError(
            f"lse must be float32 {list(want)} on {q.device}, got {lse.dtype} "
            f"{list(lse.shape)} on {lse.device}"
        )


def _suffix_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 [n, Hq]: the log-sum-exp of the logits of q [n, Hq, D], the last n of the T
    positions of k [T, H_kv, D], over the keys each attends to causally."""
    n, hq, d = q.shape
    t, h = k.shape[0], k.shape[1]
    logits = torch.einsum("nhgd,thd->nhgt", q.float().view(n, h, hq // h, d), k.float()) * scale
    pos = torch.arange(t, device=q.device)
    hidden = pos[None, :] > pos[t - n :, None]
    logits = logits.masked_fill(hidden[:, None, None, :], float("-inf"))
    return torch.logsumexp(logits, dim=-1).reshape(n, hq)


def _ref_lse(q: torch.Tensor, qkv: QuantizedKV, scale: float) -> torch.Tensor:
    """`_suffix_lse` over the reference's dequantized cache, in the model's basis: the
    orthonormal rotation the reference dots in does not change a logit."""
    return _suffix_lse(q, dequantize_kv(qkv)[0], scale)


def _ref_decode(
    q: torch.Tensor, kv: PagedKV, scale: float, lse: torch.Tensor | None = None
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    pool, k_tail, v_tail = kv.layer(0)
    for b in range(q.shape[0]):
        npg, nt, slot = int(kv.num_pages[b]), int(kv.tail_len[b]), int(kv.tail_index[b])
        qkv = kv.layout.pages_to_qkv(
            pool, kv.page_table[b, :npg], k_tail[slot, :nt], v_tail[slot, :nt]
        )
        qb = q[b : b + 1].cpu()
        out[b] = ref_attention(qb, qkv, causal=True, scale=scale)[0]
        if lse is not None:
            lse[b] = _ref_lse(qb, qkv, scale)[0].to(lse.device)
    return out.to(device=q.device, dtype=q.dtype)


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kv: PagedKV,
    *,
    layer: int = 0,
    scale: float | None = None,
    backend: str | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """New tokens attend causally to their request's pages, residual page, and themselves.

    ``q`` [N, Hq, D], ``k_new``/``v_new`` [N, H_kv, D]: the new tokens of all requests,
    request b owning rows cu_seqlens[b]:cu_seqlens[b+1]; they follow the request's
    num_pages[b] * 128 + tail_len[b] cached tokens and are NOT in the residual page yet.
    Equals ``oscar_kv.ref.attention(q_b, qkv_b)`` where qkv_b's tail is (tail ++ new tokens).

    cuda and triton: one fused Triton kernel (`oscar_kv.triton.extend`) that dequantizes pages
    in registers, over ``kv.extend_work`` when the caller planned it (`plan_extend`);
    csrc has no extend kernel, so the CUDA backend falls through to it. The alternative,
    dequantizing the prefix into an fp32 workspace and calling SDPA (`_extend_via_workspace`,
    the baseline benches/bench_extend.py times), holds 8 KiB per prefix token per layer at
    8 KV heads x 128: 1 GiB for a 128K prefix.

    ``lse``: an out tensor, fp32 [N, Hq] on q's device; as in `decode_attention`, row i gets
    each head's log-sum-exp of its scaled logits over the keys it attended to (rows outside
    every request's range are left unspecified).
    """
    if q.dim() != 3 or k_new.dim() != 3 or v_new.shape != k_new.shape:
        raise ValueError("q must be [N, Hq, D] and k_new/v_new [N, H_kv, D] of equal shape")
    if q.shape[0] != k_new.shape[0]:
        raise ValueError(f"q ({q.shape[0]}) and k_new ({k_new.shape[0]}) token counts differ")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != kv.batch + 1:
        raise ValueError(
            f"cu_seqlens must be 1-D of length {kv.batch + 1}, got {tuple(cu_seqlens.shape)}"
        )
    if k_new.shape[1] != kv.layout.kv_heads:
        raise ValueError(f"k_new has {k_new.shape[1]} KV heads, the cache {kv.layout.kv_heads}")
    _check_query(q, kv)
    _check_lse(lse, q)
    pool, k_tail, v_tail = kv.layer(layer)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return torch.ops.oscar.extend_attention(
        q, k_new, v_new, cu, pool, k_tail, v_tail, kv.page_table, kv.num_pages, kv.tail_len,
        kv.tail_index, kv.extend_work, kv.extend_rows, scale, kv.layout.native_args,
        _which(backend, q.device), lse,
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Sequence[int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal self-attention of a prefill with no cached prefix: ``q`` [N, Hq, D], ``k``/``v``
    [N, H_kv, D], request b owning rows cu_seqlens[b]:cu_seqlens[b+1] (host ints). Nothing
    is read from the cache, so the dense prefill kernel serves it: one
    ``scaled_dot_product_attention`` per request (FlashAttention / memory-efficient kernels on
    CUDA, the flash kernel on CPU), GQA without repeating K/V, in the inputs' dtype. Exact
    attention over the inputs: Q/K rotation would not change a logit, and V is in the basis
    the output projection expects (folded or not)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0]:
        raise ValueError("q must be [N, Hq, D] and k/v [N, H_kv, D] with as many tokens")
    if len(cu_seqlens) < 1 or cu_seqlens[0] != 0 or cu_seqlens[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to {q.shape[0]}, got {list(cu_seqlens)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.empty_like(q)
    for lo, hi in itertools.pairwise(cu_seqlens):
        if hi == lo:
            continue
        o = torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1), v[lo:hi].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        out[lo:hi] = o.transpose(0, 1)
    return out


def plan_extend(kv: PagedKV, new_lens: list[int], q_heads: int) -> PagedKV:
    """``kv`` with the fused extend kernel's work list built from host-known new-token counts
    (once per forward, so no layer reads lengths back from the device)."""
    rows, work = _triton().extend_work(new_lens, q_heads // kv.layout.kv_heads, kv.layout.head_dim)
    return kv.with_batch(extend_work=work.to(kv.device), extend_rows=rows)


def _extend_via_workspace(
    which: str,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kv: PagedKV,
    scale: float,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per request: prefix pages dequantized by ``which`` (cuda, triton; ref: the reference
    attention itself) into fp32, then SDPA over [prefix, tail, new] with the causal offset
    (and, for ``lse``, the logits' log-sum-exp from the same K). Reads lengths on the host:
    a baseline and test path, not the serving path."""
    layout = kv.layout
    pool, k_tail, v_tail = kv.layer(0)
    batch = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.tolist()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group = q.shape[1] // layout.kv_heads
    for b in range(batch):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        npg, nt, slot = int(kv.num_pages[b]), int(kv.tail_len[b]), int(kv.tail_index[b])
        kt = torch.cat((k_tail[slot, :nt].to(k_new.dtype), k_new[lo:hi]))
        vt = torch.cat((v_tail[slot, :nt].to(v_new.dtype), v_new[lo:hi]))
        if which == "ref":
            qkv = layout.pages_to_qkv(pool, kv.page_table[b, :npg], kt, vt)
            o = ref_attention(q[lo:hi].cpu(), qkv, causal=True, scale=scale)
            out[lo:hi] = o.to(device=q.device, dtype=q.dtype)
            if lse is not None:
                lse[lo:hi] = _ref_lse(q[lo:hi].cpu(), qkv, scale).to(lse.device)
            continue
        ids = kv.page_table[b, :npg].to(torch.int32).contiguous()
        if which == "cuda":
            kp, vp = _cuda_ops().dequantize_pages(pool, ids, layout)  # type: ignore[attr-defined]
        else:
            kp, vp = _triton().dequantize_pages(pool, ids, layout, torch.float32)
        kk = torch.cat((kp.reshape(-1, layout.kv_heads, layout.head_dim), kt.float()))
        vv = torch.cat((vp.reshape(-1, layout.kv_heads, layout.head_dim), vt.float()))
        out[lo:hi] = _sdpa_causal_suffix(q[lo:hi].float(), kk, vv, group, scale).to(q.dtype)
        if lse is not None:
            lse[lo:hi] = _suffix_lse(q[lo:hi], kk, scale)
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
    _check_pool(pool, layout)
    ids = page_ids.to(device=pool.device, dtype=torch.int32).contiguous()
    return torch.ops.oscar.dequantize_pages(
        pool, ids, layout.native_args, _which(backend, pool.device)
    )
