//! The SD-2.1 UNet (diffusers' `UNet2DConditionModel`), configured from the
//! folder's own `config.json` (so the tiny fixture and the real SD-2.1-base
//! both load), built from [`super::layers`] so the CPU path runs on our
//! kernels, with weights from a LoRA-merging backend.
use std::path::Path;

use candle_core::{DType, Module, Tensor, D};
use candle_nn as nn;

use super::config::{check_levels, check_size, json_usize, json_usizes, read_json, MAX_LAYERS};
use super::error::{EngineError, Result};
use super::layers::{linear, Conv, GroupNorm, Linear, ResnetBlock, SpatialTransformer, Upsample};

/// One resolution level of the UNet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockConfig {
    pub out_channels: usize,
    /// `Some(depth)`: cross-attention transformers of that depth follow each resnet.
    pub use_cross_attn: Option<usize>,
    /// Number of attention heads (diffusers' `attention_head_dim` for SD 2.x).
    pub attention_head_dim: usize,
}

/// The fields of diffusers' UNet config.json that shape the model.
#[derive(Clone, Debug, PartialEq)]
pub struct UNet2DConditionModelConfig {
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub blocks: Vec<BlockConfig>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

/// The UNet's architecture plus its input/output channel counts.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub model: UNet2DConditionModelConfig,
    pub in_channels: usize,
    pub out_channels: usize,
}

impl UNetConfig {
    pub fn from_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let bad = |reason: String| EngineError::Config { path: path.to_path_buf(), reason };
        let channels = json_usizes(&v, "block_out_channels", path)?;
        let n = channels.len();
        let down_types: Vec<String> = v
            .get("down_block_types")
            .and_then(|x| x.as_array())
            .ok_or_else(|| bad("`down_block_types` missing".into()))?
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect();
        if down_types.len() != n {
            return Err(bad(format!("{} down blocks for {n} channel counts", down_types.len())));
        }
        // diffusers' `attention_head_dim` is, for SD 2.x, the number of heads.
        let heads: Vec<usize> = match v.get("attention_head_dim") {
            Some(serde_json::Value::Number(_)) => vec![json_usize(&v, "attention_head_dim", None, path)?; n],
            Some(serde_json::Value::Array(_)) => json_usizes(&v, "attention_head_dim", path)?,
            _ => vec![8; n],
        };
        if heads.len() != n {
            return Err(bad(format!("{} attention head counts for {n} blocks", heads.len())));
        }
        let tlpb = json_usize(&v, "transformer_layers_per_block", Some(1), path)?;
        if tlpb == 0 || tlpb > MAX_LAYERS {
            return Err(bad(format!("`transformer_layers_per_block` is {tlpb}, expected 1 to {MAX_LAYERS}")));
        }
        let blocks = (0..n)
            .map(|i| BlockConfig {
                out_channels: channels[i],
                use_cross_attn: down_types[i].starts_with("CrossAttn").then_some(tlpb),
                attention_head_dim: heads[i],
            })
            .collect();
        let f64_or = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let model = UNet2DConditionModelConfig {
            center_input_sample: v.get("center_input_sample").and_then(|x| x.as_bool()).unwrap_or(false),
            flip_sin_to_cos: v.get("flip_sin_to_cos").and_then(|x| x.as_bool()).unwrap_or(true),
            freq_shift: f64_or("freq_shift", 0.0),
            blocks,
            layers_per_block: json_usize(&v, "layers_per_block", Some(2), path)?,
            downsample_padding: json_usize(&v, "downsample_padding", Some(1), path)?,
            mid_block_scale_factor: f64_or("mid_block_scale_factor", 1.0),
            norm_num_groups: json_usize(&v, "norm_num_groups", Some(32), path)?,
            norm_eps: f64_or("norm_eps", 1e-5),
            cross_attention_dim: json_usize(&v, "cross_attention_dim", None, path)?,
            use_linear_projection: v.get("use_linear_projection").and_then(|x| x.as_bool()).unwrap_or(false),
        };
        let cfg = Self {
            model,
            in_channels: json_usize(&v, "in_channels", Some(4), path)?,
            out_channels: json_usize(&v, "out_channels", Some(4), path)?,
        };
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Refuse sizes no weights can stand behind before anything is built:
    /// zero or absurd level counts and channels, head counts of 0 or that do
    /// not divide their level's channels (the head width would be 0 or cut).
    fn check(&self, path: &Path) -> Result<()> {
        let m = &self.model;
        let bad = |reason: String| Err(EngineError::Config { path: path.to_path_buf(), reason });
        let channels: Vec<usize> = m.blocks.iter().map(|b| b.out_channels).collect();
        check_levels(path, &channels, m.norm_num_groups, m.layers_per_block)?;
        let last = m.blocks.len() - 1;
        for (i, b) in m.blocks.iter().enumerate() {
            // the mid block attends with the last level's head count
            if (b.use_cross_attn.is_some() || i == last)
                && (b.attention_head_dim == 0 || b.out_channels % b.attention_head_dim != 0)
            {
                return bad(format!(
                    "`attention_head_dim` {} of block {i} does not divide its {} channels into heads",
                    b.attention_head_dim, b.out_channels
                ));
            }
        }
        for (k, c) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("cross_attention_dim", m.cross_attention_dim),
        ] {
            check_size(path, k, c)?;
        }
        // padding is allocated with every frame: diffusers uses 0 or 1
        if m.downsample_padding > 4 {
            return bad(format!("`downsample_padding` is {}, expected 0 to 4", m.downsample_padding));
        }
        if !(m.norm_eps.is_finite() && m.norm_eps > 0.0) {
            return bad(format!("`norm_eps` {} is not a positive number", m.norm_eps));
        }
        Ok(())
    }

    /// SD-2.1-base (epsilon prediction, 512 px).
    pub fn sd21_base() -> Self {
        let b = |c, x: bool, h| BlockConfig { out_channels: c, use_cross_attn: x.then_some(1), attention_head_dim: h };
        Self {
            model: UNet2DConditionModelConfig {
                blocks: vec![b(320, true, 5), b(640, true, 10), b(1280, true, 20), b(1280, false, 20)],
                center_input_sample: false,
                flip_sin_to_cos: true,
                freq_shift: 0.0,
                layers_per_block: 2,
                downsample_padding: 1,
                mid_block_scale_factor: 1.0,
                norm_num_groups: 32,
                norm_eps: 1e-5,
                cross_attention_dim: 1024,
                use_linear_projection: true,
            },
            in_channels: 4,
            out_channels: 4,
        }
    }
}

