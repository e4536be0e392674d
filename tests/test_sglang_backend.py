"""The SGLang plugin, pool and attention backend through real SGLang objects on CPU.

Real SGLang objects: ``ServerArgs`` + its CLI parser (with the plugin's hooks applied by
SGLang's own ``HookRegistry``), ``ReqToTokenPool``, ``PagedTokenToKVPoolAllocator`` (over our
pool, as the model runner builds it), ``RadixAttention`` (the layer object handed to the
backend), ``ForwardBatch`` + ``ForwardMode``, the attention registry. Stand-ins: the model
runner (a namespace with the three attributes the backend reads), the scheduler's slot
allocation (done here with the real allocator, one request after another) and the prefix
match of the second turn (the first request's page ids copied into the new request's
``req_to_token`` row, which is what a page-aligned radix match hands the scheduler).
The reference is `oscar_kv.ref` (quantize_kv + attention / dequantize_kv + exact SDPA).
"""

from __future__ import annotations

import argparse
import math
import os
from types import SimpleNamespace

import pytest
import torch

from kernel_cases import bf16_round, exact_causal
from oscar_kv import OscarConfig
from oscar_kv.paged import PagedKV
from oscar_kv.ref import attention as ref_attention
from oscar_kv.ref import dequantize_kv, quantize_kv

sg = pytest.importorskip("oscar_kv.sglang._testing")
try:
    sg.import_sglang_cache()
except ImportError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"sglang not installed: {e}", allow_module_level=True)

from oscar_kv.sglang import plugin
from oscar_kv.sglang.args import ENV_VAR, KVQuantError
from oscar_kv.sglang.attention import OscarAttnBackend
from oscar_kv.sglang.pool import OscarTokenToKVPool

HQ, HK, D = 4, 2, 64
PAGE = 128


@pytest.fixture(scope="module")
def hooks():
    from sglang.srt.plugins.hook_registry import HookRegistry

    plugin.register()
    HookRegistry.apply_hooks()
    yield
    os.environ.pop(ENV_VAR, None)


@pytest.fixture(autouse=True)
def _clean_env():
    os.environ.pop(ENV_VAR, None)
    yield
    os.environ.pop(ENV_VAR, None)


# ------------------------------------------------------------------------------ parser
def test_launch_server_parser_accepts_flags(hooks):
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    ns = p.parse_args(["--model-path", "m", "--kv-quant", "oscar", "--kv-quant-bits", "4"])
    assert (ns.kv_quant, ns.kv_quant_bits, ns.kv_quant_k_group) == ("oscar", 4, 32)

    sa = prepare_server_args(["--model-path", "m", "--kv-quant", "oscar"])
    assert sa.page_size == 128 and sa.attention_backend == "oscar"
    assert os.environ[ENV_VAR]  # reaches the scheduler processes
    assert plugin.spec().enabled and plugin.spec().bits == 2

    os.environ.pop(ENV_VAR)
    sa = prepare_server_args(["--model-path", "m"])  # off by default, nothing changed
    assert sa.page_size != 128 or sa.attention_backend != "oscar"
    assert ENV_VAR not in os.environ


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--page-size", "64"], "--page-size 64"),
        (["--enable-hierarchical-cache"], "HiCache"),
        (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
        (["--attention-backend", "triton"], "--attention-backend triton"),
    ],
)
def test_launch_server_parser_rejects_conflicts(hooks, extra, needle):
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(KVQuantError, match="--kv-quant oscar conflicts with") as e:
        prepare_server_args(["--model-path", "m", "--kv-quant", "oscar", *extra])
    assert needle in str(e.value)


def test_attention_backend_registered(hooks):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    assert "oscar" in ATTENTION_BACKENDS and "oscar" in ATTENTION_BACKEND_CHOICES


