//! Winograd F(m x m, 3 x 3) convolution (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2015) for wide 3x3 stride-1 layers.
//!
//! Each m x m block of outputs comes from an (m+2) x (m+2) input tile `d` and
//! the kernel `g` as `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: the channel sums become
//! (m+2)² independent GEMMs `M_ξ = U_ξ V_ξ` over all tiles of a band of rows,
//! `[cout x cin] x [cin x tiles]`, with (m+2)²/m² multiplies per output where
//! im2col needs 9. F(2,3) (16/4 = 4) and F(4,3) (36/16 = 2.25) share this
//! code; only the matrices differ. The transforms are a small cost next to
//! the GEMMs once a layer has a few dozen channels, and F(4,3)'s larger
//! constants cost some precision (relative error ~1e-6 in f32; unit tests
//! hold both to candle's conv2d).
//!
//! The transformed kernel U holds (m+2)²/9 times the weights (4x for
//! F(4,3)). Layers up to ~300 channels keep theirs ([`Winograd`]); wider
//! ones (SD's 512- to 2560-channel layers, whose U would add gigabytes)
//! transform their weights on every call: on frames whose transformed input
//! fits [`streams`]' budget (the UNet's 640- to 2560-channel layers at
//! 512x512, the VAE's 512-channel ones at 64x64), [`run_streamed`]
//! transforms them block by block of output channels, in cache, so that no
//! whole U is ever written;
//! on larger frames [`Winograd::for_call`] makes U for the call, in the
//! buffer of the thread's last such call.
//!
//! Which tile, by frame size ([`tile_for`]; `cargo run --release --example
//! bench_kernels`, 2 threads): F(4,3) from 32x32 px (1.3-2x faster than
//! im2col + GEMM on SD's VAE and UNet layers at 512x512), F(2,3) from 12x12,
//! else none, for layers that keep U; layers that do not take F(4,3) from
//! 16x16 (streamed, medians of 9: 640 channels at 32x32 18-22 ms vs GEMM 39-42 ms,
//! 1920->640 59-73 vs 139-143, 1280 at 16x16 27 vs 42, 2560->1280 61-63 vs
//! 97-108; at 8x8 none beats GEMM's 14 ms).
//!
//! Layout: NCHW f32, zero padding 1, bias, ReLU and residual fused into the
//! output transform, as [`super::ConvOp`]'s other paths.
use rayon::prelude::*;

use super::{activation, gemm_strided, ChannelAffine, ImageAffine, Mat, Math, SendPtr};

/// Bᵀ, G and Aᵀ of F(2,3) (interpolation points 0, 1, -1).
const F2_BT: [f32; 16] = [1., 0., -1., 0., 0., 1., 1., 0., 0., -1., 1., 0., 0., 1., 0., -1.];
const F2_G: [f32; 12] = [1., 0., 0., 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0., 0., 1.];
const F2_AT: [f32; 8] = [1., 1., 1., 0., 0., 1., -1., -1.];

/// Bᵀ, G and Aᵀ of F(4,3) (points 0, 1, -1, 2, -2).
#[rustfmt::skip]
const F4_BT: [f32; 36] = [
    4., 0., -5., 0., 1., 0.,
    0., -4., -4., 1., 1., 0.,
    0., 4., -4., -1., 1., 0.,
    0., -2., -1., 2., 1., 0.,
    0., 2., -1., -2., 1., 0.,
    0., 4., 0., -5., 0., 1.,
];
#[rustfmt::skip]
const F4_G: [f32; 18] = [
    1. / 4., 0., 0.,
    -1. / 6., -1. / 6., -1. / 6.,
    -1. / 6., 1. / 6., -1. / 6.,
    1. / 24., 1. / 12., 1. / 6.,
    1. / 24., -1. / 12., 1. / 6.,
    0., 0., 1.,
];
#[rustfmt::skip]
const F4_AT: [f32; 24] = [
    1., 1., 1., 1., 1., 0.,
    0., 1., -1., 2., -2., 0.,
    0., 1., 1., 4., 4., 0.,
    0., 1., -1., 8., -8., 1.,
];

/// Bytes of transformed input and output one band may hold (per thread).
const BAND_BYTES: usize = 8 << 20;
/// Fewest tiles a band takes (more bytes than [`BAND_BYTES`] if need be):
/// each band packs every U_ξ for its GEMMs. SD's VAE decoder at 512 channels
/// and 128x128 (32 tiles a row; `bench_kernels`' F(4,3) column, medians of
/// 5) took 150-153 ms in bands of one tile row, 127-130 in bands of four;
/// 128 channels at 512x512 (129 tiles a row) and 256 at 256x256 stay level.
const BAND_MIN_TILES: usize = 128;

/// The output tile side m to use on an `h x w` frame, if any (see the module
/// notes for the measurements behind it); `kept`: the layer keeps its
/// transformed weights, else each call pays for the transform, which a
/// frame under 16x16 does not repay.
pub fn tile_for(h: usize, w: usize, kept: bool) -> Option<usize> {
    match (h * w, kept) {
        (n, true) if n >= 32 * 32 => Some(4),
        (n, true) if n >= 12 * 12 => Some(2),
        (n, false) if n >= 16 * 16 => Some(4),
        _ => None,
    }
}

/// F(m x m, 3 x 3): its sides and kernel transform G (the input and output
/// transforms are compile-time, [`Matrices`]).
#[derive(Debug, Clone, Copy)]
struct Tile {
    /// output tile side m (2 or 4); the input tile is alpha = m + 2
    m: usize,
    alpha: usize,
    g: &'static [f32],
}

/// Where a call works: tile rows `r0..r1` of an `h x w` image (output rows
/// `r0 m .. r1 m`, cut at h); `up`: the input is that image's source at
/// half the size in both directions, read as its 2x nearest upsampling.
#[derive(Debug, Clone, Copy)]
struct Band {
    h: usize,
    w: usize,
    r0: usize,
    r1: usize,
    up: bool,
}

