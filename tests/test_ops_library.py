"""The oscar ops as torch operators: schemas, fake kernels (meta device), torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch

from oscar_kv import ops
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.paged import PagedKV

H, D, G = 2, 64, 2
OPS = ("quantize_pages", "rotate_q", "decode_attention", "extend_attention", "dequantize_pages")


def _cache(device: str = "cpu"):
    cfg = OscarConfig()
    layout = ops.PageLayout.of(cfg, H, D)
    gen = torch.Generator().manual_seed(0)
    pool = layout.alloc_pool(4)
    k, v = (torch.randn(2, BLOCK_TOKENS, H, D, generator=gen) for _ in "kv")
    ops.quantize_page(k, v, pool, torch.tensor([1, 3]), cfg)
    tails = [torch.randn(2, BLOCK_TOKENS, H, D, generator=gen).bfloat16() for _ in "kv"]
    kv = PagedKV.single_layer(
        layout, pool, *tails, torch.tensor([[1, 3], [3, 0]]), torch.tensor([2, 1]),
        torch.tensor([5, 0]),
    )  # fmt: skip
    if device != "cpu":
        kv = kv.with_batch(**{
            f: getattr(kv, f).to(device)
            for f in ("pages", "k_res", "v_res", "page_table", "num_pages", "tail_len", "tail_index")
        })  # fmt: skip
    return cfg, layout, kv, k, v


def test_every_op_is_a_torch_operator_with_a_fake_kernel():
    for name in OPS:
        op = getattr(torch.ops.oscar, name)
        assert op.default._schema.name == f"oscar::{name}"


def test_ops_run_their_fake_kernels_on_meta():
    cfg, _layout, kv, k, v = _cache("meta")
    q = torch.empty(2, H * G, D, device="meta")
    out = ops.decode_attention(q, kv)
    assert out.device.type == "meta" and out.shape == q.shape
    qn = torch.empty(7, H * G, D, device="meta")
    kn = torch.empty(7, H, D, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    assert ops.extend_attention(qn, kn, kn, cu, kv).shape == qn.shape
    lse = torch.empty(7, H * G, device="meta")
    assert ops.extend_attention(qn, kn, kn, cu, kv, lse=lse).shape == qn.shape
    assert ops.decode_attention(q, kv, lse=lse[:2]).shape == q.shape
    ops.quantize_page(k.to("meta"), v.to("meta"), kv.pages[0], torch.empty(2, device="meta"), cfg)
    kd, _vd = ops.dequantize_pages(
        kv.pages[0], torch.empty(3, dtype=torch.int32, device="meta"), cfg, H, D
    )
    assert kd.shape == (3, BLOCK_TOKENS, H, D) and kd.device.type == "meta"
    assert ops.rotate_q(q).dtype == torch.float32


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend, with_lse):
    """Schema (declared mutations: the lse out tensor too), fake-vs-real shapes and dtypes,
    autograd registration."""
    _cfg, layout, kv, k, v = _cache()
    pool, kt, vt = kv.layer(0)
    args = layout.native_args
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, H * G, D, generator=gen)
    if backend == "cpu" and ops._cpu_ops() is None:
        pytest.skip("C++ CPU kernels not built")
    lse = (torch.empty(2, H * G),) if with_lse else ()
    torch.library.opcheck(
        torch.ops.oscar.decode_attention.default,
        (q, pool, kt, vt, kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index, None, None,
         D**-0.5, 0, args, backend, *lse),
    )  # fmt: skip
    qn, kn = torch.randn(5, H * G, D, generator=gen), torch.randn(5, H, D, generator=gen)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    lse = (torch.empty(5, H * G),) if with_lse else ()
    torch.library.opcheck(
        torch.ops.oscar.extend_attention.default,
        (qn, kn, kn, cu, pool, kt, vt, kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index,
         None, 0, D**-0.5, args, "torch", *lse),
    )  # fmt: skip
    src, pid = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2, -1], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.oscar.quantize_pages.default, (k, v, src, pid, pool.clone(), args, "torch")
    )
    torch.library.opcheck(
        torch.ops.oscar.dequantize_pages.default,
        (pool, torch.tensor([1, 3], dtype=torch.int32), args, "torch"),
    )
    torch.library.opcheck(torch.ops.oscar.rotate_q.default, (q, "torch"))


def test_lse_out_tensor_is_checked():
    """A wrong dtype, shape or device of lse is refused before any kernel runs."""
    _cfg, _layout, kv, _k, _v = _cache()
    q = torch.randn(2, H * G, D)
    for bad in (torch.empty(2, H * G, dtype=torch.float64), torch.empty(2, H),
                torch.empty(2, H * G, device="meta")):  # fmt: skip
        with pytest.raises(ValueError, match="lse must be float32"):
            ops.decode_attention(q, kv, lse=bad)


def test_fake_kernel_refuses_mixed_devices():
    """K/V on meta, the pool left on the CPU: refused, not silently copied."""
    cfg, _layout, kv, k, v = _cache()
    with pytest.raises(RuntimeError, match="same device"):
        ops.quantize_page(k.to("meta"), v.to("meta"), kv.pages[0], torch.tensor([1, 2]), cfg)
