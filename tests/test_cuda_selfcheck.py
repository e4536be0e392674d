"""The first-use check that stands between the CUDA ops and the dispatcher.

Without a GPU the check runs against stand-ins with the CUDA ops' signatures, backed by the
torch ops on CPU: a faithful one must pass, and each kind of wrong answer must be named.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from oscar_kv import OscarConfig, ops
from oscar_kv.cuda import selfcheck

NORMS = {0: "none", 1: "token", 2: "head"}


def config_of(la: tuple[int, ...]) -> OscarConfig:
    _h, _d, bits, k_group, v_group, norm, rot_k, rot_v = la
    return OscarConfig(bits=bits, k_group=k_group, v_group=v_group, norm=NORMS[norm],
                       rotation="hadamard" if rot_k else "none", fold_v=bool(rot_k and not rot_v))  # fmt: skip


class TorchBackedOps:
    """`jit.CudaOps`' methods over CPU tensors, computed by the batched torch ops."""

    def quantize_pages(self, k, v, src_index, page_ids, pool, layout):
        ops.quantize_page(k, v, pool, page_ids, layout.config, src_index=src_index,
                          backend="torch")  # fmt: skip

    def decode_attention(self, q, kv, layer, scale, num_splits):
        return ops.decode_attention(q, kv, layer=layer, scale=scale, num_splits=num_splits,
                                    backend="torch")  # fmt: skip

    def rotate_q(self, q):
        return ops.rotate_q(q, backend="ref")


def test_layout_args_round_trip():
    for cfg, h, d, _ in selfcheck.CASES:
        assert config_of(selfcheck._layout_args(cfg, h, d)) == cfg


def test_stand_ins_have_the_cuda_ops_face():
    import inspect

    from oscar_kv.cuda import jit

    for name in ("quantize_pages", "decode_attention", "rotate_q"):
        want = list(inspect.signature(getattr(jit.CudaOps, name)).parameters)
        assert list(inspect.signature(getattr(TorchBackedOps, name)).parameters) == want, name


def test_faithful_ops_pass():
    assert selfcheck.disagreement(TorchBackedOps(), torch.device("cpu")) is None


class FlipsOneByte(TorchBackedOps):
    def quantize_pages(self, k, v, src_index, page_ids, pool, layout):
        super().quantize_pages(k, v, src_index, page_ids, pool, layout)
        pool[page_ids[-1].long(), 100] ^= 1


class SkipsTheTail(TorchBackedOps):
    def decode_attention(self, q, kv, layer, scale, num_splits):
        tlen = kv.tail_len.clone()
        tlen[0] = 0  # request 0 has pages: forgetting its tail is a quiet wrong answer
        return super().decode_attention(q, kv.with_batch(tail_len=tlen), layer, scale,
                                         num_splits)  # fmt: skip


class ReturnsNaN(TorchBackedOps):
    def decode_attention(self, *args):
        return super().decode_attention(*args) * float("nan")


class RoundsQ(TorchBackedOps):
    def rotate_q(self, q):
        return super().rotate_q(q).bfloat16().float()


@pytest.mark.parametrize(
    ("bad", "named"),
    [(FlipsOneByte, "quantize_pages wrote 1 wrong bytes"), (SkipsTheTail, "decode_attention off"),
     (ReturnsNaN, "decode_attention off by nan"), (RoundsQ, "rotate_q differs")],
)  # fmt: skip
def test_each_wrong_answer_is_named(bad, named):
    problem = selfcheck.disagreement(bad(), torch.device("cpu"))
    assert problem is not None and named in problem


def test_dispatch_falls_back_to_triton_with_one_warning(monkeypatch):
    from oscar_kv.cuda import jit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(jit, "load", lambda: FlipsOneByte())
    monkeypatch.setattr(selfcheck, "disagreement", lambda cuda, dev: "quantize_pages wrote 1")
    ops._cuda_ops.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="disagree with the reference: quantize_pages"):
            assert ops._cuda_ops() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ops._cuda_ops() is None  # decided once per process, warned once
        monkeypatch.setenv("OSCAR_KV_CUDA_SELFCHECK", "0")
        ops._cuda_ops.cache_clear()
        assert isinstance(ops._cuda_ops(), FlipsOneByte)
    finally:
        ops._cuda_ops.cache_clear()


def test_dispatch_reports_a_failed_build(monkeypatch):
    from oscar_kv.cuda import jit

    def no_nvcc():
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(jit, "load", no_nvcc)
    ops._cuda_ops.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="unavailable: RuntimeError: nvcc not found"):
            assert ops._cuda_ops() is None
    finally:
        ops._cuda_ops.cache_clear()
