//! ggml tensor types and their dequantization to f32, block by block, as ggml defines them
//! (`ggml-quants.c`'s `dequantize_row_*`). Blocks run along a tensor's innermost dimension.
//! The tests compare each type against gguf-py's reference dequantization
//! (`tests/fixtures/gguf-quants/`).
use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements of a k-quant superblock.
const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_elements(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => QK_K as u64,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of `elements` values (a whole number of blocks; checked by the reader).
    pub fn byte_len(self, elements: u64) -> u64 {
        elements / self.block_elements() * self.block_bytes()
    }

    /// Dequantizes whole blocks.
    pub fn dequantize(self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        let bb = self.block_bytes() as usize;
        if !bytes.len().is_multiple_of(bb) {
            return Err(format!("{} bytes is not a whole number of {self:?} blocks of {bb}", bytes.len()));
        }
        let n = bytes.len() / bb * self.block_elements() as usize;
        let mut out = Vec::with_capacity(n);
        let block: fn(&[u8], &mut Vec<f32>) = match self {
            Self::F32 => |b, o| o.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Self::F16 => |b, o| o.push(half16(b, 0)),
            Self::BF16 => |b, o| o.push(bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            Self::Q4_0 => q4_0,
            Self::Q4_1 => q4_1,
            Self::Q5_0 => q5_0,
            Self::Q5_1 => q5_1,
            Self::Q8_0 => q8_0,
            Self::Q2K => q2_k,
            Self::Q3K => q3_k,
            Self::Q4K => q4_k,
            Self::Q5K => q5_k,
            Self::Q6K => q6_k,
        };
        for b in bytes.chunks_exact(bb) {
            block(b, &mut out);
        }
        Ok(out)
    }
}

fn half16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Low nibbles are elements 0..16, high nibbles 16..32.
fn nibbles(qs: &[u8], mut f: impl FnMut(u8) -> f32, out: &mut Vec<f32>) {
    out.extend(qs.iter().map(|&q| f(q & 0xF)));
    out.extend(qs.iter().map(|&q| f(q >> 4)));
}

fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b, 0);
    nibbles(&b[2..18], |q| (q as f32 - 8.0) * d, out);
}

fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half16(b, 0), half16(b, 2));
    nibbles(&b[4..20], |q| q as f32 * d + m, out);
}

/// The 5th bits of a Q5_0/Q5_1 block: bit j of `qh` belongs to element j.
fn five_bit(qh: u32, qs: &[u8], mut f: impl FnMut(u8) -> f32, out: &mut Vec<f32>) {
    let hi = |j: usize| (((qh >> j) & 1) << 4) as u8;
    out.extend(qs.iter().enumerate().map(|(j, &q)| f((q & 0xF) | hi(j))));
    out.extend(qs.iter().enumerate().map(|(j, &q)| f((q >> 4) | hi(j + 16))));
}

fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    five_bit(qh, &b[6..22], |q| (q as f32 - 16.0) * d, out);
}

fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half16(b, 0), half16(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    five_bit(qh, &b[8..24], |q| q as f32 * d + m, out);
}

fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b, 0);
    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// Scale and min `j` (0..8) of a Q4_K / Q5_K superblock: 6 bits each, packed in 12 bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 { (s[j] & 63, s[j + 4] & 63) } else { ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)) };
    (sc as f32, m as f32)
}

fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half16(b, 80), half16(b, 82));
    let mut is = 0;
    for half in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for q16 in half.chunks_exact(16) {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                out.extend(q16.iter().map(|&q| dl * ((q >> shift) & 3) as f32 - ml));
            }
        }
    }
}

fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half16(b, 108);
    // 16 signed 6-bit scales: low 4 bits from bytes 0..8, high 2 bits from bytes 8..12.
    let mut scales = [0i8; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 { packed[i] & 0xF } else { packed[i - 8] >> 4 };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = ((low | (high << 4)) as i8) - 32;
    }
    let mut is = 0;
    let mut m = 1u8;
    for half in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for (k, q16) in half.chunks_exact(16).enumerate() {
                let dl = d * scales[is] as f32;
                is += 1;
                let h = &hmask[16 * k..16 * k + 16];
                out.extend(q16.iter().zip(h).map(|(&q, &hm)| {
                    let v = ((q >> shift) & 3) as i8 - if hm & m != 0 { 0 } else { 4 };
                    dl * v as f32
                }));
            }
            m <<= 1;
        }
    }
}

fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half16(b, 0), half16(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, q) in qs.chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        out.extend(q.iter().map(|&v| d * s1 * (v & 0xF) as f32 - dmin * m1));
        out.extend(q.iter().map(|&v| d * s2 * (v >> 4) as f32 - dmin * m2));
    }
}

fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half16(b, 0), half16(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (j, q) in qs.chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let hi = |h: u8, u: u8| if h & u != 0 { 16.0 } else { 0.0 };
        out.extend(q.iter().zip(qh).map(|(&v, &h)| d * s1 * ((v & 0xF) as f32 + hi(h, u1)) - dmin * m1));
        out.extend(q.iter().zip(qh).map(|(&v, &h)| d * s2 * ((v >> 4) as f32 + hi(h, u2)) - dmin * m2));
    }
}

fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half16(b, 208);
    let mut y = [0f32; QK_K];
    for n in 0..2 {
        let (ql, qh, sc, y) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..], &mut y[128 * n..]);
        for l in 0..32 {
            let is = l / 16;
            let q = |low: u8, shift: u32| ((low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32) as f32;
            y[l] = d * sc[is] as i8 as f32 * q(ql[l] & 0xF, 0);
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q(ql[l + 32] & 0xF, 2);
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q(ql[l] >> 4, 4);
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q(ql[l + 32] >> 4, 6);
        }
    }
    out.extend_from_slice(&y);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        // bits per weight: the figures llama.cpp prints for each type.
        for (t, bpw) in [
            (GgmlType::Q4_0, 4.5),
            (GgmlType::Q4_1, 5.0),
            (GgmlType::Q8_0, 8.5),
            (GgmlType::Q4K, 4.5),
            (GgmlType::Q5K, 5.5),
            (GgmlType::Q6K, 6.5625),
            (GgmlType::Q2K, 2.625),
            (GgmlType::Q3K, 3.4375),
        ] {
            assert_eq!(t.block_bytes() as f64 * 8.0 / t.block_elements() as f64, bpw, "{t:?}");
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
    }

    #[test]
    fn rejects_partial_blocks() {
        assert!(GgmlType::Q4K.dequantize(&[0u8; 143]).unwrap_err().contains("whole number"));
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let v = GgmlType::Q8_0.dequantize(&b).unwrap();
        assert_eq!(&v[..3], &[2.0, -3.0, 0.0]);
    }
}
