"""SGLang's own KL helpers on each live server, and the prefill vs cache-hit consistency gap.

Each server of `bench_served_quality.SERVERS` (SmolLM2 on this CPU) is started in turn:
- SGLang's helpers, run as SGLang's CI runs them against its own servers: decode logprobs
  against the logprobs of a prefill replay of the same tokens into a flushed cache
  (``sglang.test.kl_test_utils``: plain, prefill-cache-hit, decode-cache-hit, greedy;
  ``sglang.test.kl_multiturn_utils``: 3 turns, a prefill hit on a shared prefix then 2
  decode-hit turns, 3 decode-hit turns, sampled at temperature 1). Their KL is their own
  per-token estimate on the sampled token, ``exp(r) - 1 - r`` with r the log ratio, averaged
  per prompt and over prompts; their assertion is that average < --kl-threshold (0.003, the
  default of SGLang's unified-radix-cache test kit). The cache checks are SGLang's own
  callbacks (``default_decode_cache_assert`` with the server's page size from
  /server_info; a prefill hit may be the prefix or the prefix cut to a page) recorded
  without raising, so that the KL is computed whatever they say. Prompts: English prose
  (`oscar_kv.eval.texts.english_text`) in the SmolLM2 tokenizer, lengths drawn as SGLang's
  LongBench loader draws them (0.5x-1.5x of --helper-tokens), in place of its hub download.
- Consistency gap: documents of --lengths tokens, logprobs from the half on, (a) prefilled
  cold into a flushed cache, (b) the first half sent first so the second half attends to
  the cached half; KL(a || b) per token from the top --top-k input logprobs
  (`bench_served_quality.kl_topk`), next to KL(own || server) of (b) and of (a).
Writes benches/results/quality/served_kl.csv (helpers), served_kl_gap.csv, served_kl.png.

    python benches/bench_served_kl.py                       # 30-45 minutes on 2 cores
    python benches/bench_served_kl.py --servers sglang-own oscar-2bit-sink4
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_cpu import cpu_name
from bench_prefix_hits import git_commit
from bench_served_quality import (
    DEFAULT_SERVERS,
    RESULTS,
    SERVERS,
    input_logprobs,
    make_server,
    mean_kl_topk,
)

from oscar_kv.eval.texts import english_text
from oscar_kv.sglang.server import ServerError, smollm2_model

# The argument holding a multi-turn helper's first-turn prompts.
FIRST_TURN = ("input_ids", "full_input_ids", "first_turn_input_ids")
HELPERS = ["single", "single_prefill_hit", "single_decode_hit", "multi", "multi_prefill_hit",
           "multi_decode_hit"]  # fmt: skip


def sglang_kl_modules():
    """SGLang's two helper modules; their import reaches sglang.srt.configs, which needs
    torchvision: the plugin's CPU stand-in goes in first where torchvision is unusable."""
    from oscar_kv.sglang.plugin import _cpu_import_shims

    _cpu_import_shims()
    from sglang.test import kl_multiturn_utils, kl_test_utils

    return kl_test_utils, kl_multiturn_utils


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


_NP_SCALAR = re.compile(r"np\.float\d+\(([^)]*)\)")


def parse_helper_output(text: str) -> dict:
    """The numbers SGLang's ``compare_kl_divergence`` prints (``kl_divs=[...]``, one per prompt,
    and ``avg_kl_div=``) and the prompts a single-turn helper skipped for a cache miss."""
    kls: list[float] = []
    avg = None
    for line in text.splitlines():
        if line.startswith("kl_divs="):
            body = _NP_SCALAR.sub(r"\1", line[len("kl_divs=") :]).strip("[] ")
            kls = [float(x) for x in body.split(",") if x.strip()]
        elif line.startswith("avg_kl_div="):
            avg = float(line[len("avg_kl_div=") :])
    misses = len(re.findall(r"cache miss for prompt \d+, skipping", text))
    return {"kl_per_prompt": kls, "avg_kl": avg, "skipped_misses": misses}


