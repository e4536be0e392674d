"""Evaluation: a real model (SmolLM2 from a GGUF file), KV capture, the fidelity harness and
the model-level eval (`python -m oscar_kv eval`, one module per concern: docs/evaluation.md).

These need the ``eval`` extra (``pip install "oscar-kv[eval]"``: transformers, gguf, accelerate,
tqdm, matplotlib, optimum-quanto); a missing one raises `oscar_kv.MissingExtraError` naming it.
"""

from __future__ import annotations

from typing import Any

from oscar_kv import _needs_extra


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (the harnesses write PNGs)."""
    with _needs_extra("eval", "the eval plots"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt
