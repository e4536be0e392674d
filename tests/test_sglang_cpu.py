"""`oscar_kv.sglang.cpu` (serving SGLang on a CPU-only machine), each part against the
contract it stands in for.

- sgl_kernel stand-in ops vs naive loops written from SGLang's own kernels: the Triton
  ``assign_req_to_token_pool`` (sglang/srt/mem_cache/allocation.py), ``assign_extend_cache_locs``
  (sglang/kernels/ops/speculative/cache_locs.py), and the tiled ``copy_all_layer_kv_cache``
  (raw ``data_ptr()`` + byte strides, as MHATokenToKVPool hands them); called the way SGLang's
  call sites call them.
- The import finders and the ``.pth`` boot hook, in fresh interpreters (the test process keeps
  its own ``sys.meta_path``).
- GGUF: dequantization vs the block formats and the ``gguf`` package on tensors of the real
  SmolLM2 file; the dense-weight hooks on SGLang's own GGUFLinearMethod/GGUFEmbeddingMethod
  (a subprocess with ``SGLANG_USE_CPU_ENGINE=1``, where SGLang's wrappers and a real
  MHATokenToKVPool also run on the stand-in ops); the rotary override and the numeric
  reason for it (llama.cpp's Q/K row permutation + interleaved rotary == original + neox).
- The plugin's ``_apply_gguf_rope_fix`` on a Namespace and on Engine kwargs.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import site
import subprocess
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from oscar_kv.sglang.cpu import boot, standins
from oscar_kv.sglang.cpu import gguf as cpu_gguf

REPO = Path(__file__).resolve().parents[1]
PTH_NAME = "oscar_kv_sglang_cpu.pth"
Q4_1, Q8_0, F32, F16 = 3, 8, 0, 1  # GGMLQuantizationType values


# ============================================================================ naive references
def ref_assign_req_to_token_pool(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> torch.Tensor:
    """SGLang's Triton ``assign_req_to_token_pool``, one program (request) after another:
    ``out_offset`` = sum of ``end - start`` over the earlier programs; positions
    ``kv_start .. kv_end-1`` of row ``req_pool_indices[pid]`` get ``out_cache_loc[out_offset + j]``.
    Returns the expected ``req_to_token`` (the input is not modified)."""
    r2t = req_to_token.clone().tolist()
    rows, starts, ends = req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()
    locs = out_cache_loc.tolist()
    for pid in range(len(starts)):
        out_offset = sum(e - s for s, e in zip(starts[:pid], ends[:pid], strict=True))
        for j in range(ends[pid] - starts[pid]):
            r2t[rows[pid]][starts[pid] + j] = locs[out_offset + j]
    return torch.tensor(r2t, dtype=req_to_token.dtype)


def ref_assign_extend_cache_locs(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> torch.Tensor:
    """SGLang's Triton ``assign_extend_cache_locs`` (the gather direction): returns the
    expected ``out_cache_loc``; entries past the last request's range are left as they were."""
    out = out_cache_loc.clone().tolist()
    r2t = req_to_token.tolist()
    rows, starts, ends = req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()
    for pid in range(len(starts)):
        out_offset = sum(e - s for s, e in zip(starts[:pid], ends[:pid], strict=True))
        for j in range(ends[pid] - starts[pid]):
            out[out_offset + j] = r2t[rows[pid]][starts[pid] + j]
    return torch.tensor(out, dtype=out_cache_loc.dtype)


