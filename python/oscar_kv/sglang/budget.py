"""One KV budget for packed pages and bf16 residual pages.

Under ``--kv-quant oscar`` the bytes SGLang gives the KV cache (the profiled share of device
memory, or ``--max-total-tokens`` packed tokens when the user caps it) hold two kinds of
page, both sized here and nowhere else:

- packed pages (`oscar_kv.ops.PageLayout`, all layers): SGLang's token location space, so
  ``max_total_num_tokens = packed_pages * 128``; one more page is SGLang's padding page 0;
- residual pages: 128 bf16 token slots, K and V, all layers, one per running request, where
  its newest <128 tokens live until the page is complete and quantized; one more is the
  padding residual page that CUDA-graph padding rows write to.

The split is a reservation sized from the request slots: ``residual_pages`` equals
``--max-running-requests`` when the user sets it; otherwise as many as fit in
`DEFAULT_RESIDUAL_SHARE` of the budget (at least one, at most `MAX_DEFAULT_SLOTS`), and
SGLang's own default for running requests is lowered to that number, so a running request
always finds its residual page and the residual share never dominates a small budget.
`KVBudget.nbytes` is exactly what `OscarTokenToKVPool` allocates (a test sums its tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.plan import bf16_bytes_per_token, oscar_bytes_per_token
from oscar_kv.sink import SinkLayout

DEFAULT_RESIDUAL_SHARE = 0.10
MAX_DEFAULT_SLOTS = 1024


class KVBudgetError(ValueError):
    """The KV budget cannot hold one packed page and one residual page."""


def residual_dtype(kv_cache_dtype: torch.dtype) -> torch.dtype:
    """Residual pages are 16-bit: the cache dtype when SGLang's own cache would be fp16 or
    bf16, bf16 otherwise (an fp32 model on a CPU still gets a bf16 cache window)."""
    return kv_cache_dtype if kv_cache_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


@dataclass(frozen=True)
class KVShape:
    """What the budget needs to know of the model, per rank."""

    layers: int
    kv_heads: int
    head_dim: int
    config: OscarConfig
    residual_dtype: torch.dtype = torch.bfloat16

    @property
    def packed_page_bytes(self) -> int:
        """One packed page (128 tokens), every layer."""
        return BLOCK_TOKENS * oscar_bytes_per_token(
            self.layers, self.kv_heads, self.head_dim, self.config
        )

    @property
    def residual_page_bytes(self) -> int:
        """One residual page: 128 token slots of K and V, every layer, in `residual_dtype`."""
        elt = torch.empty((), dtype=self.residual_dtype).element_size()
        return 2 * BLOCK_TOKENS * self.layers * self.kv_heads * self.head_dim * elt

    @property
    def bf16_token_bytes(self) -> int:
        return bf16_bytes_per_token(self.layers, self.kv_heads, self.head_dim)


@dataclass(frozen=True)
class KVBudget:
    shape: KVShape
    packed_pages: int  # usable pages (SGLang's page 0, the padding page, comes on top)
    residual_pages: int

    @property
    def tokens(self) -> int:
        """SGLang's ``max_total_num_tokens``."""
        return self.packed_pages * BLOCK_TOKENS

    @property
    def packed_bytes(self) -> int:
        return (self.packed_pages + 1) * self.shape.packed_page_bytes

    @property
    def residual_bytes(self) -> int:
        """The residual pages and the padding residual page."""
        return (self.residual_pages + 1) * self.shape.residual_page_bytes

    @property
    def nbytes(self) -> int:
        """Every byte the pool allocates."""
        return self.packed_bytes + self.residual_bytes

    def with_residual_pages(self, n: int) -> KVBudget:
        return KVBudget(self.shape, self.packed_pages, n)

    def report(self) -> str:
        """The start-up capacity line: both page kinds counted, vs bf16 in the same bytes
        (and, with sink pages, what they cost per cached sequence)."""
        s = self.shape
        bf16_tokens = self.nbytes // s.bf16_token_bytes
        return self._report_pages(bf16_tokens) + self._report_sink(bf16_tokens)

    def _report_sink(self, bf16_tokens: int) -> str:
        s = self.shape
        sink = SinkLayout.of(s.config, s.kv_heads, s.head_dim, s.residual_dtype)
        if sink is None:
            return ""
        at_4k = self.tokens * 32 // (32 + sink.companions)
        return (
            f"; each cached sequence's first page is a {s.config.sink_bits}-bit sink page "
            f"spanning {sink.rows} pages ({sink.companions} more than a page): at 4K tokens "
            f"per sequence {at_4k} tokens ({at_4k / max(bf16_tokens, 1):.2f}x bf16)"
        )

    def _report_pages(self, bf16_tokens: int) -> str:
        s = self.shape
        return (
            f"oscar-kv capacity ({s.config.label}, {s.layers} layers x {s.kv_heads} KV heads x "
            f"D={s.head_dim}): {self.tokens} tokens in {self.packed_pages} packed pages "
            f"({self.packed_bytes / 2**20:.1f} MiB) + {self.residual_pages} residual pages "
            f"for as many running requests, +1 padding ({self.residual_bytes / 2**20:.1f} MiB, "
            f"{str(s.residual_dtype).removeprefix('torch.')}, "
            f"{100 * self.residual_bytes / self.nbytes:.1f}% of the budget) = "
            f"{self.nbytes / 2**30:.3f} GiB ({self.nbytes} B); bf16 holds {bf16_tokens} tokens "
            f"in the same bytes ({self.tokens / max(bf16_tokens, 1):.2f}x)"
        )


