"""oscar-kv: a 2-bit KV cache for SGLang using OScaR (Hadamard rotation + token-norm scaling)."""

from oscar_kv.config import BLOCK_TOKENS, OscarConfig

__version__ = "0.1.0"
__all__ = ["BLOCK_TOKENS", "OscarConfig", "__version__"]
