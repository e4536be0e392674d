//! Page allocator over a fixed pool of pages, with reference counts.
//!
//! A page is free (count 0) or allocated (count >= 1). `alloc` hands out free pages with
//! count 1, `retain` adds a reference, `free` drops one and returns the page to the free list
//! at zero. Every call validates its whole argument first: on `Err` no count has changed.

use crate::error::{check_page, CacheError, PageId};

/// Largest pool: 2^28 pages (2^35 tokens of 128-token pages). It keeps page ids inside
/// `u32` and the per-page tables of a pool (4 bytes each) at 1 GiB at most.
pub const MAX_PAGES: usize = 1 << 28;

/// Checks a pool size argument.
pub(crate) fn check_num_pages(num_pages: usize) -> Result<(), CacheError> {
    if (1..=MAX_PAGES).contains(&num_pages) {
        Ok(())
    } else {
        Err(CacheError::InvalidArgument {
            name: "num_pages",
            rule: format!("must be in 1..={MAX_PAGES}"),
            got: num_pages as i64,
        })
    }
}

/// Reference-counted allocator of page ids `0..num_pages`.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    refcount: Vec<u32>,
    // A stack: `alloc` pops from the end. Filled in descending order so that a fresh pool
    // hands out 0, 1, 2, ... (deterministic ids make tests and traces reproducible).
    free: Vec<PageId>,
}

impl PageAllocator {
    /// A pool of `num_pages` free pages; `num_pages` must be in `1..=MAX_PAGES`.
    pub fn new(num_pages: usize) -> Result<Self, CacheError> {
        check_num_pages(num_pages)?;
        let mut a = PageAllocator {
            refcount: vec![0; num_pages],
            free: Vec::with_capacity(num_pages),
        };
        a.reset();
        Ok(a)
    }

    /// Frees every page, whatever its count.
    pub fn reset(&mut self) {
        self.refcount.iter_mut().for_each(|c| *c = 0);
        self.free.clear();
        // num_pages <= MAX_PAGES < u32::MAX, so every id fits.
        self.free.extend((0..self.refcount.len() as PageId).rev());
    }

    /// Size of the pool.
    pub fn num_pages(&self) -> usize {
        self.refcount.len()
    }

    /// Number of free pages.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Reference count of `page` (0 = free).
    pub fn refcount(&self, page: PageId) -> Result<u32, CacheError> {
        check_page(page, self.num_pages())?;
        Ok(self.refcount[page as usize])
    }

    /// Whether `page` is free; `false` for ids outside the pool.
    pub fn is_free(&self, page: PageId) -> bool {
        self.refcount.get(page as usize) == Some(&0)
    }

