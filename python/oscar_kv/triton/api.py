"""Python launchers of the Triton kernels (argument checks live in `oscar_kv.ops`)."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch
import triton

from oscar_kv.triton._env import in_scope
from oscar_kv.triton.decode import decode_split_kernel, merge_kernel
from oscar_kv.triton.extend import dequantize_prefix_kernel, extend_kernel, extend_ws_kernel
from oscar_kv.triton.quant import dequantize_pages_kernel, fwht_kernel, quantize_pages_kernel

if TYPE_CHECKING:
    from oscar_kv.layout import PageLayout
    from oscar_kv.paged import PagedKV

_NORM_CODE = {"none": 0, "token": 1, "head": 2}
_LOG2E = 1.4426950408889634


def _layout_args(layout: PageLayout) -> dict[str, int]:
    o = layout.offsets
    cfg = layout.config
    return {
        "OFF_KC": o["k_codes"],
        "OFF_VC": o["v_codes"],
        "OFF_KS": o["k_scale"],
        "OFF_KZ": o["k_zero"],
        "OFF_VS": o["v_scale"],
        "OFF_VZ": o["v_zero"],
        "OFF_N": o["norms"],
        "D": layout.head_dim,
        "LOG2D": int(math.log2(layout.head_dim)),
        "BITS": cfg.bits,
        "KG": cfg.k_group,
        "VG": cfg.v_group,
        "NORM": _NORM_CODE[cfg.norm],
    }


@in_scope
def quantize_pages(
    k: torch.Tensor,
    v: torch.Tensor,
    pool: torch.Tensor,
    page_ids: torch.Tensor,
    layout: PageLayout,
    src_index: torch.Tensor,
) -> None:
    """Quantize blocks k[src_index[i]], v[...] ([n, 128, H, D]) into pool rows page_ids[i]."""
    n = page_ids.shape[0]
    if n == 0:
        return
    cfg = layout.config
    args = _layout_args(layout)
    warps = max(4, min(16, cfg.k_group * layout.head_dim // 1024))
    quantize_pages_kernel[(n, layout.kv_heads, 128 // cfg.k_group)](
        k,
        v,
        src_index,
        page_ids,
        pool,
        pool.stride(0),
        *k.stride(),
        *v.stride(),
        H=layout.kv_heads,
        ROT_K=cfg.rotation == "hadamard",
        ROT_V=cfg.rotates_v_online,
        num_warps=warps,
        # A fused multiply-add in the norm's x*x + y would change the stored bits.
        enable_fp_fusion=False,
        **args,
    )


@in_scope
def dequantize_pages(
    pool: torch.Tensor, page_ids: torch.Tensor, layout: PageLayout, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages -> (K, V) [n, 128, H, D] in the model's basis (norm applied, rotation undone)."""
    n = page_ids.shape[0]
    shape = (n, 128, layout.kv_heads, layout.head_dim)
    k = torch.empty(shape, dtype=dtype, device=pool.device)
    v = torch.empty(shape, dtype=dtype, device=pool.device)
    if n:
        cfg = layout.config
        dequantize_pages_kernel[(n, layout.kv_heads, 4)](
            pool,
            pool.stride(0),
            page_ids,
            k,
            v,
            H=layout.kv_heads,
            ROT_K=cfg.rotation == "hadamard",
            ROT_V=cfg.rotates_v_online,
            num_warps=4,
            **_layout_args(layout),
        )
    return k, v


