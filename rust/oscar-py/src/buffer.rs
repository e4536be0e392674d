//! Integer arrays in and out of Python without a Python object per element.
//!
//! In: any object exporting a 1-D (possibly strided) buffer of 2-, 4- or 8-byte integers
//! (`numpy` int32/int64 arrays, `array.array('q')` as SGLang's `RadixKey` holds, memoryviews)
//! is read straight from its memory; other sequences of ints (lists, tuples, iterators) go
//! through the generic per-element path. Out: `array.array('q')`, which
//! `numpy.frombuffer` and `torch.frombuffer` wrap without a copy.
//!
//! pyo3 0.17 offers `PyBuffer` only outside the limited API or from Python 3.11 on, and it
//! has no `abi3-py311` feature, so this abi3-py310 build declares the two buffer-protocol
//! functions itself. They are exported by every CPython 3 and are part of the stable ABI
//! since 3.11; the package requires Python >= 3.11 (pyproject.toml).

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};

use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::once_cell::GILOnceCell;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::AsPyPointer;

/// CPython's `Py_buffer` (Include/pybuffer.h, unchanged since 3.3).
#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut c_void,
}

extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut RawBuffer, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawBuffer);
}

const PYBUF_FORMAT: c_int = 0x0004;
const PYBUF_ND: c_int = 0x0008;
const PYBUF_STRIDES: c_int = 0x0010 | PYBUF_ND;

/// An acquired buffer view, released on drop. Boxed because exporters may point `shape`
/// into the struct itself (`PyBuffer_FillInfo` sets `shape = &view->len`), so it must not
/// move. Holds raw pointers, hence `!Send`: it never leaves the thread (and GIL) that got it.
struct View(Box<RawBuffer>);

impl View {
    /// `Ok(None)` if `obj` does not export a strided buffer (the caller falls back to the
    /// sequence path); the Python error of that attempt is cleared.
    fn get(obj: &PyAny) -> PyResult<Option<View>> {
        let mut raw = Box::new(RawBuffer {
            buf: std::ptr::null_mut(),
            obj: std::ptr::null_mut(),
            len: 0,
            itemsize: 0,
            readonly: 0,
            ndim: 0,
            format: std::ptr::null_mut(),
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            suboffsets: std::ptr::null_mut(),
            internal: std::ptr::null_mut(),
        });
        // SAFETY: `obj` is a live object (borrowed for this call, GIL held via `&PyAny`) and
        // `raw` points to a writable, correctly laid-out Py_buffer that outlives the call.
        let rc =
            unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *raw, PYBUF_FORMAT | PYBUF_STRIDES) };
        if rc != 0 {
            let err = PyErr::fetch(obj.py());
            if err.is_instance_of::<PyBufferError>(obj.py())
                || err.is_instance_of::<PyTypeError>(obj.py())
            {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(View(raw)))
    }

    fn format(&self) -> String {
        if self.0.format.is_null() {
            return "B".to_owned();
        }
        // SAFETY: a non-null `format` of an acquired view is a NUL-terminated string owned
        // by the exporter and valid until release; we copy it out immediately.
        unsafe { CStr::from_ptr(self.0.format) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: the view was filled by a successful PyObject_GetBuffer and is released
        // exactly once; a View only exists inside calls that hold the GIL.
        unsafe { PyBuffer_Release(&mut *self.0) }
    }
}

/// The integer kind of a buffer format, or `None` if it is not a native integer.
fn int_kind(format: &str) -> Option<bool> {
    let mut f = format;
    if let Some(rest) = f.strip_prefix(['@', '=']) {
        f = rest;
    } else if let Some(rest) = f.strip_prefix('<') {
        if cfg!(target_endian = "big") {
            return None;
        }
        f = rest;
    } else if let Some(rest) = f.strip_prefix(['>', '!']) {
        if cfg!(target_endian = "little") {
            return None;
        }
        f = rest;
    }
    match f {
        "h" | "i" | "l" | "q" | "n" => Some(true),
        "H" | "I" | "L" | "Q" | "N" => Some(false),
        _ => None,
    }
}

