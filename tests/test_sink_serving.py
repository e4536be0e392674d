"""Sink pages behind the SGLang attention backend: a request's first page is stored at
``sink_bits`` (in extend and in decode), read at that width by every attention path, and
the rest stays at ``bits``; the forward stays free of host reads (``meta``)."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_cases import bf16_round, exact_causal
from oscar_kv import OscarConfig
from oscar_kv.ref import dequantize_kv, quantize_kv
from test_sglang_backend import HK, HQ, PAGE, MetaWorld, World, _fb

D = 64
T = PAGE


class SinkWorld(World):
    """`World` whose requests get their first page's companion pages, as the allocator
    gives them on the served path."""

    def new_request(self, capacity: int, shared_from: tuple[int, int] | None = None) -> int:
        slot = super().new_request(capacity, shared_from)
        c = self.pool.sink_companions
        if shared_from is None and c:
            extra = self.allocator.alloc(c * PAGE)
            assert extra is not None
            first = int(self.req_to_token_pool.req_to_token[slot, 0]) // PAGE
            self.pool.set_companions([first], [(extra[::PAGE] // PAGE).tolist()])
        return slot


def cached_kv(k: torch.Tensor, v: torch.Tensor, n: int, cfg: OscarConfig):
    """K, V [n, H, D] as the cache holds the first n tokens: page 0 at the sink width, the
    other whole pages at ``bits``, the rest exact."""
    full = n // T
    ks, vs = [], []
    if full:
        if cfg.sink_config is None:
            ks.append(k[:T])
            vs.append(v[:T])
        else:
            k0, v0 = dequantize_kv(quantize_kv(k[:T], v[:T], cfg.sink_config))
            ks.append(k0.reshape(T, *k.shape[1:]))
            vs.append(v0.reshape(T, *v.shape[1:]))
    if full > 1:
        kr, vr = dequantize_kv(quantize_kv(k[T : full * T], v[T : full * T], cfg.page_config))
        ks.append(kr.reshape(-1, *k.shape[1:]))
        vs.append(vr.reshape(-1, *v.shape[1:]))
    ks.append(k[full * T : n])
    vs.append(v[full * T : n])
    return torch.cat(ks).float(), torch.cat(vs).float()


@pytest.mark.parametrize(
    ("sink_bits", "backend"), [(4, "torch"), (16, "torch"), (4, "cpu"), (4, "triton")]
)
def test_first_page_at_sink_width_through_extend_decode_and_a_second_turn(
    sink_bits, backend, monkeypatch
):
    monkeypatch.setenv("OSCAR_KV_BACKEND", backend)
    torch.manual_seed(0)
    cfg = OscarConfig(bits=2, sink_bits=sink_bits)
    w = SinkWorld(cfg, num_tokens=40 * PAGE)
    assert w.pool.sink_companions >= 1
    prompts = [120, 130, 261]  # completes page 0 in decode / in extend / with page 1 too
    steps, more = 12, 40
    total = [p + steps + more for p in prompts]
    data = [
        (
            torch.randn(t, HQ, D),
            bf16_round(torch.randn(t, HK, D)),
            bf16_round(torch.randn(t, HK, D)),
        )
        for t in total
    ]
    for _, kk, _ in data:
        kk[:4] *= 8  # sink tokens that draw attention
    slots = [w.new_request(t) for t in total]
    scale = 1 / math.sqrt(D)

    def batch(lo, hi):
        return [
            torch.cat([d[j][a:b] for d, a, b in zip(data, lo, hi, strict=True)]) for j in range(3)
        ]

    q, k, v = batch([0] * 3, prompts)
    w.forward(slots, q, k, v, prompts, decode=False)
    for step in range(steps):
        pos = [p + step for p in prompts]
        q, k, v = (torch.stack([d[j][i] for d, i in zip(data, pos, strict=True)]) for j in range(3))
        out = w.forward(slots, q, k, v, [1] * 3, decode=True)
        for b, ((qq, kk, vv), i) in enumerate(zip(data, pos, strict=True)):
            kc, vc = cached_kv(kk, vv, i + 1, cfg)
            want = exact_causal(qq[i : i + 1], kc, vc, scale)[0]
            torch.testing.assert_close(out[b].float(), want, atol=2e-3, rtol=2e-3)

    # a second extend over the cached prefix: new tokens read page 0 at the sink width
    start = [p + steps for p in prompts]
    q, k, v = batch(start, total)
    out = w.forward(slots, q, k, v, [more] * 3, decode=False)
    for b, ((qq, kk, vv), s) in enumerate(zip(data, start, strict=True)):
        kc, vc = cached_kv(kk, vv, s, cfg)
        kc, vc = torch.cat((kc, kk[s : s + more])), torch.cat((vc, vv[s : s + more]))
        want = exact_causal(qq[s : s + more], kc, vc, scale)
        got = out[b * more : (b + 1) * more].float()
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)

    # page 0 holds the sink-width bytes (rows own + companions), the other pages 2-bit ones
    sl = w.pool.sink
    for slot, (_, kk, vv), n in zip(slots, data, total, strict=True):
        ids = (w.req_to_token_pool.req_to_token[slot, : n // T * T : T] // T).long()
        pages = w.pool.pages[0]
        if sink_bits == 4:
            got = sl.gather(pages, sl.row_ids(ids[:1], w.pool.sink_table))[0]
            assert torch.equal(got, quantize_kv(kk[:T], vv[:T], cfg.sink_config).packed_pages()[0])
        if len(ids) > 1:
            rest = quantize_kv(kk[T : len(ids) * T], vv[T : len(ids) * T], cfg.page_config)
            assert torch.equal(pages[ids[1:]], rest.packed_pages())


def test_sink_forward_on_meta_has_no_host_read():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    w = MetaWorld(OscarConfig(bits=2, sink_bits=4))
    slots = w.rtp.alloc_rows(4)
    cases = [
        (ForwardMode.EXTEND, [266, 300, 140, 129], [10, 44, 12, 1], [256, 256, 128, 128]),
        (ForwardMode.EXTEND, [130, 300, 5, 128], [130, 300, 5, 128], [0, 0, 0, 0]),
        (ForwardMode.MIXED, [201, 128, 50, 130], [1, 1, 50, 2], [200, 127, 0, 128]),
        (ForwardMode.DECODE, [129, 128, 1000, 1], None, None),
    ]
    for mode, seq, new, prefix in cases:
        fb = _fb(mode, slots, seq, new, prefix, device="meta")
        for out in w.forward(fb, sum(new) if new else len(slots)):
            assert out.device.type == "meta"
    w.graph_decode(slots)


def test_a_prefix_ending_inside_a_first_page_continues_from_the_sink_page(monkeypatch):
    monkeypatch.setenv("OSCAR_KV_BACKEND", "torch")
    torch.manual_seed(2)
    cfg = OscarConfig(bits=2, sink_bits=4)
    w = SinkWorld(cfg)
    k, v = bf16_round(torch.randn(2, 200, HK, D)).unbind(0)
    src = w.new_request(200)
    w.forward([src], torch.randn(200, HQ, D), k, v, [200], decode=False)
    page0 = int(w.req_to_token_pool.req_to_token[src, 0]) // PAGE
    dst = w.new_request(100)
    w.pool.dequantize_into_residual(page0, dst, first_page=True)
    k0, v0 = dequantize_kv(quantize_kv(k[:T], v[:T], cfg.sink_config))
    k_res, v_res = w.pool.residual(0)
    got = w.pool.residual_of_slot[dst]
    torch.testing.assert_close(k_res[got].float(), bf16_round(k0.reshape(T, HK, D)))
    torch.testing.assert_close(v_res[got].float(), bf16_round(v0.reshape(T, HK, D)))
