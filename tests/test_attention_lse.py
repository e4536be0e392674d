"""The attention ops' log-sum-exp (``lse`` of ops.decode_attention / ops.extend_attention).

Every backend's lse must equal a direct fp32 logsumexp of scale * q . k over the dequantized
cache (`PageLayout.pages_to_qkv` + the reference's `dequantize_kv`), on random and
adversarial inputs; and two halves' (out, lse) must merge into attention over the whole:
the property that lets attention over a sink page (the first page, stored wider) be
computed apart and merged with the kernel's part over the rest.

CPU backends: ref, torch, cpu (C++), triton (interpreter, small shapes: it is slow). The
gpu-marked cases run CUDA and Triton on a device.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICE, build_cache, make_kv
from oscar_kv import OscarConfig, ops
from oscar_kv import torchops as tops
from oscar_kv import triton as tri
from oscar_kv.ref.quant import dequantize_kv

CPU = torch.device("cpu")
LENS = [300, 128, 1, 127, 129, 257]  # pages + tail, one page, one token, tails of 127 / 1
# (kv heads, GQA group, head_dim)
SHAPES = [(2, 1, 64), (2, 4, 128), (1, 8, 64)]
CONFIGS = [
    OscarConfig(bits=4, k_group=64, norm="head"),
    OscarConfig.kivi(),
    OscarConfig(fold_v=True),
]
EXT_LENS, EXT_NEW = [300, 128, 0, 40, 5], [5, 130, 3, 0, 1]  # + idle and brand-new requests


def _cpu_kernels() -> None:
    if ops._cpu_ops() is None:
        pytest.skip("C++ CPU kernels not built")


def device_of(backend: str) -> torch.device:
    return {"triton": DEVICE, "cuda": torch.device("cuda")}.get(backend, CPU)


def queries(n: int, hq: int, d: int, kind: str, seed: int) -> torch.Tensor:
    q = torch.randn(n, hq, d, generator=torch.Generator().manual_seed(seed))
    if kind == "outlier":
        q[:, :, 3] *= 10.0
    return q.bfloat16().float()


def request_kv(cache, b: int, k_new: torch.Tensor | None = None) -> torch.Tensor:
    """Request b's keys in the model basis, fp32 [T, H, D]: dequantized pages, tail (and new
    tokens)."""
    npg, nt = int(cache.num_pages[b]), int(cache.tail_len[b])
    slot = int(cache.tail_index[b])
    kt, vt = cache.k_tail[slot, :nt].cpu(), cache.v_tail[slot, :nt].cpu()
    if k_new is not None:
        kt = torch.cat((kt, k_new.cpu().to(kt.dtype)))
        vt = torch.cat((vt, torch.zeros_like(k_new.cpu()).to(vt.dtype)))
    qkv = cache.layout.pages_to_qkv(cache.pool.cpu(), cache.page_table[b, :npg].cpu(), kt, vt)
    return dequantize_kv(qkv)[0]


def direct_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """logsumexp_j(scale * q_i . k_j) over j <= i's position, q [n, Hq, D] the last n of
    k's [T, H, D] positions: fp32 [n, Hq]."""
    n, hq, _ = q.shape
    t, h, _ = k.shape
    kk = k.repeat_interleave(hq // h, dim=1)  # [T, Hq, D]
    logits = torch.einsum("nhd,thd->nht", q.double(), kk.double()) * scale
    visible = torch.arange(t)[None, :] <= torch.arange(t - n, t)[:, None]
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.logsumexp(logits, dim=-1).float()


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    big = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float().cpu(), want.float(), rtol=tol, atol=tol * big)


def merge(o1, l1, o2, l2):
    """(out, lse) of attention over the union of two disjoint key sets."""
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    o = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return o, m + torch.log(w1 + w2)


# ---------------------------------------------------------------------------- decode


def decode_with_lse(backend, q, kv, num_splits=None):
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    if backend == "triton-precise":
        kv = kv.with_batch(num_splits=num_splits)
        out = tri.decode_attention(q, kv, 0, q.shape[2] ** -0.5, True, lse=lse)
    else:
        out = ops.decode_attention(q, kv, backend=backend, lse=lse, num_splits=num_splits)
    return out, lse


def check_decode(backend, cfg, lens, h, group, d, kind, tol, seed=0, **kw):
    dev = device_of(backend.split("-")[0])
    cache = build_cache(cfg, lens, h, d, kind=kind, seed=seed, device=dev)
    q = queries(len(lens), h * group, d, kind, seed + 1)
    _out, lse = decode_with_lse(backend, q.to(dev), cache.paged_kv(), **kw)
    want = torch.cat(
        [direct_lse(q[b : b + 1], request_kv(cache, b), d**-0.5) for b in range(len(lens))]
    )
    close(lse, want, tol)


@pytest.mark.parametrize("backend", ["ref", "torch", "cpu"])
@pytest.mark.parametrize(("h", "group", "d"), SHAPES)
@pytest.mark.parametrize("kind", ["random", "outlier", "tiny"])
def test_decode_lse(backend, h, group, d, kind):
    if backend == "cpu":
        _cpu_kernels()
    check_decode(backend, OscarConfig(), LENS, h, group, d, kind, 2e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.label}{'-foldv' if c.fold_v else ''}")
