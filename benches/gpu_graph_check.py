"""CUDA graphs on vs off under ``kv_quant="oscar"``: the same greedy tokens (CUDA machine only).

Called by scripts/gpu_check.sh. Two offline ``sglang.Engine`` runs through
`oscar_kv.sglang.plugin.engine`, one after the other, each in a child process of its own (the
first gives the GPU back before the second starts, and each log stays apart):

- ``graphs``: SGLang's default CUDA-graph settings (decode graphs; prefill graphs where
  SGLang's defaults turn them on), with ``disable_cuda_graph=False`` passed explicitly (the
  run also checks that decode graphs were captured and replayed, so a plugin or SGLang
  default that turned them off would not pass as "the same tokens");
- ``eager``: ``disable_cuda_graph=True``.

The model is a small Llama with random (seeded) weights written to a temporary directory as
config.json + safetensors (no model hub needed); no tokenizer either: ``skip_tokenizer_init``,
the prompts are token ids. The weights' std is 0.05, not transformers' 0.02: at 0.02 (tied
embeddings) the greedy output is one token repeated, whatever the context; at 0.05 it is 40
different tokens in 40 and changing the prompt's first token changes them (measured with
transformers on CPU), so the answer depends on the whole cache, first page included.

A batch of prompts of different lengths (default 17, 100, 127, 250 tokens: 4, a batch size
SGLang captures, so the graph run is not padded), greedy, EOS ignored, --new-tokens each
(default 160), so every request crosses a 128-token page boundary while it decodes (the
decode step quantizes the completed page). Each run generates the batch twice
(a warm-up that also compiles the Triton kernels, then the compared run, prefix cache flushed
before each) and once with one new token, for the timing: decode tokens/s =
batch * (new_tokens - 1) / (time of the full batch - time of the one-token batch).

Checks: the graph run captured decode graphs (SGLang's startup timings) and its decode
batches ran on them ("cuda graph: True" in its log), the eager run did neither; each run gives
the same tokens twice; the two runs give the same tokens for every prompt. Prints both runs'
tokens, writes benches/results/gpu_graph_check.csv (device, commit, run, decode tokens/s,
...), and exits 1 when the tokens differ, 2 when a run failed or its graphs were not what the
run asked for.

    python benches/gpu_graph_check.py
    python benches/gpu_graph_check.py --prompt-lens 5 127 300 900 --new-tokens 300
    python benches/gpu_graph_check.py --extra '{"cuda_graph_backend_prefill": "disabled"}'
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    "device", "commit", "run", "disable_cuda_graph", "decode_graph_capture_s",
    "graph_decode_batches", "eager_decode_batches", "batch", "prompt_lens", "new_tokens",
    "decode_tok_s", "e2e_tok_s", "same_tokens_as_other_run", "first_difference",
]  # fmt: skip
RUNS = {"graphs": False, "eager": True}  # run -> disable_cuda_graph
PAGE = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--prompt-lens",
        type=int,
        nargs="+",
        default=[17, 100, 127, 250],
        help="prompt lengths in tokens, one request each (default: %(default)s)",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=160,
        help="greedy tokens per request, EOS ignored (default: %(default)s)",
    )
    p.add_argument("--layers", type=int, default=4, help="model layers (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts (default: 0)")
    p.add_argument("--init-std", type=float, default=0.05,
                   help="std of the random weights (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--max-total-tokens", type=int, default=16384, help="KV pool tokens (default: %(default)s)"
    )
    p.add_argument(
        "--extra",
        type=json.loads,
        default={},
        help="JSON object of more sglang.Engine arguments, for both runs",
    )
    p.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds per run (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "gpu_graph_check.csv",
        help="CSV written (default: benches/results/gpu_graph_check.csv)",
    )
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write the model and the run logs here (default: a temporary dir)",
    )
    # The child process of one run (internal).
    p.add_argument("--worker", choices=sorted(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(n < 1 for n in args.prompt_lens) or args.new_tokens < 2:
        p.error("prompt lengths must be >= 1 and --new-tokens >= 2")
    if not isinstance(args.extra, dict):
        p.error("--extra must be a JSON object")
    crossing = [n for n in args.prompt_lens if n // PAGE == (n + args.new_tokens - 1) // PAGE]
    if crossing:
        print(f"note: prompts of {crossing} tokens do not reach a new {PAGE}-token page "
              f"within {args.new_tokens} new tokens")  # fmt: skip
    return args


# ----------------------------------------------------------------------------- the model


def write_model(path: Path, layers: int, vocab: int, seed: int, init_std: float) -> None:
    """A Llama (8 query heads, 2 KV heads, head_dim 128) with seeded random weights, bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(path))


