//! Page allocator over a fixed pool of pages, with reference counts and companion pages.
//!
//! A page is free (count 0) or allocated (count >= 1). `alloc` hands out free pages with
//! count 1, `retain` adds a reference, `free` drops one and returns the page to the free list
//! at zero. Every call validates its whole argument first: on `Err` no count has changed.
//!
//! Pages below `reserved` are never handed out (SGLang's paged allocator keeps page 0 as the
//! padding page). A page may own *companion* pages ([`PageAllocator::alloc_companions`]):
//! extra pages nobody names directly, freed when their owner's count reaches zero.
//!
//! [`PageAllocator::alloc_extend`] and [`PageAllocator::alloc_decode`] are SGLang's paged
//! `alloc_extend` / `alloc_decode` over host lengths: they take the pages a batch needs and
//! describe every new token location as `value + (last_loc[owner] + 1)` (`owner` = the batch
//! size for "no continuation"), so the caller builds the locations on its device from the
//! requests' last locations without reading them back.

use std::collections::HashMap;

use crate::error::{check_page, CacheError, PageId};

/// Largest pool: 2^28 pages (2^35 tokens of 128-token pages). It keeps page ids inside
/// `u32` and the per-page tables of a pool (4 bytes each) at 1 GiB at most.
pub const MAX_PAGES: usize = 1 << 28;

const NO_OWNER: PageId = PageId::MAX;

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

/// New token locations of a batch, from [`PageAllocator::alloc_extend`] or
/// [`PageAllocator::alloc_decode`]: token `t` goes to
/// `values[t] + (last_loc[owners[t]] + 1)`, where `owners[t] == batch size` adds nothing
/// (the token starts a new page: `values[t]` is its absolute location).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Offsets past the request's last location, or absolute locations.
    pub values: Vec<i64>,
    /// Request index per token, or the batch size.
    pub owners: Vec<i64>,
    /// Whether any token continues a request's partly filled page (else `values` is final).
    pub continuing: bool,
    /// The new pages, in batch order.
    pub pages: Vec<PageId>,
    /// The new pages that are page 0 of their request and got companions.
    pub first_pages: Vec<PageId>,
    /// `companions_per_page` companions per entry of `first_pages`, in that order.
    pub companions: Vec<PageId>,
}

/// Reference-counted allocator of page ids `reserved..num_pages`.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    refcount: Vec<u32>,
    // A stack: `alloc` pops from the end. Filled in descending order so that a fresh pool
    // hands out the lowest ids first (deterministic ids make tests and traces reproducible).
    free: Vec<PageId>,
    reserved: usize,
    // owner[p]: the page whose companion p is, or NO_OWNER.
    owner: Vec<PageId>,
    companions: HashMap<PageId, Box<[PageId]>>,
    companion_pages: usize,
}

fn lengths_error(name: &'static str, rule: &str, got: i64) -> CacheError {
    CacheError::InvalidArgument {
        name,
        rule: rule.to_owned(),
        got,
    }
}

impl PageAllocator {
    /// A pool of `num_pages` free pages; `num_pages` must be in `1..=MAX_PAGES`.
    pub fn new(num_pages: usize) -> Result<Self, CacheError> {
        Self::with_reserved(num_pages, 0)
    }

    /// A pool of `num_pages` pages of which the first `reserved` are never handed out.
    pub fn with_reserved(num_pages: usize, reserved: usize) -> Result<Self, CacheError> {
        check_num_pages(num_pages)?;
        if reserved >= num_pages {
            return Err(CacheError::InvalidArgument {
                name: "reserved",
                rule: format!("must be below num_pages ({num_pages})"),
                got: reserved as i64,
            });
        }
        let mut a = PageAllocator {
            refcount: vec![0; num_pages],
            free: Vec::with_capacity(num_pages),
            reserved,
            owner: vec![NO_OWNER; num_pages],
            companions: HashMap::new(),
            companion_pages: 0,
        };
        a.reset();
        Ok(a)
    }

