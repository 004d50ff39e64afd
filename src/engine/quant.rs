//! JPEG's quantisation, read back from decoded pixels.
//!
//! A baseline JPEG stores each 8x8 block's DCT coefficients as multiples of
//! one step per frequency (the quantisation table). Decoding adds only
//! rounding to whole codes, so the coefficients of a decoded plane's blocks
//! still sit near multiples of those steps. [`estimate_steps`] finds, for each
//! frequency, the largest step whose lattice holds most non-zero
//! coefficients; [`Steps::evidence`] says whether the plane was quantised at
//! all (a frame that never went through JPEG has no such lattice; a flat one
//! carries no evidence either way); [`fit_ijg`] matches the steps against the
//! IJG tables (libjpeg's, Pillow's, GStreamer's `jpegenc`) to name a quality.
//!
//! The block DCT is JPEG's: orthonormal, on samples level-shifted by 128, so a
//! coefficient here is the value the encoder divided by its step.
use std::sync::OnceLock;

use super::kernels::simd_fn;

/// Samples of one block side.
pub const B: usize = 8;

/// `C[k][n] = c_k cos((2n + 1) k pi / 16)`: the orthonormal 8-point DCT-II.
#[inline(always)]
fn basis() -> &'static [[f32; B]; B] {
    static C: OnceLock<[[f32; B]; B]> = OnceLock::new();
    C.get_or_init(|| {
        let mut c = [[0f32; B]; B];
        for (k, row) in c.iter_mut().enumerate() {
            let ck = if k == 0 { (1.0f64 / 8.0).sqrt() } else { 0.5 };
            for (n, v) in row.iter_mut().enumerate() {
                *v = (ck * ((2 * n + 1) as f64 * k as f64 * std::f64::consts::PI / 16.0).cos()) as f32;
            }
        }
        c
    })
}

/// `a b` for row-major 8x8 matrices, `a` given entry by entry.
/// Each output row is summed a product at a time over k in order, eight
/// columns at once (the loop the compiler vectorises).
#[inline(always)]
fn mul(a: impl Fn(usize, usize) -> f32, b: &[f32; 64]) -> [f32; 64] {
    let mut out = [0f32; 64];
    for (i, row) in out.chunks_exact_mut(B).enumerate() {
        for (k, bk) in b.chunks_exact(B).enumerate() {
            let aik = a(i, k);
            for (o, v) in row.iter_mut().zip(bk) {
                *o += aik * v;
            }
        }
    }
    out
}

#[inline(always)]
fn transposed(x: &[f32; 64]) -> [f32; 64] {
    std::array::from_fn(|k| x[(k % B) * B + k / B])
}

/// `M x M^T` with `M = C` (forward) or `C^T` (inverse), as
/// `M (M x^T)^T`, on a row-major block.
#[inline(always)]
fn transform(x: &[f32; 64], inverse: bool) -> [f32; 64] {
    let c = basis();
    let m = |i: usize, k: usize| if inverse { c[k][i] } else { c[i][k] };
    mul(m, &transposed(&mul(m, &transposed(x))))
}

/// Forward DCT of a block of level-shifted samples, row-major (`v * 8 + u`).
#[inline(always)]
pub fn fdct(x: &[f32; 64]) -> [f32; 64] {
    transform(x, false)
}

/// Inverse of [`fdct`].
#[inline(always)]
pub fn idct(c: &[f32; 64]) -> [f32; 64] {
    transform(c, true)
}

/// One plane of samples on the 0..255 scale, row-major, no padding.
#[derive(Clone, Debug, PartialEq)]
pub struct Plane {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Plane {
    /// Whole 8x8 blocks across and down (a partial block at the right or
    /// bottom edge is left out: its padding was never decoded).
    pub fn blocks(&self) -> (usize, usize) {
        (self.width / B, self.height / B)
    }