def ragged_batch(
    gen: torch.Generator, bs: int, pool_rows: int, pool_len: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct request rows (one row per request, as ReqToTokenPool hands them), ragged
    ``[start, end)`` ranges with every third one empty, all inside ``pool_len``."""
    lens = torch.randint(0, max_len + 1, (bs,), generator=gen)
    lens[::3] = 0
    starts = torch.stack(
        [torch.randint(0, pool_len - int(n) + 1, (1,), generator=gen)[0] for n in lens]
    )
    rows = torch.randperm(pool_rows, generator=gen)[:bs]
    return rows, starts, starts + lens


# (req_to_token, req_pool_indices, start/end offsets, out_cache_loc) dtypes. The first is
# SGLang's (ReqToTokenPool is int32; indices, seq_lens and allocated locs int64).
DTYPES = [
    (torch.int32, torch.int64, torch.int64, torch.int64),
    (torch.int32, torch.int32, torch.int32, torch.int32),
    (torch.int64, torch.int64, torch.int64, torch.int64),
    (torch.int64, torch.int32, torch.int32, torch.int64),
]
BATCH_SIZES = [1, 2, 5, 33, 64]  # 33: more requests than one Triton block of 32


# ============================================================================ 1. sgl_kernel ops
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[-5:] for t in d))
def test_assign_req_to_token_pool_matches_triton_semantics(dtypes: tuple) -> None:
    r2t_dt, idx_dt, off_dt, loc_dt = dtypes
    gen = torch.Generator().manual_seed(1)
    pool_rows, pool_len = 80, 96
    for bs in BATCH_SIZES:
        rows, start, end = ragged_batch(gen, bs, pool_rows, pool_len, max_len=70)
        total = int((end - start).sum())
        out_cache_loc = torch.randint(1, 50_000, (total,), generator=gen, dtype=loc_dt)
        req_to_token = torch.randint(-5, 0, (pool_rows, pool_len), generator=gen, dtype=r2t_dt)
        args = (rows.to(idx_dt), req_to_token, start.to(off_dt), end.to(off_dt), out_cache_loc)
        expected = ref_assign_req_to_token_pool(*args)
        ptr = req_to_token.data_ptr()
        # allocation.assign_req_to_token_pool_func's call: pool_len = req_to_token.shape[1]
        assert standins.assign_req_to_token_pool_cpu(*args, req_to_token.shape[1]) is None
        assert req_to_token.data_ptr() == ptr and req_to_token.dtype == r2t_dt  # in place
        torch.testing.assert_close(req_to_token, expected, rtol=0, atol=0)
        assert int((req_to_token > 0).sum()) == total  # every location landed once


def test_assign_req_to_token_pool_all_empty_and_exact_ranges() -> None:
    req_to_token = torch.zeros((4, 8), dtype=torch.int32)
    z = torch.zeros(3, dtype=torch.int64)
    standins.assign_req_to_token_pool_cpu(
        torch.tensor([0, 1, 2]), req_to_token, z + 5, z + 5, torch.empty(0, dtype=torch.int64), 8
    )
    assert not req_to_token.any()
    # full rows, and a range ending exactly at pool_len
    standins.assign_req_to_token_pool_cpu(
        torch.tensor([3, 1]),
        req_to_token,
        torch.tensor([0, 6]),
        torch.tensor([8, 8]),
        torch.arange(100, 110),
        8,
    )
    assert req_to_token[3].tolist() == list(range(100, 108))
    assert req_to_token[1].tolist() == [0] * 6 + [108, 109]
    assert not req_to_token[0].any() and not req_to_token[2].any()


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[-5:] for t in d))
def test_assign_extend_cache_locs_matches_triton_semantics(dtypes: tuple) -> None:
    r2t_dt, idx_dt, off_dt, loc_dt = dtypes
    gen = torch.Generator().manual_seed(2)
    pool_rows, pool_len, draft = 80, 96, 70
    for bs in BATCH_SIZES:
        rows, start, end = ragged_batch(gen, bs, pool_rows, pool_len, max_len=draft)
        req_to_token = torch.randint(0, 50_000, (pool_rows, pool_len), generator=gen, dtype=r2t_dt)
        # cache_locs.assign_extend_cache_locs_func: out = torch.empty(bs * draft_token_num)
        out = torch.full((bs * draft,), -7, dtype=loc_dt)
        r2t_before = req_to_token.clone()
        args = (rows.to(idx_dt), req_to_token, start.to(off_dt), end.to(off_dt), out)
        expected = ref_assign_extend_cache_locs(*args)
        assert standins.assign_extend_cache_locs_cpu(*args, req_to_token.shape[1]) is None
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        total = int((end - start).sum())
        assert (out[total:] == -7).all() and (out[:total] >= 0).all()
        assert torch.equal(req_to_token, r2t_before)  # read only


def test_assign_extend_cache_locs_fill_front_convention() -> None:
    """cache_locs.fill_front_out_cache_loc_func: rows = arange(bs), the per-request window
    of out_cache_loc as an int32 table, starts 0, ends num_front."""
    bs, width = 6, 8
    out_cache_loc = torch.randperm(1000)[: bs * width].to(torch.int64)
    num_front = torch.tensor([0, 3, 8, 1, 0, 5])
    front = torch.zeros(bs * width, dtype=torch.int64)
    window = out_cache_loc.view(bs, -1)
    standins.assign_extend_cache_locs_cpu(
        torch.arange(bs), window.int(), torch.zeros_like(num_front), num_front, front, width
    )
    expected = torch.cat([window[i, : int(n)] for i, n in enumerate(num_front)])
    assert torch.equal(front[: len(expected)], expected)
    assert not front[len(expected) :].any()


def kv_buffers(layers: int, rows: int, heads: int, dim: int, scales: bool) -> list[torch.Tensor]:
    """MHATokenToKVPool's slot-move buffers: k per layer, v per layer, then (FP4-style) scale
    buffers, whose row stride differs from the data buffers'."""
    g = torch.Generator().manual_seed(3)
    bufs = [
        torch.randn(rows, heads, dim, generator=g).to(torch.bfloat16) for _ in range(2 * layers)
    ]
    if scales:
        bufs += [torch.randn(rows, heads, generator=g) for _ in range(2 * layers)]
    return bufs


def ptrs_and_strides(bufs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """MHATokenToKVPool._init_data_ptrs_and_strides."""
    data_ptrs = torch.tensor([x.data_ptr() for x in bufs], dtype=torch.uint64)
    data_strides = torch.tensor([x.stride(0) * x.dtype.itemsize for x in bufs])
    return data_ptrs, data_strides


COPY_CASES = {
    "disjoint": ([40, 41, 7, 63], [2, 3, 4, 5]),
    "shift-chain": ([4, 5, 6, 7, 8], [3, 4, 5, 6, 7]),  # each target is the next source
    "shift-back": ([3, 4, 5, 6], [4, 5, 6, 7]),
    "swap": ([10, 11], [11, 10]),
    "cycle": ([20, 21, 22, 23], [21, 22, 23, 20]),
    "last-row": ([64, 0], [1, 64]),  # 64 = size: the last row of size + page_size rows
    "self": ([9, 12], [9, 12]),
    "empty": ([], []),
}


@pytest.mark.parametrize("case", list(COPY_CASES))
@pytest.mark.parametrize("scales", [False, True], ids=["kv", "kv+scales"])
def test_copy_all_layer_kv_cache_matches_clone(case: str, scales: bool) -> None:
    tgt_list, src_list = COPY_CASES[case]
    bufs = kv_buffers(layers=3, rows=65, heads=2, dim=16, scales=scales)
    data_ptrs, data_strides = ptrs_and_strides(bufs)
    before = [b.clone() for b in bufs]
    # cache_move.copy_all_layer_kv_cache_func passes tgt_loc[:num_locs], src_loc[:num_locs]
    # of (possibly longer) int64 location buffers
    n = len(tgt_list)
    tgt = torch.tensor([*tgt_list, 0, 0], dtype=torch.int64)
    src = torch.tensor([*src_list, 1, 2], dtype=torch.int64)
    standins.copy_all_layer_kv_cache_cpu(data_ptrs, data_strides, tgt[:n], src[:n])
    for b0, b in zip(before, bufs, strict=True):
        expected = b0.clone()
        expected[tgt[:n]] = b0[src[:n]]
        assert torch.equal(b, expected)
    if case in ("shift-chain", "swap", "cycle"):
        assert not all(torch.equal(b0, b) for b0, b in zip(before, bufs, strict=True))


def standin_module() -> types.ModuleType:
    """The module ``import sgl_kernel`` yields, built by the finder without importing it."""
    finder = standins.SGL_KERNEL_FINDER
    module = finder.create_module(importlib.machinery.ModuleSpec("sgl_kernel", finder))
    finder.exec_module(module)
    return module


def test_standin_module_ops_and_missing_names() -> None:
    m = standin_module()
    assert standins.is_standin(m) and not hasattr(m, "__path__")  # not a package
    for name, fn in standins.CPU_OPS.items():
        assert getattr(m, name) is fn
    assert set(standins.CPU_OPS) == {
        "assign_req_to_token_pool_cpu",
        "assign_extend_cache_locs_cpu",
        "copy_all_layer_kv_cache_cpu",
    }
    op = m.fused_add_rmsnorm_cpu  # resolving a missing op works (SGLang imports at load)...
    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.fused_add_rmsnorm_cpu"):
        op(torch.zeros(1))  # ...calling it fails, naming it
    with pytest.raises(NotImplementedError, match="assign_req_to_token_pool_cpu"):
        m.silu_and_mul()
    for name in ("ScalarType", "scalar_types", "_private", "__version__"):
        with pytest.raises(AttributeError):
            getattr(m, name)


# ============================================================================ 2. boot, finders
def child_env(**overrides: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SGLANG_USE_CPU_ENGINE", boot.ENABLE_VAR, "OMP_NUM_THREADS")
    }
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


def run_child(code: str, env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    """Runs ``code`` in a fresh interpreter (so the .pth hook runs); its last stdout line
    is a JSON object."""
    r = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


CHILD_PRELUDE = r"""
import importlib.util, json, os, sys
def err(stmt):
    try:
        exec(stmt, {})
    except BaseException as e:
        return f"{type(e).__name__}: {e}"
    return None
r = {
    "torch_at_start": "torch" in sys.modules,
    "sglang_at_start": any(m.partition(".")[0] == "sglang" for m in sys.modules),
    "finders": sorted(repr(f) for f in sys.meta_path if "oscar-kv" in repr(f)),
    "omp": os.environ.get("OMP_NUM_THREADS"),
}
"""

CHILD_ON = (
    CHILD_PRELUDE
    + r"""
from oscar_kv.sglang.cpu import boot, standins
r["omp_default"] = boot.thread_defaults(os.cpu_count())["OMP_NUM_THREADS"]
r["probe_torchvision"] = repr(importlib.util.find_spec("torchvision"))
r["probe_sgl_kernel"] = repr(importlib.util.find_spec("sgl_kernel"))
# transformers probes first, as when SGLang imports it before its torchvision imports
from transformers.utils.import_utils import is_torchvision_available
r["tv_available"] = is_torchvision_available()
import sgl_kernel
r["sk_standin"] = standins.is_standin(sgl_kernel)
r["sk_op"] = sgl_kernel.assign_req_to_token_pool_cpu is standins.assign_req_to_token_pool_cpu
from sgl_kernel import copy_all_layer_kv_cache_cpu, silu_and_mul_cpu
r["missing_call"] = err("import sgl_kernel; sgl_kernel.silu_and_mul_cpu(1)")
r["ScalarType"] = err("from sgl_kernel import ScalarType")
r["scalar_types"] = err("from sgl_kernel import scalar_types")
r["submodule"] = err("import sgl_kernel.quantization")
r["from_submodule"] = err("from sgl_kernel.quantization import ggml_dequantize")
from torchvision.transforms import InterpolationMode
import torchvision.transforms as T
r["tv_standin"] = standins.is_standin(T) and standins.is_standin(sys.modules["torchvision"])
r["tv_instantiate"] = err("from torchvision.transforms import InterpolationMode; InterpolationMode()")
r["tv_available_after_import"] = is_torchvision_available()
print(json.dumps(r))
"""
)

CHILD_OFF = (
    CHILD_PRELUDE
    + r"""
r["probe_sgl_kernel"] = repr(importlib.util.find_spec("sgl_kernel"))
r["import_sgl_kernel"] = err("import sgl_kernel")
print(json.dumps(r))
"""
)


def test_pth_installed_in_site_packages() -> None:
    """A missing or stale .pth means the server's processes start without the stand-ins."""
    found = [Path(d) / PTH_NAME for d in site.getsitepackages() if (Path(d) / PTH_NAME).is_file()]
    assert found, f"{PTH_NAME} not in {site.getsitepackages()}: reinstall the package"
    shipped = (REPO / "data" / "purelib" / PTH_NAME).read_text()
    assert found[0].read_text() == shipped
    lines = [ln for ln in shipped.splitlines() if ln.strip()]
    # site.py executes only lines that start with "import"; one line, all of it
    assert len(lines) == 1 and lines[0].startswith("import ")
    assert "run_from_pth" in lines[0] and "SGLANG_USE_CPU_ENGINE" in lines[0]


def test_stand_ins_active_in_a_cpu_engine_process() -> None:
    r = run_child(CHILD_ON, child_env(SGLANG_USE_CPU_ENGINE="1"))
    assert not r["torch_at_start"] and not r["sglang_at_start"]  # the boot hook imports neither
    assert r["finders"] == [
        "<oscar-kv stand-in finder for sgl_kernel>",
        "<oscar-kv stand-in finder for torchvision>",
    ]
    # probes see nothing ...
    assert r["probe_torchvision"] == "None" and r["probe_sgl_kernel"] == "None"
    assert r["tv_available"] is False and r["tv_available_after_import"] is False
    # ... while imports work
    assert r["sk_standin"] and r["sk_op"] and r["tv_standin"]
    assert r["missing_call"].startswith("NotImplementedError: sgl_kernel.silu_and_mul_cpu")
    assert r["ScalarType"].startswith("ImportError: cannot import name 'ScalarType'")
    assert r["scalar_types"].startswith("ImportError: cannot import name 'scalar_types'")
    assert r["submodule"].startswith("ModuleNotFoundError: No module named 'sgl_kernel.")
    assert r["from_submodule"].startswith("ModuleNotFoundError")
    assert r["tv_instantiate"].startswith("NotImplementedError: torchvision is not installed")
    assert r["omp"] == r["omp_default"] == boot.thread_defaults(os.cpu_count())["OMP_NUM_THREADS"]


@pytest.mark.parametrize(
    "env",
    [{"SGLANG_USE_CPU_ENGINE": "1", boot.ENABLE_VAR: "0"}, {}, {"SGLANG_USE_CPU_ENGINE": "0"}],
    ids=["boot-off", "no-cpu-engine", "cpu-engine-0"],
)
def test_no_stand_ins_without_the_switch(env: dict[str, str]) -> None:
    r = run_child(CHILD_OFF, child_env(**env))
    assert r["finders"] == [] and r["omp"] is None
    assert r["probe_sgl_kernel"] == "None"
    assert r["import_sgl_kernel"] == "ModuleNotFoundError: No module named 'sgl_kernel'"


def test_user_thread_setting_is_kept() -> None:
    r = run_child(
        CHILD_PRELUDE + "print(json.dumps(r))",
        child_env(SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="7"),
    )
    assert r["omp"] == "7" and len(r["finders"]) == 2


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SGLANG_USE_CPU_ENGINE": "1"}, True),
        ({"SGLANG_USE_CPU_ENGINE": "1", "OSCAR_KV_CPU_BOOT": "1"}, True),
        ({"SGLANG_USE_CPU_ENGINE": "1", "OSCAR_KV_CPU_BOOT": "0"}, False),
        ({"SGLANG_USE_CPU_ENGINE": "true"}, False),  # SGLang's is_cpu() wants exactly "1"
        ({}, False),
    ],
)
def test_wanted(environ: dict[str, str], expected: bool) -> None:
    assert boot.wanted(environ) is expected


def test_thread_defaults() -> None:
    cases = {None: "1", 1: "1", 2: "1", 16: "15"}
    assert {n: boot.thread_defaults(n)["OMP_NUM_THREADS"] for n in cases} == cases


def test_run_from_pth_never_breaks_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[int] = []

    def broken() -> list[str]:
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(boot, "activate", broken)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    boot.run_from_pth()
    assert calls == []  # off without the switch
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.delenv(boot.ENABLE_VAR, raising=False)
    boot.run_from_pth()  # does not raise
    assert calls == [1]
    assert "CPU serving stand-ins not installed: RuntimeError('boom')" in capsys.readouterr().err


def test_install_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    assert importlib.util.find_spec("sgl_kernel") is None  # the premise on this machine
    first = standins.install()
    assert "sgl_kernel" in first and standins.install() == first
    assert sys.meta_path.count(standins.SGL_KERNEL_FINDER) == 1


# ============================================================================ 3. GGUF
def ref_q4_1(raw: np.ndarray) -> np.ndarray:
    """ggml block_q4_1: 32 weights in 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; the low
    nibbles are weights 0..15, the high nibbles 16..31; w = d * q + m."""
    b = raw.reshape(raw.shape[0], -1, 20)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    return (d * q + m).reshape(raw.shape[0], -1)


def ref_q8_0(raw: np.ndarray) -> np.ndarray:
    """ggml block_q8_0: 32 weights in 34 bytes: fp16 d, 32 int8; w = d * q."""
    b = raw.reshape(raw.shape[0], -1, 34)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    q = b[..., 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(raw.shape[0], -1)


REF_DEQUANT: dict[int, Callable[[np.ndarray], np.ndarray]] = {Q4_1: ref_q4_1, Q8_0: ref_q8_0}


@pytest.fixture(scope="module")
def smollm2() -> dict[str, Any]:
    """Tensors of the real SmolLM2 GGUF file: raw bytes as SGLang's loader hands them."""
    gguf = pytest.importorskip("gguf")
    from oscar_kv.eval.smollm2 import gguf_path

    try:
        path = gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    reader = gguf.GGUFReader(path)
    t = {x.name: x for x in reader.tensors}
    out: dict[str, Any] = {"path": path, "reader": reader}
    out["arch"] = reader.get_field("general.architecture")
    out["arch"] = out["arch"].contents()
    for name in ("attn_q", "attn_k", "attn_v", "attn_norm"):
        x = t[f"blk.0.{name}.weight"]
        out[name] = (np.array(x.data), int(x.tensor_type), tuple(int(n) for n in x.shape))
    e = t["token_embd.weight"]
    out["token_embd"] = (np.array(e.data[:256]), int(e.tensor_type), (int(e.shape[0]), 256))
    return out


def test_smollm2_file_has_the_types_tested_here(smollm2: dict[str, Any]) -> None:
    assert smollm2["arch"] == "llama"
    assert smollm2["attn_q"][1] == Q4_1 and smollm2["attn_k"][1] == Q4_1
    assert smollm2["token_embd"][1] == Q8_0 and smollm2["attn_norm"][1] == F32


@pytest.mark.parametrize("name", ["attn_k", "attn_q", "token_embd"])
def test_dequantize_block_types_vs_format_and_gguf_package(
    smollm2: dict[str, Any], name: str
) -> None:
    from gguf import GGMLQuantizationType, quants

    raw, qtype, ne = smollm2[name]
    ours = cpu_gguf.dequantize(torch.from_numpy(raw), qtype, torch.float32)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (ne[1], ne[0])  # [out, in]
    spec = torch.from_numpy(REF_DEQUANT[qtype](raw))
    pkg = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType(qtype)))
    torch.testing.assert_close(ours, spec, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, pkg, rtol=0, atol=0)
    assert float(ours.std()) > 1e-3  # real weights, not a zero block
    bf16 = cpu_gguf.dequantize(torch.from_numpy(raw), qtype, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, ours.to(torch.bfloat16))


