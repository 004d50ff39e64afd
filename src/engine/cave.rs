//! CaVE, the Compression-aware Visual Embedder (an FBCNN-style UNet).
//!
//! Encoder: `m_head` (3x3) -> `m_down1` (nb ResBlocks + 2x2/2 conv) -> `m_down2`
//! and `m_down3` (nb ResBlocks + 4x4/4 conv) -> `m_body_encoder` (nb ResBlocks):
//! total stride 32. Its output, flattened row-major, is the visual embedding that
//! conditions the diffusion UNet. `qf_pred` (nb ResBlocks, average pool, three
//! Linear layers, sigmoid) estimates q, with QF = 100 (1 - q). The decoder half
//! (`m_body_decoder`, `m_up3..1` with skip additions; the up-path blocks are the
//! reference's QFAttention run with gamma = beta = 1, i.e. `x + res(x) + 1`, `m_tail`) reconstructs the
//! clean image: it is the restorer of `mode=cave`.
//!
//! codiff's own models may add FBCNN-style quality conditioning (`qf_embed.*`,
//! `to_gamma_L.*`, `to_beta_L.*`; see [`QfConditioning`]): the decoder then
//! restores as if the JPEG quality were a given QF (the model's own estimate
//! unless the caller names one), with per-channel gamma and beta in place of
//! the constant 1s. Official files have none of these keys.
//!
//! Sizes (`nc`, `nb`) come from the tensors themselves, so the official
//! `cave.pth` (nc [64,128,256,512], nb 4) and our compact model load alike.
//! BatchNorm (eval mode, eps 1e-4) is folded into the convolution before it.
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{ConvTranspose2d, ConvTranspose2dConfig, Linear};

use super::error::{EngineError, Result};
use super::kernels::{build_with, AddInto, Math, PadInto, PatchConvTranspose, PatchInto};
use super::layers::{Conv, Pool};
use super::tiling::Plan;
use super::weights::TensorFile;
use super::Cancel;

const BN_EPS: f64 = 1e-4;

/// The down- and upsampling factor between consecutive levels (kernel = stride).
pub const SCALES: [usize; 3] = [2, 4, 4];

/// Widths of the four levels and the number of ResBlocks per stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaveConfig {
    pub nc: [usize; 4],
    pub nb: usize,
}

impl CaveConfig {
    /// Floating-point operations per input pixel of one reconstruction
    /// (a multiply-add counts 2), counted from the layers: the 3x3 head and
    /// tail, `nb` ResBlocks of two 3x3 convolutions at each level of the
    /// encoder, the decoder and the body, the QF head's ResBlocks, the
    /// stride-k downsampling convolutions and the transposed upsampling ones.
    /// Levels below full resolution count by their share of the pixels.
    /// Element-wise work (adds, ReLU) and the QF head's three linear layers on
    /// one pooled vector are left out (under 1 %).
    pub fn flops_per_pixel(&self) -> f64 {
        let (nc, nb) = (self.nc.map(|c| c as f64), self.nb as f64);
        let conv3 = |cin: f64, cout: f64| 2.0 * cin * cout * 9.0;
        // pixels of level i per input pixel
        let mut share = [1.0f64; 4];
        for i in 0..3 {
            share[i + 1] = share[i] / (SCALES[i] * SCALES[i]) as f64;
        }
        let blocks = |i: usize| nb * 2.0 * conv3(nc[i], nc[i]) * share[i];
        let mut f = conv3(3.0, nc[0]) + conv3(nc[0], 3.0);
        for i in 0..3 {
            let k2 = (SCALES[i] * SCALES[i]) as f64;
            // encoder and decoder blocks at level i
            f += 2.0 * blocks(i);
            // stride-k conv down and transposed conv up: k*k per coarse pixel each
            f += 2.0 * (2.0 * nc[i] * nc[i + 1] * k2 * share[i + 1]);
        }
        // body encoder, body decoder and the QF head's blocks at the coarsest level
        f + 3.0 * blocks(3)
    }
}

/// `a + b`, into `a`'s buffer when the caller owns it alone (CPU).
fn add_into(a: Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && a.is_contiguous() {
        a.inplace_op2(&b.contiguous()?, &AddInto)?;
        Ok(a)
    } else {
        a + b
    }
}

struct Up {
    candle: ConvTranspose2d,
    fast: Option<PatchConvTranspose>,
}

impl Up {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.fast {
            Some(op) => x.contiguous()?.apply_op1_no_bwd(op),
            None => self.candle.forward(x),
        }
    }

    /// [`Up::forward`] into `dst`'s buffer where it fits (the caller owns
    /// `dst` alone), else a fresh tensor.
    fn forward_into(&self, x: &Tensor, dst: Option<Tensor>) -> candle_core::Result<Tensor> {
        if let (Some(op), Some(dst)) = (&self.fast, dst) {
            let (b, _, h, w) = x.dims4()?;
            if dst.is_contiguous() && dst.dims() == [b, op.cout, h * op.k, w * op.k] {
                dst.inplace_op2(&x.contiguous()?, &PatchInto(op))?;
                return Ok(dst);
            }
        }
        self.forward(x)
    }
}

struct ResBlock {
    conv1: Conv,
    conv2: Conv,
    /// conv2's own weight and bias (no shift folded in), kept by the decoder's
    /// QFAttention blocks of conditioned models to build the modulated conv2.
    raw2: Option<(Tensor, Tensor)>,
}

/// ResBlocks in a row on `x`, their buffers from `pool`. Unless `owned` (no
/// other tensor shares `x`'s storage), `x` lives on (a skip): the first
/// block writes `x + res(x)` into a dead buffer; then each block adds its
/// residual branch into its input's buffer, and its inner activation goes
/// back to the pool for the next. `conv2s` replaces the blocks' conv2
/// (quality conditioning). The output is the caller's alone.
fn run_blocks(
    blocks: &[ResBlock],
    x: Tensor,
    mut owned: bool,
    conv2s: Option<&[Conv]>,
    pool: &mut Pool,
) -> candle_core::Result<Tensor> {
    let mut x = x;
    for (j, b) in blocks.iter().enumerate() {
        let dims = x.dims().to_vec();
        let conv2 = conv2s.map_or(&b.conv2, |c| &c[j]);
        // in bf16 the inner activation goes from conv1 to conv2 as the
        // channel pairs conv2 would round it to: half the bytes, no second
        // conversion, the same numbers
        let (c, w) = (dims[1], dims[3]);
        let h = if c.is_multiple_of(2) && b.conv1.pairs_for(w) && conv2.pairs_for(w) {
            pool.conv_pairs(&b.conv1, &x, &[dims[0], c / 2, dims[2], w])?
        } else {
            pool.conv(&b.conv1, &x, &dims)?
        };
        x = if owned {
            conv2.forward_into(&h, x, true)?
        } else {
            match pool.take(&dims) {
                Some(t) => conv2.forward_plus_into(&h, t, &x)?,
                // pairs go into a buffer (the one path that reads them)
                None if h.dtype() == DType::U32 => {
                    conv2.forward_plus_into(&h, pool.take_or_new(&dims, DType::F32, h.device())?, &x)?
                }
                None => conv2.forward_add(&h, Some(&x))?,
            }
        };
        owned = true;
        pool.put(h);
    }
    Ok(x)
}