    /// Block `(bx, by)`, level-shifted by 128.
    #[inline(always)]
    fn block(&self, bx: usize, by: usize) -> [f32; 64] {
        block_of_rows(&self.data[by * B * self.width..], self.width, bx)
    }
}

/// Block `bx` of the 8 rows (of `w` samples) that start `rows`, level-shifted by 128.
#[inline(always)]
fn block_of_rows(rows: &[f32], w: usize, bx: usize) -> [f32; 64] {
    let mut b = [0f32; 64];
    for (y, row) in b.chunks_exact_mut(B).enumerate() {
        for (d, s) in row.iter_mut().zip(&rows[y * w + bx * B..][..B]) {
            *d = s - 128.0;
        }
    }
    b
}

/// How far (in coefficient units) a decoded coefficient may sit from a
/// multiple of step `q` and still count as on the lattice: decoding rounds
/// each sample (a coefficient error of about 0.3 RMS), a colour conversion
/// and its rounding add as much again, and the DC (8x the block's mean)
/// picks up any bias of the conversion 8 times. At most 0.3 q, so a wrong
/// step is hit by chance by at most 60 % of the values.
fn tol(dc: bool, q: f32) -> f32 {
    (if dc { 3.0 } else { 1.5f32 }).min(0.3 * q)
}
/// Below this step the rounding noise hides the lattice: such frequencies
/// read as unquantised (step 1).
pub const MIN_STEP: u16 = 3;
/// Distinct coefficient magnitudes of 1 or more a frequency needs to be
/// measured (repeated blocks, as in test patterns and flat graphics, count
/// once: they are one piece of evidence, however often they repeat).
const MIN_VALUES: usize = 12;
/// Of them, how many must sit at a non-zero multiple of the step.
const MIN_LEVELS: usize = 8;
/// The share of them that must sit on the lattice (clipped samples and
/// chroma upsampling push the rest off it).
const ON_LATTICE: f32 = 0.85;
/// At most this many blocks are read (evenly spread): 4096 blocks give each
/// frequency enough values and keep a 4K frame's estimate to milliseconds.
const MAX_BLOCKS: usize = 4096;
/// Largest step searched (baseline JPEG's limit).
const MAX_STEP: u16 = 255;

/// Quantisation steps measured on one decoded plane, row-major frequencies
/// (`v * 8 + u`, DC first).
#[derive(Clone, Debug, PartialEq)]
pub struct Steps {
    /// `Some(q)`: most non-zero coefficients sit on multiples of `q` (the
    /// largest such step of at least [`MIN_STEP`]); `Some(1)`: measured, but no
    /// such lattice; `None`: too few non-zero coefficients to tell.
    pub step: [Option<u16>; 64],
}

/// What a plane says about its own past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// Its AC coefficients sit on quantisation lattices: a decoded JPEG (or
    /// MJPEG frame) on its original 8x8 grid.
    Quantised,
    /// Enough AC coefficients and no lattice: never JPEG-compressed, compressed
    /// at quality ~97 or more, or scaled / shifted since decoding.
    Unquantised,
    /// Too little detail (flat, black, nearly empty frames) to tell.
    Unknown,
}

impl Steps {
    /// AC frequencies measured, and of them those with a step of at least [`MIN_STEP`].
    pub fn ac_counts(&self) -> (usize, usize) {
        let ac = &self.step[1..];
        (
            ac.iter().filter(|s| s.is_some()).count(),
            ac.iter().filter(|s| matches!(s, Some(q) if *q >= MIN_STEP)).count(),
        )
    }

    /// Quantised when at least 3 AC frequencies (and a quarter of those
    /// measured) show a lattice, or when 2 are measured and both do (heavy
    /// compression leaves few non-zero coefficients); unquantised when 4 or
    /// more were measured and fewer show one; unknown otherwise. The DC is left out: the DC of a
    /// flat block of whole codes is a multiple of 8 whether or not it was
    /// ever compressed.
    pub fn evidence(&self) -> Evidence {
        let (measured, quantised) = self.ac_counts();
        if (quantised >= 3 && quantised * 4 >= measured) || (quantised >= 2 && quantised == measured) {
            Evidence::Quantised
        } else if measured >= 4 {
            Evidence::Unquantised
        } else {
            Evidence::Unknown
        }
    }
}