/// What the output transform fuses into each output: `bias[co]`, then ReLU
/// when `relu`, then the residual.
#[derive(Debug, Clone, Copy)]
struct Epilogue<'a> {
    bias: &'a [f32],
    relu: bool,
    residual: Residual<'a>,
}

/// What a Winograd layer adds to its outputs after the bias and ReLU.
#[derive(Debug, Clone, Copy)]
pub enum Residual<'a> {
    None,
    /// an image of the output's shape (`[b, cout, h, w]`)
    From(&'a [f32]),
    /// the output's own values before the call (a residual add in place,
    /// without a fresh output buffer)
    Out,
}

impl<'a> Residual<'a> {
    /// This residual for image `bi` of `n` values each.
    fn image(self, bi: usize, n: usize) -> Self {
        match self {
            Residual::From(r) => Residual::From(&r[bi * n..(bi + 1) * n]),
            other => other,
        }
    }
}

impl Tile {
    fn new(m: usize) -> Self {
        let g: &'static [f32] = match m {
            2 => &F2_G,
            4 => &F4_G,
            _ => panic!("Winograd F({m},3) is not implemented (2 or 4)"),
        };
        Self { m, alpha: m + 2, g }
    }

    /// Row `a` of `G g Gᵀ` for every input channel of one output channel:
    /// `U_{a alpha + b}[ci]` written to `dst + b * stride + ci`, from `wt`
    /// `[tap][ci]` (tap = 3 i + j).
    ///
    /// # Safety
    /// `dst + b * stride .. + cin` are valid and unaliased for b < alpha.
    unsafe fn kernel_row(&self, wt: &[f32], cin: usize, a: usize, dst: *mut f32, stride: usize) {
        kernel_row(wt, cin, &self.g[a * 3..a * 3 + 3], self.g, self.alpha, dst, stride)
    }

    /// `V[ξ][ci][t0 + t] = (Bᵀ d B)` of the input tiles of the band's tile
    /// rows `r0..r1` (t0 = (tr - r0) tc) for the input channels `cis` of the
    /// image `x` `[cin, h, w]`, normalised by `pre` as they are read where
    /// given (the zero padding stays zero); V holds `nt` tiles per channel
    /// and `cin` channels per ξ.
    ///
    /// # Safety
    /// V's rows of channels `cis` are valid and written by no one else.
    #[allow(clippy::too_many_arguments)]
    unsafe fn input(
        &self,
        x: &[f32],
        pre: Option<ImageAffine<'_>>,
        band: &Band,
        cis: std::ops::Range<usize>,
        cin: usize,
        v: *mut f32,
        nt: usize,
        tmp: &mut Vec<f32>,
    ) {
        input_tiles(self, x, pre, band, cis, cin, v, nt, tmp)
    }

    /// `Y = Aᵀ M A` of the band's tile rows `r0..r1` for the output channels
    /// `co0 .. co0 + rows`, whose products `M[ξ][co - co0][t]` (nt tiles
    /// each) are in `mm`; the epilogue fused, written into the image `out`
    /// `[cout, h, w]` row by row.
    ///
    /// # Safety
    /// `out` holds the image; no other thread writes those channels' rows
    /// `r0 * m .. r1 * m`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn output(
        &self,
        mm: &[f32],
        rows: usize,
        co0: usize,
        nt: usize,
        band: &Band,
        ep: &Epilogue<'_>,
        out: *mut f32,
        tmp: &mut Vec<f32>,
    ) {
        output_tiles(self, mm, rows, co0, nt, band, ep, out, tmp)
    }
}

/// `dst_r[t] = Σ_k c[r N + k] src[k][t]` for r < R, t < `len`, with
/// `dst_r = dst + r dst_stride`: one pass over [`L`] columns at a time with the N
/// source vectors and the R sums in registers. R, N and (through
/// [`Matrices`]) the coefficients are compile-time, so the loops unroll,
/// zero coefficients drop out and ±1 become additions (the same sums, in the
/// same order, as one pass per coefficient).
///
/// # Safety
/// The rows are valid for `len` values; destination rows overlap no source.
#[inline(always)]
unsafe fn apply<const R: usize, const N: usize>(
    c: &'static [f32],
    len: usize,
    src: [*const f32; N],
    dst: *mut f32,
    dst_stride: usize,
) {
    let full = len / L * L;
    let mut t = 0;
    while t < full {
        block::<R, N>(c, &src, t, dst.add(t), dst_stride);
        t += L;
    }
    if t < len {
        // the last columns through zero-padded copies, so that the loop
        // above keeps its vectors in registers (a partial copy into them
        // would put them in memory)
        let wd = len - t;
        let mut s = [[0f32; L]; N];
        for (sk, p) in s.iter_mut().zip(src) {
            sk[..wd].copy_from_slice(std::slice::from_raw_parts(p.add(t), wd));
        }
        let mut d = [[0f32; L]; R];
        let mut sp = [std::ptr::null::<f32>(); N];
        for (p, sk) in sp.iter_mut().zip(&s) {
            *p = sk.as_ptr();
        }
        block::<R, N>(c, &sp, 0, d.as_mut_ptr() as *mut f32, L);
        for (r, dr) in d.iter().enumerate() {
            std::slice::from_raw_parts_mut(dst.add(r * dst_stride + t), wd).copy_from_slice(&dr[..wd]);
        }
    }
}

/// Columns per pass of [`apply`].
const L: usize = 16;

/// [`apply`] on L columns: `dst + r dst_stride` (r < R) from `src[k] + t`.
///
/// # Safety
/// As [`apply`], for L values per row.
#[inline(always)]
unsafe fn block<const R: usize, const N: usize>(
    c: &'static [f32],
    src: &[*const f32; N],
    t: usize,
    dst: *mut f32,
    dst_stride: usize,
) {
    let mut s = [[0f32; L]; N];
    for (sk, p) in s.iter_mut().zip(src) {
        *sk = std::ptr::read_unaligned(p.add(t) as *const [f32; L]);
    }
    for r in 0..R {
        let mut acc = [0f32; L];
        for (k, sk) in s.iter().enumerate() {
            let ck = c[r * N + k];
            if ck != 0.0 {
                for (a, v) in acc.iter_mut().zip(sk) {
                    *a += ck * v;
                }
            }
        }
        std::ptr::write_unaligned(dst.add(r * dst_stride) as *mut [f32; L], acc);
    }
}

