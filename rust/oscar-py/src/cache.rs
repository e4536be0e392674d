//! Python classes over the cache manager of `oscar_core`: `PageAllocator`, `RadixTree`,
//! `PrefixCache` (the two together) and `PoolLayout` (page offsets of the packed pool).
//!
//! Token ids and page ids come in as int arrays (read from the buffer, no Python object per
//! element) or sequences; page ids go out as `array.array('q')`. Node handles are Python
//! ints (`ROOT_NODE` for the root). Calls that take token ids read the caller's buffer in
//! place and so keep the GIL (no Python thread can change the buffer under the walk); so do
//! the other short calls, for which releasing it costs more than the call. Long walks
//! (`reset`, `check_invariants`, allocator scans) release it. A mutex serializes threads
//! sharing one object. Errors are typed: `OutOfPages` (RuntimeError), `InvalidPage`, `InvalidNode`,
//! `LockUnderflow` (ValueErrors), plain ValueError / TypeError for other bad arguments; a
//! failed call changes nothing.

use oscar_core::{CacheError, ErrorKind, NodeHandle, PageId, PoolLayout as CorePool};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Mutex, MutexGuard};

use crate::buffer::{
    int64_array, int64_array_from, ints, token_index_bytearray, with_keys, TokenIds,
};

create_exception!(
    _native,
    OutOfPages,
    PyRuntimeError,
    "The page pool has fewer free pages than requested (evict or free first)."
);
create_exception!(
    _native,
    InvalidPage,
    PyValueError,
    "A page id out of range, freed twice, reserved, a companion, or owned by the radix tree."
);
create_exception!(
    _native,
    InvalidNode,
    PyValueError,
    "A node handle that does not name a live node (evicted, split away by reset, or made up)."
);
create_exception!(
    _native,
    LockUnderflow,
    PyValueError,
    "unlock() on a node that holds no lock."
);

/// The typed Python exception of a core error.
pub(crate) fn cache_error(e: CacheError) -> PyErr {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::OutOfPages => OutOfPages::new_err(msg),
        ErrorKind::InvalidPage => InvalidPage::new_err(msg),
        ErrorKind::InvalidNode => InvalidNode::new_err(msg),
        ErrorKind::LockUnderflow => LockUnderflow::new_err(msg),
        ErrorKind::InvalidArgument => PyValueError::new_err(msg),
    }
}

fn count(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {v}")))
}

fn limit_arg(limit: Option<i64>) -> PyResult<Option<usize>> {
    limit.map(|l| count("limit", l)).transpose()
}

/// Page ids as `u32`, each below `num_pages`.
fn page_ids(obj: &PyAny, num_pages: usize) -> PyResult<Vec<PageId>> {
    ints(obj, "pages")?
        .into_iter()
        .map(|p| {
            u32::try_from(p)
                .ok()
                .filter(|&q| (q as usize) < num_pages)
                .ok_or_else(|| cache_error(CacheError::PageOutOfRange { page: p, num_pages }))
        })
        .collect()
}

/// Per-page weights as `u32` (the core checks that each is >= 1).
fn weight_list(w: &PyAny) -> PyResult<Vec<u32>> {
    ints(w, "weights")?
        .into_iter()
        .map(|x| {
            u32::try_from(x)
                .map_err(|_| PyValueError::new_err(format!("weights must be in 1..2^32, got {x}")))
        })
        .collect()
}

fn page_array(py: Python<'_>, pages: &[PageId]) -> PyResult<PyObject> {
    int64_array(py, pages.len(), pages.iter().map(|&p| p as i64))
}

/// Token locations `page * page_size + slot` of `pages`, in order.
fn token_index_array(py: Python<'_>, pages: &[PageId], page_size: usize) -> PyResult<PyObject> {
    let ps = page_size as i64;
    let mut locs = Vec::with_capacity(pages.len() * page_size);
    for &p in pages {
        let base = p as i64 * ps;
        locs.extend(base..base + ps);
    }
    int64_array_from(py, &locs)
}

fn nodes_list(py: Python<'_>, tree: &oscar_core::RadixTree) -> PyResult<Vec<PyObject>> {
    let ps = tree.page_size();
    let mut out = Vec::new();
    for n in tree.nodes() {
        let d = PyDict::new(py);
        d.set_item("node", n.handle.raw())?;
        d.set_item("parent", n.parent.raw())?;
        d.set_item("namespace", n.namespace)?;
        d.set_item("depth_tokens", n.depth_pages * ps)?;
        d.set_item("num_tokens", n.tokens.len())?;
        d.set_item("first_tokens", &n.tokens[..n.tokens.len().min(8)])?;
        d.set_item("pages", n.pages.to_vec())?;
        d.set_item("lock_ref", n.lock_ref)?;
        d.set_item("last_access", n.last_access)?;
        d.set_item("num_children", n.num_children)?;
        out.push(d.into());
    }
    Ok(out)
}

/// `(prefix_tokens, duplicates or None, node)` of a KV-row insert.
fn row_outcome(
    py: Python<'_>,
    out: oscar_core::InsertOutcome,
    ps: usize,
) -> PyResult<(usize, Option<PyObject>, u64)> {
    let dups = if out.duplicates.is_empty() {
        None
    } else {
        Some(page_array(py, &out.duplicates)?)
    };
    Ok((out.prefix_pages * ps, dups, out.node.raw()))
}

fn invariants(r: Result<(), String>) -> PyResult<()> {
    r.map_err(|e| PyRuntimeError::new_err(format!("invariant broken: {e}")))
}

/// A batch's new token locations: `(placement, continuing, first_pages, companions)` with
/// `placement` an `array('q')` of `2 * tokens`: the values, then the owners
/// (`oscar_core::allocator::Placement`).
type PlacementOut = (PyObject, bool, PyObject, PyObject);

fn placement_out(py: Python<'_>, p: oscar_core::Placement) -> PyResult<PlacementOut> {
    let n = p.values.len() + p.owners.len();
    let both = p.values.iter().chain(p.owners.iter()).copied();
    Ok((
        int64_array(py, n, both)?,
        p.continuing,
        page_array(py, &p.first_pages)?,
        page_array(py, &p.companions)?,
    ))
}

