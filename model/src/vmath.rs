//! `exp` over slices, sixteen (AVX-512F) or eight (AVX2) lanes at a time: softmax in
//! attention and SwiGLU's sigmoid call it hundreds of thousands of times per token or
//! prompt, where the scalar libm call was a visible share of decoding at long contexts.
//! Cephes' single-precision `expf` (range reduction by ln 2 in two parts, a degree-5
//! polynomial): within 2 ulp of the exact value (`tests` below), `exp` of anything below
//! -86 is 0 (the exact value is below 5e-38: nothing a softmax or a sigmoid can tell from 0)
//! and above 88.7 is clamped.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LO: f32 = -86.0;
const HI: f32 = 88.722_84;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `x = exp(x)` for every element.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<u8> = OnceLock::new();
        let level = *LEVEL.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                2
            } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                1
            } else {
                0
            }
        });
        // SAFETY: the CPU has the features checked above.
        match level {
            2 => return unsafe { x86::exp_avx512(x) },
            1 => return unsafe { x86::exp_avx2(x) },
            _ => {}
        }
    }
    x.iter_mut().for_each(|v| *v = exp(*v));
}

/// The same function on one value (tails and other CPUs).
pub fn exp(x: f32) -> f32 {
    if x < LO {
        return 0.0;
    }
    let x = x.min(HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = P.iter().fold(0.0, |acc, c| acc * r + c);
    let y = p * r * r + r + 1.0;
    // 2^n through the exponent bits; n is within [-126, 128] here. 2^128 overflows the
    // exponent, so multiply by 2^(n-1) twice.
    let half = f32::from_bits((((n as i32 - 1) + 127) as u32) << 23);
    y * half * 2.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{HI, LN2_HI, LN2_LO, LO, LOG2E, P};

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_avx512(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: 16 elements.
            unsafe {
                let v = _mm512_loadu_ps(c.as_ptr());
                let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(LO));
                let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
                let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(v, _mm512_set1_ps(LOG2E)));
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), v));
                let mut p = _mm512_set1_ps(P[0]);
                for c in &P[1..] {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
                }
                let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
                let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(126)));
                let out = _mm512_mul_ps(_mm512_mul_ps(y, _mm512_castsi512_ps(e)), _mm512_set1_ps(2.0));
                _mm512_storeu_ps(c.as_mut_ptr(), _mm512_maskz_mov_ps(!under, out));
            }
        }
        chunks.into_remainder().iter_mut().for_each(|v| *v = super::exp(*v));
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_avx2(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 elements.
            unsafe {
                let v = _mm256_loadu_ps(c.as_ptr());
                let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(v, _mm256_set1_ps(LO));
                let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, _mm256_set1_ps(LOG2E)));
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), v));
                let mut p = _mm256_set1_ps(P[0]);
                for c in &P[1..] {
                    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
                }
                let y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
                let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)));
                let out = _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0));
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_and_ps(out, keep));
            }
        }
        chunks.into_remainder().iter_mut().for_each(|v| *v = super::exp(*v));
    }
}

/// `s = softmax(s * scale)` in place (`scale > 0`).
pub fn softmax(s: &mut [f32], scale: f32) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
    s.iter_mut().for_each(|v| *v = *v * scale - max);
    exp_in_place(s);
    let sum: f32 = s.iter().sum();
    s.iter_mut().for_each(|v| *v /= sum);
}

/// `g = silu(g) * u` elementwise (SwiGLU), `scratch` as long as `g`.
pub fn swiglu(g: &mut [f32], u: &[f32], scratch: &mut Vec<f32>) {
    scratch.clear();
    scratch.extend(g.iter().map(|v| -v));
    exp_in_place(scratch);
    for ((g, u), e) in g.iter_mut().zip(u).zip(scratch.iter()) {
        *g = *g / (1.0 + e) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path against f64's exp over the whole useful range, including both clamps.
    #[test]
    fn within_two_ulp_of_exp() {
        let xs: Vec<f32> = (0..200_003).map(|i| -90.0 + 180.0 * i as f32 / 200_000.0).chain([0.0, -0.0, 1e-30, -1e-30]).collect();
        let mut vec = xs.clone();
        exp_in_place(&mut vec);
        // The AVX2 path too, where the CPU has it (it may be taking the AVX-512 one above).
        let mut narrow = xs.clone();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: checked just above.
            unsafe { x86::exp_avx2(&mut narrow) };
        } else {
            narrow.iter_mut().for_each(|v| *v = exp(*v));
        }
        #[cfg(not(target_arch = "x86_64"))]
        narrow.iter_mut().for_each(|v| *v = exp(*v));
        for ((&x, &v), &w) in xs.iter().zip(&vec).zip(&narrow) {
            let want = (x as f64).exp();
            let s = exp(x);
            for got in [v, w, s] {
                if x < LO {
                    assert_eq!(got, 0.0, "exp({x})");
                } else if x <= HI {
                    let ulp = (want as f32).abs() * f32::EPSILON;
                    assert!(((got as f64) - want).abs() <= 2.0 * ulp as f64 + f32::MIN_POSITIVE as f64, "exp({x}) = {got}, want {want}");
                }
            }
        }
    }
}