def prompts(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


# ----------------------------------------------------------------------------- one run


def run_worker(args: argparse.Namespace) -> None:
    """One Engine (graphs or eager): tokens, timings and graph facts into --result (JSON)."""
    from oscar_kv.sglang.plugin import engine

    batch = len(args.prompt_lens)
    ids = prompts(args.prompt_lens, args.vocab, args.seed)
    kwargs = {
        "model_path": str(args.model),
        "skip_tokenizer_init": True,
        "dtype": "bfloat16",
        "kv_quant": "oscar",
        "disable_cuda_graph": RUNS[args.worker],
        "max_total_tokens": args.max_total_tokens,
        "max_running_requests": max(8, batch),
        "cuda_graph_max_bs_decode": max(8, batch),
        "context_length": max(args.prompt_lens) + args.new_tokens + PAGE,
        "random_seed": args.seed,
        "log_level": "info",
    } | args.extra
    print(f"[{args.worker}] sglang.Engine via oscar_kv.sglang.plugin.engine({kwargs})", flush=True)
    eng = engine(**kwargs)
    try:

        def generate(new_tokens: int) -> tuple[list[list[int]], float]:
            eng.flush_cache()
            params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
            t0 = time.perf_counter()
            outs = eng.generate(input_ids=ids, sampling_params=params)
            took = time.perf_counter() - t0
            return [list(o["output_ids"]) for o in outs], took

        warm, _ = generate(args.new_tokens)  # also compiles the kernels of this run
        _, t_one = generate(1)
        tokens, t_full = generate(args.new_tokens)
        info = eng.get_server_info()
    finally:
        eng.shutdown()
    startup = info.get("startup_time") or {}
    graph_cfg = info.get("cuda_graph_config")
    if isinstance(graph_cfg, dict):  # the resolved per-phase backends
        graph_cfg = {
            k: v.get("backend") if isinstance(v, dict) else v for k, v in graph_cfg.items()
        }
    result = {
        "run": args.worker,
        "disable_cuda_graph": bool(kwargs["disable_cuda_graph"]),
        "tokens": tokens,
        "warmup_tokens": warm,
        "t_one_s": t_one,
        "t_full_s": t_full,
        "decode_tok_s": batch * (args.new_tokens - 1) / max(t_full - t_one, 1e-9),
        "e2e_tok_s": batch * args.new_tokens / t_full,
        "decode_graph_capture_s": float((startup.get("cuda_graph") or {}).get("decode", 0.0)),
        "cuda_graph_config": str(graph_cfg),
    }
    args.result.write_text(json.dumps(result))


def launch(run: str, args: argparse.Namespace, model: Path, work: Path) -> dict | None:
    """Runs one worker; its result with the log's decode-batch counts, or None if it failed."""
    log = work / f"{run}.log"
    result = work / f"{run}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", run,
        "--model", str(model), "--result", str(result),
        "--prompt-lens", *map(str, args.prompt_lens), "--new-tokens", str(args.new_tokens),
        "--vocab", str(args.vocab), "--seed", str(args.seed),
        "--max-total-tokens", str(args.max_total_tokens), "--extra", json.dumps(args.extra),
    ]  # fmt: skip
    print(f"[{run}] starting (log: {log})", flush=True)
    t0 = time.monotonic()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                cmd, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace")
    if rc != 0 or not result.exists():
        tail = "\n".join(text.splitlines()[-60:])
        print(f"[{run}] FAILED ({rc}) after {time.monotonic() - t0:.0f} s; log tail:\n{tail}")
        return None
    out = json.loads(result.read_text())
    decode = [m.group(1) for m in re.finditer(r"Decode batch.*?cuda graph: (True|False)", text)]
    out["graph_decode_batches"] = decode.count("True")
    out["eager_decode_batches"] = decode.count("False")
    print(f"[{run}] done in {time.monotonic() - t0:.0f} s: decode {out['decode_tok_s']:.1f} "
          f"tok/s, decode graph capture {out['decode_graph_capture_s']:.2f} s, decode batches "
          f"on graphs {out['graph_decode_batches']} / eager {out['eager_decode_batches']}, "
          f"cuda_graph_config {out['cuda_graph_config']}", flush=True)  # fmt: skip
    return out


