"""Where one forward's tokens are read from and written to, built on the device once per forward.

Everything here is tensor arithmetic on the KV pool's device with shapes known on the host
before the forward (batch size, the page-table width, and the token and completed-page
counts SGLang already holds as host lists): no ``.item()``, ``.tolist()``, ``nonzero()`` or
Python loop over requests, so a decode step's metadata can be recorded into a CUDA graph and
re-run by its replay, and the SGLang backend runs whole forwards on ``meta`` tensors in tests.

Inputs are SGLang's: ``req_to_token`` [slots, context] (token locations; page id = location of
a page's first token // 128), the request slots of the batch and their lengths, and the pool's
``residual_of_slot`` map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import BLOCK_TOKENS

T = BLOCK_TOKENS


@dataclass(frozen=True)
class BatchPages:
    """The `oscar_kv.paged.PagedKV` batch fields of one forward (all int32 [B], page_table
    [B, W]): what the attention reads before this forward's tokens are added."""

    page_table: torch.Tensor
    num_pages: torch.Tensor
    tail_len: torch.Tensor
    tail_index: torch.Tensor


@dataclass(frozen=True)
class DecodePlan:
    """Where a decode step's one new token per request goes."""

    residual: torch.Tensor  # long [B]: the request's residual page
    pos: torch.Tensor  # long [B]: the token's position in it
    done_pages: torch.Tensor  # int32 [B]: packed page it completes, -1 if none
    # int32 [B]: with sink pages, the first page it completes (then done_pages is -1), else -1
    done_sink: torch.Tensor


@dataclass(frozen=True)
class ExtendPlan:
    """Where an extend batch's new tokens go. Sources index ``cat(residual rows, new rows)``:
    row ``b * 128 + t`` is token t of request b's residual page before the forward, row
    ``B * 128 + i`` is new token i."""

    residual: torch.Tensor  # long [B]
    page_src: torch.Tensor  # long [M * 128]: the tokens of each completed page
    page_ids: torch.Tensor  # int32 [M]: the packed page each is quantized into (-1: none)
    residual_src: torch.Tensor  # long [B * 128]: each residual page after the forward
    # With sink pages: the completed blocks that are a sequence's first page (long [S],
    # indices into the M blocks; their page_ids entries are -1) and their pages (int32 [S]).
    sink_blocks: torch.Tensor
    sink_first: torch.Tensor


