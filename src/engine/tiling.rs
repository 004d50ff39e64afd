//! Latent tiling as the reference does it: square tiles of side T (settable,
//! default 96) overlapping by a settable amount, the last tile flush with the
//! border, each tile's output weighted by a Gaussian and normalised by the
//! summed weights.
use candle_core::{Device, Tensor};

/// Start offsets of tiles of side `tile` with `overlap` along an axis of `size`.
pub fn tile_starts(size: usize, tile: usize, overlap: usize) -> Vec<usize> {
    let tile = tile.min(size);
    let stride = tile.saturating_sub(overlap).max(1);
    let mut starts = vec![];
    let mut s = 0;
    while s + tile < size {
        starts.push(s);
        s += stride;
    }
    starts.push(size - tile);
    starts.dedup();
    starts
}

/// The reference's weights: `exp(-(i-m)^2 / T^2 / (2 var)) / sqrt(2 pi var)`,
/// var = 0.01, with m = (T-1)/2 along x and T/2 along y (a quirk kept on purpose).
pub fn gaussian_weights(tile_h: usize, tile_w: usize) -> Vec<f32> {
    let var = 0.01f64;
    let g = |i: usize, m: f64, t: usize| {
        let d = i as f64 - m;
        (-(d * d) / (t * t) as f64 / (2.0 * var)).exp() / (2.0 * std::f64::consts::PI * var).sqrt()
    };
    let mx = (tile_w as f64 - 1.0) / 2.0;
    let my = tile_h as f64 / 2.0;
    let mut out = Vec::with_capacity(tile_h * tile_w);
    for y in 0..tile_h {
        for x in 0..tile_w {
            out.push((g(y, my, tile_h) * g(x, mx, tile_w)) as f32);
        }
    }
    out
}

/// Run `f` over tiles of `z` (`[B,C,H,W]`) and blend; `f` maps a tile to a tensor
/// of the same spatial size. Untiled when `tile == 0` or the latent fits.
pub fn tiled<F>(z: &Tensor, tile: usize, overlap: usize, mut f: F) -> candle_core::Result<Tensor>
where
    F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
{
    let (_, _, h, w) = z.dims4()?;
    if tile == 0 || h * w <= tile * tile {
        return f(z);
    }
    let t = tile.min(h).min(w);
    let weights = Tensor::from_vec(gaussian_weights(t, t), (1, 1, t, t), &Device::Cpu)?
        .to_device(z.device())?;
    let mut acc: Option<Tensor> = None;
    let mut wsum = Tensor::zeros((1, 1, h, w), candle_core::DType::F32, z.device())?;
    for &y in &tile_starts(h, t, overlap) {
        for &x in &tile_starts(w, t, overlap) {
            let tile_in = z.narrow(2, y, t)?.narrow(3, x, t)?;
            let out = f(&tile_in)?.to_dtype(candle_core::DType::F32)?;
            let weighted = out.broadcast_mul(&weights)?;
            let (b, c, _, _) = out.dims4()?;
            let a = match acc.take() {
                Some(a) => a,
                None => Tensor::zeros((b, c, h, w), candle_core::DType::F32, z.device())?,
            };
            let pad = |t: &Tensor| t.pad_with_zeros(2, y, h - y - t.dim(2).unwrap_or(0)).and_then(|t| t.pad_with_zeros(3, x, w - x - t.dim(3).unwrap_or(0)));
            acc = Some((a + pad(&weighted)?)?);
            wsum = (wsum + pad(&weights)?)?;
        }
    }
    let acc = acc.expect("at least one tile");
    acc.broadcast_div(&wsum)?.to_dtype(z.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_cover_and_end_flush() {
        assert_eq!(tile_starts(100, 96, 32), vec![0, 4]);
        assert_eq!(tile_starts(96, 96, 32), vec![0]);
        assert_eq!(tile_starts(200, 96, 32), vec![0, 64, 104]);
        assert_eq!(tile_starts(10, 96, 32), vec![0]);
    }

    #[test]
    fn weights_peak_in_the_middle_with_the_reference_quirk() {
        let w = gaussian_weights(4, 4);
        // x centre (T-1)/2 = 1.5: columns 1 and 2 equal; y centre T/2 = 2: row 2 largest
        assert!((w[4 * 2 + 1] - w[4 * 2 + 2]).abs() < 1e-7);
        assert!(w[4 * 2 + 1] > w[4 + 1]);
        let peak = 1.0 / (2.0 * std::f64::consts::PI * 0.01);
        assert!(((w[4 * 2 + 1] as f64) - peak * (-(0.25f64) / 16.0 / 0.02).exp()).abs() < 1e-4);
    }

    #[test]
    fn tiling_an_identity_returns_the_input() {
        let z = Tensor::randn(0f32, 1., (1, 4, 50, 70), &Device::Cpu).unwrap();
        let out = tiled(&z, 24, 8, |t| Ok(t.clone())).unwrap();
        let err = (out - &z).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{err}");
    }
}
