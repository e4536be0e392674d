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
use crate::radix::{InsertOutcome, KeyToken, MatchOutcome, NodeHandle, RadixTree, TreeSizes};

/// What [`PrefixCache::admit`] did for a new request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The request's pages in token order: the matched (tree) pages, then fresh ones.
    pub pages: Vec<PageId>,
    /// Leading pages that came from the tree.
    pub matched_pages: usize,
    /// The locked node at the end of the match.
    pub node: NodeHandle,
    /// Tree pages evicted to make room.
    pub evicted_pages: usize,
}

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
    pub fn match_prefix<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
    ) -> MatchOutcome {
        self.tree.match_prefix(namespace, tokens)
    }

    /// See [`RadixTree::match_prefix_into`].
    pub fn match_prefix_into<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &mut Vec<PageId>,
    ) -> NodeHandle {
        self.tree.match_prefix_into(namespace, tokens, pages)
    }

    /// Hands a request's whole pages to the tree (see [`RadixTree::insert`]) and frees the
    /// request's duplicates of pages the tree already had; the returned `duplicates` are
    /// already free. Every page must be allocated.
    pub fn insert<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &[PageId],
    ) -> Result<InsertOutcome, CacheError> {
        self.insert_pages(namespace, tokens, pages, false)
    }

    /// `insert`; with `row`, `pages` are the request's KV row (see
    /// [`RadixTree::insert_row`]).
    fn insert_pages<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &[PageId],
        row: bool,
    ) -> Result<InsertOutcome, CacheError> {
        for &p in pages {
            check_page(p, self.num_pages())?;
            if self.alloc.is_free(p) {
                return Err(CacheError::PageNotAllocated { page: p });
            }
        }
        let out = if row {
            self.tree.insert_row(namespace, tokens, pages, None)?
        } else {
            self.tree.insert(namespace, tokens, pages)?
        };
        // The tree checked that the duplicates are distinct and not its own; they are
        // allocated (checked above), so this cannot fail.
        self.alloc
            .free(&out.duplicates)
            .expect("duplicates are distinct allocated request pages");
        Ok(out)
    }

    /// Admits a request whose first `prompt_len` tokens of `tokens` are its prompt and that
    /// needs pages for `total_len` tokens: matches the prompt's cached prefix, locks it,
    /// evicts the shortfall and allocates the remaining pages, all or nothing (on
    /// `OutOfPages` the lock is dropped again and no page is taken).
    pub fn admit<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        total_len: usize,
    ) -> Result<Admission, CacheError> {
        let mut pages = Vec::new();
        let node = self.tree.match_prefix_into(namespace, tokens, &mut pages);
        let matched = pages.len();
        self.tree.lock(node)?;
        let need = total_len
            .saturating_sub(matched * self.page_size())
            .div_ceil(self.page_size());
        let available = self.alloc.available();
        let mut evicted = 0;
        if need > available {
            let reachable = available + self.tree.sizes().evictable;
            if need > reachable {
                self.tree.unlock(node).expect("locked above");
                return Err(CacheError::OutOfPages {
                    requested: need,
                    available: reachable,
                });
            }
            evicted = self.evict(need - available);
        }
        self.alloc
            .alloc_into(need, &mut pages)
            .expect("enough pages after eviction");
        Ok(Admission {
            pages,
            matched_pages: matched,
            node,
            evicted_pages: evicted,
        })
    }

    /// Ends a request: inserts its whole pages (when `insert`; duplicates freed), frees its
    /// remaining pages (the partial last page, or all of them without `insert`) and drops
    /// its lock on `node`. `pages` holds the request's pages in token order, the tree's
    /// own included. Checks everything first: on `Err` nothing changed.
    pub fn release<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &[PageId],
        node: NodeHandle,
        insert: bool,
    ) -> Result<InsertOutcome, CacheError> {
        if self.tree.lock_ref(node)? == 0 && !node.is_root() {
            return Err(CacheError::LockUnderflow { handle: node.raw() });
        }
        let whole = if insert {
            (tokens.len() / self.page_size()).min(pages.len())
        } else {
            0
        };
        let (kept, rest) = pages.split_at(whole);
        let mut seen = std::collections::HashSet::new();
        let listed_twice = |i: usize, p: PageId, seen: &mut std::collections::HashSet<PageId>| {
            // A request's tail is one page or two; a set only pays off for long lists.
            if rest.len() <= 8 {
                rest[..i].contains(&p) || kept.contains(&p)
            } else {
                if seen.is_empty() {
                    seen.extend(kept.iter().copied());
                }
                !seen.insert(p)
            }
        };
        for (i, &p) in rest.iter().enumerate() {
            check_page(p, self.num_pages())?;
            if self.alloc.is_free(p) {
                return Err(CacheError::PageNotAllocated { page: p });
            }
            // The tree's own pages (a matched prefix) are not the request's to free; with
            // `insert` they sit among the whole pages, so only a request that is not
            // inserting lists them here, and they are skipped below.
            if insert && self.tree.contains_page(p) {
                return Err(CacheError::PageInTree { page: p });
            }
            if listed_twice(i, p, &mut seen) {
                return Err(CacheError::DuplicatePage { page: p });
            }
        }
        let out = if insert {
            // `pages` is the request's row: its matched prefix is the tree's own pages.
            self.insert_pages(namespace, &tokens[..whole * self.page_size()], kept, true)?
        } else {
            InsertOutcome {
                prefix_pages: 0,
                duplicates: Vec::new(),
                node: NodeHandle::ROOT,
            }
        };
        let own: Vec<PageId> = rest
            .iter()
            .copied()
            .filter(|&p| !self.tree.contains_page(p))
            .collect();
        self.alloc.free(&own).expect("checked above");
        self.tree.unlock(node).expect("checked above");
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
    use crate::radix::Token;

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

    #[test]
    fn admit_and_release() {
        let ps = 2;
        let mut c = PrefixCache::new(6, ps).unwrap();
        let t = toks(&[1, 2, 3], ps);
        let mut t5 = t.clone();
        t5.push(9); // 7 tokens: 3 whole pages + a partial one
        let a = c.admit(None, &t5, t5.len()).unwrap();
        assert_eq!((a.matched_pages, a.pages.len(), a.evicted_pages), (0, 4, 0));
        let out = c.release(None, &t5, &a.pages, a.node, true).unwrap();
        assert_eq!(out.prefix_pages, 0);
        assert_eq!(c.sizes().total, 3);
        assert_eq!(c.available(), 3, "the partial page was freed");
        // Second request shares the 3 pages; 4 more would need its own locked prefix.
        assert!(c.admit(None, &t, 7 * ps).is_err());
        let b = c.admit(None, &t, 6 * ps).unwrap();
        assert_eq!((b.matched_pages, b.pages.len()), (3, 6));
        assert!(
            c.admit(None, &toks(&[7], ps), ps).is_err(),
            "pool exhausted, prefix locked"
        );
        let before = (c.available(), c.sizes());
        // Bad releases change nothing.
        let mut dup = b.pages.clone();
        dup[5] = dup[4];
        assert_eq!(
            c.release(None, &t, &dup, b.node, true).unwrap_err(),
            CacheError::DuplicatePage { page: dup[4] }
        );
        assert!(c
            .release(None, &t, &b.pages, NodeHandle::from_raw(7), true)
            .is_err());
        assert_eq!((c.available(), c.sizes()), before);
        // Without insert, only the request's own pages are freed.
        c.release(None, &t, &b.pages, b.node, false).unwrap();
        assert_eq!(
            (c.available(), c.sizes().total, c.sizes().protected),
            (3, 3, 0)
        );
        assert_eq!(
            c.release(None, &t, &[], b.node, false).unwrap_err(),
            CacheError::LockUnderflow {
                handle: b.node.raw()
            }
        );
        c.check_invariants().unwrap();
    }
}
