//! Radix tree over whole pages of token ids: the prefix cache's index.
//!
//! Keys are token-id sequences cut into pages of `page_size` tokens (128 under
//! `--kv-quant oscar`, where one page is one quantization block); only whole pages are ever
//! matched or inserted, so a partial last page never enters the tree. Each node holds a run
//! of whole pages: their token ids and their page ids. Namespaces (SGLang's
//! `RadixKey.extra_key` / `cache_salt`: a LoRA id, a cache salt) get separate roots, so two
//! namespaces never share a page.
//!
//! The tree owns the page ids inserted into it until [`RadixTree::evict`] or
//! [`RadixTree::reset`] hands them back; it never frees pages itself (the allocator is the
//! caller's, see [`crate::cache::PrefixCache`] for the two together).
//!
//! Recency follows SGLang's `RadixCache` exactly, on a logical clock instead of
//! `time.monotonic()`: an operation stamps every node it walks with one tick, a node created
//! by a split or an insert gets a later tick, and eviction frees the least recently used
//! unlocked leaf first, one whole leaf at a time. The same calls therefore evict the same
//! pages as SGLang's tree, which the differential test relies on.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use crate::allocator::check_num_pages;
use crate::error::{check_page, CacheError, PageId};

/// A token id.
pub type Token = u32;

/// A token id as a caller holds it: the tree's own `u32`, or a wider integer read in place
/// (SGLang's `array('q')` token ids) so that a walk needs no converted copy of the key.
/// A value outside `0..=u32::MAX` is no token: it equals no stored id, and `insert` rejects
/// it before changing anything.
pub trait KeyToken: Copy {
    /// The token id, or `None` for a value that is not one.
    fn token(self) -> Option<Token>;
    /// Whether this value is the id `t`.
    fn is(self, t: Token) -> bool;
    /// The low 32 bits: what the page hash reads (an invalid value hashes somewhere, then
    /// fails every comparison).
    fn bits(self) -> u32;
    /// The value as given (for error messages).
    fn value(self) -> i64;
    /// Whether `key` (a page of this type) equals the stored `page`; one pass without early
    /// exit, which vectorizes.
    #[inline]
    fn page_eq(key: &[Self], page: &[Token]) -> bool {
        key.len() == page.len() && key.iter().zip(page).fold(true, |ok, (k, &t)| ok & k.is(t))
    }
}

impl KeyToken for u32 {
    #[inline(always)]
    fn token(self) -> Option<Token> {
        Some(self)
    }
    #[inline(always)]
    fn is(self, t: Token) -> bool {
        self == t
    }
    #[inline(always)]
    fn bits(self) -> u32 {
        self
    }
    fn value(self) -> i64 {
        self.into()
    }
    #[inline]
    fn page_eq(key: &[Self], page: &[Token]) -> bool {
        key == page
    }
}

impl KeyToken for i32 {
    #[inline(always)]
    fn token(self) -> Option<Token> {
        Token::try_from(self).ok()
    }
    #[inline(always)]
    fn is(self, t: Token) -> bool {
        self >= 0 && self as u32 == t
    }
    #[inline(always)]
    fn bits(self) -> u32 {
        self as u32
    }
    fn value(self) -> i64 {
        self.into()
    }
}

impl KeyToken for i64 {
    #[inline(always)]
    fn token(self) -> Option<Token> {
        Token::try_from(self).ok()
    }
    #[inline(always)]
    fn is(self, t: Token) -> bool {
        self == t as i64
    }
    #[inline(always)]
    fn bits(self) -> u32 {
        self as u32
    }
    fn value(self) -> i64 {
        self
    }
    #[inline]
    fn page_eq(key: &[Self], page: &[Token]) -> bool {
        // OR of the differences: branch-free integer ops that vectorize (a bool fold of
        // 64-bit compares did not).
        key.len() == page.len()
            && key
                .iter()
                .zip(page)
                .fold(0u64, |acc, (&k, &t)| acc | (k ^ i64::from(t)) as u64)
                == 0
    }
}

/// Largest accepted `page_size`.
pub const MAX_PAGE_SIZE: usize = 1 << 16;

const NIL: u32 = u32::MAX;

/// An opaque, copyable name of a tree node, valid until the node is evicted, merged away or
/// the tree is reset (a stale handle is rejected, never confused with a newer node).
///
/// [`NodeHandle::ROOT`] stands for the root of every namespace: locking it is a no-op and its
/// path is empty, as for SGLang's root node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeHandle(u64);

impl NodeHandle {
    /// The root (of any namespace).
    pub const ROOT: NodeHandle = NodeHandle(u64::MAX);

    /// The raw value, for passing through FFI.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// The handle of a raw value from [`raw`](Self::raw). Any value is accepted; the tree
    /// rejects values that do not name a live node.
    pub fn from_raw(raw: u64) -> Self {
        NodeHandle(raw)
    }

    /// Whether this is [`NodeHandle::ROOT`].
    pub fn is_root(self) -> bool {
        self == Self::ROOT
    }

    fn new(index: u32, generation: u32) -> Self {
        NodeHandle(((generation as u64) << 32) | index as u64)
    }

    fn index(self) -> u32 {
        self.0 as u32
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Hasher for keys that are already uniformly distributed hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ChildMap = HashMap<u64, Child, BuildHasherDefault<PassThrough>>;

/// The children whose first page hashes to one value: almost always one.
#[derive(Debug, Clone)]
enum Child {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Clone)]
struct Node {
    parent: u32,
    generation: u32,
    alive: bool,
    /// Namespace name, on named roots only.
    namespace: Option<Box<str>>,
    tokens: Vec<Token>,
    pages: Vec<PageId>,
    /// Sum of the weights of `pages` (what the node counts for in [`TreeSizes`]).
    weight: usize,
    children: ChildMap,
    num_children: u32,
    lock_ref: u32,
    last_access: u64,
    /// Whether the node is in the tree's LRU set of evictable leaves.
    in_lru: bool,
}

impl Node {
    fn empty() -> Self {
        Node {
            parent: NIL,
            generation: 0,
            alive: false,
            namespace: None,
            tokens: Vec::new(),
            pages: Vec::new(),
            weight: 0,
            children: ChildMap::default(),
            num_children: 0,
            lock_ref: 0,
            last_access: 0,
            in_lru: false,
        }
    }
}

/// What [`RadixTree::match_prefix`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchOutcome {
    /// Page ids of the longest cached page-aligned prefix, in order.
    pub pages: Vec<PageId>,
    /// The node where the match ends (split there if it ended inside a node);
    /// [`NodeHandle::ROOT`] for an empty match. Lock it to protect the matched pages.
    pub node: NodeHandle,
}

/// What [`RadixTree::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Leading whole pages of the key that were already in the tree.
    pub prefix_pages: usize,
    /// The caller's pages among those leading pages that differ from the tree's own: the
    /// tree did not take them, the caller should free them.
    pub duplicates: Vec<PageId>,
    /// The node where the inserted key ends ([`NodeHandle::ROOT`] for an empty key).
    pub node: NodeHandle,
}

/// Page counts of the tree, as SGLang reports them (there in tokens). A page counts its
/// weight: 1, or more for a page inserted with a weight (a page that brings companion pages
/// of the allocator along, see [`RadixTree::insert_weighted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeSizes {
    /// Pages in unlocked nodes (evictable now or once their descendants go).
    pub evictable: usize,
    /// Pages in locked nodes.
    pub protected: usize,
    /// All pages in the tree.
    pub total: usize,
}

