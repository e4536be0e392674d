"""``python -m oscar_kv demo|cache-demo|fidelity|eval|plan``: the package's command line."""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = """usage: python -m oscar_kv COMMAND [options]

commands:
  demo       start an SGLang server with --kv-quant oscar (SmolLM2) and chat with it
  cache-demo multi-turn chat with SmolLM2 in transformers, bf16 cache vs OScaR 2-bit cache
  fidelity   K/V/logit/output error of every method on synthetic and real KV tensors
  eval       perplexity, passkey retrieval and multi-turn agreement of every method (SmolLM2)
  plan       concurrent sequences that fit in a KV budget: bf16 vs OScaR 2/4-bit

Run `python -m oscar_kv COMMAND --help` for a command's options."""


def command(name: str) -> Callable[[list[str]], int] | None:
    if name == "demo":
        from oscar_kv.server_demo import main
    elif name == "cache-demo":
        from oscar_kv.cache_demo import main
    elif name == "fidelity":
        from oscar_kv.eval.fidelity import main
    elif name == "eval":
        from oscar_kv.eval.cli import main
    elif name == "plan":
        from oscar_kv.plan import main
    else:
        return None
    return main


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    from oscar_kv import MissingExtraError

    try:
        run = command(args[0])
        if run is None:
            print(f"unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        return run(args[1:])
    except MissingExtraError as e:  # an optional dependency of this command is missing
        print(f"python -m oscar_kv {args[0]}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
