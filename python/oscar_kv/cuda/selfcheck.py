"""First-use check of the CUDA ops against the reference, before `oscar_kv.ops` uses them.

The CUDA kernels are the default on a GPU, and a kernel that miscompiles or mis-indexes on
some device would otherwise answer wrongly without a sound. So once per process, on small
inputs built to catch indexing errors (requests with pages and tails, an empty tail, a
tail-only request, shuffled page ids, an outlier channel), the ops must reproduce
`oscar_kv.ref`: quantized pages byte for byte, decode attention within fp32/bf16 tolerance,
rotate_q bit for bit. A disagreement makes `ops` fall back to Triton with a warning naming
it. Costs a few milliseconds once the extension is built.
"""

from __future__ import annotations

from typing import Any

import torch

from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.ref import attention, fwht, quantize_kv

# (config, kv heads, head_dim, q heads per kv head)
CASES = (
    (OscarConfig(), 2, 128, 4),
    (OscarConfig(bits=4, k_group=64, norm="head"), 1, 64, 8),
    (OscarConfig.kivi(), 1, 256, 1),
)
LENGTHS = (261, 128, 5)  # pages + tail, one page and no tail, tail only


def _layout_args(cfg: OscarConfig, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    from oscar_kv.layout import PageLayout

    return PageLayout.of(cfg, kv_heads, head_dim).native_args


def _case(cuda: Any, device: torch.device, cfg: OscarConfig, h: int, d: int, g: int) -> str | None:
    from oscar_kv.layout import PageLayout
    from oscar_kv.paged import PagedKV

    gen = torch.Generator().manual_seed(d + g)
    layout = PageLayout.of(cfg, h, d)
    n_req = len(LENGTHS)
    pages = [n // BLOCK_TOKENS for n in LENGTHS]
    pool = layout.alloc_pool(sum(pages) + 2, device)
    ids = torch.randperm(sum(pages) + 2, generator=gen)[: sum(pages)]
    page_table = torch.zeros(n_req, max(1, max(pages)), dtype=torch.int32)
    k_tail = torch.zeros(n_req, BLOCK_TOKENS, h, d, dtype=torch.bfloat16)
    v_tail = torch.zeros_like(k_tail)
    q = torch.randn(n_req, h * g, d, generator=gen).bfloat16()
    want = []
    used = 0
    for b, n in enumerate(LENGTHS):
        k = torch.randn(n, h, d, generator=gen)
        k[:, :, 3] *= 30.0
        k, v = k.bfloat16(), torch.randn(n, h, d, generator=gen).bfloat16()
        qkv = quantize_kv(k, v, cfg)
        want.append(attention(q[b : b + 1].float(), qkv)[0])
        my_ids = ids[used : used + pages[b]]
        used += pages[b]
        page_table[b, : pages[b]] = my_ids.int()
        full = pages[b] * BLOCK_TOKENS
        if pages[b]:
            blocks = (t[:full].reshape(-1, BLOCK_TOKENS, h, d).to(device) for t in (k, v))
            src = torch.arange(pages[b], dtype=torch.int32, device=device)
            pid = my_ids.int().to(device)
            cuda.quantize_pages(*blocks, src, pid, pool, layout)
            got = pool[my_ids.to(device)].cpu()
            bad = int((got != qkv.packed_pages()).sum())
            if bad:
                return f"quantize_pages wrote {bad} wrong bytes ({cfg.label}, H={h}, D={d})"
        k_tail[b, : n - full] = k[full:]
        v_tail[b, : n - full] = v[full:]

    i32 = {"dtype": torch.int32, "device": device}
    kv = PagedKV.single_layer(
        layout, pool, k_tail.to(device), v_tail.to(device), page_table.to(device),
        torch.tensor(pages, **i32), torch.tensor([n % BLOCK_TOKENS for n in LENGTHS], **i32),
    )  # fmt: skip
    out = cuda.decode_attention(q.to(device), kv, 0, d**-0.5, 2).float().cpu()
    ref = torch.stack(want)
    err = float((out - ref).abs().max())
    if not err <= 2e-2 * max(1.0, float(ref.abs().max())):  # also catches NaN
        return f"decode_attention off by {err:.3g} ({cfg.label}, H={h}, G={g}, D={d})"

    qf = q.float()
    if not torch.equal(cuda.rotate_q(qf.to(device)).cpu(), fwht(qf)):
        return f"rotate_q differs from the reference FWHT (D={d})"
    return None


def disagreement(cuda: Any, device: torch.device) -> str | None:
    """The first way the ops behind ``cuda`` (a `jit.CudaOps`) disagree with the reference,
    or None when they agree on every case."""
    for cfg, h, d, g in CASES:
        problem = _case(cuda, device, cfg, h, d, g)
        if problem:
            return problem
    return None
