"""The Triton interpreter scope works even when ``triton.language`` was imported first, with the
interpreter off, by another library (SGLang and optimum-quanto do this): its library
functions (``tl.zeros``, ``tl.sum``, ...) are then compiled-mode and must be swapped for the
launch. Runs in a fresh interpreter without ``TRITON_INTERPRET`` (the user's situation)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only interpreter path")

SCRIPT = """
import torch
import triton.language as tl  # first, with the interpreter off
from triton.runtime.jit import JITFunction
assert type(tl.zeros) is JITFunction, type(tl.zeros)
from oscar_kv import OscarConfig, ops
from oscar_kv.layout import PageLayout
from oscar_kv.ref import quantize_kv
cfg = OscarConfig(bits=2)
k = torch.randn(2, 128, 2, 64)
v = torch.randn_like(k)
layout = PageLayout.of(cfg, 2, 64)
pool = layout.alloc_pool(3)
ops.quantize_page(k, v, pool, torch.tensor([1, 2], dtype=torch.int32), cfg, backend="triton")
want = quantize_kv(k.reshape(256, 2, 64), v.reshape(256, 2, 64), cfg).packed_pages()
assert torch.equal(pool[1:], want), "pages differ from the reference"
assert type(tl.zeros) is JITFunction, "the swap must be undone after the launch"
print("ok")
"""


def test_interpreter_scope_after_triton_language_was_imported() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