fn dtype_error(what: &str, got: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "{what} must be a 1-D array of int16/int32/int64 (numpy array, array.array) or a \
         sequence of ints, got {got}"
    ))
}

/// Reads `n` native-endian items of type `T` at `base + i * stride`, converting each with
/// `conv`; `Err(i)` names the first item `valid` rejects. Two passes (check, then convert)
/// over contiguous data: both vectorize, unlike one pass that also tracks validity.
///
/// # Safety
/// For every `0 <= i < n`, `base + i * stride` must point to `size_of::<T>()` readable bytes
/// that stay valid during the call.
unsafe fn gather<T: Copy, U>(
    base: *const u8,
    n: usize,
    stride: isize,
    valid: impl Fn(T) -> bool,
    conv: impl Fn(T) -> U,
) -> Result<Vec<U>, usize> {
    fn run<T, U>(
        n: usize,
        at: impl Fn(usize) -> T,
        valid: impl Fn(T) -> bool,
        conv: impl Fn(T) -> U,
    ) -> Result<Vec<U>, usize> {
        if !(0..n).fold(true, |ok, i| ok & valid(at(i))) {
            return Err((0..n).find(|&i| !valid(at(i))).unwrap_or(0));
        }
        Ok((0..n).map(|i| conv(at(i))).collect())
    }
    // SAFETY (both closures): i < n, so the item lies where the caller's contract says.
    // Unaligned reads through raw pointers: no reference into the buffer is formed. The
    // contiguous case is a separate loop so that it vectorizes.
    if stride == std::mem::size_of::<T>() as isize {
        let p = base.cast::<T>();
        run(n, |i| unsafe { p.add(i).read_unaligned() }, valid, conv)
    } else {
        let at = |i: usize| unsafe {
            base.offset(i as isize * stride)
                .cast::<T>()
                .read_unaligned()
        };
        run(n, at, valid, conv)
    }
}

/// An acquired 1-D integer buffer: element reads for `gather`.
struct IntView {
    _view: View,
    base: *const u8,
    n: usize,
    stride: isize,
    itemsize: usize,
    signed: bool,
}

impl IntView {
    /// `Ok(None)` if `obj` exports no buffer; errors for non-integer or non-1-D buffers.
    fn get(obj: &PyAny, what: &str, limit: usize) -> PyResult<Option<IntView>> {
        let Some(view) = View::get(obj)? else {
            return Ok(None);
        };
        let format = view.format();
        let signed = int_kind(&format)
            .ok_or_else(|| dtype_error(what, &format!("a buffer of format '{format}'")))?;
        let raw = &*view.0;
        let itemsize = raw.itemsize as usize;
        if !matches!(itemsize, 2 | 4 | 8) {
            return Err(dtype_error(what, &format!("{itemsize}-byte integers")));
        }
        if raw.ndim != 1 {
            return Err(PyValueError::new_err(format!(
                "{what} must be 1-D, got {} dimensions",
                raw.ndim
            )));
        }
        if raw.shape.is_null() || raw.strides.is_null() {
            return Err(PyBufferError::new_err(format!(
                "{what}: the exporter gave no shape or strides"
            )));
        }
        // SAFETY: both pointers are non-null (checked above) and, for an acquired view of
        // ndim 1, point to one Py_ssize_t each, valid until release.
        let (n, stride) = unsafe { (*raw.shape, *raw.strides) };
        let base = raw.buf as *const u8;
        Ok(Some(IntView {
            n: usize::try_from(n).unwrap_or(0).min(limit),
            base,
            stride,
            itemsize,
            signed,
            _view: view,
        }))
    }

