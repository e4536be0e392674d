"""extend_attention: new tokens attend causally to packed pages, the tail, and themselves."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, build_cache, make_kv
from oscar_kv import OscarConfig, ops
from oscar_kv.ref import attention
from oscar_kv.ref.quant import QuantizedKV


def run(cfg, lens, new, h=2, group=2, d=64, backend="triton"):
    cache = build_cache(cfg, lens, h, d, kind="outlier", seed=3)
    gen = torch.Generator().manual_seed(4)
    n = sum(new)
    k_new, v_new = make_kv(n, h, d, "random", gen)
    q = torch.randn(n, h * group, d, generator=gen)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    want = []
    for b, qkv in enumerate(cache.qkvs):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if hi == lo:
            continue
        ext = QuantizedKV(**{**qkv.__dict__, "k_tail": torch.cat((qkv.k_tail, k_new[lo:hi])),
                             "v_tail": torch.cat((qkv.v_tail, v_new[lo:hi]))})  # fmt: skip
        want.append(attention(q[lo:hi], ext))
    got = ops.extend_attention(
        q.to(DEVICE), k_new.to(DEVICE), v_new.to(DEVICE), cu, *cache.decode_args(),
        cache.tail_len, cfg, tail_index=cache.tail_index, backend=backend,
    )  # fmt: skip
    want = torch.cat(want)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max())


def test_extend_triton_matches_reference():
    # A request with pages and a tail, one with an empty tail, one brand new, one idle.
    run(OscarConfig(), [300, 256, 0, 40], [5, 130, 3, 0])


def test_extend_triton_gqa_kivi_and_head_norm():
    run(OscarConfig.kivi(), [129], [17], h=1, group=8)
    run(OscarConfig(bits=4, norm="head", fold_v=True), [200], [2], h=2, group=1)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_extend_cpu_backends(backend):
    run(OscarConfig(), [130, 7], [3, 4], backend=backend)
