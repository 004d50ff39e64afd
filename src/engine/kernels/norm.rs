//! Group normalisation ([`GroupNormOp`]) and its statistics and affine helpers.
use candle_core::{CpuStorage, CustomOp1, InplaceOp1, InplaceOp2, Layout, Shape};
use rayon::prelude::*;

use super::{activation, avx2_available, contiguous, contiguous_mut, fast_exp, lane_sum};

avx2_fn! {
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

avx2_fn! {
    /// `out = x * a + b`, then SiLU when `silu`; `x` None: `out` itself.
    pub(in crate::engine) fn affine(out: &mut [f32], x: Option<&[f32]>, a: f32, b: f32, silu: bool) {
        #[inline(always)]
        fn f(v: f32, a: f32, b: f32, silu: bool) -> f32 {
            let t = v * a + b;
            if silu {
                t / (1.0 + fast_exp(-t))
            } else {
                t
            }
        }
        match (x, silu) {
            (Some(x), true) => out.iter_mut().zip(x).for_each(|(y, &v)| *y = f(v, a, b, true)),
            (Some(x), false) => out.iter_mut().zip(x).for_each(|(y, &v)| *y = f(v, a, b, false)),
            (None, true) => out.iter_mut().for_each(|y| *y = f(*y, a, b, true)),
            (None, false) => out.iter_mut().for_each(|y| *y = f(*y, a, b, false)),
        }
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
            self.group(bg, mean_var(xi), o, Some(xi), hw);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// The same normalisation in place (`x.inplace_op1(&op)`), for a tensor
/// whose buffer the caller owns alone.
impl InplaceOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "codiff-group-norm-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (cpg, hw) = self.dims(l)?;
        let x = contiguous_mut(s, l, "group norm in place")?;
        x.par_chunks_mut(cpg * hw).enumerate().for_each(|(bg, xi)| {
            let st = mean_var(xi);
            self.group(bg, st, xi, None, hw);
        });
        Ok(())
    }
}

/// The normalisation of `src` into `dst`'s buffer (`dst.inplace_op2(&src,
/// &op)`, same shape), for a `dst` whose buffer the caller owns alone and no
/// longer needs: no fresh buffer for the output.
impl InplaceOp2 for GroupNormOp {
    fn name(&self) -> &'static str {
        "codiff-group-norm-into"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("group norm into a {:?} tensor from {:?}", l1.shape(), l2.shape());
        }
        let (cpg, hw) = self.dims(l2)?;
        let x = contiguous(s2, l2, "group norm")?;
        let out = contiguous_mut(s1, l1, "group norm into")?;
        out.par_chunks_mut(cpg * hw).zip(x.par_chunks(cpg * hw)).enumerate().for_each(|(bg, (o, xi))| {
            self.group(bg, mean_var(xi), o, Some(xi), hw);
        });
        Ok(())
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
    /// `o`, from `x` (None: `o` in place).
    fn group(&self, bg: usize, (mean, var): (f64, f64), o: &mut [f32], x: Option<&[f32]>, hw: usize) {
        let cpg = o.len() / hw.max(1);
        let g = bg % self.groups;
        let inv = 1.0 / (var + self.eps).sqrt();
        for (j, oc) in o.chunks_mut(hw).enumerate() {
            let ch = g * cpg + j;
            let a = (self.gamma[ch] as f64 * inv) as f32;
            let b = (self.beta[ch] as f64 - mean * self.gamma[ch] as f64 * inv) as f32;
            affine(oc, x.map(|x| &x[j * hw..(j + 1) * hw]), a, b, self.silu);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_err;
    use super::*;
    use candle_core::{Device, Tensor};

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
            // in place: the same numbers in x's own buffer
            let owned = x.copy().unwrap();
            owned.inplace_op1(&op).unwrap();
            assert_eq!(max_err(&owned, &y), 0.0);
            // into another tensor's buffer: the same numbers, x untouched
            let dst = Tensor::full(f32::NAN, x.shape(), &dev).unwrap();
            dst.inplace_op2(&x, &op).unwrap();
            assert_eq!(max_err(&dst, &y), 0.0);
            assert!(max_err(&x.apply_op1_no_bwd(&op).unwrap(), &y) == 0.0);
            // a destination of another shape is refused
            let wrong = Tensor::zeros((2, c, 7, 9), candle_core::DType::F32, &dev).unwrap();
            assert!(wrong.inplace_op2(&x, &op).is_err());
        }
    }
}