fn page_size_arg(page_size: i64) -> PyResult<usize> {
    count("page_size", page_size)
}

/// Reference-counted allocator of page ids reserved..num_pages, with companion pages.
#[pyclass(module = "oscar_kv._native")]
#[pyo3(text_signature = "(num_pages, reserved=0)")]
pub struct PageAllocator {
    inner: oscar_core::PageAllocator,
}

impl PageAllocator {
    fn pages(&self, pages: &PyAny) -> PyResult<Vec<PageId>> {
        page_ids(pages, self.inner.num_pages())
    }
}

#[pymethods]
impl PageAllocator {
    #[new]
    #[args(reserved = "0")]
    fn new(num_pages: i64, reserved: i64) -> PyResult<Self> {
        let n = count("num_pages", num_pages)?;
        let r = count("reserved", reserved)?;
        Ok(PageAllocator {
            inner: oscar_core::PageAllocator::with_reserved(n, r).map_err(cache_error)?,
        })
    }

    /// Pool size (reserved pages included).
    #[getter]
    fn num_pages(&self) -> usize {
        self.inner.num_pages()
    }

    /// Pages below this id are never handed out.
    #[getter]
    fn reserved(&self) -> usize {
        self.inner.reserved()
    }

    /// Free pages.
    #[getter]
    fn available(&self) -> usize {
        self.inner.available()
    }

    /// Companion pages allocated now.
    #[getter]
    fn companion_pages(&self) -> usize {
        self.inner.companion_pages()
    }

    /// Allocates n pages (count 1 each); OutOfPages if fewer are free (nothing taken).
    #[pyo3(text_signature = "($self, n)")]
    fn alloc(&mut self, py: Python<'_>, n: i64) -> PyResult<PyObject> {
        let pages = self.inner.alloc(count("n", n)?).map_err(cache_error)?;
        page_array(py, &pages)
    }

    /// Allocates n pages and returns their token locations (page * page_size + slot).
    #[pyo3(text_signature = "($self, n, page_size)")]
    fn alloc_tokens(&mut self, py: Python<'_>, n: i64, page_size: i64) -> PyResult<PyObject> {
        let ps = page_size_arg(page_size)?;
        let pages = self.inner.alloc(count("n", n)?).map_err(cache_error)?;
        token_index_array(py, &pages, ps)
    }

    /// `alloc_tokens` as a `bytearray` of native int64 (one allocation, no copy).
    #[pyo3(text_signature = "($self, n, page_size)")]
    fn alloc_token_buffer(&mut self, py: Python<'_>, n: i64, page_size: i64) -> PyResult<PyObject> {
        let ps = page_size_arg(page_size)?;
        let pages = self.inner.alloc(count("n", n)?).map_err(cache_error)?;
        token_index_bytearray(py, &pages, ps)
    }

    /// Gives each owner (allocated, without companions) per_page companions; returns them.
    #[pyo3(text_signature = "($self, owners, per_page)")]
    fn alloc_companions(
        &mut self,
        py: Python<'_>,
        owners: &PyAny,
        per_page: i64,
    ) -> PyResult<PyObject> {
        let owners = self.pages(owners)?;
        let comp = self
            .inner
            .alloc_companions(&owners, count("per_page", per_page)?)
            .map_err(cache_error)?;
        page_array(py, &comp)
    }

    /// Companions of a page (empty if none).
    #[pyo3(text_signature = "($self, page)")]
    fn companions_of(&self, py: Python<'_>, page: i64) -> PyResult<PyObject> {
        let p = u32::try_from(page).unwrap_or(u32::MAX);
        page_array(py, self.inner.companions_of(p))
    }

    /// Companions of each listed page.
    #[pyo3(text_signature = "($self, pages)")]
    fn companion_counts(&self, py: Python<'_>, pages: &PyAny) -> PyResult<PyObject> {
        let pages = self.pages(pages)?;
        let counts: Vec<i64> = pages
            .iter()
            .map(|&p| self.inner.companions_of(p).len() as i64)
            .collect();
        int64_array_from(py, &counts)
    }

    /// Total companions of the listed pages.
    #[pyo3(text_signature = "($self, pages)")]
    fn count_companions(&self, pages: &PyAny) -> PyResult<usize> {
        let pages = self.pages(pages)?;
        Ok(pages
            .iter()
            .map(|&p| self.inner.companions_of(p).len())
            .sum())
    }

    /// Pages for an extend batch from host lengths: `(placement, continuing, first_pages,
    /// companions)`; token t's location is `placement[t] + (last_loc[placement[n + t]] + 1)`
    /// with last_loc padded by one 0 - 1 entry (owner == batch size: no continuation).
    /// OutOfPages (nothing taken) if the pages, companions included, are not free.
    #[args(companions = "0")]
    #[pyo3(text_signature = "($self, prefix_lens, seq_lens, page_size, companions=0)")]
    fn alloc_extend(
        &mut self,
        py: Python<'_>,
        prefix_lens: &PyAny,
        seq_lens: &PyAny,
        page_size: i64,
        companions: i64,
    ) -> PyResult<PlacementOut> {
        let prefix = ints(prefix_lens, "prefix_lens")?;
        let seq = ints(seq_lens, "seq_lens")?;
        let p = self
            .inner
            .alloc_extend(
                &prefix,
                &seq,
                page_size_arg(page_size)?,
                count("companions", companions)?,
            )
            .map_err(cache_error)?;
        placement_out(py, p)
    }

    /// One new token per request (seq_lens after it): as `alloc_extend`.
    #[args(companions = "0")]
    #[pyo3(text_signature = "($self, seq_lens, page_size, companions=0)")]
    fn alloc_decode(
        &mut self,
        py: Python<'_>,
        seq_lens: &PyAny,
        page_size: i64,
        companions: i64,
    ) -> PyResult<PlacementOut> {
        let seq = ints(seq_lens, "seq_lens")?;
        let p = self
            .inner
            .alloc_decode(
                &seq,
                page_size_arg(page_size)?,
                count("companions", companions)?,
            )
            .map_err(cache_error)?;
        placement_out(py, p)
    }