/// One node, as the debugging iterator [`RadixTree::nodes`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo<'a> {
    /// The node.
    pub handle: NodeHandle,
    /// Its parent ([`NodeHandle::ROOT`] under a namespace root).
    pub parent: NodeHandle,
    /// Its namespace (`None`: the default one).
    pub namespace: Option<&'a str>,
    /// Pages on the path above it.
    pub depth_pages: usize,
    /// Its token ids (a whole number of pages).
    pub tokens: &'a [Token],
    /// Its page ids.
    pub pages: &'a [PageId],
    /// Number of locks held on it (locks on descendants count here too).
    pub lock_ref: u32,
    /// Logical time of its last use.
    pub last_access: u64,
    /// Number of children.
    pub num_children: usize,
}

/// `key` as stored token ids; a value that is no token id is an `InvalidArgument`.
fn leaf_token_ids<K: KeyToken>(key: &[K]) -> Result<Vec<Token>, CacheError> {
    let out: Vec<Token> = key.iter().map(|k| k.bits()).collect();
    match key.iter().find(|k| k.token().is_none()) {
        None => Ok(out),
        Some(&bad) => Err(CacheError::InvalidArgument {
            name: "token ids",
            rule: format!("must be in 0..={}", Token::MAX),
            got: bad.value(),
        }),
    }
}

/// Radix tree of whole pages; see the module documentation.
#[derive(Debug, Clone)]
pub struct RadixTree {
    page_size: usize,
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    default_root: u32,
    named_roots: HashMap<Box<str>, u32>,
    /// Evictable leaves by (last access, index): the first is the next to go.
    lru: BTreeSet<(u64, u32)>,
    clock: u64,
    in_tree: Vec<bool>,
    /// The node holding each page while it is in the tree (stale otherwise).
    page_node: Vec<u32>,
    // The weight of each page while it is in the tree (set when the tree adopts it).
    page_weight: Vec<u32>,
    /// Per-tree random seed of the page hash.
    seed: u64,
    sizes: TreeSizes,
    // Scratch for insert's validation: stamp[p] == stamp_gen marks page p as seen.
    stamp: Vec<u32>,
    stamp_gen: u32,
    path: Vec<(u32, usize)>,
}

impl RadixTree {
    /// An empty tree over page ids `0..num_pages` with `page_size` tokens per page.
    pub fn new(num_pages: usize, page_size: usize) -> Result<Self, CacheError> {
        check_num_pages(num_pages)?;
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(CacheError::InvalidArgument {
                name: "page_size",
                rule: format!("must be in 1..={MAX_PAGE_SIZE}"),
                got: page_size as i64,
            });
        }
        let mut t = RadixTree {
            page_size,
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            default_root: NIL,
            named_roots: HashMap::new(),
            lru: BTreeSet::new(),
            clock: 0,
            in_tree: vec![false; num_pages],
            page_node: vec![NIL; num_pages],
            page_weight: vec![1; num_pages],
            seed: RandomState::new().hash_one(0x6f73_6361_725f_6b76_u64),
            sizes: TreeSizes::default(),
            stamp: vec![0; num_pages],
            stamp_gen: 0,
            path: Vec::new(),
        };
        t.default_root = t.new_node(NIL, Vec::new(), Vec::new());
        Ok(t)
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Size of the page-id space.
    pub fn num_pages(&self) -> usize {
        self.in_tree.len()
    }

    /// Evictable / protected / total page counts.
    pub fn sizes(&self) -> TreeSizes {
        self.sizes
    }

    /// Whether `page` is held by the tree.
    pub fn contains_page(&self, page: PageId) -> bool {
        self.in_tree.get(page as usize) == Some(&true)
    }

    /// Number of live nodes, roots excluded.
    pub fn num_nodes(&self) -> usize {
        self.nodes.len() - self.free_nodes.len() - 1 - self.named_roots.len()
    }

    /// The current logical time (advanced by every operation that uses the tree).
    pub fn clock(&self) -> u64 {
        self.clock
    }

    // ----- node storage -------------------------------------------------------------------

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn new_node(&mut self, parent: u32, tokens: Vec<Token>, pages: Vec<PageId>) -> u32 {
        let weight = pages
            .iter()
            .map(|&p| self.page_weight[p as usize] as usize)
            .sum();
        let idx = match self.free_nodes.pop() {
            Some(i) => i,
            None => {
                self.nodes.push(Node::empty());
                (self.nodes.len() - 1) as u32
            }
        };
        for &p in &pages {
            self.page_node[p as usize] = idx;
        }
        let n = &mut self.nodes[idx as usize];
        n.parent = parent;
        n.alive = true;
        n.tokens = tokens;
        n.pages = pages;
        n.weight = weight;
        n.lock_ref = 0;
        n.num_children = 0;
        n.in_lru = false;
        n.namespace = None;
        n.last_access = 0;
        idx
    }

    fn free_node(&mut self, idx: u32) {
        let n = &mut self.nodes[idx as usize];
        debug_assert!(!n.in_lru && n.num_children == 0);
        n.alive = false;
        n.generation = n.generation.wrapping_add(1);
        n.tokens = Vec::new();
        n.pages = Vec::new();
        n.weight = 0;
        n.children = ChildMap::default();
        n.namespace = None;
        self.free_nodes.push(idx);
    }

    fn handle(&self, idx: u32) -> NodeHandle {
        let n = &self.nodes[idx as usize];
        if n.parent == NIL {
            NodeHandle::ROOT
        } else {
            NodeHandle::new(idx, n.generation)
        }
    }

    /// The index of a live non-root node, or `None` for ROOT.
    fn resolve(&self, h: NodeHandle) -> Result<Option<u32>, CacheError> {
        if h.is_root() {
            return Ok(None);
        }
        match self.nodes.get(h.index() as usize) {
            Some(n) if n.alive && n.generation == h.generation() && n.parent != NIL => {
                Ok(Some(h.index()))
            }
            _ => Err(CacheError::StaleNode { handle: h.raw() }),
        }
    }

    fn is_root_idx(&self, idx: u32) -> bool {
        self.nodes[idx as usize].parent == NIL
    }

    fn root_of(&self, namespace: Option<&str>) -> Option<u32> {
        match namespace {
            None => Some(self.default_root),
            Some(name) => self.named_roots.get(name).copied(),
        }
    }

    fn root_or_create(&mut self, namespace: Option<&str>) -> u32 {
        if let Some(r) = self.root_of(namespace) {
            return r;
        }
        let name: Box<str> = namespace.expect("the default root always exists").into();
        let r = self.new_node(NIL, Vec::new(), Vec::new());
        self.nodes[r as usize].namespace = Some(name.clone());
        self.named_roots.insert(name, r);
        r
    }

    // ----- children -----------------------------------------------------------------------

    /// A seeded multiply-xor hash of a page's token ids in four independent lanes (the
    /// walk hashes one page per node it enters; SipHash over 512 bytes cost more than the
    /// comparisons). Not a keyed PRF: colliding pages only share a bucket, where
    /// `find_child` compares them (`Child::Many`).
    fn page_hash<K: KeyToken>(&self, page: &[K]) -> u64 {
        const M: u64 = 0x9e37_79b9_7f4a_7c15;
        let pair = |c: &[K]| c[0].bits() as u64 | (c[1].bits() as u64) << 32;
        let mut lanes = [
            self.seed,
            self.seed ^ 0x243f_6a88_85a3_08d3,
            self.seed ^ 0x1319_8a2e_0370_7344,
            self.seed ^ 0xa409_3822_299f_31d0,
        ];
        let mut chunks = page.chunks_exact(8);
        for c in &mut chunks {
            for (l, lane) in lanes.iter_mut().enumerate() {
                *lane = (*lane ^ pair(&c[2 * l..])).wrapping_mul(M).rotate_left(29);
            }
        }
        let mut h = page.len() as u64;
        for lane in lanes {
            h = (h ^ lane).wrapping_mul(M).rotate_left(31);
        }
        for k in chunks.remainder() {
            h = (h ^ k.bits() as u64).wrapping_mul(M).rotate_left(31);
        }
        // splitmix64's finalizer: every input bit reaches the bucket bits.
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }

