//! The SD-2.1 VAE (AutoencoderKL), assembled from candle-transformers' blocks
//! so that the posterior *mean* is reachable (CODiff encodes deterministically)
//! and each half can run on its own.
//!
//! Sizes come from the folder's `config.json`; weights may use either VAE
//! attention naming (`query/key/value/proj_attn` or `to_q/to_k/to_v/to_out.0`).
use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn as nn;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig, UpDecoderBlock2D,
    UpDecoderBlock2DConfig,
};

use super::error::{EngineError, Result};

/// Fields of diffusers' `AutoencoderKL` config.json that shape the model.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
}

pub(crate) fn json_usize(v: &serde_json::Value, key: &str, default: Option<usize>, path: &Path) -> Result<usize> {
    match v.get(key) {
        Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| EngineError::Config {
            path: path.to_path_buf(),
            reason: format!("`{key}` is not an unsigned integer"),
        }),
        None => default.ok_or_else(|| EngineError::Config { path: path.to_path_buf(), reason: format!("`{key}` missing") }),
    }
}

pub(crate) fn json_usizes(v: &serde_json::Value, key: &str, path: &Path) -> Result<Vec<usize>> {
    let bad = || EngineError::Config { path: path.to_path_buf(), reason: format!("`{key}` must be a list of integers") };
    v.get(key)
        .and_then(|x| x.as_array())
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(bad))
        .collect()
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => EngineError::NotFound { path: path.to_path_buf() },
        _ => EngineError::Io { path: path.to_path_buf(), source },
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config { path: path.to_path_buf(), reason: e.to_string() })
}

impl VaeConfig {
    pub fn from_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Ok(Self {
            in_channels: json_usize(&v, "in_channels", Some(3), path)?,
            out_channels: json_usize(&v, "out_channels", Some(3), path)?,
            latent_channels: json_usize(&v, "latent_channels", Some(4), path)?,
            block_out_channels: json_usizes(&v, "block_out_channels", path)?,
            layers_per_block: json_usize(&v, "layers_per_block", Some(2), path)?,
            norm_num_groups: json_usize(&v, "norm_num_groups", Some(32), path)?,
            scaling_factor: v.get("scaling_factor").and_then(|x| x.as_f64()).unwrap_or(0.18215),
        })
    }

    /// SD-2.1-base's VAE.
    pub fn sd21_base() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
        }
    }

    /// Pixels per latent pixel.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

pub struct VaeEncoder {
    conv_in: nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2d,
    quant_conv: nn::Conv2d,
    latent_channels: usize,
}

pub struct VaeDecoder {
    post_quant_conv: nn::Conv2d,
    conv_in: nn::Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2d,
}

fn conv3(cin: usize, cout: usize, vb: nn::VarBuilder) -> candle_core::Result<nn::Conv2d> {
    nn::conv2d(cin, cout, 3, nn::Conv2dConfig { padding: 1, ..Default::default() }, vb)
}

fn mid(c: usize, groups: usize, vb: nn::VarBuilder) -> candle_core::Result<UNetMidBlock2D> {
    let cfg = UNetMidBlock2DConfig {
        resnet_eps: 1e-6,
        output_scale_factor: 1.,
        attn_num_head_channels: None,
        resnet_groups: Some(groups),
        ..Default::default()
    };
    UNetMidBlock2D::new(vb, c, None, cfg)
}

impl VaeEncoder {
    /// `vb` at the VAE root (`encoder.*`, `quant_conv.*`).
    pub fn new(cfg: &VaeConfig, vb: nn::VarBuilder) -> candle_core::Result<Self> {
        let vs = vb.pp("encoder");
        let ch = &cfg.block_out_channels;
        let conv_in = conv3(cfg.in_channels, ch[0], vs.pp("conv_in"))?;
        let mut down_blocks = vec![];
        for (i, &cout) in ch.iter().enumerate() {
            let cin = if i > 0 { ch[i - 1] } else { ch[0] };
            let c = DownEncoderBlock2DConfig {
                num_layers: cfg.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: cfg.norm_num_groups,
                add_downsample: i + 1 != ch.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            down_blocks.push(DownEncoderBlock2D::new(vs.pp(format!("down_blocks.{i}")), cin, cout, c)?);
        }
        let last = *ch.last().expect("channels");
        let mid_block = mid(last, cfg.norm_num_groups, vs.pp("mid_block"))?;
        let conv_norm_out = nn::group_norm(cfg.norm_num_groups, last, 1e-6, vs.pp("conv_norm_out"))?;
        let conv_out = conv3(last, 2 * cfg.latent_channels, vs.pp("conv_out"))?;
        let quant_conv = nn::conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, Default::default(), vb.pp("quant_conv"))?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_out, quant_conv, latent_channels: cfg.latent_channels })
    }

    /// Posterior mean and log-variance (clamped to [-30, 20]) of `x` in [-1,1].
    pub fn posterior(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h, None)?;
        let h = nn::ops::silu(&self.conv_norm_out.forward(&h)?)?;
        let moments = self.quant_conv.forward(&self.conv_out.forward(&h)?)?;
        let mean = moments.narrow(1, 0, self.latent_channels)?;
        let logvar = moments.narrow(1, self.latent_channels, self.latent_channels)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Posterior mean (unscaled latent).
    pub fn encode_mean(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.posterior(x)?.0)
    }
}

