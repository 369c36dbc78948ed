//! Python bindings of [`hashing`]: columns in, columns out, the GIL released while hashing.
//!
//! Inputs are read straight from the Python objects (no copies of the byte strings: `str`
//! and `bytes` are immutable and kept alive by the caller's lists for the whole call).
//! Anything this module cannot render exactly as the Python reference would (an int that is
//! not an exact `int` or does not fit in 64 bits, a `bytearray` instead of `bytes`) raises
//! `TypeError` or `OverflowError`, so the caller can fall back to the reference.

mod hashing;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyList, PyString};

/// The items of a list (fast path) or of any other iterable, kept alive by the returned refs.
fn items<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    match obj.cast::<PyList>() {
        Ok(list) => Ok(list.iter().collect()),
        Err(_) => obj.try_iter()?.collect(),
    }
}

/// `f` of every item of a list or iterable, in one pass, for values copied out of Python.
fn each<'py, T>(
    obj: &Bound<'py, PyAny>,
    mut f: impl FnMut(usize, &Bound<'py, PyAny>) -> PyResult<T>,
) -> PyResult<Vec<T>> {
    match obj.cast::<PyList>() {
        Ok(list) => list.iter().enumerate().map(|(i, v)| f(i, &v)).collect(),
        Err(_) => obj
            .try_iter()?
            .enumerate()
            .map(|(i, v)| f(i, &v?))
            .collect(),
    }
}

fn ints(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    each(obj, |_, v| match v.cast_exact::<PyInt>() {
        // f"{True}" is "True", not "1": only exact ints format as their digits.
        Ok(i) => i.extract::<i64>(),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what} must hold ints, got {}",
            v.get_type().name()?
        ))),
    })
}

fn strs<'a>(items: &'a [Bound<'_, PyAny>], what: &str) -> PyResult<Vec<&'a str>> {
    items
        .iter()
        .map(|v| match v.cast::<PyString>() {
            Ok(s) => s.to_str(),
            Err(_) => Err(PyTypeError::new_err(format!(
                "{what} must hold str, got {}",
                v.get_type().name()?
            ))),
        })
        .collect()
}

fn byte_strings<'a>(items: &'a [Bound<'_, PyAny>], what: &str) -> PyResult<Vec<&'a [u8]>> {
    items
        .iter()
        .map(|v| match v.cast::<PyBytes>() {
            Ok(b) => Ok(b.as_bytes()),
            Err(_) => Err(PyTypeError::new_err(format!(
                "{what} must hold bytes, got {}",
                v.get_type().name()?
            ))),
        })
        .collect()
}

fn same_length(lengths: &[(&str, usize)]) -> PyResult<()> {
    let (first, n) = lengths[0];
    for &(name, len) in &lengths[1..] {
        if len != n {
            return Err(PyValueError::new_err(format!(
                "{len} {name} for {n} {first}: columns must have equal lengths"
            )));
        }
    }
    Ok(())
}

fn bytes_list<'py>(py: Python<'py>, hashes: &[[u8; 32]]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, hashes.iter().map(|h| PyBytes::new(py, h)))
}

fn leaf_hashes(obj: &Bound<'_, PyAny>) -> PyResult<Vec<[u8; 32]>> {
    each(obj, |i, v| {
        let h = v
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("leaf hashes must be bytes"))?
            .as_bytes();
        <[u8; 32]>::try_from(h).map_err(|_| {
            PyValueError::new_err(format!(
                "leaf hash {i} is {} bytes, expected {}",
                h.len(),
                hashing::HASH_SIZE
            ))
        })
    })
}

/// Reading ids (32 hex characters each) of samples given as columns of one device.
#[pyfunction]
fn reading_ids<'py>(
    py: Python<'py>,
    device_id: &str,
    metric: &Bound<'py, PyAny>,
    seq: &Bound<'py, PyAny>,
    device_time_us: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let metric_items = items(metric)?;
    let metrics = strs(&metric_items, "metric")?;
    let seqs = ints(seq, "seq")?;
    let times = ints(device_time_us, "device_time_us")?;
    same_length(&[
        ("metrics", metrics.len()),
        ("seqs", seqs.len()),
        ("times", times.len()),
    ])?;
    let ids = py.detach(|| hashing::reading_ids(device_id, &metrics, &seqs, &times));
    PyList::new(
        py,
        ids.iter().map(|h| {
            // hex digits are ASCII: always valid UTF-8
            PyString::new(py, std::str::from_utf8(h).expect("hex is ASCII"))
        }),
    )
}

/// HMAC-SHA256(key, id.encode()) of each reading id: the per-reading leaf salts.
#[pyfunction]
fn salts<'py>(
    py: Python<'py>,
    key: &[u8],
    reading_ids: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let id_items = items(reading_ids)?;
    let ids: Vec<&[u8]> = strs(&id_items, "reading_ids")?
        .into_iter()
        .map(str::as_bytes)
        .collect();
    let out = py.detach(|| hashing::hmac_sha256_each(key, &ids));
    bytes_list(py, &out)
}

