//! Pure-Rust core of oscar-kv.
//!
//! Rust owns ids, trees, free lists and layout math; tensors never cross into this crate.
//! The crate is std-only so it builds anywhere `cargo` does.
//!
//! Modules:
//! - [`layout`]: the byte layout of one packed 128-token page of a 2/4-bit KV cache.
//! - [`pool`]: per-page metadata: byte offsets of pages and their sections in the pool.
//! - [`allocator`]: reference-counted page allocator over a fixed pool, with companion
//!   pages and SGLang's paged extend / decode placement.
//! - [`radix`]: radix tree over whole pages of token ids, namespaced, with locks and LRU
//!   eviction (the prefix cache's index, SGLang `RadixCache` semantics).
//! - [`cache`]: allocator and tree together, with the page-ownership rules.
//! - [`error`]: the cache manager's error type.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod allocator;
pub mod cache;
pub mod error;
pub mod layout;
pub mod pool;
pub mod radix;

pub use allocator::{PageAllocator, Placement, MAX_PAGES};
pub use cache::{Admission, PrefixCache};
pub use error::{CacheError, ErrorKind, PageId};
pub use layout::{
    bf16_bytes_per_token, bytes_per_token, compression_ratio, page_bytes, page_sections,
    LayoutConfig, LayoutError, NormMode, Section, BLOCK_TOKENS, MAX_KV_HEADS, SECTION_NAMES,
};
pub use pool::PoolLayout;
pub use radix::{
    InsertOutcome, KeyToken, MatchOutcome, NodeHandle, NodeInfo, RadixTree, Token, TreeSizes,
    MAX_PAGE_SIZE,
};