/// `dst[k gl + t] = src[t M + k]` for k < M and every whole tile t of
/// `src`: L tiles at a time through fixed-size arrays, which the compiler
/// turns into vector shuffles (M is a constant).
#[inline(always)]
fn deinterleave<const M: usize>(src: &[f32], dst: &mut [f32], gl: usize) {
    let tiles = src.len() / M;
    let full = tiles / L * L;
    for t0 in (0..full).step_by(L) {
        let mut g = [[0f32; L]; M];
        for (t, p) in src[t0 * M..(t0 + L) * M].chunks_exact(M).enumerate() {
            for (k, &v) in p.iter().enumerate() {
                g[k][t] = v;
            }
        }
        for (k, gk) in g.iter().enumerate() {
            dst[k * gl + t0..][..L].copy_from_slice(gk);
        }
    }
    for t in full..tiles {
        for k in 0..M {
            dst[k * gl + t] = src[t * M + k];
        }
    }
}

/// `dst[t M + c] = src[c tc + t]` for c < M, t < tc: [`deinterleave`]'s
/// inverse.
#[inline(always)]
fn interleave<const M: usize>(src: &[f32], tc: usize, dst: &mut [f32]) {
    let full = tc / L * L;
    for t0 in (0..full).step_by(L) {
        let mut g = [[0f32; L]; M];
        for (c, gc) in g.iter_mut().enumerate() {
            gc.copy_from_slice(&src[c * tc + t0..][..L]);
        }
        for (t, o) in dst[t0 * M..(t0 + L) * M].chunks_exact_mut(M).enumerate() {
            for (c, v) in o.iter_mut().enumerate() {
                *v = g[c][t];
            }
        }
    }
    for t in full..tc {
        for c in 0..M {
            dst[t * M + c] = src[c * tc + t];
        }
    }
}

/// A tile's input and output transforms as compile-time constants.
trait Matrices {
    /// Bᵀ, alpha x alpha
    const BT: &'static [f32];
    /// Aᵀ, m x alpha
    const AT: &'static [f32];
}

/// F(2,3)'s transforms.
struct F2;
/// F(4,3)'s transforms.
struct F4;

impl Matrices for F2 {
    const BT: &'static [f32] = &F2_BT;
    const AT: &'static [f32] = &F2_AT;
}

impl Matrices for F4 {
    const BT: &'static [f32] = &F4_BT;
    const AT: &'static [f32] = &F4_AT;
}

/// `N` row pointers `p + k stride`.
#[inline(always)]
fn rows<const N: usize>(p: *const f32, stride: usize) -> [*const f32; N] {
    let mut r = [p; N];
    for (k, q) in r.iter_mut().enumerate() {
        *q = p.wrapping_add(k * stride);
    }
    r
}

// This module's simd_fn! functions (input_tiles, output_tiles, kernel_row)
// write through raw pointers: `simd_fn!` makes safe functions only, so they
// stay private here and are called only from the unsafe `Tile` methods that
// state their contracts.

simd_fn! {
    /// [`Tile::input`]'s body (a free function for [`simd_fn`]), for the
    /// tile's compile-time sides.
    #[allow(clippy::too_many_arguments)]
    fn input_tiles(tile: &Tile, x: &[f32], pre: Option<ImageAffine<'_>>, band: &Band, cis: std::ops::Range<usize>, cin: usize, v: *mut f32, nt: usize, tmp: &mut Vec<f32>) {
        match tile.m {
            2 => input_m::<F2, 2, 4>(x, pre, band, cis, cin, v, nt, tmp),
            _ => input_m::<F4, 4, 6>(x, pre, band, cis, cin, v, nt, tmp),
        }
    }
}

