"""Perplexity with the cache quantized page by page, exactly as in serving.

Real English prose (`oscar_kv.eval.texts.english_text`) is fed through the model in 128-token
chunks cut at page boundaries, so every token attends to the already-quantized pages before its
own page plus the exact tokens of its own page: what a one-token decode step sees. The
perplexity "at context L" is that of the first L tokens of one long document (one run per
method gives every shorter context as a prefix).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from oscar_kv.config import BLOCK_TOKENS
from oscar_kv.eval.methods import Method

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


@dataclass
class PplResult:
    method: Method
    nll: torch.Tensor  # [tokens - 1] negative log-likelihood of tokens 1..T-1
    seconds: float
    kv_bytes: int  # bytes held at the end of the run, all layers

    def ppl(self, context: int) -> float:
        return math.exp(self.nll[: context - 1].double().mean().item())


def chunked_nll(
    model: Any, ids: torch.Tensor, cache: Cache, chunk: int = BLOCK_TOKENS, bar: Any = None
) -> torch.Tensor:
    """Per-token NLL of ``ids`` [1, T] fed through ``cache`` in ``chunk``-token forwards.

    Chunks start at multiples of ``chunk``; with chunk = 128 every token attends to the quantized
    pages before its page and exactly to the tokens of its own page, as in one-token decoding.
    """
    total = ids.shape[1]
    out = []
    with torch.no_grad():
        for a in range(0, total, chunk):
            b = min(total, a + chunk)
            logits = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            targets = ids[0, a + 1 : b + 1]
            out.append(-logp[: targets.shape[0]].gather(1, targets[:, None])[:, 0])
            if bar is not None:
                bar.update(b - a)
    return torch.cat(out)


def perplexity(
    model: Any, ids: torch.Tensor, method: Method, tokens: int, bar: Any = None
) -> PplResult:
    cache = method.make_cache(model.config)
    t0 = time.perf_counter()
    nll = chunked_nll(model, ids[:, :tokens], cache, bar=bar)
    return PplResult(method, nll, time.perf_counter() - t0, cache.kv_bytes())
