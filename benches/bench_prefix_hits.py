"""Prefix-cache hits through live servers: SGLang's own cache vs ``--kv-quant oscar``.

Both servers (SmolLM2-135M on this CPU, the README's settings) run one after the other in one
run, on the same requests:
- SGLang's own ``sglang.bench_serving`` on its generated-shared-prefix dataset (groups of
  prompts sharing a 512-token system prompt, 64-token questions): its cache hit rate;
- multi-turn chats over the OpenAI API (a long and a short system prompt, 4 turns each,
  greedy): every turn's ``cached_tokens`` next to the previous turn's prompt + answer.
SGLang's own cache shares single tokens; oscar's shares whole packed pages plus the bf16
tails of finished histories and runs inside packed pages (docs/prefix-sharing.md).
Writes benches/results/prefix_hits.csv (one row per server and measurement) and .png.

    python benches/bench_prefix_hits.py                # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_cpu import cpu_name
from bench_server import sglang_gsp

from oscar_kv.eval.texts import LIBRARY_SYSTEM
from oscar_kv.sglang.server import SGLangServer, smollm2_model

RESULTS = Path(__file__).parent / "results"
TURNS = ("When does it open on Saturday?", "How many books can I borrow?", "Late fee?", "Thanks!")


def chat_turns(server: SGLangServer) -> list[dict]:
    rows = []
    for name, system in (("long-system", LIBRARY_SYSTEM * 3), ("short-system", "Be brief.")):
        messages = [{"role": "system", "content": system}]
        prev = None
        for i, q in enumerate(TURNS):
            messages.append({"role": "user", "content": q})
            body = {"model": "default", "messages": messages, "max_tokens": 24, "temperature": 0}
            r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            out = r.json()
            messages.append(
                {"role": "assistant", "content": out["choices"][0]["message"]["content"]}
            )
            u = out["usage"]
            rows.append(
                {
                    "chat": name,
                    "turn": i,
                    "prompt_tokens": u["prompt_tokens"],
                    "completion_tokens": u["completion_tokens"],
                    "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                    "previous_prompt_plus_answer": prev,
                }
            )
            prev = u["prompt_tokens"] + u["completion_tokens"]
    return rows


def run(kind: str, args: argparse.Namespace) -> dict:
    server = SGLangServer(
        smollm2_model(), kv_quant=kind, max_total_tokens=8192, max_running_requests=8,
        context_length=2048,
    )  # fmt: skip
    server.start()
    try:
        server.wait_ready(args.start_timeout)
        turns = chat_turns(server)
        requests.post(server.url + "/flush_cache", timeout=60)
        gsp = sglang_gsp(server, args)
    finally:
        server.stop()
    print(f"[{kind}] gsp {gsp}\n[{kind}] turns {turns}", flush=True)
    return {"gsp": gsp, "turns": turns}


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False, cwd=Path(__file__).parent)  # fmt: skip
    return out.stdout.strip() or "unknown"


def write(res: dict[str, dict], out: Path, commit: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prefix_hits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "commit", "server", "measurement", "turn", "prompt_tokens",
                    "cached_tokens", "previous_prompt_plus_answer", "hit_rate_pct"])  # fmt: skip
        run = [cpu_name(), commit]
        for kind, r in res.items():
            w.writerow([*run, kind, "gsp", "", "", "", "",
                        f"{r['gsp']['cache_hit_rate_pct']:.2f}"])  # fmt: skip
            for t in r["turns"]:
                hit = 100 * t["cached_tokens"] / t["prompt_tokens"]
                w.writerow([*run, kind, f"chat:{t['chat']}", t["turn"], t["prompt_tokens"],
                            t["cached_tokens"], t["previous_prompt_plus_answer"] or "",
                            f"{hit:.2f}"])  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = list(res)
    a.bar(kinds, [res[k]["gsp"]["cache_hit_rate_pct"] for k in kinds], color=["gray", "C0"])
    a.set_title("bench_serving generated-shared-prefix")
    a.set_ylabel("prefix-cache hit rate (%)")
    for i, kind in enumerate(kinds):
        cached = [t["cached_tokens"] for t in res[kind]["turns"]]
        b.plot(range(len(cached)), cached, "o-" if i else "s--", label=kind)
    b.set_title("multi-turn chats: cached tokens per request")
    b.set_xlabel("request (2 chats x 4 turns)")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "prefix_hits.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsp-groups", type=int, default=4, help="bench_serving prompt groups (x4)")
    p.add_argument("--batch", type=int, default=4, help="bench_serving concurrency")
    p.add_argument("--start-timeout", type=float, default=1200)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    commit = git_commit()
    res = {kind: run(kind, args) for kind in ("none", "oscar")}
    write(res, args.out, commit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
