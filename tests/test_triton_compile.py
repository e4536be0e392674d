"""The Triton kernels compile to cubins for sm_80 and sm_90a without a GPU.

The interpreter runs code that a real compile rejects (a constexpr re-assigned in a loop,
non-constexpr globals, unsupported layouts), so every kernel is also lowered by Triton's
compiler. It runs in a subprocess with ``TRITON_INTERPRET=0``: in this process the kernels
may already exist in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def run_aot(*args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "oscar_kv.triton.aot", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def test_compile_main_config_sm80_sm90a():
    out = run_aot("--quick", "80", "90")
    for arch in ("sm_80", "sm_90a"):
        for kernel in (
            "quantize",
            "dequantize",
            "decode",
            "merge",
            "extend",
            "fwht",
            "bf16_decode",
        ):
            assert f"{arch} {kernel}[" in out, out


@pytest.mark.slow
def test_compile_all_configs_sm80_sm90a():
    out = run_aot("80", "90")
    assert out.count("sm_90a decode[") == 9, out
    assert out.count("sm_90a extend[") == 9, out
