//! The SD-2.1 VAE (AutoencoderKL) from our own blocks ([`super::layers`]):
//! the posterior *mean* is reachable (CODiff encodes deterministically), each
//! half runs on its own, and the CPU path uses our fast kernels.
//!
//! Sizes come from the folder's `config.json`; weights may use either VAE
//! attention naming (`query/key/value/proj_attn` or `to_q/to_k/to_v/to_out.0`).
use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn as nn;

use super::config::{check_levels, check_size, json_usize, json_usizes, read_json};
use super::error::{EngineError, Result};
use super::layers::{Conv, GroupNorm, GroupStats, Pool, ResnetBlock, Upsample, VaeAttention};
use super::tiling::{Plan, Scale};
use super::Cancel;

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

impl VaeConfig {
    pub fn from_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let cfg = Self {
            in_channels: json_usize(&v, "in_channels", Some(3), path)?,
            out_channels: json_usize(&v, "out_channels", Some(3), path)?,
            latent_channels: json_usize(&v, "latent_channels", Some(4), path)?,
            block_out_channels: json_usizes(&v, "block_out_channels", path)?,
            layers_per_block: json_usize(&v, "layers_per_block", Some(2), path)?,
            norm_num_groups: json_usize(&v, "norm_num_groups", Some(32), path)?,
            scaling_factor: v.get("scaling_factor").and_then(|x| x.as_f64()).unwrap_or(0.18215),
        };
        check_levels(path, &cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block)?;
        let bad = |reason: String| Err(EngineError::Config { path: path.to_path_buf(), reason });
        for (k, c) in [
            ("in_channels", cfg.in_channels),
            ("out_channels", cfg.out_channels),
            ("latent_channels", cfg.latent_channels),
        ] {
            check_size(path, k, c)?;
        }
        if !(cfg.scaling_factor.is_finite() && cfg.scaling_factor > 0.0) {
            return bad(format!("`scaling_factor` {} is not a positive number", cfg.scaling_factor));
        }
        Ok(cfg)
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

/// `UNetMidBlock2D` of the VAE: resnet, attention, resnet.
struct MidBlock {
    res0: ResnetBlock,
    attn: VaeAttention,
    res1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: nn::VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            res0: ResnetBlock::new(vb.pp("resnets.0"), c, c, None, groups, 1e-6, 1.0)?,
            attn: VaeAttention::new(vb.pp("attentions.0"), c, groups)?,
            res1: ResnetBlock::new(vb.pp("resnets.1"), c, c, None, groups, 1e-6, 1.0)?,
        })
    }

    fn forward_tiles(&self, t: &mut Tiles) -> Result<()> {
        t.resnet(&self.res0)?;
        t.attention(&self.attn)?;
        t.resnet(&self.res1)
    }
}

/// `DownEncoderBlock2D`: resnets, then a stride-2 conv padded (0,1,0,1).
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    down: Option<Conv>,
}

/// `UpDecoderBlock2D`: resnets, then nearest 2x + conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    up: Option<Upsample>,
}

pub struct VaeEncoder {
    conv_in: Conv,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv,
    quant_conv: Conv,
    latent_channels: usize,
}

pub struct VaeDecoder {
    post_quant_conv: Conv,
    conv_in: Conv,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv,
}

/// A block's `n` ResNet blocks (`<vb>.resnets.<j>`): the first `cin` ->
/// `cout`, the rest `cout` -> `cout`; no time embedding, eps 1e-6.
fn resnets(
    vb: &nn::VarBuilder,
    n: usize,
    cin: usize,
    cout: usize,
    groups: usize,
) -> candle_core::Result<Vec<ResnetBlock>> {
    (0..n)
        .map(|j| {
            ResnetBlock::new(
                vb.pp(format!("resnets.{j}")),
                if j == 0 { cin } else { cout },
                cout,
                None,
                groups,
                1e-6,
                1.0,
            )
        })
        .collect()
}

