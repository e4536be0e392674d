"""``--kv-quant`` settings: parsing, validation and hand-over to scheduler processes.

Nothing here imports SGLang, so the checks run (and are tested) without it. The plugin
(`oscar_kv.sglang.plugin`) calls these from its hooks on SGLang's argument parser.

SGLang's ``ServerArgs`` keeps only its own fields, so the choice travels to every process
SGLang starts through the environment variable ``OSCAR_KV_QUANT`` (JSON, written by the
launching process before it spawns schedulers; children inherit it). ``KVQuantSpec.current()``
reads it back anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from oscar_kv.config import BLOCK_TOKENS, SUPPORTED_BITS, SUPPORTED_K_GROUPS, OscarConfig

ENV_VAR = "OSCAR_KV_QUANT"
PAGE_SIZE = BLOCK_TOKENS
BACKEND_NAME = "oscar"
# --kv-cache-dtype values that mean "the model's dtype" and so do not conflict.
SINK_BITS = (2, 4, 16)
_NEUTRAL_KV_DTYPES = ("auto", "bf16", "bfloat16", "float16", "fp16", "half", None)


class KVQuantError(ValueError):
    """A configuration that ``--kv-quant oscar`` cannot serve; the message says what to change."""


@dataclass(frozen=True)
class KVQuantSpec:
    method: str = "none"  # "none" or "oscar"
    bits: int = 2
    k_group: int = 32
    # Width of a sequence's first page; None or equal to ``bits``: no sink page.
    sink_bits: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("none", "oscar"):
            raise KVQuantError(f"--kv-quant must be 'none' or 'oscar', got {self.method!r}")
        if self.bits not in SUPPORTED_BITS:
            raise KVQuantError(f"--kv-quant-bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.k_group not in SUPPORTED_K_GROUPS:
            raise KVQuantError(
                f"--kv-quant-k-group must be one of {SUPPORTED_K_GROUPS}, got {self.k_group}"
            )
        if self.sink_bits is not None:
            if self.sink_bits not in SINK_BITS:
                raise KVQuantError(
                    f"--kv-quant-sink-bits must be one of {SINK_BITS}, got {self.sink_bits}"
                )
            if self.sink_bits < self.bits:
                raise KVQuantError(
                    f"--kv-quant-sink-bits {self.sink_bits} is narrower than --kv-quant-bits "
                    f"{self.bits}: the first page is kept at least as wide as the others"
                )

    @property
    def first_page_bits(self) -> int | None:
        """The first page's width when it differs from the others (else None)."""
        return None if self.sink_bits in (None, self.bits) else self.sink_bits

    @property
    def enabled(self) -> bool:
        return self.method == "oscar"

    def oscar_config(self, *, fold_v: bool = False) -> OscarConfig:
        return OscarConfig(
            bits=self.bits, k_group=self.k_group, fold_v=fold_v, sink_bits=self.first_page_bits
        )

    # -- hand-over -------------------------------------------------------------------------
    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def publish(self, environ: dict[str, str] | None = None) -> None:
        """Writes the spec where every process started from this one finds it."""
        env = os.environ if environ is None else environ
        if self.enabled:
            env[ENV_VAR] = self.to_env()
        else:
            env.pop(ENV_VAR, None)

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> KVQuantSpec:
        raw = (os.environ if environ is None else environ).get(ENV_VAR, "")
        if not raw:
            return cls()
        try:
            fields = json.loads(raw)
            return cls(**fields)
        except (json.JSONDecodeError, TypeError) as e:
            raise KVQuantError(f"{ENV_VAR}={raw!r} is not a valid oscar-kv setting: {e}") from e

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> KVQuantSpec:
        return cls(
            method=getattr(ns, "kv_quant", "none") or "none",
            bits=getattr(ns, "kv_quant_bits", 2),
            k_group=getattr(ns, "kv_quant_k_group", 32),
            sink_bits=getattr(ns, "kv_quant_sink_bits", None),
        )

    @classmethod
    def pop_kwargs(cls, kwargs: dict[str, Any]) -> KVQuantSpec:
        """Takes ``kv_quant``/``kv_quant_bits``/``kv_quant_k_group``/``kv_quant_sink_bits``
        out of Engine kwargs."""
        return cls(
            method=kwargs.pop("kv_quant", "none") or "none",
            bits=kwargs.pop("kv_quant_bits", 2),
            k_group=kwargs.pop("kv_quant_k_group", 32),
            sink_bits=kwargs.pop("kv_quant_sink_bits", None),
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the four flags to an argparse parser (SGLang's or any other)."""
    group = parser.add_argument_group("oscar-kv (2-bit KV cache)")
    group.add_argument(
        "--kv-quant",
        choices=["none", "oscar"],
        default="none",
        help="KV-cache quantization. 'oscar': OScaR 2/4-bit pages (Hadamard rotation + "
        "per-token norm scaling); implies --page-size 128, --attention-backend oscar and "
        "--radix-cache-backend oscar.",
    )
    group.add_argument(
        "--kv-quant-bits", type=int, choices=list(SUPPORTED_BITS), default=2,
        help="Code width of the OScaR KV cache (default 2).",
    )  # fmt: skip
    group.add_argument(
        "--kv-quant-k-group", type=int, choices=list(SUPPORTED_K_GROUPS), default=32,
        help="Tokens per per-channel K quantization group (default 32).",
    )  # fmt: skip
    group.add_argument(
        "--kv-quant-sink-bits", type=int, choices=list(SINK_BITS), default=None,
        help="Width of each sequence's first page, which holds the attention-sink tokens: "
        "4 bits, or 16 (kept exact); default: --kv-quant-bits (no sink page). It costs "
        "extra pages of the KV budget per cached sequence (the start-up capacity line says "
        "how many).",
    )  # fmt: skip


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def check_server_args(args: Any, *, radix_backend_available: bool = True) -> dict[str, Any]:
    """Checks SGLang server arguments (a ServerArgs, a Namespace or Engine kwargs) against
    ``--kv-quant oscar``. Raises KVQuantError naming the flag and what to change; returns the
    field values the plugin sets (page size, attention and radix backends)."""
    problems = []
    page = _get(args, "page_size")
    if page not in (None, PAGE_SIZE):
        problems.append(
            f"--page-size {page}: --kv-quant oscar stores one quantization block of "
            f"{PAGE_SIZE} tokens per page; remove --page-size or set --page-size {PAGE_SIZE}"
        )
    if _get(args, "enable_hierarchical_cache"):
        problems.append(
            "--enable-hierarchical-cache (HiCache): not supported with --kv-quant oscar "
            "(host offload of packed pages is not implemented); remove the HiCache flags"
        )
    dtype = _get(args, "kv_cache_dtype")
    if dtype not in _NEUTRAL_KV_DTYPES:
        problems.append(
            f"--kv-cache-dtype {dtype}: --kv-quant oscar is itself the KV-cache format; "
            "remove --kv-cache-dtype (or pass auto)"
        )
    for flag, field in (
        ("--attention-backend", "attention_backend"),
        ("--decode-attention-backend", "decode_attention_backend"),
        ("--prefill-attention-backend", "prefill_attention_backend"),
    ):
        val = _get(args, field)
        if val not in (None, BACKEND_NAME):
            problems.append(
                f"{flag} {val}: --kv-quant oscar needs its own attention backend; "
                f"remove {flag} (or pass {flag} {BACKEND_NAME})"
            )
    radix = _get(args, "radix_cache_backend")
    if radix not in (None, BACKEND_NAME):
        problems.append(
            f"--radix-cache-backend {radix}: --kv-quant oscar shares packed pages through its "
            f"own prefix cache; remove the flag (or pass --radix-cache-backend {BACKEND_NAME})"
        )
    if problems:
        raise KVQuantError(
            "--kv-quant oscar conflicts with: " + "; ".join(problems) + "."
            if len(problems) > 1
            else f"--kv-quant oscar conflicts with {problems[0]}."
        )
    settings: dict[str, Any] = {
        "page_size": PAGE_SIZE,
        "attention_backend": BACKEND_NAME,
    }
    if radix_backend_available and not _get(args, "disable_radix_cache"):
        settings["radix_cache_backend"] = BACKEND_NAME
    return settings


# ------------------------------------------------------------------------ serving on CPU
# What ``--device cpu`` needs that SGLang's defaults do not give (the flags the README's CPU
# command used to spell out); each is set only where the user left the field at its default.
CPU_DTYPE = "float32"  # no fast bf16/fp16 matmul on a CPU without AVX-512/AMX
CPU_GRAMMAR_BACKEND = "none"  # SGLang's default (xgrammar) has no CPU build for this setup
# Fields whose "not given" value is also a value a user can type (``--dtype auto``): the
# plugin records which of them were on the command line (`cpu_defaults`' ``explicit``).
CPU_WATCHED_FIELDS = ("dtype", "grammar_backend", "cuda_graph_backend_decode")
CPU_ENGINE_VAR = "SGLANG_USE_CPU_ENGINE"


def cpu_defaults(args: Any, explicit: frozenset[str] | set[str] | None = None) -> dict[str, Any]:
    """The field values ``--kv-quant oscar --device cpu`` implies, for the fields the user did
    not set (a ServerArgs, a Namespace or Engine kwargs): ``dtype`` float32, ``grammar_backend``
    none, ``cuda_graph_backend_decode`` disabled (SGLang captures a CPU decode graph only under
    --enable-torch-compile; this is the README's --disable-cuda-graph, spelled the way SGLang
    0.5.23 no longer deprecates). Empty unless ``device`` is ``cpu``.

    ``explicit``: the fields given on the command line, where known; a field in it is never
    changed. Without it, a field counts as set when it differs from SGLang's default (so an
    explicit ``--dtype auto`` is only kept when ``explicit`` says it was typed)."""
    if _get(args, "device") != "cpu":
        return {}

    def unset(field: str, default: Any) -> bool:
        if explicit is not None and field in explicit:
            return False
        return _get(args, field, default) == default

    out: dict[str, Any] = {}
    if unset("dtype", "auto"):
        out["dtype"] = CPU_DTYPE
    if unset("grammar_backend", None):
        out["grammar_backend"] = CPU_GRAMMAR_BACKEND
    if unset("cuda_graph_backend_decode", None):
        out["cuda_graph_backend_decode"] = "disabled"
    return out


def cpu_engine_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the environment needs for SGLang to serve on CPU: ``SGLANG_USE_CPU_ENGINE=1``
    (SGLang's switch; scheduler processes inherit it) when unset. A value other than ``1`` is
    the user's and conflicts with ``--device cpu``: KVQuantError naming the variable."""
    env = os.environ if environ is None else environ
    value = env.get(CPU_ENGINE_VAR)
    if value is None:
        return {CPU_ENGINE_VAR: "1"}
    if value != "1":
        raise KVQuantError(
            f"--device cpu needs {CPU_ENGINE_VAR}=1 (SGLang's CPU engine switch), but it is set "
            f"to {value!r} in this environment: unset it or set {CPU_ENGINE_VAR}=1"
        )
    return {}


# What every kernel takes (CUDA: csrc/include/oscar/common.cuh kMaxGroup and the head_dim
# instantiations; Triton and the CPU kernels take any group, the same head_dims).
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_GQA_GROUP = 16


def _text_config(hf_config: Any) -> Any:
    """The language model's part of a config that nests it (``text_config`` of a VLM)."""
    if _get(hf_config, "num_attention_heads") is None:
        text = _get(hf_config, "text_config")
        if text is not None:
            return text
    return hf_config


# GGUF metadata value types (gguf.GGUFValueType) with a fixed size: struct format.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
# GGUF key (after "{architecture}.") -> the HF config field check_model reads.
_GGUF_FIELDS = {
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "attention.kv_lora_rank": "kv_lora_rank",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
}


def gguf_model_config(path: str) -> dict[str, Any] | None:
    """The fields `check_model` reads, from a GGUF file's metadata header only.

    Loading the config the way SGLang does (``gguf.GGUFReader`` and transformers) parses the
    whole file: seconds to a minute for a small model, which the launching process would add
    before every start. The metadata precedes the tensor index (GGUF v2/v3: magic, version,
    tensor count, kv count, then key/type/value records), so this reads up to the keys it
    needs. None if the file is not GGUF v2+ or lacks the architecture or a head count (or
    stores it per layer)."""
    import struct

    found: dict[str, Any] = {}
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: GGUF header ends early")
            return struct.unpack(fmt, data)[0]

        def read_str() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def skip(vtype: int) -> None:
            if vtype == 8:
                f.seek(read("<Q"), 1)
            elif vtype == 9:
                etype, count = read("<I"), read("<Q")
                if etype in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, 1)
                else:
                    for _ in range(count):
                        skip(etype)
            elif vtype in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF" or read("<I") < 2:
            return None
        read("<Q")  # tensor count
        arch = None
        for _ in range(read("<Q")):
            key, vtype = read_str(), read("<I")
            if key == "general.architecture" and vtype == 8:
                arch = read_str()
            elif arch and key.startswith(arch + ".") and vtype in _GGUF_SCALARS:
                field = _GGUF_FIELDS.get(key[len(arch) + 1 :])
                value = read(_GGUF_SCALARS[vtype])
                if field:
                    found[field] = value
            else:
                skip(vtype)
            if key.startswith("tokenizer.") and "num_attention_heads" in found:
                break  # the vocabulary follows: nothing more to read
    if not arch or not found.get("num_attention_heads"):
        return None
    return {"model_type": arch, **found}


def check_model(hf_config: Any, *, tp_size: int = 1) -> tuple[int, int, int]:
    """Checks a model (HF config object or dict) for --kv-quant oscar.

    Returns (num_layers, kv_heads per rank, head_dim); raises KVQuantError naming the config
    field for MLA, sliding-window, head_dim not in SUPPORTED_HEAD_DIMS, a query-heads /
    KV-heads ratio that is not an integer or exceeds MAX_GQA_GROUP on a TP rank, or KV heads
    not divisible by tp_size.
    """
    hf_config = _text_config(hf_config)
    name = _get(hf_config, "model_type", "?")
    if _get(hf_config, "kv_lora_rank") or _get(hf_config, "q_lora_rank"):
        raise KVQuantError(
            f"--kv-quant oscar does not support MLA models ({name}: kv_lora_rank is set); "
            "serve it without --kv-quant"
        )
    window = _get(hf_config, "sliding_window")
    use_window = _get(hf_config, "use_sliding_window", window is not None)
    layer_types = _get(hf_config, "layer_types") or []
    if (window and use_window) or any("sliding" in str(t) for t in layer_types):
        raise KVQuantError(
            f"--kv-quant oscar does not support sliding-window attention ({name}: "
            f"sliding_window={window}); serve it without --kv-quant"
        )
    heads = _get(hf_config, "num_attention_heads")
    if not heads:
        raise KVQuantError(
            f"--kv-quant oscar cannot read num_attention_heads from the {name} config; "
            "serve it without --kv-quant"
        )
    kv_heads = _get(hf_config, "num_key_value_heads") or heads
    head_dim = _get(hf_config, "head_dim")
    where = f"head_dim={head_dim}"
    if not head_dim:
        hidden = _get(hf_config, "hidden_size")
        head_dim = hidden // heads
        where = f"head_dim={head_dim} (hidden_size={hidden} / num_attention_heads={heads})"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        dims = ", ".join(map(str, SUPPORTED_HEAD_DIMS[:-1])) + f" or {SUPPORTED_HEAD_DIMS[-1]}"
        raise KVQuantError(
            f"--kv-quant oscar supports head_dim {dims} (the sizes its attention kernels are "
            f"built for); {name} has {where}: serve it without --kv-quant"
        )
    ratio = f"num_attention_heads={heads} / num_key_value_heads={kv_heads}"
    if heads % kv_heads:
        raise KVQuantError(
            f"--kv-quant oscar needs a whole number of query heads per KV head; {name} has "
            f"{ratio} = group {heads / kv_heads:.3g}: serve it without --kv-quant"
        )
    if kv_heads % tp_size and tp_size % kv_heads:
        raise KVQuantError(
            f"--tp {tp_size} does not split {kv_heads} KV heads evenly; pick a --tp that "
            "divides the KV heads (or a multiple of them)"
        )
    per_rank = max(1, kv_heads // tp_size)
    group = heads // kv_heads
    # --tp above the KV heads replicates them: each rank keeps one KV head and fewer queries.
    replicas = max(1, tp_size // kv_heads)
    rank_group = -(-group // replicas)
    if rank_group > MAX_GQA_GROUP:
        at_tp = f" ({rank_group} per rank at --tp {tp_size})" if replicas > 1 else ""
        tp_hint = next(
            (kv_heads * r for r in range(-(-group // MAX_GQA_GROUP), group + 1) if group % r == 0),
            None,
        )
        raise KVQuantError(
            f"--kv-quant oscar serves at most {MAX_GQA_GROUP} query heads per KV head (GQA "
            f"group); {name} has {ratio} = group {group}{at_tp}: serve it without --kv-quant"
            + (
                f" (or with --tp {tp_hint}: each rank then holds one KV head and "
                f"{group * kv_heads // tp_hint} query heads)"
                if tp_hint is not None and tp_hint > tp_size
                else ""
            )
        )
    layers = _get(hf_config, "num_hidden_layers")
    return int(layers), int(per_rank), int(head_dim)
