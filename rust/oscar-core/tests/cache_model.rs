//! Model-based tests of the prefix cache (allocator + radix tree) against a plain model.
//!
//! The model keeps, per namespace, the set of cached page-aligned prefixes (a prefix of k
//! whole pages maps to the page id of its k-th page) and the running requests with the pages
//! they own and the prefix they lock. Random operation sequences drive the cache the way the
//! SGLang scheduler does (match + lock, allocate, checkpoint = insert + re-match + relock,
//! finish = unlock + free, evict, bad calls) and check after every step:
//! - every page is exactly one of: free, in the tree, held by a running request;
//! - locked pages survive every eviction; evictions free only unlocked pages, at least the
//!   pages asked for when that many are evictable, and leave the tree prefix-closed;
//! - `match_prefix` returns what the model predicts, in particular the inserted pages right
//!   after an insert;
//! - bad calls fail with the right error and change nothing.

use std::collections::{HashMap, HashSet};

use oscar_core::{CacheError, NodeHandle, PageId, PrefixCache, Token};
use proptest::prelude::*;

const NAMESPACES: [Option<&str>; 3] = [None, Some("lora-1"), Some("salt-x")];

#[derive(Debug, Clone)]
enum Op {
    Start {
        ns: usize,
        base: usize,
        cut: usize,
        tail: Vec<u8>,
        /// Through `PrefixCache::admit` instead of match + lock + evict + alloc.
        admit: bool,
    },
    Checkpoint {
        req: usize,
    },
    Finish {
        req: usize,
        checkpoint: bool,
        /// Through `PrefixCache::release` instead of insert + free + unlock.
        release: bool,
    },
    Evict {
        pages: usize,
    },
    Touch {
        ns: usize,
        base: usize,
        cut: usize,
    },
    BadUnlock,
    BadFree {
        tree_page: bool,
    },
    BadInsert {
        req: usize,
    },
    Reset,
}

#[derive(Debug)]
struct Req {
    ns: Option<&'static str>,
    tokens: Vec<Token>,
    /// One page per started page of `tokens`.
    pages: Vec<PageId>,
    /// Which of `pages` the request owns (the rest are tree pages it locked).
    owned: Vec<bool>,
    /// Whole pages covered by the lock.
    locked: usize,
    node: NodeHandle,
}

