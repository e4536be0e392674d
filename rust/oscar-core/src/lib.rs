//! Pure-Rust core of oscar-kv.
//!
//! Rust owns ids, trees, free lists and layout math; tensors never cross into this crate.
//! The crate is std-only so it builds anywhere `cargo` does.
//!
//! Modules:
//! - [`layout`]: the byte layout of one packed 128-token page of a 2/4-bit KV cache.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod layout;

pub use layout::{
    bf16_bytes_per_token, bytes_per_token, compression_ratio, page_bytes, page_sections,
    LayoutConfig, LayoutError, NormMode, Section, BLOCK_TOKENS, MAX_KV_HEADS, SECTION_NAMES,
};