/// Loads layers out of a [`TensorFile`], checking each shape.
struct Loader<'a> {
    f: &'a TensorFile,
    dev: &'a Device,
}

impl Loader<'_> {
    /// The tensor `key` of `shape`, in f32 on the model's device.
    fn t(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.f.get_shaped(key, shape)?.to_dtype(DType::F32)?.to_device(self.dev)?)
    }

    fn conv(&self, p: &str, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv> {
        let (w, b) = self.conv_raw(p, cin, cout, k)?;
        let pad = if k == 3 { 1 } else { 0 };
        Ok(Conv::from_tensors(w, Some(b), stride, [pad; 4], false)?)
    }

    /// Weight and bias of the convolution `p`.
    fn conv_raw(&self, p: &str, cin: usize, cout: usize, k: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.t(&format!("{p}.weight"), &[cout, cin, k, k])?, self.t(&format!("{p}.bias"), &[cout])?))
    }

    /// conv -> BatchNorm folded into one conv: weight and bias.
    fn conv_bn(&self, conv: &str, bn: &str, c: usize) -> Result<(Tensor, Tensor)> {
        let w = self.t(&format!("{conv}.weight"), &[c, c, 3, 3])?;
        let b = self.t(&format!("{conv}.bias"), &[c])?;
        let g = self.t(&format!("{bn}.weight"), &[c])?;
        let beta = self.t(&format!("{bn}.bias"), &[c])?;
        let mean = self.t(&format!("{bn}.running_mean"), &[c])?;
        let var = self.t(&format!("{bn}.running_var"), &[c])?;
        let scale = (g / (var + BN_EPS)?.sqrt()?)?;
        let w = w.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let b = ((b - mean)? * &scale)?.add(&beta)?;
        Ok((w, b))
    }

    fn resblock(&self, p: &str, c: usize) -> Result<ResBlock> {
        self.resblock_shifted(p, c, 0.0, false)
    }

    /// `x + res(x) + beta`: the decoder's QFAttention blocks, which the
    /// reference runs with gamma = beta = 1 (beta is folded into the bias).
    /// `keep_raw` keeps conv2's own weight and bias for [`QfConditioning`].
    fn resblock_shifted(&self, p: &str, c: usize, beta: f64, keep_raw: bool) -> Result<ResBlock> {
        let (w2, b2) = self.conv_raw(&format!("{p}.res.3"), c, c, 3)?;
        let raw2 = keep_raw.then(|| (w2.clone(), b2.clone()));
        let b2 = if beta != 0.0 { (b2 + beta)? } else { b2 };
        let (w1, b1) = self.conv_bn(&format!("{p}.res.0"), &format!("{p}.res.1"), c)?;
        Ok(ResBlock {
            conv1: Conv::from_tensors(w1, Some(b1), 1, [1; 4], true)?,
            conv2: Conv::from_tensors(w2, Some(b2), 1, [1; 4], false)?,
            raw2,
        })
    }

    /// `nb` ResBlocks at `p.{offset}..`; PyTorch names a lone module without the
    /// index (FBCNN's `sequential()` collapses one-element containers).
    fn blocks(&self, p: &str, offset: usize, nb: usize, c: usize, alone: bool) -> Result<Vec<ResBlock>> {
        if alone && nb == 1 && !self.f.contains(&format!("{p}.0.res.0.weight")) {
            return Ok(vec![self.resblock(p, c)?]);
        }
        (0..nb).map(|i| self.resblock(&format!("{p}.{}", i + offset), c)).collect()
    }

    fn linear(&self, p: &str, cin: usize, cout: usize) -> Result<Linear> {
        Ok(Linear::new(self.t(&format!("{p}.weight"), &[cout, cin])?, Some(self.t(&format!("{p}.bias"), &[cout])?)))
    }

    fn up(&self, p: &str, cin: usize, cout: usize, k: usize) -> Result<Up> {
        let w = self.t(&format!("{p}.weight"), &[cin, cout, k, k])?;
        let b = self.t(&format!("{p}.bias"), &[cout])?;
        let fast = if self.dev.is_cpu() { Some(PatchConvTranspose::from_tensors(&w, &b)?) } else { None };
        Ok(Up {
            candle: ConvTranspose2d::new(w, Some(b), ConvTranspose2dConfig { stride: k, ..Default::default() }),
            fast,
        })
    }
}

pub struct Cave {
    pub config: CaveConfig,
    head: Conv,
    down: [(Vec<ResBlock>, Conv); 3],
    body_encoder: Vec<ResBlock>,
    body_decoder: Vec<ResBlock>,
    up: [(Up, Vec<ResBlock>); 3],
    tail: Conv,
    qf_blocks: Vec<ResBlock>,
    qf_linear: [Linear; 3],
    qf_calibration: Option<QfCalibration>,
    conditioning: Option<QfConditioning>,
    device: Device,
    /// the arithmetic its CPU kernels were built for (the per-quality conv2s too)
    math: Math,
    /// the last reconstruction's dead buffers, for the next frame of its size
    pool: FramePool,
}

/// A [`Pool`] kept between frames with the padded frame dims it served: the
/// next frame of those dims takes it, one of others drops it first (so a
/// size change frees the old buffers before allocating new ones). Frames
/// reconstructed at once on one model share it first come, first served.
#[derive(Default)]
struct FramePool(std::sync::Mutex<Option<(Vec<usize>, Pool)>>);

impl FramePool {
    fn take_for(&self, dims: &[usize]) -> Pool {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match kept {
            Some((d, pool)) if d == dims => pool,
            _ => Pool::default(),
        }
    }

    fn keep(&self, dims: &[usize], pool: Pool) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((dims.to_vec(), pool));
    }

    /// The kept pool, when it served frames padded to `frame`.
    fn with<R>(&self, frame: &[usize], f: impl FnOnce(&mut Pool) -> R) -> Option<R> {
        match &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((d, pool)) if d == frame => Some(f(pool)),
            _ => None,
        }
    }
}

/// The quality a conditioned model restores for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Steer {
    /// Its own estimate ([`Cave::qf`]).
    Own,
    /// This quality (0..100), whatever the frame says.
    Told(f32),
    /// Its own estimate while that is within [`Steer::TRUST_OWN_WITHIN`] of
    /// this measured quality (read from the quantisation tables), else the
    /// measured one. The model was trained on its own estimates, which steer
    /// it best on photos (told the exact QF 5 instead of its estimate of about
    /// 4, the eval photos' PSNR-B-Y falls 0.17 dB); on graphics the estimate
    /// collapses towards 0 and the model would smooth as if the frame were
    /// QF 0.
    Measured(f32),
}

