"""Byte-layout math of oscar-kv's packed KV-cache pages and the cache manager (Rust core,
``rust/oscar-core``): page allocator, radix prefix tree, prefix cache, pool page offsets.

A page holds 128 tokens of one layer as seven contiguous sections: k_codes, v_codes,
k_scale, k_zero, v_scale, v_zero, norms. Bad arguments raise ValueError naming the argument.
"""

from array import array
from collections.abc import Sequence
from typing import Any, Final, Literal, Protocol, TypeAlias

__version__: Final[str]
BLOCK_TOKENS: Final[int]

_Norm: TypeAlias = Literal["token", "head", "none"]

def bytes_per_token(
    kv_heads: int,
    head_dim: int,
    bits: int = 2,
    k_group: int = 32,
    v_group: int = 32,
    norm: _Norm = "token",
) -> float:
    """Bytes per cached token of one layer (page_bytes / 128); 772.0 for (8, 128)."""

def page_bytes(
    kv_heads: int,
    head_dim: int,
    bits: int = 2,
    k_group: int = 32,
    v_group: int = 32,
    norm: _Norm = "token",
) -> int:
    """Bytes of one packed 128-token page of one layer."""

def page_sections(
    kv_heads: int,
    head_dim: int,
    bits: int = 2,
    k_group: int = 32,
    v_group: int = 32,
    norm: _Norm = "token",
) -> list[tuple[str, int, int]]:
    """The seven sections of a page as (name, offset, nbytes), in storage order."""

def bf16_bytes_per_token(kv_heads: int, head_dim: int) -> int:
    """Bytes per token of one layer of a bf16 cache: 4 * kv_heads * head_dim."""

# ----- cache manager (rust/oscar-core: allocator, radix tree, prefix cache, pool layout) -----
#
# Token ids and page ids are passed as 1-D int arrays (numpy int32/int64, array.array('q'),
# memoryview: read straight from the buffer) or sequences of ints. Page ids come back as
# array.array('q') (wrap with numpy.frombuffer / torch.frombuffer, no copy). Node handles are
# ints; ROOT_NODE is the root of every namespace (locking it is a no-op). Calls that take
# token ids read contiguous int64/int32/uint32 buffers in place and hold the GIL meanwhile;
# reset and check_invariants release it. A failed call changes nothing.

class _IntBuffer(Protocol):
    def __buffer__(self, flags: int, /) -> memoryview: ...

_Ints: TypeAlias = _IntBuffer | Sequence[int]

ROOT_NODE: Final[int]

class OutOfPages(RuntimeError):
    """The page pool has fewer free pages than requested (evict or free first)."""

class InvalidPage(ValueError):
    """A page id out of range, freed twice, reserved, a companion, or owned by the tree."""

class InvalidNode(ValueError):
    """A node handle that does not name a live node (evicted, reset, or made up)."""

class LockUnderflow(ValueError):
    """unlock() on a node that holds no lock."""

_Placement: TypeAlias = tuple[array[int], bool, array[int], array[int]]

