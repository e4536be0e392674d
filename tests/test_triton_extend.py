"""The Triton extend's prefix workspace: each page dequantized once, chunked walks.

A request whose new tokens span several work items has its pages dequantized once into a
workspace (`dequantize_prefix_kernel`) that all its work items read; the fused kernel keeps
the requests of one work item. tests/test_ops_extend.py checks both against the reference
on mixed batches; here the workspace contents themselves, and prefixes walked in several
chunks of a small workspace.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, build_cache
from oscar_kv import OscarConfig, ops
from oscar_kv import triton as tri
from oscar_kv.ref.quant import dequantize_pages
from oscar_kv.triton import api
from oscar_kv.triton._env import scope
from oscar_kv.triton.extend import dequantize_prefix_kernel
from test_ops_extend import close, inputs


def test_prefix_workspace_holds_each_multi_item_page_once():
    """Pages of requests with several work items are written, in the rotated unit-scaled
    basis the kernels dot with (the reference's dequantize_pages, exactly); the others'
    columns are left alone."""
    h, group, d = 2, 2, 64
    bm = api.extend_block_tokens(group, d)
    lens, new = [300, 256, 40], [bm + 6, bm, 3 * bm]  # several items, one item, no pages
    cache = build_cache(OscarConfig(), lens, h, d)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cols = cache.page_table.shape[1]
    ws = torch.full((len(lens), h, cols * 128, d), float("nan"), device=DEVICE)
    ws_v = ws.clone()
    la = api._layout_args(cache.layout)
    with scope():
        dequantize_prefix_kernel[(len(lens), cols, h)](
            cache.pool.to(DEVICE), cache.pool.stride(0), cache.page_table.to(DEVICE),
            cache.page_table.stride(0), cache.num_pages.to(DEVICE), cu.to(DEVICE), ws, ws_v, 0,
            H=h, BM=bm, TC=32,
            **{k: la[k] for k in ("OFF_KC", "OFF_VC", "OFF_KS", "OFF_KZ", "OFF_VS", "OFF_VZ",
                                  "D", "BITS", "KG", "VG")},
        )  # fmt: skip
    k_ref, v_ref = dequantize_pages(cache.qkvs[0])
    n0 = k_ref.shape[0]
    assert torch.equal(ws[0, :, :n0].cpu(), k_ref.transpose(0, 1))
    assert torch.equal(ws_v[0, :, :n0].cpu(), v_ref.transpose(0, 1))
    assert ws[1:].isnan().all() and ws_v[1:].isnan().all()


@pytest.mark.parametrize("cfg", [OscarConfig(), OscarConfig(bits=4, k_group=64, norm="head")],
                         ids=lambda c: c.label)  # fmt: skip
def test_extend_prefix_in_several_chunks(cfg, monkeypatch):
    """A workspace of one page-table column: the prefix is walked in as many chunks as
    pages, the running softmax state carried between them."""
    monkeypatch.setattr(api, "EXTEND_WORKSPACE_BYTES", 1)
    cache, q, k_new, v_new, cu, want = inputs(cfg, [384, 130, 0], [70, 9, 40], 2, 2, 64)
    kv = cache.paged_kv()
    close(tri.extend_attention(q, k_new, v_new, cu, kv, 0, 64**-0.5, True), want, 1e-4)
    close(ops.extend_attention(q, k_new, v_new, cu, kv, backend="triton"), want, 5e-3)


def test_fused_kernel_leaves_multi_item_requests_to_the_workspace(monkeypatch):
    """The fused kernel sees a pool whose pages of the several-work-item request are
    garbage (NaN scales): the output still matches, so it never dequantizes them again."""
    cache, q, k_new, v_new, cu, want = inputs(OscarConfig(), [300, 256], [70, 5], 2, 2, 64)
    kv = cache.paged_kv()
    pool = kv.layer(0)[0]
    poisoned = pool.clone()
    poisoned[cache.page_table[0, : int(cache.num_pages[0])].long()] = 0xFF
    real = api.extend_kernel

    class Poisoned:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                swap = [
                    poisoned if isinstance(a, torch.Tensor) and a.data_ptr() == pool.data_ptr()
                    else a
                    for a in args
                ]  # fmt: skip
                assert any(a is poisoned for a in swap)
                return real[grid](*swap, **kwargs)

            return launch

    monkeypatch.setattr(api, "extend_kernel", Poisoned())
    close(tri.extend_attention(q, k_new, v_new, cu, kv, 0, 64**-0.5, True), want, 1e-4)
