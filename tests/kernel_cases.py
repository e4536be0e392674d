"""Inputs shared by the kernel tests: K/V with adversarial structure and paged caches.

Kernel tests run on CUDA tensors where a device exists (compiled Triton/CUDA) and on CPU
tensors through Triton's interpreter otherwise; `DEVICE` is that choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv import OscarConfig
from oscar_kv.layout import PageLayout
from oscar_kv.paged import PagedKV
from oscar_kv.ref import quantize_kv
from oscar_kv.ref.quant import QuantizedKV


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 and back to fp32 (what a 16-bit residual page holds exactly)."""
    return x.to(torch.bfloat16).float()


def exact_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention, fp32: q [n, Hq, D] are the last n of k's / v's [T, Hk, D]
    positions; query head j reads KV head j // (Hq / Hk)."""
    g = q.shape[1] // k.shape[1]
    n, t = q.shape[0], k.shape[0]
    mask = torch.arange(t)[None, :] <= torch.arange(t - n, t)[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1).repeat_interleave(g, 0),
        v.transpose(0, 1).repeat_interleave(g, 0),
        attn_mask=mask,
        scale=scale,
    )
    return o.transpose(0, 1)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KINDS = ("random", "outlier", "tiny")

# The configurations every decode kernel is checked on besides the default: 4 bits with a
# per-head norm, K groups of 128, KIVI (no rotation, no norm), rotation only, direct
# scaling, V folded into the weights, V groups of 16.
DECODE_CONFIGS = [
    OscarConfig(bits=4, k_group=64, norm="head"),
    OscarConfig(k_group=128),
    OscarConfig.kivi(),
    OscarConfig.rotation_only(),
    OscarConfig.direct_scaling(bits=4),
    OscarConfig(fold_v=True),
    OscarConfig(v_group=16),
]


def config_id(cfg: OscarConfig) -> str:
    return f"{cfg.label}{'-foldv' if cfg.fold_v else ''}-vg{cfg.v_group}"


def make_kv(
    tokens: int, heads: int, dim: int, kind: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 K, V [tokens, heads, dim].

    outlier: a few K channels ~40x larger (what the rotation must spread) and a V outlier.
    tiny: near-zero-norm tokens (1e-6 scale), exactly-zero tokens (norm 0 -> unit K = 0),
    and constant V rows (scale 0 -> code 0).
    """
    k = torch.randn(tokens, heads, dim, generator=gen)
    v = torch.randn(tokens, heads, dim, generator=gen)
    if kind == "outlier":
        k[:, :, 3] *= 40.0
        k[:, :, dim - 5] = 25.0 + k[:, :, dim - 5]
        v[:, :, 7] *= 30.0
    elif kind == "tiny":
        k[::7] *= 1e-6
        k[5::11] = 0.0
        v[3::13] = 0.5
        v[4::17] = 0.0
    elif kind != "random":
        raise ValueError(kind)
    return k.bfloat16(), v.bfloat16()


@dataclass
class Cache:
    layout: PageLayout
    pool: torch.Tensor
    page_table: torch.Tensor
    num_pages: torch.Tensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor
    tail_index: torch.Tensor
    tail_len: torch.Tensor
    qkvs: list[QuantizedKV]

    def paged_kv(
        self,
        device: torch.device | None = None,
        num_splits: int | None = None,
        **fields: torch.Tensor | None,
    ) -> PagedKV:
        """This cache as a one-layer `PagedKV` (on ``device``, default where it lives).

        ``fields`` replace any of pool, k_tail, v_tail, page_table, num_pages, tail_len,
        tail_index (``tail_index=None``: the default, request b's tail at row b)."""
        names = ("pool", "k_tail", "v_tail", "page_table", "num_pages", "tail_len", "tail_index")
        unknown = set(fields) - set(names)
        if unknown:
            raise TypeError(f"unknown cache fields {sorted(unknown)}")
        args = {name: fields.get(name, getattr(self, name)) for name in names}
        if device is not None:
            args = {n: None if t is None else t.to(device) for n, t in args.items()}
        return PagedKV.single_layer(self.layout, **args, num_splits=num_splits)


def build_cache(
    cfg: OscarConfig,
    lens: list[int],
    heads: int,
    dim: int,
    kind: str = "random",
    seed: int = 0,
    device: torch.device = DEVICE,
) -> Cache:
    """Requests of the given lengths, quantized by the reference into a shuffled pool.

    Page ids are a random permutation with unused pages in between, and tail slots are
    permuted too, so indexing bugs cannot hide behind identity tables.
    """
    gen = torch.Generator().manual_seed(seed)
    layout = PageLayout.of(cfg, heads, dim)
    n_pages = sum(n // 128 for n in lens)
    pool = layout.alloc_pool(n_pages + 3)
    perm = torch.randperm(n_pages + 3, generator=gen)[:n_pages]
    max_pages = max(1, max(n // 128 for n in lens))
    page_table = torch.zeros(len(lens), max_pages, dtype=torch.int32)
    k_tail = torch.zeros(len(lens) + 1, 128, heads, dim, dtype=torch.bfloat16)
    v_tail = torch.zeros_like(k_tail)
    tail_index = torch.randperm(len(lens) + 1, generator=gen)[: len(lens)].int()
    used = 0
    qkvs = []
    for b, n in enumerate(lens):
        k, v = make_kv(n, heads, dim, kind, gen)
        qkv = quantize_kv(k, v, cfg)
        qkvs.append(qkv)
        ids = perm[used : used + qkv.num_pages]
        used += qkv.num_pages
        if qkv.num_pages:
            pool[ids] = qkv.packed_pages()
        page_table[b, : qkv.num_pages] = ids.int()
        k_tail[tail_index[b], : n % 128] = qkv.k_tail
        v_tail[tail_index[b], : n % 128] = qkv.v_tail
    return Cache(
        layout=layout,
        pool=pool.to(device),
        page_table=page_table.to(device),
        num_pages=torch.tensor([n // 128 for n in lens], dtype=torch.int32, device=device),
        k_tail=k_tail.to(device),
        v_tail=v_tail.to(device),
        tail_index=tail_index.to(device),
        tail_len=torch.tensor([n % 128 for n in lens], dtype=torch.int32, device=device),
        qkvs=qkvs,
    )
