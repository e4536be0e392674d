//! Property tests of the page layout over the whole space of valid configurations.

use oscar_core::{
    bf16_bytes_per_token, bytes_per_token, compression_ratio, page_bytes, page_sections,
    LayoutConfig, LayoutError, NormMode, BLOCK_TOKENS, MAX_KV_HEADS, SECTION_NAMES,
};
use proptest::prelude::*;
use proptest::sample::select;

const HEAD_DIMS: [usize; 5] = [16, 32, 64, 128, 256];
const K_GROUPS: [usize; 3] = [32, 64, 128];
const V_GROUPS: [usize; 4] = [16, 32, 64, 128];
const NORMS: [NormMode; 3] = [NormMode::Token, NormMode::Head, NormMode::None];

/// Bytes of one element of each section, in storage order.
const ELEM_BYTES: [usize; 7] = [1, 1, 2, 2, 2, 2, 4];

fn valid_config() -> impl Strategy<Value = LayoutConfig> {
    (
        prop_oneof![1..=64usize, 1..=MAX_KV_HEADS],
        select(HEAD_DIMS.to_vec()),
        select(vec![2u32, 4]),
        select(K_GROUPS.to_vec()),
        select(V_GROUPS.to_vec()),
        select(NORMS.to_vec()),
    )
        .prop_filter("v_group must divide head_dim", |(_, d, _, _, vg, _)| {
            d % vg == 0
        })
        .prop_map(|(h, d, bits, kg, vg, norm)| {
            LayoutConfig::new(h, d, bits, kg, vg, norm).expect("valid by construction")
        })
}

/// Bytes per token written out from the format description, independently of `page_sections`.
fn expected_bytes_per_token(c: &LayoutConfig) -> f64 {
    let h = c.kv_heads() as f64;
    let d = c.head_dim() as f64;
    let codes = 2.0 * h * d * c.bits() as f64 / 8.0;
    let k_params = 2.0 * 2.0 * h * d / c.k_group() as f64;
    let v_params = 2.0 * 2.0 * h * d / c.v_group() as f64;
    let norms = match c.norm() {
        NormMode::Token => 4.0,
        NormMode::Head => 4.0 * h,
        NormMode::None => 0.0,
    };
    codes + k_params + v_params + norms
}

/// The constructor arguments of a configuration, to vary one at a time.
type Args = (usize, usize, u32, usize, usize, NormMode);

fn args(c: &LayoutConfig) -> Args {
    (
        c.kv_heads(),
        c.head_dim(),
        c.bits(),
        c.k_group(),
        c.v_group(),
        c.norm(),
    )
}

fn build((h, d, bits, kg, vg, norm): Args) -> Result<LayoutConfig, LayoutError> {
    LayoutConfig::new(h, d, bits, kg, vg, norm)
}

proptest! {
    #[test]
    fn sections_tile_the_page(c in valid_config()) {
        let s = page_sections(&c);
        prop_assert_eq!(s.map(|x| x.name), SECTION_NAMES);
        prop_assert_eq!(s[0].offset, 0);
        for w in s.windows(2) {
            prop_assert_eq!(w[0].end(), w[1].offset);
        }
        prop_assert_eq!(s[6].end(), page_bytes(&c));
        for (sec, elem) in s.iter().zip(ELEM_BYTES) {
            prop_assert_eq!(sec.offset % elem, 0, "{} misaligned", sec.name);
            prop_assert_eq!(sec.nbytes % elem, 0, "{} not whole elements", sec.name);
        }
        // Every section but an absent norms section is non-empty.
        for sec in &s[..6] {
            prop_assert!(sec.nbytes > 0);
        }
        prop_assert_eq!(s[6].nbytes == 0, c.norm() == NormMode::None);
    }

    #[test]
    fn bytes_match_the_format(c in valid_config()) {
        prop_assert_eq!(bytes_per_token(&c), expected_bytes_per_token(&c));
        prop_assert_eq!(bytes_per_token(&c) * BLOCK_TOKENS as f64, page_bytes(&c) as f64);
        let bf16 = bf16_bytes_per_token(c.kv_heads(), c.head_dim()) as f64;
        prop_assert_eq!(compression_ratio(&c), bf16 / bytes_per_token(&c));
        prop_assert!(compression_ratio(&c) > 1.5);
    }

    #[test]
    fn fewer_bits_and_coarser_groups_cost_less(c in valid_config()) {
        let (mut four, mut k128, mut none) = (args(&c), args(&c), args(&c));
        four.2 = 4;
        k128.3 = 128;
        none.5 = NormMode::None;
        prop_assert!(page_bytes(&c) <= page_bytes(&build(four).unwrap()));
        prop_assert!(page_bytes(&build(k128).unwrap()) <= page_bytes(&c));
        prop_assert!(page_bytes(&build(none).unwrap()) <= page_bytes(&c));
    }

    #[test]
    fn invalid_values_name_their_argument(
        c in valid_config(),
        which in 0usize..5,
        raw in any::<usize>(),
    ) {
        // Replace one argument by a value outside its allowed set.
        let outside = |allowed: &[usize]| if allowed.contains(&raw) { raw + 1 } else { raw };
        let mut a = args(&c);
        match which {
            0 => a.0 = raw.saturating_add(MAX_KV_HEADS + 1),
            1 => a.1 = outside(&HEAD_DIMS),
            2 => {
                let b = (raw % 1000) as u32;
                a.2 = if b == 2 || b == 4 { b + 1 } else { b };
            }
            3 => a.3 = outside(&K_GROUPS),
            _ => a.4 = outside(&V_GROUPS),
        }
        let result = build(a);
        let err = result.expect_err("invalid value accepted");
        let arg = ["kv_heads", "head_dim", "bits", "k_group", "v_group"][which];
        prop_assert_eq!(err.argument(), arg);
        let msg = err.to_string();
        prop_assert!(msg.starts_with(&format!("{arg} must be ")), "{}", msg);
    }
}

/// Every valid (head_dim, bits, k_group, v_group, norm) combination, checked exhaustively for
/// a few head counts, and every invalid power-of-two v_group.
#[test]
fn exhaustive_small_space() {
    let mut valid = 0;
    for h in [1, 2, 3, 8, 32] {
        for d in HEAD_DIMS {
            for bits in [2, 4] {
                for kg in K_GROUPS {
                    for vg in V_GROUPS {
                        for norm in NORMS {
                            match LayoutConfig::new(h, d, bits, kg, vg, norm) {
                                Ok(c) => {
                                    valid += 1;
                                    assert_eq!(bytes_per_token(&c), expected_bytes_per_token(&c));
                                }
                                Err(e) => {
                                    assert!(vg > d, "{e}");
                                    assert_eq!(e.argument(), "v_group");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // v_group <= head_dim pairs: d=16:1, 32:2, 64:3, 128:4, 256:4 -> 14; x 2 bits x 3 kg x 3 norms.
    assert_eq!(valid, 5 * 14 * 2 * 3 * 3);
}