/// The largest step `q` (from [`MIN_STEP`]) on whose multiples at least
/// [`ON_LATTICE`] of `vals` (magnitudes >= 1) sit, with [`MIN_LEVELS`] of them
/// at a non-zero multiple; `None` with too few values, or when they are only
/// noise around zero (every coefficient of the frequency was quantised to
/// zero: the step is larger than the image shows); `Some(1)` otherwise.
fn lattice_step(vals: &[f32], dc: bool) -> Option<u16> {
    if vals.len() < MIN_VALUES {
        return None;
    }
    let need = (ON_LATTICE * vals.len() as f32).ceil() as usize;
    if vals.iter().filter(|&&v| v <= tol(dc, f32::INFINITY)).count() >= need {
        return None;
    }
    let max = vals.iter().fold(0f32, |m, &v| m.max(v));
    let top = ((2.0 * max + 1.0) as u16).min(MAX_STEP);
    let on = |v: f32, q: f32| {
        let level = (v / q).round();
        ((v - level * q).abs() <= tol(dc, q), level >= 1.0)
    };
    // a cheap look at the first values rules most wrong steps out
    let probe = &vals[..vals.len().min(48)];
    let probe_need = (0.6 * probe.len() as f32) as usize;
    let passes = |q: u16| {
        let qf = q as f32;
        if probe.iter().filter(|&&v| on(v, qf).0).count() < probe_need {
            return false;
        }
        let (mut ok, mut levels) = (0usize, 0usize);
        for &v in vals {
            let (hit, nonzero) = on(v, qf);
            ok += hit as usize;
            levels += (hit && nonzero) as usize;
        }
        ok >= need && levels >= MIN_LEVELS
    };
    // mean distance of the non-zero levels from the lattice
    let misfit = |q: u16| {
        let qf = q as f32;
        let (mut sum, mut n) = (0f32, 0usize);
        for &v in vals {
            let level = (v / qf).round();
            if level >= 1.0 {
                sum += (v - level * qf).abs();
                n += 1;
            }
        }
        sum / n.max(1) as f32
    };
    match (MIN_STEP..=top).rev().find(|&q| passes(q)) {
        // the tolerance lets a step one or two above the true one pass when
        // the levels are small: take the neighbour that fits best
        Some(q) => (q.saturating_sub(2).max(MIN_STEP)..=q)
            .filter(|&c| passes(c))
            .min_by(|&a, &b| misfit(a).total_cmp(&misfit(b))),
        // mostly small values (noise around level zero), or too few large
        // ones to tell a lattice from none: nothing measured
        None if vals[vals.len() / 2] < 3.0 || vals.iter().filter(|&&v| v >= 3.0).count() < MIN_LEVELS + 4 => None,
        None => Some(1),
    }
}

/// Measure the quantisation step of every frequency of `plane`'s 8x8 blocks
/// (on the grid anchored at its top-left sample). Blocks for which
/// `clipped(bx, by)` is true are left out: a decoder clamps samples to
/// 0..255 after the inverse DCT, and a colour conversion clamps R, G and B,
/// so a block with clamped samples lost its place on the lattice.
pub fn estimate_steps(plane: &Plane, clipped: &(dyn Fn(usize, usize) -> bool + Sync)) -> Steps {
    use rayon::prelude::*;
    let (nbx, nby) = plane.blocks();
    let total = nbx * nby;
    let usable: Vec<usize> = (0..total).filter(|&i| !clipped(i % nbx, i / nbx)).collect();
    let stride = usable.len().div_ceil(MAX_BLOCKS).max(1);
    let sampled: Vec<usize> = usable.into_iter().step_by(stride).collect();
    let coefs: Vec<[f32; 64]> = sampled.par_chunks(256).flat_map_iter(|ids| block_dcts(plane, ids)).collect();
    let mut vals: Vec<Vec<f32>> = vec![Vec::new(); 64];
    for c in &coefs {
        for (k, &v) in c.iter().enumerate() {
            if v.abs() >= 1.0 {
                vals[k].push(v.abs());
            }
        }
    }
    let found: Vec<Option<u16>> = vals
        .par_iter_mut()
        .enumerate()
        .map(|(k, v)| {
            v.sort_unstable_by(f32::total_cmp);
            v.dedup_by(|a, b| (*a - *b).abs() < 1e-3);
            lattice_step(v, k == 0)
        })
        .collect();
    let mut step = [None; 64];
    step.copy_from_slice(&found);
    Steps { step }
}

/// The standard luminance table (ITU T.81 Annex K), row-major.
pub const LUMA_TABLE: [u16; 64] = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51,
    87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
];

/// The standard chrominance table (ITU T.81 Annex K), row-major.
pub const CHROMA_TABLE: [u16; 64] = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99,
];

