//! [`Upsample2x`]: nearest-neighbour upsampling by exactly 2 in both
//! directions, the SD VAE's and UNet's upsamplers before their convolution.
//! candle's `upsample_nearest2d` indexes every output value on one thread
//! (the VAE decoder's three at 512x512 took 23, 90 and 175 ms against our
//! 2.7, 9.5 and 18.3, `cargo run --release --example bench_kernels -- --only
//! upsample`); here each output row is one source row with its values
//! doubled, planes in parallel.
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::{activation, contiguous};

/// `[B, C, H, W]` -> `[B, C, 2H, 2W]`, each value repeated in a 2x2 block
/// (the same values as candle's `upsample_nearest2d(2H, 2W)`).
#[derive(Clone, Copy, Debug)]
pub struct Upsample2x;

simd_fn! {
    /// `dst[2j] = dst[2j + 1] = src[j]`.
    fn double_row(src: &[f32], dst: &mut [f32]) {
        for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
            d[0] = s;
            d[1] = s;
        }
    }
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "codiff-upsample2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "upsample")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let mut out = activation(b * c * 4 * h * w);
        if h * w > 0 {
            out.par_chunks_mut(4 * h * w).zip(x.par_chunks(h * w)).for_each(|(dst, src)| {
                for (y, row) in src.chunks_exact(w).enumerate() {
                    let (even, odd) = dst[2 * y * 2 * w..(2 * y + 2) * 2 * w].split_at_mut(2 * w);
                    double_row(row, even);
                    odd.copy_from_slice(even);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, 2 * h, 2 * w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn upsample2x_equals_candles_nearest() {
        let dev = Device::Cpu;
        for (b, c, h, w) in [(1, 3, 1, 1), (2, 5, 7, 9), (1, 16, 16, 33), (1, 1, 0, 4)] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
            let ours = x.apply_op1_no_bwd(&Upsample2x).unwrap();
            let reference = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let (a, r) = (ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), reference.flatten_all().unwrap());
            assert_eq!(a, r.to_vec1::<f32>().unwrap(), "{b}x{c}x{h}x{w}");
        }
    }
}