class PageAllocator:
    """Reference-counted allocator of page ids reserved..num_pages, with companion pages
    (extra pages of a page, freed with it)."""

    def __init__(self, num_pages: int, reserved: int = 0) -> None: ...
    @property
    def num_pages(self) -> int: ...
    @property
    def reserved(self) -> int: ...
    @property
    def available(self) -> int: ...
    @property
    def companion_pages(self) -> int: ...
    def alloc(self, n: int) -> array[int]:
        """n pages with count 1; OutOfPages (nothing taken) if fewer are free."""
    def alloc_tokens(self, n: int, page_size: int) -> array[int]:
        """n pages as their token locations (page * page_size + slot)."""
    def alloc_token_buffer(self, n: int, page_size: int) -> bytearray:
        """alloc_tokens as a bytearray of native int64 (one allocation, for torch.frombuffer)."""
    def alloc_companions(self, owners: _Ints, per_page: int) -> array[int]:
        """per_page companions for each owner (allocated, none yet), in owner order."""
    def companions_of(self, page: int) -> array[int]: ...
    def companion_counts(self, pages: _Ints) -> array[int]: ...
    def count_companions(self, pages: _Ints) -> int: ...
    def alloc_extend(
        self, prefix_lens: _Ints, seq_lens: _Ints, page_size: int, companions: int = 0
    ) -> _Placement:
        """SGLang's paged alloc_extend on host lengths: (placement, continuing, first_pages,
        companions); token t's location is placement[t] + (last_loc_padded[placement[n + t]]
        + 1), last_loc padded with -1 at index n_requests. OutOfPages: nothing taken."""
    def alloc_decode(self, seq_lens: _Ints, page_size: int, companions: int = 0) -> _Placement:
        """One token per request (seq_lens after it), as alloc_extend."""
    def free(self, pages: _Ints) -> None:
        """Drops one reference per listed page (companions go with it); InvalidPage on a
        double free, a reserved page or a companion (nothing freed)."""
    def free_tokens(self, locations: _Ints, page_size: int) -> None:
        """Frees the pages of token locations, each page once."""
    def retain(self, pages: _Ints) -> None: ...
    def refcount(self, page: int) -> int: ...
    def free_list(self) -> array[int]: ...
    def sort_free(self) -> None:
        """The lowest free ids go out first."""
    def backup(self) -> PageAllocator: ...
    def restore(self, state: PageAllocator) -> None: ...
    def reset(self) -> None: ...
    def check_invariants(self) -> None: ...

class _TreeView:
    """Methods shared by RadixTree and PrefixCache."""

    @property
    def page_size(self) -> int: ...
    @property
    def num_pages(self) -> int: ...
    @property
    def num_nodes(self) -> int: ...
    @property
    def evictable_pages(self) -> int: ...
    @property
    def protected_pages(self) -> int: ...
    @property
    def total_pages(self) -> int: ...
    def match_prefix(
        self,
        tokens: _Ints,
        namespace: str | None = None,
        limit: int | None = None,
        lock: bool = False,
    ) -> tuple[array[int], int, int]:
        """(pages, matched_tokens, node) of the longest cached page-aligned prefix;
        lock=True also locks node in the same step."""
    def match_len(
        self, tokens: _Ints, namespace: str | None = None, limit: int | None = None
    ) -> tuple[int, int]:
        """(matched_tokens, node), without the page ids."""
    def partial_child(
        self, node: int, rest: _Ints, namespace: str | None = None
    ) -> tuple[int, int] | None:
        """(page, run): the child of node (a match's end; ROOT_NODE with namespace) whose
        first page starts with the longest run (< page_size) of rest's leading tokens."""
    def lock(self, node: int) -> int:
        """Protects the path to node; returns the pages that became protected."""
    def unlock(self, node: int) -> int:
        """Releases one lock; LockUnderflow if none is held."""
    def lock_ref(self, node: int) -> int: ...
    def path_pages(self, node: int) -> array[int]: ...
    def path_token_indices(self, node: int) -> array[int]:
        """page * page_size + slot for every token on the path (SGLang KV indices)."""
    def path_token_buffer(self, node: int) -> bytearray:
        """path_token_indices as a bytearray of native int64 (one allocation, for
        torch.frombuffer)."""
    def depth_tokens(self, node: int) -> int: ...
    def contains_page(self, page: int) -> bool: ...
    def nodes(self) -> list[dict[str, Any]]:
        """Every node, parent first: node, parent, namespace, depth_tokens, num_tokens,
        first_tokens, pages, lock_ref, last_access, num_children."""
    def check_invariants(self) -> None:
        """RuntimeError naming the first broken invariant."""

