"""The C++ CPU kernels (``csrc/cpu/``), built on first use and registered as
``torch.ops.oscar_kv_cpu``: the fused decode attention that `oscar_kv.ops` runs for CPU
tensors (backend "cpu"; the batched torch ops remain the fallback, backend "torch").

The build (torch.utils.cpp_extension with the host C++ compiler, ~1 minute on two cores) is
cached by `oscar_kv._build`; the key covers the sources, torch's version and the SIMD flags.
``scripts/install.sh`` builds it once so that a server's first request does not wait for it.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from oscar_kv import _build

_SOURCES = ("cpu/decode_cpu.cpp",)


def simd_flags() -> list[str]:
    """AVX2/FMA/F16C code where this CPU runs it (torch's capability probe), else the
    portable C++ path; ``OSCAR_KV_CPU_SIMD=0`` forces the portable path (tests use it)."""
    if os.environ.get("OSCAR_KV_CPU_SIMD", "1") == "0":
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2", "-mfma", "-mf16c"] if cap in ("AVX2", "AVX512") else []


def _flags() -> list[str]:
    # omp simd lets the dot products vectorize without -ffast-math's reassociation elsewhere.
    return ["-O3", "-std=c++17", "-fopenmp-simd", *simd_flags()]


def _source_files(root: Path) -> list[Path]:
    return [root / s for s in _SOURCES] + _build.headers(root)


def build_key(root: Path | None = None) -> str:
    root = root or _build.csrc_dir()
    return _build.build_key(_source_files(root), torch.__version__, *_flags())


@functools.cache
def load(verbose: bool = False) -> object:
    """Build (once per key) and load; returns ``torch.ops.oscar_kv_cpu``. Raises when the
    build fails (no C++ compiler, no torch headers)."""
    from torch.utils.cpp_extension import load as load_ext

    root = _build.csrc_dir()
    key = build_key(root)
    load_ext(
        name=f"oscar_kv_cpu_{key}",
        sources=[str(root / s) for s in _SOURCES],
        extra_include_paths=[str(root / "include")],
        extra_cflags=_flags(),
        build_directory=str(_build.cache_dir("cpu_ext", key)),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.oscar_kv_cpu


@functools.cache
def ops_or_none() -> object | None:
    """`load()`, or None with one warning saying why (the torch ops are used instead)."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 (any build failure means: fall back to torch ops)
        warnings.warn(
            f"oscar_kv CPU kernels unavailable ({type(e).__name__}: {e}); using the torch ops",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
