//! The one error type of the cache manager (allocator, radix tree, prefix cache).
//!
//! Every fallible operation checks its whole input before it changes anything, so an `Err`
//! always means "nothing happened". The binding maps the variants onto typed Python
//! exceptions by [`CacheError::kind`].

use std::fmt;

/// A page id: an index into the packed page pool, `0..num_pages`.
pub type PageId = u32;

/// A rejected cache operation. The `Display` text names the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// The allocator has fewer free pages than requested.
    OutOfPages {
        /// Pages asked for.
        requested: usize,
        /// Pages free at the time.
        available: usize,
    },
    /// A page id is not below the pool size.
    PageOutOfRange {
        /// The rejected id (as given, possibly negative on the Python side).
        page: i64,
        /// Pool size.
        num_pages: usize,
    },
    /// Freeing (or retaining) a page that is not allocated: a double free.
    PageNotAllocated {
        /// The free page.
        page: PageId,
    },
    /// A page handed to the tree (or freed by a request) is owned by the tree.
    PageInTree {
        /// The page.
        page: PageId,
    },
    /// A page below the allocator's reserved bound (never handed out, never freed).
    ReservedPage {
        /// The page.
        page: PageId,
    },
    /// A companion page named directly: it belongs to its owner page and is freed with it.
    CompanionPage {
        /// The companion.
        page: PageId,
        /// The page it belongs to.
        owner: PageId,
    },
    /// The same page appears twice where each must be distinct.
    DuplicatePage {
        /// The repeated page.
        page: PageId,
    },
    /// `insert` got a number of pages that does not match the whole pages of the key.
    PageCountMismatch {
        /// Whole pages in the key (`tokens / page_size`).
        expected: usize,
        /// Pages given.
        got: usize,
    },
    /// A node handle that no longer (or never did) name a node of this tree.
    StaleNode {
        /// The handle.
        handle: u64,
    },
    /// `unlock` on a node whose lock count is already zero.
    LockUnderflow {
        /// The handle.
        handle: u64,
    },
    /// A constructor argument outside its range.
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// The rule it broke, e.g. "must be in 1..=65536".
        rule: String,
        /// The rejected value.
        got: i64,
    },
}

/// Coarse classes of [`CacheError`], one Python exception type each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The pool is exhausted (a runtime condition, not a caller bug).
    OutOfPages,
    /// A bad page id or page ownership violation.
    InvalidPage,
    /// A stale or unknown node handle.
    InvalidNode,
    /// Unlock below zero.
    LockUnderflow,
    /// Any other bad argument.
    InvalidArgument,
}

impl CacheError {
    /// Which exception class this error belongs to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CacheError::OutOfPages { .. } => ErrorKind::OutOfPages,
            CacheError::PageOutOfRange { .. }
            | CacheError::PageNotAllocated { .. }
            | CacheError::PageInTree { .. }
            | CacheError::ReservedPage { .. }
            | CacheError::CompanionPage { .. }
            | CacheError::DuplicatePage { .. } => ErrorKind::InvalidPage,
            CacheError::StaleNode { .. } => ErrorKind::InvalidNode,
            CacheError::LockUnderflow { .. } => ErrorKind::LockUnderflow,
            CacheError::PageCountMismatch { .. } | CacheError::InvalidArgument { .. } => {
                ErrorKind::InvalidArgument
            }
        }
    }
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::OutOfPages {
                requested,
                available,
            } => write!(
                f,
                "out of pages: requested {requested}, only {available} free \
                 (evict from the prefix cache or free request pages first)"
            ),
            CacheError::PageOutOfRange { page, num_pages } => {
                write!(f, "page id {page} out of range 0..{num_pages}")
            }
            CacheError::PageNotAllocated { page } => {
                write!(f, "page {page} is not allocated (double free?)")
            }
            CacheError::PageInTree { page } => {
                write!(f, "page {page} is owned by the radix tree")
            }
            CacheError::ReservedPage { page } => {
                write!(f, "page {page} is reserved (never allocated or freed)")
            }
            CacheError::CompanionPage { page, owner } => write!(
                f,
                "page {page} is a companion of page {owner}: it is freed with that page"
            ),
            CacheError::DuplicatePage { page } => {
                write!(f, "page {page} appears more than once")
            }
            CacheError::PageCountMismatch { expected, got } => write!(
                f,
                "pages must hold one id per whole page of tokens: expected {expected}, got {got}"
            ),
            CacheError::StaleNode { handle } => {
                write!(f, "node handle {handle:#x} does not name a live node")
            }
            CacheError::LockUnderflow { handle } => {
                write!(f, "unlock below zero on node {handle:#x}")
            }
            CacheError::InvalidArgument { name, rule, got } => {
                write!(f, "{name} {rule}, got {got}")
            }
        }
    }
}

impl std::error::Error for CacheError {}

/// Checks that `page < num_pages`.
pub(crate) fn check_page(page: PageId, num_pages: usize) -> Result<(), CacheError> {
    if (page as usize) < num_pages {
        Ok(())
    } else {
        Err(CacheError::PageOutOfRange {
            page: page as i64,
            num_pages,
        })
    }
}