    fn first_page(&self, idx: u32) -> &[Token] {
        &self.nodes[idx as usize].tokens[..self.page_size]
    }

    fn find_child<K: KeyToken>(&self, parent: u32, page: &[K]) -> Option<u32> {
        let p = &self.nodes[parent as usize];
        match p.num_children {
            0 => return None,
            1 => {
                // Most nodes on a chat's path have one child (its own continuation): compare
                // with it directly instead of hashing the page and probing the map. (A
                // `Many` bucket holds two or more children, so a sole child is `One`.)
                let c = match p.children.values().next()? {
                    Child::One(c) => *c,
                    Child::Many(v) => v[0],
                };
                return K::page_eq(page, self.first_page(c)).then_some(c);
            }
            _ => {}
        }
        let h = self.page_hash(page);
        match p.children.get(&h)? {
            Child::One(c) => K::page_eq(page, self.first_page(*c)).then_some(*c),
            Child::Many(v) => v
                .iter()
                .copied()
                .find(|&c| K::page_eq(page, self.first_page(c))),
        }
    }

    fn add_child(&mut self, parent: u32, child: u32) {
        let h = self.page_hash(self.first_page(child));
        let p = &mut self.nodes[parent as usize];
        p.num_children += 1;
        match p.children.get_mut(&h) {
            None => {
                p.children.insert(h, Child::One(child));
            }
            Some(slot) => {
                // A 64-bit hash collision between two different first pages.
                let prev = match slot {
                    Child::One(c) => vec![*c],
                    Child::Many(v) => std::mem::take(v),
                };
                let mut v = prev;
                v.push(child);
                *slot = Child::Many(v);
            }
        }
    }

    /// Replaces `old` by `new` among `parent`'s children; both start with the same page.
    fn replace_child(&mut self, parent: u32, old: u32, new: u32) {
        let h = self.page_hash(self.first_page(new));
        let slot = self.nodes[parent as usize]
            .children
            .get_mut(&h)
            .expect("old child is present");
        match slot {
            Child::One(c) => *c = new,
            Child::Many(v) => {
                for c in v.iter_mut().filter(|c| **c == old) {
                    *c = new;
                }
            }
        }
    }

    fn remove_child(&mut self, parent: u32, child: u32) {
        let h = self.page_hash(self.first_page(child));
        let p = &mut self.nodes[parent as usize];
        p.num_children -= 1;
        let remove = match p.children.get_mut(&h).expect("child is present") {
            Child::One(_) => true,
            Child::Many(v) => {
                v.retain(|&c| c != child);
                if v.len() == 1 {
                    let only = v[0];
                    p.children.insert(h, Child::One(only));
                }
                false
            }
        };
        if remove {
            p.children.remove(&h);
        }
    }

    // ----- recency and eviction bookkeeping ---------------------------------------------

    fn touch(&mut self, idx: u32, t: u64) {
        let n = &mut self.nodes[idx as usize];
        if n.in_lru {
            self.lru.remove(&(n.last_access, idx));
            self.lru.insert((t, idx));
        }
        n.last_access = t;
    }

    /// Puts `idx` in the LRU set iff it is an unlocked non-root leaf.
    fn update_leaf_status(&mut self, idx: u32) {
        let n = &self.nodes[idx as usize];
        let evictable = n.parent != NIL && n.lock_ref == 0 && n.num_children == 0;
        if evictable != n.in_lru {
            let key = (n.last_access, idx);
            if evictable {
                self.lru.insert(key);
            } else {
                self.lru.remove(&key);
            }
            self.nodes[idx as usize].in_lru = evictable;
        }
    }

    /// Number of whole leading pages of `key` equal to the pages of node `idx`.
    fn common_pages<K: KeyToken>(&self, idx: u32, key: &[K]) -> usize {
        let ps = self.page_size;
        let node = &self.nodes[idx as usize].tokens;
        node.chunks_exact(ps)
            .zip(key.chunks_exact(ps))
            .take_while(|(a, b)| K::page_eq(b, a))
            .count()
    }

    /// Splits node `idx` after its first `m` pages (0 < m < its pages): a new node takes
    /// those pages and becomes `idx`'s parent. Returns the new node. Like SGLang, the new
    /// node inherits the lock count and is stamped with a fresh tick.
    fn split(&mut self, idx: u32, m: usize) -> u32 {
        let ps = self.page_size;
        let parent = self.nodes[idx as usize].parent;
        let (tokens, pages) = {
            let n = &mut self.nodes[idx as usize];
            debug_assert!(0 < m && m < n.pages.len());
            let rest_tokens = n.tokens.split_off(m * ps);
            let rest_pages = n.pages.split_off(m);
            (
                std::mem::replace(&mut n.tokens, rest_tokens),
                std::mem::replace(&mut n.pages, rest_pages),
            )
        };
        let t = self.tick();
        let upper = self.new_node(parent, tokens, pages);
        let upper_weight = self.nodes[upper as usize].weight;
        self.nodes[idx as usize].weight -= upper_weight;
        let lock_ref = self.nodes[idx as usize].lock_ref;
        {
            let u = &mut self.nodes[upper as usize];
            u.lock_ref = lock_ref;
            u.last_access = t;
        }
        // `upper` starts with the page `idx` started with, so it takes over idx's slot.
        self.replace_child(parent, idx, upper);
        self.nodes[idx as usize].parent = upper;
        self.add_child(upper, idx);
        upper
    }

    // ----- public operations ------------------------------------------------------------