def test_dequantize_unquantized(smollm2: dict[str, Any]) -> None:
    data, qtype, _ = smollm2["attn_norm"]
    assert data.dtype == np.float32
    as_float = cpu_gguf.dequantize(torch.from_numpy(data), qtype, torch.float32)
    as_bytes = cpu_gguf.dequantize(torch.from_numpy(data.view(np.uint8)), qtype, torch.float32)
    assert torch.equal(as_float, torch.from_numpy(data)) and torch.equal(as_bytes, as_float)
    half = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float16)
    got = cpu_gguf.dequantize(torch.from_numpy(half.view(np.uint8)), F16, torch.float32)
    assert got.shape == (4, 6) and torch.equal(got, torch.from_numpy(half.astype(np.float32)))


def write_gguf(path: Path, arch: str) -> str:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Metadata-only GGUF files (reading the 100 MB SmolLM2 file takes seconds)."""
    pytest.importorskip("gguf")
    d = tmp_path_factory.mktemp("gguf")
    return {arch: write_gguf(d / f"{arch}.gguf", arch) for arch in ("llama", "qwen2")}


def test_rope_override_llama(tiny_gguf: dict[str, str]) -> None:
    llama = tiny_gguf["llama"]
    assert cpu_gguf.gguf_architecture(llama) == "llama"
    assert json.loads(cpu_gguf.rope_override(llama, None)) == {"rope_is_neox_style": False}
    assert json.loads(cpu_gguf.rope_override(llama, "")) == {"rope_is_neox_style": False}
    assert json.loads(cpu_gguf.rope_override(llama, "{}")) == {"rope_is_neox_style": False}
    merged = cpu_gguf.rope_override(llama, '{"max_position_embeddings": 4096}')
    assert json.loads(merged) == {"max_position_embeddings": 4096, "rope_is_neox_style": False}
    for user in ('{"rope_is_neox_style": true}', '{"rope_is_neox_style": false, "a": 1}'):
        assert cpu_gguf.rope_override(llama, user) == user  # the user's choice, verbatim
    assert json.loads(cpu_gguf.rope_override(Path(llama), None)) == {"rope_is_neox_style": False}


def test_rope_override_leaves_other_models_alone(tiny_gguf: dict[str, str], tmp_path: Path) -> None:
    hf_dir = tmp_path / "Llama-3-8B"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "llama"}')
    for path in (tiny_gguf["qwen2"], str(hf_dir), "meta-llama/Llama-3.1-8B", None):
        for override in (None, "{}", '{"x": 1}', "not json"):  # SGLang reports bad JSON itself
            assert cpu_gguf.rope_override(path, override) == override
    missing = str(tmp_path / "missing.gguf")
    assert cpu_gguf.gguf_architecture(missing) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("{not json", "--json-model-override-args is not valid JSON"),
        ("[1, 2]", "--json-model-override-args must be a JSON object"),
        ("null", "--json-model-override-args must be a JSON object"),
        ('"rope"', "--json-model-override-args must be a JSON object"),
    ],
)
def test_rope_override_bad_flag_value(
    tiny_gguf: dict[str, str], override: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cpu_gguf.rope_override(tiny_gguf["llama"], override)


def test_rope_override_real_smollm2(smollm2: dict[str, Any]) -> None:
    """The served file itself, through the header-only reader."""
    path = smollm2["path"]
    for model_path in (str(path), path):  # server.py passes a str; gguf_path() is a Path
        assert json.loads(cpu_gguf.rope_override(model_path, None)) == {"rope_is_neox_style": False}


def test_header_reader_equals_gguf_reader(smollm2: dict[str, Any]) -> None:
    """Every string-valued metadata key of the real file (the tokenizer arrays before some of
    them are skipped, not parsed), and a key that is absent."""
    import gguf

    reader = smollm2["reader"]
    strings = {
        name: field.contents()
        for name, field in reader.fields.items()
        if field.types == [gguf.GGUFValueType.STRING]
    }
    assert "general.architecture" in strings and len(strings) >= 3
    for name, value in strings.items():
        assert cpu_gguf.read_gguf_string(str(smollm2["path"]), name) == value, name
    assert cpu_gguf.read_gguf_string(str(smollm2["path"]), "no.such.key") is None


# --- the numeric reason for rope_is_neox_style=false
def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """``permute`` of llama.cpp's convert_hf_to_gguf.py (Q with n_head, K with n_head_kv)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rope_cos_sin(pos: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, dim/2] cos and sin of transformers' LlamaRotaryEmbedding (default rope type)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = pos[:, None].to(torch.float64) * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def rotary_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb: emb = cat(freqs, freqs), x*cos + rotate_half(x)*sin."""
    cos2, sin2 = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    half = x.shape[-1] // 2
    rotate_half = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos2 + rotate_half * sin2


def rotary_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary (SGLang's apply_rotary_emb with is_neox_style=False): pairs
    (2i, 2i+1) rotate with frequency i."""
    c, s = cos[:, None], sin[:, None]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2)


