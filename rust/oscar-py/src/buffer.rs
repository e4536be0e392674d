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

/// Calls `f(index, value)` for every element of the 1-D integer array or sequence `obj`.
/// Unsigned 64-bit values above `i64::MAX` arrive as `i64::MAX` (out of every valid range).
pub(crate) fn for_each_int(
    obj: &PyAny,
    what: &str,
    mut f: impl FnMut(usize, i64) -> PyResult<()>,
) -> PyResult<()> {
    if let Some(view) = View::get(obj)? {
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
        let n = usize::try_from(n).unwrap_or(0);
        let base = raw.buf as *const u8;
        for i in 0..n {
            // SAFETY: the exporter guarantees an item of `itemsize` readable bytes at
            // `buf + i * strides[0]` for every 0 <= i < shape[0] (no suboffsets: PYBUF_INDIRECT
            // was not requested), valid until the view is released at the end of this
            // function. Reads are unaligned-safe and never form a reference into the buffer.
            // We hold the GIL, so Python code cannot resize or rewrite the array meanwhile.
            let v = unsafe {
                let p = base.offset(i as isize * stride);
                match (itemsize, signed) {
                    (8, true) => i64::from_ne_bytes(p.cast::<[u8; 8]>().read_unaligned()),
                    (8, false) => {
                        let u = u64::from_ne_bytes(p.cast::<[u8; 8]>().read_unaligned());
                        i64::try_from(u).unwrap_or(i64::MAX)
                    }
                    (4, true) => i32::from_ne_bytes(p.cast::<[u8; 4]>().read_unaligned()) as i64,
                    (4, false) => u32::from_ne_bytes(p.cast::<[u8; 4]>().read_unaligned()) as i64,
                    (_, true) => i16::from_ne_bytes(p.cast::<[u8; 2]>().read_unaligned()) as i64,
                    (_, false) => u16::from_ne_bytes(p.cast::<[u8; 2]>().read_unaligned()) as i64,
                }
            };
            f(i, v)?;
        }
        return Ok(());
    }
    if obj.is_instance_of::<pyo3::types::PyString>()? {
        return Err(dtype_error(what, "str"));
    }
    let iter = obj.iter().map_err(|_| {
        dtype_error(
            what,
            &format!("an object of type {}", obj.get_type().name().unwrap_or("?")),
        )
    })?;
    for (i, item) in iter.enumerate() {
        let item = item?;
        let v: i64 = item.extract().map_err(|_| {
            let ty = item.get_type().name().unwrap_or("?").to_owned();
            dtype_error(what, &format!("an element of type {ty} at index {i}"))
        })?;
        f(i, v)?;
    }
    Ok(())
}

/// Token ids as `u32`, at most `limit` of them; a value outside `0..=u32::MAX` is a
/// `ValueError` naming its index.
pub(crate) fn tokens(obj: &PyAny, limit: Option<usize>) -> PyResult<Vec<u32>> {
    let mut out = Vec::new();
    let limit = limit.unwrap_or(usize::MAX);
    for_each_int(obj, "token ids", |i, v| {
        if i >= limit {
            return Ok(());
        }
        match u32::try_from(v) {
            Ok(t) => {
                out.push(t);
                Ok(())
            }
            Err(_) => Err(PyValueError::new_err(format!(
                "token ids must be in 0..={}, got {v} at index {i}",
                u32::MAX
            ))),
        }
    })?;
    Ok(out)
}

/// Plain integers (page ids before range checks by the core).
pub(crate) fn ints(obj: &PyAny, what: &str) -> PyResult<Vec<i64>> {
    let mut out = Vec::new();
    for_each_int(obj, what, |_, v| {
        out.push(v);
        Ok(())
    })?;
    Ok(out)
}

static ARRAY_TYPE: GILOnceCell<PyObject> = GILOnceCell::new();

/// An `array.array('q')` holding `values`.
pub(crate) fn int64_array(
    py: Python<'_>,
    len: usize,
    values: impl Iterator<Item = i64>,
) -> PyResult<PyObject> {
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
    let bytes = PyBytes::new_with(py, len * 8, |buf| {
        for (chunk, v) in buf.chunks_exact_mut(8).zip(values) {
            chunk.copy_from_slice(&v.to_ne_bytes());
        }
        Ok(())
    })?;
    // array(typecode, bytes) copies the bytes in with one memcpy (`frombytes`).
    ty.call1(py, ("q", bytes))
}