class CacheChecks:
    """Runs one of SGLang's cache-assertion callbacks and records its verdict instead of
    raising, so the helper goes on to its KL; ``exact`` counts hits of at least ``full`` tokens
    (the check itself may allow a hit cut to a page)."""

    def __init__(self, check: Callable, full: Callable) -> None:
        self.check, self.full = check, full
        self.n = self.failed = self.exact = 0
        self.first_failure = ""

    def __call__(self, result: dict, *lens_and_label) -> None:
        self.n += 1
        self.exact += result["meta_info"]["cached_tokens"] >= self.full(*lens_and_label[:-1])
        try:
            self.check(result, *lens_and_label)
        except AssertionError as e:
            self.failed += 1
            self.first_failure = self.first_failure or str(e)


def paged_prefill_assert(page_size: int) -> Callable:
    """SGLang's ``default_prefill_cache_assert`` (a hit of the whole prefix), or the prefix cut
    to a page boundary: what a radix cache that shares whole pages only may hold."""
    _, mt = sglang_kl_modules()

    def check(result: dict, prefix_len: int, label: str) -> None:
        if result["meta_info"]["cached_tokens"] == prefix_len // page_size * page_size:
            return
        mt.default_prefill_cache_assert(result, prefix_len, label)

    return check


@contextlib.contextmanager
def helper_prompts(kt, prompts: list[list[int]]) -> Iterator[None]:
    """The single-turn helpers load LongBench V2 from the hub (none here): they get ours."""
    original = kt.get_input_ids
    kt.get_input_ids = lambda *a, **kw: [list(p) for p in prompts]
    try:
        yield
    finally:
        kt.get_input_ids = original