impl VaeEncoder {
    /// `vb` at the VAE root (`encoder.*`, `quant_conv.*`).
    pub fn new(cfg: &VaeConfig, vb: nn::VarBuilder) -> candle_core::Result<Self> {
        let vs = vb.pp("encoder");
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = Conv::same3(vs.pp("conv_in"), cfg.in_channels, ch[0])?;
        let mut down_blocks = vec![];
        for (i, &cout) in ch.iter().enumerate() {
            let vbi = vs.pp(format!("down_blocks.{i}"));
            let cin = if i > 0 { ch[i - 1] } else { ch[0] };
            let resnets = resnets(&vbi, cfg.layers_per_block, cin, cout, g)?;
            let down = if i + 1 != ch.len() {
                Some(Conv::new(vbi.pp("downsamplers.0.conv"), cout, cout, 3, 2, [0, 0, 1, 1], true)?)
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, down });
        }
        let last = *ch.last().expect("channels");
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vs.pp("mid_block"), last, g)?,
            conv_norm_out: GroupNorm::new(vs.pp("conv_norm_out"), g, last, 1e-6)?,
            conv_out: Conv::same3(vs.pp("conv_out"), last, 2 * cfg.latent_channels)?,
            quant_conv: Conv::point(vb.pp("quant_conv"), 2 * cfg.latent_channels, 2 * cfg.latent_channels)?,
            latent_channels: cfg.latent_channels,
        })
    }

    /// Posterior mean and log-variance (clamped to [-30, 20]) of `x` in [-1,1]
    /// (the whole frame as one tile of [`VaeEncoder::moments_tiles`]).
    pub fn posterior(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let moments = self.moments_tiles(vec![x.clone()], &Cancel::new())?.remove(0);
        let mean = moments.narrow(1, 0, self.latent_channels)?;
        let logvar = moments.narrow(1, self.latent_channels, self.latent_channels)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Posterior mean (unscaled latent).
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.posterior(x)?.0)
    }
}

impl VaeDecoder {
    pub fn new(cfg: &VaeConfig, vb: nn::VarBuilder) -> candle_core::Result<Self> {
        let lc = cfg.latent_channels;
        let g = cfg.norm_num_groups;
        let post_quant_conv = Conv::point(vb.pp("post_quant_conv"), lc, lc)?;
        let vs = vb.pp("decoder");
        let ch: Vec<usize> = cfg.block_out_channels.iter().copied().rev().collect();
        let conv_in = Conv::same3(vs.pp("conv_in"), lc, ch[0])?;
        let mid_block = MidBlock::new(vs.pp("mid_block"), ch[0], g)?;
        let mut up_blocks = vec![];
        for (i, &cout) in ch.iter().enumerate() {
            let vbi = vs.pp(format!("up_blocks.{i}"));
            let cin = if i > 0 { ch[i - 1] } else { ch[0] };
            let resnets = resnets(&vbi, cfg.layers_per_block + 1, cin, cout, g)?;
            let up = if i + 1 != ch.len() { Some(Upsample::new(vbi.pp("upsamplers.0"), cout)?) } else { None };
            up_blocks.push(UpBlock { resnets, up });
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vs.pp("conv_norm_out"), g, first, 1e-6)?,
            conv_out: Conv::same3(vs.pp("conv_out"), first, cfg.out_channels)?,
        })
    }

    /// Image in about [-1,1] from an unscaled latent (the whole latent as one
    /// tile of [`VaeDecoder::decode_tiles`]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decode_tiles(vec![z.clone()], &Cancel::new())?.remove(0))
    }
}

/// VAEHook's padding: 32 image px around encoder tiles, 11 latent px around
/// decoder tiles.
pub const ENCODER_PAD: usize = 32;
pub const DECODER_PAD: usize = 11;

/// The activations of every tile of one image, advanced through the network
/// block by block as VAEHook does: each GroupNorm first gathers every tile's
/// mean and variance and normalises all tiles with the pooled statistics
/// ([`GroupStats::pool`]). A tile's activation is replaced in place as it
/// advances, so the state held is one activation per tile (two inside a
/// resnet: its hidden state and its residual) plus one tile's temporaries.
/// This is the VAE's only walk: an untiled frame is one tile, whose blocks
/// run whole (their own statistics, the fused kernels), their buffers from
/// a [`Pool`] of the walk's dead activations.
struct Tiles<'a> {
    xs: Vec<Tensor>,
    cancel: &'a Cancel,
    /// dead activations of the current resolution (one tile)
    pool: Pool,
    /// whether `xs` are the walk's own (no other tensor shares their
    /// storage), not the caller's input
    owned: bool,
}

