"""`PagedKV`: one batch's view of a paged OScaR cache, the one argument every attention op reads.

Per request ``b`` the cache is ``num_pages[b]`` full packed pages listed in
``page_table[b, :]`` (int32 page ids, oldest first; row ``p`` of ``pages[layer]`` holds page
``p`` in the `oscar_kv.layout.PageLayout` byte layout), then ``tail_len[b]`` (0..127) exact
tokens in residual page ``tail_index[b]`` of ``k_res/v_res[layer]`` ([R, 128, H_kv, D],
16-bit). A decode query is the last token of its request: its own K/V must already be in the
residual page (or be the last token of the last page).

The pool tensors hold every layer (``pages`` [L, P, page_bytes], ``k_res``/``v_res``
[L, R, 128, H, D]); a single-layer cache is L = 1 (`PagedKV.single_layer`). The batch fields
are built once per forward on the pool's device and read by every layer. For a CUDA graph
the batch fields are views of persistent ``[max_bs, max_pages]`` buffers and ``num_splits``
is fixed when the graph is captured, so a replay only rewrites buffer contents.

Decode scratch (the split-KV partial outputs the LSE merge reads) is allocated once per
forward by `with_decode_scratch`, not per layer, and is part of the captured graph's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from oscar_kv.config import BLOCK_TOKENS
from oscar_kv.layout import PageLayout


@dataclass(frozen=True)
class DecodeScratch:
    """Split-KV partial results of one decode forward: ``mid_o`` [B, Hq, splits + 1, D] and
    ``mid_ml`` [2, B, Hq, splits + 1] (running max and sum, fp32); one extra split holds the
    residual page."""

    mid_o: torch.Tensor
    mid_ml: torch.Tensor


@dataclass(frozen=True)
class PagedKV:
    layout: PageLayout
    pages: torch.Tensor  # uint8 [L, P, page_bytes]
    k_res: torch.Tensor  # [L, R, 128, H_kv, D]
    v_res: torch.Tensor
    page_table: torch.Tensor  # int32 [B, W]
    num_pages: torch.Tensor  # int32 [B]
    tail_len: torch.Tensor  # int32 [B]
    tail_index: torch.Tensor  # int32 [B]
    num_splits: int | None = None  # decode split count; None: the kernel's default
    scratch: DecodeScratch | None = None
    # Extend work list for the Triton extend kernel: int32 [2, n] (request, first new row),
    # built on the host from host-known lengths once per forward; None: built per call.
    extend_work: torch.Tensor | None = None
    extend_rows: int = 0  # new-token rows per work item the list was built for

    @staticmethod
    def single_layer(
        layout: PageLayout,
        pool: torch.Tensor,
        k_tail: torch.Tensor,
        v_tail: torch.Tensor,
        page_table: torch.Tensor,
        num_pages: torch.Tensor,
        tail_len: torch.Tensor,
        tail_index: torch.Tensor | None = None,
        *,
        num_splits: int | None = None,
    ) -> PagedKV:
        """A one-layer cache from a pool [P, page_bytes] and tails [R, 128, H, D] (the
        index tensors are converted to int32 on the pool's device); ``tail_index`` defaults
        to ``arange(B)`` (request b's tail at row b)."""
        dev = pool.device
        if tail_index is None:
            tail_index = torch.arange(page_table.shape[0], dtype=torch.int32, device=dev)

        def i32(t: torch.Tensor) -> torch.Tensor:
            if t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"index tensors must be int32 or int64, got {t.dtype}")
            return t.to(device=dev, dtype=torch.int32).contiguous()

        kv = PagedKV(
            layout=layout,
            pages=pool.unsqueeze(0),
            k_res=k_tail.unsqueeze(0),
            v_res=v_tail.unsqueeze(0),
            page_table=i32(page_table),
            num_pages=i32(num_pages),
            tail_len=i32(tail_len),
            tail_index=i32(tail_index),
            num_splits=num_splits,
        )
        kv.check()
        return kv

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pages.device

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s packed pages [P, page_bytes] and residual pages K, V."""
        return self.pages[i], self.k_res[i], self.v_res[i]

    def with_batch(self, **fields: object) -> PagedKV:
        return replace(self, **fields)  # type: ignore[arg-type]

    def with_decode_scratch(self, q_heads: int, splits: int) -> PagedKV:
        """This view with split-KV scratch for ``splits`` splits allocated (once per forward)."""
        b, d = self.batch, self.layout.head_dim
        dev = self.device
        scratch = DecodeScratch(
            mid_o=torch.empty((b, q_heads, splits + 1, d), dtype=torch.float32, device=dev),
            mid_ml=torch.empty((2, b, q_heads, splits + 1), dtype=torch.float32, device=dev),
        )
        return replace(self, num_splits=splits, scratch=scratch)

    def check(self) -> None:
        """Shapes, dtypes and devices of every field; raises ValueError naming the field."""
        lay = self.layout
        if self.pages.dtype != torch.uint8 or self.pages.dim() != 3:
            raise ValueError(f"pages must be uint8 [layers, num_pages, {lay.page_bytes}]")
        if self.pages.shape[2] != lay.page_bytes:
            raise ValueError(f"pool rows must be {lay.page_bytes} bytes, got {self.pages.shape[2]}")
        if self.pages.stride(2) != 1 or self.pages.stride(1) % 16:
            raise ValueError(
                "pool rows must be contiguous with a row stride that is a multiple of 16"
            )
        want = (BLOCK_TOKENS, lay.kv_heads, lay.head_dim)
        for name, t in (("k_tail", self.k_res), ("v_tail", self.v_res)):
            if t.dim() != 5 or tuple(t.shape[2:]) != want:
                shape = tuple(t.shape[1:]) if t.dim() == 5 else tuple(t.shape)
                raise ValueError(
                    f"{name} must be [slots, {', '.join(map(str, want))}], got {shape}"
                )
        b = self.batch
        if self.page_table.dim() != 2:
            raise ValueError(
                f"page_table must be [{b}, max_pages], got {tuple(self.page_table.shape)}"
            )
        for name in ("num_pages", "tail_len", "tail_index"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != b:
                raise ValueError(f"{name} must be 1-D of length {b}, got {tuple(t.shape)}")
        for name in ("page_table", "num_pages", "tail_len", "tail_index"):
            if getattr(self, name).dtype != torch.int32:
                raise ValueError(f"{name} must be int32, got {getattr(self, name).dtype}")
        dev = self.device
        for name in ("k_res", "v_res", "page_table", "num_pages", "tail_len", "tail_index"):
            if getattr(self, name).device != dev:
                raise ValueError(
                    f"{name} is on {getattr(self, name).device}, the pool on {dev}: every "
                    "tensor of a PagedKV lives on the pool's device"
                )