    /// Drops one reference per listed page (companions go with their owner); InvalidPage on
    /// a double free, a reserved page or a companion (nothing freed).
    #[pyo3(text_signature = "($self, pages)")]
    fn free(&mut self, pages: &PyAny) -> PyResult<()> {
        let pages = self.pages(pages)?;
        self.inner.free(&pages).map_err(cache_error)
    }

    /// Frees the pages of token locations (each page once, however many of its tokens are
    /// listed), as SGLang's `free(unique(locs // page_size))`.
    #[pyo3(text_signature = "($self, locations, page_size)")]
    fn free_tokens(&mut self, locations: &PyAny, page_size: i64) -> PyResult<()> {
        let ps = page_size_arg(page_size)?.max(1) as i64;
        let n = self.inner.num_pages();
        let mut pages = ints(locations, "locations")?
            .into_iter()
            .map(|loc| {
                let page = loc.div_euclid(ps);
                u32::try_from(page)
                    .ok()
                    .filter(|&q| (q as usize) < n)
                    .ok_or_else(|| cache_error(CacheError::PageOutOfRange { page, num_pages: n }))
            })
            .collect::<PyResult<Vec<PageId>>>()?;
        pages.sort_unstable();
        pages.dedup();
        self.inner.free(&pages).map_err(cache_error)
    }

    /// Adds one reference per listed (allocated) page.
    #[pyo3(text_signature = "($self, pages)")]
    fn retain(&mut self, pages: &PyAny) -> PyResult<()> {
        let pages = self.pages(pages)?;
        self.inner.retain(&pages).map_err(cache_error)
    }

    /// Reference count of a page (0 = free).
    #[pyo3(text_signature = "($self, page)")]
    fn refcount(&self, page: i64) -> PyResult<u32> {
        let n = self.inner.num_pages();
        let p = u32::try_from(page)
            .map_err(|_| cache_error(CacheError::PageOutOfRange { page, num_pages: n }))?;
        self.inner.refcount(p).map_err(cache_error)
    }

    /// The free pages, the next to go out last.
    fn free_list(&self, py: Python<'_>) -> PyResult<PyObject> {
        page_array(py, self.inner.free_list())
    }

    /// Orders the free list so that the lowest ids go out first.
    fn sort_free(&mut self) {
        self.inner.sort_free()
    }

    /// A copy of the whole state, for `restore`.
    fn backup(&self) -> PageAllocator {
        PageAllocator {
            inner: self.inner.clone(),
        }
    }

    /// Puts back a state taken by `backup` (of an allocator of the same size).
    #[pyo3(text_signature = "($self, state)")]
    fn restore(&mut self, state: &PageAllocator) -> PyResult<()> {
        if state.inner.num_pages() != self.inner.num_pages() {
            return Err(PyValueError::new_err(format!(
                "state has {} pages, this allocator {}",
                state.inner.num_pages(),
                self.inner.num_pages()
            )));
        }
        self.inner = state.inner.clone();
        Ok(())
    }

    /// Frees every page and forgets every companion.
    fn reset(&mut self) {
        self.inner.reset()
    }

    /// Raises RuntimeError if the free list, the counts and the companions disagree.
    fn check_invariants(&self) -> PyResult<()> {
        invariants(self.inner.check_invariants())
    }

    fn __repr__(&self) -> String {
        format!(
            "PageAllocator(num_pages={}, reserved={}, available={}, companions={})",
            self.inner.num_pages(),
            self.inner.reserved(),
            self.inner.available(),
            self.inner.companion_pages()
        )
    }
}

fn poisoned() -> PyErr {
    PyRuntimeError::new_err("the cache is unusable: an earlier call panicked while changing it")
}

/// Runs `f` on the locked state with the GIL released. Waiting for the lock happens without
/// the GIL too, and `f` never needs the GIL, so a thread holding the lock never waits for
/// one holding the GIL: no deadlock. Concurrent callers are serialized, not refused.
fn walk<T: Send, R: Send>(
    py: Python<'_>,
    state: &Mutex<T>,
    f: impl FnOnce(&mut T) -> R + Send,
) -> PyResult<R> {
    py.allow_threads(|| {
        let mut g = state.lock().map_err(|_| poisoned())?;
        Ok(f(&mut g))
    })
}

/// Runs `f` on the locked state with the GIL held: for calls that read a caller's buffer in
/// place (`TokenIds`), which no Python thread may change meanwhile, and for calls too short
/// to pay for releasing the GIL. No deadlock with `walk`: whoever holds the mutex there
/// never waits for the GIL.
fn locked<T, R>(state: &Mutex<T>, f: impl FnOnce(&mut T) -> R) -> PyResult<R> {
    Ok(f(&mut *state.lock().map_err(|_| poisoned())?))
}

/// The locked state, for short reads under the GIL.
fn read<T>(state: &Mutex<T>) -> PyResult<MutexGuard<'_, T>> {
    state.lock().map_err(|_| poisoned())
}

