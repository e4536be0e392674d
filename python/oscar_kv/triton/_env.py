"""Whether this process runs the kernels in Triton's interpreter, and a scope that says so.

Triton decides interpreter vs compiled when a kernel is decorated and consults
``TRITON_INTERPRET`` again lazily inside launches, so both must see the same value. Where
torch has no CUDA device and the user did not choose, the kernels are interpreted: compiled
Triton cannot run there. The variable is only set inside `scope`, so other Triton users in
the process keep their own setting.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

FORCED = "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()
INTERPRETED = FORCED or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def scope() -> Iterator[None]:
    if not FORCED or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


def in_scope(fn):
    """Run a launcher inside `scope`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with scope():
            return fn(*args, **kwargs)

    return wrapper
