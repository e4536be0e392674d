//! Byte layout of one packed KV-cache page.
//!
//! A page holds [`BLOCK_TOKENS`] = 128 tokens of one attention layer, all KV heads, already
//! rotated, scaled and quantized. Its bytes are seven contiguous sections of one buffer, in
//! this order (all multi-byte values little-endian):
//!
//! | section   | dtype | shape                                   |
//! |-----------|-------|-----------------------------------------|
//! | `k_codes` | u8    | `[kv_heads, 128, head_dim * bits / 8]`  |
//! | `v_codes` | u8    | `[kv_heads, 128, head_dim * bits / 8]`  |
//! | `k_scale` | f16   | `[kv_heads, 128 / k_group, head_dim]`   |
//! | `k_zero`  | f16   | `[kv_heads, 128 / k_group, head_dim]`   |
//! | `v_scale` | f16   | `[kv_heads, 128, head_dim / v_group]`   |
//! | `v_zero`  | f16   | `[kv_heads, 128, head_dim / v_group]`   |
//! | `norms`   | f32   | `[128]` (token), `[kv_heads, 128]` (head), empty (none) |
//!
//! With `kv_heads = 8, head_dim = 128, bits = 2, k_group = 32, v_group = 32` and one norm per
//! token this is 772 bytes per token (256 + 256 + 128 + 128 + 4) against 4096 in bf16.

use std::fmt;
use std::str::FromStr;

/// Tokens per page; also the residual-window length and the quantization block.
pub const BLOCK_TOKENS: usize = 128;

/// Largest accepted `kv_heads`. Far above any real model; it keeps every byte count of a
/// page well inside `usize` (even on 32-bit targets), so the layout math cannot overflow.
pub const MAX_KV_HEADS: usize = 1 << 16;

/// Names of the page sections, in storage order.
pub const SECTION_NAMES: [&str; 7] = [
    "k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "norms",
];

const HEAD_DIMS: [usize; 5] = [16, 32, 64, 128, 256];
const BITS: [u32; 2] = [2, 4];
const K_GROUPS: [usize; 3] = [32, 64, 128];
const V_GROUPS: [usize; 4] = [16, 32, 64, 128];

const F16_BYTES: usize = 2;
const F32_BYTES: usize = 4;

/// Where the per-token key norms of the omni-token scaling live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NormMode {
    /// One fp32 norm per token over all KV heads of the layer (the paper's default).
    Token,
    /// One fp32 norm per (KV head, token).
    Head,
    /// No scaling, no norms stored (rotation-only and KIVI baselines).
    None,
}

impl NormMode {
    /// The lowercase name used on the Python side: `"token"`, `"head"` or `"none"`.
    pub fn as_str(self) -> &'static str {
        match self {
            NormMode::Token => "token",
            NormMode::Head => "head",
            NormMode::None => "none",
        }
    }
}

impl fmt::Display for NormMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NormMode {
    type Err = LayoutError;

    /// Parses `"token"`, `"head"` or `"none"` (exact, lowercase).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "token" => Ok(NormMode::Token),
            "head" => Ok(NormMode::Head),
            "none" => Ok(NormMode::None),
            other => Err(LayoutError::Norm(other.to_owned())),
        }
    }
}

/// An invalid layout argument. Each variant names one argument and carries the bad value;
/// the `Display` text reads `"<argument> must be <rule>, got <value>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// `kv_heads` is 0 or above [`MAX_KV_HEADS`].
    KvHeads(usize),
    /// `head_dim` is not a power of two in 16..=256.
    HeadDim(usize),
    /// `bits` is neither 2 nor 4.
    Bits(u32),
    /// `k_group` is not 32, 64 or 128.
    KGroup(usize),
    /// `v_group` is not 16, 32, 64 or 128, or does not divide `head_dim`.
    VGroup {
        /// The rejected group size.
        v_group: usize,
        /// The (valid) head dimension it had to divide.
        head_dim: usize,
    },
    /// `norm` is not one of `"token"`, `"head"`, `"none"`.
    Norm(String),
}