def page_table(
    req_to_token: torch.Tensor, slots: torch.Tensor, width: int, device: torch.device
) -> torch.Tensor:
    """int32 [B, width]: page ids of each request's first ``width`` pages (columns past a
    request's pages hold whatever ``req_to_token`` holds there; kernels never read them)."""
    cols = req_to_token[slots.to(req_to_token.device).long(), : width * T : T]
    return (cols // T).to(device=device, dtype=torch.int32)


def table_width(max_seq_len: int) -> int:
    """Page-table columns for a batch whose longest request holds ``max_seq_len`` tokens."""
    return max(1, -(-max_seq_len // T))


def decode(
    req_to_token: torch.Tensor,
    residual_of_slot: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    width: int,
    *,
    sink: bool = False,
) -> tuple[BatchPages, DecodePlan]:
    """A decode step: request b in slot ``slots[b]`` holds ``seq_lens[b]`` tokens including
    the new one. The attention reads the pages and residual page as they are after the new
    token is stored (and its page quantized if the token completes it). ``sink``: a
    completed first page goes to ``done_sink``, not ``done_pages``."""
    dev = residual_of_slot.device
    slots_l = slots.to(dev).long()
    seq = seq_lens.to(dev).long()
    pre = seq - 1
    pos = pre % T
    res = residual_of_slot[slots_l]
    first_loc = req_to_token[slots_l.to(req_to_token.device), (pre - pos).to(req_to_token.device)]
    first_loc = first_loc.to(dev).long()
    none = torch.full_like(first_loc, -1)
    done = torch.where(pos == T - 1, first_loc // T, none)
    done_sink = none
    if sink:
        is_first = pre - pos == 0
        done_sink = torch.where(is_first, done, none)
        done = torch.where(is_first, none, done)
    pages = BatchPages(
        page_table=page_table(req_to_token, slots_l, width, dev),
        num_pages=(seq // T).to(torch.int32),
        tail_len=(seq % T).to(torch.int32),
        tail_index=res,
    )
    plan = DecodePlan(
        residual=res.long(),
        pos=pos,
        done_pages=done.to(torch.int32),
        done_sink=done_sink.to(torch.int32),
    )
    return pages, plan


def extend(
    req_to_token: torch.Tensor,
    residual_of_slot: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    new_lens: torch.Tensor,
    new_lens_host: list[int],
    seq_lens_host: list[int],
    width: int,
    *,
    sink: bool = False,
) -> tuple[BatchPages, torch.Tensor, ExtendPlan]:
    """An extend (or mixed) batch: request b holds ``seq_lens[b]`` tokens after the forward,
    the last ``new_lens[b]`` of them new. Returns the pages the attention reads (the cached
    prefix), cu_seqlens (int32 [B + 1]) and the store plan. The host lists give the output
    sizes (completed pages), never the data. ``sink``: completed first pages are listed in
    ``sink_blocks`` / ``sink_first`` (which blocks they are is host-known too)."""
    dev = residual_of_slot.device
    b = len(new_lens_host)
    slots_l = slots.to(dev).long()
    seq = seq_lens.to(dev).long()
    new = new_lens.to(dev).long()
    pre = seq - new
    res = residual_of_slot[slots_l]
    cu = torch.zeros(b + 1, dtype=torch.long, device=dev)
    torch.cumsum(new, 0, out=cu[1:])
    n_pages = sum(s // T - (s - n) // T for s, n in zip(seq_lens_host, new_lens_host, strict=True))
    t = torch.arange(T, device=dev)
    reqs = torch.arange(b, device=dev)

    # Completed pages: request of each, its page index, then the source row of each token.
    counts = seq // T - pre // T
    req_of = torch.repeat_interleave(reqs, counts, output_size=n_pages)
    first = torch.cumsum(counts, 0) - counts
    page_no = pre[req_of] // T + torch.arange(n_pages, device=dev) - first[req_of]
    pos = page_no[:, None] * T + t[None, :]  # [M, 128] absolute positions
    pre_m = pre[req_of][:, None]
    from_res = req_of[:, None] * T + pos % T
    from_new = b * T + cu[req_of][:, None] + pos - pre_m
    page_src = torch.where(pos < pre_m, from_res, from_new).reshape(-1)
    loc = req_to_token[
        slots_l[req_of].to(req_to_token.device), (page_no * T).to(req_to_token.device)
    ]
    page_ids = (loc.to(dev) // T).to(torch.int32)
    blocks: list[int] = []
    if sink:
        at = 0
        for s, n in zip(seq_lens_host, new_lens_host, strict=True):
            if s - n < T <= s:
                blocks.append(at)
            at += s // T - (s - n) // T
    if blocks:
        sink_blocks = torch.tensor(blocks, dtype=torch.long).to(dev)
        sink_first = page_ids[sink_blocks]
        page_ids = page_ids.index_fill(0, sink_blocks, -1)
    else:  # no host-to-device copy when no first page completes
        sink_blocks = torch.empty(0, dtype=torch.long, device=dev)
        sink_first = torch.empty(0, dtype=torch.int32, device=dev)

    # Each residual page after the forward: positions from the last page's start; tokens at
    # or past the old prefix are new, the others keep their row (old or unused).
    last = (seq // T * T)[:, None] + t[None, :]  # [B, 128]
    is_new = (last >= pre[:, None]) & (last < seq[:, None])
    keep = reqs[:, None] * T + t[None, :]
    take = b * T + cu[:-1, None] + last - pre[:, None]
    residual_src = torch.where(is_new, take, keep).reshape(-1)

    pages = BatchPages(
        page_table=page_table(req_to_token, slots_l, width, dev),
        num_pages=(pre // T).to(torch.int32),
        tail_len=(pre % T).to(torch.int32),
        tail_index=res,
    )
    plan = ExtendPlan(
        residual=res.long(),
        page_src=page_src,
        page_ids=page_ids,
        residual_src=residual_src,
        sink_blocks=sink_blocks,
        sink_first=sink_first,
    )
    return pages, cu.to(torch.int32), plan
