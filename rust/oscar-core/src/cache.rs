//! The allocator and the radix tree together, with the ownership rules the scheduler follows.
//!
//! A page is in exactly one state: free, owned by the tree, or held by a running request
//! (allocated here, not in the tree). Requests take pages with [`PrefixCache::alloc`], hand
//! whole pages to the tree with [`PrefixCache::insert`] (which frees the request's copies of
//! pages the tree already had), give back the rest with [`PrefixCache::free`], and protect a
//! matched prefix with [`PrefixCache::lock`] while they read it. Eviction returns tree pages
//! to the free list. Every call checks its input before changing anything.

use crate::allocator::PageAllocator;
use crate::error::{check_page, CacheError, PageId};
use crate::radix::{InsertOutcome, MatchOutcome, NodeHandle, RadixTree, Token, TreeSizes};

/// Allocator plus radix tree over the same pages.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    alloc: PageAllocator,
    tree: RadixTree,
}

impl PrefixCache {
    /// A cache of `num_pages` pages of `page_size` tokens, all free.
    pub fn new(num_pages: usize, page_size: usize) -> Result<Self, CacheError> {
        Ok(PrefixCache {
            alloc: PageAllocator::new(num_pages)?,
            tree: RadixTree::new(num_pages, page_size)?,
        })
    }

    /// The allocator (read-only: changes go through the cache so ownership stays consistent).
    pub fn allocator(&self) -> &PageAllocator {
        &self.alloc
    }

    /// The tree (read-only).
    pub fn tree(&self) -> &RadixTree {
        &self.tree
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.tree.page_size()
    }

    /// Pool size.
    pub fn num_pages(&self) -> usize {
        self.alloc.num_pages()
    }

    /// Free pages.
    pub fn available(&self) -> usize {
        self.alloc.available()
    }

    /// Tree page counts.
    pub fn sizes(&self) -> TreeSizes {
        self.tree.sizes()
    }