impl LayoutError {
    /// The name of the rejected argument, as spelled in the Python API.
    pub fn argument(&self) -> &'static str {
        match self {
            LayoutError::KvHeads(_) => "kv_heads",
            LayoutError::HeadDim(_) => "head_dim",
            LayoutError::Bits(_) => "bits",
            LayoutError::KGroup(_) => "k_group",
            LayoutError::VGroup { .. } => "v_group",
            LayoutError::Norm(_) => "norm",
        }
    }
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arg = self.argument();
        match self {
            LayoutError::KvHeads(got) => {
                write!(f, "{arg} must be in 1..={MAX_KV_HEADS}, got {got}")
            }
            LayoutError::HeadDim(got) => {
                write!(f, "{arg} must be a power of two in 16..=256, got {got}")
            }
            LayoutError::Bits(got) => write!(f, "{arg} must be 2 or 4, got {got}"),
            LayoutError::KGroup(got) => write!(
                f,
                "{arg} must be 32, 64 or 128 (a divisor of the {BLOCK_TOKENS}-token page), \
                 got {got}"
            ),
            LayoutError::VGroup { v_group, head_dim } => write!(
                f,
                "{arg} must be 16, 32, 64 or 128 and divide head_dim ({head_dim}), got {v_group}"
            ),
            LayoutError::Norm(got) => {
                write!(f, "{arg} must be 'token', 'head' or 'none', got '{got}'")
            }
        }
    }
}

impl std::error::Error for LayoutError {}

/// A validated page-layout configuration. Fields are private so that every value of this
/// type satisfies the rules checked by [`LayoutConfig::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayoutConfig {
    kv_heads: usize,
    head_dim: usize,
    bits: u32,
    k_group: usize,
    v_group: usize,
    norm: NormMode,
}

impl LayoutConfig {
    /// Checks the arguments in order (`kv_heads`, `head_dim`, `bits`, `k_group`, `v_group`)
    /// and returns the first violation:
    /// - `kv_heads` in `1..=MAX_KV_HEADS`;
    /// - `head_dim` a power of two in 16..=256;
    /// - `bits` 2 or 4;
    /// - `k_group` 32, 64 or 128 (divides [`BLOCK_TOKENS`]);
    /// - `v_group` 16, 32, 64 or 128 and a divisor of `head_dim`.
    pub fn new(
        kv_heads: usize,
        head_dim: usize,
        bits: u32,
        k_group: usize,
        v_group: usize,
        norm: NormMode,
    ) -> Result<Self, LayoutError> {
        if !(1..=MAX_KV_HEADS).contains(&kv_heads) {
            return Err(LayoutError::KvHeads(kv_heads));
        }
        if !HEAD_DIMS.contains(&head_dim) {
            return Err(LayoutError::HeadDim(head_dim));
        }
        if !BITS.contains(&bits) {
            return Err(LayoutError::Bits(bits));
        }
        if !K_GROUPS.contains(&k_group) {
            return Err(LayoutError::KGroup(k_group));
        }
        if !V_GROUPS.contains(&v_group) || !head_dim.is_multiple_of(v_group) {
            return Err(LayoutError::VGroup { v_group, head_dim });
        }
        Ok(LayoutConfig {
            kv_heads,
            head_dim,
            bits,
            k_group,
            v_group,
            norm,
        })
    }

    /// Number of KV heads of the layer.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Bits per quantized K or V code.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Tokens per K quantization group (K is quantized per channel over token groups).
    pub fn k_group(&self) -> usize {
        self.k_group
    }

    /// Channels per V quantization group (V is quantized per token over channel groups).
    pub fn v_group(&self) -> usize {
        self.v_group
    }

    /// Where the key norms live.
    pub fn norm(&self) -> NormMode {
        self.norm
    }