# ------------------------------------------------------------------------------ pool
def test_pool_capacity_vsbf16_round():
    """Same bytes: >= 5.2x the tokens of SGLang's bf16 MHA pool at G=32 (8 KV heads, D=128)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from oscar_kv.plan import bf16_bytes_per_token, oscar_bytes_per_token

    layers, hk, d = 2, 8, 128
    bf = MHATokenToKVPool(
        size=1024, page_size=PAGE, dtype=torch.bfloat16, head_num=hk, head_dim=d,
        layer_num=layers, device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    bf_bytes = sum(bf.get_kv_size_bytes()) if isinstance(bf.get_kv_size_bytes(), tuple) else 0
    # SGLang's pool holds size + page_size slots (a padding page).
    assert bf_bytes == (1024 + PAGE) * bf16_bytes_per_token(layers, hk, d)
    cfg = OscarConfig()
    pool = OscarTokenToKVPool(
        1024 * 5, PAGE, torch.bfloat16, hk, d, layers, "cpu", config=cfg, residual_pages=1
    )
    per_tok = pool.pages.numel() / ((pool.num_pages + 1) * PAGE)
    assert per_tok == oscar_bytes_per_token(layers, hk, d, cfg) == 772 * layers
    assert bf16_bytes_per_token(layers, hk, d) / per_tok >= 5.2


# ------------------------------------------------------------------------------ attention
class World:
    """A batch of requests over one RadixAttention layer with the oscar backend."""

    def __init__(self, cfg: OscarConfig, num_tokens: int = 16 * PAGE, slots: int = 8):
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=PAGE))
        self.cfg = cfg
        self.req_to_token_pool = ReqToTokenPool(
            size=slots, max_context_len=8 * PAGE, device="cpu", enable_memory_saver=False
        )
        # One residual page per request slot, as the budget gives a server.
        self.pool = OscarTokenToKVPool(
            num_tokens, PAGE, torch.bfloat16, HK, D, 1, "cpu", config=cfg, residual_pages=slots
        )
        self.pool.attach(self.req_to_token_pool)
        self.allocator = PagedTokenToKVPoolAllocator(
            num_tokens, PAGE, torch.bfloat16, "cpu", self.pool, need_sort=False
        )
        runner = SimpleNamespace(
            device="cpu", req_to_token_pool=self.req_to_token_pool, token_to_kv_pool=self.pool,
            model_config=SimpleNamespace(num_attention_heads=HQ),
        )  # fmt: skip
        self.backend = OscarAttnBackend(runner)
        self.layer = RadixAttention(HQ, D, 1 / math.sqrt(D), HK, layer_id=0)
        self.lens: dict[int, int] = {}

    def new_request(self, capacity: int, shared_from: tuple[int, int] | None = None) -> int:
        slot = self.req_to_token_pool.alloc_rows(1)[0]
        row = self.req_to_token_pool.req_to_token[slot]
        start = 0
        if shared_from is not None:  # a page-aligned prefix match
            src, n = shared_from
            row[:n] = self.req_to_token_pool.req_to_token[src, :n]
            start = n
        need = -(-(capacity - start) // PAGE) * PAGE
        locs = self.allocator.alloc(need)
        assert locs is not None
        row[start : start + need] = locs.to(row.dtype)
        self.lens[slot] = start
        return slot

    def forward(self, slots: list[int], q, k, v, new_lens: list[int], decode: bool):
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        seq = [self.lens[s] + n for s, n in zip(slots, new_lens, strict=True)]
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            batch_size=len(slots),
            input_ids=torch.zeros(sum(new_lens), dtype=torch.int64),
            req_pool_indices=torch.tensor(slots, dtype=torch.int64),
            seq_lens=torch.tensor(seq, dtype=torch.int64),
            seq_lens_cpu=torch.tensor(seq, dtype=torch.int64),
            out_cache_loc=torch.zeros(sum(new_lens), dtype=torch.int64),
            seq_lens_sum=sum(seq),
            extend_seq_lens=None if decode else torch.tensor(new_lens, dtype=torch.int32),
            extend_seq_lens_cpu=None if decode else list(new_lens),
            extend_prefix_lens_cpu=None if decode else [self.lens[s] for s in slots],
        )
        self.backend.init_forward_metadata(fb)
        out = self.backend.forward(
            q.reshape(len(q), HQ * D), k.reshape(len(k), HK * D), v.reshape(len(v), HK * D),
            self.layer, fb,
        )  # fmt: skip
        for s, n in zip(slots, new_lens, strict=True):
            self.lens[s] += n
        return out.view(-1, HQ, D)


@pytest.mark.parametrize(
    ("fold_v", "backend"),
    [(False, "torch"), (False, "triton"), pytest.param(True, "torch", marks=pytest.mark.slow)],
)
def test_extend_then_decode_matches_reference(fold_v, backend, monkeypatch):
    # triton: quantize, decode and the fused extend kernel (interpreted here) behind SGLang.
    monkeypatch.setenv("OSCAR_KV_BACKEND", backend)
    torch.manual_seed(0)
    cfg = OscarConfig(bits=2, k_group=32, fold_v=fold_v)
    w = World(cfg)
    prompts = [120, 130, 261]  # below, across and two pages past a page boundary
    steps = 12  # the first request crosses 128 while decoding
    total = [p + steps for p in prompts]
    data = [
        (
            torch.randn(t, HQ, D),
            bf16_round(torch.randn(t, HK, D)),
            bf16_round(torch.randn(t, HK, D)),
        )
        for t in total
    ]
    slots = [w.new_request(t) for t in total]
    scale = 1 / math.sqrt(D)

    # extend: all prompts in one batch
    q = torch.cat([d[0][:p] for d, p in zip(data, prompts, strict=True)])
    k = torch.cat([d[1][:p] for d, p in zip(data, prompts, strict=True)])
    v = torch.cat([d[2][:p] for d, p in zip(data, prompts, strict=True)])
    out = w.forward(slots, q, k, v, prompts, decode=False)
    off = 0
    for (qq, kk, vv), p in zip(data, prompts, strict=True):
        ref = exact_causal(qq[:p], kk[:p], vv[:p], scale)
        torch.testing.assert_close(out[off : off + p].float(), ref, atol=2e-3, rtol=2e-3)
        off += p

    # decode steps: each request's new token against ref.attention over quantize_kv(prefix)
    for step in range(steps):
        pos = [p + step for p in prompts]
        q = torch.stack([d[0][i] for d, i in zip(data, pos, strict=True)])
        k = torch.stack([d[1][i] for d, i in zip(data, pos, strict=True)])
        v = torch.stack([d[2][i] for d, i in zip(data, pos, strict=True)])
        out = w.forward(slots, q, k, v, [1] * len(slots), decode=True)
        for b, ((qq, kk, vv), i) in enumerate(zip(data, pos, strict=True)):
            qkv = quantize_kv(kk[: i + 1], vv[: i + 1], cfg)
            ref = ref_attention(qq[i : i + 1], qkv, causal=True, scale=scale)[0]
            torch.testing.assert_close(out[b].float(), ref.float(), atol=2e-3, rtol=2e-3)

    # pages hold exactly what the reference quantizer makes of each completed block
    for slot, (_, kk, vv), n in zip(slots, data, total, strict=True):
        full = n // PAGE
        ids = w.req_to_token_pool.req_to_token[slot, : full * PAGE : PAGE] // PAGE
        want = quantize_kv(kk[: full * PAGE], vv[: full * PAGE], cfg).packed_pages()
        assert torch.equal(w.pool.pages[0][ids.long()], want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_turn_reuses_prefix_pages(backend, monkeypatch):
    # triton: the fused extend kernel (interpreted here) behind the SGLang backend.
    monkeypatch.setenv("OSCAR_KV_BACKEND", backend)
    torch.manual_seed(1)
    cfg = OscarConfig()
    w = World(cfg)
    t1 = 2 * PAGE + 40
    k1, v1 = bf16_round(torch.randn(t1, HK, D)), bf16_round(torch.randn(t1, HK, D))
    s1 = w.new_request(t1)
    w.forward([s1], torch.randn(t1, HQ, D), k1, v1, [t1], decode=False)
    shared = 2 * PAGE
    shared_ids = (w.req_to_token_pool.req_to_token[s1, :shared:PAGE] // PAGE).long()
    before = w.pool.pages[0][shared_ids].clone()
    quantized_before = w.pool.pages[0].clone()

    # turn 2: same first two pages (radix match), new suffix
    n2 = 50
    s2 = w.new_request(shared + n2, shared_from=(s1, shared))
    q2 = torch.randn(n2, HQ, D)
    k2, v2 = bf16_round(torch.randn(n2, HK, D)), bf16_round(torch.randn(n2, HK, D))
    out = w.forward([s2], q2, k2, v2, [n2], decode=False)

    assert torch.equal(w.pool.pages[0][shared_ids], before)  # not re-quantized
    changed = (w.pool.pages[0] != quantized_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == []  # 50 new tokens: nothing completes, they stay in s2's tail
    kp, vp = dequantize_kv(quantize_kv(k1[:shared], v1[:shared], cfg))
    ref = exact_causal(
        q2, torch.cat((kp.float(), k2)), torch.cat((vp.float(), v2)), 1 / math.sqrt(D)
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_backend_refuses_other_pools():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    kv = MHATokenToKVPool(
        size=256, page_size=PAGE, dtype=torch.bfloat16, head_num=HK, head_dim=D,
        layer_num=1, device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    runner = SimpleNamespace(device="cpu", req_to_token_pool=None, token_to_kv_pool=kv)
    with pytest.raises(ValueError, match="--kv-quant oscar"):
        OscarAttnBackend(runner)


# ------------------------------------------------------------------------------ GPU readiness
# A GPU forward must not read anything back to the host and must keep every tensor on the
# pool's device. On the `meta` device both are errors: a host read raises (no data), a CPU
# tensor next to a meta one raises, and the oscar ops run their fake kernels (which check
# that all their tensors share one device). So a whole SGLang forward on meta tensors proves
# the serving path free of host syncs and device mix-ups without a GPU.
def _fb(mode, slots, seq, new=None, prefix=None, device="cpu"):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    n = sum(new) if new is not None else len(slots)
    i64 = {"dtype": torch.int64, "device": device}
    return ForwardBatch(
        forward_mode=mode,
        batch_size=len(slots),
        input_ids=torch.zeros(n, **i64),
        req_pool_indices=torch.tensor(slots, **i64)
        if device != "meta"
        else torch.empty(len(slots), **i64),
        seq_lens=torch.tensor(seq, **i64) if device != "meta" else torch.empty(len(seq), **i64),
        seq_lens_cpu=torch.tensor(seq, dtype=torch.int64),
        out_cache_loc=torch.zeros(n, **i64),
        seq_lens_sum=sum(seq),
        extend_seq_lens=None
        if new is None
        else torch.empty(len(new), dtype=torch.int32, device=device),
        extend_seq_lens_cpu=None if new is None else list(new),
        extend_prefix_lens_cpu=None if new is None else list(prefix),
    )


class MetaWorld:
    """Pool, request slots and backend with every tensor on the meta device (2 layers)."""

    def __init__(self, cfg: OscarConfig, slots: int = 8):
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=PAGE))
        self.rtp = ReqToTokenPool(
            size=slots, max_context_len=16 * PAGE, device="meta", enable_memory_saver=False
        )
        self.pool = OscarTokenToKVPool(
            64 * PAGE, PAGE, torch.bfloat16, HK, D, 2, "meta", config=cfg, residual_pages=slots
        )
        self.pool.attach(self.rtp)
        runner = SimpleNamespace(
            device="meta", req_to_token_pool=self.rtp, token_to_kv_pool=self.pool,
            model_config=SimpleNamespace(num_attention_heads=HQ),
        )  # fmt: skip
        self.backend = OscarAttnBackend(runner)
        self.layers = [RadixAttention(HQ, D, 1 / math.sqrt(D), HK, layer_id=i) for i in (0, 1)]

    def graph_decode(self, slots: list[int]) -> None:
        """The CUDA-graph decode path on meta: buffers, capture and replay metadata, then
        every layer's forward, for ``slots`` padded to a captured batch of 8."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        self.backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
        fb = _fb(ForwardMode.DECODE, slots + [0] * 4, [129, 128, 1000, 1] + [1] * 4, device="meta")
        self.backend.init_forward_metadata_out_graph(fb, in_capture=True)
        self.backend.init_forward_metadata_in_graph(fb)
        for layer in self.layers:
            q, k, v = (torch.empty(8, h * D, device="meta") for h in (HQ, HK, HK))
            assert self.backend.forward(q, k, v, layer, fb).device.type == "meta"

    def forward(self, fb, tokens: int):
        self.backend.init_forward_metadata(fb)
        outs = []
        for layer in self.layers:
            q, k, v = (torch.empty(tokens, h * D, device="meta") for h in (HQ, HK, HK))
            outs.append(self.backend.forward(q, k, v, layer, fb))
        return outs


