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
//! F(4,3)), too much to keep for SD's UNet and VAE, so each call transforms
//! the layer's weights afresh (about 1 % of the layer's time) and drops them.
//!
//! Which tile, by frame size ([`tile_for`]; `cargo run --release --example
//! bench_kernels`, 2 threads): F(4,3) from 32x32 px (1.3-2x faster than
//! im2col + GEMM on SD's VAE and UNet layers at 512x512), F(2,3) from 12x12,
//! else none; layers too wide to keep their transform (1280 channels at
//! 16x16: F(2,3) 27 ms with the transform kept, 89 ms transforming on each
//! call, GEMM 44 ms) take F(4,3) only from 64x64.
//!
//! Layout: NCHW f32, zero padding 1, bias, ReLU and residual fused into the
//! output transform, as [`super::ConvOp`]'s other paths.
use rayon::prelude::*;

use super::{activation, gemm_strided, SendPtr};

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

/// The output tile side m to use on an `h x w` frame, if any (see the module
/// notes for the measurements behind it); `kept`: the layer keeps its
/// transformed weights, else each call pays for the transform, which only a
/// large frame repays.
pub fn tile_for(h: usize, w: usize, kept: bool) -> Option<usize> {
    match (h * w, kept) {
        (n, true) if n >= 32 * 32 => Some(4),
        (n, true) if n >= 12 * 12 => Some(2),
        (n, false) if n >= 64 * 64 => Some(4),
        _ => None,
    }
}

/// `dst = Σ_k coeffs[k] src(k)` over equally long rows, skipping zero
/// coefficients (the transforms' matrices are sparse).
#[inline]
fn combine<'a>(dst: &mut [f32], coeffs: &[f32], src: impl Fn(usize) -> &'a [f32]) {
    dst.fill(0.0);
    for (k, &c) in coeffs.iter().enumerate() {
        if c != 0.0 {
            dst.iter_mut().zip(src(k)).for_each(|(d, s)| *d += c * s);
        }
    }
}

/// A 3x3 layer's transformed weights and the output tile size.
#[derive(Debug)]
pub struct Winograd {
    /// output tile side m (2 or 4); the input tile is alpha = m + 2
    m: usize,
    alpha: usize,
    bt: &'static [f32],
    at: &'static [f32],
    /// `U[ξ][co][ci]`, ξ = row * alpha + column of the transformed kernel
    u: Vec<f32>,
    cin: usize,
    cout: usize,
}

/// Per-thread scratch of one band.
#[derive(Default)]
pub struct Scratch {
    v: Vec<f32>,
    mm: Vec<f32>,
    tmp: Vec<f32>,
}

impl Winograd {
    /// Transform `weight` `[cout, cin, 3, 3]` (row-major f32) for F(m x m, 3 x 3),
    /// m = 2 or 4.
    pub fn new(weight: &[f32], cout: usize, cin: usize, m: usize) -> Self {
        let (bt, g, at): (&'static [f32], &[f32], &'static [f32]) = match m {
            2 => (&F2_BT, &F2_G, &F2_AT),
            4 => (&F4_BT, &F4_G, &F4_AT),
            _ => panic!("Winograd F({m},3) is not implemented (2 or 4)"),
        };
        let alpha = m + 2;
        let plane = cout * cin;
        let mut u = activation(alpha * alpha * plane);
        let u_ptr = SendPtr(u.as_mut_ptr());
        // U_ξ[co][ci] = (G g Gᵀ)[a][b], ξ = a alpha + b; one output channel per task
        (0..cout).into_par_iter().for_each(|co| {
            let u_ptr = u_ptr;
            let mut gg = [0f32; 18];
            for ci in 0..cin {
                let k = &weight[(co * cin + ci) * 9..][..9];
                // (G g)[a][j] = Σ_i G[a][i] g[i][j]
                for a in 0..alpha {
                    for j in 0..3 {
                        gg[a * 3 + j] = g[a * 3] * k[j] + g[a * 3 + 1] * k[3 + j] + g[a * 3 + 2] * k[6 + j];
                    }
                }
                for a in 0..alpha {
                    let r = &gg[a * 3..a * 3 + 3];
                    for b in 0..alpha {
                        let v = r[0] * g[b * 3] + r[1] * g[b * 3 + 1] + r[2] * g[b * 3 + 2];
                        // SAFETY: task co alone writes U_ξ[co][..]
                        unsafe { *u_ptr.0.add((a * alpha + b) * plane + co * cin + ci) = v };
                    }
                }
            }
        });
        Self { m, alpha, bt, at, u, cin, cout }
    }

