"""Interpreter-start hook for serving SGLang on CPU (run by ``oscar_kv_sglang_cpu.pth``).

SGLang starts its scheduler and detokenizer as fresh processes, and modules imported there
run ``from sgl_kernel import ...`` before any plugin is loaded. A ``.pth`` file is the one
place that runs in every Python process before that, so the package installs one whose single
line calls `activate` when ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's own switch for CPU serving,
without which it imports CUDA-only ops) and ``OSCAR_KV_CPU_BOOT`` is not ``0``. Everything
else in the process is untouched: no torch or SGLang import happens here.

The user need not set the variable: under ``--kv-quant oscar --device cpu`` the plugin's
argument hook sets it in the launching process (whose own SGLang modules are already
imported by then; it calls `activate` there) before SGLang spawns the scheduler and
detokenizer processes, which inherit it, so this hook runs first thing in each of them.
"""

from __future__ import annotations

import os

ENABLE_VAR = "OSCAR_KV_CPU_BOOT"


def wanted(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("SGLANG_USE_CPU_ENGINE") == "1" and env.get(ENABLE_VAR, "1") != "0"


def thread_defaults(cpu_count: int | None) -> dict[str, str]:
    """OpenMP threads per process when the user set none: one core is left to the tokenizer
    and detokenizer processes, which otherwise preempt the scheduler's threads (measured: 1.5
    vs 14 tokens/s on 2 cores)."""
    return {"OMP_NUM_THREADS": str(max(1, (cpu_count or 1) - 1))}


def activate() -> list[str]:
    """Installs the stand-ins and thread defaults; returns what was stood in for."""
    from oscar_kv.sglang.cpu import standins

    for name, value in thread_defaults(os.cpu_count()).items():
        os.environ.setdefault(name, value)
    return standins.install()


def run_from_pth() -> None:
    """The ``.pth`` entry: never breaks interpreter start-up."""
    if not wanted():
        return
    try:
        activate()
    except Exception as e:  # noqa: BLE001 - a .pth error would abort every Python start
        import sys

        print(f"oscar-kv: CPU serving stand-ins not installed: {e!r}", file=sys.stderr)
