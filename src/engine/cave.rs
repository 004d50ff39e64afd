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
//! Sizes (`nc`, `nb`) come from the tensors themselves, so the official
//! `cave.pth` (nc [64,128,256,512], nb 4) and our compact model load alike.
//! BatchNorm (eval mode, eps 1e-4) is folded into the convolution before it.
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Linear};

use super::error::{EngineError, Result};
use super::kernels::{ConvOp, PatchConv, PatchConvTranspose};
use super::weights::TensorFile;

const BN_EPS: f64 = 1e-4;

/// Widths of the four levels and the number of ResBlocks per stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaveConfig {
    pub nc: [usize; 4],
    pub nb: usize,
}

/// A convolution with the fast CPU kernel beside candle's op (other devices).
struct Conv {
    candle: Conv2d,
    relu: bool,
    fast3: Option<ConvOp>,
    fast_patch: Option<PatchConv>,
}

impl Conv {
    fn new(candle: Conv2d, relu: bool, cpu: bool) -> candle_core::Result<Self> {
        let w = candle.weight();
        let k = w.dim(3)?;
        let (fast3, fast_patch) = match (cpu, k, candle.config().stride) {
            (true, 3, 1) => (Some(ConvOp::from_tensors(w, candle.bias(), relu)?), None),
            (true, k, s) if k == s => (None, Some(PatchConv::from_tensors(w, candle.bias().expect("bias"))?)),
            _ => (None, None),
        };
        Ok(Self { candle, relu, fast3, fast_patch })
    }

    /// act(conv(x)) (+ residual)
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if let Some(op) = &self.fast3 {
            let x = x.contiguous()?;
            return match residual {
                Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, op),
                None => x.apply_op1_no_bwd(op),
            };
        }
        let y = match &self.fast_patch {
            Some(op) => x.contiguous()?.apply_op1_no_bwd(op)?,
            None => self.candle.forward(x)?,
        };
        let y = if self.relu { y.relu()? } else { y };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
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
}

struct ResBlock {
    conv1: Conv,
    conv2: Conv,
}

impl ResBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(x, None)?;
        self.conv2.forward(&h, Some(x))
    }
}

fn run_blocks(blocks: &[ResBlock], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut x = x.clone();
    for b in blocks {
        x = b.forward(&x)?;
    }
    Ok(x)
}

/// Loads layers out of a [`TensorFile`], checking each shape.
struct Loader<'a> {
    f: &'a TensorFile,
    dev: &'a Device,
}

