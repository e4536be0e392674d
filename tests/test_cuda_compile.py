"""The CUDA sources compile with nvcc for sm_80 and sm_90a (compile only, no GPU needed).

- device code (csrc/include/oscar/*.cuh) through the torch-free csrc/tests/compile_check.cu;
- torch_bindings.cpp (TORCH_LIBRARY schemas, CUDA and Meta impls) with the host compiler;
- (slow) the launchers csrc/oscar_kv_ops.cu against torch's headers. A CPU-only torch wheel
  lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); the test supplies it.

A full extension build needs a CUDA build of torch (GBs); `oscar_kv.cuda.jit` does that on
a GPU machine. Skipped where nvcc / g++ are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
)
GXX = shutil.which("g++") or shutil.which("c++")
TORCH_INC = Path(torch.__file__).parent / "include"
# What torch.utils.cpp_extension passes to nvcc for every CUDA extension.
TORCH_NVCC_FLAGS = [
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def run(cmd: list[str], timeout: int = 900) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-6000:]}"
    return r.stderr


def nvcc_device(tmp_path: Path, *defines: str) -> str:
    out = tmp_path / "compile_check.o"
    cmd = [NVCC, "-O3", *TORCH_NVCC_FLAGS, *ARCHS, f"-I{CSRC / 'include'}", "-Xptxas", "-v",
           *defines, "-c", str(CSRC / "tests" / "compile_check.cu"), "-o", str(out)]  # fmt: skip
    log = run(cmd)
    assert out.stat().st_size > 0
    return log


@needs_nvcc
def test_device_code_compiles_sm80_sm90a_head_dim_128(tmp_path):
    log = nvcc_device(tmp_path, "-DOSCAR_CHECK_D=128")
    for arch in ("sm_80", "sm_90a"):
        assert f"for '{arch}'" in log
    # The decode kernel is the bandwidth-critical one: a per-thread array indexed at run
    # time would land in local memory and show up as large spills.
    for b in log.split("Compiling entry function")[1:]:
        if "decode_split_kernel" in b.splitlines()[0]:
            spill = re.search(r"(\d+) bytes spill stores", b)
            assert spill is not None and int(spill.group(1)) <= 64, b


@pytest.mark.skipif(GXX is None, reason="no host C++ compiler")
def test_torch_bindings_compile(tmp_path):
    run([GXX, "-std=c++20", "-fsyntax-only", f"-I{TORCH_INC}",
         f"-I{TORCH_INC / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{CSRC}",
         str(CSRC / "torch_bindings.cpp")])  # fmt: skip


@needs_nvcc
@pytest.mark.slow
def test_device_code_compiles_all_head_dims(tmp_path):
    nvcc_device(tmp_path)


@needs_nvcc
@pytest.mark.slow
def test_launchers_compile_against_torch_headers(tmp_path):
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    if not (TORCH_INC / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (shim / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
        )
    run([NVCC, "-O3", *TORCH_NVCC_FLAGS, "-gencode", "arch=compute_90a,code=sm_90a",
         f"-I{CSRC / 'include'}", f"-I{CSRC}", f"-I{tmp_path / 'shim'}", f"-I{TORCH_INC}",
         f"-I{TORCH_INC / 'torch' / 'csrc' / 'api' / 'include'}", "-c",
         str(CSRC / "oscar_kv_ops.cu"), "-o", str(tmp_path / "ops.o")])  # fmt: skip


def test_jit_finds_the_sources_inside_the_package():
    """The JIT builds read oscar_kv/csrc (shipped in the wheel), the repo's csrc/ links there,
    and each build key covers every source it compiles."""
    from oscar_kv import _build, cpu_kernels
    from oscar_kv.cuda import jit

    root = _build.csrc_dir()
    assert root == Path(_build.__file__).resolve().parent / "csrc"
    assert CSRC.resolve() == root
    files = jit._source_files(root)
    assert all(f.is_file() for f in files)
    assert {f.name for f in files} >= {"oscar_kv_ops.cu", "torch_bindings.cpp", "decode.cuh",
                                       "fwht.cuh", "quant.cuh", "common.cuh", "layout.h",
                                       "oscar_kv_ops.h"}  # fmt: skip
    cpu_files = cpu_kernels._source_files(root)
    assert all(f.is_file() for f in cpu_files)
    assert {"decode_cpu.cpp", "layout.h"} <= {f.name for f in cpu_files}
    assert len(jit.build_key(root)) == len(cpu_kernels.build_key(root)) == 16


@pytest.mark.slow
def test_wheel_ships_the_sources(tmp_path):
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path),
                        str(ROOT)], capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("oscar_kv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (
        "oscar_kv_ops.cu",
        "torch_bindings.cpp",
        "oscar_kv_ops.h",
        "include/oscar/decode.cuh",
        "include/oscar/layout.h",
        "cpu/decode_cpu.cpp",
    ):
        assert f"oscar_kv/csrc/{f}" in names
    assert not any(n.startswith("csrc/") or "/csrc/tests/" in n for n in names)
