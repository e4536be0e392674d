"""Build the oscar-kv CUDA extension on first use and register ``torch.ops.oscar_kv``.

Sources and build cache: `oscar_kv._build` (``oscar_kv/csrc``, ``~/.cache/oscar_kv``); the key
covers the sources, torch's version and CUDA version and the target architectures, so a
change of any of them rebuilds. Needs a CUDA build of torch and nvcc (``CUDA_HOME``); without
a device set ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0a").
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from oscar_kv import _build
from oscar_kv.layout import PageLayout
from oscar_kv.paged import PagedKV

_SOURCES = ("oscar_kv_ops.cu", "torch_bindings.cpp")


def _source_files(root: Path) -> list[Path]:
    return [root / s for s in _SOURCES] + _build.headers(root) + [root / "oscar_kv_ops.h"]


def build_key(root: Path | None = None) -> str:
    root = root or _build.csrc_dir()
    return _build.build_key(
        _source_files(root),
        torch.__version__,
        str(torch.version.cuda),
        os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
    )


class CudaOps:
    """Python face of ``torch.ops.oscar_kv``: takes `PageLayout` / `PagedKV` and passes the
    schema's flat arguments (order as in oscar_kv_ops.h)."""

    def __init__(self) -> None:
        self._ops = torch.ops.oscar_kv

    def quantize_pages(self, k, v, src_index, page_ids, pool, layout: PageLayout) -> None:
        self._ops.quantize_pages(k, v, src_index, page_ids, pool, *layout.native_args)

    def decode_attention(
        self, q: torch.Tensor, kv: PagedKV, layer: int, scale: float, num_splits: int
    ) -> torch.Tensor:
        return self.decode_attention_lse(q, kv, layer, scale, num_splits, None)

    def decode_attention_lse(
        self,
        q: torch.Tensor,
        kv: PagedKV,
        layer: int,
        scale: float,
        num_splits: int,
        lse: torch.Tensor | None,
    ) -> torch.Tensor:
        """`decode_attention` that also writes each query head's log-sum-exp of its scaled
        logits (natural log) into ``lse`` (fp32 [B, Hq]) when given."""
        pool, k_tail, v_tail = kv.layer(layer)
        return self._ops.decode_attention(
            q, pool, kv.page_table, kv.num_pages, k_tail, v_tail, kv.tail_index, kv.tail_len,
            float(scale), int(num_splits), *kv.layout.native_args, lse,
        )  # fmt: skip

    def dequantize_pages(
        self, pool: torch.Tensor, page_ids: torch.Tensor, layout: PageLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ops.dequantize_pages(pool, page_ids, *layout.native_args)

    def rotate_q(self, q: torch.Tensor) -> torch.Tensor:
        return self._ops.rotate_q(q)


@functools.cache
def load(verbose: bool = False) -> CudaOps:
    """Build (once per key) and load the extension; raises if torch has no CUDA or nvcc."""
    if torch.version.cuda is None:
        raise RuntimeError("the oscar_kv CUDA ops need a CUDA build of torch")
    from torch.utils.cpp_extension import load as load_ext

    root = _build.csrc_dir()
    key = build_key(root)
    load_ext(
        name=f"oscar_kv_cuda_{key}",
        sources=[str(root / s) for s in _SOURCES],
        extra_include_paths=[str(root / "include"), str(root)],
        extra_cflags=["-O3", "-std=c++20"],
        # No --use_fast_math: the quantize path must stay bit-exact (see common.cuh).
        extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
        build_directory=str(_build.cache_dir("torch_ext", key)),
        is_python_module=False,
        verbose=verbose,
    )
    return CudaOps()