/// [`input_tiles`] for F(M, 3), AL = M + 2.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn input_m<T: Matrices, const M: usize, const AL: usize>(
    x: &[f32],
    pre: Option<ImageAffine<'_>>,
    band: &Band,
    cis: std::ops::Range<usize>,
    cin: usize,
    v: *mut f32,
    nt: usize,
    tmp: &mut Vec<f32>,
) {
    let Band { h, w, r0, r1, up } = *band;
    let tc = w.div_ceil(M);
    // the source plane's sides (an upsampled input: half the image's)
    let (sh, sw) = if up { (h / 2, w / 2) } else { (h, w) };
    // padded input row (one tile's worth beyond the last), M columns gathered
    // (tc + 1 values each: column M + k of tile t is column k of tile t + 1),
    // AL x AL horizontal sums
    let prow_len = (tc + 1) * M;
    let gl = tc + 1;
    tmp.resize(prow_len + M * gl + AL * AL * tc + if up { sw } else { 0 }, 0.0);
    let (prow, rest) = tmp.split_at_mut(prow_len);
    let (gat, rest) = rest.split_at_mut(M * gl);
    // hz, then (upsampling) one normalised source row
    let (hz, half) = rest.split_at_mut(AL * AL * tc);
    // horizontal sources: gathered column k (k < M), else column k - M one tile on
    let mut src = [gat.as_ptr(); AL];
    for (k, p) in src.iter_mut().enumerate() {
        *p = if k < M { gat[k * gl..].as_ptr() } else { gat[(k - M) * gl + 1..].as_ptr() };
    }
    for ci in cis {
        let plane = &x[ci * sh * sw..(ci + 1) * sh * sw];
        for tr in r0..r1 {
            let t0 = (tr - r0) * tc;
            // the last AL - M input rows of a tile row are the first of the
            // next, so only M rows are new: row g of the band (g = (tr - r0)
            // M + i) keeps its horizontal sums in slot g % AL of hz, where
            // the next tile row finds them (AL consecutive rows, AL slots)
            let slot = |i: usize| ((tr - r0) * M + i) % AL;
            let new_from = if tr == r0 { 0 } else { AL - M };
            for i in new_from..AL {
                let y = (tr * M + i) as isize - 1;
                if y < 0 || y as usize >= h {
                    prow.fill(0.0);
                } else if up {
                    // image row y is source row y / 2 with each value twice
                    let mut src = &plane[y as usize / 2 * sw..][..sw];
                    if let Some(p) = pre {
                        p.row(ci, src, &mut half[..sw]);
                        src = &half[..sw];
                    }
                    prow[0] = 0.0;
                    for (d, &v) in prow[1..1 + 2 * sw].chunks_exact_mut(2).zip(src) {
                        d[0] = v;
                        d[1] = v;
                    }
                    prow[1 + 2 * sw..].fill(0.0);
                } else {
                    let n = w.min(prow_len - 1);
                    prow[0] = 0.0;
                    let src = &plane[y as usize * w..][..n];
                    match pre {
                        Some(p) => p.row(ci, src, &mut prow[1..1 + n]),
                        None => prow[1..1 + n].copy_from_slice(src),
                    }
                    prow[1 + n..].fill(0.0);
                }
                // gat[k][t] = prow[t M + k]
                deinterleave::<M>(prow, gat, gl);
                // hz[i][bb][t] = Σ_k Bᵀ[bb][k] gat[k][t]
                // SAFETY: gat (M rows of tc + 1 values, the sources reading
                // tc from offset 0 or 1) and hz (AL² rows of tc) are disjoint
                // parts of tmp, which was resized to hold them
                unsafe { apply::<AL, AL>(T::BT, tc, src, hz.as_mut_ptr().add(slot(i) * AL * tc), tc) };
            }
            // V[a AL + bb][ci][t0 + t] = Σ_i Bᵀ[a][i] hz[slot(i)][bb][t]
            for bb in 0..AL {
                let mut hzr = [hz.as_ptr(); AL];
                for (i, r) in hzr.iter_mut().enumerate() {
                    *r = hz.as_ptr().wrapping_add((slot(i) * AL + bb) * tc);
                }
                // SAFETY: the caller's contract (Tile::input): V's rows of
                // channel ci are valid and written by this call alone; each
                // of hz's rows (tc values from (slot AL + bb) tc) lies inside it
                unsafe { apply::<AL, AL>(T::BT, tc, hzr, v.add((bb * cin + ci) * nt + t0), AL * cin * nt) };
            }
        }
    }
}

simd_fn! {
    /// [`Tile::output`]'s body (a free function for [`simd_fn`]), for the
    /// tile's compile-time sides.
    #[allow(clippy::too_many_arguments)]
    fn output_tiles(tile: &Tile, mm: &[f32], rows: usize, co0: usize, nt: usize, band: &Band, ep: &Epilogue<'_>, out: *mut f32, tmp: &mut Vec<f32>) {
        match tile.m {
            2 => output_m::<F2, 2, 4>(mm, rows, co0, nt, band, ep, out, tmp),
            _ => output_m::<F4, 4, 6>(mm, rows, co0, nt, band, ep, out, tmp),
        }
    }
}

/// [`output_tiles`] for F(M, 3), AL = M + 2.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_m<T: Matrices, const M: usize, const AL: usize>(
    mm: &[f32],
    n_rows: usize,
    co0: usize,
    nt: usize,
    band: &Band,
    ep: &Epilogue<'_>,
    out: *mut f32,
    tmp: &mut Vec<f32>,
) {
    let (Band { h, w, r0, r1, .. }, Epilogue { bias, relu, residual }) = (*band, *ep);
    let tc = w.div_ceil(M);
    assert!(mm.len() >= AL * AL * n_rows * nt);
    // sh[a][c][t] (AL x M x tc), y[rr][c][t] (M x M x tc), one output row
    let sh_len = AL * M * tc;
    tmp.resize(sh_len + M * M * tc + M * tc, 0.0);
    let (sh, rest) = tmp.split_at_mut(sh_len);
    let (yt, orow) = rest.split_at_mut(M * M * tc);
    for r in 0..n_rows {
        let co = co0 + r;
        let bias = bias[co];
        for tr in r0..r1 {
            let t0 = (tr - r0) * tc;
            // SAFETY: mm holds AL² x rows x nt values (asserted); sh and yt
            // are disjoint parts of tmp, resized to hold them
            unsafe {
                // sh[a][c][t] = Σ_bb Aᵀ[c][bb] M[a AL + bb][r][t]
                for a in 0..AL {
                    let m0 = mm.as_ptr().add((a * AL * n_rows + r) * nt + t0);
                    apply::<M, AL>(T::AT, tc, rows(m0, n_rows * nt), sh.as_mut_ptr().add(a * M * tc), tc);
                }
                // y[rr][c][t] = Σ_a Aᵀ[rr][a] sh[a][c][t]
                for c in 0..M {
                    apply::<M, AL>(
                        T::AT,
                        tc,
                        rows(sh.as_ptr().add(c * tc), M * tc),
                        yt.as_mut_ptr().add(c * tc),
                        M * tc,
                    );
                }
            }
            for rr in 0..M {
                let oy = tr * M + rr;
                if oy >= h {
                    break;
                }
                // orow[t M + c] = y[rr][c][t]
                interleave::<M>(&yt[rr * M * tc..][..M * tc], tc, &mut orow[..tc * M]);
                // SAFETY: the caller's contract (Tile::output): `out` holds
                // the image and no other thread writes channel co's rows
                // of tile rows r0..r1
                let dst = unsafe { std::slice::from_raw_parts_mut(out.add((co * h + oy) * w), w) };
                let y = &orow[..w];
                match (relu, residual) {
                    (false, Residual::None) => dst.iter_mut().zip(y).for_each(|(d, y)| *d = y + bias),
                    (true, Residual::None) => dst.iter_mut().zip(y).for_each(|(d, y)| *d = (y + bias).max(0.0)),
                    (false, Residual::From(r)) => {
                        let rr = &r[(co * h + oy) * w..][..w];
                        dst.iter_mut().zip(y).zip(rr).for_each(|((d, y), r)| *d = y + bias + r)
                    }
                    (true, Residual::From(r)) => {
                        let rr = &r[(co * h + oy) * w..][..w];
                        dst.iter_mut().zip(y).zip(rr).for_each(|((d, y), r)| *d = (y + bias).max(0.0) + r)
                    }
                    // the residual is the value being replaced
                    (false, Residual::Out) => dst.iter_mut().zip(y).for_each(|(d, y)| *d += y + bias),
                    (true, Residual::Out) => dst.iter_mut().zip(y).for_each(|(d, y)| *d += (y + bias).max(0.0)),
                }
            }
        }
    }
}

