//! Group normalisation ([`GroupNormOp`]) and its statistics and affine helpers.
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::{activation, contiguous, fast_exp, lane_sum};

simd_fn! {
    /// Mean and (biased) variance of one group, in two passes: f32 sums within
    /// 1024-element chunks, f64 across them. The deviations are taken from the
    /// mean rounded to f32, so the variance is corrected by the rounding's square
    /// (E[(x - m')^2] = var + (m - m')^2). Shared by the group norm and the
    /// VAE tiler's pooled statistics.
    pub(crate) fn mean_var(xi: &[f32]) -> (f64, f64) {
        let n = xi.len().max(1) as f64;
        let mean = xi.chunks(1024).map(|c| lane_sum(c, |v| v) as f64).sum::<f64>() / n;
        let m32 = mean as f32;
        let var = xi.chunks(1024).map(|c| lane_sum(c, |v| (v - m32) * (v - m32)) as f64).sum::<f64>() / n;
        let d = mean - m32 as f64;
        (mean, (var - d * d).max(0.0))
    }
}

/// One normalised value: `v a + b`, then SiLU when `silu` (the arithmetic of
/// [`affine`] and of the convolutions that fuse a norm, [`ImageAffine`]).
#[inline(always)]
fn f(v: f32, a: f32, b: f32, silu: bool) -> f32 {
    let t = v * a + b;
    if silu {
        t / (1.0 + fast_exp(-t))
    } else {
        t
    }
}

simd_fn! {
    /// `out = x * a + b`, then SiLU when `silu`.
    fn affine(out: &mut [f32], x: &[f32], a: f32, b: f32, silu: bool) {
        if silu {
            out.iter_mut().zip(x).for_each(|(y, &v)| *y = f(v, a, b, true));
        } else {
            out.iter_mut().zip(x).for_each(|(y, &v)| *y = f(v, a, b, false));
        }
    }
}

/// `(a, b)` of a channel with weight `gamma`, bias `beta` and its group's
/// statistics `(mean, var)`: `v a + b = (v - mean) / sqrt(var + eps) gamma
/// + beta`, the coefficients in f64 and rounded once.
pub(crate) fn coefficients(gamma: f32, beta: f32, (mean, var): (f64, f64), eps: f64) -> (f32, f32) {
    let inv = 1.0 / (var + eps).sqrt();
    ((gamma as f64 * inv) as f32, (beta as f64 - mean * gamma as f64 * inv) as f32)
}

/// What a group norm does to each channel of one tensor `[B, C, ...]`:
/// `v a + b` (then SiLU when `silu`) with `ab[bi * C + c] = (a, b)`, so that
/// a convolution can normalise its input as it reads it (the Winograd input
/// transform) instead of reading a normalised copy.
#[derive(Clone, Debug)]
pub struct ChannelAffine {
    pub ab: Vec<(f32, f32)>,
    pub silu: bool,
}

/// [`ChannelAffine`] of one image: `ab[c]`.
#[derive(Clone, Copy, Debug)]
pub struct ImageAffine<'a> {
    pub ab: &'a [(f32, f32)],
    pub silu: bool,
}

impl ChannelAffine {
    /// Image `bi`'s `c` channels.
    pub fn image(&self, bi: usize, c: usize) -> ImageAffine<'_> {
        ImageAffine { ab: &self.ab[bi * c..(bi + 1) * c], silu: self.silu }
    }

    /// The normalised copy of `x` (`[B, C, hw]` for this affine's B x C).
    pub fn apply(&self, x: &[f32], hw: usize) -> Vec<f32> {
        let mut out = activation(x.len());
        out.par_chunks_mut(hw.max(1)).zip(x.par_chunks(hw.max(1))).zip(&self.ab).for_each(|((o, xc), &(a, b))| {
            affine(o, xc, a, b, self.silu);
        });
        out
    }
}

/// The same as an op on a `[B, C, ...]` tensor of this affine's B x C
/// (VAEHook's norm with pooled statistics).
impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "codiff-channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "channel affine")?;
        let dims = l.shape().dims();
        if dims.len() < 2 || dims[0] * dims[1] != self.ab.len() {
            candle_core::bail!("channel affine: shape {dims:?} for {} channels", self.ab.len());
        }
        let hw: usize = dims[2..].iter().product();
        Ok((CpuStorage::F32(self.apply(x, hw)), l.shape().clone()))
    }
}

impl ImageAffine<'_> {
    /// `dst = norm(src)` for values of channel `c`.
    pub fn row(&self, c: usize, src: &[f32], dst: &mut [f32]) {
        let (a, b) = self.ab[c];
        affine(dst, src, a, b, self.silu);
    }
}