    /// Longest cached page-aligned prefix of `tokens` in `namespace`; a trailing partial
    /// page is ignored. Stamps the matched path as used and, when the match ends inside a
    /// node, splits it there so that the returned node covers exactly the matched pages.
    pub fn match_prefix<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
    ) -> MatchOutcome {
        let mut pages = Vec::new();
        let node = self.match_prefix_into(namespace, tokens, &mut pages);
        MatchOutcome { pages, node }
    }

    /// Like [`match_prefix`](Self::match_prefix), appending the page ids to `pages`;
    /// returns the node where the match ends.
    pub fn match_prefix_into<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &mut Vec<PageId>,
    ) -> NodeHandle {
        let ps = self.page_size;
        let n_pages = tokens.len() / ps;
        let Some(root) = self.root_of(namespace) else {
            return NodeHandle::ROOT;
        };
        if n_pages == 0 {
            return NodeHandle::ROOT;
        }
        let t = self.tick();
        self.touch(root, t);
        let mut node = root;
        let mut pos = 0;
        while pos < n_pages {
            let Some(child) = self.find_child(node, &tokens[pos * ps..(pos + 1) * ps]) else {
                break;
            };
            self.touch(child, t);
            let m = self.common_pages(child, &tokens[pos * ps..n_pages * ps]);
            pages.extend_from_slice(&self.nodes[child as usize].pages[..m]);
            pos += m;
            if m < self.nodes[child as usize].pages.len() {
                node = self.split(child, m);
                break;
            }
            node = child;
        }
        self.handle(node)
    }

    /// The longest run of leading tokens of `rest` (the key past `node`, the node a match
    /// ended on) that a child of `node` starts with, when that run is shorter than a page:
    /// `(the child's first page id, run length)`, or `None` when no child shares a token.
    /// A prefix may so end inside a cached page. Read-only: nothing is stamped or locked.
    pub fn partial_child<K: KeyToken>(
        &self,
        node: NodeHandle,
        namespace: Option<&str>,
        rest: &[K],
    ) -> Result<Option<(PageId, usize)>, CacheError> {
        let idx = match self.resolve(node)? {
            Some(idx) => idx,
            None => match self.root_of(namespace) {
                Some(root) => root,
                None => return Ok(None),
            },
        };
        let want = rest.len().min(self.page_size - 1);
        let mut best: Option<(PageId, usize)> = None;
        for child in self.children_of(idx) {
            let run = self
                .first_page(child)
                .iter()
                .zip(&rest[..want])
                .take_while(|(&a, b)| b.is(a))
                .count();
            if run > 0 && best.is_none_or(|(_, b)| run > b) {
                best = Some((self.nodes[child as usize].pages[0], run));
            }
        }
        Ok(best)
    }

    /// Inserts the whole pages of `tokens` with their page ids `pages` (one per whole page;
    /// a trailing partial page of tokens is ignored). The tree takes ownership of the pages
    /// past the already-cached prefix; the caller's pages inside that prefix that differ from
    /// the tree's are returned as `duplicates` for the caller to free.
    ///
    /// Errors, with nothing changed: a wrong number of pages, a page id out of range, a page
    /// to adopt that the tree already holds, a caller page inside the prefix that the tree
    /// holds elsewhere, or the same page twice.
    pub fn insert<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &[PageId],
    ) -> Result<InsertOutcome, CacheError> {
        self.insert_weighted(namespace, tokens, pages, None)
    }

    /// Like [`insert`](Self::insert), with one weight (>= 1) per page: a page the tree adopts
    /// counts its weight in [`TreeSizes`], in lock deltas and toward eviction targets (the
    /// pages of the prefix already cached keep theirs).
    pub fn insert_weighted<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &[PageId],
        weights: Option<&[u32]>,
    ) -> Result<InsertOutcome, CacheError> {
        self.insert_impl(namespace, tokens, pages, weights, false)
    }

    /// Like [`insert_weighted`](Self::insert_weighted) for a request's KV row: `pages` are
    /// the pages holding the KV of `tokens`, so where they are the tree's own pages at the
    /// same positions (a matched prefix the request reused) the tree takes them as that
    /// prefix without comparing its token ids again; the walk compares tokens from the
    /// first node they do not cover whole. A page holds the KV of one token sequence, so
    /// for such a caller the outcome is [`insert_weighted`](Self::insert_weighted)'s (debug
    /// builds check it); handing tree pages for other tokens is a caller bug this does not
    /// detect. SGLang's scheduler inserts rows whose prefix it matched at admission: the
    /// second full comparison of every request's history is what this skips.
    pub fn insert_row<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &[PageId],
        weights: Option<&[u32]>,
    ) -> Result<InsertOutcome, CacheError> {
        self.insert_impl(namespace, tokens, pages, weights, true)
    }

    fn insert_impl<K: KeyToken>(
        &mut self,
        namespace: Option<&str>,
        tokens: &[K],
        pages: &[PageId],
        weights: Option<&[u32]>,
        row: bool,
    ) -> Result<InsertOutcome, CacheError> {
        let ps = self.page_size;
        let n_pages = tokens.len() / ps;
        if pages.len() != n_pages {
            return Err(CacheError::PageCountMismatch {
                expected: n_pages,
                got: pages.len(),
            });
        }
        if let Some(w) = weights {
            if w.len() != n_pages {
                return Err(CacheError::PageCountMismatch {
                    expected: n_pages,
                    got: w.len(),
                });
            }
            if let Some(&bad) = w.iter().find(|&&x| x == 0) {
                return Err(CacheError::InvalidArgument {
                    name: "weights",
                    rule: "must be >= 1".to_owned(),
                    got: bad as i64,
                });
            }
        }
        for &p in pages {
            check_page(p, self.num_pages())?;
        }

        // Read-only walk: how much is cached, and where the key leaves the tree.
        let mut path = std::mem::take(&mut self.path);
        path.clear();
        let root = self.root_of(namespace);
        let mut pos = 0;
        if let Some(mut node) = root {
            while row && pos < n_pages {
                let Some(child) = self.row_child(node, &pages[pos..]) else {
                    break;
                };
                let m = self.nodes[child as usize].pages.len();
                debug_assert_eq!(self.common_pages(child, &tokens[pos * ps..]), m);
                path.push((child, m));
                pos += m;
                node = child;
            }
            while pos < n_pages {
                let Some(child) = self.find_child(node, &tokens[pos * ps..(pos + 1) * ps]) else {
                    break;
                };
                let m = self.common_pages(child, &tokens[pos * ps..n_pages * ps]);
                path.push((child, m));
                pos += m;
                if m < self.nodes[child as usize].pages.len() {
                    break;
                }
                node = child;
            }
        }
        let checked = self.check_insert_pages(&path, pages, pos);
        // The new leaf's token ids, converted (and checked) before anything changes.
        let leaf_tokens = checked.and_then(|()| leaf_token_ids(&tokens[pos * ps..n_pages * ps]));
        let leaf_tokens = match leaf_tokens {
            Ok(t) => t,
            Err(e) => {
                self.path = path;
                return Err(e);
            }
        };

        let mut duplicates = Vec::new();
        let mut at = 0;
        for &(child, m) in &path {
            let own = &self.nodes[child as usize].pages[..m];
            duplicates.extend(
                pages[at..at + m]
                    .iter()
                    .zip(own)
                    .filter(|(a, b)| a != b)
                    .map(|(a, _)| *a),
            );
            at += m;
        }

        if n_pages == 0 {
            self.path = path;
            return Ok(InsertOutcome {
                prefix_pages: 0,
                duplicates,
                node: NodeHandle::ROOT,
            });
        }

        // Mutation, following SGLang's order of clock stamps: path, split, new leaf.
        let root = self.root_or_create(namespace);
        let t = self.tick();
        self.touch(root, t);
        let mut node = root;
        for &(child, m) in &path {
            self.touch(child, t);
            node = if m < self.nodes[child as usize].pages.len() {
                self.split(child, m)
            } else {
                child
            };
        }
        self.path = path;
        if pos < n_pages {
            let leaf_pages = pages[pos..].to_vec();
            for (i, &p) in leaf_pages.iter().enumerate() {
                self.in_tree[p as usize] = true;
                self.page_weight[p as usize] = weights.map_or(1, |w| w[pos + i]);
            }
            let t = self.tick();
            let leaf = self.new_node(node, leaf_tokens, leaf_pages);
            let added = self.nodes[leaf as usize].weight;
            self.nodes[leaf as usize].last_access = t;
            self.add_child(node, leaf);
            self.sizes.evictable += added;
            self.sizes.total += added;
            self.update_leaf_status(node);
            self.update_leaf_status(leaf);
            node = leaf;
        }
        Ok(InsertOutcome {
            prefix_pages: pos,
            duplicates,
            node: self.handle(node),
        })
    }

    /// The child of `parent` whose pages `row` starts with, all of them, by page id.
    fn row_child(&self, parent: u32, row: &[PageId]) -> Option<u32> {
        let first = row[0] as usize;
        if !self.in_tree[first] {
            return None;
        }
        let c = self.page_node[first];
        let n = &self.nodes[c as usize];
        (n.parent == parent && row.starts_with(&n.pages)).then_some(c)
    }

    /// Stamps the path from the root to `node` as used, with one new tick, as a match
    /// that ends at `node` does (SGLang's checkpoint matches the key it just inserted;
    /// this gives the same recency without comparing the tokens again). No-op on ROOT.
    pub fn touch_path(&mut self, node: NodeHandle) -> Result<(), CacheError> {
        let Some(mut idx) = self.resolve(node)? else {
            return Ok(());
        };
        let t = self.tick();
        loop {
            self.touch(idx, t);
            if self.is_root_idx(idx) {
                return Ok(());
            }
            idx = self.nodes[idx as usize].parent;
        }
    }

    fn check_insert_pages(
        &mut self,
        path: &[(u32, usize)],
        pages: &[PageId],
        pos: usize,
    ) -> Result<(), CacheError> {
        self.stamp_gen = self.stamp_gen.wrapping_add(1);
        if self.stamp_gen == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.stamp_gen = 1;
        }
        let gen = self.stamp_gen;
        let mut at = 0;
        for &(child, m) in path {
            let own = &self.nodes[child as usize].pages[..m];
            for (&p, &o) in pages[at..at + m].iter().zip(own) {
                if p == o {
                    continue;
                }
                if self.in_tree[p as usize] {
                    return Err(CacheError::PageInTree { page: p });
                }
                if self.stamp[p as usize] == gen {
                    return Err(CacheError::DuplicatePage { page: p });
                }
                self.stamp[p as usize] = gen;
            }
            at += m;
        }
        for &p in &pages[pos..] {
            if self.in_tree[p as usize] {
                return Err(CacheError::PageInTree { page: p });
            }
            if self.stamp[p as usize] == gen {
                return Err(CacheError::DuplicatePage { page: p });
            }
            self.stamp[p as usize] = gen;
        }
        Ok(())
    }

    /// Locks the path from the root to `node`: none of its pages can be evicted until the
    /// matching [`unlock`](Self::unlock). Returns the number of pages that became protected.
    /// A no-op on [`NodeHandle::ROOT`].
    pub fn lock(&mut self, node: NodeHandle) -> Result<usize, CacheError> {
        let Some(mut idx) = self.resolve(node)? else {
            return Ok(0);
        };
        if self.nodes[idx as usize].lock_ref == u32::MAX {
            return Err(CacheError::InvalidArgument {
                name: "node",
                rule: "lock count would overflow".to_owned(),
                got: node.raw() as i64,
            });
        }
        let mut delta = 0;
        while !self.is_root_idx(idx) {
            let n = &mut self.nodes[idx as usize];
            if n.lock_ref == 0 {
                delta += n.weight;
            }
            n.lock_ref += 1;
            let parent = n.parent;
            self.update_leaf_status(idx);
            idx = parent;
        }
        self.sizes.evictable -= delta;
        self.sizes.protected += delta;
        Ok(delta)
    }

    /// Releases one lock taken by [`lock`](Self::lock) on `node`. Returns the number of
    /// pages that became evictable. [`CacheError::LockUnderflow`] (nothing changed) if
    /// `node` is not locked.
    pub fn unlock(&mut self, node: NodeHandle) -> Result<usize, CacheError> {
        let Some(mut idx) = self.resolve(node)? else {
            return Ok(0);
        };
        // Every lock covers the whole path, so an ancestor's count is at least the node's.
        if self.nodes[idx as usize].lock_ref == 0 {
            return Err(CacheError::LockUnderflow { handle: node.raw() });
        }
        let mut delta = 0;
        while !self.is_root_idx(idx) {
            let n = &mut self.nodes[idx as usize];
            n.lock_ref -= 1;
            if n.lock_ref == 0 {
                delta += n.weight;
            }
            let parent = n.parent;
            self.update_leaf_status(idx);
            idx = parent;
        }
        self.sizes.evictable += delta;
        self.sizes.protected -= delta;
        Ok(delta)
    }

    /// Lock count of `node` (0 for ROOT).
    pub fn lock_ref(&self, node: NodeHandle) -> Result<u32, CacheError> {
        Ok(match self.resolve(node)? {
            Some(idx) => self.nodes[idx as usize].lock_ref,
            None => 0,
        })
    }

    /// Evicts unlocked leaves, least recently used first, until at least `n_pages` pages
    /// (by weight) are freed or nothing is evictable. Returns the freed page ids (whole leaves, so possibly
    /// more than asked).
    pub fn evict(&mut self, n_pages: usize) -> Vec<PageId> {
        let mut freed = Vec::new();
        self.evict_into(n_pages, &mut freed);
        freed
    }

    /// Like [`evict`](Self::evict), appending to `freed`; returns the number appended.
    pub fn evict_into(&mut self, n_pages: usize, freed: &mut Vec<PageId>) -> usize {
        let start = freed.len();
        let mut got = 0;
        while got < n_pages {
            let Some((_, idx)) = self.lru.pop_first() else {
                break;
            };
            let parent = {
                let n = &mut self.nodes[idx as usize];
                n.in_lru = false;
                n.parent
            };
            self.remove_child(parent, idx);
            let pages = std::mem::take(&mut self.nodes[idx as usize].pages);
            for &p in &pages {
                self.in_tree[p as usize] = false;
            }
            let weight = self.nodes[idx as usize].weight;
            got += weight;
            self.sizes.evictable -= weight;
            self.sizes.total -= weight;
            freed.extend_from_slice(&pages);
            self.free_node(idx);
            if self.is_root_idx(parent) {
                self.drop_root_if_empty(parent);
            } else {
                self.update_leaf_status(parent);
            }
        }
        freed.len() - start
    }

    fn drop_root_if_empty(&mut self, root: u32) {
        if root == self.default_root || self.nodes[root as usize].num_children > 0 {
            return;
        }
        if let Some(name) = self.nodes[root as usize].namespace.take() {
            self.named_roots.remove(&name);
        }
        self.free_node(root);
    }

    /// Page ids on the path from the root to `node`, in order.
    pub fn path_pages(&self, node: NodeHandle) -> Result<Vec<PageId>, CacheError> {
        let mut out = Vec::new();
        let Some(mut idx) = self.resolve(node)? else {
            return Ok(out);
        };
        let mut chain = Vec::new();
        while !self.is_root_idx(idx) {
            chain.push(idx);
            idx = self.nodes[idx as usize].parent;
        }
        for &i in chain.iter().rev() {
            out.extend_from_slice(&self.nodes[i as usize].pages);
        }
        Ok(out)
    }

    /// Number of pages on the path from the root to `node`.
    pub fn depth_pages(&self, node: NodeHandle) -> Result<usize, CacheError> {
        let Some(mut idx) = self.resolve(node)? else {
            return Ok(0);
        };
        let mut d = 0;
        while !self.is_root_idx(idx) {
            d += self.nodes[idx as usize].pages.len();
            idx = self.nodes[idx as usize].parent;
        }
        Ok(d)
    }

    /// Empties the tree and returns every page it held (the caller frees them). All node
    /// handles become stale, locks included.
    pub fn reset(&mut self) -> Vec<PageId> {
        let mut pages = Vec::with_capacity(self.sizes.total);
        for idx in 0..self.nodes.len() as u32 {
            let n = &mut self.nodes[idx as usize];
            if !n.alive {
                continue;
            }
            pages.append(&mut n.pages);
            n.in_lru = false;
            n.num_children = 0;
            self.free_node(idx);
        }
        for &p in &pages {
            self.in_tree[p as usize] = false;
        }
        self.named_roots.clear();
        self.lru.clear();
        self.sizes = TreeSizes::default();
        self.default_root = self.new_node(NIL, Vec::new(), Vec::new());
        pages
    }

    /// Every node except the roots, depth first (a parent before its children).
    pub fn nodes(&self) -> Nodes<'_> {
        let mut stack: Vec<(u32, usize)> = Vec::new();
        let mut roots: Vec<u32> = self.named_roots.values().copied().collect();
        roots.sort_unstable();
        roots.push(self.default_root);
        for r in roots {
            stack.extend(self.children_of(r).map(|c| (c, 0)));
        }
        Nodes { tree: self, stack }
    }

    fn children_of(&self, idx: u32) -> impl Iterator<Item = u32> + '_ {
        self.nodes[idx as usize]
            .children
            .values()
            .flat_map(|c| match c {
                Child::One(c) => std::slice::from_ref(c).iter().copied(),
                Child::Many(v) => v.iter().copied(),
            })
    }

    fn namespace_of(&self, mut idx: u32) -> Option<&str> {
        while !self.is_root_idx(idx) {
            idx = self.nodes[idx as usize].parent;
        }
        self.nodes[idx as usize].namespace.as_deref()
    }

    /// Checks every structural invariant; `Err` names the first one broken. For tests and
    /// debugging: it walks the whole tree.
    pub fn check_invariants(&self) -> Result<(), String> {
        let ps = self.page_size;
        let mut sizes = TreeSizes::default();
        let mut seen = vec![false; self.num_pages()];
        let mut lru_count = 0;
        for (idx, n) in self.nodes.iter().enumerate() {
            let idx = idx as u32;
            if !n.alive {
                continue;
            }
            let counted = self.children_of(idx).count();
            if counted != n.num_children as usize {
                return Err(format!(
                    "node {idx}: {counted} children, counter says {}",
                    n.num_children
                ));
            }
            for c in self.children_of(idx) {
                let child = &self.nodes[c as usize];
                if !child.alive || child.parent != idx {
                    return Err(format!(
                        "node {c} is listed under {idx} but is not its child"
                    ));
                }
                if self.find_child(idx, self.first_page(c)) != Some(c) {
                    return Err(format!("child {c} of {idx} is not found by its first page"));
                }
                if n.parent != NIL && child.lock_ref > n.lock_ref {
                    return Err(format!("child {c} has more locks than its parent {idx}"));
                }
            }
            if n.parent == NIL {
                if !n.pages.is_empty() || n.lock_ref != 0 || n.in_lru {
                    return Err(format!("root {idx} holds pages, locks or is evictable"));
                }
                let named = n.namespace.is_some();
                if named && n.num_children == 0 {
                    return Err(format!("empty namespace root {idx} was kept"));
                }
                continue;
            }
            if n.pages.is_empty() || n.tokens.len() != n.pages.len() * ps {
                return Err(format!(
                    "node {idx}: {} tokens for {} pages",
                    n.tokens.len(),
                    n.pages.len()
                ));
            }
            let mut weight = 0;
            for &p in &n.pages {
                let i = p as usize;
                if i >= seen.len() || seen[i] || !self.in_tree[i] {
                    return Err(format!("page {p} is in the tree twice or not marked"));
                }
                seen[i] = true;
                if self.page_node[i] != idx {
                    return Err(format!(
                        "page {p} of node {idx} maps to node {}",
                        self.page_node[i]
                    ));
                }
                weight += self.page_weight[i] as usize;
            }
            if weight != n.weight {
                return Err(format!(
                    "node {idx}: weight {} for pages of {weight}",
                    n.weight
                ));
            }
            if n.lock_ref > 0 {
                sizes.protected += weight;
            } else {
                sizes.evictable += weight;
            }
            sizes.total += weight;
            let evictable = n.lock_ref == 0 && n.num_children == 0;
            if evictable != n.in_lru || evictable != self.lru.contains(&(n.last_access, idx)) {
                return Err(format!("node {idx}: LRU membership is wrong"));
            }
            lru_count += usize::from(evictable);
            if n.last_access > self.clock {
                return Err(format!("node {idx} was used in the future"));
            }
        }
        if lru_count != self.lru.len() {
            return Err(format!(
                "LRU set has {} entries, {lru_count} expected",
                self.lru.len()
            ));
        }
        if seen != self.in_tree {
            return Err("page membership bitmap disagrees with the nodes".to_owned());
        }
        if sizes != self.sizes {
            return Err(format!("sizes {:?}, recomputed {sizes:?}", self.sizes));
        }
        for (name, &r) in &self.named_roots {
            if self.nodes[r as usize].namespace.as_deref() != Some(&**name) {
                return Err(format!("namespace root of {name:?} is misnamed"));
            }
        }
        Ok(())
    }
}