/// SHA-256(0x00 || salt || canonical) per reading: RFC 9162 leaf hashes of salted readings.
#[pyfunction]
fn salted_leaves<'py>(
    py: Python<'py>,
    salts: &Bound<'py, PyAny>,
    canonical: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let salt_items = items(salts)?;
    let data_items = items(canonical)?;
    let salts = byte_strings(&salt_items, "salts")?;
    let data = byte_strings(&data_items, "canonical")?;
    same_length(&[("readings", data.len()), ("salts", salts.len())])?;
    let out = py.detach(|| hashing::salted_leaves(&salts, &data));
    bytes_list(py, &out)
}

/// A JSON string body that needs no escaping (printable ASCII, no quote, no backslash): what
/// reading ids are. Anything else is left to the Python reference (`TypeError`).
fn json_plain(s: &str, what: &str) -> PyResult<()> {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        Ok(())
    } else {
        Err(PyTypeError::new_err(format!("{what} {s:?} needs JSON escaping")))
    }
}

/// Salted RFC 9162 leaf hashes of a normalized batch's readings, straight from its columns:
/// SHA-256(0x00 || salt || canonical_reading_bytes(reading)), the canonical JSON built here.
///
/// ``runs`` are ``(metric_json, unit_json, start, stop)`` tiling the columns in order, the
/// JSON fragments spelled by ``json.dumps``; ``value`` holds floats (``None`` or NaN is JSON
/// null; an infinity is a ``ValueError``, as ``json.dumps(allow_nan=False)`` says).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn canonical_leaves<'py>(
    py: Python<'py>,
    salts: &Bound<'py, PyAny>,
    device_json: &str,
    patient_json: &str,
    runs: Vec<(String, String, usize, usize)>,
    device_time_us: &Bound<'py, PyAny>,
    quality: &Bound<'py, PyAny>,
    reading_id: &Bound<'py, PyAny>,
    seq: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let salt_items = items(salts)?;
    let salts = byte_strings(&salt_items, "salts")?;
    let id_items = items(reading_id)?;
    let ids = strs(&id_items, "reading_id")?;
    for id in &ids {
        json_plain(id, "reading id")?;
    }
    let times = ints(device_time_us, "device_time_us")?;
    let quality = ints(quality, "quality")?;
    let seqs = ints(seq, "seq")?;
    let values = each(value, |i, v| {
        if v.is_none() {
            return Ok(None);
        }
        let x: f64 = v.extract()?;
        if x.is_nan() {
            Ok(None)
        } else if x.is_infinite() {
            let r = if x > 0.0 { "inf" } else { "-inf" };
            Err(PyValueError::new_err(format!(
                "Out of range float values are not JSON compliant: {r} (value {i})"
            )))
        } else {
            Ok(Some(x))
        }
    })?;
    same_length(&[
        ("readings", times.len()),
        ("salts", salts.len()),
        ("quality", quality.len()),
        ("reading ids", ids.len()),
        ("seqs", seqs.len()),
        ("values", values.len()),
    ])?;
    let mut next = 0;
    for &(_, _, start, stop) in &runs {
        if start != next || stop < start {
            return Err(PyValueError::new_err(format!(
                "run {start}..{stop} does not continue at {next}: runs must tile the columns"
            )));
        }
        next = stop;
    }
    if next != times.len() {
        return Err(PyValueError::new_err(format!(
            "runs cover {next} of {} readings",
            times.len()
        )));
    }
    let runs: Vec<hashing::Run<'_>> = runs
        .iter()
        .map(|(m, u, start, stop)| hashing::Run {
            metric_json: m,
            unit_json: u,
            start: *start,
            stop: *stop,
        })
        .collect();
    let readings = hashing::Readings {
        device_json,
        patient_json,
        runs: &runs,
        times: &times,
        quality: &quality,
        ids: &ids,
        seqs: &seqs,
        values: &values,
    };
    let out = py.detach(|| hashing::canonical_leaves(&salts, &readings));
    bytes_list(py, &out)
}

/// RFC 9162 root over 32-byte leaf hashes (SHA-256 of nothing for an empty list).
#[pyfunction]
fn merkle_root<'py>(py: Python<'py>, leaves: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let level = leaf_hashes(leaves)?;
    let root = py.detach(|| hashing::root(level));
    Ok(PyBytes::new(py, &root))
}

/// Every level of the tree over 32-byte leaf hashes, each as one concatenated bytes object.
#[pyfunction]
fn merkle_levels<'py>(py: Python<'py>, leaves: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    let leaves = leaf_hashes(leaves)?;
    let levels = py.detach(|| hashing::levels(leaves));
    PyList::new(
        py,
        levels.iter().map(|l| PyBytes::new(py, l.as_flattened())),
    )
}

#[pymodule]
fn vitalproof_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(reading_ids, m)?)?;
    m.add_function(wrap_pyfunction!(salts, m)?)?;
    m.add_function(wrap_pyfunction!(salted_leaves, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_leaves, m)?)?;
    m.add_function(wrap_pyfunction!(merkle_root, m)?)?;
    m.add_function(wrap_pyfunction!(merkle_levels, m)?)?;
    Ok(())
}
