//! bf16 GEMM: both operands rounded to bfloat16 (8 bits of mantissa, f32's
//! range), products summed in f32 — `precision=bf16` on the CPU.
//!
//! On CPUs with AVX512_BF16 (checked at run time) the operands are packed as
//! bf16 pairs along k and multiplied by `vdpbf16ps`, which takes two
//! multiply-adds per f32 lane and instruction (twice AVX-512 FMA's work per
//! instruction, half its operand bytes). Blocking in the usual GotoBLAS way:
//! `KC` values of k at a time, B in strips of [`NR`] columns
//! (`[k pair][NR]`), A in panels of [`MR`] rows (`[k pair][MR]`); a
//! microkernel keeps an `MR x NR` tile of C in 24 zmm registers.
//!
//! Elsewhere the same arithmetic is emulated: both operands rounded to bf16
//! (held in f32) and multiplied by the f32 GEMM. A product of two bf16 values
//! is exact in f32, so the two paths differ only in the order of the f32 sums.

use super::gemm::{gemm_f32, Mat};

/// Rows of A per microkernel tile.
pub const MR: usize = 12;
/// Columns of B per microkernel tile (two zmm registers of f32 lanes).
pub const NR: usize = 32;
/// Values of k per packed block (pairs: `KC / 2`).
const KC: usize = 256;
/// Columns of B packed at a time.
const NC: usize = 32 * NR;
/// Rows of A packed at a time.
const MC: usize = 8 * MR;

/// `x` rounded to the nearest bf16 (ties to even), as f32 bits with the low
/// 16 bits zero. NaN stays NaN (its quiet bit is set so that rounding cannot
/// carry it into infinity).
#[inline(always)]
pub fn round_bits(x: f32) -> u32 {
    let u = x.to_bits();
    if x.is_nan() {
        return (u | 0x0040_0000) & 0xFFFF_0000;
    }
    u.wrapping_add(0x7FFF + ((u >> 16) & 1)) & 0xFFFF_0000
}

/// `x` rounded to the nearest bf16, as f32.
#[inline(always)]
pub fn round(x: f32) -> f32 {
    f32::from_bits(round_bits(x))
}

/// Whether this CPU runs `vdpbf16ps` (AVX512_BF16 with AVX-512F; checked once).
pub fn native() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            super::avx512_available()
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && std::env::var("CODIFF_BF16").map_or(true, |v| v != "emulate")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

