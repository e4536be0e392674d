"""Serving benchmark: a real SGLang server with ``--kv-quant oscar`` vs the same server with its
own bf16 (model dtype) KV cache, one after the other in one run, same prompts, same machine.

For each server (SmolLM2-135M-Instruct GGUF; on CPU when there is no GPU):
- start-up time to ``/health``;
- decode speed: streamed greedy generation of --decode-tokens tokens (EOS ignored) at batch 1
  and at batch --batch (concurrent requests), after a prompt of --context tokens; tokens/s is
  measured between the first and the last streamed token of each request;
- SGLang's own ``sglang.bench_serving`` on its generated-shared-prefix dataset (--gsp-groups
  groups of 4 prompts sharing a 512-token system prompt, 64-token questions, 32 output
  tokens, --batch concurrent): request and output throughput, TTFT, ITL, prefix-cache hit
  rate;
- greedy answers to --prompts prompts: the library chat of the demo (system prompt of ~150
  tokens, so its first page is quantized) and questions after ~600 tokens of English prose
  (Python's reference docs); agreement = fraction of prompts whose first 32 answer tokens
  are identical to bf16's, and the mean common-prefix length in tokens.

Writes benches/results/server.csv (device,commit,server,metric,batch,context,value),
server_agreement.csv (one row per prompt) and server.png.

    python benches/bench_server.py               # about 10 minutes on 2 cores
    python benches/bench_server.py --prompts 4 --decode-tokens 32   # quick
    python benches/bench_server.py --context 7000 --batch 2 --prompts 2 --gsp-groups 1 \
        --decode-tokens 64 --out benches/results/server_long        # long context
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from oscar_kv.cache_demo import SYSTEM_PROMPT, TURNS
from oscar_kv.eval.texts import english_text
from oscar_kv.server_demo import agreement_of_texts
from oscar_kv.sglang.server import SGLangServer, cuda_available, smollm2_model

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    *TURNS,
    "Is the library open on Sundays?",
    "How much does it cost to return two books three days late?",
    "Where is the quiet reading room?",
    "Can visitors use the computers, and for how long?",
]
DOC_QUESTIONS = [
    "Summarize the text above in two sentences.",
    "What programming language is the text above about?",
    "List three keywords that appear in the text above.",
    "Explain the first paragraph of the text above to a beginner.",
]


def prompts(n: int) -> list[list[dict[str, str]]]:
    doc = english_text(2600)[:2600]
    out = [
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]
        for q in QUESTIONS
    ]
    out += [[{"role": "user", "content": f"{doc}\n\n{q}"}] for q in DOC_QUESTIONS]
    return [out[i] for i in range(0, len(out), max(1, len(out) // n))][:n]


def answer(url: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    j = r.json()
    return j["choices"][0]["message"]["content"], j["usage"]["prompt_tokens"]


def stream_speed(url: str, prompt: str, tokens: int) -> float:
    """Tokens/s between the first and the last streamed chunk of one greedy generation."""
    body = {
        "text": prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
    }
    stamps = []
    with requests.post(url + "/generate", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                stamps.append(time.monotonic())
    if len(stamps) < 2:
        raise RuntimeError(f"stream returned {len(stamps)} chunks")
    return (tokens - 1) / (stamps[-1] - stamps[0])


def run_server(kind: str, args: argparse.Namespace, chats: list) -> dict:
    server = SGLangServer(
        smollm2_model(),
        kv_quant=kind,
        max_running_requests=max(8, args.batch),
        # Room for --context prompts at --batch (SmolLM2 takes up to 8192 positions).
        context_length=max(4096, args.context + args.decode_tokens + 64),
        max_total_tokens=max(16384, args.batch * (args.context + args.decode_tokens + 64)),
    )
    print(f"[{kind}] starting ...", flush=True)
    with server:
        print(f"[{kind}] ready in {server.ready_s:.0f} s", flush=True)
        with ThreadPoolExecutor(len(chats)) as pool:
            answers = list(pool.map(lambda m: answer(server.url, m, 32), chats))
        prompt = english_text(args.context * 5)[: args.context * 4]  # ~4 chars per token
        speed = {}
        for batch in (1, args.batch):
            with ThreadPoolExecutor(batch) as pool:
                rates = list(
                    pool.map(
                        lambda i: stream_speed(server.url, f"[{i}] " + prompt, args.decode_tokens),
                        range(batch),
                    )
                )
            speed[batch] = sum(rates)  # aggregate tokens/s over the concurrent requests
            print(f"[{kind}] decode batch {batch}: {speed[batch]:.2f} tok/s", flush=True)
        gsp = sglang_gsp(server, args)
        print(f"[{kind}] sglang.bench_serving generated-shared-prefix: {gsp}", flush=True)
    return {"ready_s": server.ready_s, "answers": answers, "speed": speed, "gsp": gsp}


GSP_METRICS = ("request_throughput", "output_throughput", "mean_ttft_ms", "mean_itl_ms")


def sglang_gsp(server: SGLangServer, args: argparse.Namespace) -> dict[str, float]:
    """SGLang's own serving benchmark on its generated-shared-prefix dataset (groups of
    prompts sharing a long system prompt) against the running server."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gsp.jsonl"
        cmd = [
            sys.executable, "-m", "sglang.bench_serving",
            "--backend", "sglang", "--base-url", server.url,
            "--dataset-name", "generated-shared-prefix",
            "--gsp-num-groups", str(args.gsp_groups), "--gsp-prompts-per-group", "4",
            "--gsp-system-prompt-len", "512", "--gsp-question-len", "64",
            "--gsp-output-len", "32",
            "--tokenizer", str(server.model.tokenizer_path),
            "--max-concurrency", str(args.batch), "--seed", "1",
            "--cache-report", "--output-file", str(out),
        ]  # fmt: skip
        # bench_serving imports SGLang's multimodal helpers: on CPU they need the stand-ins.
        env = dict(os.environ) | ({} if cuda_available() else {"SGLANG_USE_CPU_ENGINE": "1"})
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"sglang.bench_serving failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        result = json.loads(out.read_text().strip().splitlines()[-1])
    row = {m: float(result[m]) for m in GSP_METRICS}
    row["cache_hit_rate_pct"] = float(result["cache_report"]["cache_hit_rate_pct"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--decode-tokens", type=int, default=96)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--gsp-groups", type=int, default=4, help="bench_serving prompt groups (x4)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    chats = prompts(args.prompts)
    res = {kind: run_server(kind, args, chats) for kind in ("none", "oscar")}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_model().tokenizer_path)
    ours = [a for a, _ in res["oscar"]["answers"]]
    base = [a for a, _ in res["none"]["answers"]]
    same, prefix, per_prompt = agreement_of_texts(ours, base, tok)
    device = "cuda" if cuda_available() else "cpu (2 cores, SmolLM2-135M fp32)"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    names = {"none": "sglang-bf16", "oscar": "oscar-2b"}
    rows = []
    for kind, r in res.items():
        rows.append((device, commit, names[kind], "startup_s", 0, 0, round(r["ready_s"], 1)))
        for batch, v in r["speed"].items():
            rows.append((device, commit, names[kind], "decode_tok_s", batch, args.context, round(v, 2)))  # fmt: skip
        for metric, v in r["gsp"].items():
            rows.append((device, commit, names[kind], f"gsp_{metric}", args.batch, 576, round(v, 3)))  # fmt: skip
    rows.append((device, commit, "oscar-2b", "agree_first32", 0, 0, round(same, 3)))
    rows.append((device, commit, "oscar-2b", "common_prefix_tokens", 0, 0, round(prefix, 2)))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "server.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "commit", "server", "metric", "batch", "context", "value"])
        w.writerows(rows)
    with open(args.out / "server_agreement.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "prompt_tokens", "common_prefix_tokens", "bf16", "oscar"])
        for i, (k, (a, n), (b, _)) in enumerate(
            zip(per_prompt, res["oscar"]["answers"], res["none"]["answers"], strict=True)
        ):
            w.writerow([i, n, k, b, a])
    plot(res, names, args)
    for row in rows:
        print(",".join(map(str, row)))
    print(
        f"agreement: {same:.0%} of {len(chats)} prompts identical in the first 32 tokens, "
        f"mean common prefix {prefix:.1f} tokens"
    )
    return 0


def plot(res: dict, names: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    batches = list(res["none"]["speed"])
    width = 0.38
    for j, kind in enumerate(("none", "oscar")):
        vals = [res[kind]["speed"][b] for b in batches]
        xs = [i + (j - 0.5) * width for i in range(len(batches))]
        ax.bar(xs, vals, width, label=names[kind])
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s (sum over requests)")
    ax.set_title(f"SGLang server, SmolLM2-135M, {args.context}-token prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "server.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