/// A resolution level: resnets, each followed by a transformer when the level
/// has cross-attention, then a stride-2 conv (down) or an upsampler (up).
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    down: Option<Conv>,
    up: Option<Upsample>,
}

impl Level {
    fn step(&self, i: usize, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.resnets[i].forward(x, Some(temb))?;
        match self.attentions.get(i) {
            Some(a) => a.forward(&h, ctx),
            None => Ok(h),
        }
    }
}

/// diffusers' `UNet2DConditionModel` (SD 1.x/2.x layout).
pub struct UNet {
    cfg: UNetConfig,
    conv_in: Conv,
    time_1: Linear,
    time_2: Linear,
    down: Vec<Level>,
    mid_res0: ResnetBlock,
    mid_attn: Vec<SpatialTransformer>,
    mid_res1: ResnetBlock,
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv,
}

impl UNet {
    pub fn new(vb: nn::VarBuilder, cfg: &UNetConfig) -> candle_core::Result<Self> {
        let m = &cfg.model;
        let n = m.blocks.len();
        let c0 = m.blocks[0].out_channels;
        let temb = 4 * c0;
        let (g, eps, ctx) = (m.norm_num_groups, m.norm_eps, m.cross_attention_dim);
        let transformers = |vb: nn::VarBuilder,
                            count: usize,
                            c: usize,
                            b: &BlockConfig|
         -> candle_core::Result<Vec<SpatialTransformer>> {
            match b.use_cross_attn {
                Some(depth) => (0..count)
                    .map(|i| {
                        let heads = b.attention_head_dim;
                        SpatialTransformer::new(
                            vb.pp(format!("attentions.{i}")),
                            c,
                            heads,
                            c / heads,
                            depth,
                            ctx,
                            g,
                            m.use_linear_projection,
                        )
                    })
                    .collect(),
                None => Ok(vec![]),
            }
        };
        let mut down = vec![];
        for (i, b) in m.blocks.iter().enumerate() {
            let vbi = vb.pp(format!("down_blocks.{i}"));
            let cin = if i > 0 { m.blocks[i - 1].out_channels } else { c0 };
            let c = b.out_channels;
            let resnets = (0..m.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        vbi.pp(format!("resnets.{j}")),
                        if j == 0 { cin } else { c },
                        c,
                        Some(temb),
                        g,
                        eps,
                        1.0,
                    )
                })
                .collect::<candle_core::Result<_>>()?;
            let p = m.downsample_padding;
            let down_conv = if i + 1 < n {
                Some(Conv::new(vbi.pp("downsamplers.0.conv"), c, c, 3, 2, [p; 4], true)?)
            } else {
                None
            };
            down.push(Level {
                resnets,
                attentions: transformers(vbi.clone(), m.layers_per_block, c, b)?,
                down: down_conv,
                up: None,
            });
        }
        let last = m.blocks[n - 1];
        let cl = last.out_channels;
        let vbm = vb.pp("mid_block");
        let mid_cfg = BlockConfig { use_cross_attn: Some(last.use_cross_attn.unwrap_or(1)), ..last };
        let mid_res0 = ResnetBlock::new(vbm.pp("resnets.0"), cl, cl, Some(temb), g, eps, m.mid_block_scale_factor)?;
        let mid_attn = transformers(vbm.clone(), 1, cl, &mid_cfg)?;
        let mid_res1 = ResnetBlock::new(vbm.pp("resnets.1"), cl, cl, Some(temb), g, eps, m.mid_block_scale_factor)?;
        let mut up = vec![];
        for i in 0..n {
            let vbi = vb.pp(format!("up_blocks.{i}"));
            let b = m.blocks[n - 1 - i];
            let c = b.out_channels;
            let prev = if i > 0 { m.blocks[n - i].out_channels } else { cl };
            let skip_in = m.blocks[if i == n - 1 { 0 } else { n - i - 2 }].out_channels;
            let layers = m.layers_per_block + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { skip_in } else { c };
                    let rin = if j == 0 { prev } else { c };
                    ResnetBlock::new(vbi.pp(format!("resnets.{j}")), rin + skip, c, Some(temb), g, eps, 1.0)
                })
                .collect::<candle_core::Result<_>>()?;
            let upsample = if i + 1 < n { Some(Upsample::new(vbi.pp("upsamplers.0"), c)?) } else { None };
            up.push(Level { resnets, attentions: transformers(vbi.clone(), layers, c, &b)?, down: None, up: upsample });
        }
        Ok(Self {
            cfg: cfg.clone(),
            conv_in: Conv::same3(vb.pp("conv_in"), cfg.in_channels, c0)?,
            time_1: linear(c0, temb, vb.pp("time_embedding.linear_1"))?,
            time_2: linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            down,
            mid_res0,
            mid_attn,
            mid_res1,
            up,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, c0, eps)?,
            conv_out: Conv::same3(vb.pp("conv_out"), c0, cfg.out_channels)?,
        })
    }

    /// Sinusoidal timestep features (diffusers' `Timesteps`), `[B, c0]`.
    fn time_features(
        &self,
        t: f64,
        batch: usize,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let m = &self.cfg.model;
        let half = m.blocks[0].out_channels / 2;
        // in f32, as diffusers computes it
        let arg: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / (half as f32 - m.freq_shift as f32)).exp() * t as f32)
            .collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = arg.iter().map(|a| (a.cos(), a.sin())).unzip();
        let emb = if m.flip_sin_to_cos { [cos, sin].concat() } else { [sin, cos].concat() };
        let n = emb.len();
        Tensor::from_vec(emb, (1, n), dev)?.repeat((batch, 1))?.to_dtype(dtype)
    }

    /// Noise prediction for latent `x` `[B, 4, h, w]` at timestep `t` with
    /// encoder states `ctx` `[B, T, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, t: f64, ctx: &Tensor) -> candle_core::Result<Tensor> {
        let (bsz, _, h, w) = x.dims4()?;
        let m = &self.cfg.model;
        let x = if m.center_input_sample { ((x * 2.0)? - 1.0)? } else { x.clone() };
        let emb = self.time_features(t, bsz, x.dtype(), x.device())?;
        let emb = self.time_2.forward(&nn::ops::silu(&self.time_1.forward(&emb)?)?)?;
        // every resnet takes SiLU(emb); compute it once
        let temb = nn::ops::silu(&emb)?;
        let mut hx = self.conv_in.forward(&x)?;
        let mut skips = vec![hx.clone()];
        for lvl in &self.down {
            for i in 0..lvl.resnets.len() {
                hx = lvl.step(i, &hx, &temb, ctx)?;
                skips.push(hx.clone());
            }
            if let Some(d) = &lvl.down {
                hx = d.forward(&hx)?;
                skips.push(hx.clone());
            }
        }
        hx = self.mid_res0.forward(&hx, Some(&temb))?;
        for a in &self.mid_attn {
            hx = a.forward(&hx, ctx)?;
        }
        hx = self.mid_res1.forward(&hx, Some(&temb))?;
        let factor = 1usize << (self.up.len() - 1);
        let odd = h % factor != 0 || w % factor != 0;
        for lvl in &self.up {
            for i in 0..lvl.resnets.len() {
                let skip = skips.pop().expect("one skip per up resnet");
                hx = lvl.step(i, &Tensor::cat(&[&hx, &skip], 1)?, &temb, ctx)?;
            }
            if let Some(u) = &lvl.up {
                // sizes not divisible by 2^levels: upsample to the matching skip's size
                let size = match (odd, skips.last()) {
                    (true, Some(s)) => Some((s.dim(2)?, s.dim(D::Minus1)?)),
                    _ => None,
                };
                hx = u.forward(&hx, size)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&hx, true)?)
    }
}
