"""All ops on CUDA tensors, CUDA and Triton backends, against the reference (GPU only).

These are the proof of the kernels on real hardware: run them whenever a GPU is at hand
(``pytest -m gpu``). Shapes are the Qwen3-8B attention layer's (8 KV heads, GQA 4, D=128)
plus the edges (D 64/256, GQA 1/8, bits 4, KIVI, lengths around page boundaries).
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import build_cache, make_kv
from oscar_kv import OscarConfig, ops
from oscar_kv.layout import PageLayout
from oscar_kv.ref import attention, fwht
from test_triton_quant import assert_same_pages, reference_pages

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BACKENDS = ["cuda", "triton"]


@pytest.fixture(scope="module", autouse=True)
def _build_cuda_ext():
    if torch.cuda.is_available():
        from oscar_kv.cuda import jit

        jit.load()  # a build failure must fail these tests, not silently fall back


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("h", "d", "cfg"),
    [
        (8, 128, OscarConfig()),
        (8, 128, OscarConfig(k_group=128)),
        (4, 64, OscarConfig(bits=4, norm="head")),
        (2, 256, OscarConfig(k_group=64, fold_v=True)),
        (3, 128, OscarConfig.kivi()),
    ],
)
@pytest.mark.parametrize("kind", ["random", "outlier", "tiny"])
def test_quantize_page_byte_identical_on_gpu(backend, h, d, cfg, kind):
    k, v = make_kv(3 * 128, h, d, kind, torch.Generator().manual_seed(h + d))
    k, v = k.view(3, 128, h, d), v.view(3, 128, h, d)
    layout = PageLayout.of(cfg, h, d)
    pool = layout.alloc_pool(5, CUDA)
    ids = torch.tensor([4, 0, 2], device=CUDA)
    ops.quantize_page(k.to(CUDA), v.to(CUDA), pool, ids, cfg, backend=backend)
    assert_same_pages(pool[ids].cpu(), reference_pages(k, v, cfg), cfg, h, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_page_skips_negative_page_ids_on_gpu(backend):
    """The fixed per-request grid: entries with page id -1 write nothing, the rest as usual."""
    cfg = OscarConfig()
    k, v = make_kv(3 * 128, 8, 128, "outlier", torch.Generator().manual_seed(9))
    k, v = k.view(3, 128, 8, 128).to(CUDA), v.view(3, 128, 8, 128).to(CUDA)
    base = torch.randint(0, 256, (5, PageLayout.of(cfg, 8, 128).page_bytes), dtype=torch.uint8,
                         device=CUDA)  # fmt: skip
    pool = base.clone()
    ops.quantize_page(k, v, pool, torch.tensor([3, -1, 1], device=CUDA), cfg, backend=backend)
    assert torch.equal(pool[[0, 2, 4]], base[[0, 2, 4]])  # row 4: where -1 would wrap to
    assert_same_pages(pool[[3, 1]].cpu(), reference_pages(k[[0, 2]].cpu(), v[[0, 2]].cpu(), cfg),
                      cfg, 8, 128)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("h", "group", "d", "cfg"),
    [
        (8, 4, 128, OscarConfig()),
        (8, 4, 128, OscarConfig.kivi()),
        (8, 1, 128, OscarConfig(bits=4, k_group=64, norm="head")),
        (2, 8, 64, OscarConfig(fold_v=True)),
        (2, 2, 256, OscarConfig(k_group=128)),
        (1, 16, 128, OscarConfig()),  # Llama-405B-like: 128 q heads over 8 KV heads
        (1, 16, 256, OscarConfig(bits=4, v_group=16)),  # the largest shared-memory plan
    ],
)
def test_decode_matches_reference_on_gpu(backend, h, group, d, cfg):
    lens = [1, 127, 128, 1000, 4100]
    cache = build_cache(cfg, lens, h, d, kind="outlier", seed=1, device=CUDA)
    q = torch.randn(len(lens), h * group, d, generator=torch.Generator().manual_seed(2))
    q = q.bfloat16().float()
    want = torch.cat([attention(q[b : b + 1], qkv) for b, qkv in enumerate(cache.qkvs)])
    for splits in (None, 1, 3):
        got = ops.decode_attention(q.to(CUDA).bfloat16(), cache.paged_kv(), num_splits=splits,
                                   backend=backend)  # fmt: skip
        big = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=1e-2 * big)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extend_matches_reference_on_gpu(backend):
    cfg = OscarConfig()
    cache = build_cache(cfg, [300, 0, 1000], 8, 128, seed=5, device=CUDA)
    k_new, v_new = make_kv(270, 8, 128, "random", torch.Generator().manual_seed(6))
    q = torch.randn(270, 32, 128, generator=torch.Generator().manual_seed(7)).bfloat16().float()
    cu = torch.tensor([0, 30, 70, 270], dtype=torch.int32)
    got = ops.extend_attention(q.to(CUDA), k_new.to(CUDA), v_new.to(CUDA), cu,
                               cache.paged_kv(), backend=backend)  # fmt: skip
    want = ops.extend_attention(q, k_new, v_new, cu, cache.paged_kv(torch.device("cpu")),
                                backend="ref")  # fmt: skip
    # Triton's fused kernel feeds fp16 operands to the tensor cores, as decode does.
    big = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.cpu(), want, rtol=5e-3, atol=5e-3 * big)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotate_q_bit_identical_on_gpu(backend):
    for d in (64, 128, 256):
        q = torch.randn(5, 32, d)
        assert torch.equal(ops.rotate_q(q.to(CUDA), backend=backend).cpu(), fwht(q))


def test_cuda_is_the_default_backend_and_meta_shapes():
    assert ops.resolve_backend(None, CUDA) == "cuda"
    q = torch.empty(3, 32, 128, device="meta", dtype=torch.bfloat16)
    pool = torch.empty(10, 98816, device="meta", dtype=torch.uint8)
    i32 = torch.empty(3, device="meta", dtype=torch.int32)
    tail = torch.empty(4, 128, 8, 128, device="meta", dtype=torch.bfloat16)
    out = torch.ops.oscar_kv.decode_attention(q, pool, torch.empty(3, 5, device="meta",
                                              dtype=torch.int32), i32, tail, tail, i32, i32,
                                              0.1, 0, 8, 128, 2, 32, 32, 1, 1, 1)  # fmt: skip
    assert out.shape == q.shape and out.dtype == q.dtype


def test_opcheck_cuda_ops():
    """torch.library.opcheck on every CUDA op: schemas (quantize_pages mutates only the
    pool), Meta/fake kernels that agree with the real ones, and aot-dispatch tracing."""
    cfg = OscarConfig()
    cache = build_cache(cfg, [300, 5], 8, 128, seed=3, device=CUDA)
    layout = PageLayout.of(cfg, 8, 128)
    la = layout.native_args
    q = torch.randn(2, 32, 128, device=CUDA).bfloat16()
    k, v = make_kv(256, 8, 128, "random", torch.Generator().manual_seed(4))
    blocks = [t.view(2, 128, 8, 128).to(CUDA) for t in (k, v)]
    i32 = {"dtype": torch.int32, "device": CUDA}
    lib = torch.ops.oscar_kv
    checks = {
        "quantize_pages": (lib.quantize_pages.default, (*blocks, torch.arange(2, **i32),
                           torch.arange(2, **i32), layout.alloc_pool(2, CUDA), *la)),
        "decode_attention": (lib.decode_attention.default, (q, cache.pool, cache.page_table,
                             cache.num_pages, cache.k_tail, cache.v_tail, cache.tail_index,
                             cache.tail_len, 128**-0.5, 0, *la)),
        "dequantize_pages": (lib.dequantize_pages.default,
                             (cache.pool, cache.page_table[0, :2].contiguous(), *la)),
        "rotate_q": (lib.rotate_q.default, (q.float(),)),
    }  # fmt: skip
    for name, (op, args) in checks.items():
        results = torch.library.opcheck(op, args)
        assert all(r == "SUCCESS" for r in results.values()), (name, results)