/// Group normalisation over `[B, C, ...]` with per-channel affine, optionally
/// followed by SiLU, in one pass over the data (statistics in f64).
#[derive(Clone, Debug)]
pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    pub gamma: std::sync::Arc<Vec<f32>>,
    pub beta: std::sync::Arc<Vec<f32>>,
    pub silu: bool,
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "codiff-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "group norm")?;
        let (cpg, hw) = self.dims(l)?;
        let mut out = activation(x.len());
        out.par_chunks_mut(cpg * hw).zip(x.par_chunks(cpg * hw)).enumerate().for_each(|(bg, (o, xi))| {
            self.group(bg, mean_var(xi), o, xi, hw);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

impl GroupNormOp {
    /// (channels per group, values per channel) of an input of layout `l`.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let dims = l.shape().dims();
        if dims.len() < 2 || dims[1] != self.gamma.len() || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!(
                "group norm: shape {dims:?} for {} channels in {} groups",
                self.gamma.len(),
                self.groups
            );
        }
        Ok((dims[1] / self.groups, dims[2..].iter().product()))
    }

    /// Normalise group `bg` (batch-major) with statistics `(mean, var)` into
    /// `o`, from `x`.
    fn group(&self, bg: usize, st: (f64, f64), o: &mut [f32], x: &[f32], hw: usize) {
        let cpg = o.len() / hw.max(1);
        for ((j, oc), xc) in o.chunks_mut(hw).enumerate().zip(x.chunks(hw)) {
            let (a, b) = self.coefficients(bg, cpg, j, st);
            affine(oc, xc, a, b, self.silu);
        }
    }

    /// `(a, b)` of channel `j` of group `bg` (batch-major, `cpg` channels a
    /// group) with statistics `(mean, var)`.
    fn coefficients(&self, bg: usize, cpg: usize, j: usize, st: (f64, f64)) -> (f32, f32) {
        let ch = (bg % self.groups) * cpg + j;
        coefficients(self.gamma[ch], self.beta[ch], st, self.eps)
    }

    /// This norm's [`ChannelAffine`] on `x` (layout `l`, contiguous values
    /// `x`): the statistics of each group, as [`GroupNormOp`] computes them.
    pub fn channel_affine(&self, x: &[f32], l: &Layout) -> candle_core::Result<ChannelAffine> {
        let (cpg, hw) = self.dims(l)?;
        let stats: Vec<(f64, f64)> = x.par_chunks(cpg * hw).map(mean_var).collect();
        let ab =
            stats.iter().enumerate().flat_map(|(bg, &st)| (0..cpg).map(move |j| self.coefficients(bg, cpg, j, st)));
        Ok(ChannelAffine { ab: ab.collect(), silu: self.silu })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_err;
    use super::*;
    use candle_core::{Device, Tensor};

    /// The vectorised norm (AVX-512 or AVX2 where the CPU has them) gives
    /// the scalar arithmetic's values bit for bit, over signs, magnitudes
    /// past the exponential's clamps and zero, with and without SiLU.
    #[test]
    fn affine_is_the_scalar_arithmetic_bit_for_bit() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37 * if i % 7 == 0 { 40.0 } else { 1.0 }).collect();
        for silu in [false, true] {
            for &(a, b) in &[(1.0f32, 0.0f32), (0.73, -0.21), (-2.5, 3.0)] {
                let mut out = vec![0f32; x.len()];
                affine(&mut out, &x, a, b, silu);
                let want = x.iter().map(|&v| std::hint::black_box(f(v, a, b, silu)));
                assert!(out.iter().zip(want).all(|(p, q)| p.to_bits() == q.to_bits()), "a={a} b={b} silu={silu}");
            }
        }
    }

    #[test]
    fn group_norm_matches_candle() {
        let dev = Device::Cpu;
        for (c, g, silu) in [(64, 32, true), (12, 4, false), (6, 1, true)] {
            let x = Tensor::randn(0f32, 1., (2, c, 9, 7), &dev).unwrap().affine(3.0, 0.5).unwrap();
            let gamma = Tensor::randn(0f32, 1., c, &dev).unwrap();
            let beta = Tensor::randn(0f32, 1., c, &dev).unwrap();
            let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, g, 1e-6).unwrap();
            let mut reference = candle_core::Module::forward(&gn, &x).unwrap();
            if silu {
                reference = candle_nn::ops::silu(&reference).unwrap();
            }
            let op = GroupNormOp {
                groups: g,
                eps: 1e-6,
                gamma: std::sync::Arc::new(gamma.to_vec1().unwrap()),
                beta: std::sync::Arc::new(beta.to_vec1().unwrap()),
                silu,
            };
            let y = x.apply_op1_no_bwd(&op).unwrap();
            assert!(max_err(&y, &reference) < 1e-4);
        }
    }
}