@in_scope
def fwht(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform over the last dim (bit-identical to the ref's)."""
    d = x.shape[-1]
    xc = x.contiguous().view(-1, d)
    out = torch.empty(xc.shape, dtype=out_dtype or x.dtype, device=x.device)
    rows = max(1, min(64, 2048 // d))
    if xc.shape[0]:
        fwht_kernel[(triton.cdiv(xc.shape[0], rows),)](
            xc, out, xc.shape[0], ROWS=rows, D=d, LOG2D=int(math.log2(d)), num_warps=4
        )
    return out.view(x.shape)


def default_num_splits(batch: int, kv_heads: int, max_pages: int, device: torch.device) -> int:
    """Enough splits to give every SM ~2 programs; 1 in the interpreter (each costs time)."""
    if device.type != "cuda" or max_pages <= 1:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_pages, triton.cdiv(2 * sms, batch * kv_heads)))


def decode_splits(
    batch: int, kv_heads: int, max_pages: int, device: torch.device, requested: int | None = None
) -> tuple[int, int]:
    """(splits, pages per split) the decode kernel runs with for a page table of
    ``max_pages`` columns: ``requested`` (or the default) rounded so no split is empty.
    A host computation from shapes only, so a CUDA graph can fix it at capture."""
    ns = requested or default_num_splits(batch, kv_heads, max_pages, device)
    pps = max(1, triton.cdiv(max_pages, ns))
    return (max(1, triton.cdiv(max_pages, pps)) if max_pages else 1), pps


def decode_block_tokens(head_dim: int, group: int = 1, precise: bool = False) -> int:
    """Default tokens per inner step of the decode: on the fp16 path, with up to 16 query
    heads per KV head, the largest block that stays under ~170 registers per thread without
    spills on sm_90a with 4 warps (benches/kernel_static.py): 128 at head_dim 64 (~135),
    64 at 128 (~165), 32 at 256 (~210; 64 would take ~240). A larger block halves the
    per-step softmax and bookkeeping per token. The fp32 ``precise`` path and 32 heads
    take 32."""
    if precise or group > 16:
        return 32
    return 128 if head_dim <= 64 else 64 if head_dim <= 128 else 32


@in_scope
def decode_attention(
    q: torch.Tensor,
    kv: PagedKV,
    layer: int,
    scale: float,
    precise: bool = False,
    block_tokens: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-KV decode over packed pages + residual pages; out [B, Hq, D] in q's dtype.

    The split count is ``kv.num_splits`` (fixed for a captured CUDA graph) or the default
    for this batch; the partial results go to ``kv.scratch`` when the caller allocated it
    once for the forward, else to buffers allocated here. ``precise`` runs the dots in fp32
    (IEEE) on fp32-dequantized codes instead of fp16 operands (codes unpacked by bit tricks,
    fp16 dequantization) with fp32 accumulation; tests use it to compare with the reference
    tightly. ``block_tokens`` (32, 64 or 128): tokens per inner step; a page is walked in
    128 / block_tokens steps; None: `decode_block_tokens`. ``lse`` (fp32 [B, Hq]), when
    given, receives each query head's log-sum-exp of its scaled logits (natural log).
    """
    if block_tokens is None:
        block_tokens = decode_block_tokens(q.shape[-1], q.shape[1] // kv.layout.kv_heads, precise)
    layout = kv.layout
    pool, k_tail, v_tail = kv.layer(layer)
    page_table, num_pages, tail_len, tail_index = (
        kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index
    )  # fmt: skip
    num_splits = kv.num_splits
    batch, hq, d = q.shape
    hkv = layout.kv_heads
    group = hq // hkv
    max_pages = page_table.shape[1]
    ns, pps = decode_splits(batch, hkv, max_pages, q.device, num_splits)
    s = kv.scratch
    if s is not None and tuple(s.mid_o.shape) == (batch, hq, ns + 1, d):
        mid_o, mid_m, mid_l = s.mid_o, s.mid_ml[0], s.mid_ml[1]
    else:
        mid_o = torch.empty((batch, hq, ns + 1, d), dtype=torch.float32, device=q.device)
        mid_m = torch.empty((batch, hq, ns + 1), dtype=torch.float32, device=q.device)
        mid_l = torch.empty((batch, hq, ns + 1), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    cfg = layout.config
    gp = max(16, triton.next_power_of_2(group))
    args = _layout_args(layout)
    decode_split_kernel[(batch, hkv, ns + 1)](
        q,
        q.stride(0),
        q.stride(1),
        pool,
        pool.stride(0),
        page_table,
        page_table.stride(0),
        num_pages,
        k_tail,
        k_tail.stride(0),
        k_tail.stride(1),
        k_tail.stride(2),
        v_tail,
        v_tail.stride(0),
        v_tail.stride(1),
        v_tail.stride(2),
        tail_index,
        tail_len,
        mid_o,
        mid_m,
        mid_l,
        pps,
        scale * _LOG2E,
        HKV=hkv,
        G=group,
        GP=gp,
        ROT_Q=cfg.rotation == "hadamard",
        PRECISE=precise,
        BT=block_tokens,
        num_warps=4,
        **args,
    )
    merge_kernel[(batch, hkv)](
        mid_o,
        mid_m,
        mid_l,
        out,
        out.stride(0),
        out.stride(1),
        out if lse is None else lse,
        0 if lse is None else lse.stride(0),
        0 if lse is None else lse.stride(1),
        ns,
        HKV=hkv,
        G=group,
        GP=triton.next_power_of_2(group),
        D=d,
        LOG2D=args["LOG2D"],
        ROT_V=cfg.rotates_v_online,
        HAS_LSE=lse is not None,
        num_warps=4,
    )
    return out


# 8 warps: with 4, the [64, 128] fp32 accumulator, its value planes and the query planes
# need 250+ registers per thread and spill for GQA 1 (sm_90a, ptxas -v).
EXTEND_WARPS = 8


# Bytes of the prefix workspace of one extend call (K and V of one chunk of page-table
# columns for every request and KV head); a longer prefix is walked in several chunks.
EXTEND_WORKSPACE_BYTES = 256 << 20


def extend_block_tokens(group: int, head_dim: int) -> int:
    """New tokens per program: BM * next_pow2(group) query rows, 64 (32 for head_dim 256) so
    the fp32 accumulator of [rows, head_dim] stays in registers; at least 16 rows for tl.dot."""
    rows = 32 if head_dim > 128 else 64
    return max(1, rows // triton.next_power_of_2(group), 16 // triton.next_power_of_2(group))


def extend_work(new_lens: list[int], group: int, head_dim: int) -> tuple[int, torch.Tensor]:
    """(rows per work item, work list int32 [2, n] on the CPU: request, first new row) of the
    fused extend kernel, from host-known new-token counts."""
    bm = extend_block_tokens(group, head_dim)
    work = [(b, q0) for b, nb in enumerate(new_lens) for q0 in range(0, nb, bm)]
    t = torch.tensor(work, dtype=torch.int32).reshape(-1, 2).T.contiguous()
    return bm, t


@in_scope
def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kv: PagedKV,
    layer: int,
    scale: float,
    precise: bool = False,
    block_tokens: int = 32,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend attention; out [N, Hq, D] in q's dtype (see `oscar_kv.ops.extend_attention`);
    ``lse`` (fp32 [N, Hq]), when given, receives each row's log-sum-exp of its logits.

    Every prefix page is dequantized once per call and KV head (`oscar_kv.triton.extend`):
    in registers by the fused kernel when each request's new tokens fit one work item, else
    into a workspace of at most ``EXTEND_WORKSPACE_BYTES`` (chunked over page-table columns)
    that every work item of the request reads. The work list of (request, first token) blocks is ``kv.extend_work`` when the caller
    planned it from host-known lengths (`oscar_kv.ops.plan_extend`, once per forward);
    otherwise it is built here from cu_seqlens, which reads them back from the device.
    """
    layout = kv.layout
    pool, k_tail, v_tail = kv.layer(layer)
    page_table, num_pages, tail_len, tail_index = (
        kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index
    )  # fmt: skip
    n, hq, d = q.shape
    hkv = layout.kv_heads
    group = hq // hkv
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    bm = extend_block_tokens(group, d)
    if kv.extend_work is not None and kv.extend_rows == bm:
        work_t = kv.extend_work
    else:
        cu = cu_seqlens.tolist()
        _, work_t = extend_work([hi - lo for lo, hi in itertools.pairwise(cu)], group, d)
        work_t = work_t.to(q.device)
    n_work = work_t.shape[1]
    if n_work == 0:
        return out
    cfg = layout.config
    la = _layout_args(layout)
    cu_dev = cu_seqlens.to(device=q.device, dtype=torch.int32)
    common = (
        q, q.stride(0), q.stride(1), k_new, k_new.stride(0), k_new.stride(1),
        v_new, v_new.stride(0), v_new.stride(1), out, out.stride(0), out.stride(1),
        cu_dev, work_t[0], work_t[1], pool, pool.stride(0), page_table, page_table.stride(0),
        num_pages, k_tail, k_tail.stride(0), k_tail.stride(1), k_tail.stride(2),
        v_tail, v_tail.stride(0), v_tail.stride(1), v_tail.stride(2), tail_index, tail_len,
        scale * _LOG2E, out if lse is None else lse, 0 if lse is None else lse.stride(0),
        0 if lse is None else lse.stride(1),
    )  # fmt: skip
    max_pages = page_table.shape[1]
    # Several work items may belong to one request: its pages then go through the workspace,
    # dequantized once, instead of once per work item (a host decision from shapes only).
    split = max_pages > 0 and n_work > 1
    if split:
        batch = page_table.shape[0]
        ws_dtype = torch.float32 if precise else torch.float16
        per_col = 2 * batch * hkv * 128 * d * (4 if precise else 2)
        cols = max(1, min(max_pages, EXTEND_WORKSPACE_BYTES // per_col))
        ws_k = torch.empty((batch, hkv, cols * 128, d), dtype=ws_dtype, device=q.device)
        ws_v = torch.empty_like(ws_k)
        n_chunks = triton.cdiv(max_pages, cols)
        st_m = st_l = st_acc = out  # unused with one chunk
        if n_chunks > 1:
            st_m = torch.empty((n, hq), dtype=torch.float32, device=q.device)
            st_l = torch.empty_like(st_m)
            st_acc = torch.empty((n, hq, d), dtype=torch.float32, device=q.device)
        for i in range(n_chunks):
            dequantize_prefix_kernel[(batch, cols, hkv)](
                pool, pool.stride(0), page_table, page_table.stride(0), num_pages, cu_dev, ws_k,
                ws_v, i * cols, H=hkv, BM=bm, TC=32, num_warps=4,
                **{k: la[k] for k in ("OFF_KC", "OFF_VC", "OFF_KS", "OFF_KZ", "OFF_VS",
                                       "OFF_VZ", "D", "BITS", "KG", "VG")},
            )  # fmt: skip
            extend_ws_kernel[(n_work, hkv)](
                *common, ws_k, ws_v, cols, i * cols, st_m, st_l, st_acc,
                OFF_N=la["OFF_N"], H=hkv, G=group, GP=triton.next_power_of_2(group), BM=bm,
                D=d, LOG2D=la["LOG2D"], NORM=la["NORM"], ROT_Q=cfg.rotation == "hadamard",
                ROT_V=cfg.rotates_v_online, PRECISE=precise, BT=block_tokens,
                FIRST=i == 0, LAST=i == n_chunks - 1, HAS_LSE=lse is not None,
                num_warps=EXTEND_WARPS,
            )  # fmt: skip
    extend_kernel[(n_work, hkv)](
        *common,
        G=group,
        GP=triton.next_power_of_2(group),
        BM=bm,
        ROT_Q=cfg.rotation == "hadamard",
        ROT_V=cfg.rotates_v_online,
        PRECISE=precise,
        BT=block_tokens,
        SPLIT=split,
        HAS_LSE=lse is not None,
        num_warps=EXTEND_WARPS,
        **la,
    )
    return out
