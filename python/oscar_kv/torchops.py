"""Plain-torch, batch-vectorized implementation of the `oscar_kv.ops` ops on the paged pool.

Why it exists: the reference (`oscar_kv.ref`) is the readable source of truth, and `ops`' "ref"
backend drives it one request (and one quantized page) at a time from Python. A CPU SGLang
server calls these ops for every layer of every step, where that Python loop costs more than
the arithmetic. This module computes the same contracts (see `oscar_kv.ops`) for the whole
batch at once, with no Python loop over requests or pages: it is the default backend for CPU
tensors, and it runs on any device torch does (useful to cross-check the kernels).

How, per op:

- quantize: the reference quantizer is already vectorized over pages, so all blocks go through
  one `quantize_kv` call; its pages are the reference pages byte for byte.
- pages are unpacked through a byte -> codes lookup table (one gather per byte instead of a
  shift/mask/stack per code) and dequantized in the "cache basis" the reference attention
  uses: unit-scaled rotated K (the norm is applied to the logits) and V as stored.
- decode: the valid pages of all requests are gathered into one flat list (padding entries of
  the page table are never read), logits are taken page by page against the query of the
  page's request, with the K scale folded into the query (``q . (c*s + z) = c . (q*s) + q . z``,
  so K is never dequantized element by element), then scattered into a padded [B, T] row for
  one fp32 softmax per request. GQA folds the query heads of one KV head into the matmul's
  row dimension, so K/V are never repeated per query head.
- extend: prefix pages, tails and new tokens go into one zero-padded [B, H_kv, T, D] K/V in
  the cache basis (new and tail tokens are rotated, which is cheaper than un-rotating every
  prefix page), and torch SDPA (``enable_gqa``, so K/V are not repeated per query head)
  attends with a per-request causal-suffix mask. When padding would more than double the
  attention work (one long prefill beside short requests), each request attends over its
  own slice of those already-dequantized tensors instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from oscar_kv.config import BLOCK_TOKENS
from oscar_kv.layout import SECTION_DTYPES, PageLayout
from oscar_kv.paged import PagedKV
from oscar_kv.ref.hadamard import fwht, hadamard_matrix
from oscar_kv.ref.quant import FLOAT_DTYPES, quantize_kv

PADDING_WORK_LIMIT = 2.0
"""Extend batches pad all requests to the longest one while the padded attention work stays
within this factor of the real work; past it, each request attends on its own."""


def quantize_pages(
    k: torch.Tensor,
    v: torch.Tensor,
    pool: torch.Tensor,
    page_ids: torch.Tensor,
    layout: PageLayout,
    src_index: torch.Tensor,
) -> None:
    """Blocks ``k[src_index[i]]``, ``v[...]`` ([n_src, 128, H, D]) into rows ``page_ids[i]``;
    entries with ``page_ids[i] < 0`` are skipped (selected on the host: not a graph path)."""
    keep = page_ids >= 0
    if not bool(keep.all()):
        page_ids, src_index = page_ids[keep], src_index[keep.to(src_index.device)]
    n = page_ids.shape[0]
    if n == 0:
        return
    src = src_index.to(device=k.device, dtype=torch.long)
    tokens = n * BLOCK_TOKENS
    kb = k.index_select(0, src).reshape(tokens, layout.kv_heads, layout.head_dim)
    vb = v.index_select(0, src).reshape(tokens, layout.kv_heads, layout.head_dim)
    # The reference packer builds its bytes on the CPU; one call covers every block.
    rows = quantize_kv(kb.cpu(), vb.cpu(), layout.config).packed_pages()
    pool[page_ids.to(device=pool.device, dtype=torch.long)] = rows.to(pool.device)


def dequantize_pages(
    pool: torch.Tensor, page_ids: torch.Tensor, layout: PageLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages back to fp32 K, V [n, 128, H, D] in the model's basis, bit-equal to the ref."""
    cfg = layout.config
    ids = page_ids.to(device=pool.device, dtype=torch.long)
    sec = _sections(pool.index_select(0, ids), layout)
    k, v = _dequantize_unit(sec, layout)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    norms = _norms_per_token(sec, layout)
    if norms is not None:
        k.mul_(norms.transpose(1, 2))
    if cfg.rotation == "hadamard":
        k = fwht(k)
    if cfg.rotates_v_online:
        v = fwht(v)
    return k.contiguous(), v.contiguous()


def decode_attention(
    q: torch.Tensor, kv: PagedKV, layer: int, scale: float, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """One query per request over its pages and tail: q [B, Hq, D] -> [B, Hq, D], q's dtype;
    ``lse`` (fp32 [B, Hq]), when given, receives the log-sum-exp of each head's logits."""
    _check_query(q)
    layout = kv.layout
    pool, k_tail, v_tail = kv.layer(layer)
    page_table, num_pages, tail_len, tail_index = (
        kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index
    )  # fmt: skip
    cfg, dev = layout.config, q.device
    batch, hq, d = q.shape
    h = layout.kv_heads
    group = hq // h
    npg = num_pages.to(device=dev, dtype=torch.long)
    tl = tail_len.to(device=dev, dtype=torch.long)
    if bool(((npg + tl) <= 0).any()):
        empty = ((npg + tl) <= 0).nonzero().flatten().tolist()
        raise ValueError(
            f"causal q_tokens (1) cannot exceed the cached tokens (0): requests {empty} "
            "have no pages and an empty tail"
        )
    # The scale is folded into q: B*Hq*D multiplies instead of one per logit.
    qf = q.float().view(batch, h, group, d) * scale

    tidx = tail_index.to(device=dev, dtype=torch.long)
    kt = k_tail.index_select(0, tidx).float().permute(0, 2, 3, 1)  # [B, H, D, 128]
    vt = v_tail.index_select(0, tidx).float().transpose(1, 2)  # [B, H, 128, D]
    tail_out = torch.arange(BLOCK_TOKENS, device=dev)[None, :] >= tl[:, None]
    logits_t = torch.matmul(qf, kt).masked_fill_(tail_out[:, None, None, :], float("-inf"))
    # Slots past tail_len may hold stale or uninitialized values: 0 * NaN would poison the sum.
    vt = vt.masked_fill(tail_out[:, None, :, None], 0.0)

    pmax = int(npg.max()) if batch else 0
    _check_table_width(page_table, pmax)
    if pmax == 0:
        if lse is not None:
            lse.copy_(torch.logsumexp(logits_t, dim=-1).view(batch, hq))
        return torch.matmul(torch.softmax(logits_t, dim=-1), vt).view(batch, hq, d).to(q.dtype)

    valid = torch.arange(pmax, device=dev)[None, :] < npg[:, None]  # [B, pmax]
    ids = page_table[:, :pmax].to(device=dev, dtype=torch.long)[valid]
    req = torch.arange(batch, device=dev)[:, None].expand(batch, pmax)[valid]
    sec = _sections(pool.index_select(0, ids.to(pool.device)).to(dev), layout)
    q_rot = _rotate(qf) if cfg.rotation == "hadamard" else qf
    logits_p = _page_logits(q_rot.index_select(0, req), sec, layout)  # [N, H, group, 128]

    padded = torch.full(
        (batch, pmax, h, group, BLOCK_TOKENS), float("-inf"), dtype=torch.float32, device=dev
    )
    padded[valid] = logits_p
    padded = padded.permute(0, 2, 3, 1, 4).reshape(batch, h, group, pmax * BLOCK_TOKENS)
    logits = torch.cat((padded, logits_t), dim=-1)
    if lse is not None:
        lse.copy_(torch.logsumexp(logits, dim=-1).view(batch, hq))
    p = torch.softmax(logits, dim=-1)

    out = torch.matmul(p[..., pmax * BLOCK_TOKENS :], vt)
    p_pages = p[..., : pmax * BLOCK_TOKENS].reshape(batch, h, group, pmax, BLOCK_TOKENS)
    p_pages = p_pages.permute(0, 3, 1, 2, 4)[valid]  # [N, H, group, 128]
    _, v_unit = _dequantize_unit(sec, layout, need_k=False)
    out_pages = torch.zeros_like(out).index_add_(0, req, torch.matmul(p_pages, v_unit))
    if cfg.rotates_v_online:
        out_pages = _rotate(out_pages)
    return (out + out_pages).view(batch, hq, d).to(q.dtype)


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kv: PagedKV,
    layer: int,
    scale: float,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """New tokens of all requests attend causally to their pages, tail and themselves;
    ``lse`` (fp32 [N, Hq]), when given, receives each row's log-sum-exp of its logits (-inf
    for rows outside every request's range)."""
    _check_query(q)
    layout = kv.layout
    pool, k_tail, v_tail = kv.layer(layer)
    page_table, num_pages, tail_len, tail_index = (
        kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index
    )  # fmt: skip
    cfg, dev = layout.config, q.device
    n_tok, hq, d = q.shape
    h = layout.kv_heads
    out = torch.zeros(q.shape, dtype=q.dtype, device=dev)
    cu = cu_seqlens.to(device=dev, dtype=torch.long)
    n_new = cu[1:] - cu[:-1]
    # Idle requests (no new tokens) are dropped so their pages are not dequantized.
    act = (n_new > 0).nonzero().flatten()
    if lse is not None:
        lse.fill_(float("-inf"))
    if n_tok == 0 or act.numel() == 0:
        return out
    ba = act.numel()
    n_a = n_new[act]
    lo_a = cu[:-1][act]
    npg = num_pages.to(device=dev, dtype=torch.long)[act]
    tl = tail_len.to(device=dev, dtype=torch.long)[act]
    tidx = tail_index.to(device=dev, dtype=torch.long)[act]
    cached = npg * BLOCK_TOKENS + tl
    total = cached + n_a
    t_max = int(total.max())
    lq_max = int(n_a.max())

    # K/V of every active request in the cache basis: [pages | tail | new], zero padded.
    k_all = torch.zeros((ba, h, t_max, d), dtype=torch.float32, device=dev)
    v_all = torch.zeros_like(k_all)
    pmax = int(npg.max())
    _check_table_width(page_table, pmax)
    if pmax:
        valid = torch.arange(pmax, device=dev)[None, :] < npg[:, None]
        ids = page_table.index_select(0, act.to(page_table.device))[:, :pmax]
        ids = ids.to(device=dev, dtype=torch.long)[valid]
        req = torch.arange(ba, device=dev)[:, None].expand(ba, pmax)[valid]
        pos = torch.arange(pmax, device=dev).expand(ba, pmax)[valid]
        sec = _sections(pool.index_select(0, ids.to(pool.device)).to(dev), layout)
        k_unit, v_unit = _dequantize_unit(sec, layout)
        norms = _norms_per_token(sec, layout)
        if norms is not None:
            k_unit.mul_(norms)
        tok = pos[:, None] * BLOCK_TOKENS + torch.arange(BLOCK_TOKENS, device=dev)[None, :]
        k_all[req[:, None], :, tok] = k_unit.transpose(1, 2)
        v_all[req[:, None], :, tok] = v_unit.transpose(1, 2)

    tail_on = torch.arange(BLOCK_TOKENS, device=dev)[None, :] < tl[:, None]  # [Ba, 128]
    t_req, t_j = tail_on.nonzero(as_tuple=True)
    t_slot = tidx[t_req]
    # The new rows, request by request: row_req (active index) and row_i (index in request).
    starts = torch.cumsum(n_a, 0) - n_a
    row_req = torch.repeat_interleave(torch.arange(ba, device=dev), n_a)
    row_i = torch.arange(row_req.shape[0], device=dev) - starts[row_req]
    rows = lo_a[row_req] + row_i
    ex_req = torch.cat((t_req, row_req))
    ex_pos = torch.cat((npg[t_req] * BLOCK_TOKENS + t_j, cached[row_req] + row_i))
    k_ex = torch.cat((k_tail[t_slot, t_j].float(), k_new.index_select(0, rows).float()))
    v_ex = torch.cat((v_tail[t_slot, t_j].float(), v_new.index_select(0, rows).float()))
    if cfg.rotation == "hadamard":
        k_ex = _rotate(k_ex)
    if cfg.rotates_v_online:
        v_ex = _rotate(v_ex)
    k_all[ex_req, :, ex_pos] = k_ex
    v_all[ex_req, :, ex_pos] = v_ex

    qc = q.index_select(0, rows).float()
    if cfg.rotation == "hadamard":
        qc = _rotate(qc)

    padded_work = ba * lq_max * t_max
    real_work = int((n_a * total).sum())
    # GQA through SDPA's enable_gqa: K/V stay [.., H_kv, T, D] and one mask serves all heads.
    if padded_work <= PADDING_WORK_LIMIT * real_work:
        q_pad = torch.zeros((ba, lq_max, hq, d), dtype=torch.float32, device=dev)
        q_pad[row_req, row_i] = qc
        q_pos = cached[:, None] + torch.arange(lq_max, device=dev)[None, :]  # [Ba, lq_max]
        mask = torch.arange(t_max, device=dev)[None, None, :] <= q_pos[:, :, None]
        o = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), k_all, v_all, attn_mask=mask[:, None], scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        o = o.transpose(1, 2)[row_req, row_i]
        if lse is not None:
            lse[rows] = _causal_lse(q_pad, k_all, q_pos, scale)[row_req, row_i]
    else:
        o = torch.empty(qc.shape, dtype=torch.float32, device=dev)
        bounds = zip(starts.tolist(), n_a.tolist(), cached.tolist(), total.tolist(), strict=True)
        for a, (lo, n, c, t) in enumerate(bounds):
            q_pos = c + torch.arange(n, device=dev)
            mask = torch.arange(t, device=dev)[None, :] <= q_pos[:, None]
            oa = F.scaled_dot_product_attention(
                qc[lo : lo + n].transpose(0, 1), k_all[a, :, :t], v_all[a, :, :t],
                attn_mask=mask, scale=scale, enable_gqa=True,
            )  # fmt: skip
            o[lo : lo + n] = oa.transpose(0, 1)
            if lse is not None:
                la = _causal_lse(qc[None, lo : lo + n], k_all[a : a + 1, :, :t], q_pos[None], scale)
                lse[rows[lo : lo + n]] = la[0]
    o = o.reshape(-1, hq, d)
    if cfg.rotates_v_online:
        o = _rotate(o)
    # Rows outside every request's cu_seqlens range stay zero.
    out[rows] = o.to(q.dtype)
    return out