/// Generates the `#[pymethods]` block of `RadixTree` and `PrefixCache`: the methods both
/// share, written once over `$view(&state)` (a `&oscar_core::RadixTree`), plus the class's
/// own methods passed as `$extra` (pyo3 0.17 allows a single `#[pymethods]` block per class
/// without its `multiple-pymethods` feature).
macro_rules! tree_methods {
    ($ty:ident, $view:expr, { $($extra:tt)* }) => {
        #[pymethods]
        impl $ty {
            $($extra)*

            /// Tokens per page.
            #[getter]
            fn page_size(&self) -> PyResult<usize> {
                Ok($view(&*read(&self.inner)?).page_size())
            }

            /// Size of the page-id space.
            #[getter]
            fn num_pages(&self) -> PyResult<usize> {
                Ok($view(&*read(&self.inner)?).num_pages())
            }

            /// Live tree nodes (roots excluded).
            #[getter]
            fn num_nodes(&self) -> PyResult<usize> {
                Ok($view(&*read(&self.inner)?).num_nodes())
            }

            /// Pages in unlocked nodes.
            #[getter]
            fn evictable_pages(&self) -> PyResult<usize> {
                Ok($view(&*read(&self.inner)?).sizes().evictable)
            }

            /// Pages in locked nodes.
            #[getter]
            fn protected_pages(&self) -> PyResult<usize> {
                Ok($view(&*read(&self.inner)?).sizes().protected)
            }

            /// All pages in the tree.
            #[getter]
            fn total_pages(&self) -> PyResult<usize> {
                Ok($view(&*read(&self.inner)?).sizes().total)
            }

            /// Longest cached page-aligned prefix of the first `limit` token ids:
            /// `(pages, matched_tokens, node)`. Marks the path used; lock `node` to keep it
            /// (`lock=True` takes the lock in the same step, so no other thread can evict
            /// the match in between).
            #[args(namespace = "None", limit = "None", lock = "false")]
            #[pyo3(text_signature = "($self, tokens, namespace=None, limit=None, lock=False)")]
            fn match_prefix(
                &self,
                py: Python<'_>,
                tokens: &PyAny,
                namespace: Option<&str>,
                limit: Option<i64>,
                lock: bool,
            ) -> PyResult<(PyObject, usize, u64)> {
                let ids = TokenIds::get(tokens, limit_arg(limit)?)?;
                let (pages, node, ps) = locked(&self.inner, |c| {
                    let mut pages = Vec::new();
                    let node =
                        with_keys!(ids.keys(), |k| c.match_prefix_into(namespace, k, &mut pages));
                    let locked = if lock { c.lock(node).map(|_| ()) } else { Ok(()) };
                    locked.map(|()| (pages, node, $view(&*c).page_size()))
                })?
                .map_err(cache_error)?;
                Ok((page_array(py, &pages)?, pages.len() * ps, node.raw()))
            }

            /// Like `match_prefix` without the page ids: `(matched_tokens, node)`.
            #[args(namespace = "None", limit = "None")]
            #[pyo3(text_signature = "($self, tokens, namespace=None, limit=None)")]
            fn match_len(
                &self,
                tokens: &PyAny,
                namespace: Option<&str>,
                limit: Option<i64>,
            ) -> PyResult<(usize, u64)> {
                let ids = TokenIds::get(tokens, limit_arg(limit)?)?;
                let (matched, node) = locked(&self.inner, |c| {
                    let mut pages = Vec::new();
                    let node =
                        with_keys!(ids.keys(), |k| c.match_prefix_into(namespace, k, &mut pages));
                    (pages.len() * $view(&*c).page_size(), node)
                })?;
                Ok((matched, node.raw()))
            }

            /// `(page, run)`: the child of `node` (a match's end; ROOT_NODE with `namespace`)
            /// whose first page starts with the longest run (< page_size) of `rest`'s
            /// leading tokens, or None. Read-only.
            #[args(namespace = "None")]
            #[pyo3(text_signature = "($self, node, rest, namespace=None)")]
            fn partial_child(
                &self,
                node: u64,
                rest: &PyAny,
                namespace: Option<&str>,
            ) -> PyResult<Option<(u32, usize)>> {
                let ids = TokenIds::get(rest, None)?;
                let g = read(&self.inner)?;
                let node = NodeHandle::from_raw(node);
                with_keys!(ids.keys(), |k| $view(&*g).partial_child(node, namespace, k))
                    .map_err(cache_error)
            }

            /// Locks the path to `node` (no eviction until `unlock`); returns the pages that
            /// became protected. No-op on ROOT_NODE.
            #[pyo3(text_signature = "($self, node)")]
            fn lock(&self, node: u64) -> PyResult<usize> {
                locked(&self.inner, |c| c.lock(NodeHandle::from_raw(node)))?
                    .map_err(cache_error)
            }

            /// Releases one lock on `node`; LockUnderflow if it holds none (nothing changed).
            #[pyo3(text_signature = "($self, node)")]
            fn unlock(&self, node: u64) -> PyResult<usize> {
                locked(&self.inner, |c| c.unlock(NodeHandle::from_raw(node)))?
                    .map_err(cache_error)
            }

            /// Locks held on `node`.
            #[pyo3(text_signature = "($self, node)")]
            fn lock_ref(&self, node: u64) -> PyResult<u32> {
                $view(&*read(&self.inner)?)
                    .lock_ref(NodeHandle::from_raw(node))
                    .map_err(cache_error)
            }

            /// Page ids on the path from the root to `node`.
            #[pyo3(text_signature = "($self, node)")]
            fn path_pages(&self, py: Python<'_>, node: u64) -> PyResult<PyObject> {
                let pages = walk(py, &self.inner, |c| {
                    $view(&*c).path_pages(NodeHandle::from_raw(node))
                })?
                .map_err(cache_error)?;
                page_array(py, &pages)
            }

            /// Token locations (page * page_size + slot) of the path to `node`: SGLang's KV
            /// indices of the cached prefix.
            #[pyo3(text_signature = "($self, node)")]
            fn path_token_indices(&self, py: Python<'_>, node: u64) -> PyResult<PyObject> {
                let (pages, ps) = walk(py, &self.inner, |c| {
                    let t = $view(&*c);
                    t.path_pages(NodeHandle::from_raw(node)).map(|p| (p, t.page_size()))
                })?
                .map_err(cache_error)?;
                token_index_array(py, &pages, ps)
            }

            /// `path_token_indices` as a `bytearray` of native int64 (one allocation, no
            /// copy; what `torch.frombuffer` wraps).
            #[pyo3(text_signature = "($self, node)")]
            fn path_token_buffer(&self, py: Python<'_>, node: u64) -> PyResult<PyObject> {
                let (pages, ps) = locked(&self.inner, |c| {
                    let t = $view(&*c);
                    t.path_pages(NodeHandle::from_raw(node)).map(|p| (p, t.page_size()))
                })?
                .map_err(cache_error)?;
                token_index_bytearray(py, &pages, ps)
            }

            /// Tokens on the path from the root to `node`.
            #[pyo3(text_signature = "($self, node)")]
            fn depth_tokens(&self, py: Python<'_>, node: u64) -> PyResult<usize> {
                walk(py, &self.inner, |c| {
                    let t = $view(&*c);
                    t.depth_pages(NodeHandle::from_raw(node)).map(|d| d * t.page_size())
                })?
                .map_err(cache_error)
            }

            /// Whether the tree holds `page`.
            #[pyo3(text_signature = "($self, page)")]
            fn contains_page(&self, page: i64) -> PyResult<bool> {
                let g = read(&self.inner)?;
                Ok(u32::try_from(page).map_or(false, |p| $view(&*g).contains_page(p)))
            }

            /// Every node, parent before children, as dicts (for debugging).
            fn nodes(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
                nodes_list(py, $view(&*read(&self.inner)?))
            }

            /// Raises RuntimeError naming the first broken invariant (walks everything).
            fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
                invariants(walk(py, &self.inner, |c| $view(&*c).check_invariants())?)
            }
        }
    };
}

