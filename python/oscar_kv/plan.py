"""Capacity planning: bytes per token and concurrent sequences, bf16 vs OScaR.

``python -m oscar_kv plan --model config.json --kv-mem 60GiB --context 131072`` reads a
Hugging Face ``config.json`` and prints how many sequences of ``--context`` tokens fit in
``--kv-mem`` bytes of KV cache with a bf16 cache and with OScaR at 2 and 4 bits. The same
numbers size SGLang's pool under ``--kv-quant oscar`` (`oscar_kv.sglang.pool`).

OScaR memory per sequence = context * packed bytes per token (all layers) + one bf16
residual page of 128 tokens per running sequence (K and V, all layers), where the partial
last page lives until it is quantized (`oscar_kv.sglang.budget` splits a server's budget the
same way).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oscar_kv import _native
from oscar_kv.config import BLOCK_TOKENS, OscarConfig

_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_UNITS.update({"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12})


def parse_bytes(text: str) -> int:
    """'60GiB' -> 64424509440; '1.5GB' -> 1500000000; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 60GiB, 80GB, 1e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def bf16_bytes_per_token(layers: int, kv_heads: int, head_dim: int) -> int:
    """K and V in bf16, every layer."""
    return layers * _native.bf16_bytes_per_token(kv_heads, head_dim)


def oscar_bytes_per_token(layers: int, kv_heads: int, head_dim: int, cfg: OscarConfig) -> int:
    """Packed page bytes per token (codes + params + norms), every layer; exact (a page is
    128 tokens and page_bytes is a multiple of 128)."""
    page = _native.page_bytes(kv_heads, head_dim, cfg.bits, cfg.k_group, cfg.v_group, cfg.norm)
    return page * layers // BLOCK_TOKENS


def tail_bytes_per_sequence(layers: int, kv_heads: int, head_dim: int) -> int:
    """One bf16 residual page of 128 tokens (K and V) per running sequence, every layer."""
    return BLOCK_TOKENS * bf16_bytes_per_token(layers, kv_heads, head_dim)


def model_shape(config: dict[str, Any], tp_size: int = 1) -> tuple[int, int, int]:
    """(layers, kv heads per rank, head_dim) of an HF config dict; KVQuantError if OScaR
    cannot serve the model (MLA, sliding window, head_dim)."""
    from oscar_kv.sglang.args import check_model

    text = config.get("text_config")
    return check_model(text if isinstance(text, dict) else config, tp_size=tp_size)


@dataclass(frozen=True)
class PlanRow:
    cache: str
    bytes_per_token: int
    tail_bytes_per_seq: int
    tokens: int
    sequences: int


def plan(config: dict[str, Any], kv_mem: int, context: int, tp_size: int = 1) -> list[PlanRow]:
    layers, h, d = model_shape(config, tp_size)
    rows = []
    bf = bf16_bytes_per_token(layers, h, d)
    rows.append(PlanRow("bf16", bf, 0, kv_mem // bf, kv_mem // (bf * context)))
    tail = tail_bytes_per_sequence(layers, h, d)
    for bits, g in ((2, 32), (2, 128), (4, 32)):
        cfg = OscarConfig(bits=bits, k_group=g)
        bpt = oscar_bytes_per_token(layers, h, d, cfg)
        # Pages are whole: a sequence occupies ceil(context / 128) pages at most.
        pages = -(-context // BLOCK_TOKENS)
        per_seq = pages * BLOCK_TOKENS * bpt + tail
        rows.append(PlanRow(f"oscar {bits}-bit G={g}", bpt, tail, kv_mem // bpt, kv_mem // per_seq))
    return rows


def format_plan(rows: list[PlanRow], kv_mem: int, context: int, name: str) -> str:
    base = rows[0]
    out = [
        f"model {name}: KV memory {kv_mem / 2**30:.2f} GiB, context {context} tokens",
        (
            f"{'cache':<20}{'B/token':>10}{'tail B/seq':>14}{'tokens':>14}{'x bf16':>8}"
            f"{'sequences':>11}"
        ),
    ]
    for r in rows:
        ratio = r.tokens / base.tokens if base.tokens else float("nan")
        out.append(
            f"{r.cache:<20}{r.bytes_per_token:>10}{r.tail_bytes_per_seq:>14}{r.tokens:>14}"
            f"{ratio:>7.2f}x{r.sequences:>11}"
        )
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oscar_kv plan",
        description="Concurrent sequences that fit in a KV budget: bf16 vs OScaR 2/4-bit.",
    )
    p.add_argument("--model", required=True, help="Hugging Face config.json (or its directory)")
    p.add_argument("--kv-mem", required=True, help="KV-cache memory, e.g. 60GiB")
    p.add_argument("--context", type=int, required=True, help="tokens per sequence")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (per-rank heads)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.model)
    if path.is_dir():
        path = path / "config.json"
    config = json.loads(path.read_text())
    kv_mem = parse_bytes(args.kv_mem)
    if args.context < 1:
        raise SystemExit("--context must be >= 1")
    rows = plan(config, kv_mem, args.context, args.tp)
    print(format_plan(rows, kv_mem, args.context, config.get("_name_or_path") or path.name))
    return 0