type Key = (Option<&'static str>, Vec<Token>);

struct Model {
    ps: usize,
    cache: PrefixCache,
    bases: Vec<Vec<Token>>,
    /// Cached prefix -> page id of its last page.
    cached: HashMap<Key, PageId>,
    reqs: Vec<Req>,
}

impl Model {
    fn new(num_pages: usize, ps: usize, bases: Vec<Vec<Token>>) -> Self {
        Model {
            ps,
            cache: PrefixCache::new(num_pages, ps).unwrap(),
            bases,
            cached: HashMap::new(),
            reqs: Vec::new(),
        }
    }

    fn key(&self, ns: Option<&'static str>, tokens: &[Token], pages: usize) -> Key {
        (ns, tokens[..pages * self.ps].to_vec())
    }

    /// Pages of the longest cached prefix of `tokens`.
    fn predict_match(&self, ns: Option<&'static str>, tokens: &[Token]) -> Vec<PageId> {
        let mut out = Vec::new();
        for k in 1..=tokens.len() / self.ps {
            match self.cached.get(&self.key(ns, tokens, k)) {
                Some(&p) => out.push(p),
                None => break,
            }
        }
        out
    }

    fn tokens_of(&self, base: usize, cut: usize, tail: &[u8]) -> Vec<Token> {
        let b = &self.bases[base % self.bases.len()];
        let mut t = b[..cut % (b.len() + 1)].to_vec();
        t.extend(tail.iter().map(|&x| x as Token % 3));
        t
    }

    fn locked_keys(&self) -> HashSet<Key> {
        let mut s = HashSet::new();
        for r in &self.reqs {
            for k in 1..=r.locked {
                s.insert(self.key(r.ns, &r.tokens, k));
            }
        }
        s
    }

    fn apply_evict(&mut self, asked: usize, freed: &[PageId], evictable_before: usize) {
        let locked = self.locked_keys();
        let freed_set: HashSet<PageId> = freed.iter().copied().collect();
        assert_eq!(freed_set.len(), freed.len(), "a page freed twice");
        let gone: Vec<Key> = self
            .cached
            .iter()
            .filter(|(_, p)| freed_set.contains(p))
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(
            gone.len(),
            freed.len(),
            "evicted a page that was not cached"
        );
        for k in &gone {
            assert!(!locked.contains(k), "evicted a locked page");
            self.cached.remove(k);
        }
        if asked <= evictable_before {
            assert!(
                freed.len() >= asked,
                "freed {} < asked {asked}",
                freed.len()
            );
        } else {
            assert_eq!(
                freed.len(),
                evictable_before,
                "did not evict everything evictable"
            );
        }
        // Prefix-closed: every cached prefix's parent prefix is cached.
        for (ns, t) in self.cached.keys() {
            if t.len() > self.ps {
                let parent = (*ns, t[..t.len() - self.ps].to_vec());
                assert!(self.cached.contains_key(&parent), "evicted an inner node");
            }
        }
    }

    fn evict(&mut self, n: usize) {
        let before = self.cache.sizes().evictable;
        let freed = self.cache.evict_pages(n);
        self.apply_evict(n, &freed, before);
    }

    /// Hands the request's whole pages to the tree, then relocks the whole inserted path.
    fn checkpoint(&mut self, i: usize) {
        let ps = self.ps;
        let r = &self.reqs[i];
        let whole = r.tokens.len() / ps;
        let predicted = self.predict_match(r.ns, &r.tokens);
        let prefix = predicted.len();
        let expect_dups: Vec<PageId> = (0..prefix)
            .filter(|&k| r.pages[k] != predicted[k])
            .map(|k| {
                assert!(r.owned[k], "a locked tree page changed under a request");
                r.pages[k]
            })
            .collect();
        let out = self
            .cache
            .insert(r.ns, &r.tokens, &r.pages[..whole])
            .unwrap();
        assert_eq!(out.prefix_pages, prefix);
        assert_eq!(out.duplicates, expect_dups);
        let r = &self.reqs[i];
        let (ns, tokens) = (r.ns, r.tokens.clone());
        for k in prefix..whole {
            let key = self.key(ns, &tokens, k + 1);
            self.cached.insert(key, self.reqs[i].pages[k]);
        }
        let m = self.cache.match_prefix(ns, &tokens);
        let expect: Vec<PageId> = self.predict_match(ns, &tokens);
        assert_eq!(
            m.pages.len(),
            whole,
            "match after insert returns every inserted page"
        );
        assert_eq!(m.pages, expect);
        assert_eq!(m.node, out.node);
        self.cache.lock(m.node).unwrap();
        let r = &mut self.reqs[i];
        self.cache.unlock(r.node).unwrap();
        r.node = m.node;
        r.locked = whole;
        for k in 0..whole {
            r.pages[k] = m.pages[k];
            r.owned[k] = false;
        }
    }

    /// `PrefixCache::admit`: the model's match prediction, the evictions it implies.
    fn admit(&mut self, ns: Option<&'static str>, tokens: Vec<Token>) {
        let predicted = self.predict_match(ns, &tokens);
        let need_total = tokens.len().div_ceil(self.ps);
        let need = need_total - predicted.len();
        // Eviction runs after the request's own prefix is locked.
        let locked_before = self.locked_keys();
        let newly_locked = (1..=predicted.len())
            .filter(|&k| !locked_before.contains(&self.key(ns, &tokens, k)))
            .count();
        let evictable = self.cache.sizes().evictable - newly_locked;
        let available = self.cache.available();
        match self.cache.admit(ns, &tokens, tokens.len()) {
            Ok(a) => {
                let m = predicted.len();
                assert_eq!(a.matched_pages, m);
                assert_eq!(&a.pages[..m], &predicted[..]);
                assert_eq!(a.pages.len(), need_total);
                let mut owned = vec![false; m];
                owned.resize(need_total, true);
                self.reqs.push(Req {
                    ns,
                    tokens,
                    pages: a.pages,
                    owned,
                    locked: m,
                    node: a.node,
                });
                let freed: Vec<PageId> = self
                    .cached
                    .values()
                    .copied()
                    .filter(|&p| !self.cache.tree().contains_page(p))
                    .collect();
                assert_eq!(freed.len(), a.evicted_pages);
                if need > available {
                    self.apply_evict(need - available, &freed, evictable);
                } else {
                    assert!(freed.is_empty(), "evicted without need");
                }
            }
            Err(CacheError::OutOfPages { .. }) => {
                assert!(need > available + evictable);
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// `PrefixCache::release`: insert (optionally), free the rest, unlock, in one call.
    fn release(&mut self, i: usize, insert: bool) {
        let ps = self.ps;
        let r = self.reqs.swap_remove(i);
        let whole = r.tokens.len() / ps;
        let predicted = self.predict_match(r.ns, &r.tokens);
        let out = self
            .cache
            .release(r.ns, &r.tokens, &r.pages, r.node, insert)
            .unwrap();
        if insert {
            let prefix = predicted.len();
            let dups: Vec<PageId> = (0..prefix)
                .filter(|&k| r.pages[k] != predicted[k])
                .map(|k| r.pages[k])
                .collect();
            assert_eq!(out.prefix_pages, prefix);
            assert_eq!(out.duplicates, dups);
            for k in prefix..whole {
                let key = self.key(r.ns, &r.tokens, k + 1);
                self.cached.insert(key, r.pages[k]);
            }
            assert_eq!(self.predict_match(r.ns, &r.tokens).len(), whole);
        }
    }

    fn snapshot(&self) -> (usize, oscar_core::TreeSizes, usize, Vec<(u64, u32)>) {
        let nodes = self
            .cache
            .tree()
            .nodes()
            .map(|n| (n.handle.raw(), n.lock_ref))
            .collect();
        (
            self.cache.available(),
            self.cache.sizes(),
            self.cache.tree().num_nodes(),
            nodes,
        )
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Start {
                ns,
                base,
                cut,
                tail,
                admit,
            } => {
                let ns = NAMESPACES[ns % NAMESPACES.len()];
                let tokens = self.tokens_of(*base, *cut, tail);
                if *admit {
                    self.admit(ns, tokens);
                    return;
                }
                let predicted = self.predict_match(ns, &tokens);
                let m = self.cache.match_prefix(ns, &tokens);
                assert_eq!(m.pages, predicted);
                self.cache.lock(m.node).unwrap();
                let need = tokens.len().div_ceil(self.ps) - m.pages.len();
                let available = self.cache.available();
                if need > available {
                    self.evict(need - available);
                }
                match self.cache.alloc(need) {
                    Ok(fresh) => {
                        let locked = m.pages.len();
                        let mut pages = m.pages;
                        pages.extend(&fresh);
                        let mut owned = vec![false; locked];
                        owned.resize(pages.len(), true);
                        self.reqs.push(Req {
                            ns,
                            tokens,
                            pages,
                            owned,
                            locked,
                            node: m.node,
                        });
                    }
                    Err(CacheError::OutOfPages { requested, .. }) => {
                        assert_eq!(requested, need);
                        assert!(self.cache.available() < need);
                        self.cache.unlock(m.node).unwrap();
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Checkpoint { req } => {
                if !self.reqs.is_empty() {
                    let i = req % self.reqs.len();
                    self.checkpoint(i);
                }
            }
            Op::Finish {
                req,
                checkpoint,
                release,
            } => {
                if self.reqs.is_empty() {
                    return;
                }
                let i = req % self.reqs.len();
                if *release {
                    self.release(i, *checkpoint);
                    return;
                }
                if *checkpoint {
                    self.checkpoint(i);
                }
                let r = self.reqs.swap_remove(i);
                self.cache.unlock(r.node).unwrap();
                let mine: Vec<PageId> = r
                    .pages
                    .iter()
                    .zip(&r.owned)
                    .filter(|(_, &o)| o)
                    .map(|(&p, _)| p)
                    .collect();
                self.cache.free(&mine).unwrap();
            }
            Op::Evict { pages } => self.evict(*pages),
            Op::Touch { ns, base, cut } => {
                let ns = NAMESPACES[ns % NAMESPACES.len()];
                let tokens = self.tokens_of(*base, *cut, &[]);
                let predicted = self.predict_match(ns, &tokens);
                assert_eq!(self.cache.match_prefix(ns, &tokens).pages, predicted);
            }
            Op::BadUnlock => {
                let unlocked = self
                    .cache
                    .tree()
                    .nodes()
                    .find(|n| n.lock_ref == 0)
                    .map(|n| n.handle);
                if let Some(h) = unlocked {
                    let before = self.snapshot();
                    let err = self.cache.unlock(h).unwrap_err();
                    assert_eq!(err, CacheError::LockUnderflow { handle: h.raw() });
                    assert_eq!(self.snapshot(), before);
                }
            }
            Op::BadFree { tree_page } => {
                let page = if *tree_page {
                    self.cached.values().next().copied()
                } else {
                    (0..self.cache.num_pages() as PageId)
                        .find(|&p| self.cache.allocator().is_free(p))
                };
                if let Some(p) = page {
                    let before = self.snapshot();
                    let err = self.cache.free(&[p]).unwrap_err();
                    if *tree_page {
                        assert_eq!(err, CacheError::PageInTree { page: p });
                    } else {
                        assert_eq!(err, CacheError::PageNotAllocated { page: p });
                    }
                    assert_eq!(self.snapshot(), before);
                }
            }
            Op::BadInsert { req } => {
                // A request tries to hand the tree a page the tree already holds elsewhere.
                if self.reqs.is_empty() {
                    return;
                }
                let r = &self.reqs[req % self.reqs.len()];
                let whole = r.tokens.len() / self.ps;
                let prefix = self.predict_match(r.ns, &r.tokens).len();
                let in_tree: HashSet<PageId> = self.cached.values().copied().collect();
                let stolen = self
                    .cached
                    .values()
                    .copied()
                    .find(|p| !r.pages[..whole].contains(p));
                if let (true, Some(p)) = (prefix < whole, stolen) {
                    let mut pages = r.pages[..whole].to_vec();
                    pages[prefix] = p;
                    let (ns, tokens) = (r.ns, r.tokens.clone());
                    let before = self.snapshot();
                    let err = self.cache.insert(ns, &tokens, &pages).unwrap_err();
                    assert!(in_tree.contains(&p));
                    assert_eq!(err, CacheError::PageInTree { page: p });
                    assert_eq!(self.snapshot(), before);
                }
            }
            Op::Reset => {
                if self.reqs.is_empty() {
                    self.cache.reset();
                    self.cached.clear();
                    assert_eq!(self.cache.available(), self.cache.num_pages());
                }
            }
        }
    }

    fn check(&self) {
        self.cache.check_invariants().unwrap();
        // Every page is exactly one of: free, in the tree, owned by a running request.
        let n = self.cache.num_pages();
        let mut state = vec![0u8; n];
        for p in 0..n as PageId {
            if self.cache.allocator().is_free(p) {
                state[p as usize] += 1;
            }
            if self.cache.tree().contains_page(p) {
                state[p as usize] += 1;
            }
        }
        for r in &self.reqs {
            for (&p, &o) in r.pages.iter().zip(&r.owned) {
                if o {
                    state[p as usize] += 1;
                } else {
                    assert!(
                        self.cache.tree().contains_page(p),
                        "a request's locked page left the tree"
                    );
                }
            }
        }
        for (p, s) in state.iter().enumerate() {
            assert_eq!(*s, 1, "page {p} is in {s} states");
        }
        let tree_pages: HashSet<PageId> = (0..n as PageId)
            .filter(|&p| self.cache.tree().contains_page(p))
            .collect();
        let model_pages: HashSet<PageId> = self.cached.values().copied().collect();
        assert_eq!(tree_pages, model_pages);
        let sizes = self.cache.sizes();
        let protected = self.locked_keys().len();
        assert_eq!(sizes.protected, protected);
        assert_eq!(sizes.total, self.cached.len());
        assert_eq!(sizes.evictable + sizes.protected, sizes.total);
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 0..3usize, 0..40usize, prop::collection::vec(0u8..3, 0..6))
            .prop_map(|(ns, base, cut, tail)| Op::Start { ns, base, cut, tail, admit: false }),
        4 => (0..3usize, 0..3usize, 0..40usize, prop::collection::vec(0u8..3, 0..6))
            .prop_map(|(ns, base, cut, tail)| Op::Start { ns, base, cut, tail, admit: true }),
        4 => any::<usize>().prop_map(|req| Op::Checkpoint { req }),
        4 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(req, checkpoint, release)| Op::Finish { req, checkpoint, release }),
        2 => (0..12usize).prop_map(|pages| Op::Evict { pages }),
        2 => (0..3usize, 0..3usize, 0..40usize).prop_map(|(ns, base, cut)| Op::Touch { ns, base, cut }),
        1 => Just(Op::BadUnlock),
        1 => any::<bool>().prop_map(|tree_page| Op::BadFree { tree_page }),
        1 => any::<usize>().prop_map(|req| Op::BadInsert { req }),
        1 => Just(Op::Reset),
    ]
}

fn bases_strategy() -> impl Strategy<Value = Vec<Vec<Token>>> {
    prop::collection::vec(prop::collection::vec(0u32..3, 40), 3)
}

fn run(num_pages: usize, ps: usize, bases: Vec<Vec<Token>>, ops: &[Op]) -> Model {
    let mut m = Model::new(num_pages, ps, bases);
    for op in ops {
        m.step(op);
        m.check();
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_scheduler_sequences(
        ps in 1..4usize,
        num_pages in 8..48usize,
        bases in bases_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..80),
    ) {
        let mut m = run(num_pages, ps, bases, &ops);
        // Draining: finishing every request and evicting everything returns every page.
        while !m.reqs.is_empty() {
            m.step(&Op::Finish { req: 0, checkpoint: false, release: false });
            m.check();
        }
        m.evict(usize::MAX);
        m.check();
        prop_assert_eq!(m.cache.available(), num_pages);
    }
}

/// xorshift64*: a seeded, dependency-free stream for the long run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
}

fn random_op(rng: &mut Rng) -> Op {
    match rng.below(22) {
        0..=5 => Op::Start {
            ns: rng.below(3),
            base: rng.below(3),
            cut: rng.below(40),
            tail: (0..rng.below(6)).map(|_| rng.below(3) as u8).collect(),
            admit: rng.below(2) == 0,
        },
        6..=9 => Op::Checkpoint { req: rng.below(64) },
        10..=13 => Op::Finish {
            req: rng.below(64),
            checkpoint: rng.below(2) == 0,
            release: rng.below(2) == 0,
        },
        14..=15 => Op::Evict {
            pages: rng.below(12),
        },
        16..=17 => Op::Touch {
            ns: rng.below(3),
            base: rng.below(3),
            cut: rng.below(40),
        },
        18 => Op::BadUnlock,
        19 => Op::BadFree {
            tree_page: rng.below(2) == 0,
        },
        20 => Op::BadInsert { req: rng.below(64) },
        _ => Op::Reset,
    }
}

/// 100k random operations with every invariant checked after each; no page may leak.
/// About 15 s in a debug build, 1 s in release.
#[test]
fn hundred_thousand_operations_leak_nothing() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let bases: Vec<Vec<Token>> = (0..3)
        .map(|_| (0..40).map(|_| rng.below(3) as Token).collect())
        .collect();
    let (num_pages, ps) = (40, 2);
    let mut m = Model::new(num_pages, ps, bases);
    for _ in 0..100_000 {
        let op = random_op(&mut rng);
        m.step(&op);
        m.check();
    }
    while !m.reqs.is_empty() {
        m.step(&Op::Finish {
            req: 0,
            checkpoint: true,
            release: false,
        });
        m.check();
    }
    m.evict(usize::MAX);
    m.check();
    assert_eq!(m.cache.available(), num_pages);
}