def take(prose: list[int], n: int, tokens: int, seed: int, spread: bool) -> list[list[int]]:
    """``n`` spans of the prose: ``tokens`` long, or (``spread``) 0.5x-1.5x of it, as SGLang's
    LongBench loader cuts its prompts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(tokens * rng.uniform(0.5, 1.5)) if spread else tokens
        start = rng.randrange(0, len(prose) - length)
        out.append(prose[start : start + length])
    return out


def helper_calls(kt, mt, args, acc: dict, inputs: dict) -> dict:
    """helper name -> (SGLang's helper, its arguments, cache callbacks by argument name)."""
    single = {"ACC_THRESHOLDS": acc, "max_samples": len(inputs["single"])}
    head = [d[: args.prefix_len] for d in inputs["multi"]]
    # Branch-like prefix hits: a shared 700-token prefix (not page-aligned) and suffixes of
    # different lengths, as SGLang's unified-radix-cache kit builds them.
    full = [d[: args.prefix_len + 64 + 32 * i] for i, d in enumerate(inputs["multi"])]
    multi = {"kl_threshold": args.kl_threshold, "turn_suffixes": inputs["turns"]}
    decode = {"assert_decode_cached_tokens": "decode"}
    return {
        "single": (kt.test_input_output_logprobs_match_helper, single, {}),
        "single_prefill_hit": (kt.test_input_output_logprobs_match_prefill_cache_hit_helper,
                               single, {}),
        "single_decode_hit": (kt.test_input_output_logprobs_match_decode_cache_hit_helper,
                              single, {}),
        "multi": (mt.test_input_output_logprobs_match_helper, multi | {"input_ids": head},
                  decode),
        "multi_prefill_hit": (mt.test_input_output_logprobs_match_prefill_cache_hit_helper,
                              multi | {"prefix_input_ids": head, "full_input_ids": full},
                              decode | {"assert_prefill_cached_tokens": "prefill"}),
        "multi_decode_hit": (mt.test_input_output_logprobs_match_decode_cache_hit_helper,
                             multi | {"first_turn_input_ids": head}, decode),
    }  # fmt: skip


def run_helpers(server, args, model_name: str, inputs: dict) -> list[dict]:
    kt, mt = sglang_kl_modules()
    info = requests.get(server.url + "/server_info", timeout=30).json()
    page = int(info["page_size"])
    acc = {model_name: {"kl_div": args.kl_threshold}}
    calls = helper_calls(kt, mt, args, acc, inputs)
    rows = []
    for name in args.helpers:
        fn, kwargs, asserts = calls[name]
        checks = {
            "prefill": CacheChecks(paged_prefill_assert(page), lambda prefix: prefix),
            "decode": CacheChecks(
                functools.partial(mt.default_decode_cache_assert, page_size=page),
                # a turn that stopped at max_new_tokens never wrote its last token's KV
                lambda history, output: history + output - 1,
            ),
        }
        buf = io.StringIO()
        t0 = time.monotonic()
        error = ""
        with (
            contextlib.redirect_stdout(_Tee(sys.stdout, buf)),
            helper_prompts(kt, inputs["single"]),
        ):
            try:
                fn(server.url, model_name=model_name, max_new_tokens=args.max_new_tokens,
                   **kwargs, **{k: checks[v] for k, v in asserts.items()})  # fmt: skip
            except AssertionError as e:
                error = (str(e).splitlines() or ["AssertionError"])[0].replace(
                    model_name, "SmolLM2"
                )
        parsed = parse_helper_output(buf.getvalue())
        first = next((kwargs[k] for k in FIRST_TURN if k in kwargs), inputs["single"])
        used = [checks[v] for v in asserts.values()]
        avg = parsed["avg_kl"]
        rows.append({
            "helper": name, "page_size": page,
            "chunked_prefill_size": info.get("chunked_prefill_size"),
            "prompts": len(first), "first_turn_tokens": sum(map(len, first)) / len(first),
            "compared": len(parsed["kl_per_prompt"]), "skipped_misses": parsed["skipped_misses"],
            "max_new_tokens": args.max_new_tokens, "kl_threshold": args.kl_threshold,
            "avg_kl": avg, "max_prompt_kl": max(parsed["kl_per_prompt"], default=None),
            "kl_assert": "not reached" if avg is None else
                         "pass" if avg < args.kl_threshold else "FAIL",
            "cache_checks": sum(c.n for c in used),
            "cache_checks_failed": sum(c.failed for c in used),
            "cache_hits_exact": sum(c.exact for c in used),
            "first_cache_failure": next((c.first_failure for c in used if c.first_failure), ""),
            "helper_error": error, "seconds": time.monotonic() - t0,
        })  # fmt: skip
        print(f"[{server.kv_quant}] {name}: {rows[-1]}", flush=True)
    return rows


def run_gap(server, docs: list[list[int]], top_k: int) -> list[dict]:
    out = []
    for doc in docs:
        half = len(doc) // 2
        cold = input_logprobs(server, doc, top_k, start=half, cached=0)
        warm = input_logprobs(server, doc, top_k, start=half, cached=half)
        out.append({"cold": cold, "warm": warm})
    return out


def run_server(name: str, args, model_name: str, inputs: dict) -> dict:
    server = make_server(name)
    server.start()
    try:
        server.wait_ready(args.start_timeout)
        print(f"[{name}] ready in {server.ready_s:.0f} s", flush=True)
        helpers = run_helpers(server, args, model_name, inputs)
        gap = run_gap(server, inputs["docs"], args.top_k)
    finally:
        server.stop()
    return {"helpers": helpers, "gap": gap}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", nargs="+", default=DEFAULT_SERVERS, choices=list(SERVERS))
    p.add_argument("--helpers", nargs="+", default=HELPERS, choices=HELPERS)
    p.add_argument("--prompts", type=int, default=4, help="prompts per single-turn helper")
    p.add_argument("--multi-prompts", type=int, default=3, help="prompts per multi-turn helper")
    p.add_argument("--helper-tokens", type=int, default=1024, help="mean helper prompt length")
    p.add_argument("--prefix-len", type=int, default=700, help="shared prefix (multi-turn hits)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--kl-threshold", type=float, default=0.003)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--docs", type=int, default=1, help="gap documents per length")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--start-timeout", type=float, default=1200)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.servers[0] != "sglang-own":
        p.error("the first server must be sglang-own (the reference)")

    from transformers import AutoTokenizer

    model_name = smollm2_model().tokenizer_path
    tok = AutoTokenizer.from_pretrained(model_name)
    prose = tok(english_text(400_000), add_special_tokens=False)["input_ids"]
    n_multi = args.multi_prompts
    turn_text = take(prose, n_multi, 192, seed=1, spread=False)
    inputs = {
        "single": take(prose, args.prompts, args.helper_tokens, seed=0, spread=True),
        "multi": take(prose, n_multi, args.prefix_len + 64 + 32 * n_multi, seed=3, spread=False),
        "turns": [[t[:128] for t in turn_text], [t[128:] for t in turn_text]],
        "docs": [d for x in args.lengths for d in take(prose, args.docs, x, seed=2, spread=False)],
    }
    commit = git_commit()
    res, failed = {}, {}
    for name in args.servers:
        try:
            res[name] = run_server(name, args, model_name, inputs)
        except ServerError as e:
            failed[name] = str(e)
            bar = "!" * 78
            print(f"\n{bar}\n{name} FAILED TO START: {SERVERS[name]}\n{e}\n{bar}\n", flush=True)
    if "sglang-own" not in res:
        print("the reference server did not start: nothing written", flush=True)
        return 1
    write(res, failed, args, commit)
    return 1 if failed else 0


