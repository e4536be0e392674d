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
Private internals hooked (may move between SGLang releases; each hook checks the target
exists and logs a warning if not):
- ``ServerArgs.add_cli_args`` (staticmethod) and ``ServerArgs.from_cli_args`` (classmethod):
  add the flags; validate and apply them (page_size, attention_backend,
  radix_cache_backend, disable_cuda_graph) to the constructed ServerArgs;
- ``model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size(kvc,
  num_layers)``: returns OScaR bytes per token (reads ``kvc.model_config.hf_config`` and
  ``get_parallel().attn_tp_size``) and logs the capacity report;
- ``mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool(self, *,
  sizes, is_dsa_model, is_dsv4_model, req_to_token_pool)``: builds `OscarTokenToKVPool`
  instead of the MHA pool (reads ``sizes.max_total_num_tokens``, ``self.kv_cache_dtype,
  self.model_config.hf_config, self.layer_info, self.device``; one bf16 tail per row of
  ``req_to_token_pool.req_to_token``);
- ``model_executor.model_runner.ModelRunner.load_model``: after it, the V fold
  (`oscar_kv.sglang.weights.fold_v_into_model`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from oscar_kv.sglang.args import (
    BACKEND_NAME,
    KVQuantError,
    KVQuantSpec,
    add_arguments,
    check_model,
    check_server_args,
)

logger = logging.getLogger("oscar_kv.sglang")

HOOK_TARGETS = {
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "from_cli_args": "sglang.srt.server_args.ServerArgs.from_cli_args",
    "cell_size": "sglang.srt.model_executor.pool_configurator."
    "DefaultPoolConfigurator._compute_cell_size",
    "build_pool": "sglang.srt.mem_cache.kv_cache_configurator."
    "KVCacheConfigurator._build_token_to_kv_pool",
    "load_model": "sglang.srt.model_executor.model_runner.ModelRunner.load_model",
}

# Request slots (each with a bf16 tail buffer, see pool.py) when the user sets no
# --max-running-requests; SGLang's own default (up to thousands) would spend more memory on
# tails than on packed pages.
DEFAULT_MAX_RUNNING_REQUESTS = 128
_registered = False
_radix_available = False
_reported_cells: set[tuple[int, int]] = set()


def spec() -> KVQuantSpec:
    return KVQuantSpec.current()


# ---------------------------------------------------------------------------- hooks
def _hook_add_cli_args(orig, *args, **kwargs):
    out = orig(*args, **kwargs)
    parser = args[-1] if args else kwargs["parser"]
    if not any("--kv-quant" in a.option_strings for a in parser._actions):
        add_arguments(parser)
    return out


def apply_to_server_args(server_args: Any, s: KVQuantSpec) -> Any:
    """Validates ``server_args`` for ``s`` and sets the fields --kv-quant oscar implies."""
    if not s.enabled:
        return server_args
    settings = check_server_args(server_args, radix_backend_available=_radix_available)
    for name, value in settings.items():
        setattr(server_args, name, value)
    if not getattr(server_args, "disable_cuda_graph", False):
        logger.warning(
            "oscar-kv: CUDA graphs are disabled under --kv-quant oscar (the 'oscar' attention "
            "backend has no graph hooks yet)"
        )
        server_args.disable_cuda_graph = True
    if getattr(server_args, "max_running_requests", None) is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
        logger.info(
            "oscar-kv: --max-running-requests defaults to %d under --kv-quant oscar (every "
            "request slot holds a bf16 tail of its last <128 tokens); pass it to change",
            DEFAULT_MAX_RUNNING_REQUESTS,
        )
    if not _radix_available:
        logger.warning(
            "oscar-kv: radix cache backend 'oscar' is not available; SGLang's default prefix "
            "cache is used (pages are still shared, through SGLang's tree)"
        )
    return server_args


def _hook_from_cli_args(orig, *args, **kwargs):
    ns = args[-1] if args else kwargs["args"]
    s = KVQuantSpec.from_namespace(ns)
    if s.enabled:
        check_server_args(ns, radix_backend_available=_radix_available)
    _apply_gguf_rope_fix(ns)
    server_args = orig(*args, **kwargs)
    s.publish()
    return apply_to_server_args(server_args, s)


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


def _hook_cell_size(orig, self, kvc, num_layers, *args, **kwargs):
    s = spec()
    if not s.enabled:
        return orig(self, kvc, num_layers, *args, **kwargs)
    from sglang.srt.runtime_context import get_parallel

    from oscar_kv.plan import bf16_bytes_per_token, oscar_bytes_per_token

    tp = get_parallel().attn_tp_size
    _, kv_heads, head_dim = check_model(kvc.model_config.hf_config, tp_size=tp)
    cfg = s.oscar_config()
    cell = oscar_bytes_per_token(num_layers, kv_heads, head_dim, cfg)
    bf = bf16_bytes_per_token(num_layers, kv_heads, head_dim)
    if (cell, bf) in _reported_cells:  # SGLang sizes the pool more than once
        return cell
    _reported_cells.add((cell, bf))
    logger.info(
        "oscar-kv: %s cell size %d B/token vs bf16 %d B/token (%.2fx tokens in the same "
        "memory); %d layers x %d KV heads (per rank, tp=%d) x D=%d",
        cfg.label, cell, bf, bf / cell, num_layers, kv_heads, tp, head_dim,
    )  # fmt: skip
    return cell


def _hook_build_pool(orig, self, *args, **kwargs):
    s = spec()
    if not s.enabled:
        return orig(self, *args, **kwargs)
    from sglang.srt.runtime_context import get_parallel

    from oscar_kv.sglang.pool import capacity_report, oscar_pool_class
    from oscar_kv.sglang.weights import fold_enabled

    size = int(kwargs["sizes"].max_total_num_tokens)
    req_to_token_pool = kwargs.get("req_to_token_pool")
    tp = get_parallel().attn_tp_size
    _, kv_heads, head_dim = check_model(self.model_config.hf_config, tp_size=tp)
    layer_num = self.layer_info.num_effective_layers
    cfg = s.oscar_config(fold_v=fold_enabled())
    if req_to_token_pool is not None:
        tail_slots = int(req_to_token_pool.req_to_token.shape[0])
    else:
        tail_slots = int(os.environ.get("OSCAR_KV_TAIL_SLOTS", "256"))
    pool = oscar_pool_class()(
        size,
        page_size=128,
        dtype=self.kv_cache_dtype,
        head_num=kv_heads,
        head_dim=head_dim,
        layer_num=layer_num,
        device=self.device,
        config=cfg,
        tail_slots=tail_slots,
        start_layer=self.layer_info.start_layer,
    )
    logger.info(capacity_report(layer_num, kv_heads, head_dim, cfg, pool.pages.numel()))
    return pool


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
    "build_pool": _hook_build_pool,
    "load_model": _hook_load_model,
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


def engine(**kwargs: Any) -> Any:
    """``sglang.Engine(**kwargs)`` that also takes ``kv_quant``, ``kv_quant_bits`` and
    ``kv_quant_k_group`` (ServerArgs would reject them)."""
    s = KVQuantSpec.pop_kwargs(kwargs)
    s.publish()
    register()  # SGLang calls it again from Engine (idempotent); needed for the checks here
    if s.enabled:
        kwargs.update(check_server_args(kwargs, radix_backend_available=_radix_available))
        kwargs.setdefault("disable_cuda_graph", True)
    _apply_gguf_rope_fix(kwargs)
    import sglang

    return sglang.Engine(**kwargs)


__all__ = ["KVQuantError", "apply_to_server_args", "enable", "engine", "register", "spec"]