/// libjpeg's `jpeg_set_quality` scaling of `base` to `quality` (1..=100),
/// baseline-limited to 1..=255.
pub fn ijg_table(base: &[u16; 64], quality: u32) -> [u16; 64] {
    let q = quality.clamp(1, 100);
    let scale = if q < 50 { 5000 / q } else { 200 - 2 * q };
    base.map(|b| ((b as u32 * scale + 50) / 100).clamp(1, 255) as u16)
}

/// The IJG quality whose table best explains measured steps.
#[derive(Clone, Debug, PartialEq)]
pub struct IjgFit {
    /// 1..=100 (the middle of the qualities that explain the steps equally well).
    pub quality: f32,
    /// Share of the measured frequencies the table explains (0..=1).
    pub agreement: f32,
    /// Frequencies measured.
    pub measured: usize,
    /// That quality's table.
    pub table: [u16; 64],
}

/// Match `steps` against `base` scaled to every IJG quality; None when no
/// frequency was measured. A measured step agrees with table entries within
/// one of it; a measured step of 1 with entries of 1 or 2 (finer than the
/// lattice test sees).
pub fn fit_ijg(steps: &Steps, base: &[u16; 64]) -> Option<IjgFit> {
    let measured = steps.step.iter().filter(|s| s.is_some()).count();
    if measured == 0 {
        return None;
    }
    let score = |t: &[u16; 64]| {
        steps
            .step
            .iter()
            .zip(t)
            .filter(|(s, &t)| match s {
                Some(1) => t < MIN_STEP,
                Some(q) => q.abs_diff(t) <= 1,
                None => false,
            })
            .count()
    };
    let scores: Vec<usize> = (1..=100).map(|q| score(&ijg_table(base, q))).collect();
    let best = *scores.iter().max().expect("100 qualities");
    let tied: Vec<u32> = (1..=100u32).filter(|&q| scores[q as usize - 1] == best).collect();
    let quality = tied[tied.len() / 2];
    Some(IjgFit {
        quality: quality as f32,
        agreement: best as f32 / measured as f32,
        measured,
        table: ijg_table(base, quality),
    })
}

/// The IJG quality whose scaling matches the measured AC steps best in
/// ratio: the median of `step / base` over the frequencies measured with a
/// step of at least [`MIN_STEP`], turned back into a quality by inverting
/// libjpeg's scaling. For tables that are not IJG's (FFmpeg's MJPEG
/// encoder, cameras) this is the quality an IJG encoder would need for steps
/// of the same size; None when no AC step was measured.
pub fn equivalent_quality(steps: &Steps, base: &[u16; 64]) -> Option<f32> {
    let mut ratios: Vec<f32> =
        (1..64).filter_map(|k| steps.step[k].filter(|&q| q >= MIN_STEP).map(|q| q as f32 / base[k] as f32)).collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_unstable_by(f32::total_cmp);
    let percent = 100.0 * ratios[ratios.len() / 2];
    // scale = 5000 / q below 50, 200 - 2 q from 50
    let q = if percent > 100.0 { 5000.0 / percent } else { (200.0 - percent) / 2.0 };
    Some(q.clamp(1.0, 100.0))
}

/// A fit explains the steps when it agrees on at least this share of them.
pub const FIT_AGREEMENT: f32 = 0.75;

/// The step of every frequency to project with: the IJG fit's table when it
/// explains the measurements (a measured step of 1 at a frequency whose
/// table step is large is a misreading: heavy quantisation leaves few
/// non-zero values, and clipped blocks scatter them); otherwise the measured
/// step where one of at least [`MIN_STEP`] was found, and elsewhere the
/// largest step measured at a frequency no higher (`u + v` no larger), which
/// a table of rising steps does not exceed.
pub fn full_table(steps: &Steps, fit: Option<&IjgFit>) -> [f32; 64] {
    if let Some(f) = fit.filter(|f| f.agreement >= FIT_AGREEMENT) {
        return f.table.map(|q| q as f32);
    }
    let measured = |i: usize| steps.step[i].filter(|&q| q >= MIN_STEP);
    let order = |i: usize| i / B + i % B;
    std::array::from_fn(|k| match measured(k) {
        Some(q) => q as f32,
        None => (0..64).filter(|&i| order(i) <= order(k)).filter_map(measured).max().unwrap_or(1) as f32,
    })
}

