"""oscar-kv: a 2-bit KV cache for SGLang using OScaR (Hadamard rotation + token-norm scaling)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from oscar_kv.config import BLOCK_TOKENS, OscarConfig

__version__ = "0.1.0"
__all__ = ["BLOCK_TOKENS", "MissingExtraError", "OscarConfig", "__version__"]


class MissingExtraError(ImportError):
    """A feature's optional dependency is not installed; the message names the extra to install.

    The core package (``--kv-quant oscar`` serving) needs only torch, numpy and ninja; the
    transformers caches, the eval harnesses and CPU GGUF serving need the ``hf``, ``eval`` and
    ``cpu`` extras.
    """


@contextmanager
def _needs_extra(extra: str, feature: str) -> Iterator[None]:
    """Turn a missing third-party module imported in the block into a `MissingExtraError`
    whose message says ``pip install "oscar-kv[<extra>]"``."""
    try:
        yield
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if not top or top == "oscar_kv":
            raise
        raise MissingExtraError(
            f"{feature} needs the {top!r} package, which is not installed; it comes with "
            f'oscar-kv\'s "{extra}" extra: pip install "oscar-kv[{extra}]"',
            name=e.name,
        ) from e