    /// Frees every page, whatever its count, and forgets every companion.
    pub fn reset(&mut self) {
        self.refcount.iter_mut().for_each(|c| *c = 0);
        // Reserved pages count as permanently held, so the invariant "count 0 = free" holds.
        self.refcount[..self.reserved]
            .iter_mut()
            .for_each(|c| *c = 1);
        self.owner.iter_mut().for_each(|o| *o = NO_OWNER);
        self.companions.clear();
        self.companion_pages = 0;
        self.free.clear();
        // num_pages <= MAX_PAGES < u32::MAX, so every id fits.
        self.free
            .extend((self.reserved as PageId..self.refcount.len() as PageId).rev());
    }

    /// Size of the pool (reserved pages included).
    pub fn num_pages(&self) -> usize {
        self.refcount.len()
    }

    /// Pages below this id are never handed out.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Number of free pages.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// The free pages, the next to be handed out last.
    pub fn free_list(&self) -> &[PageId] {
        &self.free
    }

    /// Orders the free list so that the lowest ids go out first (SGLang's
    /// `merge_and_sort_free`).
    pub fn sort_free(&mut self) {
        self.free.sort_unstable_by(|a, b| b.cmp(a));
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

    /// The companions of `page` (empty if it has none).
    pub fn companions_of(&self, page: PageId) -> &[PageId] {
        self.companions.get(&page).map_or(&[], |c| c)
    }

    /// The page `page` is a companion of, if it is one.
    pub fn owner_of(&self, page: PageId) -> Option<PageId> {
        match self.owner.get(page as usize) {
            Some(&o) if o != NO_OWNER => Some(o),
            _ => None,
        }
    }

    /// All companion pages allocated now.
    pub fn companion_pages(&self) -> usize {
        self.companion_pages
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

    /// `p` is a page a caller may hold: in the pool, not reserved, not a companion, and
    /// allocated (one check for `free`, `retain` and companion owners).
    fn check_held(&self, p: PageId) -> Result<(), CacheError> {
        check_page(p, self.num_pages())?;
        if (p as usize) < self.reserved {
            return Err(CacheError::ReservedPage { page: p });
        }
        if let Some(owner) = self.owner_of(p) {
            return Err(CacheError::CompanionPage { page: p, owner });
        }
        if self.refcount[p as usize] == 0 {
            return Err(CacheError::PageNotAllocated { page: p });
        }
        Ok(())
    }

    fn check_owner(&self, p: PageId) -> Result<(), CacheError> {
        self.check_held(p)?;
        if self.companions.contains_key(&p) {
            return Err(CacheError::InvalidArgument {
                name: "owners",
                rule: "must not have companions yet".to_owned(),
                got: p as i64,
            });
        }
        Ok(())
    }

    /// Gives each of `owners` (allocated pages, distinct, without companions) `per_page`
    /// companion pages; returns them, `per_page` per owner in order. All or nothing.
    pub fn alloc_companions(
        &mut self,
        owners: &[PageId],
        per_page: usize,
    ) -> Result<Vec<PageId>, CacheError> {
        for (i, &p) in owners.iter().enumerate() {
            self.check_owner(p)?;
            if owners[..i].contains(&p) {
                return Err(CacheError::DuplicatePage { page: p });
            }
        }
        let mut out = Vec::with_capacity(owners.len() * per_page);
        self.alloc_into(owners.len() * per_page, &mut out)?;
        self.record_companions(owners, &out, per_page);
        Ok(out)
    }

    fn record_companions(&mut self, owners: &[PageId], pages: &[PageId], per_page: usize) {
        if per_page == 0 {
            return;
        }
        for (&o, c) in owners.iter().zip(pages.chunks_exact(per_page)) {
            for &p in c {
                self.owner[p as usize] = o;
            }
            self.companions.insert(o, c.into());
        }
        self.companion_pages += pages.len();
    }

    fn check_lengths(prefix: &[i64], seq: &[i64]) -> Result<(), CacheError> {
        if prefix.len() != seq.len() {
            return Err(lengths_error(
                "prefix_lens",
                &format!("must have one entry per request ({})", seq.len()),
                prefix.len() as i64,
            ));
        }
        for (&p, &s) in prefix.iter().zip(seq) {
            if p < 0 || s < p {
                return Err(lengths_error(
                    "seq_lens",
                    &format!("must be >= prefix_lens >= 0 (prefix {p})"),
                    s,
                ));
            }
        }
        Ok(())
    }

    fn check_page_size(page_size: usize) -> Result<i64, CacheError> {
        if page_size == 0 || page_size > crate::radix::MAX_PAGE_SIZE {
            return Err(lengths_error(
                "page_size",
                &format!("must be in 1..={}", crate::radix::MAX_PAGE_SIZE),
                page_size as i64,
            ));
        }
        Ok(page_size as i64)
    }

    /// Pages for an extend batch (SGLang's paged `alloc_extend`): request `i` holds
    /// `prefix[i]` tokens and grows to `seq[i]`; it fills its partly filled last page first,
    /// then takes whole new pages. A request with no prefix gets `companions_per_page`
    /// companions for its first page. All or nothing ([`CacheError::OutOfPages`] with the
    /// total need, companions included).
    pub fn alloc_extend(
        &mut self,
        prefix: &[i64],
        seq: &[i64],
        page_size: usize,
        companions_per_page: usize,
    ) -> Result<Placement, CacheError> {
        Self::check_lengths(prefix, seq)?;
        let ps = Self::check_page_size(page_size)?;
        let mut need = 0usize;
        let mut firsts = 0usize;
        let mut tokens = 0usize;
        for (&p, &s) in prefix.iter().zip(seq) {
            need += ((s + ps - 1) / ps - (p + ps - 1) / ps) as usize;
            firsts += usize::from(p == 0 && s > 0);
            tokens += (s - p) as usize;
        }
        let total = need + firsts * companions_per_page;
        if total > self.free.len() {
            return Err(CacheError::OutOfPages {
                requested: total,
                available: self.free.len(),
            });
        }
        let mut out = Placement {
            values: Vec::with_capacity(tokens),
            owners: Vec::with_capacity(tokens),
            ..Placement::default()
        };
        self.alloc_into(need, &mut out.pages)
            .expect("checked above");
        let bs = seq.len() as i64;
        let mut next = 0;
        for (i, (&p, &s)) in prefix.iter().zip(seq).enumerate() {
            let ceil_p = ((p + ps - 1) / ps * ps).min(s);
            for off in 0..ceil_p - p {
                out.values.push(off);
                out.owners.push(i as i64);
            }
            out.continuing |= ceil_p > p;
            let mut pos = ceil_p;
            while pos < s {
                let page = out.pages[next];
                next += 1;
                if pos == 0 && companions_per_page > 0 {
                    out.first_pages.push(page);
                }
                let end = (pos + ps).min(s);
                let base = page as i64 * ps;
                out.values.extend((0..end - pos).map(|j| base + j));
                out.owners
                    .extend(std::iter::repeat_n(bs, (end - pos) as usize));
                pos = end;
            }
        }
        self.take_companions(&mut out, companions_per_page);
        Ok(out)
    }

    /// One new token per request (SGLang's paged `alloc_decode`): request `i` grows to
    /// `seq[i]` tokens; it takes a new page when its new token starts one (page 0: with
    /// companions). All or nothing.
    pub fn alloc_decode(
        &mut self,
        seq: &[i64],
        page_size: usize,
        companions_per_page: usize,
    ) -> Result<Placement, CacheError> {
        let ps = Self::check_page_size(page_size)?;
        if let Some(&s) = seq.iter().find(|&&s| s < 1) {
            return Err(lengths_error(
                "seq_lens",
                "must be >= 1 in a decode batch",
                s,
            ));
        }
        let need = seq.iter().filter(|&&s| (s - 1) % ps == 0).count();
        let firsts = seq.iter().filter(|&&s| s == 1).count();
        let total = need + firsts * companions_per_page;
        if total > self.free.len() {
            return Err(CacheError::OutOfPages {
                requested: total,
                available: self.free.len(),
            });
        }
        let mut out = Placement {
            values: Vec::with_capacity(seq.len()),
            owners: Vec::with_capacity(seq.len()),
            ..Placement::default()
        };
        self.alloc_into(need, &mut out.pages)
            .expect("checked above");
        let bs = seq.len() as i64;
        let mut next = 0;
        for (i, &s) in seq.iter().enumerate() {
            if (s - 1) % ps == 0 {
                let page = out.pages[next];
                next += 1;
                if s == 1 && companions_per_page > 0 {
                    out.first_pages.push(page);
                }
                out.values.push(page as i64 * ps);
                out.owners.push(bs);
            } else {
                out.values.push(0);
                out.owners.push(i as i64);
                out.continuing = true;
            }
        }
        self.take_companions(&mut out, companions_per_page);
        Ok(out)
    }

    fn take_companions(&mut self, out: &mut Placement, per_page: usize) {
        if out.first_pages.is_empty() {
            return;
        }
        let mut comp = Vec::with_capacity(out.first_pages.len() * per_page);
        self.alloc_into(out.first_pages.len() * per_page, &mut comp)
            .expect("counted with the batch's pages");
        self.record_companions(&out.first_pages, &comp, per_page);
        out.companions = comp;
    }

    /// Drops one reference from each page (a page may appear as often as it has references).
    /// Pages reaching zero go back to the free list, with their companions. Errors, with
    /// nothing changed: an id outside the pool, a reserved page, a companion, or more drops
    /// than references (double free).
    pub fn free(&mut self, pages: &[PageId]) -> Result<(), CacheError> {
        for (i, &p) in pages.iter().enumerate() {
            if let Err(e) = self.check_held(p) {
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
                if !self.companions.is_empty() {
                    self.release_companions(p);
                }
            }
        }
        for &p in pages {
            if self.refcount[p as usize] == u32::MAX {
                self.refcount[p as usize] = 0;
            }
        }
        Ok(())
    }

    fn release_companions(&mut self, owner: PageId) {
        if let Some(comp) = self.companions.remove(&owner) {
            for &c in comp.iter() {
                self.refcount[c as usize] = 0;
                self.owner[c as usize] = NO_OWNER;
                self.free.push(c);
            }
            self.companion_pages -= comp.len();
        }
    }

    /// Adds one reference to each page; every page must be allocated (and not reserved or a
    /// companion). Nothing changes on error.
    pub fn retain(&mut self, pages: &[PageId]) -> Result<(), CacheError> {
        for &p in pages {
            self.check_held(p)?;
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

    /// Checks that the free list holds exactly the pages of count zero, once each, and that
    /// the companion map and the owner table agree.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![false; self.num_pages()];
        for &p in &self.free {
            let i = p as usize;
            if i >= seen.len() || seen[i] {
                return Err(format!("free list holds {p} twice or out of range"));
            }
            if i < self.reserved {
                return Err(format!("reserved page {p} is on the free list"));
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
        let mut owned = 0;
        for (&o, comp) in &self.companions {
            if self.refcount[o as usize] == 0 || self.owner[o as usize] != NO_OWNER {
                return Err(format!("companion owner {o} is free or a companion itself"));
            }
            for &c in comp.iter() {
                if self.owner[c as usize] != o || self.refcount[c as usize] != 1 {
                    return Err(format!("companion {c} of {o} is not held for it"));
                }
            }
            owned += comp.len();
        }
        let marked = self.owner.iter().filter(|&&o| o != NO_OWNER).count();
        if owned != marked || owned != self.companion_pages {
            return Err(format!(
                "{owned} companions in the map, {marked} marked, {} counted",
                self.companion_pages
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

    #[test]
    fn reserved_pages_are_never_handed_out() {
        let mut a = PageAllocator::with_reserved(4, 1).unwrap();
        assert_eq!(a.available(), 3);
        assert_eq!(a.alloc(3).unwrap(), vec![1, 2, 3]);
        assert_eq!(
            a.free(&[0]).unwrap_err(),
            CacheError::ReservedPage { page: 0 }
        );
        a.free(&[2, 1]).unwrap();
        a.reset();
        assert_eq!(a.alloc(3).unwrap(), vec![1, 2, 3]);
        a.check_invariants().unwrap();
        assert!(PageAllocator::with_reserved(2, 2).is_err());
    }

    #[test]
    fn companions_are_freed_with_their_owner() {
        let mut a = PageAllocator::new(8).unwrap();
        let p = a.alloc(2).unwrap();
        let c = a.alloc_companions(&p[..1], 2).unwrap();
        assert_eq!(c, vec![2, 3]);
        assert_eq!(a.companions_of(0), &[2, 3]);
        assert_eq!(a.owner_of(3), Some(0));
        assert_eq!(a.companion_pages(), 2);
        assert_eq!(
            a.free(&[1, 3]).unwrap_err(),
            CacheError::CompanionPage { page: 3, owner: 0 }
        );
        assert!(
            a.alloc_companions(&p[..1], 1).is_err(),
            "already has companions"
        );
        assert_eq!(a.available(), 4);
        a.retain(&[0]).unwrap();
        a.free(&[0]).unwrap();
        assert_eq!(a.available(), 4, "still referenced: companions stay");
        a.free(&[0]).unwrap();
        assert_eq!(a.available(), 7);
        assert_eq!(a.companion_pages(), 0);
        a.check_invariants().unwrap();
        // All or nothing.
        let q = a.alloc(1).unwrap();
        let before = a.available();
        assert!(matches!(
            a.alloc_companions(&q, 100).unwrap_err(),
            CacheError::OutOfPages { .. }
        ));
        assert_eq!(a.available(), before);
        a.check_invariants().unwrap();
    }

    #[test]
    fn extend_places_tokens_like_sglang() {
        let mut a = PageAllocator::with_reserved(16, 1).unwrap();
        // Request 0: prefix 2 of page size 4 (continues 2 tokens), grows to 9: 2 new pages.
        // Request 1: fresh, 3 tokens: 1 new page, its first page (1 companion).
        // Request 2: prefix 4 (page aligned), grows to 5.
        let pl = a.alloc_extend(&[2, 0, 4], &[9, 3, 5], 4, 1).unwrap();
        assert_eq!(pl.pages, vec![1, 2, 3, 4]);
        assert!(pl.continuing);
        assert_eq!(pl.values, vec![0, 1, 4, 5, 6, 7, 8, 12, 13, 14, 16]);
        assert_eq!(pl.owners, vec![0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3]);
        assert_eq!(pl.first_pages, vec![3]);
        assert_eq!(pl.companions, vec![5]);
        assert_eq!(a.available(), 10);
        // Short: nothing taken.
        assert!(matches!(
            a.alloc_extend(&[0], &[41], 4, 0).unwrap_err(),
            CacheError::OutOfPages {
                requested: 11,
                available: 10
            }
        ));
        assert!(a.alloc_extend(&[3], &[2], 4, 0).is_err());
        assert_eq!(a.available(), 10);
        a.check_invariants().unwrap();
    }

    #[test]
    fn decode_takes_a_page_when_a_token_starts_one() {
        let mut a = PageAllocator::with_reserved(8, 1).unwrap();
        let pl = a.alloc_decode(&[5, 7, 1], 4, 2).unwrap();
        assert_eq!(pl.pages, vec![1, 2]);
        assert_eq!(pl.values, vec![4, 0, 8]);
        assert_eq!(pl.owners, vec![3, 1, 3]);
        assert_eq!(pl.first_pages, vec![2]);
        assert_eq!(pl.companions, vec![3, 4]);
        let pl = a.alloc_decode(&[6], 4, 0).unwrap();
        assert!(pl.pages.is_empty() && pl.continuing);
        assert!(a.alloc_decode(&[0], 4, 0).is_err());
        a.check_invariants().unwrap();
    }

    #[test]
    fn sort_free_hands_out_lowest_first() {
        let mut a = PageAllocator::new(6).unwrap();
        let p = a.alloc(6).unwrap();
        a.free(&[p[4], p[1], p[3]]).unwrap();
        a.sort_free();
        assert_eq!(a.alloc(3).unwrap(), vec![1, 3, 4]);
    }
}