fn tree_view(t: &oscar_core::RadixTree) -> &oscar_core::RadixTree {
    t
}

fn cache_view(c: &oscar_core::PrefixCache) -> &oscar_core::RadixTree {
    c.tree()
}

/// Radix tree over whole pages of token ids (SGLang RadixCache semantics), namespaced.
/// The tree owns inserted pages until `evict`/`reset` returns them; it never frees them.
#[pyclass(module = "oscar_kv._native")]
#[pyo3(text_signature = "(num_pages, page_size=128)")]
pub struct RadixTree {
    inner: Mutex<oscar_core::RadixTree>,
}

impl RadixTree {
    /// The arguments of a KV-row insert: the first `limit` token ids (unchecked in place,
    /// see `TokenIds::get_for_row`), the page of every `page_size`-th of their whole pages'
    /// KV locations, and the page size.
    fn kv_row_args(
        &self,
        tokens: &PyAny,
        locations: &PyAny,
        limit: Option<i64>,
    ) -> PyResult<(TokenIds, Vec<PageId>, usize)> {
        let ids = TokenIds::get_for_row(tokens, limit_arg(limit)?)?;
        let (ps, num_pages) = {
            let t = read(&self.inner)?;
            (t.page_size(), t.num_pages())
        };
        let whole = with_keys!(ids.keys(), |k| k.len()) / ps * ps;
        let pages = crate::buffer::ints_every(locations, "locations", ps, whole)?
            .into_iter()
            .map(|loc| {
                let page = loc.div_euclid(ps as i64);
                u32::try_from(page)
                    .ok()
                    .filter(|&q| (q as usize) < num_pages)
                    .ok_or_else(|| cache_error(CacheError::PageOutOfRange { page, num_pages }))
            })
            .collect::<PyResult<Vec<PageId>>>()?;
        Ok((ids, pages, ps))
    }
}

