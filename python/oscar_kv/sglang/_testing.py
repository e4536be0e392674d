"""Import SGLang's cache modules on a machine without a GPU stack, for tests and benches.

SGLang 0.5.23 imports ``torchvision.transforms`` from multimodal helpers that
``sglang.srt.mem_cache`` pulls in, and the PyPI torchvision wheel does not match the CPU
torch build here. ``import_sglang_cache()`` installs an import-time stand-in for
torchvision (only when the real one is missing, and only after transformers decided that
torchvision is unavailable, so transformers' image code stays off) and imports the modules
the radix-cache tests and benchmarks use. Nothing here is needed when serving on a GPU
machine with SGLang's own dependencies.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

INSTALL_HINT = (
    "sglang 0.5.23 is not importable; install it with `bash scripts/install_sglang.sh` "
    "(the wheel with --no-deps plus its pinned CPU/server dependencies)"
)


def install_torchvision_standin() -> None:
    """The torchvision stand-in of `oscar_kv.sglang.cpu.standins`, ahead of any installed
    torchvision (which is absent or built for another torch when this is called)."""
    from oscar_kv.sglang.cpu.standins import TORCHVISION_FINDER

    if TORCHVISION_FINDER not in sys.meta_path:
        sys.meta_path.insert(0, TORCHVISION_FINDER)


def _torchvision_usable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def import_sglang_cache() -> types.ModuleType:
    """Imports and returns ``sglang``, with the stand-in if needed; ImportError (with
    install hints) if sglang itself is missing."""
    if importlib.util.find_spec("sglang") is None:
        raise ImportError(INSTALL_HINT)
    if "sglang.srt.mem_cache.radix_cache" not in sys.modules and not _torchvision_usable():
        importlib.import_module("transformers")  # decides torchvision is absent first
        install_torchvision_standin()
    try:
        for name in [
            "sglang.srt.mem_cache.radix_cache",
            "sglang.srt.mem_cache.registry",
            "sglang.srt.mem_cache.common",
            "sglang.srt.managers.schedule_batch",
        ]:
            importlib.import_module(name)
    except ImportError as e:
        # A failed import leaves submodules of "sglang" behind without their parent, and the
        # next attempt then dies with KeyError inside importlib; start clean every time.
        for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
            del sys.modules[name]
        raise ImportError(f"{e}; {INSTALL_HINT}") from e
    return importlib.import_module("sglang")


def bookkeeping_kv_pool(num_tokens: int, page_size: int) -> Any:
    """SGLang's bf16 ``MHATokenToKVPool`` at the smallest shape (one layer, one head of 4):
    what prefix-cache bookkeeping needs from a pool, on the host."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        size=num_tokens,
        page_size=page_size,
        dtype=torch.bfloat16,
        head_num=1,
        head_dim=4,
        layer_num=1,
        device="cpu",
        enable_memory_saver=False,
    )


