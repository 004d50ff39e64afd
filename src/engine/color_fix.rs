//! Colour correction of the restored image against its input, as the
//! reference: AdaIN (per-channel mean/std transfer) or wavelet (high bands of
//! the result + low band of the input). Images are `[1,3,H,W]` in [0,1].
use candle_core::{DType, Tensor, D};

use super::ColorFix;

pub fn apply(fix: ColorFix, result: &Tensor, source: &Tensor) -> candle_core::Result<Tensor> {
    match fix {
        ColorFix::Adain => adain(result, source),
        ColorFix::Wavelet => wavelet(result, source),
        ColorFix::None => Ok(result.clone()),
    }
}

/// Per-channel mean and std (sqrt of unbiased variance + 1e-5): `[1,C,1,1]` each.
fn mean_std(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let n = h * w;
    let flat = x.reshape((b, c, n))?;
    let mean = flat.mean_keepdim(D::Minus1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let denom = if n > 1 { (n - 1) as f64 } else { 1.0 };
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / denom)?;
    let std = (var + 1e-5)?.sqrt()?;
    Ok((mean.reshape((b, c, 1, 1))?, std.reshape((b, c, 1, 1))?))
}

pub fn adain(result: &Tensor, source: &Tensor) -> candle_core::Result<Tensor> {
    let (mr, sr) = mean_std(result)?;
    let (ms, ss) = mean_std(source)?;
    result.broadcast_sub(&mr)?.broadcast_div(&sr)?.broadcast_mul(&ss)?.broadcast_add(&ms)?.clamp(0f32, 1f32)
}

/// One level of the à-trous blur: replicate padding, dilation `radius`.
fn blur(x: &Tensor, radius: usize) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let k1 = [1f32, 2., 1.];
    let k: Vec<f32> = (0..c).flat_map(|_| (0..9).map(|i| k1[i / 3] * k1[i % 3] / 16.0)).collect();
    let k = Tensor::from_vec(k, (c, 1, 3, 3), x.device())?.to_dtype(x.dtype())?;
    let p = x.pad_with_same(2, radius, radius)?.pad_with_same(3, radius, radius)?;
    p.conv2d(&k, 0, 1, radius, c)
}

/// (high bands, low band) over 5 levels with dilations 1, 2, 4, 8, 16.
fn decompose(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let mut high = x.zeros_like()?;
    let mut img = x.clone();
    for i in 0..5 {
        let low = blur(&img, 1 << i)?;
        high = (high + (&img - &low)?)?;
        img = low;
    }
    Ok((high, img))
}

pub fn wavelet(result: &Tensor, source: &Tensor) -> candle_core::Result<Tensor> {
    let (high, _) = decompose(&result.to_dtype(DType::F32)?)?;
    let (_, low) = decompose(&source.to_dtype(DType::F32)?)?;
    (high + low)?.clamp(0f32, 1f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adain_transfers_mean_and_std() {
        let dev = Device::Cpu;
        let r = Tensor::rand(0f32, 1., (1, 3, 16, 16), &dev).unwrap();
        let s = ((Tensor::rand(0f32, 1., (1, 3, 16, 16), &dev).unwrap() * 0.5).unwrap() + 0.2).unwrap();
        let out = adain(&r, &s).unwrap();
        let (mo, so) = mean_std(&out).unwrap();
        let (ms, ss) = mean_std(&s).unwrap();
        let d = |a: Tensor, b: Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d(mo, ms) < 1e-3);
        assert!(d(so, ss) < 1e-3);
    }

    #[test]
    fn wavelet_of_an_image_against_itself_is_identity() {
        let x = Tensor::rand(0f32, 1., (1, 3, 20, 33), &Device::Cpu).unwrap();
        let out = wavelet(&x, &x).unwrap();
        let err = (out - &x).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn one_pixel_images_stay_finite() {
        let x = Tensor::full(0.5f32, (1, 3, 1, 1), &Device::Cpu).unwrap();
        for fix in [ColorFix::Adain, ColorFix::Wavelet] {
            let v: Vec<f32> = apply(fix, &x, &x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|v| v.is_finite()), "{fix:?}: {v:?}");
        }
    }
}