/// Input channels `c0 .. c0 + n` (n <= 16) of [`kernel_row`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kernel_chunk(
    wt: &[f32],
    cin: usize,
    ga: [f32; 3],
    g: &[f32],
    alpha: usize,
    dst: *mut f32,
    stride: usize,
    c0: usize,
    n: usize,
) {
    let mut gg = [[0f32; 16]; 3];
    for (j, ggj) in gg.iter_mut().enumerate() {
        for (i, &c) in ga.iter().enumerate() {
            let src = &wt[(3 * i + j) * cin + c0..][..n];
            for (v, s) in ggj.iter_mut().zip(src) {
                *v += c * s;
            }
        }
    }
    for b in 0..alpha {
        let gb = [g[b * 3], g[b * 3 + 1], g[b * 3 + 2]];
        // SAFETY: the caller's contract (see Tile::kernel_row): dst + b stride
        // holds cin values for b < alpha, written by no one else; kernel_chunk
        // and kernel_row are safe fns only because they are private to this
        // module and reached only through the unsafe Tile::kernel_row
        let d = unsafe { std::slice::from_raw_parts_mut(dst.add(b * stride + c0), n) };
        for (l, v) in d.iter_mut().enumerate() {
            *v = gb[0] * gg[0][l] + gb[1] * gg[1][l] + gb[2] * gg[2][l];
        }
    }
}

simd_fn! {
    /// [`Tile::kernel_row`] in one pass over the input channels, 16 at a
    /// time: `(G g)[a][j] = Σ_i ga[i] g[i][j]`, then `U[a][b] = Σ_j
    /// (G g)[a][j] G[b][j]` for b < alpha, in registers.
    fn kernel_row(wt: &[f32], cin: usize, ga: &[f32], g: &[f32], alpha: usize, dst: *mut f32, stride: usize) {
        let ga = [ga[0], ga[1], ga[2]];
        let full = cin / 16 * 16;
        for c0 in (0..full).step_by(16) {
            kernel_chunk(wt, cin, ga, g, alpha, dst, stride, c0, 16);
        }
        if full < cin {
            kernel_chunk(wt, cin, ga, g, alpha, dst, stride, full, cin - full);
        }
    }
}

/// `wt[tap][ci]` (tap = 3 i + j) of one output channel's `[cin][3][3]` weights.
fn transpose_kernel(weight_co: &[f32], cin: usize, wt: &mut [f32]) {
    for (ci, k) in weight_co[..cin * 9].chunks_exact(9).enumerate() {
        for (tap, &v) in k.iter().enumerate() {
            wt[tap * cin + ci] = v;
        }
    }
}

/// A 3x3 layer's transformed weights and the output tile size.
#[derive(Debug)]
pub struct Winograd {
    tile: Tile,
    /// `U[ξ][co][ci]`, ξ = row * alpha + column of the transformed kernel
    u: Vec<f32>,
    cin: usize,
    cout: usize,
    /// the arithmetic of the products `U_ξ V_ξ`
    math: Math,
    /// each `U_ξ` packed for the bf16 GEMM (bf16 math on an AVX512_BF16 CPU)
    packed: Vec<super::bf16::Packed>,
}

/// A thread's working buffers, kept from call to call (fresh ones each
/// call cost the kernel clearing their pages: several MB a band).
#[derive(Default)]
struct Scratch {
    /// transformed input tiles of a band
    v: Vec<f32>,
    /// the products `M_ξ`
    mm: Vec<f32>,
    /// the transforms' rows
    tmp: Vec<f32>,
    /// [`run_streamed`]: a block's weights `[co][tap][ci]` and one row of U
    wt: Vec<f32>,
    u: Vec<f32>,
    /// [`Winograd::for_call`]: the last one's U
    spare_u: Vec<f32>,
}

/// Largest U that [`Winograd::recycle`] keeps: SD's 512-channel layers
/// (38 MB in F(4,3)), not the hundreds of MB of its UNet's widest layers
/// on large frames.
const SPARE_U_BYTES: usize = 64 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

impl Winograd {
    /// Transform `weight` `[cout, cin, 3, 3]` (row-major f32) for F(m x m, 3 x 3),
    /// m = 2 or 4.
    pub fn new(weight: &[f32], cout: usize, cin: usize, m: usize) -> Self {
        let n = (m + 2) * (m + 2) * cout * cin;
        Self::transform_into(weight, cout, cin, m, activation(n))
    }

    /// [`Winograd::new`] for one call: U in the buffer that the last such
    /// call on this thread handed back ([`Winograd::recycle`]), not in fresh
    /// pages (38 MB a call for SD's 512-channel VAE layers, whose clearing
    /// by the kernel took 0.4 % of the full model's time at 512x512).
    pub fn for_call(weight: &[f32], cout: usize, cin: usize, m: usize) -> Self {
        let spare = SCRATCH.with_borrow_mut(|s| std::mem::take(&mut s.spare_u));
        Self::transform_into(weight, cout, cin, m, spare)
    }

    /// Keep U's buffer for this thread's next [`Winograd::for_call`] (if
    /// at most [`SPARE_U_BYTES`]).
    pub fn recycle(self) {
        if self.u.len() * 4 <= SPARE_U_BYTES {
            SCRATCH.with_borrow_mut(|s| s.spare_u = self.u);
        }
    }

