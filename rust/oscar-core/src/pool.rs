//! Per-page metadata of the packed pool: where a page's bytes, norms and K/V scale/zero live.
//!
//! The pool is one byte buffer per layer, `[num_pages, page_bytes]`, each page laid out as
//! [`crate::layout::page_sections`] says. A token's location (SGLang's KV index) is
//! `page * 128 + slot`, so the page of a location is `location / 128`. This module is the
//! one place that turns (layer, page, section) into byte offsets, shared with Python through
//! the binding, and the capacity math that tells SGLang how many pages fit in a budget.

use crate::allocator::check_num_pages;
use crate::error::{check_page, CacheError, PageId};
use crate::layout::{
    page_bytes, page_sections, LayoutConfig, Section, BLOCK_TOKENS, SECTION_NAMES,
};

/// Largest accepted number of layers.
pub const MAX_LAYERS: usize = 4096;

/// Byte offsets of every page of a multi-layer packed pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLayout {
    cfg: LayoutConfig,
    num_layers: usize,
    num_pages: usize,
    page_bytes: usize,
    sections: [Section; 7],
}

impl PoolLayout {
    /// The layout of `num_layers` layers of `num_pages` pages of configuration `cfg`.
    /// Fails if an argument is out of range or the pool would not be addressable.
    pub fn new(cfg: LayoutConfig, num_layers: usize, num_pages: usize) -> Result<Self, CacheError> {
        if !(1..=MAX_LAYERS).contains(&num_layers) {
            return Err(CacheError::InvalidArgument {
                name: "num_layers",
                rule: format!("must be in 1..={MAX_LAYERS}"),
                got: num_layers as i64,
            });
        }
        check_num_pages(num_pages)?;
        let pb = page_bytes(&cfg);
        let total = pb
            .checked_mul(num_pages)
            .and_then(|b| b.checked_mul(num_layers))
            .filter(|&b| b <= i64::MAX as usize);
        if total.is_none() {
            return Err(CacheError::InvalidArgument {
                name: "num_pages",
                rule: format!(
                    "is too large: {num_layers} layers x pages of {pb} bytes overflow a byte offset"
                ),
                got: num_pages as i64,
            });
        }
        Ok(PoolLayout {
            cfg,
            num_layers,
            num_pages,
            page_bytes: pb,
            sections: page_sections(&cfg),
        })
    }

    /// Pages of configuration `cfg` over `num_layers` layers that fit in `budget_bytes`.
    pub fn pages_for_budget(cfg: &LayoutConfig, num_layers: usize, budget_bytes: u64) -> u64 {
        let per_page = page_bytes(cfg) as u64 * num_layers.max(1) as u64;
        budget_bytes / per_page
    }

