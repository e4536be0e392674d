"""`python -m oscar_kv demo`: a real SGLang server with ``--kv-quant oscar``, and a chat client.

Starts ``python -m sglang.launch_server --model-path <SmolLM2 GGUF> --kv-quant oscar`` (on CPU
when there is no GPU; `oscar_kv.sglang.server`), then holds a multi-turn conversation with it
through the OpenAI client, streaming each answer. Per turn it prints the prompt tokens, how
many of them SGLang served from the prefix cache (``usage.prompt_tokens_details
.cached_tokens``: packed pages reused across turns), and decode speed; at the end the KV
memory of the conversation with OScaR pages vs bf16, from the server's own capacity report.
``--compare-bf16`` also runs the same conversation against a bf16 server and reports
agreement of the greedy answers and decode speed side by side.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from typing import Any

from oscar_kv.cache_demo import SYSTEM_PROMPT, TURNS
from oscar_kv.config import BLOCK_TOKENS

CELL_LINE = re.compile(r"cell size (\d+) B/token vs bf16 (\d+) B/token")
CAPACITY_LINE = re.compile(
    r"oscar-kv capacity .*?: (\d+) tokens in .*? = ([0-9.]+) GiB .*\(([0-9.]+)x\)"
)


@dataclass
class Turn:
    question: str
    answer: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    decode_tok_s: float


def chat(url: str, turns: list[str], max_tokens: int, *, echo: bool) -> list[Turn]:
    """Greedy multi-turn chat over the OpenAI API; each answer joins the conversation."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none")
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    out = []
    for question in turns:
        messages.append({"role": "user", "content": question})
        if echo:
            print(f"\nuser> {question}\nassistant> ", end="", flush=True)
        stream = client.chat.completions.create(
            model="default",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        usage: Any = None
        first = last = None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text = choice.delta.content or ""
                if text:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    parts.append(text)
                    if echo:
                        print(text, end="", flush=True)
        answer = "".join(parts)
        messages.append({"role": "assistant", "content": answer})
        details = getattr(usage, "prompt_tokens_details", None)
        cached = int(getattr(details, "cached_tokens", 0) or 0)
        n = int(usage.completion_tokens)
        speed = (n - 1) / (last - first) if first and last and last > first else float("nan")
        out.append(Turn(question, answer, int(usage.prompt_tokens), cached, n, speed))
        if echo:
            print(
                f"\n  [prompt {usage.prompt_tokens} tokens, {cached} from the prefix cache; "
                f"{n} generated at {speed:.1f} tok/s]"
            )
    return out


def kv_report(log_text: str, tokens: int) -> str:
    m = CELL_LINE.search(log_text)
    if m is None:
        return "KV memory: no oscar-kv capacity line in the server log"
    ours, bf16 = int(m.group(1)), int(m.group(2))
    paged = tokens // BLOCK_TOKENS * BLOCK_TOKENS
    return (
        f"KV memory for this conversation ({tokens} tokens, {paged} in packed pages): "
        f"{paged * ours / 1e6:.2f} MB of OScaR pages vs {paged * bf16 / 1e6:.2f} MB in bf16 "
        f"({bf16 / ours:.2f}x smaller; the last {tokens - paged} tokens stay exact in the "
        f"request's bf16 residual page). Per token: {ours} B vs {bf16} B."
    ) + _capacity(log_text)


def _capacity(log_text: str) -> str:
    m = CAPACITY_LINE.search(log_text)
    if m is None:
        return ""
    return (
        f"\nServer capacity: {m.group(1)} tokens in {m.group(2)} GiB of KV budget, residual "
        f"pages included: {m.group(3)}x the tokens bf16 holds in the same bytes."
    )


def agreement_of_texts(
    ours: list[str], base: list[str], tokenizer: Any, n: int = 32
) -> tuple[float, float, list[int]]:
    """Fraction of answers whose first ``n`` tokens equal the baseline's, the mean common
    prefix length in tokens (over the first ``n``), and each answer's common prefix."""
    same, prefix = 0, []
    for x, y in zip(ours, base, strict=True):
        tx = tokenizer.encode(x, add_special_tokens=False)[:n]
        ty = tokenizer.encode(y, add_special_tokens=False)[:n]
        k = 0
        while k < min(len(tx), len(ty)) and tx[k] == ty[k]:
            k += 1
        prefix.append(k)
        same += int(tx == ty)
    return same / len(ours), sum(prefix) / len(prefix), prefix


def main(argv: list[str] | None = None) -> int:
    from oscar_kv.sglang.server import SGLangServer, smollm2_model

    p = argparse.ArgumentParser(
        prog="python -m oscar_kv demo",
        description="Start an SGLang server with --kv-quant oscar (SmolLM2-135M, CPU without "
        "a GPU) and chat with it over the OpenAI API.",
    )
    p.add_argument("--bits", type=int, choices=(2, 4), default=2)
    p.add_argument("--max-tokens", type=int, default=48, help="answer length per turn")
    p.add_argument("--turns", type=int, default=len(TURNS), help=f"1..{len(TURNS)}")
    p.add_argument("--compare-bf16", action="store_true", help="also run a bf16 server")
    p.add_argument("--start-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if not 1 <= args.turns <= len(TURNS):
        p.error(f"--turns must be in 1..{len(TURNS)}")
    turns = TURNS[: args.turns]
    model = smollm2_model()

    print(f"starting SGLang with --kv-quant oscar --kv-quant-bits {args.bits} ...", flush=True)
    server = SGLangServer(model, kv_quant="oscar", kv_quant_bits=args.bits)
    with server:
        print(f"ready in {server.ready_s:.0f} s at {server.url} (log: {server.log_path})")
        ours = chat(server.url, turns, args.max_tokens, echo=True)
        log = server.log_text()
    total = ours[-1].prompt_tokens + ours[-1].completion_tokens
    hits = sum(t.cached_tokens for t in ours[1:])
    asked = sum(t.prompt_tokens for t in ours[1:])
    print(f"\nprefix cache: turns 2..{len(ours)} reused {hits} of {asked} prompt tokens")
    print(kv_report(log, total))
    speeds = [t.decode_tok_s for t in ours]
    print(f"decode: {sum(speeds) / len(speeds):.1f} tok/s (mean over turns, --kv-quant oscar)")

    if args.compare_bf16:
        print("\nstarting the same server without --kv-quant (bf16 cache) ...", flush=True)
        with SGLangServer(model, kv_quant="none") as bf:
            base = chat(bf.url, turns, args.max_tokens, echo=False)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.tokenizer_path)
        same, prefix, _ = agreement_of_texts(
            [t.answer for t in ours], [t.answer for t in base], tok
        )
        bspeed = sum(t.decode_tok_s for t in base) / len(base)
        print(
            f"greedy agreement with bf16: {same:.0%} of turns identical in the first 32 "
            f"tokens, mean common prefix {prefix:.1f} tokens; decode bf16 {bspeed:.1f} tok/s"
        )
    return 0
