"""Attention backend "oscar": extend, decode and mixed batches over packed + residual pages.

Built on `oscar_kv.ops` (CUDA > Triton on a GPU, but Triton for decode; C++ CPU kernels >
batched torch on a CPU; chosen by tensor device and ``OSCAR_KV_BACKEND``). Once per forward the backend builds, on the
pool's device, the batch's `oscar_kv.paged.PagedKV` view (page table from SGLang's
``req_to_token``, lengths, residual page ids from the pool's slot map) and a store plan
(`oscar_kv.sglang.forward_plan`); each layer then only launches kernels:

- extend (and mixed; SGLang routes mixed batches to ``forward_extend`` off NPU): the new
  tokens attend to their request's cached pages, its residual page and themselves
  (`ops.extend_attention`; a batch with no cached prefix at all, the common first prefill,
  goes straight to the dense prefill kernel, `ops.prefill_attention`), then are stored (`OscarTokenToKVPool.store_extend`: completed
  pages quantized, the rest into the residual page);
- decode: the new token is stored first (`OscarTokenToKVPool.store_decode`, page completion
  on a fixed grid), then `ops.decode_attention` reads pages + residual page.

CUDA graphs (decode only; extend and mixed batches stay eager, as in SGLang's own backends)
follow SGLang's three-method contract: `init_cuda_graph_state` allocates persistent
``[max_bs, max_pages]`` buffers (and builds/self-checks the kernels, before any capture);
`init_forward_metadata_out_graph` selects the captured batch size's views of them, with a
split count and split-KV scratch fixed per batch size; `init_forward_metadata_in_graph`
fills them from the graph runner's static ``req_pool_indices`` / ``seq_lens`` with device ops
only, so the graph's replay rebuilds the metadata itself. Padding rows (slot 0, length
``get_cuda_graph_seq_len_fill_value()`` = 1) write to the pool's padding residual page.

Q/K rotation and the norm descale happen inside the ops; V is un-rotated there unless the
pool's config says V was folded into the weights (`oscar_kv.sglang.weights`). GQA is the ops'
(query head j reads KV head j // group).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, fields
from typing import Any

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from oscar_kv import ops, sink
from oscar_kv.paged import PagedKV
from oscar_kv.sglang import forward_plan
from oscar_kv.sglang.forward_plan import BatchPages, DecodePlan, ExtendPlan

GRAPH_SEQ_LEN_FILL = 1
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OscarForwardMetadata:
    kv: PagedKV
    cu_seqlens: torch.Tensor | None = None  # extend: int32 [B + 1]
    extend_plan: ExtendPlan | None = None
    decode_plan: DecodePlan | None = None
    graph: bool = False  # views of the CUDA-graph buffers
    # extend with no cached prefix in the batch: cu_seqlens on the host, for the dense kernel
    prefill_cu: tuple[int, ...] | None = None
    # extend under sink pages: the request of each new-token row (long [N])
    row_req: torch.Tensor | None = None


@dataclass(frozen=True)
class GraphBuffers:
    """Persistent decode metadata for CUDA graphs, rows [max_bs] (page table [max_bs, width]):
    what `forward_plan.decode` returns, kept at fixed addresses."""

    width: int
    pages: BatchPages
    plan: DecodePlan


def _rows(d: Any, n: int) -> Any:
    """The dataclass ``d`` with each tensor field cut to its first ``n`` rows (views)."""
    return type(d)(*(getattr(d, f.name)[:n] for f in fields(d)))


def _copy_into(dst: Any, src: Any) -> None:
    for f in fields(dst):
        getattr(dst, f.name).copy_(getattr(src, f.name))


def _q_heads(model_runner: Any) -> int | None:
    cfg = getattr(model_runner, "model_config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        return None
    try:
        from sglang.srt.layers.dp_attention import get_attention_tp_size

        tp = get_attention_tp_size()
    except (ImportError, AssertionError, AttributeError):  # no distributed state (tests)
        tp = 1
    return max(1, heads // tp)


class OscarAttnBackend(AttentionBackend):
    """See the module docstring. ``model_runner`` needs ``device``, ``req_to_token_pool``
    and ``token_to_kv_pool`` (an `OscarTokenToKVPool`); ``model_config`` (query heads) is
    read when present, to size the decode scratch once per forward."""

    def __init__(self, model_runner: Any) -> None:
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool = model_runner.token_to_kv_pool
        if not hasattr(self.pool, "store_decode"):
            raise ValueError(
                "attention backend 'oscar' needs the oscar-kv pool (start the server with "
                f"--kv-quant oscar); got {type(self.pool).__name__}"
            )
        self.config = self.pool.config
        self.sink = self.pool.sink
        alloc = getattr(model_runner, "token_to_kv_pool_allocator", None)
        if self.sink is not None and alloc is not None and not hasattr(alloc, "companion_pages"):
            # Without companion pages every sink page would spill into padding page 0.
            raise ValueError(
                "--kv-quant-sink-bits needs oscar-kv's page allocator (it takes each first "
                f"page's companion pages); got {type(alloc).__name__}"
            )
        self.q_heads = _q_heads(model_runner)
        self.forward_metadata: OscarForwardMetadata | None = None
        self._graph: GraphBuffers | None = None
        self._graph_metadata: dict[int, OscarForwardMetadata] = {}
        dev = self.pool.pages.device
        # The ops backend of this process (None on meta: only the fake kernels run there).
        self.ops_backend = None if dev.type == "meta" else ops.resolve_backend(None, dev)
        self.decode_backend = None if dev.type == "meta" else ops.resolve_decode_backend(None, dev)
        if self.ops_backend is not None:
            which = self.ops_backend
            interp = " (Triton interpreter)" if which == "triton" and dev.type != "cuda" else ""
            logger.info(
                "oscar-kv attention: ops backend %s (decode: %s) on %s%s",
                which, self.decode_backend, dev, interp,
            )  # fmt: skip

    # -- metadata --------------------------------------------------------------------
    def _kv(self, pages: BatchPages) -> PagedKV:
        p = self.pool
        return PagedKV(
            p.layout, p.pages, p.k_res, p.v_res,
            pages.page_table, pages.num_pages, pages.tail_len, pages.tail_index,
        )  # fmt: skip

    def _with_scratch(self, kv: PagedKV, splits: int | None = None) -> PagedKV:
        """Split-KV scratch for the Triton decode, allocated once per forward (graph: once
        per captured batch size, with ``splits`` fixed)."""
        if self.q_heads is None or self.decode_backend != "triton":
            return kv if splits is None else kv.with_batch(num_splits=splits)
        from oscar_kv.triton import decode_splits

        ns, _ = decode_splits(
            kv.batch, kv.layout.kv_heads, kv.page_table.shape[1], kv.device, splits
        )
        return kv.with_decode_scratch(self.q_heads, ns)

    def _width(self, forward_batch: Any) -> int:
        """Page-table columns from host data SGLang already holds (never a device read)."""
        host = getattr(forward_batch, "seq_lens_cpu", None)
        if host is not None and host.numel():
            return forward_plan.table_width(int(host.max()))
        prefix, new = (
            getattr(forward_batch, "extend_prefix_lens_cpu", None),
            getattr(forward_batch, "extend_seq_lens_cpu", None),
        )
        if prefix is not None and new is not None and len(new):
            return forward_plan.table_width(max(int(p) + int(n) for p, n in zip(prefix, new)))
        return forward_plan.table_width(self.req_to_token_pool.req_to_token.shape[1])

    def init_forward_metadata(self, forward_batch: Any) -> None:
        """Eager metadata, every mode (host lists SGLang holds give the shapes)."""
        rtt = self.req_to_token_pool.req_to_token
        width = self._width(forward_batch)
        if forward_batch.forward_mode.is_decode_or_idle():
            pages, plan = forward_plan.decode(
                rtt, self.pool.residual_of_slot, forward_batch.req_pool_indices,
                forward_batch.seq_lens, width, sink=self.sink is not None,
            )  # fmt: skip
            kv = self._with_scratch(self._kv(pages))
            self.forward_metadata = OscarForwardMetadata(kv=kv, decode_plan=plan)
            return
        new_host = [int(n) for n in forward_batch.extend_seq_lens_cpu]
        prefix_host = getattr(forward_batch, "extend_prefix_lens_cpu", None)
        if prefix_host is not None:
            seq_host = [int(p) + n for p, n in zip(prefix_host, new_host, strict=True)]
        else:
            seq_host = forward_batch.seq_lens_cpu.tolist()  # a host tensor
        new_dev = getattr(forward_batch, "extend_seq_lens", None)
        if new_dev is None:
            new_dev = torch.tensor(new_host, dtype=torch.int32).to(self.pool.pages.device)
        pages, cu, plan = forward_plan.extend(
            rtt, self.pool.residual_of_slot, forward_batch.req_pool_indices,
            forward_batch.seq_lens, new_dev, new_host, seq_host, width,
            sink=self.sink is not None,
        )  # fmt: skip
        kv = self._kv(pages)
        if self.q_heads is not None and self.ops_backend in ("cuda", "triton"):
            kv = ops.plan_extend(kv, new_host, self.q_heads)
        prefill_cu = row_req = None
        if seq_host == new_host:
            prefill_cu = (0, *itertools.accumulate(new_host))
        elif self.sink is not None:
            reqs = torch.arange(len(new_host), device=kv.device)
            row_req = torch.repeat_interleave(
                reqs, new_dev.to(kv.device), output_size=sum(new_host)
            )
        self.forward_metadata = OscarForwardMetadata(
            kv=kv, cu_seqlens=cu, extend_plan=plan, prefill_cu=prefill_cu, row_req=row_req
        )

    # -- CUDA graphs (decode) --------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        dev = self.pool.pages.device
        # Build and self-check the kernels now: nothing may compile or read back inside a
        # capture.
        ops.resolve_backend(None, dev)
        width = forward_plan.table_width(self.req_to_token_pool.req_to_token.shape[1])

        def i32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int32, device=dev)

        self._graph = GraphBuffers(
            width=width,
            pages=BatchPages(i32(max_bs, width), i32(max_bs), i32(max_bs), i32(max_bs)),
            plan=DecodePlan(
                residual=torch.zeros(max_bs, dtype=torch.long, device=dev),
                pos=torch.zeros(max_bs, dtype=torch.long, device=dev),
                done_pages=torch.full((max_bs,), -1, dtype=torch.int32, device=dev),
                done_sink=torch.full((max_bs,), -1, dtype=torch.int32, device=dev),
            ),
        )
        self._graph_metadata = {}

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return GRAPH_SEQ_LEN_FILL

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Selects the captured batch size's buffer views (host work only)."""
        g = self._graph
        if g is None:
            raise RuntimeError("oscar backend: init_cuda_graph_state was not called")
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise NotImplementedError(
                "the 'oscar' attention backend captures decode batches only; extend and "
                f"mixed batches run eagerly (got {forward_batch.forward_mode})"
            )
        bs = int(forward_batch.req_pool_indices.shape[0])
        md = self._graph_metadata.get(bs)
        if md is None:
            kv = self._with_scratch(self._kv(_rows(g.pages, bs)), self._graph_splits(bs, g.width))
            md = OscarForwardMetadata(kv=kv, decode_plan=_rows(g.plan, bs), graph=True)
            self._graph_metadata[bs] = md
        self.forward_metadata = md

    def _graph_splits(self, bs: int, width: int) -> int:
        """A split count fixed per captured batch size (from shapes only)."""
        dev = self.pool.pages.device
        if dev.type != "cuda":
            return 1
        from oscar_kv.triton.api import default_num_splits

        return default_num_splits(bs, self.pool.layout.kv_heads, width, dev)

    def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
        """Fills the selected views from the runner's static buffers: device ops only, so
        the captured graph replays them."""
        md = self.forward_metadata
        if md is None or not md.graph:
            return
        pages, plan = forward_plan.decode(
            self.req_to_token_pool.req_to_token, self.pool.residual_of_slot,
            forward_batch.req_pool_indices, forward_batch.seq_lens, self._graph.width,
            sink=self.sink is not None,
        )  # fmt: skip
        _copy_into(_rows(self._graph.pages, md.kv.batch), pages)  # the views md.kv reads
        _copy_into(md.decode_plan, plan)

    # -- forward ---------------------------------------------------------------------
    def _shapes(self, layer: Any, q, k, v):
        hq, hk, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        return q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
        md = self.forward_metadata
        q3, k3, v3 = self._shapes(layer, q, k, v)
        # The new tokens attend to themselves as the cache will hold them for every later
        # read (the residual page's 16-bit dtype): a prompt prefilled from scratch and the
        # same prompt continued from its cached tail then see the same K/V.
        ka, va = self._as_stored(k3), self._as_stored(v3)
        li = self.pool._layer(layer.layer_id)
        if md.prefill_cu is not None:
            out = ops.prefill_attention(q3, ka, va, md.prefill_cu, scale=layer.scaling)
        elif self.sink is None:
            out = ops.extend_attention(
                q3, ka, va, md.cu_seqlens, md.kv, layer=li, scale=layer.scaling
            )
        else:
            lse = torch.empty(q3.shape[:2], dtype=torch.float32, device=q3.device)
            main, _ = sink.main_view(md.kv)  # never empty: new tokens attend to themselves
            out = ops.extend_attention(
                q3, ka, va, md.cu_seqlens, main, layer=li, scale=layer.scaling, lse=lse
            )
            k_s, v_s, has = self._sink_pages(md.kv, li)
            o_s, l_s = sink.attend_extend(q3, md.row_req, k_s, v_s, has, layer.scaling)
            out = sink.merge(out, lse, o_s, l_s)
        if save_kv_cache:
            self.pool.store_extend(layer.layer_id, md.extend_plan, k3, v3)
        return out.flatten(1)  # [tokens, heads * D], also for 0 tokens

    def _as_stored(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.pool.k_res.dtype
        return x if x.dtype == dtype else x.to(dtype).to(x.dtype)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
        md = self.forward_metadata
        q3, k3, v3 = self._shapes(layer, q, k, v)
        if save_kv_cache:
            self.pool.store_decode(layer.layer_id, md.decode_plan, k3, v3)
        li = self.pool._layer(layer.layer_id)
        if self.sink is None:
            out = ops.decode_attention(
                q3, md.kv, layer=li, scale=layer.scaling, backend=self.decode_backend
            )
            return out.flatten(1)  # [tokens, heads * D], also for 0 tokens
        lse = torch.empty(q3.shape[:2], dtype=torch.float32, device=q3.device)
        main, empty = sink.main_view(md.kv)
        out = ops.decode_attention(
            q3, main, layer=li, scale=layer.scaling, backend=self.decode_backend, lse=lse
        )
        k_s, v_s, has = self._sink_pages(md.kv, li)
        o_s, l_s = sink.attend_decode(q3, k_s, v_s, has, layer.scaling)
        return sink.merge(out, lse, o_s, l_s, empty).flatten(1)

    def _sink_pages(
        self, kv: PagedKV, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each request's sink page of this layer, dequantized (fp32 [B, 128, H, D] K, V),
        and whether the request has one yet (its first page is complete)."""
        k, v = self.sink.dequantize(
            self.pool.pages[layer], kv.page_table[:, 0], self.pool.sink_table,
            backend=self.ops_backend,
        )  # fmt: skip
        return k, v, kv.num_pages > 0


def create_backend(model_runner: Any) -> OscarAttnBackend:
    """The factory SGLang's attention registry calls."""
    return OscarAttnBackend(model_runner)