class RadixTree(_TreeView):
    """Radix tree over whole pages of token ids with SGLang RadixCache semantics (LRU on a
    logical clock, whole-leaf eviction), namespaced. Never frees pages itself."""

    def __init__(self, num_pages: int, page_size: int = 128) -> None: ...
    def insert(
        self,
        tokens: _Ints,
        pages: _Ints,
        namespace: str | None = None,
        limit: int | None = None,
        weights: _Ints | None = None,
        kv_row: bool = False,
    ) -> tuple[int, array[int], int]:
        """(prefix_tokens, duplicates, node); the caller frees `duplicates`. `weights`: one
        (>= 1) per page, what an adopted page counts for in sizes, locks and eviction.
        `kv_row`: the pages are a request's KV row for these tokens; the tree's own pages at
        the same positions are taken as its prefix without comparing tokens again."""
    def insert_locations(
        self,
        tokens: _Ints,
        locations: _Ints,
        namespace: str | None = None,
        limit: int | None = None,
        weights: _Ints | None = None,
    ) -> tuple[int, array[int] | None, int]:
        """insert with the key's KV locations (at least as many as whole-page tokens) for the
        pages: page i is locations[i * page_size] // page_size, read in place. duplicates is
        None when there are none. The locations are a KV row (as insert's kv_row=True)."""
    def checkpoint_row(
        self,
        tokens: _Ints,
        locations: _Ints,
        namespace: str | None = None,
        limit: int | None = None,
        split_at: int = 0,
        unlock: int = ...,
    ) -> tuple[int, array[int] | None, int]:
        """SGLang's checkpoint of a KV row in one call: insert_locations of the first
        `limit` tokens, the re-insert of the first `split_at` (the prompt split), the key's
        path stamped, the request's lock moved from `unlock` (default ROOT_NODE: none) to
        the key's node. Returns insert_locations's triple."""
    def touch_path(self, node: int) -> None:
        """Stamps the path to `node` as just used, as a match ending there would."""
    def evict(self, num_pages: int) -> array[int]:
        """Evicted page ids (LRU unlocked leaves, whole leaves); the caller frees them."""
    def reset(self) -> array[int]:
        """Every page the tree held; all handles become invalid."""

class PrefixCache(_TreeView):
    """PageAllocator + RadixTree over the same pages: a page is free, in the tree, or held
    by a request."""

    def __init__(self, num_pages: int, page_size: int = 128) -> None: ...
    @property
    def available(self) -> int: ...
    def alloc(self, n: int, evict: bool = False) -> array[int]: ...
    def free(self, pages: _Ints) -> None:
        """InvalidPage (nothing freed) for tree pages, free pages, ids out of range."""
    def refcount(self, page: int) -> int: ...
    def insert(
        self,
        tokens: _Ints,
        pages: _Ints,
        namespace: str | None = None,
        limit: int | None = None,
    ) -> tuple[int, array[int], int]:
        """(prefix_tokens, freed_duplicates, node); duplicates are already freed."""
    def admit(
        self,
        tokens: _Ints,
        total_tokens: int,
        namespace: str | None = None,
        limit: int | None = None,
    ) -> tuple[array[int], int, int, int]:
        """Match the prompt (first `limit` tokens), lock it, evict the shortfall, allocate
        pages for total_tokens: (pages, matched_tokens, node, evicted_pages)."""
    def release(
        self,
        tokens: _Ints,
        pages: _Ints,
        node: int,
        namespace: str | None = None,
        insert: bool = True,
        limit: int | None = None,
    ) -> int:
        """Insert the request's whole pages (if insert), free its other pages, unlock node;
        returns the tokens that were already cached."""
    def evict(self, num_pages: int) -> int:
        """Number of pages evicted and freed."""
    def reset(self) -> None: ...
    def check_all_invariants(self) -> None: ...

class PoolLayout:
    """Byte offsets of a packed pool: one buffer per layer of num_pages pages."""

    def __init__(
        self,
        kv_heads: int,
        head_dim: int,
        num_layers: int,
        num_pages: int,
        bits: int = 2,
        k_group: int = 32,
        v_group: int = 32,
        norm: _Norm = "token",
    ) -> None: ...
    @staticmethod
    def pages_for_budget(
        budget_bytes: int,
        kv_heads: int,
        head_dim: int,
        num_layers: int,
        bits: int = 2,
        k_group: int = 32,
        v_group: int = 32,
        norm: _Norm = "token",
    ) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_pages(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def page_bytes(self) -> int: ...
    @property
    def layer_bytes(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    def sections(self) -> list[tuple[str, int, int]]: ...
    def page_offset(self, page: int) -> int: ...
    def global_offset(self, layer: int, page: int) -> int: ...
    def section_range(self, page: int, section: str) -> tuple[int, int]: ...
    def section_offsets(self, pages: _Ints, section: str) -> array[int]: ...
