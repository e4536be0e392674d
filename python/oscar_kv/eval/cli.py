"""`python -m oscar_kv eval`: model-level quality of the quantized KV cache on SmolLM2-135M.

Runs the sections asked for (`--sections`): perplexity (`oscar_kv.eval.perplexity`), passkey
retrieval (`oscar_kv.eval.passkey`), multi-turn agreement (`oscar_kv.eval.chat`) and the per-layer
attribution (`oscar_kv.eval.attribution`) over the methods of `oscar_kv.eval.methods`, and
writes the CSVs, plots and summary.md (`oscar_kv.eval.report`, `oscar_kv.eval.plots`);
`--sections report` rebuilds the plots and summary.md from existing CSVs. See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from oscar_kv.config import OscarConfig
from oscar_kv.eval.attribution import token_attribution, write_attribution
from oscar_kv.eval.chat import TurnResult, chat_agreement
from oscar_kv.eval.methods import DEFAULT_AGREE, DEFAULT_LONG, DEFAULT_NEEDLE, all_methods, select
from oscar_kv.eval.passkey import needle_trials
from oscar_kv.eval.perplexity import perplexity
from oscar_kv.eval.plots import draw_ppl_plots
from oscar_kv.eval.report import (
    agreement_text,
    needle_text,
    rebuild_summary,
    run_notes,
    write_agreement,
    write_needle,
    write_ppl,
    write_summary,
)
from oscar_kv.eval.texts import encode, english_text, make_chats

RESULTS_DIR = Path("benches/results/quality")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _labels(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oscar_kv eval",
        description="Perplexity, passkey retrieval and multi-turn agreement of every KV cache "
        "method on SmolLM2-135M-Instruct (CPU). Writes CSV, PNG and summary.md.",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}")
    p.add_argument(
        "--sections",
        default="ppl,needle,agreement",
        help="comma list of ppl, needle, agreement, attribution (per-layer error on captured "
        "K/V, written to attribution.md; not in summary.md); `report` alone redraws the plots "
        "and rewrites summary.md from --out's CSVs",
    )
    p.add_argument("--methods", default="", help="ppl methods (labels, default: all)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens per ppl run (all methods)")
    p.add_argument("--long-tokens", type=int, default=8192, help="tokens for --long-methods")
    p.add_argument("--long-methods", default=",".join(DEFAULT_LONG))
    p.add_argument("--contexts", default="512,1024,2048,4096,8192",
                   help="reported ppl contexts (prefixes of the runs)")  # fmt: skip
    p.add_argument("--needle-methods", default=",".join(DEFAULT_NEEDLE))
    p.add_argument("--needle-lengths", default="1024,2048,4096")
    p.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--needle-seeds", default="0")
    p.add_argument("--agree-methods", default=",".join(DEFAULT_AGREE))
    p.add_argument("--chats", type=int, default=20)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace, load: Callable[[], tuple[Any, Any]] | None = None) -> int:
    from tqdm.auto import tqdm

    from oscar_kv.eval.smollm2 import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(_labels(args.sections))
    unknown = sections - {"ppl", "needle", "agreement", "attribution", "report"}
    if sections == {"report"}:  # plots and summary.md again from the CSVs, no model
        rebuild_summary(args.out)
        return 0
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}")
    quiet = args.no_progress
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    wall0 = time.perf_counter()
    t0 = time.perf_counter()
    model, tokenizer = load() if load else load_model(progress=not quiet)
    timings["model load"] = time.perf_counter() - t0
    text_cfg = model.config.get_text_config(decoder=True)
    kv_heads = text_cfg.num_key_value_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // (
        text_cfg.num_attention_heads
    )
    methods = all_methods()
    notes = run_notes()
    table: list[dict[str, Any]] = []
    needle_acc = agreement = None
    needle_info = agreement_info = ""

    if "ppl" in sections:
        t0 = time.perf_counter()
        chosen = select(methods, _labels(args.methods)) if args.methods else methods
        long = set(_labels(args.long_methods))
        plan = [(m, args.long_tokens if m.label in long else args.ppl_tokens) for m in chosen]
        need = max(n for _, n in plan)
        ids = encode(tokenizer, english_text(need * 6))[None, :need]
        if ids.shape[1] < need:
            raise SystemExit(f"only {ids.shape[1]} tokens of text for {need}")
        results = []
        with tqdm(total=sum(n for _, n in plan), desc="perplexity", unit="tok",
                  disable=quiet) as bar:  # fmt: skip
            for m, n in plan:
                bar.set_postfix_str(m.label)
                results.append(perplexity(model, ids, m, n, bar=bar))
        contexts = [c for c in _ints(args.contexts) if c <= need]
        table = write_ppl(out, results, contexts, kv_heads, head_dim)
        draw_ppl_plots(out, table)
        timings["perplexity"] = time.perf_counter() - t0

    if "needle" in sections:
        t0 = time.perf_counter()
        nm = select(methods, _labels(args.needle_methods))
        lengths, depths = _ints(args.needle_lengths), _floats(args.needle_depths)
        seeds = _ints(args.needle_seeds)
        hay = english_text(400_000)[200_000:]
        with tqdm(total=len(lengths) * len(depths) * len(seeds), desc="passkey",
                  unit="trial", disable=quiet) as bar:  # fmt: skip
            trials = needle_trials(model, tokenizer, nm, lengths, depths, seeds, hay, bar=bar)
        needle_acc = write_needle(out, trials, nm)
        needle_info = needle_text(len(trials), lengths, depths, seeds)
        timings["passkey"] = time.perf_counter() - t0

    if "agreement" in sections:
        t0 = time.perf_counter()
        am = select(methods, _labels(args.agree_methods))
        turns: list[TurnResult] = []
        chats = make_chats(args.chats, args.turns)
        with tqdm(total=len(chats), desc="chats", unit="chat", disable=quiet) as bar:
            for i, (system, questions) in enumerate(chats):
                turns += chat_agreement(
                    model, tokenizer, am, system, questions, args.max_new_tokens, chat_index=i
                )
                bar.update(1)
        agreement = write_agreement(out, turns, am, kv_heads, head_dim)
        prompt = sum(t.prompt_tokens for t in turns) / max(1, len(turns))
        agreement_info = agreement_text(len(chats), args.turns, args.max_new_tokens, prompt)
        timings["agreement"] = time.perf_counter() - t0

    if "attribution" in sections:
        from oscar_kv.eval.smollm2 import capture_qkv

        t0 = time.perf_counter()
        tokens, queries = 2048, 256
        layers = capture_qkv(model, tokenizer, english_text(tokens * 8), max_tokens=tokens)
        cfgs = (OscarConfig(bits=2), OscarConfig.kivi(2))
        write_attribution(
            out, {c.label: token_attribution(layers, c, queries) for c in cfgs}, tokens, queries
        )
        timings["attribution"] = time.perf_counter() - t0

    timings["total wall"] = time.perf_counter() - wall0
    if not sections & {"ppl", "needle", "agreement"}:
        return 0
    write_summary(
        out,
        kv_heads,
        head_dim,
        table,
        needle_acc,
        needle_info,
        agreement,
        agreement_info,
        timings,
        notes,
    )
    if not quiet:
        print((out / "summary.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