def test_decode_lse_configs(backend, cfg):
    if backend == "cpu":
        _cpu_kernels()
    check_decode(backend, cfg, LENS, 2, 4, 64, "outlier", 2e-5)


def test_decode_lse_triton():
    """fp32 dots (precise) tightly, over 1 and 2 splits; the default fp16 operands loosely."""
    for splits in (1, 2):
        check_decode("triton-precise", OscarConfig(), [300, 1, 129], 2, 2, 64, "outlier", 2e-5,
                     num_splits=splits)  # fmt: skip
    check_decode("triton", OscarConfig(), [300, 1, 129], 2, 2, 64, "outlier", 5e-3, num_splits=2)


def check_decode_merge(backend, tol, lens=(300, 257, 140), h=2, group=4, d=64, **kw):
    """First page apart (what a sink page is), pages 1.. + tail by the backend, merged by
    the two lse: the backend's attention over everything."""
    dev = device_of(backend.split("-")[0])
    cache = build_cache(OscarConfig(), list(lens), h, d, kind="outlier", seed=5, device=dev)
    q = queries(len(lens), h * group, d, "outlier", 6).to(dev)
    out, lse = decode_with_lse(backend, q, cache.paged_kv(), **kw)
    zeros = torch.zeros_like(cache.tail_len)
    first = cache.paged_kv(num_pages=torch.clamp(cache.num_pages, max=1), tail_len=zeros)
    rest = cache.paged_kv(page_table=cache.page_table[:, 1:], num_pages=cache.num_pages - 1)
    o1, l1 = decode_with_lse(backend, q, first, **kw)
    o2, l2 = decode_with_lse(backend, q, rest, **kw)
    o, m = merge(o1, l1, o2, l2)
    close(o, out.float(), tol)
    close(m, lse, tol)


@pytest.mark.parametrize("backend", ["ref", "torch", "cpu"])
def test_decode_halves_merge_into_the_whole(backend):
    if backend == "cpu":
        _cpu_kernels()
    check_decode_merge(backend, 1e-4)


def test_decode_halves_merge_into_the_whole_triton():
    check_decode_merge("triton-precise", 1e-4, lens=(300, 140), h=1, group=2)


# ---------------------------------------------------------------------------- extend


def extend_inputs(cfg, lens, new, h, group, d, kind, dev, seed=3):
    cache = build_cache(cfg, lens, h, d, kind=kind, seed=seed, device=dev)
    gen = torch.Generator().manual_seed(seed + 1)
    k_new, v_new = make_kv(sum(new), h, d, kind, gen)
    q = queries(sum(new), h * group, d, kind, seed + 2)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    return cache, q.to(dev), k_new.to(dev), v_new.to(dev), cu.to(dev)


def extend_with_lse(backend, q, k_new, v_new, cu, kv):
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    if backend == "triton-precise":
        out = tri.extend_attention(q, k_new, v_new, cu, kv, 0, q.shape[2] ** -0.5, True, lse=lse)
    elif backend == "workspace":
        out = ops._extend_via_workspace("triton", q, k_new, v_new, cu, kv, q.shape[2] ** -0.5, lse)
    else:
        out = ops.extend_attention(q, k_new, v_new, cu, kv, backend=backend, lse=lse)
    return out, lse


def extend_want(cache, q, k_new, cu, d):
    want = torch.full(q.shape[:2], float("nan"))
    for b in range(cu.shape[0] - 1):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if hi > lo:
            k = request_kv(cache, b, k_new[lo:hi])
            want[lo:hi] = direct_lse(q[lo:hi].cpu(), k, d**-0.5)
    return want


def check_extend(backend, cfg, lens, new, h, group, d, kind, tol):
    dev = device_of("triton" if backend == "workspace" else backend.split("-")[0])
    cache, q, k_new, v_new, cu = extend_inputs(cfg, lens, new, h, group, d, kind, dev)
    _out, lse = extend_with_lse(backend, q, k_new, v_new, cu, cache.paged_kv())
    close(lse, extend_want(cache, q, k_new, cu, d), tol)


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize(("h", "group", "d"), SHAPES)
@pytest.mark.parametrize("kind", ["random", "outlier", "tiny"])
def test_extend_lse(backend, h, group, d, kind):
    check_extend(backend, OscarConfig(), EXT_LENS, EXT_NEW, h, group, d, kind, 2e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.label}{'-foldv' if c.fold_v else ''}")
def test_extend_lse_configs(cfg):
    check_extend("torch", cfg, EXT_LENS, EXT_NEW, 2, 4, 64, "outlier", 2e-5)


@pytest.mark.parametrize("path", ["per-request", "chunked"])
def test_extend_lse_torch_paths(path, monkeypatch):
    """The per-request attention (padding would cost too much) and logits taken in several
    chunks of query rows give the same lse."""
    if path == "per-request":
        monkeypatch.setattr(tops, "PADDING_WORK_LIMIT", 0.0)
    else:
        monkeypatch.setattr(tops, "LSE_CHUNK_LOGITS", 3000)
    check_extend("torch", OscarConfig(), EXT_LENS, EXT_NEW, 2, 2, 64, "outlier", 2e-5)