tree_methods!(RadixTree, tree_view, {
    #[new]
    #[args(page_size = "128")]
    fn new(num_pages: i64, page_size: i64) -> PyResult<Self> {
        let tree = oscar_core::RadixTree::new(
            count("num_pages", num_pages)?,
            count("page_size", page_size)?,
        )
        .map_err(cache_error)?;
        Ok(RadixTree {
            inner: Mutex::new(tree),
        })
    }

    /// Inserts the whole pages of the first `limit` tokens with one page id per whole page:
    /// `(prefix_tokens, duplicates, node)`. `duplicates` are the caller's pages inside the
    /// already-cached prefix that the tree did not take: the caller frees them. `weights`
    /// (one >= 1 per page, default 1): what each adopted page counts for in the sizes.
    /// With `kv_row=True` the pages are a request's KV row for these tokens: where they are
    /// the tree's own pages at the same positions (its matched prefix) they are taken as
    /// that prefix without comparing tokens again (handing tree pages for other tokens is a
    /// caller bug this does not detect).
    #[args(namespace = "None", limit = "None", weights = "None", kv_row = "false")]
    #[pyo3(
        text_signature = "($self, tokens, pages, namespace=None, limit=None, weights=None, \
                          kv_row=False)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        py: Python<'_>,
        tokens: &PyAny,
        pages: &PyAny,
        namespace: Option<&str>,
        limit: Option<i64>,
        weights: Option<&PyAny>,
        kv_row: bool,
    ) -> PyResult<(usize, PyObject, u64)> {
        let ids = if kv_row {
            TokenIds::get_for_row(tokens, limit_arg(limit)?)?
        } else {
            TokenIds::get(tokens, limit_arg(limit)?)?
        };
        let pages = page_ids(pages, read(&self.inner)?.num_pages())?;
        let weights = weights.map(weight_list).transpose()?;
        let (out, ps) = locked(&self.inner, |t| {
            let w = weights.as_deref();
            with_keys!(ids.keys(), |k| if kv_row {
                t.insert_row(namespace, k, &pages, w)
            } else {
                t.insert_weighted(namespace, k, &pages, w)
            })
            .map(|o| (o, t.page_size()))
        })?
        .map_err(cache_error)?;
        Ok((
            out.prefix_pages * ps,
            page_array(py, &out.duplicates)?,
            out.node.raw(),
        ))
    }

    /// `insert` with the key's KV locations (SGLang's `page * page_size + slot` indices, at
    /// least `limit` of them) in place of page ids: page `i` is `locations[i * page_size] //
    /// page_size`, read straight from the buffer. `duplicates` is None when there are none.
    /// The locations are a KV row, so the tree's own pages among them are taken as its
    /// prefix without comparing tokens (as `insert(..., kv_row=True)`).
    #[args(namespace = "None", limit = "None", weights = "None")]
    #[pyo3(text_signature = "($self, tokens, locations, namespace=None, limit=None, weights=None)")]
    fn insert_locations(
        &self,
        py: Python<'_>,
        tokens: &PyAny,
        locations: &PyAny,
        namespace: Option<&str>,
        limit: Option<i64>,
        weights: Option<&PyAny>,
    ) -> PyResult<(usize, Option<PyObject>, u64)> {
        let (ids, pages, ps) = self.kv_row_args(tokens, locations, limit)?;
        let weights = weights.map(weight_list).transpose()?;
        let out = locked(&self.inner, |t| {
            with_keys!(ids.keys(), |k| t.insert_row(
                namespace,
                k,
                &pages,
                weights.as_deref()
            ))
        })?
        .map_err(cache_error)?;
        row_outcome(py, out, ps)
    }

    /// SGLang's `checkpoint` of a request's KV row in one call: `insert_locations` of the
    /// first `limit` tokens, then, for `0 < split_at < limit`, the re-insert of the first
    /// `split_at` tokens (SGLang splits the leaf at the prompt boundary: only topology and
    /// recency change), the path to the key's node stamped as its re-match would, and the
    /// request's lock moved from `unlock` (ROOT_NODE: none) to that node. Returns
    /// `(prefix_tokens, duplicates or None, node)`, as `insert_locations`. Bad input,
    /// including an `unlock` node without a lock, changes nothing (the one error after the
    /// insert would be a lock count overflowing u32 on the key's node).
    #[args(
        namespace = "None",
        limit = "None",
        split_at = "0",
        unlock = "u64::MAX"
    )]
    #[pyo3(
        text_signature = "($self, tokens, locations, namespace=None, limit=None, split_at=0, \
                          unlock=ROOT_NODE)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn checkpoint_row(
        &self,
        py: Python<'_>,
        tokens: &PyAny,
        locations: &PyAny,
        namespace: Option<&str>,
        limit: Option<i64>,
        split_at: i64,
        unlock: u64,
    ) -> PyResult<(usize, Option<PyObject>, u64)> {
        let (ids, pages, ps) = self.kv_row_args(tokens, locations, limit)?;
        let whole = pages.len() * ps;
        let split = count("split_at", split_at)? / ps * ps;
        let old = NodeHandle::from_raw(unlock);
        let out = locked(&self.inner, |t| {
            // The old lock is checked first, so that a bad one changes nothing.
            if !old.is_root() && t.lock_ref(old)? == 0 {
                return Err(CacheError::LockUnderflow { handle: unlock });
            }
            with_keys!(ids.keys(), |k| {
                let out = t.insert_row(namespace, k, &pages, None)?;
                if 0 < split && split < whole {
                    t.insert_row(namespace, &k[..split], &pages[..split / ps], None)?;
                }
                t.touch_path(out.node)?;
                t.unlock(old)?;
                t.lock(out.node)?;
                Ok(out)
            })
        })?
        .map_err(cache_error)?;
        row_outcome(py, out, ps)
    }

    /// Stamps the path to `node` as just used (one new tick), as a match ending there
    /// would, without comparing tokens. No-op on ROOT_NODE.
    #[pyo3(text_signature = "($self, node)")]
    fn touch_path(&self, node: u64) -> PyResult<()> {
        locked(&self.inner, |t| t.touch_path(NodeHandle::from_raw(node)))?.map_err(cache_error)
    }

    /// Evicts unlocked leaves, least recently used first, until at least `num_pages` pages
    /// are out; returns them (the caller frees them).
    #[pyo3(text_signature = "($self, num_pages)")]
    fn evict(&self, py: Python<'_>, num_pages: i64) -> PyResult<PyObject> {
        let n = count("num_pages", num_pages)?;
        let freed = locked(&self.inner, |t| t.evict(n))?;
        page_array(py, &freed)
    }

    /// Empties the tree; returns every page it held. All handles become invalid.
    fn reset(&self, py: Python<'_>) -> PyResult<PyObject> {
        let pages = walk(py, &self.inner, |t| t.reset())?;
        page_array(py, &pages)
    }

    fn __repr__(&self) -> PyResult<String> {
        let t = read(&self.inner)?;
        let s = t.sizes();
        Ok(format!(
            "RadixTree(page_size={}, nodes={}, pages={} (evictable {}, protected {}))",
            t.page_size(),
            t.num_nodes(),
            s.total,
            s.evictable,
            s.protected
        ))
    }
});

/// Page allocator and radix tree over the same pages, with the ownership rules of the
/// scheduler: a page is free, in the tree, or held by a request.
#[pyclass(module = "oscar_kv._native")]
#[pyo3(text_signature = "(num_pages, page_size=128)")]
pub struct PrefixCache {
    inner: Mutex<oscar_core::PrefixCache>,
}

