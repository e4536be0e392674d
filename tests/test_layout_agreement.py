"""The Rust layout math (oscar_kv._native) and the reference's packed pages agree byte for byte."""

from __future__ import annotations

import itertools

import pytest
import torch

from oscar_kv import OscarConfig
from oscar_kv import _native as native
from oscar_kv.ref import quantize_kv

SECTIONS = ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "norms")


@pytest.mark.parametrize(
    ("heads", "dim", "bits", "k_group", "norm"),
    list(
        itertools.product(
            [1, 3, 8], [64, 128, 256], [2, 4], [32, 64, 128], ["token", "head", "none"]
        )
    ),
)
def test_reference_page_bytes_match_rust(
    heads: int, dim: int, bits: int, k_group: int, norm: str
) -> None:
    cfg = OscarConfig(bits=bits, k_group=k_group, norm=norm)  # type: ignore[arg-type]
    k = torch.randn(128 + 5, heads, dim)
    qkv = quantize_kv(k, torch.randn_like(k), cfg)
    args = (heads, dim, bits, k_group, cfg.v_group, norm)
    assert qkv.page_nbytes == native.page_bytes(*args)
    assert qkv.page_nbytes / 128 == native.bytes_per_token(*args)
    assert qkv.nbytes == native.page_bytes(*args) + 2 * 5 * heads * dim * 4
    sections = {name: (off, n) for name, off, n in native.page_sections(*args)}
    raw = qkv.packed_pages()[0]
    for name in SECTIONS:
        t = getattr(qkv, name)
        off, n = sections[name]
        if t is None:
            assert n == 0
            continue
        assert n == t[0].numel() * t.element_size()
        assert torch.equal(raw[off : off + n], t[0].contiguous().view(torch.uint8).flatten())


def test_design_card_numbers() -> None:
    """H=8, D=128, 2 bits, G=32: 772 B/token vs 4096 B bf16 (5.3x); G=128: 676 B."""
    k = torch.randn(128, 8, 128)
    assert quantize_kv(k, k, OscarConfig()).page_nbytes / 128 == 772
    assert quantize_kv(k, k, OscarConfig(k_group=128)).page_nbytes / 128 == 676
    assert native.bf16_bytes_per_token(8, 128) / 772 > 5.3