/// Keep every whole block of `output` within the quantisation intervals of
/// the same block of `input`: each coefficient is clamped to
/// `[(l - h) q, (l + h) q]`, where `l` is the input's level at step `q` and
/// `h` is 1/2 for coefficients quantised to zero (the JPEG's whole interval:
/// where the model restores lost detail) and `nonzero_half_width` (at most
/// 1/2) for the others, whose value the encoder kept. The result is a
/// picture the same JPEG could have come from.
/// Partial blocks at the right and bottom edges are left as they are.
/// Returns the number of blocks changed.
pub fn project(input: &Plane, output: &mut Plane, steps: &[f32; 64], nonzero_half_width: f32) -> usize {
    use rayon::prelude::*;
    assert_eq!((input.width, input.height), (output.width, output.height), "planes of one frame");
    let w = input.width;
    output
        .data
        .par_chunks_mut(B * w)
        .enumerate()
        .filter(|(_, rows)| rows.len() == B * w)
        .map(|(by, rows)| project_row(input, rows, by, steps, nonzero_half_width))
        .sum()
}

simd_fn! {
    /// The DCTs of `plane`'s blocks numbered `ids` (row-major block order).
    fn block_dcts(plane: &Plane, ids: &[usize]) -> Vec<[f32; 64]> {
        let (nbx, _) = plane.blocks();
        ids.iter().map(|&i| fdct(&plane.block(i % nbx, i / nbx))).collect()
    }
}

