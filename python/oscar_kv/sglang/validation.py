"""Request checks the plugin adds to SGLang's tokenizer manager under ``--kv-quant oscar``.

A request that would raise inside the model forward takes every scheduler, and so every
client, down with it. SGLang's `_validate_one_request` runs in the HTTP process before a
request reaches a scheduler, and a ValueError raised there becomes a 400 with its message;
`check_request` adds, after SGLang's own checks (which may truncate the prompt):

- an empty prompt (0 tokens after tokenization and chat templating): a forward over no
  tokens has no position to sample from;
- token ids that are not ints in [0, vocab_size): the embedding lookup would index out of
  range (SGLang checks ids only in a few optional fields);
- ``max_new_tokens`` that is not an int >= 0 (a float or bool otherwise slips through);
- ``logprob_start_len`` at or past the end of the prompt;
- ``top_logprobs_num`` outside [0, vocab_size].

Each message names the field and, for a bad token id, its position.
"""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message names the problem."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_token_ids(input_ids: Any, vocab_size: int) -> None:
    if input_ids is None:
        return
    if len(input_ids) == 0:
        raise RequestError(
            "the prompt is empty (0 tokens after tokenization and the chat template); "
            "send at least one token"
        )
    for i, t in enumerate(input_ids):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise RequestError(
                f"input_ids[{i}] = {t!r} is not a token id: ids are ints in [0, {vocab_size})"
            )


def check_request(obj: Any, input_ids: Any, vocab_size: int) -> None:
    """One (unbatched) ``GenerateReqInput`` and its token ids; raises RequestError."""
    multimodal = any(
        getattr(obj, f, None) is not None for f in ("image_data", "video_data", "audio_data")
    )
    if multimodal:  # media placeholders are ids past the vocabulary by design
        if input_ids is not None and len(input_ids) == 0:
            check_token_ids(input_ids, vocab_size)
    else:
        check_token_ids(input_ids, vocab_size)
    params = getattr(obj, "sampling_params", None) or {}
    if isinstance(params, dict) and "max_new_tokens" in params:
        m = params["max_new_tokens"]
        if m is not None and (not _is_int(m) or m < 0):
            raise RequestError(f"max_new_tokens must be an int >= 0, got {m!r}")
    if not getattr(obj, "return_logprob", False):
        return
    n = len(input_ids) if input_ids is not None else None
    start = getattr(obj, "logprob_start_len", None)
    if start is not None:
        if not _is_int(start) or start < -1:
            raise RequestError(f"logprob_start_len must be an int >= -1, got {start!r}")
        if n is not None and start >= n:
            raise RequestError(
                f"logprob_start_len = {start} is not inside the prompt ({n} tokens); "
                f"use 0..{n - 1}, or -1 for the default"
            )
    top = getattr(obj, "top_logprobs_num", None)
    if top is not None and (not _is_int(top) or not 0 <= top <= vocab_size):
        raise RequestError(f"top_logprobs_num must be an int in [0, {vocab_size}], got {top!r}")


def hook_validate_one_request(orig, self, obj, input_ids, *args, **kwargs):
    """AROUND hook on ``TokenizerManager._validate_one_request``."""
    from oscar_kv.sglang.args import KVQuantSpec

    out = orig(self, obj, input_ids, *args, **kwargs)
    if KVQuantSpec.current().enabled and hasattr(obj, "sampling_params"):
        vocab = int(getattr(self.model_config, "vocab_size", 0) or 0)
        if vocab > 0:
            check_request(obj, input_ids, vocab)
    return out
