"""Sink pages: a sequence's first page held wider than the others, in the paged pool.

``OscarConfig(sink_bits=4)`` quantizes the first page of every sequence (the attention-sink
tokens) at 4 bits, ``sink_bits=16`` keeps it exact (in the residual pages' 16-bit dtype);
every other page stays at ``bits``. Where it lives: the pool has one width of row (the
`PageLayout` of ``config.page_config``); a sink page is wider, so it spans its own row (the
page id SGLang's location space names) plus ``companions`` more rows of the same arena that
the allocator takes with the first page and frees with it. ``table[page]`` (int32
[pages + 1, companions], on the device) lists them; the sink page's bytes are the rows'
bytes end to end, cut at ``sink_bytes`` (`gather` / `scatter`). So both kinds come out of
the one page budget, and the radix tree shares a first page, companions and all, like any
page.

Attention over a request with a sink page is two parts merged by their log-sum-exp: the
backend's kernel over pages 1.. (+ the residual page and, for extend, the new tokens), and
`attend_decode` / `attend_extend` here over the first page, dequantized once per layer
(the backend's own dequantize op at ``sink_bits``), in plain torch. The merge is exact
(softmax over the union of the two key sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from oscar_kv import ops
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.layout import PageLayout
from oscar_kv.paged import PagedKV

T = BLOCK_TOKENS
# Rows per chunk of extend queries gathered against their request's sink page: bounds the
# gathered K/V at chunk x 128 x H x D fp32 (256 rows, 8 x 128: 128 MiB).
EXTEND_CHUNK = 256


@dataclass(frozen=True)
class SinkLayout:
    """How a sink page of ``config`` (which has ``sink_bits``) sits in rows of ``page``."""

    config: OscarConfig
    page: PageLayout  # every page but a sequence's first
    sink: PageLayout | None  # the first page's layout; None: exact (sink_bits 16)
    exact_dtype: torch.dtype  # sink_bits 16: the dtype the exact page is held in
    sink_bytes: int
    companions: int

    @staticmethod
    def of(
        config: OscarConfig, kv_heads: int, head_dim: int, exact_dtype: torch.dtype
    ) -> SinkLayout | None:
        """None when ``config`` has no sink page."""
        if config.sink_bits is None:
            return None
        page = PageLayout.of(config.page_config, kv_heads, head_dim)
        sink_cfg = config.sink_config
        sink = None if sink_cfg is None else PageLayout.of(sink_cfg, kv_heads, head_dim)
        if sink is None:
            elt = torch.empty((), dtype=exact_dtype).element_size()
            nbytes = 2 * T * kv_heads * head_dim * elt
        else:
            nbytes = sink.page_bytes
        rows = -(-nbytes // page.page_bytes)
        return SinkLayout(config, page, sink, exact_dtype, nbytes, rows - 1)

    @property
    def rows(self) -> int:
        return 1 + self.companions

    # -- bytes -----------------------------------------------------------------------
    def row_ids(self, first: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """long [n, rows]: each sink page's own row then its companions (``first`` < 0:
        row 0, SGLang's padding page, for every row)."""
        first = first.long()
        valid = first >= 0
        own = torch.where(valid, first, torch.zeros_like(first))
        comp = table[own].long()[:, : self.companions]
        ids = torch.cat((own[:, None], comp), dim=1)
        return torch.where(valid[:, None], ids, torch.zeros_like(ids))

    def gather(self, pages: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """uint8 [n, sink_bytes]: the sink pages whose rows are ``rows`` [n, rows]."""
        n = rows.shape[0]
        return pages[rows.reshape(-1)].reshape(n, -1)[:, : self.sink_bytes]

    def scatter(self, pages: torch.Tensor, rows: torch.Tensor, data: torch.Tensor) -> None:
        """Writes sink pages ``data`` [n, sink_bytes] into their rows (the last row's unused
        end is zeroed: a companion row holds nothing else)."""
        n, width = rows.shape[0], self.rows * self.page.page_bytes
        padded = torch.zeros((n, width), dtype=torch.uint8, device=pages.device)
        padded[:, : self.sink_bytes] = data
        pages.index_copy_(0, rows.reshape(-1), padded.view(n * self.rows, -1))

    # -- quantize / dequantize -----------------------------------------------------------
    def quantize(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        pages: torch.Tensor,
        first: torch.Tensor,
        table: torch.Tensor,
        *,
        src_index: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        """Completed first pages into their sink pages: block ``src_index[i]`` (default i)
        of k, v [n_src, 128, H, D] goes to the sink page of page ``first[i]``; ``first[i] <
        0`` writes nothing that is read (its bytes go to the padding page 0), so a caller
        can pass a fixed grid, as `oscar_kv.ops.quantize_page` takes."""
        n = first.shape[0]
        dev = pages.device
        src = torch.arange(n, device=dev) if src_index is None else src_index.long()
        if self.sink is None:
            kk = k[src].to(self.exact_dtype).reshape(n, -1).view(torch.uint8)
            vv = v[src].to(self.exact_dtype).reshape(n, -1).view(torch.uint8)
            data = torch.cat((kk, vv), dim=1)
        else:
            data = torch.zeros((n, self.sink_bytes), dtype=torch.uint8, device=dev)
            ids = torch.arange(n, dtype=torch.int32, device=dev)
            ids = torch.where(first >= 0, ids, torch.full_like(ids, -1))
            ops.quantize_page(k, v, data, ids, self.sink.config, src_index=src, backend=backend)
        self.scatter(pages, self.row_ids(first, table), data)

    def dequantize(
        self,
        pages: torch.Tensor,
        first: torch.Tensor,
        table: torch.Tensor,
        *,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 K, V [n, 128, H, D] in the model's basis of the sink pages of ``first``
        (entries < 0 give the padding page's garbage: mask them)."""
        data = self.gather(pages, self.row_ids(first, table))
        n, h, d = data.shape[0], self.page.kv_heads, self.page.head_dim
        if self.sink is None:
            half = self.sink_bytes // 2
            k = data[:, :half].contiguous().view(self.exact_dtype).view(n, T, h, d)
            v = data[:, half:].contiguous().view(self.exact_dtype).view(n, T, h, d)
            return k.float(), v.float()
        ids = torch.arange(n, dtype=torch.int32, device=pages.device)
        return ops.dequantize_pages(data, ids, self.sink.config, h, d, backend=backend)


# ------------------------------------------------------------------------------- attention


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hq, D] each against its own 128 keys k, v [n, 128, H, D] (fp32): out
    [n, Hq, D] fp32 and lse [n, Hq]."""
    n, hq, d = q.shape
    h = k.shape[2]
    qg = q.float().view(n, h, hq // h, d)
    logits = torch.einsum("nhgd,nthd->nhgt", qg, k) * scale
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse[..., None])
    out = torch.einsum("nhgt,nthd->nhgd", p, v)
    return out.reshape(n, hq, d), lse.reshape(n, hq)


def attend_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode query b [B, Hq, D] over request b's sink page k, v [B, 128, H, D]; lse is
    -inf where ``has[b]`` is False (no sink page yet), so the merge ignores that part."""
    out, lse = _attend(q, k, v, scale)
    return out, torch.where(has[:, None], lse, torch.full_like(lse, -math.inf))


def attend_extend(
    q: torch.Tensor,
    row_req: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    has: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend rows q [N, Hq, D], row i of request ``row_req[i]``, over that request's sink
    page (every new token follows the whole first page, so no mask); chunks of
    `EXTEND_CHUNK` rows bound the gathered K/V (the row count is host-known)."""
    n = q.shape[0]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for lo in range(0, n, EXTEND_CHUNK):
        r = row_req[lo : lo + EXTEND_CHUNK]
        out[lo : lo + EXTEND_CHUNK], lse[lo : lo + EXTEND_CHUNK] = _attend(
            q[lo : lo + EXTEND_CHUNK], k[r], v[r], scale
        )
    lse = torch.where(has[row_req][:, None], lse, torch.full_like(lse, -math.inf))
    return out, lse


def merge(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    a_empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over the union of two key sets from each set's output and lse
    ([n, Hq, D], [n, Hq]); part b may be empty (lse -inf); rows where ``a_empty`` [n] is
    True take part b alone. Returns out_a's dtype."""
    m = torch.maximum(lse_a, lse_b)
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    o = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / (wa + wb)[..., None]
    if a_empty is not None:
        o = torch.where(a_empty[:, None, None], out_b.float(), o)
    return o.to(out_a.dtype)


def main_view(kv: PagedKV) -> tuple[PagedKV, torch.Tensor]:
    """``kv`` without each request's first page: what the backend kernel reads when the
    first page is a sink page (device ops only; graph-safe), and which requests that leaves
    with no key at all (a decode query that just completed its first page: every key it
    reads is in the sink page). Those read one stand-in key (residual row 0, finite) so no
    kernel meets an empty set; `merge` drops their part."""
    pt = kv.page_table[:, 1:].contiguous() if kv.page_table.shape[1] > 1 else kv.page_table
    pages = (kv.num_pages - 1).clamp(min=0)
    empty = (pages == 0) & (kv.tail_len == 0)
    tail = torch.where(empty, torch.ones_like(kv.tail_len), kv.tail_len)
    return kv.with_batch(page_table=pt, num_pages=pages, tail_len=tail), empty