    /// The transform of `weight` into `u` (any length: every value of the
    /// result is written, none read).
    fn transform_into(weight: &[f32], cout: usize, cin: usize, m: usize, mut u: Vec<f32>) -> Self {
        let tile = Tile::new(m);
        let alpha = tile.alpha;
        let plane = cout * cin;
        u.truncate(alpha * alpha * plane);
        u.resize(alpha * alpha * plane, 0.0);
        let u_ptr = SendPtr(u.as_mut_ptr());
        // U_ξ[co][..] = (G g Gᵀ)[a][b], ξ = a alpha + b; one output channel per task
        (0..cout).into_par_iter().for_each_init(
            || vec![0f32; 9 * cin],
            |wt, co| {
                let u_ptr = u_ptr;
                transpose_kernel(&weight[co * cin * 9..], cin, wt);
                for a in 0..alpha {
                    // SAFETY: u holds alpha² planes of cout * cin values and
                    // outlives this blocking loop; task co alone writes
                    // U_ξ[co][..] (cin values at co cin of each plane)
                    unsafe { tile.kernel_row(wt, cin, a, u_ptr.0.add(a * alpha * plane + co * cin), plane) };
                }
            },
        );
        Self { tile, u, cin, cout, math: Math::F32, packed: Vec::new() }
    }

    /// The same transform with the products in `math`.
    pub fn with_math(mut self, math: Math) -> Self {
        self.math = math;
        let plane = self.cout * self.cin;
        self.packed = match math {
            Math::Bf16 => (0..self.u.len() / plane)
                .map_while(|xi| super::bf16::Packed::lhs(&self.u[xi * plane..], self.cout, self.cin, self.cin, 1))
                .collect(),
            Math::F32 => Vec::new(),
        };
        self
    }

    /// Tile rows per band: the transformed input and output of a band within
    /// [`BAND_BYTES`], at most the frame's, fewer when that leaves threads idle.
    fn band_rows(&self, b: usize, h: usize, w: usize) -> usize {
        let (m, al) = (self.tile.m, self.tile.alpha);
        let tile_rows = h.div_ceil(m);
        let tiles_per_row = w.div_ceil(m);
        let per_row = al * al * (self.cin + self.cout) * tiles_per_row * 4;
        let least = BAND_MIN_TILES.div_ceil(tiles_per_row.max(1));
        let mut rows = (BAND_BYTES / per_row.max(1)).max(least).clamp(1, tile_rows);
        let threads = rayon::current_num_threads().max(1);
        while rows > 1 && b * tile_rows.div_ceil(rows) < 2 * threads {
            rows = rows.div_ceil(2);
        }
        rows
    }