    /// Allocates `n` pages for a request, without evicting.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<PageId>, CacheError> {
        self.alloc.alloc(n)
    }

    /// Allocates `n` pages, first evicting (LRU) as many tree pages as the shortfall needs.
    /// Fails with nothing evicted when even evicting every unlocked page would not do.
    pub fn alloc_evicting(&mut self, n: usize) -> Result<Vec<PageId>, CacheError> {
        let available = self.alloc.available();
        if n > available {
            let reachable = available + self.tree.sizes().evictable;
            if n > reachable {
                return Err(CacheError::OutOfPages {
                    requested: n,
                    available: reachable,
                });
            }
            self.evict(n - available);
        }
        self.alloc.alloc(n)
    }

    /// Returns a request's pages. Rejects (nothing freed) pages the tree owns, free pages
    /// and ids out of range.
    pub fn free(&mut self, pages: &[PageId]) -> Result<(), CacheError> {
        for &p in pages {
            check_page(p, self.num_pages())?;
            if self.tree.contains_page(p) {
                return Err(CacheError::PageInTree { page: p });
            }
        }
        self.alloc.free(pages)
    }

    /// See [`RadixTree::match_prefix`].
    pub fn match_prefix(&mut self, namespace: Option<&str>, tokens: &[Token]) -> MatchOutcome {
        self.tree.match_prefix(namespace, tokens)
    }

    /// See [`RadixTree::match_prefix_into`].
    pub fn match_prefix_into(
        &mut self,
        namespace: Option<&str>,
        tokens: &[Token],
        pages: &mut Vec<PageId>,
    ) -> NodeHandle {
        self.tree.match_prefix_into(namespace, tokens, pages)
    }

    /// Hands a request's whole pages to the tree (see [`RadixTree::insert`]) and frees the
    /// request's duplicates of pages the tree already had; the returned `duplicates` are
    /// already free. Every page must be allocated.
    pub fn insert(
        &mut self,
        namespace: Option<&str>,
        tokens: &[Token],
        pages: &[PageId],
    ) -> Result<InsertOutcome, CacheError> {
        for &p in pages {
            check_page(p, self.num_pages())?;
            if self.alloc.is_free(p) {
                return Err(CacheError::PageNotAllocated { page: p });
            }
        }
        let out = self.tree.insert(namespace, tokens, pages)?;
        // The tree checked that the duplicates are distinct and not its own; they are
        // allocated (checked above), so this cannot fail.
        self.alloc
            .free(&out.duplicates)
            .expect("duplicates are distinct allocated request pages");
        Ok(out)
    }

    /// See [`RadixTree::lock`].
    pub fn lock(&mut self, node: NodeHandle) -> Result<usize, CacheError> {
        self.tree.lock(node)
    }

    /// See [`RadixTree::unlock`].
    pub fn unlock(&mut self, node: NodeHandle) -> Result<usize, CacheError> {
        self.tree.unlock(node)
    }

    /// Evicts at least `n_pages` tree pages (LRU, unlocked leaves) if possible and frees them.
    /// Returns the number freed.
    pub fn evict(&mut self, n_pages: usize) -> usize {
        self.evict_pages(n_pages).len()
    }

    /// Like [`evict`](Self::evict), returning the freed page ids.
    pub fn evict_pages(&mut self, n_pages: usize) -> Vec<PageId> {
        let freed = self.tree.evict(n_pages);
        self.alloc
            .free(&freed)
            .expect("tree pages are allocated once each");
        freed
    }

    /// Empties the tree and frees its pages; request pages stay allocated.
    pub fn reset(&mut self) {
        let pages = self.tree.reset();
        self.alloc
            .free(&pages)
            .expect("tree pages are allocated once each");
    }

    /// Checks the allocator's, the tree's and the shared invariants (every tree page is
    /// allocated exactly once).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.alloc.check_invariants()?;
        self.tree.check_invariants()?;
        for p in 0..self.num_pages() as PageId {
            let count = self.alloc.refcount(p).map_err(|e| e.to_string())?;
            if self.tree.contains_page(p) && count != 1 {
                return Err(format!("tree page {p} has reference count {count}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(pages: &[u32], ps: usize) -> Vec<Token> {
        pages
            .iter()
            .flat_map(|&v| std::iter::repeat_n(v, ps))
            .collect()
    }

    #[test]
    fn request_lifecycle() {
        let ps = 4;
        let mut c = PrefixCache::new(8, ps).unwrap();
        // Request A: 3 pages, inserts 2 whole pages + keeps a partial third.
        let a = c.alloc(3).unwrap();
        let ta = toks(&[1, 2], ps);
        let ins = c.insert(None, &ta, &a[..2]).unwrap();
        assert_eq!(ins.prefix_pages, 0);
        assert!(ins.duplicates.is_empty());
        c.free(&a[2..]).unwrap();
        assert_eq!(c.sizes().total, 2);
        // Request B shares page 1, computes its own copy of it, then inserts.
        let m = c.match_prefix(None, &toks(&[1, 3], ps));
        assert_eq!(m.pages, vec![a[0]]);
        c.lock(m.node).unwrap();
        let b = c.alloc(2).unwrap();
        let ins = c.insert(None, &toks(&[1, 3], ps), &[a[0], b[0]]).unwrap();
        assert_eq!(ins.prefix_pages, 1);
        assert!(
            ins.duplicates.is_empty(),
            "the tree's own page is no duplicate"
        );
        c.free(&b[1..]).unwrap();
        c.unlock(m.node).unwrap();
        // Request C recomputed page 1 into its own page: that copy is a duplicate.
        let cc = c.alloc(1).unwrap();
        let ins = c.insert(None, &toks(&[1], ps), &cc).unwrap();
        assert_eq!(ins.duplicates, cc);
        assert!(c.allocator().is_free(cc[0]));
        c.check_invariants().unwrap();
        assert_eq!(c.available(), 8 - 3);
        assert_eq!(c.evict(100), 3);
        assert_eq!(c.available(), 8);
        c.check_invariants().unwrap();
    }

    #[test]
    fn free_rejects_tree_pages_and_double_free() {
        let mut c = PrefixCache::new(4, 2).unwrap();
        let p = c.alloc(2).unwrap();
        c.insert(None, &[5, 5], &p[..1]).unwrap();
        assert_eq!(
            c.free(&[p[1], p[0]]).unwrap_err(),
            CacheError::PageInTree { page: p[0] }
        );
        c.free(&p[1..]).unwrap();
        assert_eq!(
            c.free(&p[1..]).unwrap_err(),
            CacheError::PageNotAllocated { page: p[1] }
        );
        assert_eq!(
            c.insert(None, &[6, 6], &p[1..]).unwrap_err(),
            CacheError::PageNotAllocated { page: p[1] }
        );
        c.check_invariants().unwrap();
    }

    #[test]
    fn alloc_evicting_is_all_or_nothing() {
        let mut c = PrefixCache::new(4, 1).unwrap();
        let p = c.alloc(3).unwrap();
        // Three nested inserts make three one-page nodes, so eviction can take just one.
        for n in 1..=3 {
            c.insert(None, &[1, 2, 3][..n], &p[..n]).unwrap();
        }
        let ins = c.insert(None, &[1, 2, 3], &p).unwrap();
        c.lock(ins.node).unwrap();
        assert!(c.alloc_evicting(2).is_err());
        assert_eq!(c.sizes().total, 3, "nothing evicted on failure");
        c.unlock(ins.node).unwrap();
        assert_eq!(c.alloc_evicting(2).unwrap().len(), 2);
        assert_eq!(c.sizes().total, 2, "evicted only the shortfall");
        c.check_invariants().unwrap();
    }
}
