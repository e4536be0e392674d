"""Quality through live servers: SGLang's own cache vs ``--kv-quant oscar`` (2-bit, 4-bit).

Each server (SmolLM2-135M on this CPU, the README's settings) is started in turn and sent the
same requests; quality is what the server computes, cache and all:
- Logprobs over a cached prefix: for documents of --lengths tokens (English prose), the first
  half is sent first (so its pages are in the prefix cache, packed for oscar), then the whole
  document with ``return_logprob`` from the half on: every later token attends to the cached
  half. Per token: KL(own || server) estimated from the top --top-k input logprobs (the rest
  of the mass as one bucket; an estimate, exact as k -> vocabulary), |logprob difference| of
  the document's own next token, and perplexity.
- Passkey retrieval over HTTP: a document with "The secret passkey is NNNNN." at a depth,
  the document sent first, then document + question; greedy 7 tokens, exact match of the
  number (--lengths x --depths x --seeds).
SGLang's own cache on this CPU runs the model's fp32, so it is the reference. `SERVERS` also
holds ``oscar-2bit-sink4`` (``--kv-quant-sink-bits 4``, the first page at 4 bits), not in the
default ``--servers``: where the launcher does not know the flag, that server fails to start
and the run stops with the launcher's error.
Writes benches/results/quality/served_quality.csv, served_passkey.csv and served_quality.png.
`bench_served_kl` shares the registry and the helpers here.

    python benches/bench_served_quality.py        # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import re
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_cpu import cpu_name
from bench_prefix_hits import git_commit

from oscar_kv.eval.texts import NEEDLE, NEEDLE_HEAD, NEEDLE_QUESTION, english_text
from oscar_kv.sglang.server import SGLangServer, smollm2_model

RESULTS = Path(__file__).parent / "results" / "quality"
# name -> SGLangServer arguments; the first is the reference every other server is compared to.
SERVERS: dict[str, dict] = {
    "sglang-own": {"kv_quant": "none"},
    "oscar-2bit": {"kv_quant": "oscar", "kv_quant_bits": 2},
    "oscar-4bit": {"kv_quant": "oscar", "kv_quant_bits": 4},
    "oscar-2bit-sink4": {
        "kv_quant": "oscar", "kv_quant_bits": 2, "extra_args": ["--kv-quant-sink-bits", "4"],
    },
}  # fmt: skip
DEFAULT_SERVERS = ["sglang-own", "oscar-2bit", "oscar-4bit"]


def make_server(name: str) -> SGLangServer:
    """The named server with the README's settings (SmolLM2, 16K-token pool, 8K context)."""
    return SGLangServer(
        smollm2_model(), max_total_tokens=16384, max_running_requests=4, context_length=8192,
        **SERVERS[name],
    )  # fmt: skip


def _generate(server: SGLangServer, ids: list[int], **kw) -> dict:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}} | kw
    r = requests.post(server.url + "/generate", json=body, timeout=1200)
    r.raise_for_status()
    return r.json()


def _flush(server: SGLangServer) -> None:
    for _ in range(30):
        if requests.post(server.url + "/flush_cache", timeout=60).status_code == 200:
            return
        time.sleep(1)
    raise RuntimeError("server never idle enough to flush its cache")


def input_logprobs(server, doc: list[int], top_k: int, start: int, cached: int) -> dict:
    """The document's input logprobs from token ``start`` on, into a flushed cache whose first
    ``cached`` tokens were sent first (0: the whole document prefilled cold)."""
    _flush(server)
    if cached:
        _generate(server, doc[:cached])
    out = _generate(
        server, doc, return_logprob=True, logprob_start_len=start, top_logprobs_num=top_k
    )["meta_info"]
    tokens = [(lp, tid) for lp, tid, *_ in out["input_token_logprobs"]]
    tops = [{tid: lp for lp, tid, *_ in pos} if pos else {} for pos in out["input_top_logprobs"]]
    return {"tokens": tokens, "tops": tops, "cached": out["cached_tokens"]}


def logprobs_over_cached_half(server, doc: list[int], top_k: int) -> dict:
    """The document's input logprobs from its second half on, the first half cached."""
    half = len(doc) // 2
    return input_logprobs(server, doc, top_k, start=half, cached=half)