def attention_scores(
    wq: torch.Tensor,
    wk: torch.Tensor,
    h: torch.Tensor,
    n_head: int,
    n_kv: int,
    rotary: Callable[..., torch.Tensor],
    base: float = 10000.0,
) -> torch.Tensor:
    """[n_head, T, T] q.k after rotary, GQA (query head i reads kv head i // (n_head/n_kv))."""
    t = h.shape[0]
    dim = wq.shape[0] // n_head
    cos, sin = rope_cos_sin(torch.arange(t) * 37 + 5, dim, base)  # spread-out positions
    q = rotary((h @ wq.T).view(t, n_head, dim), cos, sin)
    k = rotary((h @ wk.T).view(t, n_kv, dim), cos, sin)
    k = k.repeat_interleave(n_head // n_kv, dim=1)
    return torch.einsum("ihd,jhd->hij", q, k)


def test_llama_cpp_permutation_with_interleaved_rotary_is_the_original_model() -> None:
    g = torch.Generator().manual_seed(4)
    n_head, n_kv, dim, hidden, t = 6, 2, 16, 40, 9
    wq = torch.randn(n_head * dim, hidden, generator=g, dtype=torch.float64)
    wk = torch.randn(n_kv * dim, hidden, generator=g, dtype=torch.float64)
    h = torch.randn(t, hidden, generator=g, dtype=torch.float64)
    wq_gguf, wk_gguf = llama_cpp_permute(wq, n_head), llama_cpp_permute(wk, n_kv)
    assert not torch.equal(wq_gguf, wq)
    hf = attention_scores(wq, wk, h, n_head, n_kv, rotary_neox)
    fixed = attention_scores(wq_gguf, wk_gguf, h, n_head, n_kv, rotary_gptj)
    torch.testing.assert_close(fixed, hf, rtol=1e-10, atol=1e-9)
    # what SGLang computed before the fix: GGUF rows with its default neox rotary
    broken = attention_scores(wq_gguf, wk_gguf, h, n_head, n_kv, rotary_neox)
    assert (broken - hf).abs().max() > 0.1 * hf.abs().max()

    # the permutation itself is rotary-free: without rotary the scores agree either way
    def no_rope(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return x

    torch.testing.assert_close(
        attention_scores(wq_gguf, wk_gguf, h, n_head, n_kv, no_rope),
        attention_scores(wq, wk, h, n_head, n_kv, no_rope),
    )


# --- SGLang's own GGUF methods, hooks and CPU call sites, in a CPU-engine process
def child_sglang(npz: str) -> None:
    """Runs in ``python -c`` with ``SGLANG_USE_CPU_ENGINE=1``; prints one JSON line
    {check: "ok" | traceback}."""
    import warnings

    warnings.simplefilter("ignore")
    results: dict[str, str] = {}

    def check(fn: Callable[[], None]) -> None:
        try:
            fn()
            results[fn.__name__] = "ok"
        except BaseException:  # noqa: BLE001 - reported to the parent test
            results[fn.__name__] = traceback.format_exc()

    from sglang.srt.layers.quantization import gguf as sg_gguf
    from sglang.srt.plugins.hook_registry import HookRegistry

    from oscar_kv.sglang import plugin

    plugin._register_cpu_serving()
    HookRegistry.apply_hooks()
    data = np.load(npz)
    torch.manual_seed(5)

    def platform() -> None:
        from sglang.srt.utils.common import _is_intel_amx_backend_available, is_cpu

        assert is_cpu()
        # the stand-in registers nothing under torch.ops.sgl_kernel: AMX packing stays off
        assert not _is_intel_amx_backend_available()

    def qkv_layer() -> tuple[Any, torch.nn.Module, torch.Tensor, torch.Tensor]:
        """A QKV layer loaded the way QKVParallelLinear.weight_loader loads GGUF shards (in
        file order: k, then v, then q), then SGLang's process_weights_after_loading (hooked).
        v is Q8_0 while q, k are Q4_1, so the padded container has two widths."""
        method = sg_gguf.GGUFLinearMethod(sg_gguf.GGUFConfig())
        layer = torch.nn.Module()
        shards = {"q": (data["q"], Q4_1), "k": (data["k"], Q4_1), "v": (data["v"], Q8_0)}
        sizes = [len(shards[s][0]) for s in "qkv"]
        method.create_weights(layer, 576, sizes, 576, sum(sizes), torch.float32)
        qweight, qweight_type = layer.qweight, layer.qweight_type
        for sid in ("k", "v", "q"):
            raw, qtype = shards[sid]
            qweight_type.shard_weight_type[sid] = qtype
            qweight.shard_id.append(sid)
            qweight.shard_id_map[sid] = len(qweight.data_container)
            qweight.data_container.append(torch.from_numpy(raw))
        method.process_weights_after_loading(layer)
        ref = {sid: torch.from_numpy(REF_DEQUANT[qt](raw)) for sid, (raw, qt) in shards.items()}
        expected = torch.cat([ref["q"], ref["k"], ref["v"]])
        load_order = torch.cat([ref["k"], ref["v"], ref["q"]])
        return method, layer, expected, load_order

    def qkv_dense_weight() -> None:
        _, layer, expected, load_order = qkv_layer()
        assert layer.qweight.shard_offset_map["v"][2] == 612  # padded: Q8_0 rows are wider
        assert layer.qweight.shape == (960, 612)
        dense = getattr(layer, cpu_gguf.DENSE_ATTR)
        assert dense.shape == (960, 576) and dense.dtype == torch.float32
        torch.testing.assert_close(dense, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(dense, load_order)  # the order is checked, not implied

    def qkv_hooked_apply() -> None:
        method, layer, expected, _ = qkv_layer()
        x = torch.randn(5, 576)
        bias = torch.randn(960)
        torch.testing.assert_close(method.apply(layer, x), x @ expected.T)
        torch.testing.assert_close(method.apply(layer, x, bias), x @ expected.T + bias)
        q, k, v = expected.split([576, 192, 192])  # SGLang's output layout: [q | k | v]
        out = method.apply(layer, x)
        torch.testing.assert_close(out[:, :576], x @ q.T)
        torch.testing.assert_close(out[:, 576:768], x @ k.T)
        torch.testing.assert_close(out[:, 768:], x @ v.T)

    def embedding_hook() -> None:
        method = sg_gguf.GGUFEmbeddingMethod(sg_gguf.GGUFConfig())
        layer = torch.nn.Module()
        raw = data["embd"]
        method.create_weights(layer, 576, [len(raw)], 576, len(raw), torch.float32)
        layer.qweight.materialize(tuple(raw.shape), dtype=torch.uint8)  # linear.weight_loader
        layer.qweight.data.copy_(torch.from_numpy(raw))
        layer.qweight_type.weight_type = Q8_0
        method.process_weights_after_loading(layer)
        ref = torch.from_numpy(ref_q8_0(raw))
        torch.testing.assert_close(getattr(layer, cpu_gguf.DENSE_ATTR), ref, rtol=0, atol=1e-6)
        ids = torch.tensor([[0, 255, 17], [3, 3, 128]])
        torch.testing.assert_close(method.embedding(layer, ids), ref[ids], rtol=0, atol=0)

    def unhooked_path_without_dense() -> None:
        """A layer that never went through process_weights_after_loading (no dense weight):
        the hooks call SGLang's own apply/embedding (its unquantized F32 path here)."""
        method = sg_gguf.GGUFLinearMethod(sg_gguf.GGUFConfig())
        layer = torch.nn.Module()
        method.create_weights(layer, 16, [8], 16, 8, torch.float32)
        w = torch.randn(8, 16)
        layer.qweight.materialize((8, 16), dtype=torch.float32)
        layer.qweight.data.copy_(w)
        layer.qweight_type.weight_type = F32
        assert not hasattr(layer, cpu_gguf.DENSE_ATTR)
        x, bias = torch.randn(3, 16), torch.randn(8)
        torch.testing.assert_close(method.apply(layer, x, bias), x @ w.T + bias)
        emb = sg_gguf.GGUFEmbeddingMethod(sg_gguf.GGUFConfig())
        emb.params_dtype = torch.float32
        ids = torch.tensor([1, 7, 0])
        torch.testing.assert_close(emb.embedding(layer, ids), w[ids], rtol=0, atol=0)
        # and the call-through really is SGLang's: its quantized path is CUDA-only
        layer.qweight_type.weight_type = Q4_1
        try:
            method.apply(layer, x)
        except NameError as e:
            assert "ggml" in str(e)
        else:
            raise AssertionError("the hook did not call SGLang's apply")

    def sglang_call_sites() -> None:
        """SGLang's wrappers (with is_cpu() true) land in the stand-in ops."""
        from sglang.kernels.ops.speculative.cache_locs import (
            assign_extend_cache_locs_func,
            fill_front_out_cache_loc_func,
        )
        from sglang.srt.mem_cache.allocation import assign_req_to_token_pool_func

        r2t = torch.zeros((8, 64), dtype=torch.int32)
        rows = torch.tensor([5, 1, 6, 2])
        start, end = torch.tensor([0, 10, 7, 3]), torch.tensor([4, 10, 20, 9])
        locs = torch.arange(100, 100 + 23)
        expected = ref_assign_req_to_token_pool(rows, r2t, start, end, locs)
        assign_req_to_token_pool_func(rows, r2t, start, end, locs, 4)
        assert torch.equal(r2t, expected)
        out = assign_extend_cache_locs_func(rows, r2t, start, end, 4, 13, "cpu")
        assert out.dtype == torch.int64 and out.shape == (52,)
        assert torch.equal(out[:23], locs)
        # spec_utils: fill_front_out_cache_loc_func(num_front, batch.out_cache_loc, zeros)
        window = torch.randperm(10_000)[:52].view(4, 13)
        front = torch.zeros(52, dtype=torch.int64)
        fill_front_out_cache_loc_func(torch.tensor([2, 0, 13, 1]), window.flatten(), front)
        want = torch.cat([window[0, :2], window[2, :13], window[3, :1]])
        assert torch.equal(front[:16], want) and not front[16:].any()

    def mha_pool_move_kv_cache() -> None:
        """A real MHATokenToKVPool: its warm-up and move_kv_cache go through
        copy_all_layer_kv_cache_func -> the stand-in, with the pool's own pointers."""
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        pool = MHATokenToKVPool(
            size=600, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=3,
            device="cpu", enable_memory_saver=False, enable_kv_cache_copy=True,
        )  # fmt: skip
        assert not pool.use_native_move_kv_cache
        bufs = [*pool.k_buffer, *pool.v_buffer]
        for b in bufs:
            b.copy_(torch.randn(b.shape).to(b.dtype))
        moves = [
            (torch.tensor([4, 5, 6, 7]), torch.tensor([3, 4, 5, 6])),  # overlapping
            (torch.tensor([11, 10]), torch.tensor([10, 11])),  # swap
            (torch.arange(300, 600), torch.arange(0, 300)),  # > 256: chunked by SGLang
        ]
        for tgt, src in moves:
            before = [b.clone() for b in bufs]
            pool.move_kv_cache(tgt, src)
            for b0, b in zip(before, bufs, strict=True):
                want = b0.clone()
                want[tgt] = b0[src]
                assert torch.equal(b, want)

    def rotary_hf_vs_sglang() -> None:
        """transformers' Llama rotary on the original rows == SGLang's interleaved rotary
        (rope_is_neox_style=false) on llama.cpp's rows, with both libraries' own code."""
        from sglang.srt.layers.rotary_embedding.utils import apply_rotary_emb
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        n_head, dim, t = 4, 16, 7
        q = torch.randn(t, n_head, dim, dtype=torch.float64)
        k = torch.randn(t, n_head, dim, dtype=torch.float64)
        cos, sin = rope_cos_sin(torch.arange(t) * 11, dim, 10000.0)
        emb_cos, emb_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        hf_q, hf_k = apply_rotary_pos_emb(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb_cos[None], emb_sin[None]
        )
        hf = torch.einsum("hid,hjd->hij", hf_q[0], hf_k[0])
        perm = llama_cpp_permute(torch.arange(n_head * dim), n_head).view(n_head, dim)
        qg, kg = q.flatten(1)[:, perm.flatten()].view_as(q), k.flatten(1)[:, perm.flatten()]
        kg = kg.view_as(k)
        sq = apply_rotary_emb(qg, cos, sin, is_neox_style=False)
        sk = apply_rotary_emb(kg, cos, sin, is_neox_style=False)
        torch.testing.assert_close(torch.einsum("ihd,jhd->hij", sq, sk), hf)
        torch.testing.assert_close(sq, rotary_gptj(qg, cos, sin), rtol=0, atol=0)
        wrong = torch.einsum(
            "ihd,jhd->hij",
            apply_rotary_emb(qg, cos, sin, is_neox_style=True),
            apply_rotary_emb(kg, cos, sin, is_neox_style=True),
        )
        assert not torch.allclose(wrong, hf, atol=1e-3)

    for fn in (
        platform,
        qkv_dense_weight,
        qkv_hooked_apply,
        embedding_hook,
        unhooked_path_without_dense,
        sglang_call_sites,
        mha_pool_move_kv_cache,
        rotary_hf_vs_sglang,
    ):
        check(fn)
    print(json.dumps(results))


SGLANG_CHECKS = [
    "platform",
    "qkv_dense_weight",
    "qkv_hooked_apply",
    "embedding_hook",
    "unhooked_path_without_dense",
    "sglang_call_sites",
    "mha_pool_move_kv_cache",
    "rotary_hf_vs_sglang",
]


@pytest.fixture(scope="module")
def sglang_child(
    smollm2: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed")
    npz = tmp_path_factory.mktemp("sglang_child") / "tensors.npz"
    np.savez(
        npz,
        q=smollm2["attn_q"][0],
        k=smollm2["attn_k"][0],
        v=smollm2["token_embd"][0][:192],  # a Q8_0 shard of the right width (576)
        embd=smollm2["token_embd"][0],
    )
    code = "import runpy, sys; runpy.run_path(sys.argv[1])['child_sglang'](sys.argv[2])"
    r = subprocess.run(
        [sys.executable, "-c", code, __file__, str(npz)],
        check=False,
        env=child_env(SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", SGLANG_CHECKS)
def test_in_sglang_cpu_process(sglang_child: dict[str, str], name: str) -> None:
    assert sglang_child.get(name) == "ok", sglang_child.get(name, f"{name} did not run")


# ============================================================================ 4. plugin
def test_apply_gguf_rope_fix_namespace_and_engine_kwargs(
    tiny_gguf: dict[str, str], tmp_path: Path
) -> None:
    from oscar_kv.sglang.plugin import _apply_gguf_rope_fix

    llama, qwen = tiny_gguf["llama"], tiny_gguf["qwen2"]
    fixed = {"rope_is_neox_style": False}
    # ServerArgs' default for the flag is "{}"
    ns = argparse.Namespace(model_path=llama, json_model_override_args="{}")
    _apply_gguf_rope_fix(ns)
    assert json.loads(ns.json_model_override_args) == fixed
    ns = argparse.Namespace(model_path=llama, json_model_override_args='{"a": 1}')
    _apply_gguf_rope_fix(ns)
    assert json.loads(ns.json_model_override_args) == {"a": 1, **fixed}
    user = '{"rope_is_neox_style": true}'
    ns = argparse.Namespace(model_path=llama, json_model_override_args=user)
    _apply_gguf_rope_fix(ns)
    assert ns.json_model_override_args == user
    for path in (qwen, str(tmp_path)):
        ns = argparse.Namespace(model_path=path, json_model_override_args="{}")
        _apply_gguf_rope_fix(ns)
        assert ns.json_model_override_args == "{}"

    kwargs: dict[str, Any] = {"model_path": llama, "tp_size": 1}  # sglang.Engine(**kwargs)
    _apply_gguf_rope_fix(kwargs)
    assert json.loads(kwargs.pop("json_model_override_args")) == fixed
    assert kwargs == {"model_path": llama, "tp_size": 1}
    kwargs = {"model_path": llama, "json_model_override_args": '{"b": 2}'}
    _apply_gguf_rope_fix(kwargs)
    assert json.loads(kwargs["json_model_override_args"]) == {"b": 2, **fixed}
    for kwargs in ({"model_path": qwen}, {"tp_size": 2}):
        before = dict(kwargs)
        _apply_gguf_rope_fix(kwargs)
        assert kwargs == before  # nothing added
    with pytest.raises(ValueError, match="not valid JSON"):
        _apply_gguf_rope_fix({"model_path": llama, "json_model_override_args": "{oops"})
