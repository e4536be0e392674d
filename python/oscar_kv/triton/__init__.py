"""Triton kernels of oscar-kv; on a machine without CUDA they run in Triton's interpreter
on CPU tensors (see `oscar_kv.triton._env`)."""

from __future__ import annotations

from oscar_kv.triton._env import INTERPRETED, scope

with scope():
    from oscar_kv.triton.api import (
        decode_attention,
        decode_splits,
        dequantize_pages,
        extend_attention,
        extend_work,
        fwht,
        quantize_pages,
    )
    from oscar_kv.triton.bf16 import bf16_decode_attention

__all__ = [
    "INTERPRETED",
    "bf16_decode_attention",
    "decode_attention",
    "decode_splits",
    "dequantize_pages",
    "extend_attention",
    "extend_work",
    "fwht",
    "quantize_pages",
]
