"""End to end in Triton's interpreter: a live CPU ``sglang.launch_server --kv-quant oscar``
whose attention runs through the project's Triton kernels (``OSCAR_KV_BACKEND=triton``) instead
of the default C++ CPU kernels, against the same server setup on the default backend.

One greedy request of a 120-token prompt and 16 new tokens (EOS ignored): the prefill runs
the fused extend kernel, the decode steps run the split decode kernel, and the decode step
that writes position 127 completes the first 128-token page, which the quantize kernel packs;
the last 8 tokens are decoded over that packed page.

``TRITON_INTERPRET`` is not set for the servers: on a machine without CUDA
`oscar_kv.triton._env` switches the interpreter on around the project's own launches
(``FORCED``), which is what a user's server does. (Only where the caller's environment sets
it, to any value, the Triton server gets ``TRITON_INTERPRET=1``: a "0" would refuse the
backend on CPU tensors.)

Which kernels actually ran is seen through a probe, not a library log line: a
``sitecustomize`` on the servers' ``PYTHONPATH`` wraps Triton's
``InterpretedFunction.run`` (every interpreted kernel launch goes through it) and prints one
line per kernel the first time it launches in a process. SGLang on CPU runs no Triton of its
own, so every line names one of ours; the default-backend server prints none.

Slow; runs with OSCAR_SLOW=1. Measured twice on 2 cores shared with other jobs: 7-10 min in
all, of which 3-4.5 min the two start-ups (overlapped; the Triton server's own warm-up request
is interpreted too), 3-5 s the default server's request and 220-290 s the interpreted one
(~40 s prefill, 10-15 s per decode step: 30 layers of interpreted launches).
"""

from __future__ import annotations

import os
import re
import time

import pytest

requests = pytest.importorskip("requests")

from oscar_kv.sglang._testing import INSTALL_HINT
from oscar_kv.sglang.server import SGLangServer, cuda_available, smollm2_model

try:
    import sglang  # noqa: F401
except ImportError:  # pragma: no cover - the test script installs it
    pytest.skip(INSTALL_HINT, allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        cuda_available(), reason="the CPU server path (on a GPU the server serves on CUDA)"
    ),
]

PROMPT_TOKENS = 120
NEW_TOKENS = 16  # positions 120..135: the first page completes at position 127

PROBE = '''\
"""Test probe of tests/test_sglang_triton_e2e.py: one stderr line per Triton kernel the first
time it launches in Triton's interpreter in this process."""
import importlib.abc
import sys

_TARGET = "triton.runtime.interpreter"


def _patch(module):
    cls = module.InterpretedFunction
    run, seen = cls.run, set()

    def run_and_report(self, *args, **kwargs):
        name = f"{getattr(self.fn, '__module__', '?')}.{self.fn.__name__}"
        if name not in seen:
            seen.add(name)
            print(f"oscar-kv-test-probe: interpreted triton kernel {name}", file=sys.stderr,
                  flush=True)
        return run(self, *args, **kwargs)

    cls.run = run_and_report


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _Finder())
'''

KERNEL_LINE = re.compile(r"oscar-kv-test-probe: interpreted triton kernel (\S+)")


def _prompt_ids(model) -> list[int]:
    from transformers import AutoTokenizer

    from oscar_kv.cache_demo import SYSTEM_PROMPT

    tok = AutoTokenizer.from_pretrained(model.tokenizer_path)
    ids = tok(SYSTEM_PROMPT, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    return ids


def _server(model, probe_dir, backend: str | None) -> SGLangServer:
    path = os.pathsep.join(p for p in (str(probe_dir), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path}
    if backend:
        env["OSCAR_KV_BACKEND"] = backend
        if "TRITON_INTERPRET" in os.environ:  # a caller's own choice would win over FORCED
            env["TRITON_INTERPRET"] = "1"
    return SGLangServer(
        model,
        kv_quant="oscar",
        max_total_tokens=1024,
        max_running_requests=2,
        context_length=512,
        extra_args=["--decode-log-interval", "1"],
        env=env,
    )


def _generate(server: SGLangServer, ids: list[int]) -> tuple[dict, float]:
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    }
    t0 = time.monotonic()
    r = requests.post(server.url + "/generate", json=body, timeout=1800)
    took = time.monotonic() - t0
    assert r.status_code == 200, f"{r.status_code} {r.text}\n{server.log_tail(80)}"
    return r.json(), took


def _kernels(server: SGLangServer) -> set[str]:
    return set(KERNEL_LINE.findall(server.log_text()))


def test_triton_interpreter_server_matches_cpu_backend(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    model = smollm2_model()
    ids = _prompt_ids(model)
    servers = {"cpu": _server(model, tmp_path, None), "triton": _server(model, tmp_path, "triton")}
    timeout = float(os.environ.get("OSCAR_E2E_START_TIMEOUT", "1200"))
    out, took = {}, {}
    try:
        for s in servers.values():  # both start together: the start-ups overlap
            s.start()
        for s in servers.values():
            s.wait_ready(timeout)
        for name, s in servers.items():  # the requests one after the other
            out[name], took[name] = _generate(s, ids)
            assert s.alive(), s.log_tail(80)
    finally:
        for s in servers.values():
            s.stop()
    print(f"request seconds: {took}; server logs: {[str(s.log_path) for s in servers.values()]}")
    print({name: o["output_ids"] for name, o in out.items()})

    for name, o in out.items():
        assert o["meta_info"]["prompt_tokens"] == PROMPT_TOKENS, (name, o["meta_info"])
        assert o["meta_info"]["completion_tokens"] == NEW_TOKENS, (name, o["meta_info"])
        assert len(o["output_ids"]) == NEW_TOKENS, (name, o["output_ids"])

    # The Triton server ran our kernels in the interpreter: the extend kernel (prefill), the
    # decode kernel and the page quantizer (the first page completed while decoding).
    ran = _kernels(servers["triton"])
    ours = {k for k in ran if k.startswith("oscar_kv.triton.")}
    for what in ("extend", "decode", "quantize"):
        assert any(what in k.rsplit(".", 1)[-1] for k in ours), (what, sorted(ran))
    assert not _kernels(servers["cpu"]), sorted(_kernels(servers["cpu"]))
    log = servers["triton"].log_text()
    for bad in ("Traceback", "InterpreterError"):
        assert bad not in log, servers["triton"].log_tail(80)
    # The backend says which ops it runs.
    assert (
        "oscar-kv attention: ops backend triton (decode: triton) on cpu (Triton interpreter)" in log
    )
    assert "oscar-kv attention: ops backend cpu (decode: cpu) on cpu" in servers["cpu"].log_text()

    # The same greedy answer, all 16 tokens. The backends differ in arithmetic (Triton's dots
    # take fp16 operands with fp32 accumulation, the C++ CPU kernels and the torch extend are
    # fp32 throughout) but write byte-identical pages; measured here, the two answers agree
    # token for token, including the 8 tokens decoded over the packed first page. A flip at a
    # near-tie would show as the first differing position in the message.
    got, want = out["triton"]["output_ids"], out["cpu"]["output_ids"]
    same = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(got))
    assert got == want, f"first difference at token {same}: triton {got} vs cpu {want}"
