//! The GGUF container (llama.cpp's model file, versions 2 and 3): header, typed metadata,
//! tensor descriptors, and the aligned data section. Every length and offset read from the
//! file is bounded and checked against the file's size before anything is allocated, so a
//! truncated or hostile file gives an error, never a huge allocation or a panic.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::quant::GgmlType;
use crate::error::{ModelError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Bounds on what one file may declare (a 70B LLaMA has ~700 tensors and ~40 keys; the largest
/// vocabularies ~260 k strings).
const MAX_TENSORS: u64 = 1 << 16;
const MAX_KEYS: u64 = 1 << 16;
const MAX_STRING: u64 = 1 << 24;
const MAX_ARRAY: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

/// A metadata value. Integers keep their width so that re-encoding is lossless.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any non-negative integer value as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's descriptor. `dims` is in ggml order: `dims[0]` is the innermost (contiguous)
/// dimension, so an HF `[out, in]` linear weight has `dims == [in, out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major (PyTorch / safetensors) order: the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn byte_len(&self) -> u64 {
        self.ty.byte_len(self.elements())
    }
}

/// An opened GGUF file: metadata and tensor descriptors parsed, tensor bytes read on demand.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
}

/// Counts bytes so that errors can say where they happened and the data section can be found.
struct Cursor<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn bytes<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string, bounded by `MAX_STRING` and the bytes left in the file.
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.u64()?;
        if n > MAX_STRING || n > self.len.saturating_sub(self.pos) {
            return Err(format!("at byte {}: string of {n} bytes is longer than the file allows", self.pos));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| format!("at byte {}: string is not UTF-8", self.pos - n))
    }

    fn value(&mut self, ty: u32, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("at byte {}: bool byte {b}", self.pos - 1)),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth > 0 {
                    return Err(format!("at byte {}: nested arrays are not supported", self.pos));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte, so n is bounded by what is left.
                if n > MAX_ARRAY || n > self.len.saturating_sub(self.pos) {
                    return Err(format!("at byte {}: array of {n} elements is longer than the file allows", self.pos));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(format!("at byte {}: unknown metadata type {other}", self.pos - 4)),
        })
    }

    fn tensor_info(&mut self) -> std::result::Result<TensorInfo, String> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor '{name}': {n_dims} dimensions (1 to {MAX_DIMS} supported)"));
        }
        let dims = (0..n_dims).map(|_| self.u64()).collect::<std::result::Result<Vec<_>, _>>()?;
        let raw = self.u32()?;
        let ty = GgmlType::from_id(raw).ok_or_else(|| format!("tensor '{name}': unknown ggml type {raw}"))?;
        let offset = self.u64()?;
        Ok(TensorInfo { name, dims, ty, offset })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Checkpoint { path: path.to_path_buf(), message };
        let file = File::open(path).map_err(crate::error::io_err(path))?;
        let len = file.metadata().map_err(crate::error::io_err(path))?.len();
        let mut c = Cursor { inner: BufReader::with_capacity(1 << 20, file), pos: 0, len };
        if &c.bytes::<4>().map_err(bad)? != MAGIC {
            return Err(bad("not a GGUF file (magic is not 'GGUF')".into()));
        }
        let version = c.u32().map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} (2 and 3 are supported)")));
        }
        let (n_tensors, n_kv) = (c.u64().map_err(bad)?, c.u64().map_err(bad)?);
        if n_tensors > MAX_TENSORS || n_kv > MAX_KEYS {
            return Err(bad(format!("{n_tensors} tensors / {n_kv} keys exceed the limits")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string().map_err(bad)?;
            let ty = c.u32().map_err(bad)?;
            let v = c.value(ty, 0).map_err(|e| bad(format!("key '{key}': {e}")))?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(bad(format!("key '{key}' appears twice")));
            }
        }
        let tensors = (0..n_tensors).map(|_| c.tensor_info()).collect::<std::result::Result<Vec<_>, _>>().map_err(bad)?;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| bad(format!("general.alignment {v:?}")))?,
        };
        let data_start = c.pos.next_multiple_of(alignment);
        let gguf = Self { path: path.to_path_buf(), version, metadata, tensors, data_start };
        gguf.check_tensors(len, alignment).map_err(bad)?;
        Ok(gguf)
    }

    /// Names unique, sizes whole blocks, offsets aligned, and every tensor inside the file.
    fn check_tensors(&self, file_len: u64, alignment: u64) -> std::result::Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(format!("tensor '{}' appears twice", t.name));
            }
            let elements = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n > 0);
            let Some(elements) = elements else {
                return Err(format!("tensor '{}': dims {:?} are empty or overflow", t.name, t.dims));
            };
            if t.dims[0] % t.ty.block_elements() != 0 {
                return Err(format!("tensor '{}': inner dimension {} is not a multiple of {:?}'s block of {}", t.name, t.dims[0], t.ty, t.ty.block_elements()));
            }
            if t.offset % alignment != 0 {
                return Err(format!("tensor '{}': offset {} is not aligned to {alignment}", t.name, t.offset));
            }
            let end = self.data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.ty.byte_len(elements)));
            if end.is_none_or(|e| e > file_len) {
                return Err(format!("tensor '{}' runs past the end of the file ({file_len} bytes)", t.name));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (still quantized) bytes of one tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        let io = crate::error::io_err(&self.path);
        let mut f = File::open(&self.path).map_err(crate::error::io_err(&self.path))?;
        f.seek(SeekFrom::Start(self.data_start + info.offset)).map_err(io)?;
        let mut buf = vec![0u8; info.byte_len() as usize];
        f.read_exact(&mut buf).map_err(crate::error::io_err(&self.path))?;
        Ok(buf)
    }

    /// One tensor dequantized to f32, in row-major order (see [`TensorInfo::shape`]).
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(info)?;
        info.ty.dequantize(&bytes).map_err(|message| ModelError::Checkpoint { path: self.path.clone(), message: format!("tensor '{}': {message}", info.name) })
    }
}
