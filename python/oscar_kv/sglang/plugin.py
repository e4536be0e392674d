"""SGLang plugin (entry point ``sglang.srt.plugins: oscar_kv = oscar_kv.sglang.plugin:register``).

SGLang calls `register` in the launching process and again in every scheduler process.
It adds ``--kv-quant {none,oscar}``, ``--kv-quant-bits``, ``--kv-quant-k-group`` to the
server's parser, registers attention backend "oscar" and (when `oscar_kv.sglang.radix`
exists) radix cache backend "oscar", and installs AROUND hooks that do nothing unless
``--kv-quant oscar`` is on. The choice reaches scheduler processes through the environment
variable ``OSCAR_KV_QUANT`` (`oscar_kv.sglang.args`), because ServerArgs drops unknown fields.
For ``sglang.Engine`` programs (no command line) use `engine` or call `enable` first.

Status on this CPU machine (SGLang 0.5.23, scripts/install_sglang.sh): the entry point is
found by SGLang's ``load_plugins``; ``python -m sglang.launch_server ... --kv-quant oscar``
accepts the flags and rejects conflicts with the message. A serving run stops before the
model runner at ``from sgl_kernel import ...`` (no sgl_kernel stand-in in this repository
yet; see notes/sglang-on-this-cpu.md item 4), so the pool/cell-size/V-fold hooks are tested
by calling them directly (tests/test_sglang_backend.py), not inside a live server.

Dependencies on SGLang 0.5.23, all in this one place
----------------------------------------------------
Public registries / extension points:
- ``sglang.srt.plugins.hook_registry.HookRegistry`` (register AROUND hooks; the plugin
  framework applies them after every plugin ran);
- ``sglang.srt.layers.attention.attention_registry.register_attention_backend`` and
  ``sglang.srt.server_args.add_attention_backend_choices``;
- ``sglang.srt.mem_cache.registry.register_radix_cache_backend`` (via radix.py);
- ``sglang.srt.mem_cache.memory_pool.KVCache`` (pool base class),
  ``sglang.srt.layers.attention.base_attn_backend.AttentionBackend`` (backend base class),
  ForwardBatch fields ``forward_mode, req_pool_indices, seq_lens, extend_seq_lens_cpu``,
  RadixAttention fields ``layer_id, tp_q_head_num, tp_k_head_num, head_dim, scaling``.
- ``oscar_kv.sglang.cpu.standins``' torchvision stand-in (installed through
  ``oscar_kv.sglang._testing``) on machines whose torchvision does not match torch.
Private internals hooked (may move between SGLang releases; under --kv-quant oscar start-up
stops with a message naming any that is missing, `check_hook_targets`):
- ``ServerArgs.add_cli_args`` (staticmethod) and ``ServerArgs.from_cli_args`` (classmethod):
  add the flags; validate and apply them (page_size, attention_backend,
  radix_cache_backend) to the constructed ServerArgs; check the model (`check_launch_model`,
  also run by `engine`) in the launching process, before SGLang starts a scheduler. The
  config is read the way ``ModelConfig`` does: ``utils.hf_transformers.config.get_config``
  with the fields ``arg_groups.model_override_base.resolving_view`` resolves (or the
  ``_model_config`` SGLang memoized on the record); TP width from
  ``runtime_context.attn_tp_size_of``. Exceptions: a .gguf file without a config.json beside
  it is read from its header (`args.gguf_model_config`; SGLang's parse of the whole file
  takes up to a minute), a hub id only from the local HF cache (no network while parsing
  arguments), and a config that does not load is left to SGLang to report (the scheduler's
  cell-size hook still checks the model). Under ``--device cpu`` the same hook applies what
  serving on CPU needs (`serve_on_cpu`, then `start_on_cpu` once the model passed;
  docs/cpu-serving.md): float32, no grammar backend, no decode graph, a tokenizer directory
  derived from a GGUF model, for the fields the user left unset (the ``add_cli_args`` hook
  records which ones the command line gave), and ``SGLANG_USE_CPU_ENGINE=1`` for the
  processes SGLang spawns. Without --kv-quant the
  argument hooks change nothing (the Llama GGUF rotary fix runs only with --kv-quant or with
  the CPU kit the user switched on, ``SGLANG_USE_CPU_ENGINE=1``);
- ``model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size(kvc,
  num_layers)``: returns packed bytes per token (reads ``kvc.model_config.hf_config``,
  ``kvc.kv_cache_dtype`` and ``get_parallel().attn_tp_size``) and logs the cell line;
- ``DefaultPoolConfigurator.calculate_pool_sizes(available_bytes, page_size)`` and
  ``calculate_pool_sizes_from_max_tokens(max_total_num_tokens, page_size)``: the one KV
  budget split into packed and residual pages (`oscar_kv.sglang.budget`; reads
  ``self._fixed_overhead_bytes`` and ``get_schedule().max_running_requests``);
- ``mem_cache.kv_cache_configurator.KVCacheConfigurator.resolve_max_num_reqs(token_capacity)``:
  running requests capped at the residual pages;
- ``KVCacheConfigurator._build_token_to_kv_pool(self, *, sizes, is_dsa_model, is_dsv4_model,
  req_to_token_pool)``: builds `OscarTokenToKVPool` from the budget instead of the MHA pool
  (reads ``sizes.max_total_num_tokens``, ``self.layer_info``, ``self.device``) and binds its
  residual pages to ``req_to_token_pool``'s slots;
- ``managers.tokenizer_manager.TokenizerManager._validate_one_request(obj, input_ids)``:
  the request checks of `oscar_kv.sglang.validation` after SGLang's own;
- ``KVCacheConfigurator._build_token_to_kv_pool_allocator(self, *, sizes, token_to_kv_pool,
  ...)``: SGLang's ``PagedTokenToKVPoolAllocator`` over an `OscarTokenToKVPool` is replaced
  by `oscar_kv.sglang.allocator.OscarPageAllocator` (same size, page size, device);
- ``model_executor.model_runner.ModelRunner.load_model``: after it, the V fold
  (`oscar_kv.sglang.weights.fold_v_into_model`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import torch

from oscar_kv.config import BLOCK_TOKENS
from oscar_kv.sglang.args import (
    BACKEND_NAME,
    CPU_WATCHED_FIELDS,
    KVQuantError,
    KVQuantSpec,
    add_arguments,
    check_model,
    check_server_args,
    cpu_defaults,
    cpu_engine_env,
    gguf_model_config,
)
from oscar_kv.sglang.budget import (
    DEFAULT_RESIDUAL_SHARE,
    KVBudget,
    KVBudgetError,
    KVShape,
    for_tokens,
    residual_dtype,
    split_bytes,
)
from oscar_kv.sglang.validation import hook_validate_one_request

logger = logging.getLogger("oscar_kv.sglang")

HOOK_TARGETS = {
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "from_cli_args": "sglang.srt.server_args.ServerArgs.from_cli_args",
    "cell_size": "sglang.srt.model_executor.pool_configurator."
    "DefaultPoolConfigurator._compute_cell_size",
    "pool_sizes": "sglang.srt.model_executor.pool_configurator."
    "DefaultPoolConfigurator.calculate_pool_sizes",
    "pool_sizes_from_tokens": "sglang.srt.model_executor.pool_configurator."
    "DefaultPoolConfigurator.calculate_pool_sizes_from_max_tokens",
    "max_num_reqs": "sglang.srt.mem_cache.kv_cache_configurator."
    "KVCacheConfigurator.resolve_max_num_reqs",
    "build_pool": "sglang.srt.mem_cache.kv_cache_configurator."
    "KVCacheConfigurator._build_token_to_kv_pool",
    "build_allocator": "sglang.srt.mem_cache.kv_cache_configurator."
    "KVCacheConfigurator._build_token_to_kv_pool_allocator",
    "load_model": "sglang.srt.model_executor.model_runner.ModelRunner.load_model",
    "validate_request": "sglang.srt.managers.tokenizer_manager."
    "TokenizerManager._validate_one_request",
}

_registered = False
_radix_available = False
_reported_cells: set[tuple[int, int]] = set()
# This process's model shape and KV budget, set by the sizing hooks and read by the pool
# hook (SGLang sizes, then builds, in the same process).
_shape: KVShape | None = None
_budget: KVBudget | None = None


def spec() -> KVQuantSpec:
    return KVQuantSpec.current()


# ---------------------------------------------------------------------------- hooks
def _hook_add_cli_args(orig, *args, **kwargs):
    out = orig(*args, **kwargs)
    parser = args[-1] if args else kwargs["parser"]
    if not any("--kv-quant" in a.option_strings for a in parser._actions):
        add_arguments(parser)
    _record_explicit_fields(parser)
    return out


# Set on the Namespace a --kv-quant oscar --device cpu command line parses to: which of
# CPU_WATCHED_FIELDS it gave (ServerArgs.from_cli_args copies only its own fields).
EXPLICIT_ATTR = "_oscar_kv_explicit"
_UNSET = object()


def _record_explicit_fields(parser: argparse.ArgumentParser) -> None:
    """Lets `_hook_from_cli_args` tell a typed ``--dtype auto`` from no ``--dtype``.

    Wraps this parser's ``parse_known_args``: a parse without ``--kv-quant oscar --device cpu``
    is returned exactly as argparse made it. Under them the same arguments are parsed a second
    time into a Namespace whose watched fields start as a sentinel, and the fields that lost it
    are recorded as explicit (deprecation warnings of that second parse are not repeated)."""
    if getattr(parser, "_oscar_kv_explicit_wrapped", False):
        return
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = None if args is None else list(args)
        ns, rest = parse(args, namespace)
        if getattr(ns, "kv_quant", None) == BACKEND_NAME and getattr(ns, "device", None) == "cpu":
            probe = argparse.Namespace(**dict.fromkeys(CPU_WATCHED_FIELDS, _UNSET))
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                parse(args, probe)
            finally:
                logging.disable(previous)
            given = {f for f in CPU_WATCHED_FIELDS if getattr(probe, f, _UNSET) is not _UNSET}
            setattr(ns, EXPLICIT_ATTR, frozenset(given))
        return ns, rest

    parser.parse_known_args = parse_known_args
    parser._oscar_kv_explicit_wrapped = True


def apply_to_server_args(server_args: Any, s: KVQuantSpec) -> Any:
    """Validates ``server_args`` for ``s`` and sets the fields --kv-quant oscar implies."""
    if not s.enabled:
        return server_args
    settings = check_server_args(server_args, radix_backend_available=_radix_available)
    for name, value in settings.items():
        setattr(server_args, name, value)
    if not _radix_available:
        logger.warning(
            "oscar-kv: radix cache backend 'oscar' is not available; SGLang's default prefix "
            "cache is used (pages are still shared, through SGLang's tree)"
        )
    return server_args


def missing_hook_targets() -> list[str]:
    """The hooked SGLang functions this SGLang does not have (a newer release moved them)."""
    import importlib

    missing = []
    for target in HOOK_TARGETS.values():
        parts = target.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(target)
            break
        else:
            missing.append(target)
    return missing


def check_hook_targets() -> None:
    """Stops start-up under --kv-quant oscar when a hook target moved: without it the pool
    would be sized or built as SGLang's own (bf16), or requests left unchecked, silently."""
    missing = missing_hook_targets()
    if missing:
        raise KVQuantError(
            "--kv-quant oscar cannot hook this SGLang: "
            + ", ".join(missing)
            + " not found (oscar-kv supports SGLang 0.5.23; install that version or an "
            "oscar-kv release for yours)"
        )