    /// Runs the visitor with the element type of this view.
    fn dispatch<R>(&self, f: impl IntVisitor<Output = R>) -> R {
        let (b, n, s) = (self.base, self.n, self.stride);
        // SAFETY: the exporter guarantees an item of `itemsize` readable bytes at
        // `buf + i * strides[0]` for every 0 <= i < shape[0] (no suboffsets: PYBUF_INDIRECT
        // was not requested), valid until `_view` is released when `self` drops;
        // n <= shape[0]. We hold the GIL, so Python code cannot resize or write the array
        // meanwhile (native code writing it without the GIL would race any reader alike).
        // The element type matches `itemsize` and the format's signedness.
        unsafe {
            match (self.itemsize, self.signed) {
                (8, true) => f.visit::<i64>(b, n, s),
                (8, false) => f.visit::<u64>(b, n, s),
                (4, true) => f.visit::<i32>(b, n, s),
                (4, false) => f.visit::<u32>(b, n, s),
                (_, true) => f.visit::<i16>(b, n, s),
                (_, false) => f.visit::<u16>(b, n, s),
            }
        }
    }
}

/// The integer element types a buffer may hold, with their token / i64 conversions.
trait Int: Copy + std::fmt::Display {
    fn token_ok(self) -> bool;
    /// Nonzero iff the value is not a valid token (OR-able across a whole array).
    fn bad_bits(self) -> u64;
    fn to_token(self) -> u32;
    fn to_i64(self) -> i64;
}

macro_rules! int_impl {
    ($t:ty, |$v:ident| $ok:expr, $bad:expr, $i64:expr) => {
        // Some types ignore the value in some methods (e.g. every u32 is a valid token).
        #[allow(unused_variables)]
        impl Int for $t {
            #[inline(always)]
            fn token_ok(self) -> bool {
                let $v = self;
                $ok
            }
            #[inline(always)]
            fn bad_bits(self) -> u64 {
                let $v = self;
                $bad
            }
            #[inline(always)]
            fn to_token(self) -> u32 {
                self as u32
            }
            #[inline(always)]
            fn to_i64(self) -> i64 {
                let $v = self;
                $i64
            }
        }
    };
}

int_impl!(i64, |v| (v as u64) <= u32::MAX as u64, (v as u64) >> 32, v);
int_impl!(
    u64,
    |v| v <= u32::MAX as u64,
    v >> 32,
    v.min(i64::MAX as u64) as i64
);
int_impl!(i32, |v| v >= 0, (v as u32 >> 31) as u64, v as i64);
int_impl!(u32, |v| true, 0, v as i64);
int_impl!(i16, |v| v >= 0, (v as u16 >> 15) as u64, v as i64);
int_impl!(u16, |v| true, 0, v as i64);

/// A computation over the elements of an `IntView`, generic in the element type.
trait IntVisitor {
    type Output;
    /// # Safety
    /// The `gather` contract for `T` at (base, n, stride).
    unsafe fn visit<T: Int>(self, base: *const u8, n: usize, stride: isize) -> Self::Output;
}

/// Token ids, or the first out-of-range value and its index.
struct ToTokens;

impl IntVisitor for ToTokens {
    type Output = Result<Vec<u32>, (usize, String)>;
    unsafe fn visit<T: Int>(self, base: *const u8, n: usize, stride: isize) -> Self::Output {
        // One pass that converts and ORs the out-of-range bits (vectorizes); the culprit
        // is located only on failure.
        let mut bad = 0u64;
        let size = std::mem::size_of::<T>();
        let out: Vec<u32> = if stride == size as isize && base.cast::<T>().is_aligned() {
            // SAFETY: forwarded from the caller (n contiguous items), and aligned (checked):
            // a slice gives two plain loops that vectorize, unlike unaligned reads.
            let items = unsafe { std::slice::from_raw_parts(base.cast::<T>(), n) };
            bad = items.iter().fold(0, |acc, v| acc | v.bad_bits());
            items.iter().map(|v| v.to_token()).collect()
        } else if stride == size as isize {
            let p = base.cast::<T>();
            (0..n)
                .map(|i| {
                    // SAFETY: forwarded from the caller (contiguous items, i < n).
                    let v = unsafe { p.add(i).read_unaligned() };
                    bad |= v.bad_bits();
                    v.to_token()
                })
                .collect()
        } else {
            (0..n)
                .map(|i| {
                    // SAFETY: forwarded from the caller (i < n).
                    let v = unsafe {
                        base.offset(i as isize * stride)
                            .cast::<T>()
                            .read_unaligned()
                    };
                    bad |= v.bad_bits();
                    v.to_token()
                })
                .collect()
        };
        if bad == 0 {
            return Ok(out);
        }
        // SAFETY: forwarded.
        let all = unsafe { gather(base, n, stride, |_: T| true, |v: T| v) }.unwrap_or_default();
        let i = all.iter().position(|v| !v.token_ok()).unwrap_or(0);
        Err((i, all.get(i).map(|v| v.to_string()).unwrap_or_default()))
    }
}