# ---------------------------------------------------------------------------- helpers

LSE_CHUNK_LOGITS = 1 << 24
"""Logits held at once while `_causal_lse` takes an extend's log-sum-exp (64 MiB fp32)."""


def _causal_lse(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """fp32 [B, L, Hq]: log-sum-exp of scale * q . k over the keys at positions <= q_pos.

    q [B, L, Hq, D], k [B, H_kv, T, D] (query head j reads KV head j // (Hq / H_kv)), q_pos
    [B, L]. SDPA does not return its log-sum-exp, so the logits are taken again here, in
    chunks of query rows that keep them within `LSE_CHUNK_LOGITS`."""
    b, lq, hq, d = q.shape
    h, t = k.shape[1], k.shape[2]
    group = hq // h
    out = torch.empty((b, lq, hq), dtype=torch.float32, device=q.device)
    step = max(1, LSE_CHUNK_LOGITS // max(1, b * hq * t))
    pos = torch.arange(t, device=q.device)
    for i in range(0, lq, step):
        qc = q[:, i : i + step]
        n = qc.shape[1]
        qg = qc.reshape(b, n, h, group, d).permute(0, 2, 3, 1, 4).reshape(b, h, group * n, d)
        logits = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale).view(b, h, group, n, t)
        hidden = pos[None, None, :] > q_pos[:, i : i + n, None]  # [B, n, T]
        logits.masked_fill_(hidden[:, None, None], float("-inf"))
        out[:, i : i + n] = torch.logsumexp(logits, dim=-1).permute(0, 3, 1, 2).reshape(b, n, hq)
    return out


def _check_query(q: torch.Tensor) -> None:
    # The same checks (and messages) the reference attention applies to q.
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must have a floating dtype, got {q.dtype}")
    if not torch.isfinite(q).all():
        raise ValueError("q contains NaN or inf")


@functools.cache
def _hadamard(d: int, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(d).to(device)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """H_D / sqrt(D) of the last dim of fp32 ``x`` as one matmul: on the small tensors the
    attention paths rotate (queries, tails, outputs) the butterfly's ~6 ops per level cost
    more than D multiply-adds per element. Equal to `fwht` up to fp32 rounding."""
    return torch.matmul(x, _hadamard(x.shape[-1], x.device))


def _check_table_width(page_table: torch.Tensor, pmax: int) -> None:
    if pmax > page_table.shape[1]:
        raise ValueError(
            f"num_pages (up to {pmax}) exceeds the page_table width ({page_table.shape[1]})"
        )


def _sections(rows: torch.Tensor, layout: PageLayout) -> dict[str, torch.Tensor]:
    """Typed views [n, *section_shape] into gathered pool rows (absent sections left out)."""
    n = rows.shape[0]
    out = {}
    for name, dtype in SECTION_DTYPES.items():
        size = layout.nbytes[name]
        if size == 0:
            continue
        off = layout.offsets[name]
        # Section offsets and row strides are multiples of 16 bytes, so the dtype views hold.
        raw = rows[:, off : off + size]
        out[name] = raw.view(dtype).view(n, *layout.section_shape(name))
    return out


@functools.cache
def _unpack_table(bits: int, device: torch.device) -> torch.Tensor:
    """fp32 [256, 8 / bits]: the codes of one packed byte, lowest bits first."""
    per_byte = 8 // bits
    byte = torch.arange(256)[:, None]
    shift = torch.arange(per_byte)[None, :] * bits
    return ((byte >> shift) & ((1 << bits) - 1)).float().to(device)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 packed codes [..., B] -> fp32 codes [..., B * 8 / bits]."""
    table = _unpack_table(bits, codes.device)
    flat = table.index_select(0, codes.reshape(-1).int())
    return flat.view(*codes.shape[:-1], codes.shape[-1] * (8 // bits))


def _dequantize_unit(
    sec: dict[str, torch.Tensor], layout: PageLayout, need_k: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Unit-scaled K and stored V, fp32 [n, H, 128, D], with the reference's op order
    (code * scale, then + zero) so that `dequantize_pages` is bit-equal to it."""
    cfg = layout.config
    n, h, d = sec["k_codes"].shape[0], layout.kv_heads, layout.head_dim
    k = None
    # In place on the unpacked codes: a second large temporary costs more than the arithmetic
    # on CPU, where freshly allocated buffers are page-faulted in on every call.
    if need_k:
        k = _unpack(sec["k_codes"], cfg.bits).view(
            n, h, BLOCK_TOKENS // cfg.k_group, cfg.k_group, d
        )
        k.mul_(sec["k_scale"].float()[:, :, :, None, :]).add_(
            sec["k_zero"].float()[:, :, :, None, :]
        )
        k = k.view(n, h, BLOCK_TOKENS, d)
    v = _unpack(sec["v_codes"], cfg.bits).view(n, h, BLOCK_TOKENS, d // cfg.v_group, cfg.v_group)
    v.mul_(sec["v_scale"].float()[..., None]).add_(sec["v_zero"].float()[..., None])
    return k, v.view(n, h, BLOCK_TOKENS, d)


def _norms_per_token(sec: dict[str, torch.Tensor], layout: PageLayout) -> torch.Tensor | None:
    """Norms broadcastable against [n, H, 128, D] keys, or None."""
    norms = sec.get("norms")
    if norms is None:
        return None
    if layout.config.norm == "token":
        return norms[:, None, :, None]
    return norms[..., None]


def _page_logits(q: torch.Tensor, sec: dict[str, torch.Tensor], layout: PageLayout) -> torch.Tensor:
    """Logits of q [n, H, group, D] (rotated, scaled) against each page's keys, norm included:
    [n, H, group, 128]. The K scale/zero are folded into q so the codes go straight into one
    matmul: q . (c * s + z) = c . (q * s) + q . z per (head, token group)."""
    cfg = layout.config
    n, h, group, d = q.shape
    qt = q.transpose(-1, -2)[:, :, None]  # [n, H, 1, D, group]
    q_scaled = sec["k_scale"].float()[..., None] * qt  # [n, H, KG, D, group]
    q_zero = torch.matmul(sec["k_zero"].float()[:, :, :, None, :], qt)  # [n, H, KG, 1, group]
    codes = _unpack(sec["k_codes"], cfg.bits).view(
        n, h, BLOCK_TOKENS // cfg.k_group, cfg.k_group, d
    )
    logits = torch.matmul(codes, q_scaled).add_(q_zero)  # [n, H, KG, k_group, group]
    logits = logits.view(n, h, BLOCK_TOKENS, group).transpose(-1, -2)
    norms = _norms_per_token(sec, layout)
    if norms is not None:
        logits = logits * norms.transpose(-1, -2)  # [n, 1 or H, 1, 128]
    return logits