/// Depth-first iterator over the nodes of a [`RadixTree`].
pub struct Nodes<'a> {
    tree: &'a RadixTree,
    stack: Vec<(u32, usize)>,
}

impl<'a> Iterator for Nodes<'a> {
    type Item = NodeInfo<'a>;

    fn next(&mut self) -> Option<NodeInfo<'a>> {
        let (idx, depth) = self.stack.pop()?;
        let t = self.tree;
        let n = &t.nodes[idx as usize];
        let below = depth + n.pages.len();
        self.stack.extend(t.children_of(idx).map(|c| (c, below)));
        Some(NodeInfo {
            handle: t.handle(idx),
            parent: t.handle(n.parent),
            namespace: t.namespace_of(idx),
            depth_pages: depth,
            tokens: &n.tokens,
            pages: &n.pages,
            lock_ref: n.lock_ref,
            last_access: n.last_access,
            num_children: n.num_children as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 2;

    /// Tokens of whole pages, page i filled with `syms[i]`.
    fn toks(syms: &[u32]) -> Vec<Token> {
        syms.iter().flat_map(|&s| [s; PS]).collect()
    }

    fn tree() -> RadixTree {
        RadixTree::new(64, PS).unwrap()
    }

    #[test]
    fn match_after_insert_and_partial_pages() {
        let mut t = tree();
        let ins = t.insert(None, &toks(&[1, 2, 3]), &[10, 11, 12]).unwrap();
        assert_eq!(ins.prefix_pages, 0);
        let m = t.match_prefix(None, &toks(&[1, 2, 3]));
        assert_eq!(m.pages, vec![10, 11, 12]);
        assert_eq!(m.node, ins.node);
        // A trailing partial page is ignored on both sides.
        let mut k = toks(&[1, 2]);
        k.push(3);
        assert_eq!(t.match_prefix(None, &k).pages, vec![10, 11]);
        let mut k = toks(&[1]);
        k.push(2);
        let ins = t.insert(None, &k, &[10]).unwrap();
        assert_eq!(ins.prefix_pages, 1);
        // A partial page that differs inside the page does not match.
        assert_eq!(t.match_prefix(None, &[1, 1, 2, 9]).pages, vec![10]);
        assert_eq!(t.match_prefix(None, &[7]).node, NodeHandle::ROOT);
        t.check_invariants().unwrap();
    }

    #[test]
    fn match_splits_and_node_covers_match() {
        let mut t = tree();
        t.insert(None, &toks(&[1, 2, 3, 4]), &[0, 1, 2, 3]).unwrap();
        assert_eq!(t.num_nodes(), 1);
        let m = t.match_prefix(None, &toks(&[1, 2, 9]));
        assert_eq!(m.pages, vec![0, 1]);
        assert_eq!(t.num_nodes(), 2, "split at the match boundary");
        assert_eq!(t.path_pages(m.node).unwrap(), vec![0, 1]);
        assert_eq!(t.lock(m.node).unwrap(), 2);
        assert_eq!(
            t.sizes(),
            TreeSizes {
                evictable: 2,
                protected: 2,
                total: 4
            }
        );
        // Only the unlocked tail can go.
        assert_eq!(t.evict(10), vec![2, 3]);
        assert_eq!(t.evict(10), Vec::<PageId>::new());
        assert_eq!(t.unlock(m.node).unwrap(), 2);
        assert_eq!(t.evict(1), vec![0, 1]);
        assert_eq!(t.sizes(), TreeSizes::default());
        t.check_invariants().unwrap();
    }

    #[test]
    fn insert_reports_duplicates_not_own_pages() {
        let mut t = tree();
        t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap();
        let ins = t.insert(None, &toks(&[1, 2, 3]), &[0, 5, 6]).unwrap();
        assert_eq!(ins.prefix_pages, 2);
        assert_eq!(ins.duplicates, vec![5]);
        assert_eq!(t.match_prefix(None, &toks(&[1, 2, 3])).pages, vec![0, 1, 6]);
        assert!(t.contains_page(6) && !t.contains_page(5));
        t.check_invariants().unwrap();
    }

    #[test]
    fn insert_errors_leave_state_unchanged() {
        let mut t = tree();
        t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap();
        let before = (
            t.sizes(),
            t.num_nodes(),
            t.match_prefix(None, &toks(&[1, 2, 3])),
        );
        let cases: Vec<(Vec<Token>, Vec<PageId>, CacheError)> = vec![
            (
                toks(&[1, 2, 3]),
                vec![0, 1],
                CacheError::PageCountMismatch {
                    expected: 3,
                    got: 2,
                },
            ),
            (
                toks(&[1, 2, 3]),
                vec![0, 1, 64],
                CacheError::PageOutOfRange {
                    page: 64,
                    num_pages: 64,
                },
            ),
            (
                toks(&[1, 2, 3]),
                vec![0, 1, 1],
                CacheError::PageInTree { page: 1 },
            ),
            (
                toks(&[1, 2, 3]),
                vec![0, 0, 7],
                CacheError::PageInTree { page: 0 },
            ),
            (
                toks(&[1, 2, 3, 4]),
                vec![0, 1, 7, 7],
                CacheError::DuplicatePage { page: 7 },
            ),
            (
                toks(&[1, 2, 3]),
                vec![7, 1, 7],
                CacheError::DuplicatePage { page: 7 },
            ),
            (
                toks(&[5, 6]),
                vec![8, 1],
                CacheError::PageInTree { page: 1 },
            ),
        ];
        for (k, p, e) in cases {
            assert_eq!(t.insert(None, &k, &p).unwrap_err(), e, "{k:?} {p:?}");
            t.check_invariants().unwrap();
        }
        let after = (
            t.sizes(),
            t.num_nodes(),
            t.match_prefix(None, &toks(&[1, 2, 3])),
        );
        assert_eq!(before.0, after.0);
        assert_eq!(before.1, after.1);
        assert_eq!(before.2.pages, after.2.pages);
    }

    #[test]
    fn namespaces_never_share() {
        let mut t = tree();
        t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap();
        t.insert(Some("lora-a"), &toks(&[1, 2]), &[2, 3]).unwrap();
        assert_eq!(
            t.match_prefix(Some("lora-a"), &toks(&[1, 2])).pages,
            vec![2, 3]
        );
        assert_eq!(t.match_prefix(None, &toks(&[1, 2])).pages, vec![0, 1]);
        assert!(t
            .match_prefix(Some("lora-b"), &toks(&[1, 2]))
            .pages
            .is_empty());
        // The same page may not be in two namespaces.
        assert_eq!(
            t.insert(Some("lora-b"), &toks(&[1]), &[0]).unwrap_err(),
            CacheError::PageInTree { page: 0 }
        );
        let names: Vec<_> = t.nodes().map(|n| n.namespace).collect();
        assert!(names.contains(&Some("lora-a")) && names.contains(&None));
        // An emptied namespace disappears.
        assert_eq!(t.evict(64).len(), 4);
        assert!(t.named_roots.is_empty());
        t.check_invariants().unwrap();
    }

    #[test]
    fn lru_order_and_whole_leaves() {
        let mut t = tree();
        t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap(); // leaf A (2 pages)
        t.insert(None, &toks(&[3]), &[2]).unwrap(); // leaf B
        t.insert(None, &toks(&[4]), &[3]).unwrap(); // leaf C
        t.match_prefix(None, &toks(&[1, 2])); // A is now the most recent
        assert_eq!(t.evict(1), vec![2], "B is least recent");
        assert_eq!(t.evict(1), vec![3]);
        assert_eq!(t.evict(1), vec![0, 1], "a whole leaf goes at once");
    }

    #[test]
    fn parent_becomes_evictable_leaf() {
        let mut t = tree();
        t.insert(None, &toks(&[1]), &[0]).unwrap();
        t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap();
        t.insert(None, &toks(&[5]), &[2]).unwrap();
        // Parent [1] was touched by the second insert, before [5] was created.
        assert_eq!(t.evict(1), vec![1]);
        assert_eq!(t.evict(1), vec![0]);
        assert_eq!(t.evict(1), vec![2]);
        t.check_invariants().unwrap();
    }

    #[test]
    fn locks_stale_handles_and_underflow() {
        let mut t = tree();
        let a = t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap().node;
        assert_eq!(
            t.unlock(a).unwrap_err(),
            CacheError::LockUnderflow { handle: a.raw() }
        );
        t.lock(a).unwrap();
        t.lock(a).unwrap();
        assert_eq!(t.lock_ref(a).unwrap(), 2);
        t.unlock(a).unwrap();
        t.unlock(a).unwrap();
        assert!(t.unlock(a).is_err());
        assert_eq!(t.evict(10), vec![0, 1]);
        assert_eq!(
            t.lock(a).unwrap_err(),
            CacheError::StaleNode { handle: a.raw() }
        );
        assert!(t.path_pages(a).is_err());
        assert_eq!(t.lock(NodeHandle::ROOT).unwrap(), 0);
        assert_eq!(t.unlock(NodeHandle::ROOT).unwrap(), 0);
        assert!(t.lock(NodeHandle::from_raw(12345)).is_err());
        t.check_invariants().unwrap();
    }

    #[test]
    fn lock_survives_split() {
        let mut t = tree();
        let a = t.insert(None, &toks(&[1, 2, 3]), &[0, 1, 2]).unwrap().node;
        t.lock(a).unwrap();
        let m = t.match_prefix(None, &toks(&[1, 9]));
        assert_eq!(m.pages, vec![0]);
        assert_eq!(
            t.lock_ref(m.node).unwrap(),
            1,
            "the split-off parent inherits the lock"
        );
        assert_eq!(t.evict(10), Vec::<PageId>::new());
        t.unlock(a).unwrap();
        assert_eq!(t.sizes().protected, 0);
        t.check_invariants().unwrap();
    }

    #[test]
    fn reset_returns_pages_and_stales_handles() {
        let mut t = tree();
        let a = t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap().node;
        t.insert(Some("x"), &toks(&[1]), &[5]).unwrap();
        t.lock(a).unwrap();
        let mut pages = t.reset();
        pages.sort();
        assert_eq!(pages, vec![0, 1, 5]);
        assert_eq!(t.sizes(), TreeSizes::default());
        assert!(t.lock(a).is_err());
        assert_eq!(t.nodes().count(), 0);
        t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap();
        t.check_invariants().unwrap();
    }

    #[test]
    fn nodes_iterator_parent_first() {
        let mut t = tree();
        t.insert(None, &toks(&[1, 2]), &[0, 1]).unwrap();
        t.insert(None, &toks(&[1, 3]), &[0, 2]).unwrap();
        let nodes: Vec<_> = t.nodes().collect();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].pages, &[0]);
        assert_eq!(nodes[0].parent, NodeHandle::ROOT);
        assert_eq!(nodes[0].num_children, 2);
        for n in &nodes[1..] {
            assert_eq!(n.parent, nodes[0].handle);
            assert_eq!(n.depth_pages, 1);
        }
    }