impl Loader<'_> {
    fn t(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.f.get_shaped(key, shape)?.to_device(self.dev)?)
    }

    fn conv(&self, p: &str, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv> {
        Ok(Conv::new(self.conv_raw(p, cin, cout, k, stride)?, false, self.dev.is_cpu())?)
    }

    fn conv_raw(&self, p: &str, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
        let w = self.t(&format!("{p}.weight"), &[cout, cin, k, k])?;
        let b = self.t(&format!("{p}.bias"), &[cout])?;
        let cfg = Conv2dConfig { padding: if k == 3 { 1 } else { 0 }, stride, ..Default::default() };
        Ok(Conv2d::new(w, Some(b), cfg))
    }

    /// conv -> BatchNorm folded into one conv.
    fn conv_bn(&self, conv: &str, bn: &str, c: usize) -> Result<Conv2d> {
        let w = self.t(&format!("{conv}.weight"), &[c, c, 3, 3])?;
        let b = self.t(&format!("{conv}.bias"), &[c])?;
        let g = self.t(&format!("{bn}.weight"), &[c])?;
        let beta = self.t(&format!("{bn}.bias"), &[c])?;
        let mean = self.t(&format!("{bn}.running_mean"), &[c])?;
        let var = self.t(&format!("{bn}.running_var"), &[c])?;
        let scale = (g / (var + BN_EPS)?.sqrt()?)?;
        let w = w.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let b = ((b - mean)? * &scale)?.add(&beta)?;
        Ok(Conv2d::new(w, Some(b), Conv2dConfig { padding: 1, ..Default::default() }))
    }

    fn resblock(&self, p: &str, c: usize) -> Result<ResBlock> {
        self.resblock_shifted(p, c, 0.0)
    }

    /// `x + res(x) + beta`: the decoder's QFAttention blocks, which the
    /// reference runs with gamma = beta = 1 (beta is folded into the bias).
    fn resblock_shifted(&self, p: &str, c: usize, beta: f64) -> Result<ResBlock> {
        let conv2 = self.conv_raw(&format!("{p}.res.3"), c, c, 3, 1)?;
        let conv2 = if beta != 0.0 {
            let b = (conv2.bias().expect("bias") + beta)?;
            Conv2d::new(conv2.weight().clone(), Some(b), *conv2.config())
        } else {
            conv2
        };
        let cpu = self.dev.is_cpu();
        let conv1 = self.conv_bn(&format!("{p}.res.0"), &format!("{p}.res.1"), c)?;
        Ok(ResBlock { conv1: Conv::new(conv1, true, cpu)?, conv2: Conv::new(conv2, false, cpu)? })
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
        Ok(Up { candle: ConvTranspose2d::new(w, Some(b), ConvTranspose2dConfig { stride: k, ..Default::default() }), fast })
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
    device: Device,
}

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
        let bad_shape = || EngineError::ShapeMismatch { path: f.path.clone(), key: Self::KEY.into(), expected: vec![2, 0], found: t.dims().to_vec() };
        if t.rank() != 2 || t.dim(0)? != 2 || t.dim(1)? < 2 {
            return Err(bad_shape());
        }
        let rows = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let (raw, qf) = (rows[0].clone(), rows[1].clone());
        let ok = raw.iter().chain(&qf).all(|v| v.is_finite()) && raw.windows(2).all(|w| w[0] < w[1]);
        if !ok {
            return Err(EngineError::Format {
                path: f.path.clone(),
                reason: format!("tensor `{}` must hold finite values with increasing raw estimates in row 0", Self::KEY),
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
pub struct Features {
    pub skips: [Tensor; 4],
    pub body: Tensor,
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
        let down = |i: usize, k: usize| -> Result<(Vec<ResBlock>, Conv)> {
            let p = format!("m_down{}", i + 1);
            Ok((l.blocks(&p, 0, nb, nc[i], false)?, l.conv(&format!("{p}.{nb}"), nc[i], nc[i + 1], k, k)?))
        };
        let up = |i: usize, k: usize| -> Result<(Up, Vec<ResBlock>)> {
            let p = format!("m_up{}", i + 1);
            let blocks = (1..=nb).map(|j| l.resblock_shifted(&format!("{p}.{j}"), nc[i], 1.0)).collect::<Result<_>>()?;
            Ok((l.up(&format!("{p}.0"), nc[i + 1], nc[i], k)?, blocks))
        };
        Ok(Self {
            config,
            head: l.conv("m_head", 3, nc[0], 3, 1)?,
            down: [down(0, 2)?, down(1, 4)?, down(2, 4)?],
            body_encoder: l.blocks("m_body_encoder", 0, nb, nc[3], true)?,
            body_decoder: l.blocks("m_body_decoder", 0, nb, nc[3], true)?,
            up: [up(0, 2)?, up(1, 4)?, up(2, 4)?],
            tail: l.conv("m_tail", nc[0], 3, 3, 1)?,
            qf_blocks: l.blocks("qf_pred", 0, nb, nc[3], false)?,
            qf_linear: [
                l.linear(&format!("qf_pred.{}", nb + 2), nc[3], nc[3])?,
                l.linear(&format!("qf_pred.{}", nb + 4), nc[3], nc[3])?,
                l.linear(&format!("qf_pred.{}", nb + 6), nc[3], 1)?,
            ],
            qf_calibration: QfCalibration::load(f)?,
            device: device.clone(),
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
        let (_, _, h, w) = x.dims4()?;
        let up = |s: usize| s.max(min).div_ceil(m) * m - s;
        let (ph, pw) = (up(h), up(w));
        let mut x = x.clone();
        if ph > 0 {
            x = x.pad_with_same(2, 0, ph)?;
        }
        if pw > 0 {
            x = x.pad_with_same(3, 0, pw)?;
        }
        Ok(x)
    }

    /// Encoder on an already padded `[B,3,H,W]` input in [0,1].
    pub fn encode(&self, x: &Tensor) -> Result<Features> {
        let mut skips = Vec::with_capacity(4);
        let body = self.run_encoder(x, Some(&mut skips))?;
        let skips: [Tensor; 4] = skips.try_into().expect("four levels");
        Ok(Features { skips, body })
    }

    /// The encoder's output alone (no skips kept alive): `[B, nc3, H/32, W/32]`.
    pub fn encode_body(&self, x: &Tensor) -> Result<Tensor> {
        self.run_encoder(x, None)
    }

    /// `m_head`, `m_down1..3`, `m_body_encoder`; each level's input (the skip
    /// the decoder adds back) goes to `skips` when given.
    fn run_encoder(&self, x: &Tensor, mut skips: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let mut h = self.head.forward(&x.to_dtype(DType::F32)?, None)?;
        for (blocks, conv) in &self.down {
            if let Some(s) = skips.as_deref_mut() {
                s.push(h.clone());
            }
            h = conv.forward(&run_blocks(blocks, &h)?, None)?;
        }
        if let Some(s) = skips {
            s.push(h.clone());
        }
        Ok(run_blocks(&self.body_encoder, &h)?)
    }

    /// q in [0,1] from the encoder output `body`: `[B,1]`.
    pub fn q_of(&self, body: &Tensor) -> Result<Tensor> {
        let h = run_blocks(&self.qf_blocks, body)?;
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
        self.embed_tiled(x, 0)
    }

    /// [`Cave::embed`] with the encoder run in tiles of at most `tile` pixels a
    /// side (0 = whole frame), so memory stays bounded at any frame size. Tiles
    /// start on the 32-pixel token grid and overlap by [`Cave::tile_margin`] on
    /// each inner side; each contributes only the tokens its margins make exact,
    /// so the stitched embedding and q equal the whole-frame ones (up to float
    /// summation order). Frames that fit in one tile are encoded whole.
    pub fn embed_tiled(&self, x: &Tensor, tile: usize) -> Result<(Tensor, Tensor)> {
        // frames under 32 px get one token from a replicate-padded 32 px square
        let xp = Self::pad_to_min(x, 8, 32)?;
        let (_, _, h, w) = xp.dims4()?;
        let margin = self.tile_margin();
        let body = if tile == 0 || (h <= tile && w <= tile) {
            self.encode_body(&xp)?
        } else {
            let core = tile.saturating_sub(2 * margin) / 32 * 32;
            if core < 32 {
                return Err(EngineError::InvalidInput(format!(
                    "CaVE tile {tile} px leaves no room for the {margin} px margins this model needs (use at least {})",
                    2 * margin + 32
                )));
            }
            // only the sides longer than `tile` are split
            let axis = |n: usize| match n <= tile {
                true => vec![TokenTile { start: 0, len: n, skip: 0, take: n / 32 }],
                false => token_tiles(n, core, margin),
            };
            let (rows, cols) = (axis(h), axis(w));
            let mut band = Vec::with_capacity(rows.len());
            for r in &rows {
                let mut row = Vec::with_capacity(cols.len());
                for c in &cols {
                    let t = xp.narrow(2, r.start, r.len)?.narrow(3, c.start, c.len)?;
                    let b = self.encode_body(&t)?;
                    row.push(b.narrow(2, r.skip, r.take)?.narrow(3, c.skip, c.take)?);
                }
                band.push(Tensor::cat(&row, 3)?);
            }
            Tensor::cat(&band, 2)?
        };
        let q = self.q_of(&body)?;
        let (b, c, _, _) = body.dims4()?;
        let tokens = body.reshape((b, c, ()))?.transpose(1, 2)?.contiguous()?;
        Ok((tokens, q))
    }

    /// Full forward: the reconstructed image `[B,3,H,W]` (unclamped) and q.
    pub fn reconstruct(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let f = self.encode(&Self::pad_to(x, 32)?)?;
        let q = self.q_of(&f.body)?;
        let mut y = run_blocks(&self.body_decoder, &f.body)?;
        for (i, (conv, blocks)) in self.up.iter().enumerate().rev() {
            y = run_blocks(blocks, &conv.forward(&(y + &f.skips[i + 1])?)?)?;
        }
        let y = self.tail.forward(&(y + &f.skips[0])?, None)?;
        Ok((y.narrow(2, 0, h)?.narrow(3, 0, w)?, q))
    }
}

/// One tile of [`Cave::embed_tiled`] along one axis: input pixels
/// `start..start+len`, of whose tokens `skip..skip+take` are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TokenTile {
    start: usize,
    len: usize,
    skip: usize,
    take: usize,
}

/// Tiles covering an axis of `n` padded pixels (`floor(n/32)` tokens): `core`
/// pixels of kept tokens each, `margin` more on each inner side; the last tile
/// ends at `n`, so it sees the same bottom/right remainder as the whole frame.
fn token_tiles(n: usize, core: usize, margin: usize) -> Vec<TokenTile> {
    let tokens = n / 32;
    let per = core / 32;
    let mut tiles = Vec::new();
    let mut a = 0;
    while a < tokens {
        let b = (a + per).min(tokens);
        let start = (32 * a).saturating_sub(margin);
        let end = if b == tokens { n } else { (32 * b + margin).min(n) };
        tiles.push(TokenTile { start, len: end - start, skip: a - start / 32, take: b - a });
        a = b;
    }
    tiles
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
        for (k, init) in [("weight", Init::One), ("bias", Init::Zero), ("running_mean", Init::Zero), ("running_var", Init::One)] {
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
                Init::Weight(fan_in) if !zeros => (Tensor::randn(0f32, 1., shape, &dev)? * (1.0 / fan_in as f64).sqrt())?,
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

    #[test]
    fn token_tiles_cover_every_token_once_on_the_grid() {
        for (n, core, margin) in [(2160, 1280, 352), (3840, 1280, 352), (520, 64, 192), (1000, 32, 64), (96, 64, 192)] {
            let tiles = token_tiles(n, core, margin);
            let mut next = 0;
            for t in &tiles {
                assert_eq!(t.start % 32, 0, "{t:?}");
                assert!(t.start + t.len <= n && t.take > 0, "{t:?}");
                assert_eq!(t.start / 32 + t.skip, next, "tokens kept in order, none twice: {t:?}");
                let first = 32 * next; // first kept token's pixels
                let last = 32 * (next + t.take); // end of the last kept token's pixels
                assert!(t.start == 0 || first - t.start >= margin, "margin before {t:?}");
                assert!(t.start + t.len == n || t.start + t.len - last >= margin, "margin after {t:?}");
                assert!(t.len <= core + 2 * margin + 31, "bounded {t:?}");
                next += t.take;
            }
            assert_eq!(next, n / 32, "all tokens of {n}");
        }
    }

    #[test]
    fn qf_calibration_interpolates_and_is_checked() {
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 2 };
        let mut tensors = synthetic_tensors(cfg, false).unwrap();
        let cal = Tensor::new(&[[8f32, 20., 40.], [10., 30., 50.]], &Device::Cpu).unwrap();
        tensors.insert("qf_calibration".into(), cal);
        let cave = Cave::load(&TensorFile::from_tensors(std::path::Path::new("m.safetensors"), tensors.clone()), &Device::Cpu).unwrap();
        for (raw, want) in [(8.0, 10.0), (14.0, 20.0), (30.0, 40.0), (45.0, 55.0), (2.0, 4.0), (1.0, 3.0)] {
            let q = 1.0 - raw / 100.0;
            assert!((cave.qf(q) - want).abs() < 1e-3, "raw {raw}: {} != {want}", cave.qf(q));
        }
        assert!((cave.qf(0.0) - 100.0).abs() < 1e-6, "clamped to 100");
        // without the tensor the estimate is the official 100 (1 - q)
        tensors.remove("qf_calibration");
        let plain = Cave::load(&TensorFile::from_tensors(std::path::Path::new("m.safetensors"), tensors.clone()), &Device::Cpu).unwrap();
        assert!((plain.qf(0.7) - 30.0).abs() < 1e-4);
        // a malformed table names the file and the key
        for bad in [Tensor::new(&[[8f32, 20.], [10., 30.], [1., 2.]], &Device::Cpu).unwrap(), Tensor::new(&[[20f32, 8.], [10., 30.]], &Device::Cpu).unwrap()] {
            tensors.insert("qf_calibration".into(), bad);
            let err = Cave::load(&TensorFile::from_tensors(std::path::Path::new("m.safetensors"), tensors.clone()), &Device::Cpu).err().unwrap().to_string();
            assert!(err.contains("m.safetensors") && err.contains("qf_calibration"), "{err}");
        }
    }

    #[test]
    fn tiled_embedding_equals_the_whole_frame() {
        let cfg = CaveConfig { nc: [4, 8, 8, 16], nb: 2 };
        let file = TensorFile::from_tensors(std::path::Path::new("<synthetic>"), synthetic_tensors(cfg, false).unwrap());
        let cave = Cave::load(&file, &Device::Cpu).unwrap();
        assert_eq!(cave.tile_margin(), 192);
        // 520 x 700: 16 x 21 tokens, with the 4-px remainder on the right
        let x = Tensor::rand(0f32, 1., (1, 3, 520, 700), &Device::Cpu).unwrap();
        let (whole, q_whole) = cave.embed(&x).unwrap();
        for tile in [512, 600] {
            let (tiled, q) = cave.embed_tiled(&x, tile).unwrap();
            assert_eq!(tiled.dims(), whole.dims());
            let diff = (&tiled - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = whole.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "tile {tile}: max |diff| {diff} (scale {scale})");
            let dq = (&q - &q_whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(dq < 1e-6, "tile {tile}: q differs by {dq}");
        }
        // a margin-sized tile cannot keep any token
        let err = cave.embed_tiled(&x, 400).unwrap_err().to_string();
        assert!(err.contains("192 px margins"), "{err}");
    }
}