def _hook_from_cli_args(orig, *args, **kwargs):
    ns = args[-1] if args else kwargs["args"]
    s = KVQuantSpec.from_namespace(ns)
    cpu = None
    if s.enabled:
        check_hook_targets()
        check_server_args(ns, radix_backend_available=_radix_available)
        cpu = serve_on_cpu(ns, getattr(ns, EXPLICIT_ATTR, None))
        _eager_prefill(ns)
    if s.enabled or _cpu_kit_on():
        _apply_gguf_rope_fix(ns)
    server_args = orig(*args, **kwargs)
    if s.enabled:
        check_launch_model(server_args)
        if cpu is not None:
            start_on_cpu(server_args, cpu)
    s.publish()
    return apply_to_server_args(server_args, s)


def _get(args: Any, name: str) -> Any:
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def _set(args: Any, name: str, value: Any) -> None:
    if isinstance(args, dict):
        args[name] = value
    else:
        setattr(args, name, value)


def _cpu_kit_on() -> bool:
    """The user switched on oscar-kv's CPU serving kit without --kv-quant
    (``SGLANG_USE_CPU_ENGINE=1`` at start: the stand-ins and GGUF hooks of `oscar_kv.sglang.cpu`);
    the Llama GGUF rotary fix belongs to it. Without --kv-quant and without that variable the
    plugin's argument hooks change nothing."""
    from oscar_kv.sglang.cpu import boot

    return boot.wanted()


