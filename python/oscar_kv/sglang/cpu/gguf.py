"""GGUF models in SGLang on CPU: dense weights, and llama.cpp's Q/K row order.

Weights: SGLang 0.5.23 binds its GGUF matmuls (``ggml_mul_mat_a8`` and friends) only on
CUDA/MUSA/NPU. On CPU, each GGUF linear and embedding layer is dequantized ONCE after loading
(with the ``gguf`` package's reference dequantizers) into a dense weight in the model dtype,
and served by ``F.linear`` / ``F.embedding``. That trades memory (fp32 weights) for speed:
re-dequantizing per call would cost far more than the matmul on this model size.

Rotary: llama.cpp's converter permutes the rows of Llama's Q and K projections so that its
interleaved ("GPT-J") rotary matches HF's half-split ("neox") rotary. transformers un-permutes
them when it loads a GGUF file; SGLang's GGUF loader does not, while its Llama model applies
neox rotary, so the model runs but answers wrongly. Running the permuted weights with
interleaved rotary is exactly the original model, so for a Llama GGUF the plugin sets
``rope_is_neox_style: false`` through ``--json-model-override-args`` (unless the user set it).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

logger = logging.getLogger("oscar_kv.sglang")

ROPE_KEY = "rope_is_neox_style"
# Architectures whose GGUF conversion permutes Q/K rows (llama.cpp convert_hf_to_gguf.py:
# LlamaModel and the models that reuse its permutation).
PERMUTED_QK_ARCHS = ("llama",)
DENSE_ATTR = "oscar_kv_dense_weight"


# ---------------------------------------------------------------------------- rotary
def gguf_architecture(model_path: str | os.PathLike[str] | None) -> str | None:
    """``general.architecture`` of a GGUF file (None for anything that is not one)."""
    if isinstance(model_path, os.PathLike):  # e.g. oscar_kv.eval.smollm2.gguf_path()
        model_path = os.fspath(model_path)
    if not (isinstance(model_path, str) and model_path.endswith(".gguf")):
        return None
    if not os.path.isfile(model_path):
        return None
    return read_gguf_string(model_path, "general.architecture")


# GGUF metadata value types (gguf.GGUFValueType): fixed sizes, STRING = 8, ARRAY = 9.
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read_gguf_string(path: str, key: str) -> str | None:
    """One string value from a GGUF file's metadata, reading only the header up to it.

    ``gguf.GGUFReader`` parses every tensor entry first (seconds for a small model); the
    metadata comes before them (GGUF v2/v3: magic, version, tensor count, kv count, then
    key/type/value records), and ``general.architecture`` is conventionally the first key."""
    import struct

    with open(path, "rb") as f:

        def read(fmt: str) -> tuple:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: GGUF header ends early")
            return struct.unpack(fmt, data)

        def read_str() -> bytes:
            (n,) = read("<Q")
            return f.read(n)

        def skip(vtype: int) -> None:
            if vtype == 8:
                read_str()
            elif vtype == 9:
                etype, count = read("<IQ")
                if etype in _GGUF_SCALAR_BYTES:
                    f.seek(_GGUF_SCALAR_BYTES[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip(etype)
            elif vtype in _GGUF_SCALAR_BYTES:
                f.seek(_GGUF_SCALAR_BYTES[vtype], 1)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        magic, version = read("<4sI")
        if magic != b"GGUF" or version < 2:
            return None
        _tensors, kv_count = read("<QQ")
        for _ in range(kv_count):
            name = read_str().decode("utf-8", "replace")
            (vtype,) = read("<I")
            if name == key:
                return read_str().decode("utf-8") if vtype == 8 else None
            skip(vtype)
    return None


def rope_override(
    model_path: str | os.PathLike[str] | None, json_override: str | None
) -> str | None:
    """The ``--json-model-override-args`` value to serve ``model_path`` with: unchanged unless
    it is a GGUF file of a permuted-Q/K architecture and the user did not choose the rotary
    style themselves."""
    arch = gguf_architecture(model_path)
    if arch not in PERMUTED_QK_ARCHS:
        return json_override
    try:
        current = json.loads(json_override) if json_override else {}
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--json-model-override-args is not valid JSON ({e}): {json_override!r}"
        ) from e
    if not isinstance(current, dict):
        raise ValueError(  # noqa: TRY004 - a bad flag value, reported like other flag errors
            f"--json-model-override-args must be a JSON object, got {json_override}"
        )
    if ROPE_KEY in current:
        return json_override
    current[ROPE_KEY] = False
    logger.info(
        "oscar-kv: %s is a %s GGUF file (Q/K rows in llama.cpp's order); serving it with "
        "interleaved rotary (%s=false)", model_path, arch, ROPE_KEY,
    )  # fmt: skip
    return json.dumps(current)


# ---------------------------------------------------------------------------- weights
def dequantize(qweight: Any, qtype: int, dtype: Any) -> Any:
    """A GGUF block-quantized matrix [rows, bytes] (or an unquantized one) as a dense
    [rows, cols] tensor of ``dtype``."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(int(qtype))
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        if qweight.dtype == torch.uint8:  # raw bytes of an unquantized tensor
            view = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
            return qweight.contiguous().view(view[kind.name]).to(dtype)
        return qweight.to(dtype)
    raw = np.ascontiguousarray(qweight.detach().cpu().numpy())
    return torch.from_numpy(quants.dequantize(raw, kind)).to(dtype)


def dense_weight(layer: Any, dtype: Any) -> Any:
    """The whole [out, in] weight of a GGUF linear/embedding layer, shards concatenated in
    the order SGLang's GGUF ``apply`` concatenates their outputs."""
    import torch

    qweight = layer.qweight
    shard_ids = getattr(qweight, "shard_id", None)
    if shard_ids:
        from sglang.srt.layers.quantization.gguf import _ordered_gguf_shard_ids

        parts = []
        for idx in _ordered_gguf_shard_ids(shard_ids):
            start, end, size = qweight.shard_offset_map[idx]
            qtype = layer.qweight_type.shard_weight_type[idx]
            parts.append(dequantize(qweight[start:end, :size], qtype, dtype))
        return torch.cat(parts, dim=0)
    return dequantize(qweight, layer.qweight_type.weight_type, dtype)


def _hook_process_weights(orig, self, layer, *args, **kwargs):
    out = orig(self, layer, *args, **kwargs)
    dtype = getattr(self, "params_dtype", None)
    import torch

    w = dense_weight(layer, dtype or torch.float32)
    setattr(layer, DENSE_ATTR, w)
    return out


def _hook_apply(orig, self, layer, x, bias=None, *args, **kwargs):
    w = getattr(layer, DENSE_ATTR, None)
    if w is None:
        return orig(self, layer, x, bias, *args, **kwargs)
    import torch

    return torch.nn.functional.linear(x.to(w.dtype), w, bias)


def _hook_embedding(orig, self, layer, x, *args, **kwargs):
    w = getattr(layer, DENSE_ATTR, None)
    if w is None:
        return orig(self, layer, x, *args, **kwargs)
    import torch

    return torch.nn.functional.embedding(x, w)


_GGUF = "sglang.srt.layers.quantization.gguf"
HOOKS = {
    f"{_GGUF}.GGUFLinearMethod.process_weights_after_loading": _hook_process_weights,
    f"{_GGUF}.GGUFLinearMethod.apply": _hook_apply,
    f"{_GGUF}.GGUFEmbeddingMethod.embedding": _hook_embedding,
}