simd_fn! {
    /// Row `by` of blocks of [`project`] (`rows`: its 8 rows of `output`);
    /// returns how many blocks moved.
    fn project_row(input: &Plane, rows: &mut [f32], by: usize, steps: &[f32; 64], nonzero_half_width: f32) -> usize {
        let (nbx, _) = input.blocks();
        let w = input.width;
        let mut changed = 0;
        for bx in 0..nbx {
            let cin = fdct(&input.block(bx, by));
            let mut c = fdct(&block_of_rows(rows, w, bx));
            // a count rather than a flag: the loop vectorises
            let mut moved = 0u32;
            for ((c, &cin), &q) in c.iter_mut().zip(&cin).zip(steps) {
                let level = (cin / q).round();
                let h = if level != 0.0 { nonzero_half_width } else { 0.5 };
                let v = c.max((level - h) * q).min((level + h) * q);
                moved += (v != *c) as u32;
                *c = v;
            }
            if moved > 0 {
                changed += 1;
                let x = idct(&c);
                for (y, row) in x.chunks_exact(B).enumerate() {
                    for (d, s) in rows[y * w + bx * B..][..B].iter_mut().zip(row) {
                        *d = s + 128.0;
                    }
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic textured plane (smooth waves plus a pseudo-random texture).
    fn texture(w: usize, h: usize, seed: u32) -> Plane {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        let mut data = Vec::with_capacity(w * h);
        for y in 0..h {
            for x in 0..w {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let n = (s % 1000) as f32 / 1000.0 - 0.5;
                let v = 128.0 + 60.0 * ((x as f32 * 0.11).sin() * (y as f32 * 0.07).cos()) + 40.0 * n;
                data.push(v.round().clamp(0.0, 255.0));
            }
        }
        Plane { width: w, height: h, data }
    }

    /// JPEG's round trip of a plane at one table: quantise every block, decode, round to codes.
    fn jpeg(p: &Plane, table: &[u16; 64]) -> Plane {
        let mut out = p.clone();
        let (nbx, nby) = p.blocks();
        for by in 0..nby {
            for bx in 0..nbx {
                let c = fdct(&p.block(bx, by));
                let q: [f32; 64] = std::array::from_fn(|k| (c[k] / table[k] as f32).round() * table[k] as f32);
                let x = idct(&q);
                for y in 0..B {
                    for i in 0..B {
                        out.data[(by * B + y) * p.width + bx * B + i] =
                            (x[y * B + i] + 128.0).round().clamp(0.0, 255.0);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn dct_is_orthonormal_and_inverts() {
        let x: [f32; 64] = std::array::from_fn(|i| ((i * 37) % 255) as f32 - 128.0);
        let c = fdct(&x);
        let energy = |v: &[f32; 64]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((energy(&x) - energy(&c)).abs() / energy(&x) < 1e-5);
        let back = idct(&c);
        assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-3));
        // a flat block of 200: DC = 8 * (200 - 128), no AC
        let c = fdct(&[72.0; 64]);
        assert!((c[0] - 576.0).abs() < 1e-3 && c[1..].iter().all(|v| v.abs() < 1e-3));
    }

    #[test]
    fn steps_and_quality_are_read_back_from_a_decoded_plane() {
        let clean = texture(320, 240, 7);
        for quality in [10, 20, 30, 50, 75, 90] {
            let table = ijg_table(&LUMA_TABLE, quality);
            let steps = estimate_steps(&jpeg(&clean, &table), &|_, _| false);
            assert_eq!(steps.evidence(), Evidence::Quantised, "quality {quality}: {:?}", steps.step);
            for (k, s) in steps.step.iter().enumerate() {
                if let Some(s) = s {
                    let t = table[k];
                    assert!(
                        *s == t || (*s == 1 && t < MIN_STEP),
                        "quality {quality}, frequency {k}: measured {s}, table {t}"
                    );
                }
            }
            let fit = fit_ijg(&steps, &LUMA_TABLE).unwrap();
            assert!(fit.agreement >= 0.99, "quality {quality}: {fit:?}");
            assert!((fit.quality - quality as f32).abs() <= 2.0, "quality {quality} read as {}", fit.quality);
        }
    }

    /// A table that is no IJG table (IJG's quality 14, every step moved by 3
    /// up or down) reads as the IJG quality of steps of the same size.
    #[test]
    fn other_tables_read_as_the_equivalent_ijg_quality() {
        let ijg = ijg_table(&LUMA_TABLE, 14);
        let table: [u16; 64] = std::array::from_fn(|k| if k % 2 == 0 { ijg[k] + 3 } else { ijg[k] - 3 });
        let steps = estimate_steps(&jpeg(&texture(320, 240, 5), &table), &|_, _| false);
        assert_eq!(steps.evidence(), Evidence::Quantised);
        assert!(fit_ijg(&steps, &LUMA_TABLE).unwrap().agreement < FIT_AGREEMENT);
        let q = equivalent_quality(&steps, &LUMA_TABLE).unwrap();
        assert!((q - 14.0).abs() <= 1.5, "read as {q}");
    }

    #[test]
    fn never_compressed_and_flat_planes_are_not_taken_for_jpeg() {
        assert_eq!(estimate_steps(&texture(256, 192, 3), &|_, _| false).evidence(), Evidence::Unquantised);
        let flat = Plane { width: 64, height: 64, data: vec![17.0; 64 * 64] };
        assert_eq!(estimate_steps(&flat, &|_, _| false).evidence(), Evidence::Unknown);
        let black = Plane { width: 64, height: 64, data: vec![0.0; 64 * 64] };
        assert_eq!(estimate_steps(&black, &|_, _| false).evidence(), Evidence::Unknown);
    }

    #[test]
    fn projection_keeps_the_jpeg_and_pulls_outliers_back() {
        let clean = texture(128, 64, 11);
        let table = ijg_table(&LUMA_TABLE, 20);
        let decoded = jpeg(&clean, &table);
        let steps: [f32; 64] = table.map(|q| q as f32);
        // the original is (up to the decoder's rounding) inside the intervals
        let mut orig = clean.clone();
        project(&decoded, &mut orig, &steps, 0.5);
        let moved = orig.data.iter().zip(&clean.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved < 6.0, "the original moved by {moved}");
        // a wild output is brought back within half a step of each level
        let mut wild = Plane { data: clean.data.iter().map(|v| 255.0 - v).collect(), ..clean.clone() };
        let changed = project(&decoded, &mut wild, &steps, 0.5);
        assert!(changed > 16 * 8 * 9 / 10, "{changed} of 128 blocks moved");
        let (nbx, nby) = decoded.blocks();
        for by in 0..nby {
            for bx in 0..nbx {
                let (a, b) = (fdct(&decoded.block(bx, by)), fdct(&wild.block(bx, by)));
                for k in 0..64 {
                    let level = (a[k] / steps[k]).round();
                    assert!((b[k] - level * steps[k]).abs() <= steps[k] / 2.0 + 1e-3, "block {bx},{by} frequency {k}");
                }
            }
        }
        // the input itself is a fixed point
        let mut same = decoded.clone();
        project(&decoded, &mut same, &steps, 0.5);
        assert!(same.data.iter().zip(&decoded.data).all(|(a, b)| (a - b).abs() < 1e-3));
    }
}