@pytest.mark.parametrize("fold_v", [False, True])
def test_meta_device_forward_has_no_host_sync(fold_v):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    w = MetaWorld(OscarConfig(fold_v=fold_v))
    slots = w.rtp.alloc_rows(4)
    cases = [
        # (mode, seq_lens after the forward, new tokens, cached prefix)
        (ForwardMode.EXTEND, [5, 128, 300, 1], [5, 128, 300, 1], [0, 0, 0, 0]),  # no prefix
        (ForwardMode.EXTEND, [266, 300, 140, 129], [10, 44, 12, 1], [256, 256, 128, 128]),
        (ForwardMode.MIXED, [201, 128, 50, 130], [1, 1, 50, 2], [200, 127, 0, 128]),
        (ForwardMode.DECODE, [129, 128, 1000, 1], None, None),  # 128: completes a page
    ]
    for mode, seq, new, prefix in cases:
        fb = _fb(mode, slots, seq, new, prefix, device="meta")
        outs = w.forward(fb, sum(new) if new else len(slots))
        for out in outs:
            assert out.device.type == "meta" and tuple(out.shape) == (fb.input_ids.shape[0], HQ * D)
        kv = w.backend.forward_metadata.kv
        assert kv.page_table.device.type == "meta" and kv.page_table.shape[0] == len(slots)
    # And the CUDA-graph decode path: buffers, capture and replay metadata on meta too.
    w.graph_decode(slots)


