"""`PageLayout`: the byte layout of one packed page, shared by every kernel and the pool.

A page is one 128-token quantization block of K and V for all KV heads of one layer, laid
out in sections (codes, scales, zeros, norms) whose offsets come from the Rust core
(``oscar_kv._native.page_sections``): the Python kernels, the C++/CUDA kernels and the Rust
allocator read the same numbers. Every section size is a multiple of 16 bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from oscar_kv import _native
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.ref.hadamard import check_head_dim
from oscar_kv.ref.quant import QuantizedKV

NORM_CODES = {"none": 0, "token": 1, "head": 2}

SECTION_DTYPES = {
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
        for name, dtype in SECTION_DTYPES.items():
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

    @functools.cached_property
    def native_args(self) -> tuple[int, ...]:
        """The layout as the C++ ops (CUDA and CPU) take it: kv_heads, head_dim, bits,
        k_group, v_group, norm code (0 none, 1 token, 2 head), rotate K, rotate V online."""
        cfg = self.config
        return (
            self.kv_heads,
            self.head_dim,
            cfg.bits,
            cfg.k_group,
            cfg.v_group,
            NORM_CODES[cfg.norm],
            int(cfg.rotation == "hadamard"),
            int(cfg.rotates_v_online),
        )

    @staticmethod
    def from_native_args(args: tuple[int, ...] | list[int]) -> PageLayout:
        """Inverse of `native_args` (the torch op schemas carry the layout as these ints)."""
        kv_heads, head_dim, bits, k_group, v_group, norm, rot_k, rot_v = (int(a) for a in args)
        names = {c: n for n, c in NORM_CODES.items()}
        cfg = OscarConfig(
            bits=bits,
            k_group=k_group,
            v_group=v_group,
            norm=names[norm],  # type: ignore[arg-type]
            rotation="hadamard" if rot_k else "none",
            fold_v=bool(rot_k and not rot_v),
        )
        return PageLayout.of(cfg, kv_heads, head_dim)