    #[test]
    fn weighted_pages_count_their_weight() {
        let mut t = tree();
        let a = t
            .insert_weighted(None, &toks(&[1, 2, 3]), &[0, 1, 2], Some(&[3, 1, 1]))
            .unwrap()
            .node;
        assert_eq!(t.sizes().total, 5);
        // A match that splits keeps each part's weight.
        let m = t.match_prefix(None, &toks(&[1, 9]));
        assert_eq!(t.lock(m.node).unwrap(), 3);
        assert_eq!(
            t.sizes(),
            TreeSizes {
                evictable: 2,
                protected: 3,
                total: 5
            }
        );
        t.unlock(m.node).unwrap();
        // Already cached pages keep their weight; a new leaf takes the given ones.
        t.insert_weighted(
            None,
            &toks(&[1, 2, 3, 4]),
            &[0, 1, 2, 3],
            Some(&[1, 1, 1, 2]),
        )
        .unwrap();
        assert_eq!(t.sizes().total, 7);
        t.check_invariants().unwrap();
        assert!(t
            .insert_weighted(None, &toks(&[5]), &[4], Some(&[0]))
            .is_err());
        // Eviction targets count weight: the 2-weight leaf alone satisfies 2.
        assert_eq!(t.evict(2), vec![3]);
        t.lock(a).unwrap();
        t.unlock(a).unwrap();
        assert_eq!(t.evict(10).len(), 3);
        assert_eq!(t.sizes(), TreeSizes::default());
        t.check_invariants().unwrap();
    }

