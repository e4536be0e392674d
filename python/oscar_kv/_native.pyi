"""Byte-layout math of oscar-kv's packed KV-cache pages (Rust core, ``rust/oscar-core``).

A page holds 128 tokens of one layer as seven contiguous sections: k_codes, v_codes,
k_scale, k_zero, v_scale, v_zero, norms. Bad arguments raise ValueError naming the argument.
"""

from typing import Final, Literal, TypeAlias

__version__: Final[str]
BLOCK_TOKENS: Final[int]

_Norm: TypeAlias = Literal["token", "head", "none"]

def bytes_per_token(
    kv_heads: int,
    head_dim: int,
    bits: int = 2,
    k_group: int = 32,
    v_group: int = 32,
    norm: _Norm = "token",
) -> float:
    """Bytes per cached token of one layer (page_bytes / 128); 772.0 for (8, 128)."""

def page_bytes(
    kv_heads: int,
    head_dim: int,
    bits: int = 2,
    k_group: int = 32,
    v_group: int = 32,
    norm: _Norm = "token",
) -> int:
    """Bytes of one packed 128-token page of one layer."""

def page_sections(
    kv_heads: int,
    head_dim: int,
    bits: int = 2,
    k_group: int = 32,
    v_group: int = 32,
    norm: _Norm = "token",
) -> list[tuple[str, int, int]]:
    """The seven sections of a page as (name, offset, nbytes), in storage order."""

def bf16_bytes_per_token(kv_heads: int, head_dim: int) -> int:
    """Bytes per token of one layer of a bf16 cache: 4 * kv_heads * head_dim."""