impl VaeDecoder {
    pub fn new(cfg: &VaeConfig, vb: nn::VarBuilder) -> candle_core::Result<Self> {
        let lc = cfg.latent_channels;
        let post_quant_conv = nn::conv2d(lc, lc, 1, Default::default(), vb.pp("post_quant_conv"))?;
        let vs = vb.pp("decoder");
        let ch: Vec<usize> = cfg.block_out_channels.iter().copied().rev().collect();
        let conv_in = conv3(lc, ch[0], vs.pp("conv_in"))?;
        let mid_block = mid(ch[0], cfg.norm_num_groups, vs.pp("mid_block"))?;
        let mut up_blocks = vec![];
        for (i, &cout) in ch.iter().enumerate() {
            let cin = if i > 0 { ch[i - 1] } else { ch[0] };
            let c = UpDecoderBlock2DConfig {
                num_layers: cfg.layers_per_block + 1,
                resnet_eps: 1e-6,
                resnet_groups: cfg.norm_num_groups,
                add_upsample: i + 1 != ch.len(),
                ..Default::default()
            };
            up_blocks.push(UpDecoderBlock2D::new(vs.pp(format!("up_blocks.{i}")), cin, cout, c)?);
        }
        let first = cfg.block_out_channels[0];
        let conv_norm_out = nn::group_norm(cfg.norm_num_groups, first, 1e-6, vs.pp("conv_norm_out"))?;
        let conv_out = conv3(first, cfg.out_channels, vs.pp("conv_out"))?;
        Ok(Self { post_quant_conv, conv_in, mid_block, up_blocks, conv_norm_out, conv_out })
    }

    /// Image in about [-1,1] from an unscaled latent.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv_in.forward(&self.post_quant_conv.forward(z)?)?;
        let mut h = self.mid_block.forward(&h, None)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        let h = nn::ops::silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}

/// Run `f` over overlapping square tiles of `x` (`[1,C,H,W]`) and blend the
/// outputs with linear ramps across the overlaps (diffusers' VAE tiling idea),
/// accumulating on the host: peak memory is one tile's activations plus the
/// output frame, whatever the frame size. `scale` is output px per input px.
pub fn blend_tiles<F>(x: &Tensor, tile: usize, overlap: usize, scale_num: usize, scale_den: usize, mut f: F) -> candle_core::Result<Tensor>
where
    F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
{
    let (_, _, h, w) = x.dims4()?;
    let tile = tile.max(1);
    if h <= tile && w <= tile {
        return f(x);
    }
    let sc = |v: usize| v * scale_num / scale_den;
    let (oh, ow) = (sc(h), sc(w));
    let mut acc: Vec<f32> = vec![];
    let mut wsum = vec![0f32; oh * ow];
    let mut channels = 0;
    let ys = super::tiling::tile_starts(h, tile, overlap);
    let xs = super::tiling::tile_starts(w, tile, overlap);
    let ov = sc(overlap).max(1) as f32;
    let ramp = |i: usize, n: usize| ((i as f32 + 0.5) / ov).min((n as f32 - i as f32 - 0.5) / ov).min(1.0);
    for &y0 in &ys {
        for &x0 in &xs {
            let th = tile.min(h);
            let tw = tile.min(w);
            let out = f(&x.narrow(2, y0, th)?.narrow(3, x0, tw)?)?.to_dtype(candle_core::DType::F32)?;
            let (_, c, toh, tow) = out.dims4()?;
            if acc.is_empty() {
                channels = c;
                acc = vec![0f32; c * oh * ow];
            }
            let v: Vec<f32> = out.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1()?;
            let (oy, ox) = (sc(y0), sc(x0));
            for yy in 0..toh {
                let wy = ramp(yy, toh);
                for xx in 0..tow {
                    let wgt = wy * ramp(xx, tow);
                    let o = (oy + yy) * ow + ox + xx;
                    wsum[o] += wgt;
                    for ch in 0..c {
                        acc[ch * oh * ow + o] += wgt * v[(ch * toh + yy) * tow + xx];
                    }
                }
            }
        }
    }
    for ch in 0..channels {
        for (a, s) in acc[ch * oh * ow..(ch + 1) * oh * ow].iter_mut().zip(&wsum) {
            *a /= s;
        }
    }
    Tensor::from_vec(acc, (1, channels, oh, ow), &candle_core::Device::Cpu)?.to_device(x.device())
}

impl VaeEncoder {
    /// Posterior mean, encoded in overlapping tiles of `tile` px when the
    /// image is larger (bounded memory). `tile` and `overlap` are multiples of 8.
    pub fn encode_mean_tiled(&self, x: &Tensor, tile: usize, overlap: usize, down: usize) -> candle_core::Result<Tensor> {
        blend_tiles(x, tile, overlap, 1, down, |t| self.encode_mean(t))
    }
}

impl VaeDecoder {
    /// Decode in overlapping latent tiles of `tile` latent px when larger.
    pub fn decode_tiled(&self, z: &Tensor, tile: usize, overlap: usize, up: usize) -> candle_core::Result<Tensor> {
        blend_tiles(z, tile, overlap, up, 1, |t| self.decode(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn blending_a_pointwise_map_is_exact() {
        // a per-pixel function tiled with overlaps must equal the untiled result
        let x = Tensor::randn(0f32, 1., (1, 2, 37, 53), &Device::Cpu).unwrap();
        let f = |t: &Tensor| (t * 3.0).and_then(|t| t + 1.0);
        let whole = f(&x).unwrap();
        let tiled = blend_tiles(&x, 16, 6, 1, 1, f).unwrap();
        let err = (whole - tiled).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn blending_handles_scaled_outputs() {
        // nearest 2x upsampling: tiles of the input map to 2x tiles of the output
        let x = Tensor::randn(0f32, 1., (1, 1, 20, 30), &Device::Cpu).unwrap();
        let up = |t: &Tensor| t.upsample_nearest2d(t.dim(2)? * 2, t.dim(3)? * 2);
        let whole = up(&x).unwrap();
        let tiled = blend_tiles(&x, 8, 4, 2, 1, up).unwrap();
        let err = (whole - tiled).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{err}");
    }
}