/// Plain integers as i64.
struct ToI64;

impl IntVisitor for ToI64 {
    type Output = Vec<i64>;
    unsafe fn visit<T: Int>(self, base: *const u8, n: usize, stride: isize) -> Self::Output {
        // SAFETY: forwarded.
        unsafe { gather(base, n, stride, |_: T| true, |v: T| v.to_i64()) }.unwrap_or_default()
    }
}

/// The first `limit` elements of a non-buffer sequence of ints.
fn sequence_ints(obj: &PyAny, what: &str, limit: usize) -> PyResult<Vec<i64>> {
    if obj.is_instance_of::<pyo3::types::PyString>()? {
        return Err(dtype_error(what, "str"));
    }
    let iter = obj.iter().map_err(|_| {
        dtype_error(
            what,
            &format!("an object of type {}", obj.get_type().name().unwrap_or("?")),
        )
    })?;
    let mut out = Vec::new();
    for (i, item) in iter.take(limit).enumerate() {
        let item = item?;
        let v: i64 = item.extract().map_err(|_| {
            let ty = item.get_type().name().unwrap_or("?").to_owned();
            dtype_error(what, &format!("an element of type {ty} at index {i}"))
        })?;
        out.push(v);
    }
    Ok(out)
}

fn token_range_error(i: usize, v: &str) -> PyErr {
    PyValueError::new_err(format!(
        "token ids must be in 0..={}, got {v} at index {i}",
        u32::MAX
    ))
}

/// Token ids of one call, at most `limit` of them: a value outside `0..=u32::MAX` is a
/// `ValueError` naming its index. Contiguous aligned int64 / int32 / uint32 buffers
/// (SGLang's `array('q')`, numpy arrays) are read in place, with one read-only check pass
/// and no copy: the tree walk compares them against its own ids directly (the copy and its
/// allocation cost more than the walk). Anything else is copied into `u32`, checked.
pub(crate) struct TokenIds {
    // Keeps the exporter's buffer alive and unresizable while `keys` borrows it.
    view: Option<IntView>,
    owned: Vec<u32>,
}