    #[test]
    fn partial_child_finds_the_longest_run_inside_a_page() {
        let mut t = RadixTree::new(64, 4).unwrap();
        t.insert(None, &[1, 2, 3, 4, 5, 6, 7, 8], &[3, 4]).unwrap();
        t.insert(None, &[1, 2, 3, 4, 5, 6, 9, 9], &[3, 6]).unwrap();
        let m = t.match_prefix(None, &[1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(m.pages, vec![3]);
        assert_eq!(
            t.partial_child(m.node, None, &[5, 6, 7, 0]).unwrap(),
            Some((4, 3))
        );
        assert_eq!(t.partial_child(m.node, None, &[8]).unwrap(), None);
        // From the root (no whole page matched); never a whole page.
        let root = NodeHandle::ROOT;
        assert_eq!(t.partial_child(root, None, &[1, 2]).unwrap(), Some((3, 2)));
        assert_eq!(
            t.partial_child(root, None, &[1, 2, 3, 4]).unwrap(),
            Some((3, 3))
        );
        assert_eq!(t.partial_child(root, Some("other"), &[1]).unwrap(), None);
        t.check_invariants().unwrap();
    }

    fn wide(t: &[Token]) -> Vec<i64> {
        t.iter().map(|&x| i64::from(x)).collect()
    }

    #[test]
    fn wide_keys_walk_like_token_ids() {
        let mut t = tree();
        let ins = t.insert(None, &toks(&[1, 2, 3]), &[10, 11, 12]).unwrap();
        assert_eq!(
            t.page_hash(&toks(&[7, 8])),
            t.page_hash(&wide(&toks(&[7, 8])))
        );
        let m = t.match_prefix(None, &wide(&toks(&[1, 2, 3, 4])));
        assert_eq!((m.pages, m.node), (vec![10, 11, 12], ins.node));
        // A value that is no token id matches nothing (its low bits equal page 2's ids).
        let mut k = wide(&toks(&[1, 2]));
        k[2] += 1 << 32;
        assert_eq!(t.match_prefix(None, &k).pages, vec![10]);
        assert_eq!(t.partial_child(m.node, None, &[-1i64]).unwrap(), None);
        // insert rejects it where it would be stored, changing nothing.
        let before: Vec<_> = t
            .nodes()
            .map(|n| (n.tokens.to_vec(), n.pages.to_vec()))
            .collect();
        let (clock, sizes) = (t.clock(), t.sizes());
        let err = t.insert(None, &k, &[10, 20]).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::InvalidArgument {
                    name: "token ids",
                    ..
                }
            ),
            "{err}"
        );
        let after: Vec<_> = t
            .nodes()
            .map(|n| (n.tokens.to_vec(), n.pages.to_vec()))
            .collect();
        assert_eq!((before, clock, sizes), (after, t.clock(), t.sizes()));
        let ok = t.insert(None, &wide(&toks(&[1, 5])), &[10, 20]).unwrap();
        assert_eq!(ok.prefix_pages, 1);
        assert_eq!(t.match_prefix(None, &toks(&[1, 5])).pages, vec![10, 20]);
        t.check_invariants().unwrap();
    }

