"""The C++ CPU decode kernel (`oscar_kv.cpu_kernels`, backend "cpu") matches the reference."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DECODE_CONFIGS, build_cache, config_id
from oscar_kv import OscarConfig, cpu_kernels, ops
from oscar_kv.layout import PageLayout
from oscar_kv.ref import attention
from oscar_kv.ref.quant import dequantize_kv
from test_attention_lse import direct_lse

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    cpu_kernels.ops_or_none() is None, reason="no C++ compiler for the CPU kernels"
)


def check(cfg, lens, h, group, d, kind="random", dtype=torch.float32, seed=0, tol=2e-5,
          tail_dtype=torch.bfloat16):  # fmt: skip
    cache = build_cache(cfg, lens, h, d, kind=kind, seed=seed, device=CPU)
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(len(lens), h * group, d, generator=gen)
    if kind == "outlier":
        q[:, :, 3] *= 10.0
    q = q.to(dtype)
    want = torch.cat([attention(q[b : b + 1].float(), qkv) for b, qkv in enumerate(cache.qkvs)])
    # q of any dtype must not be rounded to the tails' dtype (bf16-valued, exact in all).
    k_tail, v_tail = cache.k_tail.to(tail_dtype), cache.v_tail.to(tail_dtype)
    lse = torch.full(q.shape[:2], float("nan"))
    kv = cache.paged_kv(k_tail=k_tail, v_tail=v_tail)
    got = ops.decode_attention(q, kv, backend="cpu", lse=lse)
    assert got.dtype == dtype and got.shape == q.shape
    big = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * big)
    want_lse = torch.cat([direct_lse(q[b : b + 1].float(), dequantize_kv(qkv)[0], d**-0.5)
                          for b, qkv in enumerate(cache.qkvs)])  # fmt: skip
    big = max(1.0, float(want_lse.abs().max()))
    torch.testing.assert_close(lse, want_lse, rtol=tol, atol=tol * big)


# several pages + tail, exactly one page (empty tail), one token, tail of 127, one page + 1
LENS = [300, 128, 1, 127, 129]


def test_cpu_is_the_default_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("OSCAR_KV_BACKEND", raising=False)
    assert ops.resolve_backend(None, CPU) == "cpu"


@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_decode_gqa(group):
    check(OscarConfig(), LENS, 2, group, 64)


@pytest.mark.parametrize("cfg", DECODE_CONFIGS, ids=config_id)
def test_decode_configs(cfg):
    check(cfg, [257, 40, 128], 2, 2, 64)


@pytest.mark.parametrize("kind", ["outlier", "tiny"])
def test_decode_adversarial(kind):
    check(OscarConfig(), [384, 70], 2, 4, 64, kind=kind, seed=7)


@pytest.mark.parametrize("d", [128, 256])
def test_decode_head_dims(d):
    check(OscarConfig(), [200, 5], 2, 2, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_low_precision_tensors(dtype):
    check(OscarConfig(), LENS, 2, 4, 64, dtype=dtype, tol=1e-2)


def test_bad_inputs_are_named():
    cfg = OscarConfig()
    cache = build_cache(cfg, [300], 2, 64, device=CPU)
    q = torch.randn(1, 4, 64)
    bad_pt = cache.page_table.clone()
    bad_pt[0, 1] = cache.pool.shape[0] + 5
    cases = [
        (r"page_table\[0, 1\] = .* is not a pool row", {"page_table": bad_pt, "tail_index": None}),
        (r"tail_len\[0\] = 200 is outside", {"tail_len": torch.tensor([200]), "tail_index": None}),
        (r"tail_index\[0\] = 9 is not a tail slot", {"tail_index": torch.tensor([9])}),
    ]
    for message, fields in cases:
        kv = cache.paged_kv(**fields)  # valid shapes: only the kernel can tell
        with pytest.raises(ValueError, match=message):
            ops.decode_attention(q, kv, backend="cpu")


@pytest.mark.parametrize("tail_dtype", [torch.float32, torch.float16])
def test_decode_tail_dtypes(tail_dtype):
    # float32: what the CPU server's pool holds (--dtype float32).
    check(OscarConfig(), LENS, 2, 3, 64, tail_dtype=tail_dtype)


def test_portable_build_matches_the_reference():
    """The non-AVX2 C++ path (CPUs without AVX2), built and checked in a fresh process: the
    two builds register the same op namespace, so they cannot share one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from oscar_kv import cpu_kernels\n"
        "assert cpu_kernels.simd_flags() == []\n"
        "import test_cpu_kernels as t\n"
        "from oscar_kv import OscarConfig\n"
        "t.check(OscarConfig(), t.LENS, 2, 3, 64)\n"
        "t.check(OscarConfig(bits=4, k_group=64, norm='head', v_group=16), [300, 5], 1, 8, 128)\n"
        "print('portable ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OSCAR_KV_CPU_SIMD": "0"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900, check=False)  # fmt: skip
    assert r.returncode == 0 and "portable ok" in r.stdout, r.stderr[-3000:]


def test_opcheck_schema_and_fake_kernel():
    """torch.library.opcheck: the schema matches what the op does (no input mutated; the lse
    out tensor is declared), the Meta/fake kernel agrees with the real one on shape and
    dtype, and torch.compile can trace it (aot dispatch)."""
    cfg = OscarConfig()
    cache = build_cache(cfg, [300, 5], 2, 64, device=CPU)
    q = torch.randn(2, 4, 64)
    layout = PageLayout.of(cfg, 2, 64)
    args = (q, cache.pool, cache.page_table, cache.num_pages, cache.k_tail, cache.v_tail,
            cache.tail_index, cache.tail_len, 0.125, *layout.native_args)  # fmt: skip
    op = cpu_kernels.load().decode_attention.default
    for lse in ((), (torch.empty(2, 4),)):
        results = torch.library.opcheck(op, (*args, *lse))
        assert all(v == "SUCCESS" for v in results.values()), results
