//! Tensors on the wire: dtype + shape + little-endian bytes, split into chunks of at most
//! [`CHUNK_BYTES`](crate::limits::CHUNK_BYTES), and reassembled with every size checked
//! before anything is buffered: truncated, oversized, reordered or inconsistent streams are
//! errors that name what was expected.
use std::collections::BTreeMap;

use crate::error::ProtoError;
use crate::v1::{DType, FeaturesChunk, TensorChunk};

/// Bytes per element of a dtype; `DTYPE_UNSPECIFIED` and unknown values are errors.
pub fn dtype_size(dtype: i32) -> Result<usize, ProtoError> {
    match DType::try_from(dtype) {
        Ok(DType::DtypeF32) | Ok(DType::DtypeU32) => Ok(4),
        Ok(DType::DtypeF16) => Ok(2),
        _ => Err(ProtoError::Dtype(dtype)),
    }
}

/// Encodes f32 values as F32 or F16 little-endian bytes.
pub fn encode_f32(values: &[f32], dtype: i32) -> Result<Vec<u8>, ProtoError> {
    match DType::try_from(dtype) {
        Ok(DType::DtypeF32) => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Ok(DType::DtypeF16) => Ok(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        _ => Err(ProtoError::Dtype(dtype)),
    }
}

/// Decodes F32 or F16 little-endian bytes, rejecting ragged lengths and non-finite values.
pub fn decode_f32(bytes: &[u8], dtype: i32, what: &str) -> Result<Vec<f32>, ProtoError> {
    let elem = dtype_size(dtype)?;
    if !bytes.len().is_multiple_of(elem) {
        return Err(ProtoError::Ragged { what: what.into(), found: bytes.len(), elem });
    }
    let out: Vec<f32> = match DType::try_from(dtype) {
        Ok(DType::DtypeF32) => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Ok(DType::DtypeF16) => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return Err(ProtoError::Dtype(dtype)),
    };
    if out.iter().any(|v| !v.is_finite()) {
        return Err(ProtoError::NonFinite { what: what.into() });
    }
    Ok(out)
}

/// Number of bytes of a tensor of `shape` and `dtype`, with overflow and limit checks.
pub fn tensor_bytes(shape: &[u64], dtype: i32, limit: u64, what: &str) -> Result<u64, ProtoError> {
    let elem = dtype_size(dtype)? as u64;
    let mut n = elem;
    for &d in shape {
        n = n.checked_mul(d).ok_or_else(|| ProtoError::TooLarge { what: what.into(), size: u64::MAX, limit })?;
    }
    if n > limit {
        return Err(ProtoError::TooLarge { what: what.into(), size: n, limit });
    }
    Ok(n)
}

/// Splits a tensor into chunks of at most `chunk` bytes (one empty chunk for an empty tensor).
pub fn tensor_chunks(name: &str, dtype: i32, shape: &[u64], bytes: &[u8], chunk: usize) -> Vec<TensorChunk> {
    tensor_chunks_lazy(name.into(), dtype, shape.to_vec(), bytes.to_vec(), chunk).collect()
}

/// [`tensor_chunks`] over an owned buffer, each chunk cut when the iterator reaches it (a
/// stream then holds one chunk's copy at a time).
pub fn tensor_chunks_lazy(name: String, dtype: i32, shape: Vec<u64>, bytes: Vec<u8>, chunk: usize) -> impl Iterator<Item = TensorChunk> {
    let chunk = chunk.max(1);
    let n = bytes.len().div_ceil(chunk).max(1);
    (0..n).map(move |i| {
        let (from, to) = ((i * chunk).min(bytes.len()), ((i + 1) * chunk).min(bytes.len()));
        TensorChunk { name: name.clone(), dtype, shape: shape.clone(), offset: from as u64, data: bytes[from..to].to_vec() }
    })
}

/// `(offset, bytes)` pieces of at most `chunk` bytes; an empty input is one empty piece, so
/// a receiver still learns the name, dtype and shape.
fn pieces(bytes: &[u8], chunk: usize) -> impl Iterator<Item = (u64, &[u8])> {
    let all: Vec<&[u8]> = if bytes.is_empty() { vec![&[]] } else { bytes.chunks(chunk.max(1)).collect() };
    let mut offset = 0u64;
    all.into_iter().map(move |data| {
        let at = offset;
        offset += data.len() as u64;
        (at, data)
    })
}

/// Splits one sequence's feature bytes into chunks of at most `chunk` bytes.
pub fn feature_chunks(sequence: u32, bytes: &[u8], chunk: usize) -> Vec<FeaturesChunk> {
    let total = bytes.len() as u64;
    pieces(bytes, chunk).map(|(offset, data)| FeaturesChunk { sequence, offset, total_bytes: total, data: data.to_vec() }).collect()
}

/// Reassembles one byte string of a known size from in-order chunks.
#[derive(Debug)]
pub struct ByteAssembler {
    what: String,
    expected: u64,
    buf: Vec<u8>,
}

impl ByteAssembler {
    /// `expected` is the size the receiver computed itself; it must be within `limit`.
    pub fn new(what: impl Into<String>, expected: u64, limit: u64) -> Result<Self, ProtoError> {
        let what = what.into();
        if expected > limit {
            return Err(ProtoError::TooLarge { what, size: expected, limit });
        }
        Ok(Self { what, expected, buf: Vec::with_capacity(expected as usize) })
    }

    /// Appends a chunk that claims `total` bytes in all and starts at `offset`.
    pub fn push(&mut self, offset: u64, total: u64, data: &[u8]) -> Result<(), ProtoError> {
        if total != self.expected {
            return Err(ProtoError::SizeMismatch { what: self.what.clone(), expected: self.expected, found: total });
        }
        let have = self.buf.len() as u64;
        if offset != have {
            return Err(ProtoError::OutOfOrder { what: self.what.clone(), offset, expected: have });
        }
        let end = have + data.len() as u64;
        if end > self.expected {
            return Err(ProtoError::SizeMismatch { what: self.what.clone(), expected: self.expected, found: end });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.buf.len() as u64 == self.expected
    }

    pub fn finish(self) -> Result<Vec<u8>, ProtoError> {
        if !self.is_complete() {
            return Err(ProtoError::Truncated { what: self.what, received: self.buf.len() as u64, expected: self.expected });
        }
        Ok(self.buf)
    }
}

/// A whole tensor as received.
#[derive(Clone, Debug, PartialEq)]
pub struct WireTensor {
    pub dtype: i32,
    pub shape: Vec<u64>,
    pub bytes: Vec<u8>,
}

impl WireTensor {
    pub fn to_f32(&self, what: &str) -> Result<Vec<f32>, ProtoError> {
        decode_f32(&self.bytes, self.dtype, what)
    }
}

/// Reassembles a stream of [`TensorChunk`]s holding one or more named tensors, each sent
/// as consecutive chunks. Sizes come from the declared dtype and shape, checked against
/// `limit` on the first chunk; later chunks must repeat the same dtype and shape.
#[derive(Debug)]
pub struct TensorAssembler {
    limit: u64,
    done: BTreeMap<String, WireTensor>,
    current: Option<(String, i32, Vec<u64>, ByteAssembler)>,
}

impl TensorAssembler {
    pub fn new(limit: u64) -> Self {
        Self { limit, done: BTreeMap::new(), current: None }
    }

    pub fn push(&mut self, c: TensorChunk) -> Result<(), ProtoError> {
        if let Some((name, dtype, shape, asm)) = &mut self.current
            && *name == c.name
        {
            if *dtype != c.dtype || *shape != c.shape {
                return Err(ProtoError::Inconsistent { what: format!("tensor '{name}'") });
            }
            return asm.push(c.offset, asm.expected, &c.data);
        }
        self.close_current()?;
        if self.done.contains_key(&c.name) {
            return Err(ProtoError::Invalid(format!("tensor '{}' sent twice", c.name)));
        }
        let what = format!("tensor '{}'", c.name);
        let total = tensor_bytes(&c.shape, c.dtype, self.limit, &what)?;
        let mut asm = ByteAssembler::new(what, total, self.limit)?;
        asm.push(c.offset, total, &c.data)?;
        self.current = Some((c.name, c.dtype, c.shape, asm));
        Ok(())
    }

    fn close_current(&mut self) -> Result<(), ProtoError> {
        if let Some((name, dtype, shape, asm)) = self.current.take() {
            let bytes = asm.finish()?;
            self.done.insert(name, WireTensor { dtype, shape, bytes });
        }
        Ok(())
    }

    /// The tensors received; errors if the last one is incomplete.
    pub fn finish(mut self) -> Result<BTreeMap<String, WireTensor>, ProtoError> {
        self.close_current()?;
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::CHUNK_BYTES;

    fn f32s(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
    }

    #[test]
    fn tensor_round_trip_over_several_chunks() {
        let values = f32s(600_000); // 2.4 MB: three chunks
        let bytes = encode_f32(&values, DType::DtypeF32 as i32).unwrap();
        let chunks = tensor_chunks("w", DType::DtypeF32 as i32, &[600, 1000], &bytes, CHUNK_BYTES);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.data.len() <= CHUNK_BYTES));
        let mut asm = TensorAssembler::new(1 << 30);
        let small = tensor_chunks("b", DType::DtypeF32 as i32, &[3], &encode_f32(&[1.0, 2.0, 3.0], 1).unwrap(), CHUNK_BYTES);
        for c in chunks.into_iter().chain(small) {
            asm.push(c).unwrap();
        }
        let got = asm.finish().unwrap();
        assert_eq!(got["w"].to_f32("w").unwrap(), values);
        assert_eq!(got["w"].shape, vec![600, 1000]);
        assert_eq!(got["b"].to_f32("b").unwrap(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn f16_round_trip_is_close_and_half_the_size() {
        let values = f32s(1000);
        let bytes = encode_f32(&values, DType::DtypeF16 as i32).unwrap();
        assert_eq!(bytes.len(), 2000);
        let back = decode_f32(&bytes, DType::DtypeF16 as i32, "x").unwrap();
        assert!(values.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-2));
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let bytes = encode_f32(&f32s(600_000), DType::DtypeF32 as i32).unwrap();
        let mut chunks = tensor_chunks("w", DType::DtypeF32 as i32, &[600_000], &bytes, CHUNK_BYTES);
        chunks.pop();
        let mut asm = TensorAssembler::new(1 << 30);
        for c in chunks {
            asm.push(c).unwrap();
        }
        let err = asm.finish().unwrap_err();
        assert!(matches!(err, ProtoError::Truncated { .. }), "{err}");
        assert!(err.to_string().contains("truncated"));
    }

    #[test]
    fn oversized_reordered_and_inconsistent_streams_are_errors() {
        // Declared shape beyond the limit: rejected before buffering.
        let mut asm = TensorAssembler::new(1000);
        let c = TensorChunk { name: "w".into(), dtype: 1, shape: vec![1000], offset: 0, data: vec![] };
        assert!(matches!(asm.push(c).unwrap_err(), ProtoError::TooLarge { .. }));
        // Overflowing shape product.
        let c = TensorChunk { name: "w".into(), dtype: 1, shape: vec![u64::MAX, 4], offset: 0, data: vec![] };
        assert!(matches!(TensorAssembler::new(1 << 30).push(c).unwrap_err(), ProtoError::TooLarge { .. }));
        // More data than declared.
        let c = TensorChunk { name: "w".into(), dtype: 1, shape: vec![1], offset: 0, data: vec![0; 8] };
        assert!(matches!(TensorAssembler::new(1 << 30).push(c).unwrap_err(), ProtoError::SizeMismatch { .. }));
        // A gap.
        let bytes = vec![0u8; 3 * CHUNK_BYTES];
        let chunks = tensor_chunks("w", 1, &[(3 * CHUNK_BYTES / 4) as u64], &bytes, CHUNK_BYTES);
        let mut asm = TensorAssembler::new(1 << 30);
        asm.push(chunks[0].clone()).unwrap();
        assert!(matches!(asm.push(chunks[2].clone()).unwrap_err(), ProtoError::OutOfOrder { .. }));
        // Shape changes mid-tensor.
        let mut asm = TensorAssembler::new(1 << 30);
        asm.push(chunks[0].clone()).unwrap();
        let mut bad = chunks[1].clone();
        bad.shape = vec![1];
        assert!(matches!(asm.push(bad).unwrap_err(), ProtoError::Inconsistent { .. }));
        // Unknown dtype, ragged bytes, NaN.
        assert!(matches!(dtype_size(0), Err(ProtoError::Dtype(0))));
        assert!(matches!(decode_f32(&[0; 5], 1, "x"), Err(ProtoError::Ragged { .. })));
        assert!(matches!(decode_f32(&f32::NAN.to_le_bytes(), 1, "x"), Err(ProtoError::NonFinite { .. })));
    }

    #[test]
    fn feature_bytes_reassemble_and_check_totals() {
        let bytes: Vec<u8> = (0..(2 * CHUNK_BYTES + 17)).map(|i| i as u8).collect();
        let chunks = feature_chunks(4, &bytes, CHUNK_BYTES);
        assert_eq!(chunks.len(), 3);
        let mut asm = ByteAssembler::new("seq 4", bytes.len() as u64, 1 << 30).unwrap();
        for c in &chunks {
            asm.push(c.offset, c.total_bytes, &c.data).unwrap();
        }
        assert_eq!(asm.finish().unwrap(), bytes);
        // The sender claims another total than the receiver computed.
        let mut asm = ByteAssembler::new("seq 4", 10, 1 << 30).unwrap();
        assert!(matches!(asm.push(0, bytes.len() as u64, &chunks[0].data), Err(ProtoError::SizeMismatch { .. })));
        // Stream ends early.
        let mut asm = ByteAssembler::new("seq 4", bytes.len() as u64, 1 << 30).unwrap();
        asm.push(0, bytes.len() as u64, &chunks[0].data).unwrap();
        assert!(matches!(asm.finish(), Err(ProtoError::Truncated { .. })));
        assert!(ByteAssembler::new("x", 11, 10).is_err());
    }
}