    /// Bytes of packed codes of one token of one head (K or V alone).
    pub fn code_bytes_per_head_token(&self) -> usize {
        // head_dim >= 16 and bits in {2, 4}: always a whole number of bytes.
        self.head_dim * self.bits as usize / 8
    }
}

/// One contiguous byte range of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Section {
    /// One of [`SECTION_NAMES`].
    pub name: &'static str,
    /// Byte offset from the start of the page.
    pub offset: usize,
    /// Length in bytes (0 for `norms` under [`NormMode::None`]).
    pub nbytes: usize,
}

impl Section {
    /// One past the last byte: `offset + nbytes`.
    pub fn end(&self) -> usize {
        self.offset + self.nbytes
    }
}

/// The seven sections of a page, in storage order, each starting where the previous ends.
pub fn page_sections(cfg: &LayoutConfig) -> [Section; 7] {
    let h = cfg.kv_heads;
    let d = cfg.head_dim;
    let t = BLOCK_TOKENS;
    let codes = h * t * cfg.code_bytes_per_head_token();
    let k_param = h * (t / cfg.k_group) * d * F16_BYTES;
    let v_param = h * t * (d / cfg.v_group) * F16_BYTES;
    let norms = match cfg.norm {
        NormMode::Token => t * F32_BYTES,
        NormMode::Head => h * t * F32_BYTES,
        NormMode::None => 0,
    };
    let sizes = [codes, codes, k_param, k_param, v_param, v_param, norms];

    // `from_fn` calls the closure in index order, so `offset` accumulates front to back.
    let mut offset = 0;
    std::array::from_fn(|i| {
        let section = Section {
            name: SECTION_NAMES[i],
            offset,
            nbytes: sizes[i],
        };
        offset += sizes[i];
        section
    })
}

/// Total bytes of one page (all sections).
pub fn page_bytes(cfg: &LayoutConfig) -> usize {
    page_sections(cfg)[6].end()
}

/// Bytes per cached token of one layer: `page_bytes / 128`. Not always a whole number
/// (e.g. one head of dimension 16 with `k_group = 128`), hence `f64`; the value is exact.
pub fn bytes_per_token(cfg: &LayoutConfig) -> f64 {
    page_bytes(cfg) as f64 / BLOCK_TOKENS as f64
}

/// Bytes per token of one layer of an unquantized bf16 cache: K and V, 2 bytes per value.
pub fn bf16_bytes_per_token(kv_heads: usize, head_dim: usize) -> usize {
    2 * 2 * kv_heads * head_dim
}