def test_meta_device_catches_a_host_read():
    """The meta proof has teeth: a host read of a device tensor, or a CPU tensor handed to an
    oscar op next to meta ones, raises."""
    from oscar_kv import ops

    with pytest.raises(NotImplementedError):
        torch.empty(3, device="meta").tolist()
    layout = ops.PageLayout.of(OscarConfig(), HK, D)
    kv = PagedKV(
        layout, torch.empty(1, 4, layout.page_bytes, dtype=torch.uint8, device="meta"),
        *(torch.empty(1, 2, PAGE, HK, D, device="meta") for _ in range(2)),
        torch.empty(2, 1, dtype=torch.int32),  # page table left on the CPU
        *(torch.empty(2, dtype=torch.int32, device="meta") for _ in range(3)),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="same device"):
        ops.decode_attention(torch.empty(2, HQ, D, device="meta"), kv)


def _graph_replay(w, slots, seq, q, k, v, max_bs, bufs):
    """What SGLang's decode graph runner does at replay: copy the batch into the static
    buffers (padding rows: slot 0, length = fill value), the out-of-graph prep, then the
    graph's own work (the in-graph prep and every layer's kernels) over static inputs."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    raw = len(slots)
    fill = w.backend.get_cuda_graph_seq_len_fill_value()
    bufs["req_pool_indices"].zero_()[:raw] = torch.tensor(slots)
    bufs["seq_lens"].fill_(fill)[:raw] = torch.tensor(seq)
    for name, x in (("q", q), ("k", k), ("v", v)):
        bufs[name].zero_()[:raw] = x.reshape(raw, -1)
    fb = _fb(ForwardMode.DECODE, [0] * max_bs, [fill] * max_bs)
    fb.req_pool_indices, fb.seq_lens = bufs["req_pool_indices"], bufs["seq_lens"]
    w.backend.init_forward_metadata_out_graph(fb)
    w.backend.init_forward_metadata_in_graph(fb)
    out = w.backend.forward(bufs["q"], bufs["k"], bufs["v"], w.layer, fb)
    return out.view(max_bs, HQ, D)[:raw]


def _metadata_pointers(md) -> list[int]:
    kv, plan = md.kv, md.decode_plan
    tensors = [kv.page_table, kv.num_pages, kv.tail_len, kv.tail_index, *vars(plan).values()]
    if kv.scratch is not None:
        tensors += [kv.scratch.mid_o, kv.scratch.mid_ml]
    return [t.data_ptr() for t in tensors]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_cuda_graph_capture_replay_equals_eager(backend, monkeypatch):
    """Decode through captured metadata (static buffers written in place, a split count fixed
    at capture) equals eager decode, for batches padded up to the captured size, across a
    page completion; the pool ends byte-identical to the eager pool."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    monkeypatch.setenv("OSCAR_KV_BACKEND", backend)
    torch.manual_seed(3)
    cfg = OscarConfig()
    eager, graph = World(cfg), World(cfg)
    prompts = [100, 126, 250, 5]  # the 126-token request completes its page at step 2
    steps = 4
    data = [
        (torch.randn(p + steps, HQ, D), *(bf16_round(torch.randn(p + steps, HK, D)) for _ in "kv"))
        for p in prompts
    ]
    slots = [[w.new_request(p + steps) for p in prompts] for w in (eager, graph)]
    assert slots[0] == slots[1]
    slots = slots[0]
    for w in (eager, graph):
        cat = [torch.cat([d[i][:p] for d, p in zip(data, prompts, strict=True)]) for i in range(3)]
        w.forward(slots, *cat, prompts, decode=False)

    max_bs = 4
    graph.backend.init_cuda_graph_state(max_bs=max_bs, max_num_tokens=max_bs)
    bufs = {
        "req_pool_indices": torch.zeros(max_bs, dtype=torch.int64),
        "seq_lens": torch.ones(max_bs, dtype=torch.int64),
        "q": torch.zeros(max_bs, HQ * D),
        "k": torch.zeros(max_bs, HK * D),
        "v": torch.zeros(max_bs, HK * D),
    }
    # Capture: a padding-only batch of the captured size.
    fb = _fb(ForwardMode.DECODE, [0] * max_bs, [1] * max_bs)
    fb.req_pool_indices, fb.seq_lens = bufs["req_pool_indices"], bufs["seq_lens"]
    graph.backend.init_forward_metadata_out_graph(fb, in_capture=True)
    graph.backend.init_forward_metadata_in_graph(fb)
    captured = graph.backend.forward_metadata
    pointers = _metadata_pointers(captured)
    graph.backend.forward(bufs["q"], bufs["k"], bufs["v"], graph.layer, fb)
    if backend == "triton":
        assert captured.kv.scratch is not None and captured.kv.num_splits == 1

    for step in range(steps):
        live = [0, 1, 2, 3] if step % 2 == 0 else [0, 1, 2]  # full, or padded to 4
        pos = [graph.lens[slots[b]] for b in live]  # each new token's index
        q, k, v = (
            torch.stack([data[b][i][p] for b, p in zip(live, pos, strict=True)]) for i in range(3)
        )
        got = _graph_replay(
            graph, [slots[b] for b in live], [p + 1 for p in pos], q, k, v, max_bs, bufs
        )
        assert graph.backend.forward_metadata is captured
        assert _metadata_pointers(captured) == pointers  # replay rewrote contents only
        want = eager.forward([slots[b] for b in live], q, k, v, [1] * len(live), decode=True)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        for b in live:
            graph.lens[slots[b]] += 1
    assert graph.lens[slots[1]] == 130  # the 126-token request completed its first page
    assert torch.equal(graph.pool.pages, eager.pool.pages)
    for s in slots:
        r_g, r_e = int(graph.pool.residual_of_slot[s]), int(eager.pool.residual_of_slot[s])
        n = graph.lens[s] % PAGE
        assert torch.equal(graph.pool.k_res[0, r_g, :n], eager.pool.k_res[0, r_e, :n])


