"""Plain-torch reference of every oscar-kv op: the single source of truth for the kernels.

The packed page layout is documented once, in `oscar_kv.ref.quant`.
"""

from oscar_kv.config import BLOCK_TOKENS
from oscar_kv.ref.attention import attention
from oscar_kv.ref.hadamard import fold_v_hadamard, fwht, hadamard_matrix
from oscar_kv.ref.quant import (
    QuantizedKV,
    dequantize_kv,
    dequantize_pages,
    pack_codes,
    quantize_kv,
    unpack_codes,
)

__all__ = [
    "BLOCK_TOKENS",
    "QuantizedKV",
    "attention",
    "dequantize_kv",
    "dequantize_pages",
    "fold_v_hadamard",
    "fwht",
    "hadamard_matrix",
    "pack_codes",
    "quantize_kv",
    "unpack_codes",
]
