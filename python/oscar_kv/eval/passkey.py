"""Passkey retrieval (needle in a haystack) over a document in the prefix cache.

A chat prompt holds prose with a sentence "The secret passkey is NNNNN." at a depth of 0..100%
and then asks for the passkey; the answer is greedy and scored by exact match of the number.
The document is prefilled once in bf16 (as a serving extend would, one forward attending to
itself exactly), its pages are then quantized by each method, and the question is an extend
over those quantized pages followed by greedy decoding: the document-in-the-prefix-cache
situation. The bf16 prefill is shared by every method and, across depths, by the common
haystack prefix. The prompt texts are in `oscar_kv.eval.texts`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from oscar_kv.eval.caches import RowsCache, bf16_cache, bf16_cache_from, bf16_extend, cache_kv
from oscar_kv.eval.methods import Method
from oscar_kv.eval.texts import NEEDLE, NEEDLE_HEAD, NEEDLE_QUESTION, encode

NEEDLE_NEW_TOKENS = 7


@dataclass
class NeedleTrial:
    length: int
    depth: float
    seed: int
    key: str
    position: int = 0  # haystack tokens before the needle
    ids: torch.Tensor | None = None  # the prompt's token ids (document + question)
    answers: dict[str, str] = field(default_factory=dict)

    def correct(self, label: str) -> bool:
        found = re.search(r"\d+", self.answers.get(label, ""))
        return found is not None and found.group(0) == self.key


def needle_trials(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    haystack: str,
    bar: Any = None,
) -> list[NeedleTrial]:
    """Run the passkey grid; every method answers every (length, depth, seed).

    Per seed the haystack prefix is prefilled once in bf16 and shared by all trials: a trial
    extends the prefix cache up to its needle, then through the needle and the rest of its
    document, then quantizes that document once per method and asks the question in one batch.
    """
    head = encode(tokenizer, NEEDLE_HEAD)
    question = encode(tokenizer, NEEDLE_QUESTION)
    hay_all = encode(tokenizer, haystack)
    trials = []
    for seed in seeds:
        rng = random.Random(seed)
        offset = rng.randrange(0, max(1, hay_all.shape[0] - 2 * max(lengths)))
        hay = hay_all[offset:]
        keys = {(L, d): str(rng.randint(10000, 99999)) for L in lengths for d in depths}
        # Needles go at sentence starts: after a token that ends with ". ".
        ends = [
            i + 1
            for i in range(min(hay.shape[0], max(lengths)))
            if tokenizer.decode(hay[i : i + 1]).rstrip().endswith(".")
        ]
        plan = []
        for L in lengths:
            for d in depths:
                needle = encode(tokenizer, NEEDLE.format(key=keys[L, d]))
                h = L - head.shape[0] - needle.shape[0] - question.shape[0]
                target = round(d * h)
                p = min([0, *ends], key=lambda e, t=target, h=h: (e > h, abs(e - t)))
                plan.append((p, L, d, needle, h))
        plan.sort(key=lambda x: x[0])
        prefix = bf16_cache(model.config)
        bf16_extend(model, prefix, head)
        done = 0
        for p, L, d, needle, h in plan:
            if p > done:
                bf16_extend(model, prefix, hay[done:p])
                done = p
            cache = bf16_cache_from(model, cache_kv(prefix, head.shape[0] + p))
            doc_rest = torch.cat([needle, hay[p:h]])
            bf16_extend(model, cache, doc_rest)
            doc = torch.cat([head, hay[:p], doc_rest])
            rows = RowsCache(methods, model.config)
            rows.load(cache_kv(cache))
            ids = torch.cat([doc, question])[None].expand(len(methods), -1)
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    past_key_values=rows,
                    max_new_tokens=NEEDLE_NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            trial = NeedleTrial(L, d, seed, keys[L, d], p, ids[0].clone())
            for i, m in enumerate(methods):
                trial.answers[m.label] = tokenizer.decode(
                    out[i, ids.shape[1] :], skip_special_tokens=True
                )
            trials.append(trial)
            if bar is not None:
                bar.update(1)
    return trials