def serve_on_cpu(args: Any, explicit: frozenset[str] | set[str] | None = None) -> dict | None:
    """The settings ``--kv-quant oscar --device cpu`` implies, set on ``args`` (a Namespace or
    Engine kwargs) for the fields the user left unset (`args.cpu_defaults`: ``dtype``
    float32, ``grammar_backend`` none, decode graph disabled); None unless ``device`` is
    ``cpu``. Changes nothing else: `start_on_cpu` does the rest once the model is checked.
    Raises KVQuantError, naming the variable, when ``SGLANG_USE_CPU_ENGINE`` is set to
    another value than 1."""
    if _get(args, "device") != "cpu":
        return None
    cpu_engine_env()
    settings = cpu_defaults(args, explicit)
    for name, value in settings.items():
        _set(args, name, value)
    return settings


def start_on_cpu(args: Any, settings: dict[str, Any]) -> None:
    """The rest of serving on CPU, in the launching process before SGLang starts a scheduler
    (``args``: the ServerArgs SGLang built, or Engine kwargs; ``settings``: what
    `serve_on_cpu` set, for the log line):

    - ``tokenizer_path``: for a local ``.gguf`` model without a tokenizer beside it, a directory
      built from the file's metadata and cached (`oscar_kv.sglang.cpu.tokenizer`);
    - ``SGLANG_USE_CPU_ENGINE=1`` in this process's environment (every process SGLang spawns
      inherits it, and the package's ``.pth`` hook then installs the CPU stand-ins there before
      SGLang's modules load), and the stand-ins in this process too (`cpu.boot.activate`,
      unless ``OSCAR_KV_CPU_BOOT=0``).
    """
    env = cpu_engine_env()
    settings = dict(settings)
    tokenizer = _gguf_tokenizer(args)
    if tokenizer is not None:
        _set(args, "tokenizer_path", tokenizer)
        settings["tokenizer_path"] = tokenizer
    os.environ.update(env)
    from oscar_kv.sglang.cpu import boot

    stood_in = boot.activate() if boot.wanted() else []
    done = []
    if settings:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
        done.append(f"{flags} (not given: pass the flag to choose another value)")
    done += [f"{k}={v} for every SGLang process" for k, v in env.items()]
    if stood_in:
        done.append(f"CPU stand-ins for {', '.join(stood_in)}")
    if done:
        logger.info("oscar-kv: --device cpu: %s", "; ".join(done))


