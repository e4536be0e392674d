"""Memory benchmark: what a live server holds, ``--kv-quant oscar`` vs SGLang's own cache.

Both servers run the README's CPU command (SmolLM2-135M GGUF, ``--max-total-tokens``
--tokens, the default request slots: no ``--max-running-requests``), one after the other.
For each server: ``/get_server_info``'s ``max_total_num_tokens`` and ``max_running_requests``;
the KV pool's bytes (oscar: the capacity line, which `oscar_kv.sglang.budget` makes equal to
the sum of the pool's tensors; SGLang: its ``K size / V size`` line); the resident memory
of the server's process tree idle and after serving requests of 1K and 4K prompt tokens
(as many at once as the server admits, up to 4); and whether a repeat of the first prompt
is served from the prefix cache. ``x_bf16_same_bytes`` = tokens held / (pool bytes / bf16
bytes per token): how many more tokens than a bf16 cache the same bytes hold. SmolLM2's
context is 8K, so 32K-token requests cannot be served by this model.

Writes benches/results/memory.csv, memory_summary.md and memory.png.

    python benches/bench_memory.py            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import write_results
from bench_decode_cpu import cpu_name

from oscar_kv.eval.texts import english_text
from oscar_kv.plan import bf16_bytes_per_token
from oscar_kv.sglang.server import SGLangServer, smollm2_model

RESULTS = Path(__file__).resolve().parent / "results"
BF16_TOKEN = bf16_bytes_per_token(30, 3, 64)  # SmolLM2: 30 layers x 3 KV heads x D=64
COLUMNS = [
    "device", "commit", "cache", "prompt_tokens", "max_total_num_tokens", "max_running_requests",
    "pool_bytes", "x_bf16_same_bytes", "served_at_once", "repeat_cached_tokens",
    "rss_idle_mib", "rss_after_mib",
]  # fmt: skip


def rss_tree(pid: int) -> int:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


def pool_bytes(log: str, cache: str) -> int:
    if cache == "oscar":
        return int(re.search(r"oscar-kv capacity .* GiB \((\d+) B\)", log).group(1))
    m = re.search(r"K size: ([0-9.]+) GB, V size: ([0-9.]+) GB", log)
    return int((float(m.group(1)) + float(m.group(2))) * 1e9)


def prompt_ids(tokenizer, n: int, salt: int) -> list[int]:
    ids = tokenizer.encode(
        f"Document {salt}. " + english_text(8 * n + 2000), add_special_tokens=False
    )
    assert len(ids) >= n, f"need {n} tokens of text, have {len(ids)}"
    return ids[:n]


def run_one(cache: str, tokens: int, tokenizer, commit: str) -> list[dict]:
    s = SGLangServer(
        smollm2_model(), kv_quant=cache, max_total_tokens=tokens, max_running_requests=None,
        context_length=8192,
    )  # fmt: skip
    rows = []
    with s:
        # SGLang's own start-up line, written by the scheduler after sizing the pool.
        m = re.search(r"max_total_num_tokens=(\d+), .*?max_running_requests=(\d+)", s.log_text())
        mtt, mrr = int(m.group(1)), int(m.group(2))
        nbytes = pool_bytes(s.log_text(), cache)
        idle = rss_tree(s.proc.pid)
        for n in (1024, 4096):
            at_once = max(1, min(4, int(mrr), mtt // (n + 8)))
            bodies = [
                {"input_ids": prompt_ids(tokenizer, n, i),
                 "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
                for i in range(at_once)
            ]  # fmt: skip
            with ThreadPoolExecutor(at_once) as ex:
                codes = list(
                    ex.map(
                        lambda b: requests.post(s.url + "/generate", json=b, timeout=900), bodies
                    )
                )
            assert all(r.status_code == 200 for r in codes), [r.text for r in codes]
            again = requests.post(s.url + "/generate", json=bodies[0], timeout=900).json()
            rows.append({
                "device": cpu_name(), "commit": commit, "cache": cache, "prompt_tokens": n,
                "max_total_num_tokens": mtt, "max_running_requests": mrr, "pool_bytes": nbytes,
                "x_bf16_same_bytes": round(mtt / (nbytes / BF16_TOKEN), 3),
                "served_at_once": at_once,
                "repeat_cached_tokens": again["meta_info"].get("cached_tokens"),
                "rss_idle_mib": round(idle / 2**20), "rss_after_mib": round(rss_tree(s.proc.pid) / 2**20),
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caches = sorted({r["cache"] for r in rows})
    first = {c: next(r for r in rows if r["cache"] == c) for c in caches}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(caches, [first[c]["pool_bytes"] / 2**20 for c in caches])
    axes[0].set_ylabel("KV pool MiB (same --max-total-tokens)")
    axes[1].bar(caches, [first[c]["x_bf16_same_bytes"] for c in caches])
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set_ylabel("tokens held / bf16 tokens in same bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768, help="--max-total-tokens of both servers")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model().tokenizer_path)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    rows = []
    for cache in ("none", "oscar"):
        rows += run_one(cache, args.tokens, tokenizer, commit)
    lines = ["| cache | prompt | tokens | running | pool MiB | x bf16 same bytes | RSS idle / after MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['cache']} | {r['prompt_tokens']} | {r['max_total_num_tokens']} | "
            f"{r['max_running_requests']} | {r['pool_bytes'] / 2**20:.1f} | "
            f"{r['x_bf16_same_bytes']:.2f} | {r['rss_idle_mib']} / {r['rss_after_mib']} |"
        )
    write_results(args.out, "memory", rows, COLUMNS, "\n".join(lines), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