    /// `out` = act(conv(x) + bias) (+ residual), x `[b, cin, h, w]`, out
    /// `[b, cout, h, w]` (its values before are read only as
    /// [`Residual::Out`]), in bands of tile rows on the rayon pool. `up`: x is
    /// `[b, cin, h / 2, w / 2]` (h, w even) and the layer's input its 2x
    /// nearest upsampling, read as the input transform goes (never written).
    #[allow(clippy::too_many_arguments)]
    pub fn run_into(
        &self,
        x: &[f32],
        up: bool,
        b: usize,
        h: usize,
        w: usize,
        bias: &[f32],
        relu: bool,
        residual: Residual<'_>,
        pre: Option<&ChannelAffine>,
        out: &mut [f32],
    ) {
        let (cin, cout) = (self.cin, self.cout);
        assert!(
            !up || (h.is_multiple_of(2) && w.is_multiple_of(2)),
            "Winograd: a {h}x{w} upsampling of a half-size input"
        );
        let hw_in = if up { h * w / 4 } else { h * w };
        check_sizes(x, b * cin * hw_in, residual, out, b * cout * h * w, bias, cout);
        check_pre(pre, b * cin);
        let rows = self.band_rows(b, h, w);
        let tile_rows = h.div_ceil(self.tile.m);
        let bands: Vec<(usize, usize)> =
            (0..b).flat_map(|bi| (0..tile_rows).step_by(rows).map(move |r0| (bi, r0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        bands.par_iter().for_each(|&(bi, r0)| {
            let out_ptr = out_ptr;
            let r1 = (r0 + rows).min(tile_rows);
            let xb = &x[bi * cin * hw_in..(bi + 1) * cin * hw_in];
            let ep = Epilogue { bias, relu, residual: residual.image(bi, cout * h * w) };
            let pre = pre.map(|p| p.image(bi, cin));
            // SAFETY: `out` holds b * cout * h * w values and outlives this
            // blocking loop; bands write disjoint output rows of image bi
            SCRATCH.with_borrow_mut(|s| unsafe {
                self.band(xb, pre, &Band { h, w, r0, r1, up }, &ep, out_ptr.0.add(bi * cout * h * w), s)
            })
        });
    }

    /// One band: tile rows `r0..r1` of one image.
    ///
    /// # Safety
    /// `out` holds `cout * h * w` values; no other thread writes rows
    /// `r0 * m .. r1 * m` of it.
    unsafe fn band(
        &self,
        x: &[f32],
        pre: Option<ImageAffine<'_>>,
        band: &Band,
        ep: &Epilogue<'_>,
        out: *mut f32,
        s: &mut Scratch,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let a2 = self.tile.alpha * self.tile.alpha;
        let nt = (band.r1 - band.r0) * band.w.div_ceil(self.tile.m);
        s.v.resize(a2 * cin * nt, 0.0);
        s.mm.resize(a2 * cout * nt, 0.0);
        // 1. V[ξ][ci][t] = (Bᵀ d B) of every input tile
        self.tile.input(x, pre, band, 0..cin, cin, s.v.as_mut_ptr(), nt, &mut s.tmp);
        // 2. M_ξ = U_ξ V_ξ: [cout x cin] x [cin x nt]
        for xi in 0..a2 {
            if let Some(p) = self.packed.get(xi) {
                let (dst, v) = (s.mm.as_mut_ptr().add(xi * cout * nt), s.v.as_ptr().add(xi * cin * nt));
                super::bf16::gemm_packed_lhs(p, 0, cout, nt, Mat::new(dst, nt, 1), Mat::new(v, nt, 1));
                continue;
            }
            gemm_strided(
                self.math,
                cout,
                nt,
                cin,
                false,
                s.mm.as_mut_ptr().add(xi * cout * nt),
                nt,
                1,
                self.u.as_ptr().add(xi * cout * cin),
                cin,
                1,
                s.v.as_ptr().add(xi * cin * nt),
                nt,
                1,
            );
        }
        // 3. Y = Aᵀ M A per tile, bias / ReLU / residual, written row by row
        self.tile.output(&s.mm, cout, 0, nt, band, ep, out, &mut s.tmp);
    }
}

/// Output channels per task of [`run_streamed`].
const STREAM_BLOCK: usize = 64;
/// Largest transformed input (bytes, one image) that [`run_streamed`] takes;
/// [`streams`] says whether a frame fits.
const STREAM_V_BYTES: usize = 24 << 20;

/// Whether [`run_streamed`] takes a `cin`-channel `h x w` frame for F(m,3).
pub fn streams(cin: usize, h: usize, w: usize, m: usize) -> bool {
    (m + 2) * (m + 2) * cin * h.div_ceil(m) * w.div_ceil(m) * 4 <= STREAM_V_BYTES
}

/// F(m x m, 3 x 3) of a layer that does not keep its transformed weights,
/// on a frame small enough that all its input tiles are transformed at once
/// ([`streams`]): each task takes a block of output channels, transforms
/// their weights one row of U at a time (alpha of the alpha² products, a few
/// hundred kB that stay in cache), multiplies them with the shared input
/// tiles and writes its channels' outputs. No transformed kernel is ever
/// whole in memory, which is what made per-call transforms too slow for
/// SD's 640- and 1280-channel layers at 8x8 to 32x32 px.
/// It writes `out` as [`Winograd::run_into`] does.
#[allow(clippy::too_many_arguments)]
pub fn run_streamed(
    math: Math,
    weight: &[f32],
    cout: usize,
    cin: usize,
    m: usize,
    x: &[f32],
    b: usize,
    h: usize,
    w: usize,
    bias: &[f32],
    relu: bool,
    residual: Residual<'_>,
    pre: Option<&ChannelAffine>,
    out: &mut [f32],
) {
    assert!(weight.len() >= cout * cin * 9, "Winograd: {} weights for {cout} x {cin} x 3 x 3", weight.len());
    check_sizes(x, b * cin * h * w, residual, out, b * cout * h * w, bias, cout);
    check_pre(pre, b * cin);
    let tile = Tile::new(m);
    let al = tile.alpha;
    let a2 = al * al;
    let tile_rows = h.div_ceil(m);
    let nt = tile_rows * w.div_ceil(m);
    let mut v = vec![0f32; a2 * cin * nt];
    let threads = rayon::current_num_threads().max(1);
    let chunk = cin.div_ceil(4 * threads).max(1);
    // every tile row of the image at once
    let all = Band { h, w, r0: 0, r1: tile_rows, up: false };
    for bi in 0..b {
        let xb = &x[bi * cin * h * w..(bi + 1) * cin * h * w];
        // 1. every input tile, channels in parallel
        let v_ptr = SendPtr(v.as_mut_ptr());
        (0..cin.div_ceil(chunk)).into_par_iter().for_each(|k| {
            let v_ptr = v_ptr;
            let cis = k * chunk..((k + 1) * chunk).min(cin);
            let pre = pre.map(|p| p.image(bi, cin));
            // SAFETY: v holds alpha² * cin * nt values and outlives this
            // blocking loop; chunks write disjoint channel rows of V
            SCRATCH.with_borrow_mut(|s| unsafe { tile.input(xb, pre, &all, cis, cin, v_ptr.0, nt, &mut s.tmp) })
        });
        // 2. blocks of output channels in parallel
        let v = &v;
        // SAFETY: bi < b and out holds b * cout * h * w values
        let out_ptr = SendPtr(unsafe { out.as_mut_ptr().add(bi * cout * h * w) });
        let ep = Epilogue { bias, relu, residual: residual.image(bi, cout * h * w) };
        (0..cout.div_ceil(STREAM_BLOCK)).into_par_iter().for_each(|blk| {
            SCRATCH.with_borrow_mut(|s| {
                let out_ptr = out_ptr;
                let co0 = blk * STREAM_BLOCK;
                let rows = STREAM_BLOCK.min(cout - co0);
                s.wt.resize(rows * 9 * cin, 0.0);
                s.u.resize(al * rows * cin, 0.0);
                s.mm.resize(a2 * rows * nt, 0.0);
                for r in 0..rows {
                    transpose_kernel(&weight[(co0 + r) * cin * 9..], cin, &mut s.wt[r * 9 * cin..][..9 * cin]);
                }
                for a in 0..al {
                    // U[bb][r][ci] of ξ = a alpha + bb, then its alpha products
                    for r in 0..rows {
                        // SAFETY: s.u holds alpha planes of rows * cin values; row r
                        // of each is written by this call alone (s is this thread's)
                        unsafe {
                            tile.kernel_row(
                                &s.wt[r * 9 * cin..][..9 * cin],
                                cin,
                                a,
                                s.u.as_mut_ptr().add(r * cin),
                                rows * cin,
                            )
                        };
                    }
                    for bb in 0..al {
                        let xi = a * al + bb;
                        // SAFETY: the three matrices lie within s.mm, s.u and v
                        unsafe {
                            gemm_strided(
                                math,
                                rows,
                                nt,
                                cin,
                                false,
                                s.mm.as_mut_ptr().add(xi * rows * nt),
                                nt,
                                1,
                                s.u.as_ptr().add(bb * rows * cin),
                                cin,
                                1,
                                v.as_ptr().add(xi * cin * nt),
                                nt,
                                1,
                            )
                        };
                    }
                }
                // SAFETY: out_ptr is image bi of `out`, which outlives this
                // blocking loop; this block alone writes channels co0..co0 + rows
                unsafe { tile.output(&s.mm, rows, co0, nt, &all, &ep, out_ptr.0, &mut s.tmp) };
            })
        });
    }
}

/// A norm fused into the input has a channel's coefficients for each of
/// the `n` (batch x input) channels.
fn check_pre(pre: Option<&ChannelAffine>, n: usize) {
    assert!(pre.is_none_or(|p| p.ab.len() == n), "Winograd: a fused norm of another shape");
}

/// The lengths the Winograd paths write and read through raw pointers,
/// checked: input `nx`, output and residual `ny` values, a bias per output
/// channel.
fn check_sizes(x: &[f32], nx: usize, residual: Residual<'_>, out: &[f32], ny: usize, bias: &[f32], cout: usize) {
    assert!(x.len() >= nx, "Winograd: input of {} values, {nx} expected", x.len());
    assert!(out.len() == ny, "Winograd: output of {} values, {ny} expected", out.len());
    assert!(!matches!(residual, Residual::From(r) if r.len() < ny), "Winograd: residual shorter than the output");
    assert!(bias.len() >= cout, "Winograd: {} biases for {cout} channels", bias.len());
}

#[cfg(test)]
mod tests {
    use super::super::tests::{conv_case, max_err};
    use super::super::{winograd_enabled, ConvOp};
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn per_call_transforms_reuse_the_last_buffer_and_overwrite_all_of_it() {
        let mut seed = 3u32;
        let mut weights = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        for m in [2, 4] {
            // a larger layer first, then a smaller one in its buffer, then a
            // larger one again (the buffer grows)
            let (w1, w2, w3) = (weights(48 * 40 * 9), weights(16 * 24 * 9), weights(64 * 48 * 9));
            let first = Winograd::for_call(&w1, 48, 40, m);
            let ptr = first.u.as_ptr();
            first.recycle();
            let second = Winograd::for_call(&w2, 16, 24, m);
            assert_eq!(second.u.as_ptr(), ptr, "F({m},3): the buffer is reused");
            let fresh = Winograd::new(&w2, 16, 24, m);
            assert_eq!(second.u.len(), fresh.u.len());
            assert!(second.u.iter().zip(&fresh.u).all(|(a, b)| a.to_bits() == b.to_bits()), "F({m},3)");
            second.recycle();
            let third = Winograd::for_call(&w3, 64, 48, m);
            let fresh = Winograd::new(&w3, 64, 48, m);
            assert!(third.u.iter().zip(&fresh.u).all(|(a, b)| a.to_bits() == b.to_bits()), "F({m},3)");
            assert_eq!(third.u.len(), fresh.u.len());
        }
    }

    #[test]
    fn winograd_matches_candle() {
        // F(2,3) and F(4,3); frames not a multiple of the tile, narrower and
        // shorter than one tile, one pixel; batch 2; bias, ReLU, residual
        let dev = Device::Cpu;
        for (cin, cout, h, w) in [
            (32, 32, 17, 9),
            (40, 33, 5, 70),
            (64, 48, 1, 1),
            (32, 64, 9, 3),
            (33, 32, 23, 31),
            (128, 128, 48, 40),
            (24, 150, 7, 10),
        ] {
            let [x, wt, b, r, reference, relu_res] = conv_case(cin, cout, h, w);
            // outputs have a standard deviation of sqrt(9 cin)
            let scale = (9.0 * cin as f32).sqrt();
            for m in [2, 4] {
                let plain = ConvOp::from_tensors(&wt, Some(&b), false).unwrap().gemm_only().with_winograd(Some(m));
                assert!(plain.is_winograd());
                let err = max_err(&x.apply_op1_no_bwd(&plain).unwrap(), &reference) / scale;
                let relu = ConvOp::from_tensors(&wt, Some(&b), true).unwrap().gemm_only().with_winograd(Some(m));
                let err_res = max_err(&x.apply_op2_no_bwd(&r, &relu).unwrap(), &relu_res) / scale;
                eprintln!(
                    "F({m},3) {cin}->{cout} {h}x{w}: relative error {err:.1e}, with ReLU + residual {err_res:.1e}"
                );
                // measured: F(2,3) ~2e-6, F(4,3) ~1.5e-5 (its transforms' constants
                // up to 8 cost precision); im2col + GEMM ~1e-6
                let tol = if m == 2 { 1e-5 } else { 6e-5 };
                assert!(err < tol && err_res < tol, "F({m},3) {cin}->{cout} {h}x{w}: {err} / {err_res}");
                // the path of layers too wide to keep their transform: blocks of
                // output channels, weights transformed on the fly
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (xs, ws, bs, rs) = (v(&x), v(&wt), v(&b), v(&r));
                let mut streamed = vec![f32::NAN; 2 * cout * h * w];
                run_streamed(
                    Math::F32,
                    &ws,
                    cout,
                    cin,
                    m,
                    &xs,
                    2,
                    h,
                    w,
                    &bs,
                    true,
                    Residual::From(&rs),
                    None,
                    &mut streamed,
                );
                let streamed = Tensor::from_vec(streamed, (2, cout, h, w), &dev).unwrap();
                let err_streamed = max_err(&streamed, &relu_res) / scale;
                assert!(err_streamed < tol, "streamed F({m},3) {cin}->{cout} {h}x{w}: {err_streamed}");
            }
        }
        // wide layers take it by default, narrow ones do not
        let wide = Tensor::randn(0f32, 1., (128, 256, 3, 3), &dev).unwrap();
        assert_eq!(ConvOp::from_tensors(&wide, None, false).unwrap().is_winograd(), winograd_enabled());
        let narrow = Tensor::randn(0f32, 1., (32, 256, 3, 3), &dev).unwrap();
        assert!(!ConvOp::from_tensors(&narrow, None, false).unwrap().is_winograd());
    }
}