impl Steer {
    pub const TRUST_OWN_WITHIN: f32 = 8.0;
}

impl From<Option<f32>> for Steer {
    fn from(q: Option<f32>) -> Self {
        q.map_or(Steer::Own, Steer::Told)
    }
}

/// FBCNN-style quality conditioning of codiff's own models: c = 1 - QF/100
/// through `qf_embed` (Linear(1,H), ReLU, Linear(H,H)) to per-channel
/// gamma = 1 + tanh(to_gamma_L(e)) and beta = 1 + tanh(to_beta_L(e)) for the
/// QFAttention blocks of up stage L (`x + gamma * res(x) + beta`). Zero heads
/// give gamma = beta = 1, the unconditioned model (how training starts).
struct QfConditioning {
    embed: [Linear; 2],
    /// (to_gamma_L, to_beta_L) for L = 1, 2, 3 (index 0, 1, 2 of `Cave::up`)
    heads: [(Linear, Linear); 3],
}

impl QfConditioning {
    fn load(l: &Loader, nc: [usize; 4]) -> Result<Option<Self>> {
        if !l.f.contains("qf_embed.0.weight") {
            return Ok(None);
        }
        let hidden = l.f.get("qf_embed.0.weight")?.dims().first().copied().unwrap_or(0);
        let head = |kind: &str, lvl: usize| l.linear(&format!("to_{kind}_{lvl}.0"), hidden, nc[lvl - 1]);
        Ok(Some(Self {
            embed: [l.linear("qf_embed.0", 1, hidden)?, l.linear("qf_embed.2", hidden, hidden)?],
            heads: [
                (head("gamma", 1)?, head("beta", 1)?),
                (head("gamma", 2)?, head("beta", 2)?),
                (head("gamma", 3)?, head("beta", 3)?),
            ],
        }))
    }

    /// (gamma, beta), each `[C_L]`, for up stages L = 1, 2, 3 at quality `qf`.
    fn modulation(&self, qf: f32, dev: &Device) -> Result<[(Tensor, Tensor); 3]> {
        let c = Tensor::new(&[[1.0 - qf.clamp(0.0, 100.0) / 100.0]], dev)?;
        let e = self.embed[1].forward(&self.embed[0].forward(&c)?.relu()?)?;
        let one = |lin: &Linear| -> Result<Tensor> { Ok((lin.forward(&e)?.tanh()? + 1.0)?.squeeze(0)?) };
        let [a, b, c] = &self.heads;
        Ok([(one(&a.0)?, one(&a.1)?), (one(&b.0)?, one(&b.1)?), (one(&c.0)?, one(&c.1)?)])
    }
}

/// The decoder's QFAttention conv2s with one quality's gamma and beta folded
/// in (`gamma * (W x + b) + beta`), per up stage and block.
struct Modulated([Vec<Conv>; 3]);

/// Optional `qf_calibration` tensor `[2, K]` of codiff's own exports: raw
/// estimates (row 0, increasing) and the qualities they stand for (row 1).
/// Raw estimates are interpolated between knots, shifted by the nearest end
/// knot's offset beyond them. Official `cave.pth` files have none.
#[derive(Clone, Debug, PartialEq)]
pub struct QfCalibration {
    raw: Vec<f32>,
    qf: Vec<f32>,
}

impl QfCalibration {
    const KEY: &'static str = "qf_calibration";

    fn load(f: &TensorFile) -> Result<Option<Self>> {
        if !f.contains(Self::KEY) {
            return Ok(None);
        }
        let t = f.get(Self::KEY)?;
        if t.rank() != 2 || t.dim(0)? != 2 || t.dim(1)? < 2 {
            return Err(EngineError::Format {
                path: f.path.clone(),
                reason: format!("tensor `{}` has shape {:?}, expected [2, K] with K >= 2 knots", Self::KEY, t.dims()),
            });
        }
        let rows = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let (raw, qf) = (rows[0].clone(), rows[1].clone());
        let ok = raw.iter().chain(&qf).all(|v| v.is_finite()) && raw.windows(2).all(|w| w[0] < w[1]);
        if !ok {
            return Err(EngineError::Format {
                path: f.path.clone(),
                reason: format!(
                    "tensor `{}` must hold finite values with increasing raw estimates in row 0",
                    Self::KEY
                ),
            });
        }
        Ok(Some(Self { raw, qf }))
    }

    /// The calibrated quality for a raw estimate.
    pub fn apply(&self, raw: f32) -> f32 {
        let (r, q) = (&self.raw, &self.qf);
        let n = r.len();
        let y = if raw <= r[0] {
            q[0] + (raw - r[0])
        } else if raw >= r[n - 1] {
            q[n - 1] + (raw - r[n - 1])
        } else {
            let i = r.partition_point(|&v| v <= raw) - 1;
            q[i] + (q[i + 1] - q[i]) * (raw - r[i]) / (r[i + 1] - r[i])
        };
        y.clamp(0.0, 100.0)
    }
}

/// Encoder outputs kept for the decoder's skip additions.
struct Features {
    /// each level's input, which the decoder adds back
    skips: [Tensor; 4],
    body: Tensor,
}

impl Cave {
    /// Infer `nc` and `nb` from the tensors' shapes.
    pub fn config_of(f: &TensorFile) -> Result<CaveConfig> {
        let dims = |k: &str| -> Result<Vec<usize>> { Ok(f.get(k)?.dims().to_vec()) };
        let head = dims("m_head.weight")?;
        let mut nb = 0;
        while f.contains(&format!("m_down1.{nb}.res.0.weight")) {
            nb += 1;
        }
        if nb == 0 {
            return Err(EngineError::MissingTensor { path: f.path.clone(), key: "m_down1.0.res.0.weight".into() });
        }
        let c1 = dims(&format!("m_down1.{nb}.weight"))?[0];
        let c2 = dims(&format!("m_down2.{nb}.weight"))?[0];
        let c3 = dims(&format!("m_down3.{nb}.weight"))?[0];
        Ok(CaveConfig { nc: [head[0], c1, c2, c3], nb })
    }