thread_local! {
    /// This thread's packing buffers (A panels, B strips), kept between calls.
    static PACKS: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst[m x n] = lhs[m x k] * rhs[k x n]` (`+=` when `accumulate`) with bf16
/// operands and f32 sums, on views (`d` written); single-threaded.
///
/// # Safety
/// All pointers valid for the given extents and strides.
pub(super) unsafe fn gemm_bf16(m: usize, n: usize, k: usize, accumulate: bool, d: Mat, a: Mat, b: Mat) {
    if native() {
        gemm_operands(m, n, k, accumulate, d, Operand::Strided(a), Operand::Strided(b))
    } else {
        emulated(m, n, k, accumulate, d, a, b)
    }
}

/// One GEMM operand: a strided f32 matrix (packed on the fly) or a [`Packed`]
/// one starting at a row of A / column of B that is a multiple of [`MR`] /
/// [`NR`].
#[derive(Clone, Copy)]
pub(super) enum Operand<'a> {
    Strided(Mat),
    Packed(&'a Packed, usize),
}

/// `dst[m x n] (+)= a[m x k] * b[k x n]` on AVX512_BF16.
///
/// # Safety
/// [`native`] returned true; the operands and `dst` are valid for the
/// extents; a packed operand covers rows (columns) `first..first + m` (`n`)
/// and `k`, `first` a multiple of MR (NR).
pub(super) unsafe fn gemm_operands(m: usize, n: usize, k: usize, accumulate: bool, d: Mat, a: Operand, b: Operand) {
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *(d.p as *mut f32).add(i * d.rs + j * d.cs) = 0.0;
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        PACKS.with_borrow_mut(|(ap, bp)| {
            // SAFETY: native() found AVX-512F and AVX512_BF16 (the caller's
            // contract), the features `blocked` is compiled for; the caller's
            // contract sizes the operands
            unsafe { avx512::blocked(m, n, k, accumulate, d, a, b, ap, bp) }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 GEMM operands need AVX512_BF16");
}

/// `d[m x n] = A[first..first + m] * b` with a packed A (`first` a multiple
/// of [`MR`]; k is A's) and a strided B.
///
/// # Safety
/// As [`gemm_operands`].
pub(super) unsafe fn gemm_packed_lhs(a: &Packed, first: usize, m: usize, n: usize, d: Mat, b: Mat) {
    debug_assert!(first.is_multiple_of(MR) && first + m <= a.outer && a.width == MR);
    gemm_operands(m, n, a.k, false, d, Operand::Packed(a, first), Operand::Strided(b));
}

/// `d[m x n] = a[m x k] * B` with a strided A and a packed B (all its n
/// columns; k is B's).
///
/// # Safety
/// As [`gemm_operands`].
pub(super) unsafe fn gemm_packed_rhs(m: usize, d: Mat, a: Mat, b: &Packed) {
    debug_assert!(b.width == NR);
    gemm_operands(m, b.outer, b.k, false, d, Operand::Strided(a), Operand::Packed(b, 0));
}

/// A constant operand (a layer's weights) rounded to bf16 and packed once,
/// in the layout the microkernel reads: per block of `KC` values of k, A as
/// panels of [`MR`] rows or B as strips of [`NR`] columns, `[pair][width]`
/// each. Half the bytes of the f32 weights, and no packing per call.
#[derive(Debug)]
pub struct Packed {
    /// rows of A (panels of MR) or columns of B (strips of NR)
    outer: usize,
    width: usize,
    k: usize,
    words: Vec<u32>,
}

impl Packed {
    /// A `[m x k]` (row stride `rs`, column stride `cs`), where the CPU has
    /// AVX512_BF16; None elsewhere (the emulation packs nothing).
    pub fn lhs(a: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> Option<Self> {
        Self::new(a, m, k, MR, Mat::new(a.as_ptr(), rs, cs))
    }

    /// B `[k x n]` (row stride `rs`, column stride `cs`), as [`Packed::lhs`].
    pub fn rhs(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Option<Self> {
        Self::new(b, n, k, NR, Mat::new(b.as_ptr(), rs, cs))
    }

    fn new(data: &[f32], outer: usize, k: usize, width: usize, mat: Mat) -> Option<Self> {
        if !native() || outer == 0 || k == 0 {
            return None;
        }
        let (r, c) = if width == MR { (outer, k) } else { (k, outer) };
        assert!((r - 1) * mat.rs + (c - 1) * mat.cs < data.len(), "packed operand outside its buffer");
        let panels = outer.div_ceil(width);
        let mut words = vec![0u32; k.div_ceil(KC) * panels * (KC / 2) * width];
        #[cfg(target_arch = "x86_64")]
        for (pb, pc) in (0..k).step_by(KC).enumerate() {
            let kc = KC.min(k - pc);
            let block = &mut words[pb * panels * (KC / 2) * width..];
            // SAFETY: native() held (AVX-512F, AVX512_BF16); the assert above
            // keeps every element of the view inside `data`; `block` holds at
            // least panels * kc.div_ceil(2) * width words
            unsafe {
                if width == MR {
                    avx512::pack_a_block(mat, 0, outer, pc, kc, block)
                } else {
                    avx512::pack_b(mat, pc, kc, 0, outer, block)
                }
            }
        }
        Some(Self { outer, width, k, words })
    }

    /// An A operand of `rows` rows and `k` columns that the caller writes
    /// pair by pair ([`Packed::lhs_pair_offset`]), in `words`, a buffer
    /// kept between calls: grown with zeros, else its old values stay (those
    /// of rows past `rows` in the last panel are multiplied but never stored).
    pub(super) fn lhs_to_fill(rows: usize, k: usize, mut words: Vec<u32>) -> Self {
        let n = k.div_ceil(KC) * rows.div_ceil(MR) * (KC / 2) * MR;
        crate::engine::kernels::grow(&mut words, n);
        Self { outer: rows, width: MR, k, words }
    }

    /// Where the MR words of pair `p` (columns 2p, 2p + 1) of panel `i`
    /// (rows i MR ..) of an A operand lie in [`Packed::words_mut`].
    pub(super) fn lhs_pair_offset(&self, i: usize, p: usize) -> usize {
        let pc = 2 * p / KC * KC;
        let kp = KC.min(self.k - pc).div_ceil(2);
        (pc / KC) * self.outer.div_ceil(MR) * (KC / 2) * MR + i * kp * MR + (p - pc / 2) * MR
    }

    /// The packed words, to fill ([`Packed::lhs_to_fill`]).
    pub(super) fn words_mut(&mut self) -> &mut [u32] {
        &mut self.words
    }

    /// The buffer back, for the next [`Packed::lhs_to_fill`].
    pub(super) fn into_words(self) -> Vec<u32> {
        self.words
    }

    /// Panel (strip) `i` of the block of k starting at `pc`; panel `i + j`
    /// follows `j * kp * width` words on (`kp` the block's pairs).
    fn panel(&self, pc: usize, i: usize) -> *const u32 {
        let panels = self.outer.div_ceil(self.width);
        let kp = KC.min(self.k - pc).div_ceil(2);
        self.words[(pc / KC) * panels * (KC / 2) * self.width + i * kp * self.width..].as_ptr()
    }
}

/// [`gemm_bf16`] without AVX512_BF16: both operands rounded to bf16, then
/// multiplied by the f32 GEMM.
///
/// # Safety
/// As [`gemm_bf16`].
unsafe fn emulated(m: usize, n: usize, k: usize, accumulate: bool, d: Mat, lhs: Mat, rhs: Mat) {
    let mut a = vec![0f32; m * k];
    for i in 0..m {
        for p in 0..k {
            a[i * k + p] = round(lhs.at(i, p));
        }
    }
    let mut b = vec![0f32; k * n];
    for p in 0..k {
        for j in 0..n {
            b[p * n + j] = round(rhs.at(p, j));
        }
    }
    gemm_f32(m, n, k, accumulate, d, Mat::new(a.as_ptr(), k, 1), Mat::new(b.as_ptr(), n, 1));
}

/// The bf16 pair `(lo, hi)` in one 32-bit word: `lo` in the low half, as
/// `vdpbf16ps` reads it.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    (round_bits(lo) >> 16) | round_bits(hi)
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{first_lanes, pair16, pair_row};

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{pair, Mat, Operand, KC, MC, MR, NC, NR};
    use std::arch::x86_64::*;

    /// The blocked product (see the module docs); `ap`, `bp` are packing
    /// buffers, grown as needed.
    ///
    /// # Safety
    /// AVX-512F and AVX512_BF16 are present; the operands are valid for
    /// m x k, k x n and m x n.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn blocked(
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        d: Mat,
        a: Operand,
        b: Operand,
        ap: &mut Vec<u32>,
        bp: &mut Vec<u32>,
    ) {
        let dst = d.p as *mut f32;
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let kp = kc.div_ceil(2);
                let strips = nc.div_ceil(NR);
                // strip js of this block of B starts js * kp * NR words on,
                // packed now or once for the layer
                let b0 = match b {
                    Operand::Strided(b) => {
                        crate::engine::kernels::grow(bp, strips * kp * NR);
                        pack_b(b, pc, kc, jc, nc, bp);
                        bp.as_ptr()
                    }
                    Operand::Packed(pb, first) => pb.panel(pc, (first + jc) / NR),
                };
                let overwrite = pc == 0 && !accumulate;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let panels = mc.div_ceil(MR);
                    // likewise panel is of A, kp * MR words apart
                    let a0 = match a {
                        Operand::Strided(a) => {
                            crate::engine::kernels::grow(ap, panels * kp * MR);
                            pack_a_block(a, ic, mc, pc, kc, ap);
                            ap.as_ptr()
                        }
                        Operand::Packed(pa, first) => pa.panel(pc, (first + ic) / MR),
                    };
                    for js in 0..strips {
                        let cols = NR.min(nc - js * NR);
                        let bs = b0.add(js * kp * NR);
                        for is in 0..panels {
                            let rows = MR.min(mc - is * MR);
                            let c = dst.add((ic + is * MR) * d.rs + (jc + js * NR) * d.cs);
                            tile(kp, a0.add(is * kp * MR), bs, c, (d.rs, d.cs), (rows, cols), overwrite);
                        }
                    }
                }
            }
        }
    }

    /// Pack rows `ic..ic + mc`, columns `pc..pc + kc` of A as panels of MR
    /// rows, `[pair][MR]` each; rows and pairs past the edge are zero.
    ///
    /// # Safety
    /// The block lies inside A; `ap` holds `mc.div_ceil(MR) * kc.div_ceil(2) * MR` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_a_block(a: Mat, ic: usize, mc: usize, pc: usize, kc: usize, ap: &mut [u32]) {
        let kp = kc.div_ceil(2);
        for is in 0..mc.div_ceil(MR) {
            let panel = &mut ap[is * kp * MR..(is + 1) * kp * MR];
            for r in 0..MR {
                let i = is * MR + r;
                if i >= mc {
                    for p in 0..kp {
                        panel[p * MR + r] = 0;
                    }
                    continue;
                }
                let mut p0 = 0;
                if a.cs == 1 {
                    // pairs lie side by side along the row: 16 at a time
                    let row = a.p.add((ic + i) * a.rs + pc);
                    let mut words = [0u32; 16];
                    while 2 * p0 + 32 <= kc {
                        pairs16(row.add(2 * p0), &mut words);
                        for (q, &wd) in words.iter().enumerate() {
                            panel[(p0 + q) * MR + r] = wd;
                        }
                        p0 += 16;
                    }
                }
                for p in p0..kp {
                    let k0 = pc + 2 * p;
                    let lo = a.at(ic + i, k0);
                    let hi = if 2 * p + 1 < kc { a.at(ic + i, k0 + 1) } else { 0.0 };
                    panel[p * MR + r] = pair(lo, hi);
                }
            }
        }
    }

    /// Pack rows `pc..pc + kc`, columns `jc..jc + nc` of B as strips of NR
    /// columns, `[pair][NR]` each; columns and pairs past the edge are zero.
    /// Rows of unit column stride are converted 16 columns at a time.
    ///
    /// # Safety
    /// The block lies inside B; `bp` holds `nc.div_ceil(NR) * kc.div_ceil(2) * NR` words;
    /// AVX-512F is present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_b(b: Mat, pc: usize, kc: usize, jc: usize, nc: usize, bp: &mut [u32]) {
        let kp = kc.div_ceil(2);
        if b.rs == 1 && b.cs != 1 {
            // columns contiguous along k (a transposed operand): the pairs of
            // one column lie side by side, 16 at a time
            let mut words = [0u32; 16];
            for js in 0..nc.div_ceil(NR) {
                let strip = bp.as_mut_ptr().add(js * kp * NR);
                for l in 0..NR {
                    let j = js * NR + l;
                    let mut p0 = 0;
                    if j < nc {
                        let col = b.p.add((jc + j) * b.cs + pc);
                        while 2 * p0 + 32 <= kc {
                            pairs16(col.add(2 * p0), &mut words);
                            for (q, &wd) in words.iter().enumerate() {
                                *strip.add((p0 + q) * NR + l) = wd;
                            }
                            p0 += 16;
                        }
                    }
                    for p in p0..kp {
                        let k0 = pc + 2 * p;
                        *strip.add(p * NR + l) = if j < nc {
                            pair(b.at(k0, jc + j), if 2 * p + 1 < kc { b.at(k0 + 1, jc + j) } else { 0.0 })
                        } else {
                            0
                        };
                    }
                }
            }
            return;
        }
        for js in 0..nc.div_ceil(NR) {
            let strip = bp.as_mut_ptr().add(js * kp * NR);
            for p in 0..kp {
                let k0 = pc + 2 * p;
                let has_hi = 2 * p + 1 < kc;
                let out = strip.add(p * NR);
                for half in 0..2 {
                    let j0 = js * NR + half * 16;
                    let cols = nc.saturating_sub(j0).min(16);
                    if cols == 16 && b.cs == 1 {
                        let lo = b.p.add(k0 * b.rs + jc + j0);
                        pair_row(lo, has_hi.then(|| lo.add(b.rs)), 16, out.add(half * 16));
                    } else {
                        for l in 0..16 {
                            *out.add(half * 16 + l) = if l < cols {
                                let j = jc + j0 + l;
                                pair(b.at(k0, j), if has_hi { b.at(k0 + 1, j) } else { 0.0 })
                            } else {
                                0
                            };
                        }
                    }
                }
            }
        }
    }

    /// The 16 bf16 pairs of 32 consecutive values `x[2q], x[2q + 1]`, one
    /// word each (`vcvtne2ps2bf16`: nearest even, as [`super::round_bits`]).
    ///
    /// # Safety
    /// `x` holds 32 values; AVX-512F and AVX512_BF16 are present.
    #[inline(always)]
    unsafe fn pairs16(x: *const f32, out: &mut [u32; 16]) {
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x)));
        _mm512_storeu_si512(out.as_mut_ptr() as *mut _, v);
    }

    /// `out[i] = pair(lo[i], hi[i])` for `i < n` (hi 0 when None): two rows
    /// of f32 interleaved into bf16 pairs, 16 at a time.
    ///
    /// # Safety
    /// `lo`, `hi` hold `n` values, `out` `n` words; AVX-512F is present.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn pair_row(lo: *const f32, hi: Option<*const f32>, n: usize, out: *mut u32) {
        let mut i = 0;
        while i < n {
            let m = first_lanes(n - i);
            let l = round16(_mm512_maskz_loadu_ps(m, lo.add(i)));
            let h = match hi {
                Some(h) => round16(_mm512_maskz_loadu_ps(m, h.add(i))),
                None => _mm512_setzero_si512(),
            };
            _mm512_mask_storeu_epi32(out.add(i) as *mut _, m, _mm512_or_si512(_mm512_srli_epi32::<16>(l), h));
            i += 16;
        }
    }

    /// The mask of a 16-lane vector's first `n` lanes (all from 16 on).
    #[inline(always)]
    pub(crate) fn first_lanes(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// 16 words of bf16 pairs: `lo`'s lanes rounded into the low halves,
    /// `hi`'s into the high ones (what [`pair_row`] stores).
    ///
    /// # Safety
    /// AVX-512F is present.
    #[inline(always)]
    pub(crate) unsafe fn pair16(lo: __m512, hi: __m512) -> __m512i {
        _mm512_or_si512(_mm512_srli_epi32::<16>(round16(lo)), round16(hi))
    }

    /// [`super::round_bits`] of 16 lanes (finite inputs; a NaN may come out as
    /// another NaN or infinity).
    #[inline(always)]
    unsafe fn round16(x: __m512) -> __m512i {
        let u = _mm512_castps_si512(x);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
        _mm512_and_si512(r, _mm512_set1_epi32(0xFFFF_0000u32 as i32))
    }

    /// C tile (`rows x cols` of `MR x NR`) `=` or `+=` A panel x B strip.
    ///
    /// # Safety
    /// `a` holds `kp * MR` words, `b` `kp * NR`; the tile lies inside C.
    #[inline(always)]
    unsafe fn tile(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        (rs, cs): (usize, usize),
        (rows, cols): (usize, usize),
        overwrite: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            let ar = a.add(p * MR);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(i) as i32));
                acc_i[0] = _mm512_dpbf16_ps(acc_i[0], av, b0);
                acc_i[1] = _mm512_dpbf16_ps(acc_i[1], av, b1);
            }
        }
        if cs == 1 {
            for (i, acc_i) in acc.iter().enumerate().take(rows) {
                for (h, &v) in acc_i.iter().enumerate() {
                    let c0 = h * 16;
                    if c0 >= cols {
                        break;
                    }
                    let n = cols - c0;
                    let mask = first_lanes(n);
                    let p = c.add(i * rs + c0);
                    let y = if overwrite { v } else { _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p)) };
                    _mm512_mask_storeu_ps(p, mask, y);
                }
            }
        } else {
            let mut lanes = [0f32; NR];
            for (i, acc_i) in acc.iter().enumerate().take(rows) {
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc_i[0]);
                _mm512_storeu_ps(lanes.as_mut_ptr().add(16), acc_i[1]);
                for (j, &v) in lanes.iter().enumerate().take(cols) {
                    let p = c.add(i * rs + j * cs);
                    *p = if overwrite { v } else { *p + v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round(-1.0 - 1.0 / 512.0), -1.0);
        assert!(round(f32::NAN).is_nan());
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
        assert_eq!(round(f32::MAX), f32::INFINITY);
        assert_eq!(round(1e-40).to_bits() & 0xFFFF, 0);
    }

    /// The bf16 GEMM (this CPU's path and the emulation) against f64 sums of
    /// the rounded operands, over shapes with edges in every direction, odd
    /// k, both strides and accumulation.
    #[test]
    fn bf16_gemm_is_the_rounded_product() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 7), (12, 32, 256), (100, 1100, 300), (5, 70, 513), (97, 17, 2)] {
            for (transposed, accumulate, emulate) in (0..8).map(|i| (i & 1 != 0, i & 2 != 0, i & 4 != 0)) {
                {
                    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                    // B row-major, or (with A transposed) read as the transpose of an [n x k] buffer
                    let (b_rs, b_cs) = if transposed { (1, k) } else { (n, 1) };
                    let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                    let mut c = c0.clone();
                    // A row-major, or read as the transpose of a [k x m] buffer
                    let (a_rs, a_cs) = if transposed { (1, m) } else { (k, 1) };
                    let (c_rs, c_cs) = if transposed { (1, m) } else { (n, 1) };
                    // SAFETY: every view lies inside its buffer
                    unsafe {
                        let (d, av, bv) = (
                            Mat::new(c.as_mut_ptr(), c_rs, c_cs),
                            Mat::new(a.as_ptr(), a_rs, a_cs),
                            Mat::new(b.as_ptr(), b_rs, b_cs),
                        );
                        (if emulate { emulated } else { gemm_bf16 })(m, n, k, accumulate, d, av, bv)
                    };
                    let mut worst = 0f64;
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = if accumulate { c0[i * c_rs + j * c_cs] as f64 } else { 0.0 };
                            for p in 0..k {
                                s += round(a[i * a_rs + p * a_cs]) as f64 * round(b[p * b_rs + j * b_cs]) as f64;
                            }
                            worst = worst.max((c[i * c_rs + j * c_cs] as f64 - s).abs());
                        }
                    }
                    // f32 sums of k terms of magnitude <= 1
                    assert!(
                        worst < 1e-5 * (k as f64).sqrt() + 1e-6,
                        "{m}x{n}x{k} t{transposed} a{accumulate} e{emulate}: {worst}"
                    );
                }
            }
        }
    }
}