def write(res: dict, failed: dict, args, commit: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    run = {"device": cpu_name(), "commit": commit}
    rows = [run | {"server": n} | r for n, v in res.items() for r in v["helpers"]]
    rows += [run | {"server": n, "helper": "server failed to start", "helper_error": e[:200]}
             for n, e in failed.items()]  # fmt: skip
    fields = list(dict.fromkeys(k for r in rows for k in r))
    _write_csv(args.out / "served_kl.csv", fields, rows)

    ref = res["sglang-own"]["gap"]
    lengths = [x for x in args.lengths for _ in range(args.docs)]
    gap = []
    for name, v in res.items():
        for length, mine, own in zip(lengths, v["gap"], ref, strict=True):
            gap.append(run | {
                "server": name, "length": length, "tokens": len(mine["warm"]["tokens"]),
                "cached_cold": mine["cold"]["cached"], "cached_warm": mine["warm"]["cached"],
                "kl_cold_vs_warm": mean_kl_topk(mine["cold"]["tops"], mine["warm"]["tops"]),
                "kl_own_vs_server_warm": mean_kl_topk(own["warm"]["tops"], mine["warm"]["tops"]),
                "kl_own_vs_server_cold": mean_kl_topk(own["cold"]["tops"], mine["cold"]["tops"]),
            })  # fmt: skip
    _write_csv(args.out / "served_kl_gap.csv", list(gap[0]), gap)
    plot(rows, gap, args)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def plot(rows: list[dict], gap: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    servers = list(dict.fromkeys(r["server"] for r in rows if r.get("avg_kl") is not None))
    width = 0.8 / max(1, len(servers))
    for i, name in enumerate(servers):
        ys = [next((r["avg_kl"] for r in rows if r["server"] == name and r["helper"] == h
                    and r.get("avg_kl") is not None), float("nan")) for h in args.helpers]  # fmt: skip
        a.bar([j + i * width for j in range(len(args.helpers))], ys, width, label=name)
    a.axhline(args.kl_threshold, color="k", ls="--", lw=1, label="threshold")
    a.set_xticks([j + 0.4 - width / 2 for j in range(len(args.helpers))], args.helpers,
                 rotation=20, fontsize=8)  # fmt: skip
    a.set_yscale("log")
    a.set_ylabel("SGLang helper avg KL (decode vs prefill replay)")
    a.legend(fontsize=8)
    for i, name in enumerate(dict.fromkeys(g["server"] for g in gap)):
        mine = [g for g in gap if g["server"] == name]
        xs = sorted({g["length"] for g in mine})
        for key, ls in (("kl_cold_vs_warm", "-"), ("kl_own_vs_server_warm", ":")):
            ys = [sum(g[key] for g in mine if g["length"] == x) /
                  sum(1 for g in mine if g["length"] == x) for x in xs]  # fmt: skip
            label = f"{name}: cold vs half cached" if ls == "-" else f"{name}: own vs server"
            b.plot(xs, [max(y, 1e-7) for y in ys], "o" + ls, color=f"C{i}", label=label)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("document tokens (KL over the second half)")
    b.set_ylabel("KL, top-k estimate (floor 1e-7)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "served_kl.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