/// How many times more tokens fit in the same bytes than with a bf16 cache.
pub fn compression_ratio(cfg: &LayoutConfig) -> f64 {
    bf16_bytes_per_token(cfg.kv_heads, cfg.head_dim) as f64 / bytes_per_token(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(h: usize, d: usize, bits: u32, kg: usize, vg: usize, norm: NormMode) -> LayoutConfig {
        LayoutConfig::new(h, d, bits, kg, vg, norm).expect("valid config")
    }

    #[test]
    fn design_numbers() {
        let c = cfg(8, 128, 2, 32, 32, NormMode::Token);
        assert_eq!(page_bytes(&c), 772 * BLOCK_TOKENS);
        assert_eq!(bytes_per_token(&c), 772.0);
        let per_token: Vec<f64> = page_sections(&c)
            .iter()
            .map(|s| s.nbytes as f64 / BLOCK_TOKENS as f64)
            .collect();
        assert_eq!(per_token, [256.0, 256.0, 64.0, 64.0, 64.0, 64.0, 4.0]);
        assert_eq!(bf16_bytes_per_token(8, 128), 4096);
        assert!((compression_ratio(&c) - 4096.0 / 772.0).abs() < 1e-12);
        assert!(compression_ratio(&c) > 5.3);

        let c128 = cfg(8, 128, 2, 128, 32, NormMode::Token);
        assert_eq!(bytes_per_token(&c128), 676.0);
        assert!(compression_ratio(&c128) > 6.0);
    }

    #[test]
    fn norm_modes_and_bits() {
        let head = cfg(8, 128, 2, 32, 32, NormMode::Head);
        assert_eq!(bytes_per_token(&head), 768.0 + 32.0);
        let none = cfg(8, 128, 2, 32, 32, NormMode::None);
        assert_eq!(bytes_per_token(&none), 768.0);
        assert_eq!(page_sections(&none)[6].nbytes, 0);
        assert_eq!(page_sections(&none)[6].offset, page_bytes(&none));
        let four = cfg(8, 128, 4, 32, 32, NormMode::Token);
        assert_eq!(bytes_per_token(&four), 512.0 + 512.0 + 256.0 + 4.0);
    }

    #[test]
    fn fractional_bytes_per_token() {
        // k params of one head, D = 16, k_group = 128: 2 * 16 * 2 = 64 bytes per page.
        let c = cfg(1, 16, 2, 128, 16, NormMode::None);
        assert_eq!(page_bytes(&c), 2 * 128 * 4 + 64 + 2 * 128 * 2);
        assert_eq!(bytes_per_token(&c), 8.0 + 0.5 + 4.0);
    }

    #[test]
    fn sections_in_order_and_contiguous() {
        let c = cfg(3, 64, 2, 64, 16, NormMode::Head);
        let s = page_sections(&c);
        assert_eq!(s.map(|x| x.name), SECTION_NAMES);
        assert_eq!(s[0].offset, 0);
        for w in s.windows(2) {
            assert_eq!(w[0].end(), w[1].offset);
        }
        assert_eq!(s[6].end(), page_bytes(&c));
    }

    #[test]
    fn each_bad_argument_is_named() {
        let cases = [
            ((0, 128, 2, 32, 32), "kv_heads", "got 0"),
            ((MAX_KV_HEADS + 1, 128, 2, 32, 32), "kv_heads", "got 65537"),
            ((8, 96, 2, 32, 32), "head_dim", "got 96"),
            ((8, 8, 2, 32, 32), "head_dim", "got 8"),
            ((8, 512, 2, 32, 32), "head_dim", "got 512"),
            ((8, 0, 2, 32, 32), "head_dim", "got 0"),
            ((8, 128, 3, 32, 32), "bits", "got 3"),
            ((8, 128, 8, 32, 32), "bits", "got 8"),
            ((8, 128, 2, 16, 32), "k_group", "got 16"),
            ((8, 128, 2, 48, 32), "k_group", "got 48"),
            ((8, 128, 2, 256, 32), "k_group", "got 256"),
            ((8, 128, 2, 32, 8), "v_group", "got 8"),
            ((8, 128, 2, 32, 48), "v_group", "got 48"),
            ((8, 64, 2, 32, 128), "v_group", "got 128"),
        ];
        for ((h, d, bits, kg, vg), arg, got) in cases {
            let err = LayoutConfig::new(h, d, bits, kg, vg, NormMode::Token).expect_err(arg);
            assert_eq!(err.argument(), arg);
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("{arg} must be")), "{msg}");
            assert!(msg.ends_with(got), "{msg}");
        }
        let msg = LayoutConfig::new(8, 96, 2, 32, 32, NormMode::Token)
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "head_dim must be a power of two in 16..=256, got 96");
    }

    #[test]
    fn norm_parsing() {
        for mode in [NormMode::Token, NormMode::Head, NormMode::None] {
            assert_eq!(mode.as_str().parse::<NormMode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        let err = "Token".parse::<NormMode>().unwrap_err();
        assert_eq!(err.argument(), "norm");
        assert_eq!(
            err.to_string(),
            "norm must be 'token', 'head' or 'none', got 'Token'"
        );
    }

    #[test]
    fn error_is_std_error() {
        let err: Box<dyn std::error::Error> = Box::new(LayoutError::Bits(3));
        assert_eq!(err.to_string(), "bits must be 2 or 4, got 3");
    }
}