def _gguf_tokenizer(args: Any) -> str | None:
    """A tokenizer directory for a local GGUF model given without --tokenizer-path."""
    from oscar_kv.sglang.cpu import tokenizer

    model = _get(args, "model_path")
    if _get(args, "tokenizer_path") or not isinstance(model, str | os.PathLike):
        return None
    model = os.fspath(model)
    if not (model.endswith(".gguf") and os.path.isfile(model)):
        return None
    if tokenizer.has_sidecar_tokenizer(model):
        return None
    try:
        return str(tokenizer.gguf_tokenizer_dir(model))
    except Exception as e:  # transformers fails in many ways on odd files
        raise KVQuantError(
            f"--kv-quant oscar could not build a tokenizer from {model} ({type(e).__name__}: "
            f"{e}); pass --tokenizer-path with a directory holding the model's tokenizer"
        ) from e


def _eager_prefill(args: Any) -> None:
    """Extend and mixed batches run eagerly under --kv-quant oscar (decode is captured): the
    prefill CUDA graph (SGLang's default on CUDA is the breakable one) is turned off unless
    the user chose a prefill graph backend."""
    field = "cuda_graph_backend_prefill"
    if isinstance(args, dict):
        if args.get(field) is None:
            args[field] = "disabled"
    elif getattr(args, field, None) is None:
        setattr(args, field, "disabled")


