//! [`Geglu`]: the transformer feed-forward's gated GELU, `a * gelu(g)` of
//! the two halves of the last dimension, in one vectorised pass (candle's
//! way, two strided copies, a scalar libm `erf` per value and a product,
//! took about 0.3 s of the full model's UNet at 512x512).
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::{activation, contiguous, fast_exp};

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7;
/// 4.4e-7 with f32 arithmetic, measured against candle's f64 `erf`),
/// the approximation PyTorch's vectorised CPU `erf` uses, so its exact GELU
/// and ours agree to within it; straight-line code the compiler vectorises.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the published constants
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let r = (((1.061_405_429 * t - 1.453_152_027) * t + 1.421_413_741) * t - 0.284_496_736) * t + 0.254_829_592;
    (1.0 - r * t * fast_exp(-ax * ax)).copysign(x)
}

/// GELU with erf (PyTorch's `gelu(approximate='none')`).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

simd_fn! {
    /// `out[j] = a[j] * gelu(g[j])` for one row `[a | g]`.
    fn geglu_row(row: &[f32], out: &mut [f32]) {
        let (a, g) = row.split_at(out.len());
        out.iter_mut().zip(a).zip(g).for_each(|((o, &a), &g)| *o = a * gelu(g));
    }
}

/// `[.., 2n]` -> `[.., n]`: the first half times GELU of the second
/// (diffusers' `GEGLU` after its projection).
#[derive(Clone, Copy, Debug)]
pub struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "codiff-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "geglu")?;
        let dims = l.shape().dims();
        let last = *dims.last().unwrap_or(&0);
        if last == 0 || !last.is_multiple_of(2) {
            candle_core::bail!("geglu: last dimension {last} is not even");
        }
        let n = last / 2;
        let mut out = activation(x.len() / 2);
        // rows in chunks of about 64k outputs
        let rows = (1 << 16) / n + 1;
        out.par_chunks_mut(rows * n).zip(x.par_chunks(rows * last)).for_each(|(o, xs)| {
            for (orow, row) in o.chunks_mut(n).zip(xs.chunks(last)) {
                geglu_row(row, orow);
            }
        });
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("a last dimension") = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn erf_is_within_the_published_bound_and_geglu_matches_candle() {
        let mut worst = 0f64;
        for i in -6000..6000 {
            let x = i as f32 * 1e-3 + 3e-4;
            worst = worst.max((erf(x) as f64 - candle_core::cpu::erf::erf_f64(x as f64)).abs());
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(erf(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(erf(f32::INFINITY), 1.0);
        // values in [-4, 4]: the product's error is at most |a| |g| / 2 times
        // erf's, 3.5e-6, plus rounding
        let v: Vec<f32> = (0..2 * 5 * 2 * 37).map(|i| ((i * 37 % 101) as f32 / 12.5) - 4.0).collect();
        let h = Tensor::from_vec(v, (2, 5, 2 * 37), &Device::Cpu).unwrap();
        let ours = h.apply_op1_no_bwd(&Geglu).unwrap();
        let theirs = (h.narrow(2, 0, 37).unwrap() * h.narrow(2, 37, 37).unwrap().gelu_erf().unwrap()).unwrap();
        assert_eq!(ours.dims(), &[2, 5, 37]);
        let err = super::super::tests::max_err(&ours, &theirs);
        assert!(err < 5e-6, "{err}");
        assert!(Tensor::zeros((3, 5), candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .apply_op1_no_bwd(&Geglu)
            .is_err());
    }
}