    /// Tile rows per band: the transformed input and output of a band within
    /// [`BAND_BYTES`], at most the frame's, fewer when that leaves threads idle.
    fn band_rows(&self, b: usize, h: usize, w: usize) -> usize {
        let a2 = self.alpha * self.alpha;
        let tile_rows = h.div_ceil(self.m);
        let tiles_per_row = w.div_ceil(self.m);
        let per_row = a2 * (self.cin + self.cout) * tiles_per_row * 4;
        let mut rows = (BAND_BYTES / per_row.max(1)).clamp(1, tile_rows);
        let threads = rayon::current_num_threads().max(1);
        while rows > 1 && b * tile_rows.div_ceil(rows) < 2 * threads {
            rows = rows.div_ceil(2);
        }
        rows
    }

    /// y = act(conv(x) + bias) (+ residual), x `[b, cin, h, w]`, in bands of
    /// tile rows on the rayon pool.
    #[allow(clippy::too_many_arguments)]
    pub fn run(&self, x: &[f32], b: usize, h: usize, w: usize, bias: &[f32], relu: bool, residual: Option<&[f32]>) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        let mut out = activation(b * cout * h * w);
        let rows = self.band_rows(b, h, w);
        let tile_rows = h.div_ceil(self.m);
        let bands: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..tile_rows).step_by(rows).map(move |r0| (bi, r0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        bands.par_iter().for_each_init(Scratch::default, |s, &(bi, r0)| {
            let out_ptr = out_ptr;
            let r1 = (r0 + rows).min(tile_rows);
            let xb = &x[bi * cin * h * w..(bi + 1) * cin * h * w];
            let res = residual.map(|r| &r[bi * cout * h * w..(bi + 1) * cout * h * w]);
            // SAFETY: bands write disjoint output rows of image bi
            unsafe { self.band(xb, h, w, r0, r1, bias, relu, res, out_ptr.0.add(bi * cout * h * w), s) }
        });
        out
    }

    /// One band: tile rows `r0..r1` of one image.
    ///
    /// # Safety
    /// `out` holds `cout * h * w` values; no other thread writes rows
    /// `r0 * m .. r1 * m` of it.
    #[allow(clippy::too_many_arguments)]
    unsafe fn band(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        r0: usize,
        r1: usize,
        bias: &[f32],
        relu: bool,
        residual: Option<&[f32]>,
        out: *mut f32,
        s: &mut Scratch,
    ) {
        let (m, al, cin, cout) = (self.m, self.alpha, self.cin, self.cout);
        let tc = w.div_ceil(m);
        let nt = (r1 - r0) * tc;
        let a2 = al * al;
        s.v.resize(a2 * cin * nt, 0.0);
        s.mm.resize(a2 * cout * nt, 0.0);
        // padded input row, alpha gathered columns, alpha x alpha horizontal sums
        let prow_len = (tc - 1) * m + al;
        s.tmp.resize(prow_len + al * tc + al * al * tc, 0.0);
        let (prow, rest) = s.tmp.split_at_mut(prow_len);
        let (gat, hz) = rest.split_at_mut(al * tc);
        let bt = self.bt;

        // 1. V[ξ][ci][t] = (Bᵀ d B) of every input tile
        for ci in 0..cin {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for tr in r0..r1 {
                let t0 = (tr - r0) * tc;
                for i in 0..al {
                    let y = (tr * m + i) as isize - 1;
                    prow.fill(0.0);
                    if y >= 0 && (y as usize) < h {
                        let src = &plane[y as usize * w..][..w];
                        let n = w.min(prow_len - 1);
                        prow[1..1 + n].copy_from_slice(&src[..n]);
                    }
                    // gat[k][t] = prow[t m + k]
                    for k in 0..al {
                        let g = &mut gat[k * tc..(k + 1) * tc];
                        for (t, v) in g.iter_mut().enumerate() {
                            *v = prow[t * m + k];
                        }
                    }
                    // hz[i][bb][t] = Σ_k Bᵀ[bb][k] gat[k][t]
                    for bb in 0..al {
                        combine(&mut hz[(i * al + bb) * tc..][..tc], &bt[bb * al..][..al], |k| &gat[k * tc..][..tc]);
                    }
                }
                // V[a al + bb][ci][t0 + t] = Σ_i Bᵀ[a][i] hz[i][bb][t]
                for a in 0..al {
                    for bb in 0..al {
                        let dst = &mut s.v[((a * al + bb) * cin + ci) * nt + t0..][..tc];
                        combine(dst, &bt[a * al..][..al], |i| &hz[(i * al + bb) * tc..][..tc]);
                    }
                }
            }
        }

        // 2. M_ξ = U_ξ V_ξ: [cout x cin] x [cin x nt]
        for xi in 0..a2 {
            gemm_strided(
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
        let at = self.at;
        // reuse the scratch: sh[a][c][t] (alpha x m x tc), then one output row
        let sh_len = al * m * tc;
        if s.tmp.len() < sh_len + m * tc {
            s.tmp.resize(sh_len + m * tc, 0.0);
        }
        let (sh, orow) = s.tmp.split_at_mut(sh_len);
        for co in 0..cout {
            let bias = bias[co];
            for tr in r0..r1 {
                let t0 = (tr - r0) * tc;
                // sh[a][c][t] = Σ_bb Aᵀ[c][bb] M[a al + bb][co][t]
                for a in 0..al {
                    for c in 0..m {
                        let mm = &s.mm;
                        combine(&mut sh[(a * m + c) * tc..][..tc], &at[c * al..][..al], |bb| &mm[((a * al + bb) * cout + co) * nt + t0..][..tc]);
                    }
                }
                for r in 0..m {
                    let oy = tr * m + r;
                    if oy >= h {
                        break;
                    }
                    // orow[t m + c] = Σ_a Aᵀ[r][a] sh[a][c][t]
                    let orow = &mut orow[..tc * m];
                    orow.fill(0.0);
                    for a in 0..al {
                        let k = at[r * al + a];
                        if k != 0.0 {
                            for c in 0..m {
                                let src = &sh[(a * m + c) * tc..][..tc];
                                for (t, v) in src.iter().enumerate() {
                                    orow[t * m + c] += k * v;
                                }
                            }
                        }
                    }
                    let dst = std::slice::from_raw_parts_mut(out.add((co * h + oy) * w), w);
                    let y = &orow[..w];
                    match (relu, residual.map(|r| &r[(co * h + oy) * w..][..w])) {
                        (false, None) => dst.iter_mut().zip(y).for_each(|(d, y)| *d = y + bias),
                        (true, None) => dst.iter_mut().zip(y).for_each(|(d, y)| *d = (y + bias).max(0.0)),
                        (false, Some(rr)) => dst.iter_mut().zip(y).zip(rr).for_each(|((d, y), r)| *d = y + bias + r),
                        (true, Some(rr)) => dst.iter_mut().zip(y).zip(rr).for_each(|((d, y), r)| *d = (y + bias).max(0.0) + r),
                    }
                }
            }
        }
    }
}