def kl_topk(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p || q) over p's top-k tokens plus one bucket for the rest of the mass; a token
    missing from q's top-k gets q's smallest listed logprob (an upper bound on it)."""
    floor = min(q.values())
    kl, p_mass, q_mass = 0.0, 0.0, 0.0
    for tid, lp in p.items():
        lq = q.get(tid, floor)
        kl += math.exp(lp) * (lp - lq)
        p_mass += math.exp(lp)
        q_mass += math.exp(lq)
    p_rest, q_rest = max(1.0 - p_mass, 1e-12), max(1.0 - q_mass, 1e-12)
    return kl + p_rest * (math.log(p_rest) - math.log(q_rest))


def mean_kl_topk(p_tops: list[dict[int, float]], q_tops: list[dict[int, float]]) -> float:
    """`kl_topk` averaged over the positions both runs returned top logprobs for."""
    kls = [kl_topk(p, q) for p, q in zip(p_tops, q_tops) if p and q]
    return sum(kls) / len(kls)


def passkey_docs(tok, lengths, depths, seeds) -> list[dict]:
    hay = tok(english_text(200_000), add_special_tokens=False)["input_ids"]
    head = tok(NEEDLE_HEAD, add_special_tokens=False)["input_ids"]
    question = tok(NEEDLE_QUESTION, add_special_tokens=False)["input_ids"]
    docs = []
    for seed in seeds:
        rng = random.Random(seed)
        for length in lengths:
            for depth in depths:
                key = str(rng.randint(10000, 99999))
                needle = tok(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
                h = length - len(head) - len(needle) - len(question)
                start = rng.randrange(0, len(hay) - h)
                body = hay[start : start + h]
                at = round(depth * h)
                doc = head + body[:at] + needle + body[at:]
                docs.append({"length": length, "depth": depth, "seed": seed, "key": key,
                             "doc": doc, "question": question})  # fmt: skip
    return docs


def run_server(name: str, args, docs: list[list[int]], trials: list[dict]) -> dict:
    server = make_server(name)
    server.start()
    try:
        server.wait_ready(args.start_timeout)
        logprobs = [logprobs_over_cached_half(server, d, args.top_k) for d in docs]
        answers = []
        for t in trials:
            _flush(server)
            _generate(server, t["doc"])
            out = _generate(
                server, t["doc"] + t["question"],
                sampling_params={"max_new_tokens": 7, "temperature": 0},
            )  # fmt: skip
            answers.append(out["text"])
    finally:
        server.stop()
    print(f"[{name}] done", flush=True)
    return {"logprobs": logprobs, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--docs", type=int, default=2, help="documents per length (logprobs)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--start-timeout", type=float, default=1200)
    p.add_argument("--servers", nargs="+", default=DEFAULT_SERVERS, choices=list(SERVERS))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.servers[0] != "sglang-own":
        p.error("the first server must be sglang-own (the reference)")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_model().tokenizer_path)
    prose = tok(english_text(400_000), add_special_tokens=False)["input_ids"]
    docs, meta = [], []
    for length in args.lengths:
        for i in range(args.docs):
            start = (i * 7919 + length) % (len(prose) - length)
            docs.append(prose[start : start + length])
            meta.append((length, i))
    trials = passkey_docs(tok, args.lengths, args.depths, args.seeds)
    commit = git_commit()
    res = {name: run_server(name, args, docs, trials) for name in args.servers}
    write(res, args, meta, trials, commit)
    return 0


def write(res: dict, args, meta: list[tuple[int, int]], trials: list[dict], commit: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    ref = res["sglang-own"]
    rows = []
    for name, r in res.items():
        for (length, i), mine, own in zip(meta, r["logprobs"], ref["logprobs"], strict=True):
            n = min(len(mine["tokens"]), len(own["tokens"]))
            pairs = [
                (a, b)
                for a, b in zip(own["tokens"][:n], mine["tokens"][:n])
                if a[0] is not None and b[0] is not None
            ]
            nll = -sum(b[0] for _, b in pairs) / len(pairs)
            rows.append({
                "device": cpu_name(), "commit": commit, "server": name, "length": length, "doc": i, "tokens": len(pairs),
                "cached_tokens": mine["cached"],
                "kl_topk_vs_own": mean_kl_topk(own["tops"][:n], mine["tops"][:n]),
                "mean_abs_logprob_diff": sum(abs(a[0] - b[0]) for a, b in pairs) / len(pairs),
                "ppl": math.exp(nll),
            })  # fmt: skip
    with open(args.out / "served_quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: f"{v:.5f}" if isinstance(v, float) else v for k, v in row.items()})
    with open(args.out / "served_passkey.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "commit", "server", "length", "depth", "seed", "key", "answer",
                    "correct"])  # fmt: skip
        for name, r in res.items():
            for t, ans in zip(trials, r["answers"], strict=True):
                found = re.search(r"\d+", ans)
                ok = found is not None and found.group(0) == t["key"]
                w.writerow([cpu_name(), commit, name, t["length"], t["depth"], t["seed"],
                            t["key"], ans.strip(), int(ok)])  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(res)
    for name in names[1:]:
        xs = sorted({r["length"] for r in rows})
        ys = [
            sum(r["kl_topk_vs_own"] for r in rows if r["server"] == name and r["length"] == x)
            / max(1, sum(1 for r in rows if r["server"] == name and r["length"] == x))
            for x in xs
        ]
        a.plot(xs, ys, "o-", label=name)
    a.set_xlabel("document tokens (first half cached)")
    a.set_ylabel("KL(own || server), top-k estimate")
    a.legend()
    acc = []
    for name, r in res.items():
        hits = [re.search(r"\d+", ans) for ans in r["answers"]]
        acc.append(
            100
            * sum(h is not None and h.group(0) == t["key"] for h, t in zip(hits, trials))
            / len(trials)
        )
    b.bar(names, acc, color=["gray"] + [f"C{i}" for i in range(len(names) - 1)])
    b.set_ylabel("passkey accuracy (%)")
    fig.tight_layout()
    fig.savefig(args.out / "served_quality.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