    pub fn load(f: &TensorFile, device: &Device) -> Result<Self> {
        let config = Self::config_of(f)?;
        let CaveConfig { nc, nb } = config;
        let l = Loader { f, dev: device };
        let conditioning = QfConditioning::load(&l, nc)?;
        let conditioned = conditioning.is_some();
        let down = |i: usize, k: usize| -> Result<(Vec<ResBlock>, Conv)> {
            let p = format!("m_down{}", i + 1);
            Ok((l.blocks(&p, 0, nb, nc[i], false)?, l.conv(&format!("{p}.{nb}"), nc[i], nc[i + 1], k, k)?))
        };
        let up = |i: usize, k: usize| -> Result<(Up, Vec<ResBlock>)> {
            let p = format!("m_up{}", i + 1);
            let blocks = (1..=nb)
                .map(|j| l.resblock_shifted(&format!("{p}.{j}"), nc[i], 1.0, conditioned))
                .collect::<Result<_>>()?;
            Ok((l.up(&format!("{p}.0"), nc[i + 1], nc[i], k)?, blocks))
        };
        // the image's own convolutions (head, tail) and the QF head stay f32
        // whatever the arithmetic: bf16's 8-bit mantissa is one code value on
        // a [0, 1] pixel (the restored eval photos lost 0.08-0.23 dB PSNR-Y
        // with them in bf16), and the QF head keeps the reported estimate
        // within a few hundredths of the f32 one
        let (head, tail, qf_blocks, qf_linear) = build_with(Math::F32, || -> Result<_> {
            let qf_linear = [
                l.linear(&format!("qf_pred.{}", nb + 2), nc[3], nc[3])?,
                l.linear(&format!("qf_pred.{}", nb + 4), nc[3], nc[3])?,
                l.linear(&format!("qf_pred.{}", nb + 6), nc[3], 1)?,
            ];
            Ok((
                l.conv("m_head", 3, nc[0], 3, 1)?,
                l.conv("m_tail", nc[0], 3, 3, 1)?,
                l.blocks("qf_pred", 0, nb, nc[3], false)?,
                qf_linear,
            ))
        })?;
        Ok(Self {
            config,
            head,
            down: [down(0, SCALES[0])?, down(1, SCALES[1])?, down(2, SCALES[2])?],
            body_encoder: l.blocks("m_body_encoder", 0, nb, nc[3], true)?,
            body_decoder: l.blocks("m_body_decoder", 0, nb, nc[3], true)?,
            up: [up(0, SCALES[0])?, up(1, SCALES[1])?, up(2, SCALES[2])?],
            tail,
            qf_blocks,
            qf_linear,
            qf_calibration: QfCalibration::load(f)?,
            conditioning,
            device: device.clone(),
            math: super::kernels::building(),
            pool: FramePool::default(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Replicate-pad bottom/right to a multiple of `m`.
    pub fn pad_to(x: &Tensor, m: usize) -> Result<Tensor> {
        Self::pad_to_min(x, m, 0)
    }

    /// Replicate-pad bottom/right to a multiple of `m` and at least `min` pixels.
    pub fn pad_to_min(x: &Tensor, m: usize, min: usize) -> Result<Tensor> {
        Ok(Self::pad_into(x, m, min, &mut Pool::default())?.0)
    }

    /// The dims of [`Cave::pad_to_min`]'s result for an input of `dims`.
    fn padded_dims(dims: &[usize], m: usize, min: usize) -> Result<[usize; 4]> {
        let &[b, c, h, w] = dims else {
            return Err(EngineError::InvalidInput(format!("a [B,C,H,W] tensor expected, got {dims:?}")));
        };
        let up = |s: usize| s.max(min).div_ceil(m) * m;
        Ok([b, c, up(h), up(w)])
    }

    /// [`Cave::pad_to_min`] into a dead buffer of `pool` when it has one, and
    /// whether the result is a new buffer (else it is `x` itself: no padding
    /// was needed).
    fn pad_into(x: &Tensor, m: usize, min: usize, pool: &mut Pool) -> Result<(Tensor, bool)> {
        let (_, _, h, w) = x.dims4()?;
        let [b, c, hp, wp] = Self::padded_dims(x.dims(), m, min)?;
        if (hp, wp) == (h, w) {
            return Ok((x.clone(), false));
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let dst = pool.take_or_new(&[b, c, hp, wp], DType::F32, x.device())?;
            dst.inplace_op2(&x.contiguous()?, &PadInto)?;
            return Ok((dst, true));
        }
        Ok((x.pad_with_same(2, 0, hp - h)?.pad_with_same(3, 0, wp - w)?, true))
    }

    /// Encoder on an already padded `[B,3,H,W]` input in [0,1], its
    /// buffers from `pool`.
    fn encode(&self, x: &Tensor, pool: &mut Pool) -> Result<Features> {
        let mut skips = Vec::with_capacity(4);
        let body = self.run_encoder(x, pool, Some(&mut skips))?;
        let skips: [Tensor; 4] = skips.try_into().expect("four levels");
        Ok(Features { skips, body })
    }

    /// The encoder's output alone (no skips kept alive): `[B, nc3, H/32, W/32]`.
    pub fn encode_body(&self, x: &Tensor) -> Result<Tensor> {
        self.run_encoder(x, &mut Pool::default(), None)
    }

    /// `m_head`, `m_down1..3`, `m_body_encoder`; each level's input (the skip
    /// the decoder adds back) goes to `skips` when given, else to the pool
    /// with the other dead activations.
    fn run_encoder(&self, x: &Tensor, pool: &mut Pool, mut skips: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let (b, _, hh, ww) = x.dims4()?;
        let nc = self.config.nc;
        let mut h = pool.conv(&self.head, &x, &[b, nc[0], hh, ww])?;
        for (i, (blocks, conv)) in self.down.iter().enumerate() {
            // the blocks' output is their own (nb >= 1: config_of), h lives on
            let y = run_blocks(blocks, h.clone(), false, None, pool)?;
            let (_, _, yh, yw) = y.dims4()?;
            let k = SCALES[i];
            let next = pool.conv(conv, &y, &[b, nc[i + 1], yh / k, yw / k])?;
            pool.put(y);
            match skips.as_deref_mut() {
                Some(s) => s.push(h),
                None => pool.put(h),
            }
            h = next;
        }
        let owned = match skips {
            Some(s) => {
                s.push(h.clone());
                false
            }
            None => true,
        };
        Ok(run_blocks(&self.body_encoder, h, owned, None, pool)?)
    }

    /// q in [0,1] from the encoder output `body`: `[B,1]`.
    pub fn q_of(&self, body: &Tensor) -> Result<Tensor> {
        let h = run_blocks(&self.qf_blocks, body.clone(), false, None, &mut Pool::default())?;
        let h = h.mean(D::Minus1)?.mean(D::Minus1)?;
        let h = self.qf_linear[0].forward(&h)?.relu()?;
        let h = self.qf_linear[1].forward(&h)?.relu()?;
        Ok(candle_nn::ops::sigmoid(&self.qf_linear[2].forward(&h)?)?)
    }

    /// The JPEG quality (0..100) for q from [`Cave::q_of`]: 100 (1 - q), through
    /// the model's calibration when it has one.
    pub fn qf(&self, q: f32) -> f32 {
        let raw = qf_from_q(q);
        match &self.qf_calibration {
            Some(c) => c.apply(raw),
            None => raw,
        }
    }

    /// How far (input pixels, a multiple of 32) a tile edge's zero padding
    /// reaches into the encoder output: every 3x3 convolution at scale s moves it
    /// s pixels inwards and each strided convolution rounds it up to its cell.
    /// Body tokens further than this from a tile's inner edges equal the
    /// whole-frame tokens exactly.
    pub fn tile_margin(&self) -> usize {
        let nb = self.config.nb;
        let d = 1 + 2 * nb; // m_head + m_down1's blocks at scale 1
        let d = d.next_multiple_of(2) + 2 * nb * 2; // 2x2/2, then blocks at scale 2
        let d = d.next_multiple_of(8) + 2 * nb * 8; // 4x4/4, then blocks at scale 8
        d.next_multiple_of(32) + 2 * nb * 32 // 4x4/4, then m_body_encoder at scale 32
    }

    /// The smallest `tile` [`Cave::embed_tiled`] accepts (other than 0): the
    /// margins on both sides plus one 32-pixel token.
    pub fn min_tile(&self) -> usize {
        2 * self.tile_margin() + 32
    }

    /// Visual embedding `[B, floor(Hp/32)*floor(Wp/32), nc3]` (input padded to 8)
    /// and q `[B,1]`, encoding the whole frame at once.
    pub fn embed(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.embed_tiled(x, 0, &Cancel::new())
    }

    /// [`Cave::embed`] with the encoder run in tiles of at most `tile` pixels a
    /// side (0 = whole frame), so memory stays bounded at any frame size. Tiles
    /// start on the 32-pixel token grid and overlap by [`Cave::tile_margin`] on
    /// each inner side; each contributes only the tokens its margins make exact
    /// ([`Plan::exact`]), so the stitched embedding and q equal the whole-frame
    /// ones (up to float summation order). Frames that fit in one tile are
    /// encoded whole. `cancel` is checked between tiles.
    pub fn embed_tiled(&self, x: &Tensor, tile: usize, cancel: &Cancel) -> Result<(Tensor, Tensor)> {
        // frames under 32 px get one token from a replicate-padded 32 px square
        let xp = Self::pad_to_min(x, 8, 32)?;
        let (_, _, h, w) = xp.dims4()?;
        let body = if tile == 0 || (h <= tile && w <= tile) {
            self.encode_body(&xp)?
        } else {
            let plan = Plan::exact(h, w, tile, self.tile_margin(), 32, 32, "CaVE")?;
            plan.run(&xp, 1, cancel, |_, xs| xs.iter().map(|t| self.encode_body(t)).collect())?
        };
        let q = self.q_of(&body)?;
        let (b, c, _, _) = body.dims4()?;
        let tokens = body.reshape((b, c, ()))?.transpose(1, 2)?.contiguous()?;
        Ok((tokens, q))
    }

    /// How far (input pixels, a multiple of 32) a tile edge's zero padding
    /// reaches into the reconstruction: the encoder's reach
    /// ([`Cave::tile_margin`]), then the decoder's blocks at scales 32, 8, 2
    /// and 1 (two 3x3 convolutions each; the transposed convolutions stay
    /// within their cells, the skips reach less far) and the 3x3 tail.
    pub fn reconstruct_margin(&self) -> usize {
        let nb = self.config.nb;
        (self.tile_margin() + 2 * nb * (32 + 8 + 2 + 1) + 1).next_multiple_of(32)
    }

    /// The smallest `tile` [`Cave::reconstruct_tiled`] accepts (other than 0):
    /// the reconstruction margins on both sides plus one 32-pixel cell.
    pub fn min_reconstruct_tile(&self) -> usize {
        2 * self.reconstruct_margin() + 32
    }

    /// Full forward: the reconstructed image `[B,3,H,W]` (unclamped) and q.
    pub fn reconstruct(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.reconstruct_tiled(x, 0, &Cancel::new(), None)
    }

    /// A dead buffer of `dims` `[B,C,H,W]` kept from the last frame of this
    /// size (padded, it is the size last reconstructed), for the caller to
    /// overwrite: the next frame's input.
    pub(crate) fn spare(&self, dims: &[usize]) -> Option<Tensor> {
        let frame = Self::padded_dims(dims, 32, 0).ok()?;
        self.pool.with(&frame, |pool| pool.take(dims)).flatten()
    }

    /// `t`, a CPU tensor of a frame of the size last reconstructed (its
    /// input, or the padded output of [`Cave::reconstruct_padded`]), is dead:
    /// kept for the next frame. The caller holds no other tensor sharing its
    /// storage (the next frame overwrites it).
    pub(crate) fn recycle(&self, t: Tensor) {
        if let Ok(frame) = Self::padded_dims(t.dims(), 32, 0) {
            if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
                self.pool.with(&frame, |pool| pool.put(t));
            }
        }
    }

    /// Whether the model has quality conditioning ([`QfConditioning`]), so
    /// that the `quality` of [`Cave::reconstruct_tiled`] steers it.
    pub fn conditioned(&self) -> bool {
        self.conditioning.is_some()
    }

    /// [`Cave::reconstruct`] in tiles of at most `tile` pixels a side (0 =
    /// whole frame): tiles on the 32-pixel grid widened by
    /// [`Cave::reconstruct_margin`] on inner sides and cropped to their cores
    /// ([`Plan::exact`]), so the stitched image equals the whole-frame one
    /// (up to float summation order) while memory is bounded by one tile's
    /// activations plus the frame buffers. q comes from the QF head on the
    /// stitched encoder output, as [`Cave::embed_tiled`] does.
    ///
    /// A conditioned model restores as if the JPEG quality were `quality`
    /// (0..100), or its own calibrated estimate [`Cave::qf`] when None; the
    /// estimate of a tiled frame comes from an encoder-only pass
    /// ([`Cave::embed_tiled`]) first, as every tile needs it. Unconditioned
    /// models ignore `quality`.
    pub fn reconstruct_tiled(
        &self,
        x: &Tensor,
        tile: usize,
        cancel: &Cancel,
        quality: impl Into<Steer>,
    ) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let (y, q) = self.reconstruct_padded(x, tile, cancel, quality)?;
        Ok((y.narrow(2, 0, h)?.narrow(3, 0, w)?, q))
    }

    /// [`Cave::reconstruct_tiled`] before the crop: the reconstruction of
    /// the input padded to the 32-pixel grid, a buffer of its own (for
    /// [`Cave::recycle`] once dead).
    pub(crate) fn reconstruct_padded(
        &self,
        x: &Tensor,
        tile: usize,
        cancel: &Cancel,
        quality: impl Into<Steer>,
    ) -> Result<(Tensor, Tensor)> {
        let quality = quality.into();
        let dims = Self::padded_dims(x.dims(), 32, 0)?;
        let mut pool = self.pool.take_for(&dims);
        let (xp, padded) = Self::pad_into(x, 32, 0, &mut pool)?;
        let (hp, wp) = (dims[2], dims[3]);
        // the decoder's modulation: for the given quality, else (conditioned
        // models only) for the estimate from q, which `q` computes when asked
        let modulation = |q: &dyn Fn() -> Result<Tensor>| -> Result<Option<Modulated>> {
            match quality {
                Steer::Told(qf) => self.modulated(qf),
                _ if !self.conditioned() => Ok(None),
                Steer::Own => self.modulated(self.qf(Self::q_value(&q()?)?)),
                Steer::Measured(m) => {
                    let own = self.qf(Self::q_value(&q()?)?);
                    self.modulated(if (own - m).abs() <= Steer::TRUST_OWN_WITHIN { own } else { m })
                }
            }
        };
        let (y, q) = if tile == 0 || (hp <= tile && wp <= tile) {
            let f = self.encode(&xp, &mut pool)?;
            // the padded input is dead: the tail writes into its buffer
            if padded {
                pool.put(xp);
            }
            let q = self.q_of(&f.body)?;
            let m = modulation(&|| Ok(q.clone()))?;
            (self.decode(f, m.as_ref(), &mut pool)?, q)
        } else {
            let m = modulation(&|| Ok(self.embed_tiled(&xp, tile, cancel)?.1))?;
            let m = m.as_ref();
            let plan = Plan::exact(hp, wp, tile, self.reconstruct_margin(), 32, 1, "CaVE")?;
            let mut cores = Vec::with_capacity(plan.len());
            let y = plan.run(&xp, 1, cancel, |spans, xs| {
                let (r, c) = spans[0];
                let f = self.encode(&xs[0], &mut pool)?;
                cores.push(f.body.narrow(2, r.skip / 32, r.take / 32)?.narrow(3, c.skip / 32, c.take / 32)?);
                Ok(vec![self.decode(f, m, &mut pool)?])
            })?;
            // tiles ran row by row: stitch the encoder outputs the same way
            let rows =
                cores.chunks(plan.cols.len()).map(|r| Tensor::cat(r, 3)).collect::<candle_core::Result<Vec<_>>>()?;
            if padded {
                pool.put(xp);
            }
            (y, self.q_of(&Tensor::cat(&rows, 2)?)?)
        };
        self.pool.keep(&dims, pool);
        Ok((y, q))
    }

    /// The first value of a q tensor `[B,1]` (frames restore one at a time).
    pub fn q_value(q: &Tensor) -> Result<f32> {
        Ok(q.flatten_all()?.get(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }

    /// The decoder's QFAttention conv2s modulated for quality `qf`; None for
    /// an unconditioned model.
    fn modulated(&self, qf: f32) -> Result<Option<Modulated>> {
        let Some(c) = &self.conditioning else { return Ok(None) };
        let m = c.modulation(qf, &self.device)?;
        let level = |i: usize| -> Result<Vec<Conv>> {
            let (g, beta) = &m[i];
            let ch = g.dim(0)?;
            self.up[i]
                .1
                .iter()
                .map(|blk| {
                    let (w, b) = blk.raw2.as_ref().expect("conditioned models keep conv2's weights");
                    let w = w.broadcast_mul(&g.reshape((ch, 1, 1, 1))?)?;
                    let b = ((b * g)? + beta)?;
                    Ok(Conv::from_tensors(w, Some(b), 1, [1; 4], false)?)
                })
                .collect()
        };
        build_with(self.math, || Ok(Some(Modulated([level(0)?, level(1)?, level(2)?]))))
    }

    /// The decoder half on encoder features: the reconstructed (padded)
    /// image; `m` replaces the QFAttention conv2s (quality conditioning).
    /// Every buffer but the output comes from and returns to `pool`; the
    /// body lives on (a tiled frame keeps a view of it).
    fn decode(&self, f: Features, m: Option<&Modulated>, pool: &mut Pool) -> Result<Tensor> {
        // every y below is this function's own (fresh from a layer or from
        // the pool), so the skip additions and the blocks' residual adds
        // reuse its buffer
        let Features { skips, body } = f;
        let nc = self.config.nc;
        let mut y = run_blocks(&self.body_decoder, body, false, None, pool)?;
        for (i, (conv, blocks)) in self.up.iter().enumerate().rev() {
            let x = add_into(y, &skips[i + 1])?;
            let (b, _, xh, xw) = x.dims4()?;
            let k = SCALES[i];
            y = conv.forward_into(&x, pool.take(&[b, nc[i], xh * k, xw * k]))?;
            pool.put(x);
            y = run_blocks(blocks, y, true, m.map(|m| &m.0[i][..]), pool)?;
        }
        let x = add_into(y, &skips[0])?;
        let (b, _, xh, xw) = x.dims4()?;
        let out = pool.conv(&self.tail, &x, &[b, 3, xh, xw])?;
        pool.put(x);
        skips.into_iter().for_each(|s| pool.put(s));
        Ok(out)
    }
}

/// QF = 100 (1 - q).
pub fn qf_from_q(q: f32) -> f32 {
    (100.0 * (1.0 - q)).clamp(0.0, 100.0)
}

/// Every tensor of a CaVE of size `cfg` with the official key names: random
/// (He-scaled convolutions, identity BatchNorm) or all zeros. For benchmarks of
/// the full-size architecture and for tests; real weights come from files.
pub fn synthetic_tensors(cfg: CaveConfig, zeros: bool) -> Result<std::collections::HashMap<String, Tensor>> {
    enum Init {
        Weight(usize),
        Zero,
        One,
    }
    let CaveConfig { nc, nb } = cfg;
    let mut spec: Vec<(String, Vec<usize>, Init)> = vec![];
    let block = |spec: &mut Vec<(String, Vec<usize>, Init)>, p: String, c: usize| {
        for conv in ["res.0", "res.3"] {
            spec.push((format!("{p}.{conv}.weight"), vec![c, c, 3, 3], Init::Weight(9 * c)));
            spec.push((format!("{p}.{conv}.bias"), vec![c], Init::Zero));
        }
        for (k, init) in
            [("weight", Init::One), ("bias", Init::Zero), ("running_mean", Init::Zero), ("running_var", Init::One)]
        {
            spec.push((format!("{p}.res.1.{k}"), vec![c], init));
        }
    };
    let ks = [2, 4, 4];
    spec.push(("m_head.weight".into(), vec![nc[0], 3, 3, 3], Init::Weight(27)));
    spec.push(("m_head.bias".into(), vec![nc[0]], Init::Zero));
    for i in 0..3 {
        for j in 0..nb {
            block(&mut spec, format!("m_down{}.{j}", i + 1), nc[i]);
            block(&mut spec, format!("m_up{}.{}", i + 1, j + 1), nc[i]);
        }
        let k = ks[i];
        spec.push((format!("m_down{}.{nb}.weight", i + 1), vec![nc[i + 1], nc[i], k, k], Init::Weight(nc[i] * k * k)));
        spec.push((format!("m_down{}.{nb}.bias", i + 1), vec![nc[i + 1]], Init::Zero));
        spec.push((format!("m_up{}.0.weight", i + 1), vec![nc[i + 1], nc[i], k, k], Init::Weight(nc[i + 1])));
        spec.push((format!("m_up{}.0.bias", i + 1), vec![nc[i]], Init::Zero));
    }
    for j in 0..nb {
        for p in ["m_body_encoder", "m_body_decoder", "qf_pred"] {
            block(&mut spec, format!("{p}.{j}"), nc[3]);
        }
    }
    spec.push(("m_tail.weight".into(), vec![3, nc[0], 3, 3], Init::Weight(9 * nc[0])));
    spec.push(("m_tail.bias".into(), vec![3], Init::Zero));
    for (i, out) in [(2, nc[3]), (4, nc[3]), (6, 1)] {
        spec.push((format!("qf_pred.{}.weight", nb + i), vec![out, nc[3]], Init::Weight(nc[3])));
        spec.push((format!("qf_pred.{}.bias", nb + i), vec![out], Init::Zero));
    }
    let dev = Device::Cpu;
    spec.into_iter()
        .map(|(k, shape, init)| {
            let t = match init {
                Init::Weight(fan_in) if !zeros => {
                    (Tensor::randn(0f32, 1., shape, &dev)? * (1.0 / fan_in as f64).sqrt())?
                }
                Init::One => Tensor::ones(shape, DType::F32, &dev)?,
                _ => Tensor::zeros(shape, DType::F32, &dev)?,
            };
            Ok((k, t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count by hand for nc [4, 8, 8, 16], nb 1 (a 3x3 conv from c to c'
    /// channels: 18 c c' per pixel of its level; level i holds 1, 1/4, 1/64,
    /// 1/1024 of the pixels).
    #[test]
    fn flops_per_pixel_counts_every_layer() {
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 1 };
        let head_tail = 216.0 + 216.0;
        let level0 = 2.0 * 576.0 + 2.0 * 64.0; // encoder and decoder blocks; 2x2 conv down, transposed up
        let level1 = 2.0 * 576.0 + 2.0 * 32.0; // 2 x 18 x 8 x 8 / 4 a block; 4x4 down and up
        let level2 = 2.0 * 36.0 + 2.0 * 4.0;
        let level3 = 3.0 * 9.0; // body encoder, body decoder, QF head
        assert_eq!(cfg.flops_per_pixel(), head_tail + level0 + level1 + level2 + level3);
        assert_eq!(cfg.flops_per_pixel(), 3035.0);
    }

    #[test]
    fn qf_calibration_interpolates_and_is_checked() {
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 2 };
        let mut tensors = synthetic_tensors(cfg, false).unwrap();
        let cal = Tensor::new(&[[8f32, 20., 40.], [10., 30., 50.]], &Device::Cpu).unwrap();
        tensors.insert("qf_calibration".into(), cal);
        let cave =
            Cave::load(&TensorFile::from_tensors(std::path::Path::new("m.safetensors"), tensors.clone()), &Device::Cpu)
                .unwrap();
        for (raw, want) in [(8.0, 10.0), (14.0, 20.0), (30.0, 40.0), (45.0, 55.0), (2.0, 4.0), (1.0, 3.0)] {
            let q = 1.0 - raw / 100.0;
            assert!((cave.qf(q) - want).abs() < 1e-3, "raw {raw}: {} != {want}", cave.qf(q));
        }
        assert!((cave.qf(0.0) - 100.0).abs() < 1e-6, "clamped to 100");
        // without the tensor the estimate is the official 100 (1 - q)
        tensors.remove("qf_calibration");
        let plain =
            Cave::load(&TensorFile::from_tensors(std::path::Path::new("m.safetensors"), tensors.clone()), &Device::Cpu)
                .unwrap();
        assert!((plain.qf(0.7) - 30.0).abs() < 1e-4);
        // a malformed table names the file and the key
        for bad in [
            Tensor::new(&[[8f32, 20.], [10., 30.], [1., 2.]], &Device::Cpu).unwrap(),
            Tensor::new(&[[20f32, 8.], [10., 30.]], &Device::Cpu).unwrap(),
            Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((2, 1), DType::F32, &Device::Cpu).unwrap(),
        ] {
            let dims = bad.dims().to_vec();
            tensors.insert("qf_calibration".into(), bad);
            let err = Cave::load(
                &TensorFile::from_tensors(std::path::Path::new("m.safetensors"), tensors.clone()),
                &Device::Cpu,
            )
            .err()
            .unwrap()
            .to_string();
            assert!(err.contains("m.safetensors") && err.contains("qf_calibration"), "{err}");
            // the message never contradicts itself ("expected [2, 0], found [2, 0]")
            if dims[0] == 2 && dims[1] < 2 {
                assert!(err.contains(&format!("{dims:?}")) && err.contains("K >= 2"), "{err}");
            }
        }
    }

    #[test]
    fn tiled_embedding_equals_the_whole_frame() {
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 2 };
        let file =
            TensorFile::from_tensors(std::path::Path::new("<synthetic>"), synthetic_tensors(cfg, false).unwrap());
        let cave = Cave::load(&file, &Device::Cpu).unwrap();
        assert_eq!(cave.tile_margin(), 192);
        // 520 x 700: 16 x 21 tokens, with the 4-px remainder on the right
        let x = Tensor::rand(0f32, 1., (1, 3, 520, 700), &Device::Cpu).unwrap();
        let (whole, q_whole) = cave.embed(&x).unwrap();
        for tile in [512, 600] {
            let (tiled, q) = cave.embed_tiled(&x, tile, &Cancel::new()).unwrap();
            assert_eq!(tiled.dims(), whole.dims());
            let diff = (&tiled - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = whole.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "tile {tile}: max |diff| {diff} (scale {scale})");
            let dq = (&q - &q_whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(dq < 1e-6, "tile {tile}: q differs by {dq}");
        }
        // a margin-sized tile cannot keep any token
        let err = cave.embed_tiled(&x, 400, &Cancel::new()).unwrap_err().to_string();
        assert!(err.contains("192 px margins"), "{err}");
    }

    /// Conditioning tensors of hidden width 6: random, or zero heads.
    fn add_conditioning(t: &mut std::collections::HashMap<String, Tensor>, nc: [usize; 4], zero_heads: bool) {
        let dev = Device::Cpu;
        let rand = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &dev).unwrap();
        // the first layer's weights and biases positive, so that its ReLU
        // passes every unit at every quality: with signs drawn at random all
        // six units can be off at both qualities a test compares (a CI run
        // failed so on 2026-12-06; 55 local runs passed), and then the
        // embedding, so the output, does not depend on the quality at all
        let positive = |shape: &[usize]| rand(shape).abs().unwrap();
        t.insert("qf_embed.0.weight".into(), positive(&[6, 1]));
        t.insert("qf_embed.0.bias".into(), positive(&[6]));
        t.insert("qf_embed.2.weight".into(), rand(&[6, 6]));
        t.insert("qf_embed.2.bias".into(), rand(&[6]));
        for lvl in 1..=3 {
            for kind in ["gamma", "beta"] {
                let (w, b) = if zero_heads {
                    (
                        Tensor::zeros((nc[lvl - 1], 6), DType::F32, &dev).unwrap(),
                        Tensor::zeros(nc[lvl - 1], DType::F32, &dev).unwrap(),
                    )
                } else {
                    (rand(&[nc[lvl - 1], 6]), rand(&[nc[lvl - 1]]))
                };
                t.insert(format!("to_{kind}_{lvl}.0.weight"), w);
                t.insert(format!("to_{kind}_{lvl}.0.bias"), b);
            }
        }
    }

    #[test]
    fn conditioning_steers_the_decoder_and_tiles_alike() {
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 1 };
        let path = std::path::Path::new("m.safetensors");
        let base = synthetic_tensors(cfg, false).unwrap();
        let plain = Cave::load(&TensorFile::from_tensors(path, base.clone()), &Device::Cpu).unwrap();
        let x = Tensor::rand(0f32, 1., (1, 3, 450, 700), &Device::Cpu).unwrap();
        let (y_plain, _) = plain.reconstruct(&x).unwrap();
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // zero heads: gamma = beta = 1 at every quality, the unconditioned model
        let mut t = base.clone();
        add_conditioning(&mut t, cfg.nc, true);
        let zero = Cave::load(&TensorFile::from_tensors(path, t), &Device::Cpu).unwrap();
        assert!(zero.conditioned() && !plain.conditioned());
        for quality in [None, Some(5.0), Some(90.0)] {
            let (y, _) = zero.reconstruct_tiled(&x, 0, &Cancel::new(), quality).unwrap();
            assert!(diff(&y, &y_plain) < 1e-5, "{quality:?}");
        }
        // random heads: the quality changes the output; tiles equal the whole
        // frame, also when the tiles need the whole frame's estimate first
        let mut t = base.clone();
        add_conditioning(&mut t, cfg.nc, false);
        let cond = Cave::load(&TensorFile::from_tensors(path, t.clone()), &Device::Cpu).unwrap();
        let tile = 2 * cond.reconstruct_margin() + 64;
        let scale = y_plain.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        let (a, q) = cond.reconstruct_tiled(&x, 0, &Cancel::new(), Some(10.0)).unwrap();
        let (b, _) = cond.reconstruct_tiled(&x, 0, &Cancel::new(), Some(80.0)).unwrap();
        assert!(diff(&a, &b) > 1e-3 * scale);
        let (own, _) = cond.reconstruct(&x).unwrap();
        let est = cond.qf(q.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]);
        let (named, _) = cond.reconstruct_tiled(&x, 0, &Cancel::new(), Some(est)).unwrap();
        assert_eq!(diff(&own, &named), 0.0, "None is the estimate path");
        for quality in [None, Some(10.0)] {
            let whole = if quality.is_some() { &a } else { &own };
            let (tiled, _) = cond.reconstruct_tiled(&x, tile, &Cancel::new(), quality).unwrap();
            assert!(diff(&tiled, whole) <= 1e-5 * scale, "{quality:?}: {}", diff(&tiled, whole));
        }
        // a conditioned file missing a head names the file and the key
        t.remove("to_beta_2.0.bias");
        let err = Cave::load(&TensorFile::from_tensors(path, t), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("m.safetensors") && err.contains("to_beta_2.0.bias"), "{err}");
    }

    #[test]
    fn tiled_reconstruction_equals_the_whole_frame() {
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 1 };
        let file =
            TensorFile::from_tensors(std::path::Path::new("<synthetic>"), synthetic_tensors(cfg, false).unwrap());
        let cave = Cave::load(&file, &Device::Cpu).unwrap();
        let margin = cave.reconstruct_margin();
        assert_eq!(margin, 192);
        // 450 x 700, padded to 480 x 704: cores of 64 px both ways, then of 192 px
        // along the width only (the height fits in a 576 px tile)
        let x = Tensor::rand(0f32, 1., (1, 3, 450, 700), &Device::Cpu).unwrap();
        let (whole, q_whole) = cave.reconstruct(&x).unwrap();
        let scale = whole.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        for tile in [2 * margin + 64, 2 * margin + 192] {
            let (tiled, q) = cave.reconstruct_tiled(&x, tile, &Cancel::new(), None).unwrap();
            assert_eq!(tiled.dims(), whole.dims());
            let diff = (&tiled - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale, "tile {tile}: max |diff| {diff} (scale {scale})");
            let dq = (&q - &q_whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(dq < 1e-6, "tile {tile}: q differs by {dq}");
        }
        // with margins one scale-32 block short, the seams show: the margin is not slack
        let plan = Plan::exact(480, 704, 2 * margin, margin - 64, 32, 1, "t").unwrap();
        let xp = Cave::pad_to(&x, 32).unwrap();
        let short = plan
            .run(&xp, 1, &Cancel::new(), |_, xs| {
                let mut pool = Pool::default();
                Ok(vec![cave.decode(cave.encode(&xs[0], &mut pool)?, None, &mut pool)?])
            })
            .unwrap();
        let diff = (short.narrow(2, 0, 450).unwrap().narrow(3, 0, 700).unwrap() - &whole)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff > 1e-4 * scale, "{diff}");
        let err = cave.reconstruct_tiled(&x, 300, &Cancel::new(), None).unwrap_err().to_string();
        assert!(err.contains("CaVE tile 300 px"), "{err}");
    }

    #[test]
    fn frames_written_into_the_last_ones_buffers_are_unchanged() {
        // each reconstruction leaves its dead buffers for the next frame of
        // its size: frames that write into them (whole or tiled, after a
        // frame of another size) give the numbers of a model that has none
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 2 };
        let file =
            TensorFile::from_tensors(std::path::Path::new("<synthetic>"), synthetic_tensors(cfg, false).unwrap());
        let load = || Cave::load(&file, &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let a = Tensor::rand(0f32, 1., (1, 3, 96, 160), &dev).unwrap();
        let b = Tensor::rand(0f32, 1., (1, 3, 70, 100), &dev).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let fresh_a = bits(&load().reconstruct(&a).unwrap().0);
        let fresh_b = bits(&load().reconstruct(&b).unwrap().0);
        let cave = load();
        let kept = |cave: &Cave| cave.pool.0.lock().unwrap().as_ref().map_or(0, |(_, p)| p.len());
        cave.reconstruct(&a).unwrap();
        assert!(kept(&cave) >= 4, "a frame leaves its buffers for the next");
        for x in [&a, &a, &b, &a, &b, &b] {
            let want = if x.dims() == a.dims() { &fresh_a } else { &fresh_b };
            assert_eq!(&bits(&cave.reconstruct(x).unwrap().0), want);
        }
        let big = Tensor::rand(0f32, 1., (1, 3, 450, 700), &dev).unwrap();
        let tile = 2 * cave.reconstruct_margin() + 64;
        let fresh = bits(&load().reconstruct_tiled(&big, tile, &Cancel::new(), None).unwrap().0);
        for _ in 0..2 {
            assert_eq!(bits(&cave.reconstruct_tiled(&big, tile, &Cancel::new(), None).unwrap().0), fresh);
        }
        assert_eq!(bits(&cave.reconstruct(&a).unwrap().0), fresh_a);
    }
}