# ------------------------------------------------------------------------------ hooks
def test_entry_point_and_load_plugins(hooks):
    from importlib.metadata import entry_points

    from sglang.srt.plugins import load_plugins

    eps = {ep.value for ep in entry_points(group="sglang.srt.plugins")}
    if "oscar_kv.sglang.plugin:register" not in eps:
        pytest.skip("oscar-kv installed before its entry point existed: pip install -e . again")
    load_plugins()  # SGLang's loader finds and runs it (idempotent with the fixture)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    assert "oscar" in ATTENTION_BACKENDS


def _hf_llama(layers: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        model_type="llama", num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_size=4096, sliding_window=None,
    )  # fmt: skip


def _pool_tensor_bytes(pool) -> int:
    """Every tensor the pool object holds, counted once per storage."""
    seen, total = set(), 0
    for value in vars(pool).values():
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
            seen.add(value.untyped_storage().data_ptr())
            total += value.untyped_storage().nbytes()
    return total


def _configurators(hf, dtype=torch.bfloat16):
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=PAGE))
    kvc = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf), kv_cache_dtype=dtype,
        layer_info=SimpleNamespace(num_effective_layers=hf.num_hidden_layers, start_layer=0),
        device="cpu",
    )  # fmt: skip
    return kvc, SimpleNamespace(_fixed_overhead_bytes=0)