    /// Allocates `n` pages (count 1 each). All or nothing: [`CacheError::OutOfPages`] if
    /// fewer than `n` are free.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<PageId>, CacheError> {
        let mut out = Vec::with_capacity(n);
        self.alloc_into(n, &mut out)?;
        Ok(out)
    }

    /// Like [`alloc`](Self::alloc), appending to `out`.
    pub fn alloc_into(&mut self, n: usize, out: &mut Vec<PageId>) -> Result<(), CacheError> {
        if n > self.free.len() {
            return Err(CacheError::OutOfPages {
                requested: n,
                available: self.free.len(),
            });
        }
        let start = self.free.len() - n;
        for &p in self.free[start..].iter().rev() {
            self.refcount[p as usize] = 1;
            out.push(p);
        }
        self.free.truncate(start);
        Ok(())
    }

    /// Drops one reference from each page (a page may appear as often as it has references).
    /// Pages reaching zero go back to the free list. Errors, with nothing changed: an id
    /// outside the pool, or more drops than references (double free).
    pub fn free(&mut self, pages: &[PageId]) -> Result<(), CacheError> {
        let n = self.num_pages();
        for (i, &p) in pages.iter().enumerate() {
            let err = match check_page(p, n) {
                Err(e) => Some(e),
                Ok(()) if self.refcount[p as usize] == 0 => {
                    Some(CacheError::PageNotAllocated { page: p })
                }
                Ok(()) => None,
            };
            if let Some(e) = err {
                // Undo the drops of this call so that the error leaves the counts as they were.
                for &q in &pages[..i] {
                    self.refcount[q as usize] += 1;
                }
                return Err(e);
            }
            self.refcount[p as usize] -= 1;
        }
        for &p in pages {
            // A page listed k times reached zero once; push it once, on the last listing
            // that sees zero and has not pushed yet. `u32::MAX` marks "pushed" temporarily.
            if self.refcount[p as usize] == 0 {
                self.refcount[p as usize] = u32::MAX;
                self.free.push(p);
            }
        }
        for &p in pages {
            if self.refcount[p as usize] == u32::MAX {
                self.refcount[p as usize] = 0;
            }
        }
        Ok(())
    }

    /// Adds one reference to each page; every page must be allocated. Nothing changes on error.
    pub fn retain(&mut self, pages: &[PageId]) -> Result<(), CacheError> {
        let n = self.num_pages();
        for &p in pages {
            check_page(p, n)?;
            if self.refcount[p as usize] == 0 {
                return Err(CacheError::PageNotAllocated { page: p });
            }
        }
        for (i, &p) in pages.iter().enumerate() {
            let c = &mut self.refcount[p as usize];
            if *c >= u32::MAX - 1 {
                for &q in &pages[..i] {
                    self.refcount[q as usize] -= 1;
                }
                return Err(CacheError::InvalidArgument {
                    name: "pages",
                    rule: "reference count would overflow".to_owned(),
                    got: p as i64,
                });
            }
            *c += 1;
        }
        Ok(())
    }

    /// Checks that the free list holds exactly the pages of count zero, once each.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![false; self.num_pages()];
        for &p in &self.free {
            let i = p as usize;
            if i >= seen.len() || seen[i] {
                return Err(format!("free list holds {p} twice or out of range"));
            }
            seen[i] = true;
            if self.refcount[i] != 0 {
                return Err(format!("free page {p} has count {}", self.refcount[i]));
            }
        }
        let zeros = self.refcount.iter().filter(|&&c| c == 0).count();
        if zeros != self.free.len() {
            return Err(format!(
                "{zeros} pages have count 0 but the free list holds {}",
                self.free.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_roundtrip() {
        let mut a = PageAllocator::new(4).unwrap();
        assert_eq!(a.alloc(3).unwrap(), vec![0, 1, 2]);
        assert_eq!(a.available(), 1);
        let err = a.alloc(2).unwrap_err();
        assert_eq!(
            err,
            CacheError::OutOfPages {
                requested: 2,
                available: 1
            }
        );
        assert_eq!(a.available(), 1, "failed alloc takes nothing");
        a.free(&[1]).unwrap();
        assert_eq!(a.alloc(2).unwrap(), vec![1, 3]);
        a.check_invariants().unwrap();
    }

    #[test]
    fn double_free_and_range_leave_state_unchanged() {
        let mut a = PageAllocator::new(4).unwrap();
        let p = a.alloc(2).unwrap();
        a.free(&p[..1]).unwrap();
        let before = (a.available(), a.refcount(1).unwrap());
        assert_eq!(
            a.free(&[1, 0]).unwrap_err(),
            CacheError::PageNotAllocated { page: 0 }
        );
        assert_eq!(
            a.free(&[1, 9]).unwrap_err(),
            CacheError::PageOutOfRange {
                page: 9,
                num_pages: 4
            }
        );
        assert_eq!(
            a.free(&[1, 1]).unwrap_err(),
            CacheError::PageNotAllocated { page: 1 }
        );
        assert_eq!((a.available(), a.refcount(1).unwrap()), before);
        a.check_invariants().unwrap();
    }

    #[test]
    fn refcounts() {
        let mut a = PageAllocator::new(2).unwrap();
        let p = a.alloc(1).unwrap()[0];
        a.retain(&[p, p]).unwrap();
        assert_eq!(a.refcount(p).unwrap(), 3);
        a.free(&[p, p]).unwrap();
        assert!(!a.is_free(p));
        a.free(&[p]).unwrap();
        assert!(a.is_free(p));
        assert_eq!(a.available(), 2);
        assert!(a.retain(&[p]).is_err());
        // Freeing a page listed as often as its count pushes it once.
        let p = a.alloc(1).unwrap()[0];
        a.retain(&[p]).unwrap();
        a.free(&[p, p]).unwrap();
        a.check_invariants().unwrap();
        assert_eq!(a.available(), 2);
    }

    #[test]
    fn bad_sizes() {
        assert!(PageAllocator::new(0).is_err());
        assert!(PageAllocator::new(MAX_PAGES + 1).is_err());
        assert!(PageAllocator::new(1).is_ok());
    }
}