def _default_residual_pages(shape: KVShape, residual_share_bytes: float) -> int:
    """Residual pages that fit in ``residual_share_bytes`` beside the padding residual page,
    at least 1, at most `MAX_DEFAULT_SLOTS`."""
    n = int(residual_share_bytes // shape.residual_page_bytes) - 1
    return max(1, min(n, MAX_DEFAULT_SLOTS))


def split_bytes(shape: KVShape, budget_bytes: int, slots: int | None) -> KVBudget:
    """A byte budget (the profiled path): residual pages first, packed pages from the rest."""
    if slots is None:
        residual = _default_residual_pages(shape, DEFAULT_RESIDUAL_SHARE * budget_bytes)
    else:
        residual = slots
    rest = budget_bytes - (residual + 1) * shape.residual_page_bytes
    packed = rest // shape.packed_page_bytes - 1
    if packed < 1:
        need = 2 * shape.packed_page_bytes + (residual + 1) * shape.residual_page_bytes
        raise KVBudgetError(
            f"--kv-quant oscar: the KV budget ({budget_bytes / 2**20:.1f} MiB) cannot hold one "
            f"packed page plus {residual} residual pages and the padding one "
            f"({need / 2**20:.1f} MiB needed); "
            "raise --mem-fraction-static or lower --max-running-requests"
        )
    return KVBudget(shape, packed, residual)


def for_tokens(shape: KVShape, max_total_tokens: int, slots: int | None) -> KVBudget:
    """A token cap (``--max-total-tokens``): that many packed tokens, and residual pages that
    take at most `DEFAULT_RESIDUAL_SHARE` of packed + residual bytes unless slots are given."""
    packed = max_total_tokens // BLOCK_TOKENS
    if packed < 1:
        raise KVBudgetError(
            f"--kv-quant oscar needs at least one 128-token page; got {max_total_tokens} tokens"
        )
    if slots is None:
        # r * res <= share * (packed_bytes + r * res)  <=>  r * res <= share/(1-share) * packed_bytes
        packed_bytes = (packed + 1) * shape.packed_page_bytes
        ratio = DEFAULT_RESIDUAL_SHARE / (1 - DEFAULT_RESIDUAL_SHARE)
        residual = _default_residual_pages(shape, ratio * packed_bytes)
    else:
        residual = slots
    return KVBudget(shape, packed, residual)