@pytest.mark.parametrize(("user_slots", "dtype"), [(None, torch.bfloat16), (6, torch.float32)])
def test_one_budget_profiled_path(hooks, caplog, monkeypatch, user_slots, dtype):
    """The hooks in SGLang's order (cell size, byte budget, running requests, pool): the pool
    allocates, byte for byte, the budget the sizing hook promised, within the bytes SGLang
    gave, residual pages included; residual pages are 16-bit even for an fp32 model."""
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from oscar_kv.sglang import budget as budget_mod
    from oscar_kv.sglang.args import KVQuantSpec

    never = lambda *a, **k: pytest.fail("original called under --kv-quant oscar")
    KVQuantSpec("oscar").publish()
    monkeypatch.setattr(plugin, "_user_slots", lambda: user_slots)
    monkeypatch.setattr(plugin, "_reported_cells", set())
    caplog.set_level("INFO", logger="oscar_kv.sglang")
    hf = _hf_llama()
    kvc, pc = _configurators(hf, dtype)
    assert plugin._hook_cell_size(never, pc, kvc, 2) == 2 * 772
    assert "1544 B/token vs bf16 8192 B/token" in caplog.text

    available = 64 * 2**20
    cfg = plugin._hook_pool_sizes(never, pc, available, PAGE)
    promised = plugin._budget
    assert cfg.max_total_num_tokens == promised.tokens
    assert promised.nbytes <= available
    page_res = 2 * PAGE * 2 * 8 * 128 * 2  # K+V, 2 layers, 8 heads, D=128, 16-bit
    assert promised.shape.residual_page_bytes == page_res
    if user_slots is None:
        assert promised.residual_bytes <= budget_mod.DEFAULT_RESIDUAL_SHARE * available
        # ... beside the padding residual page (CUDA-graph padding rows write there).
        assert promised.residual_pages == int(0.1 * available // page_res) - 1
    else:
        assert promised.residual_pages == user_slots
    # SGLang's own running-request default (thousands) is lowered to the residual pages.
    n = plugin._hook_max_num_reqs(lambda self, cap: 4096, None, cfg.max_total_num_tokens)
    assert n == promised.residual_pages

    rtp = ReqToTokenPool(size=n, max_context_len=1024, device="cpu", enable_memory_saver=False)
    sizes = SimpleNamespace(max_total_num_tokens=cfg.max_total_num_tokens)
    pool = plugin._hook_build_pool(
        never, kvc, sizes=sizes, is_dsa_model=False, is_dsv4_model=False,
        req_to_token_pool=rtp,
    )  # fmt: skip
    assert pool.k_res.dtype == torch.bfloat16
    # The KV bytes are the promise; the only other tensor is the slot -> residual page map.
    slot_map = pool.residual_of_slot.nbytes
    assert slot_map == 4 * (n + 1)
    assert _pool_tensor_bytes(pool) - slot_map == promised.nbytes == pool.get_kv_size_bytes()
    assert "oscar-kv capacity" in caplog.text and "residual pages" in caplog.text
    bf16_tokens = promised.nbytes // 8192
    assert promised.tokens / bf16_tokens >= 4.5
    assert f"({promised.tokens / bf16_tokens:.2f}x)" in caplog.text

    os.environ.pop(ENV_VAR)  # off: the originals run
    assert plugin._hook_cell_size(lambda *a: 7, None, kvc, 2) == 7


def test_one_budget_token_cap_path(hooks, monkeypatch):
    """--max-total-tokens: that many packed tokens; the default residual pages are at most
    10% of everything the pool holds, and the pool holds exactly the promise."""
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from oscar_kv.sglang.args import KVQuantSpec

    never = lambda *a, **k: pytest.fail("original called under --kv-quant oscar")
    KVQuantSpec("oscar").publish()
    monkeypatch.setattr(plugin, "_user_slots", lambda: None)
    hf = _hf_llama()
    kvc, pc = _configurators(hf)
    plugin._hook_cell_size(never, pc, kvc, 2)
    cfg = plugin._hook_pool_sizes_from_tokens(never, pc, 100_000, PAGE)
    promised = plugin._budget
    assert cfg.max_total_num_tokens == promised.tokens == 100_000 // PAGE * PAGE
    assert 1 <= promised.residual_pages and promised.residual_bytes <= 0.1 * promised.nbytes
    n = plugin._hook_max_num_reqs(lambda self, cap: 2048, None, cfg.max_total_num_tokens)
    rtp = ReqToTokenPool(size=n, max_context_len=1024, device="cpu", enable_memory_saver=False)
    pool = plugin._hook_build_pool(
        never, kvc, sizes=SimpleNamespace(max_total_num_tokens=cfg.max_total_num_tokens),
        is_dsa_model=False, is_dsv4_model=False, req_to_token_pool=rtp,
    )  # fmt: skip
    assert _pool_tensor_bytes(pool) - pool.residual_of_slot.nbytes == promised.nbytes


def test_residual_pages_follow_request_slots():
    """A slot takes a residual page when SGLang allocates it (alloc_rows, on the host) and
    returns it when SGLang frees the slot (free / free_rows / clear): a pool with 2 residual
    pages serves 10 requests in turn. Slot 0 (SGLang's padding row) and free slots map to the
    padding residual page."""
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    rtp = ReqToTokenPool(size=2, max_context_len=4 * PAGE, device="cpu", enable_memory_saver=False)
    pool = OscarTokenToKVPool(
        8 * PAGE, PAGE, torch.bfloat16, HK, D, 1, "cpu", config=OscarConfig(), residual_pages=2
    )
    pool.attach(rtp)
    padding = pool.padding_residual
    assert padding == 2 and pool.residual_of_slot.tolist() == [padding] * 3
    for _ in range(5):
        slots = rtp.alloc_rows(2)
        assert pool.residual_state() == {"total": 2, "free": 0, "held": 2, "cached": 0}
        pages = pool.assign_residual(slots)  # already held: the same pages
        assert sorted(pages) == [0, 1] and pool.residual_of_slot[slots].tolist() == pages
        assert int(pool.residual_of_slot[0]) == padding
        rtp.free_rows(slots[:1])
        assert pool.residual_state()["free"] == 1
        assert int(pool.residual_of_slot[slots[0]]) == padding
        rtp.clear()
        assert pool.residual_state() == {"total": 2, "free": 2, "held": 0, "cached": 0}
    with pytest.raises(ValueError, match="padding row"):
        pool.assign_residual([0])
    with pytest.raises(RuntimeError, match="no free residual page"):
        pool.assign_residual([1, 2, 3])