/// Borrowed token ids, in the element type they came in.
pub(crate) enum Keys<'a> {
    I64(&'a [i64]),
    I32(&'a [i32]),
    U32(&'a [u32]),
}

/// Evaluates `$body` with `$k` bound to the slice of whichever `Keys` variant `$keys` is
/// (the body is instantiated once per element type).
macro_rules! with_keys {
    ($keys:expr, |$k:ident| $body:expr) => {
        match $keys {
            $crate::buffer::Keys::I64($k) => $body,
            $crate::buffer::Keys::I32($k) => $body,
            $crate::buffer::Keys::U32($k) => $body,
        }
    };
}
pub(crate) use with_keys;

impl TokenIds {
    pub(crate) fn get(obj: &PyAny, limit: Option<usize>) -> PyResult<TokenIds> {
        Self::get_checked(obj, limit, true)
    }

    /// Like `get`, leaving in-place buffers unchecked: for a KV-row insert, which reads
    /// only the tokens past the tree's own pages, and whose core checks those it stores
    /// (a check pass here would read the whole history for nothing).
    pub(crate) fn get_for_row(obj: &PyAny, limit: Option<usize>) -> PyResult<TokenIds> {
        Self::get_checked(obj, limit, false)
    }

    fn get_checked(obj: &PyAny, limit: Option<usize>, check: bool) -> PyResult<TokenIds> {
        let limit = limit.unwrap_or(usize::MAX);
        let Some(view) = IntView::get(obj, "token ids", limit)? else {
            let raw = sequence_ints(obj, "token ids", limit)?;
            if let Some(i) = raw.iter().position(|&v| !v.token_ok()) {
                return Err(token_range_error(i, &raw[i].to_string()));
            }
            let owned = raw.into_iter().map(|v| v as u32).collect();
            return Ok(TokenIds { view: None, owned });
        };
        let in_place = view.stride == view.itemsize as isize
            && matches!((view.itemsize, view.signed), (8, true) | (4, _))
            && (view.base as usize).is_multiple_of(view.itemsize);
        if !in_place {
            let owned = view
                .dispatch(ToTokens)
                .map_err(|(i, v)| token_range_error(i, &v))?;
            return Ok(TokenIds { view: None, owned });
        }
        let ids = TokenIds {
            view: Some(view),
            owned: Vec::new(),
        };
        if !check {
            return Ok(ids);
        }
        let bad = with_keys!(ids.keys(), |k| k
            .iter()
            .fold(0, |acc, v| acc | v.bad_bits()));
        if bad != 0 {
            let (i, v) = with_keys!(ids.keys(), |k| k
                .iter()
                .enumerate()
                .find(|(_, v)| !v.token_ok())
                .map(|(i, v)| (i, v.to_string()))
                .unwrap_or_default());
            return Err(token_range_error(i, &v));
        }
        Ok(ids)
    }

    pub(crate) fn keys(&self) -> Keys<'_> {
        let Some(v) = &self.view else {
            return Keys::U32(&self.owned);
        };
        // SAFETY: `get` kept the view only for n contiguous items of `itemsize` bytes at an
        // address aligned to `itemsize`; the exporter keeps them allocated, and refuses to
        // resize, until `_view` is released, which happens when `self` drops, after the
        // borrow ends. Callers hold the GIL while they read (they take `&PyAny`-derived
        // values and never release it around the walk), so no Python code writes the
        // buffer meanwhile; native code writing it without the GIL would race any reader.
        unsafe {
            match (v.itemsize, v.signed) {
                (8, _) => Keys::I64(std::slice::from_raw_parts(v.base.cast(), v.n)),
                (_, true) => Keys::I32(std::slice::from_raw_parts(v.base.cast(), v.n)),
                (_, false) => Keys::U32(std::slice::from_raw_parts(v.base.cast(), v.n)),
            }
        }
    }
}

/// Plain integers (page ids before range checks by the core). Unsigned 64-bit values above
/// `i64::MAX` arrive as `i64::MAX` (out of every valid range).
pub(crate) fn ints(obj: &PyAny, what: &str) -> PyResult<Vec<i64>> {
    match IntView::get(obj, what, usize::MAX)? {
        Some(view) => Ok(view.dispatch(ToI64)),
        None => sequence_ints(obj, what, usize::MAX),
    }
}

/// Elements `0, step, 2 * step, ...` of the first `len` (for `step > 0`): the first
/// location of each page of a KV row, read in place without a pass over the others.
/// ValueError if `obj` holds fewer than `len` elements.
pub(crate) fn ints_every(obj: &PyAny, what: &str, step: usize, len: usize) -> PyResult<Vec<i64>> {
    let step = step.max(1);
    let short =
        |got: usize| PyValueError::new_err(format!("{what} holds {got} values, {len} are needed"));
    match IntView::get(obj, what, len)? {
        Some(mut view) => {
            if view.n < len {
                return Err(short(view.n));
            }
            // Items i * step for i < ceil(len / step) all lie below len <= shape[0], so the
            // widened stride stays inside the exporter's buffer.
            view.n = len.div_ceil(step);
            view.stride *= step as isize;
            Ok(view.dispatch(ToI64))
        }
        None => {
            let all = sequence_ints(obj, what, len)?;
            if all.len() < len {
                return Err(short(all.len()));
            }
            Ok(all.into_iter().step_by(step).collect())
        }
    }
}

static ARRAY_TYPE: GILOnceCell<PyObject> = GILOnceCell::new();

/// An `array.array('q')` holding `values`.
pub(crate) fn int64_array(
    py: Python<'_>,
    len: usize,
    values: impl Iterator<Item = i64>,
) -> PyResult<PyObject> {
    // Collected first (a plain loop), then one copy into the bytes: writing 8-byte chunks
    // into `new_with`'s zeroed buffer took longer than both.
    let mut vals: Vec<i64> = Vec::with_capacity(len);
    vals.extend(values.take(len));
    vals.resize(len, 0);
    int64_array_from(py, &vals)
}

/// An `array.array('q')` holding a copy of `vals`.
pub(crate) fn int64_array_from(py: Python<'_>, vals: &[i64]) -> PyResult<PyObject> {
    let ty = match ARRAY_TYPE.get(py) {
        Some(t) => t,
        None => {
            let t: PyObject = py.import("array")?.getattr("array")?.into();
            // Another caller may have set it first (the import can release the GIL); either
            // value is the same type.
            let _ = ARRAY_TYPE.set(py, t);
            ARRAY_TYPE.get(py).expect("set above")
        }
    };
    // SAFETY: a slice of `vals.len()` initialized i64 is `vals.len() * 8` readable bytes;
    // the byte view is only read, within the borrow of `vals`.
    let raw = unsafe { std::slice::from_raw_parts(vals.as_ptr().cast::<u8>(), vals.len() * 8) };
    let bytes = PyBytes::new(py, raw);
    // array(typecode, bytes) copies the bytes in with one memcpy (`frombytes`).
    ty.call1(py, ("q", bytes))
}

/// A `bytearray` of the token locations `page * page_size + slot` of `pages`, in order, as
/// native int64: allocated once and written in place (no intermediate vector or bytes);
/// `torch.frombuffer` wraps it without a copy, writable.
pub(crate) fn token_index_bytearray(
    py: Python<'_>,
    pages: &[u32],
    page_size: usize,
) -> PyResult<PyObject> {
    let len = pages
        .len()
        .checked_mul(page_size)
        .and_then(|n| n.checked_mul(8))
        .and_then(|n| ffi::Py_ssize_t::try_from(n).ok())
        .ok_or_else(|| PyValueError::new_err("token location buffer too large"))?;
    // SAFETY: a null source asks CPython for an uninitialized buffer of `len` bytes; the
    // new reference (or the error) is taken over by `from_owned_ptr_or_err`.
    let obj = unsafe {
        PyObject::from_owned_ptr_or_err(
            py,
            ffi::PyByteArray_FromStringAndSize(std::ptr::null(), len),
        )?
    };
    // SAFETY: the object is a fresh bytearray of `len` bytes that nothing else references
    // yet; every one of its `len / 8` int64 slots is written below, unaligned-safe.
    let base = unsafe { ffi::PyByteArray_AsString(obj.as_ptr()) }.cast::<u8>();
    let ps = page_size as i64;
    for (i, &p) in pages.iter().enumerate() {
        let first = p as i64 * ps;
        for slot in 0..page_size {
            // SAFETY: (i * page_size + slot) < pages.len() * page_size = len / 8.
            unsafe {
                base.add((i * page_size + slot) * 8)
                    .cast::<i64>()
                    .write_unaligned(first + slot as i64)
            };
        }
    }
    Ok(obj)
}
