//! `oscar_kv._native`: the thin PyO3 face of `oscar_core`.
//!
//! Every function validates its arguments through `oscar_core` and turns a rejected argument
//! into `ValueError` carrying the core's message (which names the argument). Nothing here can
//! panic: the core's layout math is total on validated configurations, and the cache
//! manager (`cache` module) reports every misuse as a typed error.

mod buffer;
mod cache;

use oscar_core::layout::{self, LayoutConfig, LayoutError, NormMode};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

fn value_error(err: LayoutError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Converts a Python int to the unsigned type the core expects; a negative or oversized value
/// is a `ValueError` naming the argument.
fn unsigned<T: TryFrom<i64>>(name: &str, value: i64) -> PyResult<T> {
    T::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{name} out of range, got {value}")))
}

pub(crate) fn config(
    kv_heads: i64,
    head_dim: i64,
    bits: i64,
    k_group: i64,
    v_group: i64,
    norm: &str,
) -> PyResult<LayoutConfig> {
    let norm: NormMode = norm.parse().map_err(value_error)?;
    LayoutConfig::new(
        unsigned("kv_heads", kv_heads)?,
        unsigned("head_dim", head_dim)?,
        unsigned("bits", bits)?,
        unsigned("k_group", k_group)?,
        unsigned("v_group", v_group)?,
        norm,
    )
    .map_err(value_error)
}

/// Bytes per cached token of one layer in the packed format (page_bytes / 128).
#[pyfunction(bits = "2", k_group = "32", v_group = "32", norm = "\"token\"")]
#[pyo3(text_signature = "(kv_heads, head_dim, bits=2, k_group=32, v_group=32, norm='token')")]
fn bytes_per_token(
    kv_heads: i64,
    head_dim: i64,
    bits: i64,
    k_group: i64,
    v_group: i64,
    norm: &str,
) -> PyResult<f64> {
    let cfg = config(kv_heads, head_dim, bits, k_group, v_group, norm)?;
    Ok(layout::bytes_per_token(&cfg))
}

/// Bytes of one packed 128-token page of one layer.
#[pyfunction(bits = "2", k_group = "32", v_group = "32", norm = "\"token\"")]
#[pyo3(text_signature = "(kv_heads, head_dim, bits=2, k_group=32, v_group=32, norm='token')")]
fn page_bytes(
    kv_heads: i64,
    head_dim: i64,
    bits: i64,
    k_group: i64,
    v_group: i64,
    norm: &str,
) -> PyResult<usize> {
    let cfg = config(kv_heads, head_dim, bits, k_group, v_group, norm)?;
    Ok(layout::page_bytes(&cfg))
}

/// The seven sections of a page as (name, offset, nbytes), in storage order.
#[pyfunction(bits = "2", k_group = "32", v_group = "32", norm = "\"token\"")]
#[pyo3(text_signature = "(kv_heads, head_dim, bits=2, k_group=32, v_group=32, norm='token')")]
fn page_sections(
    kv_heads: i64,
    head_dim: i64,
    bits: i64,
    k_group: i64,
    v_group: i64,
    norm: &str,
) -> PyResult<Vec<(&'static str, usize, usize)>> {
    let cfg = config(kv_heads, head_dim, bits, k_group, v_group, norm)?;
    Ok(layout::page_sections(&cfg)
        .iter()
        .map(|s| (s.name, s.offset, s.nbytes))
        .collect())
}

/// Bytes per token of one layer of a bf16 cache: 4 * kv_heads * head_dim (K and V).
#[pyfunction]
#[pyo3(text_signature = "(kv_heads, head_dim)")]
fn bf16_bytes_per_token(kv_heads: i64, head_dim: i64) -> PyResult<usize> {
    let kv_heads: usize = unsigned("kv_heads", kv_heads)?;
    let head_dim: usize = unsigned("head_dim", head_dim)?;
    kv_heads
        .checked_mul(head_dim)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "kv_heads * head_dim out of range, got {kv_heads} * {head_dim}"
            ))
        })
}

/// Byte-layout math of oscar-kv's packed KV-cache pages and the cache manager (Rust core).
#[pymodule]
fn _native(py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("BLOCK_TOKENS", layout::BLOCK_TOKENS)?;
    m.add_function(wrap_pyfunction!(bytes_per_token, m)?)?;
    m.add_function(wrap_pyfunction!(page_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(page_sections, m)?)?;
    m.add_function(wrap_pyfunction!(bf16_bytes_per_token, m)?)?;
    cache::register(py, m)?;
    Ok(())
}
