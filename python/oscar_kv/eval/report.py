"""The model-level eval's reports: CSVs, summary.md, and summary.md rebuilt from the CSVs.

Files written in the output folder: ppl.csv (the paper's methods, `PPL_COLUMNS`), ppl_all.csv,
ppl_by_page.csv, needle.csv, agreement.csv and summary.md; the plots they go with are drawn by
`oscar_kv.eval.plots`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oscar_kv.config import BLOCK_TOKENS
from oscar_kv.eval.chat import TurnResult, common_prefix
from oscar_kv.eval.methods import Method, all_methods, quanto_methods
from oscar_kv.eval.passkey import NeedleTrial
from oscar_kv.eval.perplexity import PplResult
from oscar_kv.eval.plots import common_context, draw_ppl_plots, plot_needle

PPL_COLUMNS = ("method", "bits", "k_group", "norm", "context", "ppl", "bytes_per_token")


def write_csv(path: Path, header: Sequence[str], rows: list[Sequence[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_ppl(
    out: Path, results: list[PplResult], contexts: Sequence[int], kv_heads: int, head_dim: int
) -> list[dict[str, Any]]:
    """ppl.csv (paper methods, the issue's columns), ppl_all.csv and ppl_by_page.csv."""
    table = []
    for r in results:
        m = r.method
        for c in contexts:
            if c - 1 > r.nll.shape[0]:
                continue
            table.append({
                "label": m.label, "family": m.family, "method": m.family, "bits": m.bits,
                "k_group": "" if m.k_group is None else m.k_group, "norm": m.norm,
                "context": c, "ppl": r.ppl(c),
                "bytes_per_token": m.bytes_per_token(kv_heads, head_dim, c),
                "paper": m.is_paper, "seconds": r.seconds,
            })  # fmt: skip
    paper = [t for t in table if t["paper"]]
    write_csv(
        out / "ppl.csv",
        PPL_COLUMNS,
        [[t[k] if k != "ppl" else f"{t['ppl']:.4f}" for k in PPL_COLUMNS] for t in paper],
    )
    cols = ("label", "family", "bits", "k_group", "norm", "context", "ppl", "bytes_per_token")
    write_csv(
        out / "ppl_all.csv",
        (*cols, "run_seconds"),
        [[*(t[k] for k in cols), f"{t['seconds']:.1f}"] for t in table],
    )
    by_page = []
    for r in results:
        nll = r.nll
        for a in range(0, nll.shape[0], BLOCK_TOKENS):
            by_page.append([r.method.label, a, f"{nll[a : a + BLOCK_TOKENS].mean().item():.5f}"])
    write_csv(out / "ppl_by_page.csv", ("label", "page_start", "mean_nll"), by_page)
    return table


def write_needle(
    out: Path, trials: list[NeedleTrial], methods: Sequence[Method]
) -> dict[str, float]:
    rows = []
    for t in trials:
        for m in methods:
            rows.append([m.label, t.length, t.depth, t.seed, t.key,
                         t.answers[m.label].strip(), int(t.correct(m.label))])  # fmt: skip
    write_csv(out / "needle.csv", ("label", "length", "depth", "seed", "key", "answer",
                                    "correct"), rows)  # fmt: skip
    acc = {m.label: sum(t.correct(m.label) for t in trials) / max(1, len(trials)) for m in methods}
    for m in methods:
        plot_needle(out / f"needle_{m.label}.png", trials, m.label, acc[m.label])
    return acc


def write_agreement(
    out: Path,
    turns: list[TurnResult],
    methods: Sequence[Method],
    kv_heads: int,
    head_dim: int,
) -> dict[str, dict[str, float]]:
    ref = methods[0].label
    rows, summary = [], {}
    for m in methods:
        same = prefix = tf = total = 0
        for t in turns:
            a, r = t.answers[m.label], t.answers[ref]
            cp = common_prefix(a, r)
            rows.append([m.label, t.chat, t.turn, t.prompt_tokens, int(a == r), cp, len(r),
                         len(a), t.teacher_forced[m.label]])  # fmt: skip
            same += a == r
            prefix += cp
            tf += t.teacher_forced[m.label]
            total += len(r)
        n = max(1, len(turns))
        summary[m.label] = {
            "turns": len(turns),
            "agreement": same / n,
            "mean_common_prefix": prefix / n,
            "mean_ref_tokens": total / n,
            "teacher_forced_top1": tf / max(1, total),
            # Full-page bytes at each turn's prompt length (the sink/window extras included).
            "bytes_per_token": sum(
                m.bytes_per_token(kv_heads, head_dim, t.prompt_tokens) for t in turns
            )
            / n,
        }
    header = ("label", "chat", "turn", "prompt_tokens", "identical", "common_prefix",
              "bf16_tokens", "tokens", "teacher_forced_matches")  # fmt: skip
    write_csv(out / "agreement.csv", header, rows)
    return summary


def needle_text(trials: int, lengths: Sequence[int], depths: Sequence[float],
                seeds: Sequence[int]) -> str:  # fmt: skip
    return (
        f"{trials} trials: lengths {list(lengths)}, depths {list(depths)}, seeds {list(seeds)}; "
        "greedy, exact match of the 5-digit passkey. Document prefilled in bf16 then quantized "
        "per method; question and answer attend to the quantized pages. Heatmaps: "
        "needle_<method>.png."
    )


def agreement_text(chats: int, turns: int, new_tokens: int, prompt: float) -> str:
    return (
        f"{chats} chats x {turns} turns, greedy, up to {new_tokens} tokens per answer, mean "
        f"prompt {prompt:.0f} tokens; each turn answered on the same bf16 conversation so far "
        "(per-turn agreement, no compounding drift). B/token: full-page bytes at the prompt "
        "length (a 4-bit first page weighs more in short chats)."
    )


def run_notes() -> list[str]:
    notes = [
        (
            "Cache: `OscarCache` semantics (bf16 tail, 128-token pages quantized when full, "
            "reference dequantization); CPU, fp32 model, 1 thread."
        ),
        (
            "Text: `pydoc_data.topics` (the Python reference documentation, the one English "
            "prose corpus found in a registry package on these machines)."
        ),
        (
            "Where the error comes from (per layer, K vs V, page 0): `python -m oscar_kv eval "
            "--sections attribution` writes attribution.md."
        ),
    ]
    if not quanto_methods():
        notes.append("transformers `QuantizedCache` (quanto): optimum-quanto is not installed.")
    return notes


def load_ppl_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a written ppl_all.csv, in the form `plot_pareto` / `plot_contexts` take."""
    paper = {m.label for m in all_methods() if m.is_paper}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [
        {**r, "context": int(r["context"]), "ppl": float(r["ppl"]),
         "bytes_per_token": float(r["bytes_per_token"]), "paper": r["label"] in paper}
        for r in rows
    ]  # fmt: skip


def write_summary(
    out: Path,
    kv_heads: int,
    head_dim: int,
    table: list[dict[str, Any]],
    needle_acc: dict[str, float] | None,
    needle_info: str,
    agreement: dict[str, dict[str, float]] | None,
    agreement_info: str,
    timings: dict[str, float],
    notes: list[str],
) -> None:
    lines = ["# Model-level quality (SmolLM2-135M-Instruct, CPU)", ""]
    lines += notes + [""]
    if table:
        contexts = sorted({t["context"] for t in table})
        labels = list(dict.fromkeys(t["label"] for t in table))
        ppl = {(t["label"], t["context"]): t for t in table}
        bf16 = {c: ppl[("bf16", c)]["ppl"] for c in contexts if ("bf16", c) in ppl}
        lines += [
            "## Perplexity (pydoc_data prose, cache quantized page by page as in serving)",
            "",
        ]
        lines += [
            (
                f"Bytes per token per layer (H_kv={kv_heads}, D={head_dim}; bf16 = "
                f"{4 * kv_heads * head_dim}); in brackets the change vs bf16 at the same context. "
                "`+sink4`/`+sink16`: first page at 4 bits / bf16; `+win256`: one more page kept "
                "in bf16 (bytes include the extra at that context); `-v16`: V groups of 16 "
                "channels; `quanto-*`: transformers QuantizedCache (fp32 scales: the model runs "
                "in fp32); `:exact-k`/`:exact-v`: attribution runs, that half of every page exact."
            ),
            "",
        ]
        head = (
            f"| method | B/token @{common_context(table)} | "
            + " | ".join(f"ppl@{c}" for c in contexts)
            + " |"
        )
        lines += [head, "|---|---|" + "---|" * len(contexts)]
        for lab in labels:
            cells = []
            bpt = next(
                t["bytes_per_token"]
                for t in table
                if t["label"] == lab and t["context"] == common_context(table)
            )
            for c in contexts:
                t = ppl.get((lab, c))
                if t is None:
                    cells.append("")
                elif lab == "bf16" or c not in bf16:
                    cells.append(f"{t['ppl']:.3f}")
                else:
                    cells.append(f"{t['ppl']:.3f} ({100 * (t['ppl'] / bf16[c] - 1):+.1f}%)")
            lines.append(f"| {lab} | {bpt:.1f} | " + " | ".join(cells) + " |")
        lines += [""]
    if needle_acc is not None:
        lines += ["## Passkey retrieval", "", needle_info, ""]
        lines += ["| method | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in needle_acc.items()] + [""]
    if agreement is not None:
        lines += ["## Multi-turn agreement with the bf16 answers", "", agreement_info, ""]
        lines += [
            (
                "| method | B/token | turns | identical answers | mean common prefix (tokens) "
                "| mean bf16 answer tokens | teacher-forced top-1 |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for k, s in agreement.items():
            lines.append(
                f"| {k} | {s['bytes_per_token']:.0f} | {s['turns']} | {s['agreement']:.1%} | "
                f"{s['mean_common_prefix']:.1f} | "
                f"{s['mean_ref_tokens']:.1f} | {s['teacher_forced_top1']:.1%} |"
            )
        lines += [""]
    lines += ["## Run", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def rebuild_summary(out: Path) -> None:
    """Redraw the ppl plots and rewrite summary.md from the CSVs in ``out`` (no model).

    Timings and the model's KV shape are taken over from the existing summary.md.
    """
    old = (out / "summary.md").read_text() if (out / "summary.md").is_file() else ""
    shape = re.search(r"H_kv=(\d+), D=(\d+)", old)
    kv_heads, head_dim = (int(shape[1]), int(shape[2])) if shape else (3, 64)
    table = load_ppl_table(out / "ppl_all.csv") if (out / "ppl_all.csv").is_file() else []
    if table:
        draw_ppl_plots(out, table)
    by_label = {m.label: m for m in all_methods()}
    needle_acc, needle_info = None, ""
    if (out / "needle.csv").is_file():
        with (out / "needle.csv").open() as f:
            rows = list(csv.DictReader(f))
        hits: dict[str, list[int]] = {}
        for r in rows:
            hits.setdefault(r["label"], []).append(int(r["correct"]))
        needle_acc = {k: sum(v) / len(v) for k, v in hits.items()}
        lengths = sorted({int(r["length"]) for r in rows})
        depths = sorted({float(r["depth"]) for r in rows})
        seeds = sorted({int(r["seed"]) for r in rows})
        needle_info = needle_text(len(next(iter(hits.values()))), lengths, depths, seeds)
    agreement, agreement_info = None, ""
    if (out / "agreement.csv").is_file():
        with (out / "agreement.csv").open() as f:
            rows = list(csv.DictReader(f))
        labels = list(dict.fromkeys(r["label"] for r in rows))
        turns = []
        for key in dict.fromkeys((r["chat"], r["turn"]) for r in rows):
            these = {r["label"]: r for r in rows if (r["chat"], r["turn"]) == key}
            ref = these[labels[0]]
            answers, tf = {}, {}
            for lab, r in these.items():
                # Token lists are not stored: equal answers are the bf16 answer; others share
                # the common prefix and then differ.
                n_ref, cp = int(ref["bf16_tokens"]), int(r["common_prefix"])
                same = r["identical"] == "1"
                answers[lab] = list(range(n_ref)) if same else [*range(cp), -1]
                tf[lab] = int(r["teacher_forced_matches"])
            answers[labels[0]] = list(range(int(ref["bf16_tokens"])))
            turns.append(TurnResult(int(key[0]), int(key[1]), int(ref["prompt_tokens"]),
                                    answers, tf))  # fmt: skip
        agreement = write_agreement(out, turns, [by_label[x] for x in labels], kv_heads, head_dim)
        # write_agreement rewrote agreement.csv from the reconstruction: restore the rows.
        with (out / "agreement.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        for lab, r in agreement.items():
            mine = [x for x in rows if x["label"] == lab]
            r["mean_common_prefix"] = sum(int(x["common_prefix"]) for x in mine) / len(mine)
        chats = len({r["chat"] for r in rows})
        per_chat = len(turns) // max(1, chats)
        prompt = sum(t.prompt_tokens for t in turns) / max(1, len(turns))
        new_tokens = max(int(r["tokens"]) for r in rows)
        agreement_info = agreement_text(chats, per_chat, new_tokens, prompt)
    timings: dict[str, float] = {}
    for name, sec in re.findall(r"^- (.+): (\d+) s$", old, flags=re.MULTILINE):
        timings[name] = float(sec)
    write_summary(out, kv_heads, head_dim, table, needle_acc, needle_info, agreement,
                  agreement_info, timings, run_notes())  # fmt: skip