    /// Small deterministic generator for the equivalence test below.
    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    #[test]
    fn insert_row_is_insert_for_kv_rows() {
        // Requests as the scheduler makes them: match a key, reuse the matched pages, take
        // fresh pages for the rest (sometimes pages of a prefix another request inserted
        // meanwhile: duplicates), insert the row; interleaved splits and evictions.
        let mut by_tokens = RadixTree::new(4096, PS).unwrap();
        let mut by_row = by_tokens.clone();
        let mut next_page = 0u32;
        let mut rng = 7u64;
        for step in 0..400 {
            let len = 1 + lcg(&mut rng) as usize % 12;
            let syms: Vec<u32> = (0..len).map(|_| (lcg(&mut rng) % 3) as u32).collect();
            let key = toks(&syms);
            let ns = [None, Some("a")][lcg(&mut rng) as usize % 2];
            let m = by_tokens.match_prefix(ns, &key);
            assert_eq!(m, by_row.match_prefix(ns, &key));
            let mut row = m.pages.clone();
            if lcg(&mut rng).is_multiple_of(4) && !row.is_empty() {
                // The request computed its own copy of a page the tree holds.
                row.truncate(row.len() - 1);
            }
            while row.len() < len {
                row.push(next_page);
                next_page += 1;
            }
            let a = by_tokens.insert(ns, &key, &row);
            let b = by_row.insert_row(ns, &wide(&key), &row, None);
            assert_eq!(a, b, "step {step}");
            if step % 37 == 0 {
                assert_eq!(by_tokens.evict(5), by_row.evict(5));
            }
            let info = |t: &RadixTree| {
                t.nodes()
                    .map(|n| (n.handle, n.pages.to_vec(), n.last_access))
                    .collect::<Vec<_>>()
            };
            assert_eq!(info(&by_tokens), info(&by_row), "step {step}");
        }
        by_row.check_invariants().unwrap();
    }

    #[test]
    fn touch_path_stamps_like_a_match() {
        let mut matched = tree();
        matched.insert(None, &toks(&[1, 2, 3]), &[0, 1, 2]).unwrap();
        matched.insert(None, &toks(&[1, 4]), &[0, 3]).unwrap();
        let node = matched.insert(None, &toks(&[5, 6]), &[4, 5]).unwrap().node;
        let mut touched = matched.clone();
        matched.match_prefix(None, &toks(&[5, 6]));
        touched.touch_path(node).unwrap();
        let stamps = |t: &RadixTree| t.nodes().map(|n| n.last_access).collect::<Vec<_>>();
        assert_eq!(stamps(&matched), stamps(&touched));
        assert_eq!(matched.evict(10), touched.evict(10));
        assert!(touched.touch_path(NodeHandle::ROOT).is_ok());
        assert!(matches!(
            touched.touch_path(node),
            Err(CacheError::StaleNode { .. })
        ));
    }

    #[test]
    fn hash_collisions_are_resolved_by_comparison() {
        // Force every first page into one hash bucket through the collision path.
        let mut t = tree();
        t.insert(None, &toks(&[1]), &[0]).unwrap();
        let root = t.default_root;
        let a = t.find_child(root, &toks(&[1])).unwrap();
        let b = t.new_node(root, toks(&[2]), vec![1]);
        t.in_tree[1] = true;
        t.sizes.total += 1;
        t.sizes.evictable += 1;
        // Put b under a's hash as a colliding entry.
        let h = t.page_hash(&toks(&[1]));
        t.nodes[root as usize]
            .children
            .insert(h, Child::Many(vec![a, b]));
        t.nodes[root as usize].num_children += 1;
        t.update_leaf_status(b);
        assert_eq!(t.find_child(root, &toks(&[1])), Some(a));
        assert_eq!(t.find_child(root, &toks(&[3])), None);
        t.remove_child(root, a);
        assert!(matches!(t.nodes[root as usize].children.get(&h), Some(Child::One(x)) if *x == b));
    }
}