def test_extend_lse_triton():
    """The fused kernel (one work item per request), the prefix workspace (several), the
    workspace baseline, and the default fp16 operands."""
    lens, new = [300, 130, 0], [5, 70, 9]
    args = (OscarConfig(), lens, new, 2, 2, 64, "outlier")
    check_extend("triton-precise", *args, 2e-5)
    check_extend("workspace", *args, 2e-5)
    check_extend("triton", *args, 5e-3)


def test_extend_lse_triton_prefix_in_chunks(monkeypatch):
    """A workspace of one page-table column: the lse comes out of the last chunk."""
    from oscar_kv.triton import api

    monkeypatch.setattr(api, "EXTEND_WORKSPACE_BYTES", 1)
    check_extend("triton-precise", OscarConfig(), [300], [40], 1, 2, 64, "outlier", 2e-5)


def check_extend_merge(backend, tol, h=2, group=2, d=64):
    """The first page apart, over all its keys (every new token follows it), in plain
    torch; pages 1.. + tail + new tokens by the backend; merged: the backend's whole."""
    dev = device_of(backend.split("-")[0])
    lens, new = [300, 140, 130], [5, 40, 3]
    cache, q, k_new, v_new, cu = extend_inputs(OscarConfig(), lens, new, h, group, d, "outlier",
                                               dev)  # fmt: skip
    out, lse = extend_with_lse(backend, q, k_new, v_new, cu, cache.paged_kv())
    rest = cache.paged_kv(page_table=cache.page_table[:, 1:], num_pages=cache.num_pages - 1)
    o2, l2 = extend_with_lse(backend, q, k_new, v_new, cu, rest)
    o1, l1 = torch.empty(q.shape), torch.empty(q.shape[:2])
    layout = cache.layout
    for b in range(len(lens)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        qkv = layout.pages_to_qkv(cache.pool.cpu(), cache.page_table[b, :1].cpu())
        k, v = (t.repeat_interleave(group, dim=1) for t in dequantize_kv(qkv))
        logits = torch.einsum("nhd,thd->nht", q[lo:hi].cpu(), k) * d**-0.5
        l1[lo:hi] = torch.logsumexp(logits, dim=-1)
        o1[lo:hi] = torch.einsum("nht,thd->nhd", torch.softmax(logits, dim=-1), v)
    o, m = merge(o1, l1, o2.cpu(), l2.cpu())
    close(o, out.float().cpu(), tol)
    close(m, lse.cpu(), tol)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_extend_halves_merge_into_the_whole(backend):
    check_extend_merge(backend, 1e-4)


def test_extend_halves_merge_into_the_whole_triton():
    check_extend_merge("triton-precise", 1e-4, h=1)


# ---------------------------------------------------------------------------- GPU


@pytest.fixture
def cuda_ext():
    from oscar_kv.cuda import jit

    jit.load()  # a build failure must fail these tests, not fall back


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(("h", "group", "d"), [(8, 4, 128), (2, 1, 64), (1, 8, 256)])
@pytest.mark.parametrize("kind", ["random", "outlier", "tiny"])
def test_decode_lse_gpu(backend, h, group, d, kind, request):
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    # The CUDA kernels take q in the tails' dtype (bf16); the Triton ones dot in fp16.
    check_decode(backend, OscarConfig(), LENS, h, group, d, kind, 5e-3, num_splits=3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "triton-precise"])
def test_decode_halves_merge_into_the_whole_gpu(backend, request):
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    check_decode_merge(backend, 5e-3 if backend != "triton-precise" else 1e-4, h=8, d=128)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton-precise"])
@pytest.mark.parametrize(("h", "group", "d"), [(8, 4, 128), (2, 1, 64), (1, 8, 256)])
def test_extend_lse_gpu(backend, h, group, d):
    tol = 5e-3 if backend == "triton" else 2e-5
    check_extend(backend, OscarConfig(), EXT_LENS, EXT_NEW, h, group, d, "outlier", tol)


@pytest.mark.gpu
def test_extend_halves_merge_into_the_whole_gpu():
    check_extend_merge("triton", 5e-3, h=8, group=4, d=128)


@pytest.mark.gpu
def test_opcheck_cuda_decode_with_lse(cuda_ext):
    """The CUDA op's schema declares the lse it writes; its Meta kernel accepts it."""
    dev = torch.device("cuda")
    cache = build_cache(OscarConfig(), [300, 5], 8, 128, seed=3, device=dev)
    q = torch.randn(2, 32, 128, device=dev).bfloat16()
    args = (q, cache.pool, cache.page_table, cache.num_pages, cache.k_tail, cache.v_tail,
            cache.tail_index, cache.tail_len, 128**-0.5, 0, *cache.layout.native_args,
            torch.empty(2, 32, device=dev))  # fmt: skip
    results = torch.library.opcheck(torch.ops.oscar_kv.decode_attention.default, args)
    assert all(v == "SUCCESS" for v in results.values()), results
