"""Tests of the Rust layout math through the ``oscar_kv._native`` binding."""

import itertools
import re

import pytest

from oscar_kv import _native as n

SECTION_NAMES = ["k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "norms"]
HEAD_DIMS = [16, 32, 64, 128, 256]


def valid_configs():
    for kv_heads, head_dim, bits, k_group, v_group, norm in itertools.product(
        [1, 3, 8], HEAD_DIMS, [2, 4], [32, 64, 128], [16, 32, 64, 128], ["token", "head", "none"]
    ):
        if head_dim % v_group == 0:
            yield kv_heads, head_dim, bits, k_group, v_group, norm


def test_module_constants():
    assert n.BLOCK_TOKENS == 128
    assert n.__version__ == "0.1.0"


def test_design_numbers():
    assert n.bytes_per_token(8, 128) == 772.0
    assert n.bytes_per_token(8, 128, bits=2, k_group=32, v_group=32, norm="token") == 772.0
    assert n.bytes_per_token(8, 128, k_group=128) == 676.0
    assert n.page_bytes(8, 128) == 772 * 128
    assert n.bf16_bytes_per_token(8, 128) == 4096
    assert n.bf16_bytes_per_token(8, 128) / n.bytes_per_token(8, 128) > 5.3
    assert n.bytes_per_token(8, 128, norm="head") == 768 + 4 * 8
    assert n.bytes_per_token(8, 128, norm="none") == 768
    assert n.bytes_per_token(8, 128, bits=4) == 512 + 512 + 128 + 128 + 4


def test_sections_of_design_config():
    sections = n.page_sections(8, 128)
    per_token = {name: nbytes / 128 for name, _, nbytes in sections}
    assert per_token == {
        "k_codes": 256,
        "v_codes": 256,
        "k_scale": 64,
        "k_zero": 64,
        "v_scale": 64,
        "v_zero": 64,
        "norms": 4,
    }


def test_sections_contiguous_for_every_valid_config():
    configs = list(valid_configs())
    assert len(configs) == 3 * 14 * 2 * 3 * 3  # heads x (head_dim, v_group) x bits x k_group x norm
    for cfg in configs:
        sections = n.page_sections(*cfg)
        assert [name for name, _, _ in sections] == SECTION_NAMES, cfg
        end = 0
        for name, offset, nbytes in sections:
            assert isinstance(offset, int) and isinstance(nbytes, int), (cfg, name)
            assert offset == end, (cfg, name)
            end = offset + nbytes
        assert end == n.page_bytes(*cfg), cfg
        assert n.bytes_per_token(*cfg) == end / 128, cfg
        assert (sections[-1][2] == 0) == (cfg[-1] == "none"), cfg


def test_keywords_match_positional():
    assert n.page_sections(4, 64, 4, 64, 16, "head") == n.page_sections(
        kv_heads=4, head_dim=64, bits=4, k_group=64, v_group=16, norm="head"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_heads": 0}, "kv_heads must be in 1..=65536, got 0"),
        ({"head_dim": 96}, "head_dim must be a power of two in 16..=256, got 96"),
        ({"head_dim": 512}, "head_dim must be a power of two in 16..=256, got 512"),
        ({"head_dim": 8}, "head_dim must be a power of two in 16..=256, got 8"),
        ({"bits": 3}, "bits must be 2 or 4, got 3"),
        ({"bits": 8}, "bits must be 2 or 4, got 8"),
        ({"k_group": 16}, "k_group must be 32, 64 or 128"),
        ({"k_group": 256}, "k_group must be 32, 64 or 128"),
        ({"v_group": 48}, "v_group must be 16, 32, 64 or 128 and divide head_dim (128), got 48"),
        ({"head_dim": 32, "v_group": 64}, "v_group must be 16, 32, 64 or 128 and divide head_dim"),
        ({"norm": "Token"}, "norm must be 'token', 'head' or 'none', got 'Token'"),
        ({"kv_heads": -1}, "kv_heads out of range, got -1"),
        ({"head_dim": -128}, "head_dim out of range, got -128"),
        ({"bits": -2}, "bits out of range, got -2"),
        ({"bits": 2**40}, "bits out of range"),
    ],
)
@pytest.mark.parametrize("fn", [n.bytes_per_token, n.page_bytes, n.page_sections])
def test_bad_argument_raises_value_error_naming_it(fn, kwargs, message):
    args = {"kv_heads": 8, "head_dim": 128} | kwargs
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        fn(**args)


def test_bf16_bad_argument():
    with pytest.raises(ValueError, match="^kv_heads out of range, got -1"):
        n.bf16_bytes_per_token(-1, 128)
    with pytest.raises(ValueError, match="out of range"):
        n.bf16_bytes_per_token(2**62, 2**62)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError):
        n.bytes_per_token("8", 128)
    with pytest.raises(TypeError):
        n.bytes_per_token(8, 128, norm=None)