tree_methods!(PrefixCache, cache_view, {
    #[new]
    #[args(page_size = "128")]
    fn new(num_pages: i64, page_size: i64) -> PyResult<Self> {
        let cache = oscar_core::PrefixCache::new(
            count("num_pages", num_pages)?,
            count("page_size", page_size)?,
        )
        .map_err(cache_error)?;
        Ok(PrefixCache {
            inner: Mutex::new(cache),
        })
    }

    /// Free pages.
    #[getter]
    fn available(&self) -> PyResult<usize> {
        Ok(read(&self.inner)?.available())
    }

    /// Allocates `n` pages for a request. With `evict=True` evicts the shortfall first
    /// (LRU); OutOfPages, with nothing evicted or taken, if that cannot suffice.
    #[args(evict = "false")]
    #[pyo3(text_signature = "($self, n, evict=False)")]
    fn alloc(&self, py: Python<'_>, n: i64, evict: bool) -> PyResult<PyObject> {
        let n = count("n", n)?;
        let pages = walk(py, &self.inner, |c| {
            if evict {
                c.alloc_evicting(n)
            } else {
                c.alloc(n)
            }
        })?
        .map_err(cache_error)?;
        page_array(py, &pages)
    }

    /// Returns a request's pages; InvalidPage (nothing freed) for tree pages, free pages,
    /// ids out of range.
    #[pyo3(text_signature = "($self, pages)")]
    fn free(&self, py: Python<'_>, pages: &PyAny) -> PyResult<()> {
        let pages = page_ids(pages, read(&self.inner)?.num_pages())?;
        walk(py, &self.inner, |c| c.free(&pages))?.map_err(cache_error)
    }

    /// Reference count of a page (0 = free).
    #[pyo3(text_signature = "($self, page)")]
    fn refcount(&self, page: i64) -> PyResult<u32> {
        let c = read(&self.inner)?;
        let n = c.num_pages();
        let p = u32::try_from(page)
            .map_err(|_| cache_error(CacheError::PageOutOfRange { page, num_pages: n }))?;
        c.allocator().refcount(p).map_err(cache_error)
    }

    /// Hands a request's whole pages to the tree and frees its duplicates of pages the tree
    /// already had: `(prefix_tokens, freed_duplicates, node)`. Every page must be allocated.
    #[args(namespace = "None", limit = "None")]
    #[pyo3(text_signature = "($self, tokens, pages, namespace=None, limit=None)")]
    fn insert(
        &self,
        py: Python<'_>,
        tokens: &PyAny,
        pages: &PyAny,
        namespace: Option<&str>,
        limit: Option<i64>,
    ) -> PyResult<(usize, PyObject, u64)> {
        let ids = TokenIds::get(tokens, limit_arg(limit)?)?;
        let pages = page_ids(pages, read(&self.inner)?.num_pages())?;
        let (out, ps) = locked(&self.inner, |c| {
            with_keys!(ids.keys(), |k| c.insert(namespace, k, &pages)).map(|o| (o, c.page_size()))
        })?
        .map_err(cache_error)?;
        Ok((
            out.prefix_pages * ps,
            page_array(py, &out.duplicates)?,
            out.node.raw(),
        ))
    }

    /// Admits a request: matches the first `limit` tokens (its prompt), locks the match,
    /// evicts the shortfall and allocates pages for `total_tokens` tokens:
    /// `(pages, matched_tokens, node, evicted_pages)`, `pages` being the matched pages
    /// followed by the fresh ones. OutOfPages (lock dropped, nothing taken) if even
    /// evicting every unlocked page would not do.
    #[args(namespace = "None", limit = "None")]
    #[pyo3(text_signature = "($self, tokens, total_tokens, namespace=None, limit=None)")]
    fn admit(
        &self,
        py: Python<'_>,
        tokens: &PyAny,
        total_tokens: i64,
        namespace: Option<&str>,
        limit: Option<i64>,
    ) -> PyResult<(PyObject, usize, u64, usize)> {
        let ids = TokenIds::get(tokens, limit_arg(limit)?)?;
        let total = count("total_tokens", total_tokens)?;
        let (a, ps) = locked(&self.inner, |c| {
            with_keys!(ids.keys(), |k| c.admit(namespace, k, total)).map(|a| (a, c.page_size()))
        })?
        .map_err(cache_error)?;
        Ok((
            page_array(py, &a.pages)?,
            a.matched_pages * ps,
            a.node.raw(),
            a.evicted_pages,
        ))
    }

    /// Ends a request: inserts its whole pages (first `limit` tokens) when `insert`, frees
    /// its other pages and drops its lock on `node`; returns the tokens that were already
    /// cached. `pages` are all the request's pages in token order (the tree's included).
    /// Nothing changes on error.
    #[args(namespace = "None", insert = "true", limit = "None")]
    #[pyo3(
        text_signature = "($self, tokens, pages, node, namespace=None, insert=True, limit=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        tokens: &PyAny,
        pages: &PyAny,
        node: u64,
        namespace: Option<&str>,
        insert: bool,
        limit: Option<i64>,
    ) -> PyResult<usize> {
        // The pages are the request's row: only the tokens past the tree's own are read.
        let ids = TokenIds::get_for_row(tokens, limit_arg(limit)?)?;
        let pages = page_ids(pages, read(&self.inner)?.num_pages())?;
        let node = NodeHandle::from_raw(node);
        locked(&self.inner, |c| {
            with_keys!(ids.keys(), |k| c
                .release(namespace, k, &pages, node, insert))
            .map(|o| o.prefix_pages * c.page_size())
        })?
        .map_err(cache_error)
    }

    /// Evicts (LRU, unlocked leaves) at least `num_pages` pages if possible and frees them;
    /// returns the number freed.
    #[pyo3(text_signature = "($self, num_pages)")]
    fn evict(&self, num_pages: i64) -> PyResult<usize> {
        let n = count("num_pages", num_pages)?;
        locked(&self.inner, |c| c.evict(n))
    }

    /// Empties the tree and frees its pages; request pages stay allocated.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        walk(py, &self.inner, |c| c.reset())
    }

    /// Also checks the allocator and that every tree page is allocated once.
    fn check_all_invariants(&self, py: Python<'_>) -> PyResult<()> {
        invariants(walk(py, &self.inner, |c| c.check_invariants())?)
    }

    fn __repr__(&self) -> PyResult<String> {
        let c = read(&self.inner)?;
        let s = c.sizes();
        Ok(format!(
            "PrefixCache(num_pages={}, page_size={}, available={}, tree pages={} \
             (evictable {}, protected {}))",
            c.num_pages(),
            c.page_size(),
            c.available(),
            s.total,
            s.evictable,
            s.protected
        ))
    }
});

/// Byte offsets of the pages of a packed pool: one buffer per layer of `num_pages` pages.
#[pyclass(module = "oscar_kv._native")]
#[pyo3(
    text_signature = "(kv_heads, head_dim, num_layers, num_pages, bits=2, k_group=32, v_group=32, norm='token')"
)]
pub struct PoolLayout {
    inner: CorePool,
}

fn section_arg(name: &str) -> PyResult<usize> {
    oscar_core::SECTION_NAMES
        .iter()
        .position(|&n| n == name)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "section must be one of {:?}, got '{name}'",
                oscar_core::SECTION_NAMES
            ))
        })
}