class SchedulerHarness:
    """Drives an SGLang prefix cache the way the scheduler does, on CPU tensors.

    Real SGLang objects throughout: ``ReqToTokenPool``, a one-layer ``MHATokenToKVPool``,
    ``PagedTokenToKVPoolAllocator``, ``Req``; the cache under test is built from the same
    ``CacheInitParams`` the scheduler would pass. A request is admitted with
    ``match_kv_cache`` + ``lock`` + ``prefix_device_indices`` (as ``init_next_round_input``
    and ``alloc_for_extend`` do), grows by allocating slots (evicting through
    ``evict_from_tree_cache`` first, filling the partial last page before taking new ones,
    like ``alloc_extend``), is checkpointed with ``cache.checkpoint`` and finished with
    ``release_kv_cache``. So every implementation does the allocator bookkeeping the
    scheduler needs: allocation, freeing duplicates and tails, freeing evicted pages.
    """

    def __init__(
        self,
        make_cache,
        num_tokens: int,
        page_size: int = 128,
        max_reqs: int = 64,
        max_context_len: int = 1 << 16,
    ) -> None:
        import_sglang_cache()
        import torch
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=page_size))
        self.page_size = page_size
        self.req_to_token_pool = ReqToTokenPool(
            size=max_reqs, max_context_len=max_context_len, device="cpu", enable_memory_saver=False
        )
        kv = bookkeeping_kv_pool(num_tokens, page_size)
        self.allocator = PagedTokenToKVPoolAllocator(
            num_tokens, page_size, torch.bfloat16, "cpu", kv, need_sort=False
        )
        self.params = CacheInitParams(
            disable=False,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.allocator,
            page_size=page_size,
        )
        self.cache = make_cache(self.params)
        self._rid = 0
        self._torch = torch

    def admit(self, prompt, extra_key=None):
        """A new request over ``prompt`` (array('q')); None if its slots cannot be had."""
        from array import array

        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.mem_cache.common import match_kv_cache
        from sglang.srt.sampling.sampling_params import SamplingParams

        req = Req(
            rid=str(self._rid),
            origin_input_text="",
            origin_input_ids=array("q", prompt),
            sampling_params=SamplingParams(temperature=0, max_new_tokens=1 << 20),
            extra_key=extra_key,
        )
        self._rid += 1
        if self.req_to_token_pool.alloc([req]) is None:
            return None
        req.output_ids = array("q")
        req.full_untruncated_fill_ids = array("q", prompt)
        match_kv_cache(req, self.cache, token_ids=req.origin_input_ids)
        req.kv.cache_protected_len = req.prefix_len
        req.lock = self.cache.lock(req.last_node)
        if req.prefix_len:
            prefix = self.cache.prefix_device_indices(req)
            self.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, req.prefix_len)), prefix)
        req.kv.kv_committed_len = req.kv.kv_allocated_len = req.prefix_len
        if not self._extend(req, len(prompt)):
            if req.kv.kv_allocated_len:
                self.finish(req, insert=False)
            else:
                # Nothing allocated (like a request the scheduler never admitted).
                self.cache.unlock(req.lock)
                req.lock = None
                self.req_to_token_pool.free(req)
            return None
        return req

    def _extend(self, req, new_len: int) -> bool:
        from sglang.srt.mem_cache.common import evict_from_tree_cache

        torch, ps = self._torch, self.page_size
        idx, start = req.kv.req_pool_idx, req.kv.kv_committed_len
        if new_len <= start:
            return True
        row = self.req_to_token_pool.req_to_token[idx]
        pos = start
        if pos % ps:
            k = min(ps - pos % ps, new_len - pos)
            first = int(row[pos - 1]) + 1
            row[pos : pos + k] = torch.arange(first, first + k, dtype=row.dtype)
            pos += k
        rest = new_len - pos
        if rest > 0:
            need = -(-rest // ps) * ps
            evict_from_tree_cache(self.cache, need)
            out = self.allocator.alloc(need)
            if out is None:
                req.kv.kv_committed_len = req.kv.kv_allocated_len = pos
                return False
            self.req_to_token_pool.write((idx, slice(pos, new_len)), out[:rest])
        req.kv.kv_committed_len = req.kv.kv_allocated_len = new_len
        return True

    def generate(self, req, tokens) -> bool:
        """Appends output tokens (their KV slots); False if the pool ran out."""
        req.output_ids.extend(tokens)
        req.refresh_fill_ids()
        return self._extend(req, len(req.origin_input_ids) + len(req.output_ids))

    def checkpoint(self, req) -> None:
        """Publishes what the request computed so far (chunked prefill / decode step)."""
        req.refresh_fill_ids()
        self.cache.checkpoint(req, up_to=req.kv.kv_committed_len)
        # The scheduler's invariant after a checkpoint: the row's protected part is the
        # locked node's path (the tree's pages, duplicates repointed).
        n = req.kv.cache_protected_len
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :n]
        path = self.cache.path_device_indices(req.last_node)
        assert row.tolist() == path.tolist(), f"request {req.rid}: row is not the tree's path"

    def finish(self, req, insert: bool = True) -> None:
        from sglang.srt.mem_cache.common import release_kv_cache

        # Output tokens whose slots could not be allocated are not part of the KV.
        committed = req.kv.kv_committed_len
        n_out = max(0, committed - len(req.origin_input_ids))
        del req.output_ids[n_out:]
        req.refresh_fill_ids()
        release_kv_cache(req, self.cache, checkpoint=insert)

    def evict(self, num_tokens: int) -> int:
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        return self.cache.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted

    def available(self) -> int:
        return self.allocator.available_size()
