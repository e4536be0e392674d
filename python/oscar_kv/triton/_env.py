"""Whether this process runs the kernels in Triton's interpreter, and a scope that says so.

Triton decides interpreter vs compiled when a function is decorated with ``@triton.jit`` and
consults ``TRITON_INTERPRET`` again lazily inside launches, so both must see the same value.
Where torch has no CUDA device and the user did not choose, the kernels are interpreted:
compiled Triton cannot run there. The variable is only set inside `scope`, so other Triton
users in the process keep their own setting.

The catch: ``triton.language``'s own library functions (``tl.zeros``, ``tl.sum``, ``tl.max``,
``tl.cdiv``, ...) are ``@jit`` functions too, decorated once when ``triton.language`` is first
imported. If another library (SGLang, optimum-quanto) imported it before, with the
interpreter off, they are compiled-mode ``JITFunction``s, which refuse to be called from an
interpreted kernel ("Cannot call @triton.jit'd outside of the scope of a kernel"). Inside
`scope` those are swapped for interpreted twins of the same Python functions, and restored
on exit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

FORCED = "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()
INTERPRETED = FORCED or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _interpreted_twin(fn: object) -> object:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def _compiled_stdlib() -> list[tuple[object, str, object]]:
    """(module, name, function) for each of triton.language's library functions that was
    decorated in compiled mode."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    found = []
    for module in (tl, tl.core, tl.standard, tl.math):
        for name, obj in list(vars(module).items()):
            if type(obj) is JITFunction:
                found.append((module, name, obj))
    return found


@contextlib.contextmanager
def _interpretable_stdlib() -> Iterator[None]:
    swapped = _compiled_stdlib()
    for module, name, obj in swapped:
        setattr(module, name, _interpreted_twin(obj.fn))  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, name, obj in swapped:
            setattr(module, name, obj)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    if not INTERPRETED:
        yield
        return
    set_here = FORCED and os.environ.get("TRITON_INTERPRET") != "1"
    if set_here:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        with _interpretable_stdlib():
            yield
    finally:
        if set_here:
            os.environ.pop("TRITON_INTERPRET", None)


def in_scope(fn):
    """Run a launcher inside `scope`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with scope():
            return fn(*args, **kwargs)

    return wrapper