def graph_problems(out: dict) -> list[str]:
    """What is wrong with the run's graphs, given what the run is for (not what --extra made
    of it: graphs switched off in the graph run is a problem, not a pass)."""
    if RUNS[out["run"]]:
        if out["decode_graph_capture_s"] > 0 or out["graph_decode_batches"]:
            return [f"{out['run']}: CUDA graphs ran although disable_cuda_graph=True"]
        return []
    problems = []
    if out["decode_graph_capture_s"] <= 0:
        problems.append(f"{out['run']}: no decode CUDA graphs were captured")
    if not out["graph_decode_batches"]:
        problems.append(f"{out['run']}: no decode batch ran on a CUDA graph (log)")
    return problems


def differences(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per prompt: the first token index where a and b differ, None where they agree."""
    out = []
    for x, y in zip(a, b, strict=True):
        j = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), None)
        if j is None and len(x) != len(y):
            j = min(len(x), len(y))
        out.append(j)
    return out


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    """'' if equal, else 'prompt i token j'."""
    for i, j in enumerate(differences(a, b)):
        if j is not None:
            return f"prompt {i} token {j}"
    return ""


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_graph_check: needs a CUDA device", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import git_commit

    device, commit = torch.cuda.get_device_name(), git_commit()
    print(f"device: {device}; commit: {commit}; prompts {args.prompt_lens} tokens, "
          f"{args.new_tokens} new tokens each")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="oscar-graph-check-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "tiny-llama"
        write_model(model, args.layers, args.vocab, args.seed, args.init_std)
        outs = {run: launch(run, args, model, work) for run in RUNS}
    if any(o is None for o in outs.values()):
        return 2
    graphs, eager = outs["graphs"], outs["eager"]
    diff = first_difference(graphs["tokens"], eager["tokens"])
    for name, o in outs.items():
        print(f"[{name}] tokens:")
        for n, toks in zip(args.prompt_lens, o["tokens"], strict=True):
            print(f"  prompt {n:>5} tokens: {toks}")
    problems = [p for o in outs.values() for p in graph_problems(o)]
    for o in outs.values():
        d = first_difference(o["warmup_tokens"], o["tokens"])
        if d:
            problems.append(f"{o['run']}: two identical batches gave different tokens ({d})")
    rows = [
        o | {
            "device": device, "commit": commit, "batch": len(args.prompt_lens),
            "prompt_lens": " ".join(map(str, args.prompt_lens)), "new_tokens": args.new_tokens,
            "decode_tok_s": f"{o['decode_tok_s']:.1f}", "e2e_tok_s": f"{o['e2e_tok_s']:.1f}",
            "same_tokens_as_other_run": not diff, "first_difference": diff,
        }
        for o in outs.values()
    ]  # fmt: skip
    write_csv(args.out, rows)
    for p in problems:
        print(f"PROBLEM: {p}")
    if diff:
        per_prompt = dict(zip(args.prompt_lens, differences(graphs["tokens"], eager["tokens"])))
        print(f"FAIL: CUDA graphs on vs off give different tokens (first at {diff}); first "
              f"differing token per prompt length (None: same): {per_prompt}")  # fmt: skip
        return 1
    if problems:
        return 2
    print(f"OK: CUDA graphs on vs off give the same {len(args.prompt_lens)} x "
          f"{args.new_tokens} tokens; decode {graphs['decode_tok_s']:.1f} tok/s with graphs, "
          f"{eager['decode_tok_s']:.1f} without")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
