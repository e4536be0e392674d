"""Multi-turn agreement: does each quantized cache answer a chat as the bf16 cache does?

Chats with a system prompt of procedurally generated facts (> 2 pages, `texts.make_chats`) and
several short questions about them. At every turn all methods see the same (bf16) conversation
so far and answer greedily; an answer agrees when its tokens equal the bf16 answer's. Mean
common-prefix length and teacher-forced top-1 agreement on the bf16 answer tokens are reported
too. The methods run as the rows of one batch (`RowsCache`), each row with its own cache.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from oscar_kv.config import BLOCK_TOKENS
from oscar_kv.eval.caches import RowsCache, bf16_cache, bf16_extend, cache_kv
from oscar_kv.eval.methods import Method
from oscar_kv.eval.texts import chat_ids, encode, next_user_turn


@dataclass
class TurnResult:
    chat: int
    turn: int
    prompt_tokens: int
    answers: dict[str, list[int]]  # per method label, truncated after the first EOS
    teacher_forced: dict[str, int]  # top-1 matches on the bf16 answer's tokens


def _truncate(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _page_chunks(start: int, end: int) -> list[tuple[int, int]]:
    out, a = [], start
    while a < end:
        b = min(end, (a // BLOCK_TOKENS + 1) * BLOCK_TOKENS)
        out.append((a, b))
        a = b
    return out


def chat_agreement(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    system: str,
    questions: Sequence[str],
    max_new_tokens: int = 24,
    chat_index: int = 0,
) -> list[TurnResult]:
    """One chat: at every turn each method answers the same bf16 conversation so far.

    ``methods[0]`` must be bf16 (the reference). The first prompt is prefilled once in bf16 and
    stored in every row (a serving prefill attends to itself exactly; its pages are quantized
    afterwards), so the first answer token of turn 1 is shared. From then on the rows run in
    one batch: the reference answer is fed in chunks cut at page boundaries (what decoding it
    would see, and its teacher-forced top-1 predictions), the next user message as one extend.
    """
    if methods[0].config is not None or methods[0].quanto_bits is not None:
        raise ValueError("methods[0] must be the bf16 reference")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = len(methods)
    conv = chat_ids(tokenizer, [{"role": "system", "content": system},
                                {"role": "user", "content": questions[0]}])[0]  # fmt: skip
    prefill = bf16_cache(model.config)
    first_logits = bf16_extend(model, prefill, conv, chunk=conv.shape[0])
    cache = RowsCache(methods, model.config)
    cache.load(cache_kv(prefill))
    first = first_logits.argmax(-1).expand(rows).clone()
    results = []
    for t, _ in enumerate(questions):
        fork = copy.deepcopy(cache)
        ids = torch.cat([conv[None].expand(rows, -1), first[:, None]], dim=1)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=fork,
                max_new_tokens=max_new_tokens - 1,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        answers = {
            m.label: _truncate(out[i, conv.shape[0] :].tolist(), eos) for i, m in enumerate(methods)
        }
        ref = answers[methods[0].label]
        ref_closed = ref if ref[-1] == eos else [*ref, eos]
        # Teacher-forced: feed the reference answer to every row, page-aligned.
        start = conv.shape[0]
        full = torch.cat([conv, torch.tensor(ref_closed)])
        preds = [first.tolist()]
        with torch.no_grad():
            for a, b in _page_chunks(start, full.shape[0]):
                chunk = full[None, a:b].expand(rows, -1)
                logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
                preds += logits.argmax(-1).transpose(0, 1).tolist()
        tf = {
            m.label: sum(preds[j][i] == ref[j] for j in range(len(ref)))
            for i, m in enumerate(methods)
        }
        results.append(TurnResult(chat_index, t + 1, conv.shape[0], answers, tf))
        if t + 1 == len(questions):
            break
        suffix = encode(tokenizer, next_user_turn(questions[t + 1]))
        with torch.no_grad():
            logits = model(
                input_ids=suffix[None].expand(rows, -1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
        first = logits[:, -1].argmax(-1)
        conv = torch.cat([full, suffix])
    return results