#[pymethods]
impl PoolLayout {
    #[new]
    #[args(bits = "2", k_group = "32", v_group = "32", norm = "\"token\"")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        kv_heads: i64,
        head_dim: i64,
        num_layers: i64,
        num_pages: i64,
        bits: i64,
        k_group: i64,
        v_group: i64,
        norm: &str,
    ) -> PyResult<Self> {
        let cfg = crate::config(kv_heads, head_dim, bits, k_group, v_group, norm)?;
        let inner = CorePool::new(
            cfg,
            count("num_layers", num_layers)?,
            count("num_pages", num_pages)?,
        )
        .map_err(cache_error)?;
        Ok(PoolLayout { inner })
    }

    /// Pages of this shape over `num_layers` layers that fit in `budget_bytes`.
    #[staticmethod]
    #[args(bits = "2", k_group = "32", v_group = "32", norm = "\"token\"")]
    #[pyo3(
        text_signature = "(budget_bytes, kv_heads, head_dim, num_layers, bits=2, k_group=32, v_group=32, norm='token')"
    )]
    #[allow(clippy::too_many_arguments)]
    fn pages_for_budget(
        budget_bytes: i64,
        kv_heads: i64,
        head_dim: i64,
        num_layers: i64,
        bits: i64,
        k_group: i64,
        v_group: i64,
        norm: &str,
    ) -> PyResult<u64> {
        let cfg = crate::config(kv_heads, head_dim, bits, k_group, v_group, norm)?;
        let budget = count("budget_bytes", budget_bytes)? as u64;
        Ok(CorePool::pages_for_budget(
            &cfg,
            count("num_layers", num_layers)?,
            budget,
        ))
    }

    /// Layers.
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }

    /// Pages per layer.
    #[getter]
    fn num_pages(&self) -> usize {
        self.inner.num_pages()
    }

    /// Tokens the pool holds.
    #[getter]
    fn num_tokens(&self) -> usize {
        self.inner.num_tokens()
    }

    /// Bytes of one page of one layer.
    #[getter]
    fn page_bytes(&self) -> usize {
        self.inner.page_bytes()
    }

    /// Bytes of one layer's buffer.
    #[getter]
    fn layer_bytes(&self) -> usize {
        self.inner.layer_bytes()
    }

    /// Bytes of all layers.
    #[getter]
    fn total_bytes(&self) -> usize {
        self.inner.total_bytes()
    }

    /// The seven sections of a page as (name, offset, nbytes), offsets within the page.
    fn sections(&self) -> Vec<(&'static str, usize, usize)> {
        self.inner
            .sections()
            .iter()
            .map(|s| (s.name, s.offset, s.nbytes))
            .collect()
    }

    /// Byte offset of `page` in its layer's buffer.
    #[pyo3(text_signature = "($self, page)")]
    fn page_offset(&self, page: i64) -> PyResult<usize> {
        let n = self.inner.num_pages();
        let p = u32::try_from(page)
            .map_err(|_| cache_error(CacheError::PageOutOfRange { page, num_pages: n }))?;
        self.inner.page_offset(p).map_err(cache_error)
    }

    /// Byte offset of `page` of `layer` in one buffer holding all layers back to back.
    #[pyo3(text_signature = "($self, layer, page)")]
    fn global_offset(&self, layer: i64, page: i64) -> PyResult<usize> {
        let n = self.inner.num_pages();
        let p = u32::try_from(page)
            .map_err(|_| cache_error(CacheError::PageOutOfRange { page, num_pages: n }))?;
        self.inner
            .global_offset(count("layer", layer)?, p)
            .map_err(cache_error)
    }

    /// `(offset in the layer buffer, nbytes)` of a section ("k_codes" ... "norms") of `page`.
    #[pyo3(text_signature = "($self, page, section)")]
    fn section_range(&self, page: i64, section: &str) -> PyResult<(usize, usize)> {
        let n = self.inner.num_pages();
        let p = u32::try_from(page)
            .map_err(|_| cache_error(CacheError::PageOutOfRange { page, num_pages: n }))?;
        self.inner
            .section_range(p, section_arg(section)?)
            .map_err(cache_error)
    }

    /// Layer-buffer offsets of one section of many pages, as array('q').
    #[pyo3(text_signature = "($self, pages, section)")]
    fn section_offsets(&self, py: Python<'_>, pages: &PyAny, section: &str) -> PyResult<PyObject> {
        let idx = section_arg(section)?;
        let pages = page_ids(pages, self.inner.num_pages())?;
        let mut out = Vec::with_capacity(pages.len());
        self.inner
            .section_offsets_into(&pages, idx, &mut out)
            .map_err(cache_error)?;
        int64_array(py, out.len(), out.iter().map(|&o| o as i64))
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "PoolLayout(kv_heads={}, head_dim={}, num_layers={}, num_pages={}, bits={}, \
             k_group={}, v_group={}, norm='{}', total_bytes={})",
            c.kv_heads(),
            c.head_dim(),
            self.inner.num_layers(),
            self.inner.num_pages(),
            c.bits(),
            c.k_group(),
            c.v_group(),
            c.norm(),
            self.inner.total_bytes()
        )
    }
}

/// Registers the classes, exceptions and `ROOT_NODE`.
pub(crate) fn register(py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<PageAllocator>()?;
    m.add_class::<RadixTree>()?;
    m.add_class::<PrefixCache>()?;
    m.add_class::<PoolLayout>()?;
    for (name, ty) in [
        ("OutOfPages", py.get_type::<OutOfPages>()),
        ("InvalidPage", py.get_type::<InvalidPage>()),
        ("InvalidNode", py.get_type::<InvalidNode>()),
        ("LockUnderflow", py.get_type::<LockUnderflow>()),
    ] {
        ty.setattr("__module__", "oscar_kv._native")?;
        m.add(name, ty)?;
    }
    m.add("ROOT_NODE", NodeHandle::ROOT.raw())?;
    Ok(())
}