impl<'a> Tiles<'a> {
    fn new(xs: Vec<Tensor>, cancel: &'a Cancel) -> Self {
        Self { xs, cancel, pool: Pool::default(), owned: false }
    }

    /// `x = f(x)` on every tile; `f` makes a fresh tensor.
    fn map(&mut self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<()> {
        for i in 0..self.xs.len() {
            self.cancel.check()?;
            let y = f(&self.xs[i])?;
            self.advance(i, y);
        }
        Ok(())
    }

    /// [`Tiles::map`] for a step whose output has other dims than its input
    /// (a resampling, the last convolution): the pool's buffers are dropped
    /// first, none would fit again.
    fn map_resized(&mut self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<()> {
        self.pool.clear();
        self.map(f)
    }

    /// Tile `i` becomes `y` (fresh, the walk's own); the activation it
    /// replaces is dead: where it was the walk's own, into the pool when it
    /// fits the new one (a single tile), else to the active spare.
    fn advance(&mut self, i: usize, y: Tensor) {
        let old = std::mem::replace(&mut self.xs[i], y);
        if self.owned {
            if self.xs.len() == 1 && old.dims() == self.xs[0].dims() {
                self.pool.put(old);
            } else {
                crate::engine::kernels::give_back(old);
            }
        }
        self.owned = true;
    }

    fn pooled(norm: &GroupNorm, xs: &[Tensor]) -> Result<GroupStats> {
        let st = xs.iter().map(|x| norm.stats(x)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(GroupStats::pool(&st)?)
    }

    /// The output norm, the walk's last steps at its resolution: the pool's
    /// buffers are dropped first, so that they do not add to the peak of
    /// memory that the top resolution's last steps reach.
    fn norm(&mut self, norm: &GroupNorm, silu: bool) -> Result<()> {
        self.pool.clear();
        if self.xs.len() == 1 {
            return self.map(|x| norm.forward(x, silu));
        }
        let st = Self::pooled(norm, &self.xs)?;
        self.map(|x| norm.forward_with(x, &st, silu))
    }

    fn resnet(&mut self, r: &ResnetBlock) -> Result<()> {
        if let [x] = self.xs.as_mut_slice() {
            self.cancel.check()?;
            let y = r.forward_pooled(x, None, &mut self.pool)?;
            self.advance(0, y);
            return Ok(());
        }
        let st1 = Self::pooled(r.norm1(), &self.xs)?;
        let mut hs = Vec::with_capacity(self.xs.len());
        for x in self.xs.iter_mut() {
            self.cancel.check()?;
            let (h, res) = r.first_half_with(x, &st1)?;
            *x = res;
            hs.push(h);
        }
        let st2 = Self::pooled(r.norm2(), &hs)?;
        // each hidden state is dropped as soon as its tile has advanced
        for (x, h) in self.xs.iter_mut().zip(hs) {
            self.cancel.check()?;
            *x = r.second_half_with(&h, x, &st2)?;
        }
        Ok(())
    }

    fn attention(&mut self, a: &VaeAttention) -> Result<()> {
        if self.xs.len() == 1 {
            return self.map(|x| a.forward(x));
        }
        let st = Self::pooled(a.norm(), &self.xs)?;
        self.map(|x| a.forward_with(x, &st))
    }
}

impl VaeEncoder {
    /// Pixels per latent pixel.
    fn downscale(&self) -> usize {
        1 << (self.down_blocks.len() - 1)
    }

    /// The moments (`quant_conv` output) of every tile, VAEHook-style.
    fn moments_tiles(&self, xs: Vec<Tensor>, cancel: &Cancel) -> Result<Vec<Tensor>> {
        let mut t = Tiles::new(xs, cancel);
        t.map(|x| self.conv_in.forward(x))?;
        for b in &self.down_blocks {
            for r in &b.resnets {
                t.resnet(r)?;
            }
            if let Some(d) = &b.down {
                t.map_resized(|x| d.forward(x))?;
            }
        }
        self.mid_block.forward_tiles(&mut t)?;
        t.norm(&self.conv_norm_out, true)?;
        t.map_resized(|x| self.quant_conv.forward(&self.conv_out.forward(x)?))?;
        Ok(t.xs)
    }

    /// Posterior mean as the official VAEHook computes it: whole when
    /// `max(H, W) <= tile + 64` (or `tile` is 0), else in tiles of about
    /// `tile` image px (rounded down to a multiple of 8) padded by 32 px, the
    /// network run block by block over all tiles with GroupNorm statistics
    /// pooled over them, the padding cropped off.
    pub fn encode_mean_tiled(&self, x: &Tensor, tile: usize, cancel: &Cancel) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let m = self.downscale();
        let tile = if tile == 0 { 0 } else { (tile / m * m).max(m) };
        match Plan::vaehook(h, w, tile, ENCODER_PAD, Scale::Down(m)) {
            None => self.encode_mean(x),
            Some(plan) => {
                let moments = plan.run(x, usize::MAX, cancel, |_, xs| self.moments_tiles(xs, cancel))?;
                Ok(moments.narrow(1, 0, self.latent_channels)?)
            }
        }
    }
}

impl VaeDecoder {
    fn upscale(&self) -> usize {
        1 << self.up_blocks.iter().filter(|b| b.up.is_some()).count()
    }

    fn decode_tiles(&self, zs: Vec<Tensor>, cancel: &Cancel) -> Result<Vec<Tensor>> {
        let mut t = Tiles::new(zs, cancel);
        t.map(|z| self.conv_in.forward(&self.post_quant_conv.forward(z)?))?;
        self.mid_block.forward_tiles(&mut t)?;
        for b in &self.up_blocks {
            for r in &b.resnets {
                t.resnet(r)?;
            }
            if let Some(u) = &b.up {
                t.map_resized(|x| u.forward(x, None))?;
            }
        }
        t.norm(&self.conv_norm_out, true)?;
        t.map_resized(|x| self.conv_out.forward(x))?;
        Ok(t.xs)
    }

    /// Decode as the official VAEHook does: whole when `max(h, w) <= tile + 22`
    /// latent px (or `tile` is 0), else in tiles of about `tile` latent px
    /// padded by 11, block by block with pooled GroupNorm statistics, cropped.
    pub fn decode_tiled(&self, z: &Tensor, tile: usize, cancel: &Cancel) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        match Plan::vaehook(h, w, tile, DECODER_PAD, Scale::Up(self.upscale())) {
            None => self.decode(z),
            Some(plan) => plan.run(z, usize::MAX, cancel, |_, zs| self.decode_tiles(zs, cancel)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tiny() -> VaeConfig {
        VaeConfig { block_out_channels: vec![8, 16, 16, 16], norm_num_groups: 4, ..VaeConfig::sd21_base() }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The pooled path (statistics, affine, SiLU, block order) is the plain
    /// forward: two identical tiles pool to each tile's own statistics, so
    /// each comes out as the whole frame does (which runs as one tile, its
    /// blocks whole).
    #[test]
    fn pooled_tiles_compute_the_plain_forward() {
        let vm = candle_nn::VarMap::new();
        let vb = nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let enc = VaeEncoder::new(&tiny(), vb.clone()).unwrap();
        let dec = VaeDecoder::new(&tiny(), vb).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 3, 48, 40), &Device::Cpu).unwrap();
        let cancel = Cancel::new();
        let whole = enc.posterior(&x).unwrap().0;
        for m in enc.moments_tiles(vec![x.clone(), x.clone()], &cancel).unwrap() {
            assert!(max_diff(&m.narrow(1, 0, 4).unwrap(), &whole) < 1e-4);
        }
        let z = Tensor::randn(0f32, 1., (1, 4, 6, 5), &Device::Cpu).unwrap();
        let whole = dec.decode(&z).unwrap();
        for d in dec.decode_tiles(vec![z.clone(), z.clone()], &cancel).unwrap() {
            assert!(max_diff(&d, &whole) < 1e-4);
        }
        // tiled (forced small tiles) lands near the whole-frame result but not on it
        let x = Tensor::randn(0f32, 1., (1, 3, 160, 200), &Device::Cpu).unwrap();
        let tiled = enc.encode_mean_tiled(&x, 64, &cancel).unwrap();
        let whole = enc.encode_mean(&x).unwrap();
        assert_eq!(tiled.dims(), whole.dims());
        let z = Tensor::randn(0f32, 1., (1, 4, 30, 27), &Device::Cpu).unwrap();
        let tiled = dec.decode_tiled(&z, 4, &cancel).unwrap();
        assert_eq!(tiled.dims(), &[1, 3, 240, 216]);
    }
}