    /// The page configuration.
    pub fn config(&self) -> &LayoutConfig {
        &self.cfg
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Pages per layer.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Bytes of one page of one layer.
    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    /// Bytes of one layer's buffer.
    pub fn layer_bytes(&self) -> usize {
        self.page_bytes * self.num_pages
    }

    /// Bytes of the whole pool.
    pub fn total_bytes(&self) -> usize {
        self.layer_bytes() * self.num_layers
    }

    /// Tokens the pool holds (`num_pages * 128`).
    pub fn num_tokens(&self) -> usize {
        self.num_pages * BLOCK_TOKENS
    }

    fn check_layer(&self, layer: usize) -> Result<(), CacheError> {
        if layer < self.num_layers {
            Ok(())
        } else {
            Err(CacheError::InvalidArgument {
                name: "layer",
                rule: format!("must be in 0..{}", self.num_layers),
                got: layer as i64,
            })
        }
    }

    /// Byte offset of `page` inside its layer's buffer.
    pub fn page_offset(&self, page: PageId) -> Result<usize, CacheError> {
        check_page(page, self.num_pages)?;
        Ok(page as usize * self.page_bytes)
    }

    /// Byte offset of `page` of `layer` in one buffer holding all layers back to back.
    pub fn global_offset(&self, layer: usize, page: PageId) -> Result<usize, CacheError> {
        self.check_layer(layer)?;
        Ok(layer * self.layer_bytes() + self.page_offset(page)?)
    }

    /// Index of a section by name (one of [`SECTION_NAMES`]).
    pub fn section_index(name: &str) -> Result<usize, CacheError> {
        SECTION_NAMES
            .iter()
            .position(|&n| n == name)
            .ok_or_else(|| CacheError::InvalidArgument {
                name: "section",
                rule: format!(
                    "must be one of {SECTION_NAMES:?} (got '{name}'; value is its length)"
                ),
                got: name.len() as i64,
            })
    }

    /// The sections of a page, offsets relative to the page start.
    pub fn sections(&self) -> &[Section; 7] {
        &self.sections
    }

    /// `(offset in the layer buffer, nbytes)` of section `section` of `page`.
    pub fn section_range(
        &self,
        page: PageId,
        section: usize,
    ) -> Result<(usize, usize), CacheError> {
        let s = self
            .sections
            .get(section)
            .ok_or(CacheError::InvalidArgument {
                name: "section",
                rule: "must be in 0..7".to_owned(),
                got: section as i64,
            })?;
        Ok((self.page_offset(page)? + s.offset, s.nbytes))
    }

    /// Appends the layer-buffer offsets of section `section` of every page in `pages`.
    /// Checks all pages first; nothing is appended on error.
    pub fn section_offsets_into(
        &self,
        pages: &[PageId],
        section: usize,
        out: &mut Vec<u64>,
    ) -> Result<(), CacheError> {
        for &p in pages {
            check_page(p, self.num_pages)?;
        }
        let (base, _) = self.section_range(0, section)?;
        out.extend(
            pages
                .iter()
                .map(|&p| (p as usize * self.page_bytes + base) as u64),
        );
        Ok(())
    }
}

/// Page of a token location (SGLang KV index).
pub fn page_of_location(location: u64) -> u64 {
    location / BLOCK_TOKENS as u64
}

/// Slot of a token location within its page.
pub fn slot_of_location(location: u64) -> usize {
    (location % BLOCK_TOKENS as u64) as usize
}

/// Location of slot `slot` of `page`.
pub fn location(page: PageId, slot: usize) -> u64 {
    page as u64 * BLOCK_TOKENS as u64 + slot as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::NormMode;

    fn cfg() -> LayoutConfig {
        LayoutConfig::new(8, 128, 2, 32, 32, NormMode::Token).unwrap()
    }

    #[test]
    fn offsets() {
        let pool = PoolLayout::new(cfg(), 4, 10).unwrap();
        assert_eq!(pool.page_bytes(), 772 * 128);
        assert_eq!(pool.page_offset(3).unwrap(), 3 * 772 * 128);
        assert_eq!(
            pool.global_offset(2, 3).unwrap(),
            2 * 10 * 772 * 128 + 3 * 772 * 128
        );
        let norms = PoolLayout::section_index("norms").unwrap();
        assert_eq!(
            pool.section_range(1, norms).unwrap(),
            (772 * 128 + 768 * 128, 512)
        );
        let mut out = Vec::new();
        pool.section_offsets_into(&[0, 2], 0, &mut out).unwrap();
        assert_eq!(out, vec![0, 2 * 772 * 128]);
        assert!(pool.section_offsets_into(&[0, 10], 0, &mut out).is_err());
        assert_eq!(out.len(), 2, "nothing appended on error");
        assert!(pool.page_offset(10).is_err());
        assert!(pool.global_offset(4, 0).is_err());
        assert!(PoolLayout::section_index("scales").is_err());
        assert_eq!(pool.total_bytes(), 4 * 10 * 772 * 128);
    }

    #[test]
    fn capacity() {
        let c = cfg();
        let per_page = 772 * 128 * 36;
        assert_eq!(PoolLayout::pages_for_budget(&c, 36, per_page * 5 + 1), 5);
        assert!(PoolLayout::new(c, 0, 1).is_err());
        assert!(PoolLayout::new(c, 1, 0).is_err());
        assert_eq!(page_of_location(300), 2);
        assert_eq!(slot_of_location(300), 44);
        assert_eq!(location(2, 44), 300);
    }
}