def _resolved(server_args: Any) -> Any:
    """SGLang's view of the fields as its argument handlers resolved them (a GGUF or
    ModelScope handler may declare another model_path than the one typed)."""
    try:
        from sglang.srt.arg_groups.model_override_base import resolving_view
    except ImportError:
        return server_args
    return resolving_view(server_args)


def _launch_tp_size(server_args: Any) -> int:
    """The attention-TP width each scheduler will see (``get_parallel().attn_tp_size``)."""
    try:
        from sglang.srt.runtime_context import attn_tp_size_of

        return int(attn_tp_size_of(_resolved(server_args)))
    except (ImportError, AttributeError, TypeError, ZeroDivisionError):
        return int(getattr(server_args, "tp_size", 1) or 1)


def _hub_config_cached(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a hub id (a URL, a missing path): SGLang's to report
        return False
    return isinstance(hit, str)


def _launch_hf_config(server_args: Any) -> Any | None:
    """The model's HF config as SGLang's ``ModelConfig`` loads it, or None when it cannot be
    read here without the network or fails to load: SGLang then reports (or the scheduler's
    cell-size hook checks) it in its own place."""
    memo = getattr(server_args, "_model_config", None)
    cfg = _resolved(server_args)
    model = getattr(cfg, "model_path", None)
    if memo is not None and getattr(server_args, "_model_config_built_from", None) in (
        None,
        model,
    ):
        return memo.hf_config
    if not model:
        return None
    kwargs: dict[str, Any] = {}
    config_file = getattr(cfg, "decrypted_config_file", None)
    if config_file and config_file.strip():
        kwargs["_configuration_file"] = config_file.strip()
    revision = getattr(cfg, "revision", None)
    try:
        overrides = json.loads(getattr(cfg, "json_model_override_args", None) or "{}")
    except json.JSONDecodeError:
        return None  # SGLang refuses it in its own words
    if (
        str(model).endswith(".gguf")
        and os.path.isfile(model)
        and not os.path.isfile(os.path.join(os.path.dirname(model), "config.json"))
    ):
        # SGLang derives the config from the file's metadata (a parse of the whole file,
        # up to a minute); the header alone holds what check_model reads.
        try:
            fields = gguf_model_config(model)
        except (OSError, ValueError):
            fields = None
        if fields is not None:
            return {**fields, **overrides}
    if not os.path.exists(model):
        # A hub id: only from the local cache (no download, no network retries while the
        # arguments are parsed); the first launch of a new model is checked by the scheduler.
        if not _hub_config_cached(model, revision):
            logger.info(
                "oscar-kv: %s is neither a local path nor a hub model in the local cache; "
                "--kv-quant oscar checks its shape when SGLang's scheduler loads its config",
                model,
            )
            return None
        kwargs["local_files_only"] = True
    try:
        from sglang.srt.utils.hf_transformers.config import get_config

        return get_config(
            model,
            trust_remote_code=getattr(cfg, "trust_remote_code", False),
            revision=revision,
            model_override_args=overrides,
            model_config_parser=getattr(cfg, "model_config_parser", "auto") or "auto",
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - SGLang's own error, raised where SGLang loads it
        logger.debug("oscar-kv: model config not read at launch (%s: %s)", type(e).__name__, e)
        return None


def check_launch_model(server_args: Any) -> None:
    """`check_model` in the launching process, before SGLang starts any scheduler: a model the
    kernels cannot serve is refused with the KVQuantError message at once."""
    hf_config = None if server_args is None else _launch_hf_config(server_args)
    if hf_config is not None:
        check_model(hf_config, tp_size=_launch_tp_size(server_args))


def _apply_gguf_rope_fix(args: Any) -> None:
    """Llama GGUF files need interleaved rotary in SGLang (`oscar_kv.sglang.cpu.gguf`); this
    is a property of the file, so it applies with or without --kv-quant."""
    from oscar_kv.sglang.cpu.gguf import rope_override

    is_map = isinstance(args, dict)
    model = args.get("model_path") if is_map else getattr(args, "model_path", None)
    current = (
        args.get("json_model_override_args")
        if is_map
        else getattr(args, "json_model_override_args", None)
    )
    fixed = rope_override(model, current or None)
    if fixed != (current or None):
        if is_map:
            args["json_model_override_args"] = fixed
        else:
            args.json_model_override_args = fixed


def _kv_shape(kvc: Any, num_layers: int) -> KVShape:
    """The budget's view of the model on this rank (``kvc``: SGLang's KVCacheConfigurator)."""
    from sglang.srt.runtime_context import get_parallel

    from oscar_kv.sglang.weights import fold_enabled

    tp = get_parallel().attn_tp_size
    _, kv_heads, head_dim = check_model(kvc.model_config.hf_config, tp_size=tp)
    dtype = residual_dtype(getattr(kvc, "kv_cache_dtype", torch.bfloat16))
    return KVShape(
        num_layers, kv_heads, head_dim, spec().oscar_config(fold_v=fold_enabled()), dtype
    )


def _user_slots() -> int | None:
    """--max-running-requests as the user gave it (None: SGLang's default)."""
    from sglang.srt.runtime_context import get_schedule

    return getattr(get_schedule(), "max_running_requests", None)


def _hook_cell_size(orig, self, kvc, num_layers, *args, **kwargs):
    """Packed bytes per token; remembers the model's shape for the budget hooks below."""
    global _shape
    if not spec().enabled:
        return orig(self, kvc, num_layers, *args, **kwargs)
    from sglang.srt.runtime_context import get_parallel

    _shape = _kv_shape(kvc, num_layers)
    cell = _shape.packed_page_bytes // BLOCK_TOKENS
    bf = _shape.bf16_token_bytes
    if (cell, bf) not in _reported_cells:  # SGLang sizes the pool more than once
        _reported_cells.add((cell, bf))
        logger.info(
            "oscar-kv: %s cell size %d B/token vs bf16 %d B/token (packed pages; the residual "
            "pages come out of the same budget, see the capacity line); %d layers x %d KV heads "
            "(per rank, tp=%d) x D=%d",
            _shape.config.label, cell, bf, num_layers, _shape.kv_heads,
            get_parallel().attn_tp_size, _shape.head_dim,
        )  # fmt: skip
    return cell


def _pool_config(tokens: int) -> Any:
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

    return MemoryPoolConfig(max_total_num_tokens=tokens)


def _hook_pool_sizes(orig, self, available_bytes, page_size, *args, **kwargs):
    """The profiled path: the byte budget split into residual and packed pages."""
    global _budget
    if not spec().enabled or _shape is None:
        return orig(self, available_bytes, page_size, *args, **kwargs)
    overhead = int(getattr(self, "_fixed_overhead_bytes", 0) or 0)
    _budget = split_bytes(_shape, max(int(available_bytes) - overhead, 0), _user_slots())
    return _pool_config(_budget.tokens)


def _hook_pool_sizes_from_tokens(orig, self, max_total_num_tokens, page_size, *args, **kwargs):
    """The --max-total-tokens path: that many packed tokens plus their residual pages."""
    global _budget
    if not spec().enabled or _shape is None:
        return orig(self, max_total_num_tokens, page_size, *args, **kwargs)
    _budget = for_tokens(_shape, int(max_total_num_tokens), _user_slots())
    return _pool_config(_budget.tokens)


def _hook_max_num_reqs(orig, self, token_capacity, *args, **kwargs):
    """Running requests never exceed the residual pages (each holds one)."""
    global _budget
    n = orig(self, token_capacity, *args, **kwargs)
    if not spec().enabled or _budget is None:
        return n
    if n > _budget.residual_pages:
        logger.info(
            "oscar-kv: --max-running-requests is %d: as many residual pages as fit in %d%% of "
            "the KV budget (pass --max-running-requests to choose, or raise the budget)",
            _budget.residual_pages, round(100 * DEFAULT_RESIDUAL_SHARE),
        )  # fmt: skip
        return _budget.residual_pages
    _budget = _budget.with_residual_pages(n)  # SGLang lowered the user's value
    return n


def _hook_build_pool(orig, self, *args, **kwargs):
    if not spec().enabled:
        return orig(self, *args, **kwargs)
    from oscar_kv.sglang.pool import OscarTokenToKVPool

    size = int(kwargs["sizes"].max_total_num_tokens)
    rtp = kwargs["req_to_token_pool"]
    slots = int(rtp.size)
    shape = _kv_shape(self, self.layer_info.num_effective_layers)
    budget = _budget
    if budget is None or budget.tokens != size or budget.shape != shape:
        # SGLang sized the pool without the budget hooks (or on another path): the same
        # split, from the token count it chose and the slots it made.
        budget = for_tokens(shape, size, slots)
    if budget.residual_pages < slots:
        raise KVBudgetError(
            f"oscar-kv: {slots} request slots but {budget.residual_pages} residual pages; "
            f"lower --max-running-requests to {budget.residual_pages}"
        )
    pool = OscarTokenToKVPool.from_budget(budget, self.device, self.layer_info.start_layer)
    pool.attach(rtp)
    logger.info(budget.report())
    return pool


def _hook_build_allocator(orig, self, *args, **kwargs):
    """SGLang's paged allocator over an oscar pool becomes `OscarPageAllocator` (the Rust
    page allocator, same size and page ids); any other allocator SGLang picks stays."""
    out = orig(self, *args, **kwargs)
    if not spec().enabled:
        return out
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    from oscar_kv.sglang.allocator import OscarPageAllocator
    from oscar_kv.sglang.pool import OscarTokenToKVPool

    pool = kwargs.get("token_to_kv_pool")
    if type(out) is not PagedTokenToKVPoolAllocator or not isinstance(pool, OscarTokenToKVPool):
        return out
    alloc = OscarPageAllocator(out.size, out.page_size, out.dtype, out.device, pool, out.need_sort)
    logger.info(
        "oscar-kv: page allocator in Rust (%d pages of %d tokens)", alloc.num_pages, alloc.page_size
    )
    return alloc


def _hook_load_model(orig, self, *args, **kwargs):
    out = orig(self, *args, **kwargs)
    if spec().enabled:
        from oscar_kv.sglang.weights import fold_v_into_model

        fold_v_into_model(self.model)
    return out


_HOOKS = {
    "add_cli_args": _hook_add_cli_args,
    "from_cli_args": _hook_from_cli_args,
    "cell_size": _hook_cell_size,
    "pool_sizes": _hook_pool_sizes,
    "pool_sizes_from_tokens": _hook_pool_sizes_from_tokens,
    "max_num_reqs": _hook_max_num_reqs,
    "build_pool": _hook_build_pool,
    "build_allocator": _hook_build_allocator,
    "load_model": _hook_load_model,
    "validate_request": hook_validate_one_request,
}


# ---------------------------------------------------------------------------- registration
def register() -> None:
    """The entry point. Idempotent. The argument hooks go in first (they need nothing but
    the hook registry), so the flags and their checks work even if a registry import fails."""
    global _registered, _radix_available
    if _registered:
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for key, target in HOOK_TARGETS.items():
        HookRegistry.register(target, _HOOKS[key], HookType.AROUND)

    _cpu_import_shims()
    _register_cpu_serving()
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from oscar_kv.sglang.attention import create_backend

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    _radix_available = _register_radix()
    s = spec()
    if s.enabled:
        logger.info("oscar-kv: --kv-quant oscar active in this process (%s)", s)


def _cpu_import_shims() -> None:
    """SGLang's config registry imports torchvision; where the installed torchvision does not
    match torch (this project's CPU machines) the stand-in of `oscar_kv.sglang._testing` is
    put in place first (only then, and after transformers decided torchvision is absent)."""
    import importlib
    import sys

    from oscar_kv.sglang import _testing

    if "sglang.srt.configs" in sys.modules or _testing._torchvision_usable():
        return
    importlib.import_module("transformers")
    _testing.install_torchvision_standin()
    logger.info("oscar-kv: torchvision unusable here; import-time stand-in installed")


def _register_cpu_serving() -> None:
    """GGUF weights as dense matmuls when SGLang serves on CPU (`oscar_kv.sglang.cpu`)."""
    from oscar_kv.sglang.cpu import boot

    if not boot.wanted():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from oscar_kv.sglang.cpu.gguf import HOOKS

    for target, hook in HOOKS.items():
        HookRegistry.register(target, hook, HookType.AROUND)


def _register_radix() -> bool:
    try:
        from oscar_kv.sglang import radix
    except ImportError as e:
        logger.warning("oscar-kv: radix cache backend unavailable (%s)", e)
        return False
    reg = getattr(radix, "register_backend", None)
    if reg is None:
        return False
    try:
        reg()
    except ValueError:  # already registered in this process
        pass
    return True


def enable(kv_quant: str = "oscar", kv_quant_bits: int = 2, kv_quant_k_group: int = 32) -> None:
    """Turns --kv-quant on for this process and the ones it starts (Engine programs)."""
    KVQuantSpec(kv_quant, kv_quant_bits, kv_quant_k_group).publish()


def _engine_server_args(kwargs: dict[str, Any]) -> Any:
    """The ServerArgs ``sglang.Engine(**kwargs)`` will build (plugins first, as Engine does),
    for the model check; None if SGLang refuses the kwargs (Engine then says why)."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    try:
        return ServerArgs(**{"log_level": "error", **kwargs})
    except Exception as e:  # noqa: BLE001 - SGLang's own error, raised again by Engine
        logger.debug("oscar-kv: Engine kwargs not checked here (%s: %s)", type(e).__name__, e)
        return None


def engine(**kwargs: Any) -> Any:
    """``sglang.Engine(**kwargs)`` that also takes ``kv_quant``, ``kv_quant_bits`` and
    ``kv_quant_k_group`` (ServerArgs would reject them)."""
    s = KVQuantSpec.pop_kwargs(kwargs)
    s.publish()
    register()  # SGLang calls it again from Engine (idempotent); needed for the checks here
    cpu = None
    if s.enabled:
        check_hook_targets()
        kwargs.update(check_server_args(kwargs, radix_backend_available=_radix_available))
        cpu = serve_on_cpu(kwargs, explicit=set(kwargs))
        _eager_prefill(kwargs)
    if s.enabled or _cpu_kit_on():
        _apply_gguf_rope_fix(kwargs)
    if s.enabled:
        check_launch_model(kwargs.get("server_args") or _engine_server_args(kwargs))
        if cpu is not None:
            start_on_cpu(kwargs, cpu)
    import sglang

    return sglang.Engine(**kwargs)


__all__ = ["KVQuantError", "apply_to_server_args", "enable", "engine", "register", "spec"]
