"""Import-time stand-ins for ``sgl_kernel`` and ``torchvision`` on a CPU-only machine.

``sgl_kernel``: SGLang's KV-cache, allocation and speculative modules run
``from sgl_kernel import <op>_cpu`` at import when ``is_cpu()``, and no wheel exists for a CPU
without AMX. The stand-in is a module whose implemented ops (`CPU_OPS`) are torch versions of
SGLang's CPU kernels with the same signatures and in-place semantics; any other lowercase
name resolves to a function that raises NotImplementedError naming the op, so an unsupported
path fails loudly at its first call, not at import. Capitalised names, ``scalar_types`` and
submodules do NOT resolve: SGLang probes them to decide whether sgl_kernel's quantization
types exist and must fall back to its own. The stand-in registers nothing under
``torch.ops.sgl_kernel``, so SGLang's AMX weight-packing path stays off.

``torchvision``: SGLang's argument resolution imports ``torchvision.transforms``. Where
torchvision is not installed, a stand-in module answers real imports, while availability
probes (``importlib.util.find_spec``, which transformers uses to decide whether to load its
image processors) still see no torchvision.

Only `install` changes the process (it puts the finders on ``sys.meta_path``); it installs
each finder only where the real package is absent. Nothing here imports torch at module load.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

STANDIN_ATTR = "__oscar_kv_standin__"


# ---------------------------------------------------------------------------- sgl_kernel ops
def assign_req_to_token_pool_cpu(
    req_pool_indices: Any,
    req_to_token: Any,
    start_offset: Any,
    end_offset: Any,
    out_cache_loc: Any,
    pool_len: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[o_i : o_i + n_i]``
    with ``o_i`` the running sum of the earlier requests' ``end - start``."""
    rows, cols, src = _ragged_ranges(req_pool_indices, start_offset, end_offset)
    if src.numel():
        req_to_token[rows, cols] = out_cache_loc[src].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(
    req_pool_indices: Any,
    req_to_token: Any,
    start_offset: Any,
    end_offset: Any,
    out_cache_loc: Any,
    pool_len: int,
) -> None:
    """The gather direction of `assign_req_to_token_pool_cpu`:
    ``out_cache_loc[o_i : o_i + n_i] = req_to_token[req_pool_indices[i], start[i]:end[i]]``."""
    rows, cols, dst = _ragged_ranges(req_pool_indices, start_offset, end_offset)
    if dst.numel():
        out_cache_loc[dst] = req_to_token[rows, cols].to(out_cache_loc.dtype)


def _ragged_ranges(req_pool_indices: Any, start_offset: Any, end_offset: Any) -> tuple:
    """Row, column and flat output index of every token in the ragged ranges."""
    import torch

    start = start_offset.long().flatten()
    lens = (end_offset.long().flatten() - start).clamp_min(0)
    total = int(lens.sum())
    flat = torch.arange(total, dtype=torch.long, device=start.device)
    req = torch.repeat_interleave(torch.arange(lens.numel(), device=start.device), lens)
    first = torch.cumsum(lens, 0) - lens
    cols = start[req] + (flat - first[req])
    rows = req_pool_indices.long().flatten()[req]
    return rows, cols, flat


def copy_all_layer_kv_cache_cpu(data_ptrs: Any, strides: Any, tgt_loc: Any, src_loc: Any) -> None:
    """For every buffer ``b`` (base address ``data_ptrs[b]``, ``strides[b]`` bytes per token
    row): copy row ``src_loc[i]`` to row ``tgt_loc[i]``. All sources are read before any
    target is written, as in SGLang's kernel, so overlapping moves are safe."""
    import ctypes

    import torch

    src = src_loc.long().flatten().cpu()
    tgt = tgt_loc.long().flatten().cpu()
    if src.numel() == 0:
        return
    rows = int(max(int(src.max()), int(tgt.max()))) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        # SGLang hands raw addresses of its own live CPU buffers, each at least
        # (max location + 1) rows of `stride` bytes; the view below covers exactly that.
        raw = (ctypes.c_uint8 * (rows * int(stride))).from_address(int(ptr))
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, int(stride))
        buf[tgt] = buf[src].clone()


CPU_OPS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        assign_req_to_token_pool_cpu,
        assign_extend_cache_locs_cpu,
        copy_all_layer_kv_cache_cpu,
    )
}


def _missing_op(name: str) -> Callable[..., Any]:
    def op(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available on this CPU: oscar-kv's CPU stand-in "
            f"implements only {sorted(CPU_OPS)} (dense Llama/Qwen-style models; MoE, MLA, "
            "speculative decoding and AMX-packed weights are out of scope)"
        )

    op.__name__ = name
    return op


class _SglKernelStandIn(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name[:1].isupper() or name == "scalar_types":
            raise AttributeError(f"module 'sgl_kernel' (oscar-kv CPU stand-in) has no {name!r}")
        op = _missing_op(name)
        setattr(self, name, op)
        return op


# ---------------------------------------------------------------------------- torchvision
class _Missing:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("torchvision is not installed (oscar-kv import stand-in)")

    def __class_getitem__(cls, item: object) -> type:
        return cls


class _TorchvisionStandIn(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if full in sys.modules:
            return sys.modules[full]
        return type(name, (_Missing,), {})


# ---------------------------------------------------------------------------- finders
def _is_probe() -> bool:
    """True when the lookup comes from ``importlib.util.find_spec`` (an availability check)
    rather than from an import statement. Both reach finders through importlib's
    ``_find_spec``; only the caller one frame further up differs."""
    frame = sys._getframe(3)
    return frame.f_globals.get("__name__") == "importlib.util"


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of one absent top-level package with a stand-in module."""

    def __init__(self, package: str, module_type: type[types.ModuleType], *, submodules: bool):
        self.package = package
        self.module_type = module_type
        self.submodules = submodules

    def find_spec(self, name: str, path: object = None, target: object = None):
        if name != self.package and not (self.submodules and name.startswith(self.package + ".")):
            return None
        if _is_probe():
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=self.submodules)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = self.module_type(spec.name)
        setattr(module, STANDIN_ATTR, True)
        if self.submodules:
            module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "sgl_kernel":
            for name, fn in CPU_OPS.items():
                setattr(module, name, fn)

    def __repr__(self) -> str:
        return f"<oscar-kv stand-in finder for {self.package}>"


SGL_KERNEL_FINDER = StandInFinder("sgl_kernel", _SglKernelStandIn, submodules=False)
TORCHVISION_FINDER = StandInFinder("torchvision", _TorchvisionStandIn, submodules=True)


def _absent(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def install() -> list[str]:
    """Puts each stand-in finder on ``sys.meta_path`` where its real package is absent;
    returns the names of the packages stood in for."""
    done = []
    for finder in (SGL_KERNEL_FINDER, TORCHVISION_FINDER):
        if finder in sys.meta_path:
            done.append(finder.package)
        elif _absent(finder.package):
            sys.meta_path.append(finder)
            done.append(finder.package)
    return done


def is_standin(module: types.ModuleType) -> bool:
    return bool(getattr(module, STANDIN_ATTR, False))
