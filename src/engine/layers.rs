//! The building blocks of the SD VAE and UNet (diffusers' module names and
//! maths), written so that on the CPU at f32 they run on the kernels of
//! [`super::kernels`]: banded-GEMM convolutions with the residual add fused,
//! one-pass group norm + SiLU, and blocked attention that never holds the
//! whole score matrix. On other devices or dtypes every block falls back to
//! candle's own ops, so CUDA and f16 keep working.
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{self as nn, Init, VarBuilder};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::kernels::{
    coefficients, contiguous, AttentionOp, ChannelAffine, ConvInto, ConvOp, ConvPairsInto, ConvPlusInto, Geglu,
    GroupNormOp, LinearOp, Math, PatchConv, PatchInto, Up2Conv, Upsample2x,
};

fn fast_path(dev: &Device, dtype: DType) -> bool {
    dev.is_cpu() && dtype == DType::F32
}

/// The one 2-D convolution of the engine (CaVE, VAE, UNet): square kernel,
/// any stride, zero padding per side (top, left, bottom, right), optional
/// bias and ReLU, and a residual add fused where the kernel has one. The
/// back-end is chosen once, at construction, from the weight's device and
/// dtype and the shape ([`ConvKind`]).
pub struct Conv {
    kind: ConvKind,
    /// ReLU after the bias (inside the kernel for [`ConvKind::Fast`]).
    relu: bool,
}

/// How a [`Conv`] runs.
enum ConvKind {
    /// CPU f32: banded im2col + GEMM, Winograd or the direct kernel.
    Fast(ConvOp),
    /// CPU f32, kernel = stride, no padding (CaVE's strided downsampling):
    /// non-overlapping patches, one GEMM.
    Patch(PatchConv),
    /// 1x1, stride 1 on other devices: a matmul.
    Pointwise { w: Tensor, b: Option<Tensor> },
    /// Everything else: candle's conv2d.
    Candle { w: Tensor, b: Option<Tensor>, stride: usize, pad: [usize; 4] },
}

impl Conv {
    /// Weight `weight` `[cout, cin, k, k]` (and `bias` when `bias`) from `vb`.
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: [usize; 4],
        bias: bool,
    ) -> candle_core::Result<Self> {
        let bound = 1. / ((cin * k * k) as f64).sqrt();
        let w = vb.get_with_hints((cout, cin, k, k), "weight", Init::Uniform { lo: -bound, up: bound })?;
        let b =
            if bias { Some(vb.get_with_hints(cout, "bias", Init::Uniform { lo: -bound, up: bound })?) } else { None };
        Self::from_tensors(w, b, stride, pad, false)
    }

    /// A convolution of `w` `[cout, cin, k, k]` and `b` `[cout]`.
    pub fn from_tensors(
        w: Tensor,
        b: Option<Tensor>,
        stride: usize,
        pad: [usize; 4],
        relu: bool,
    ) -> candle_core::Result<Self> {
        let (cout, cin, k, _) = w.dims4()?;
        let kind = if fast_path(w.device(), w.dtype()) {
            match &b {
                Some(bias) if k == stride && k > 1 && pad == [0; 4] => {
                    ConvKind::Patch(PatchConv::from_tensors(&w, bias)?)
                }
                _ => ConvKind::Fast(ConvOp::new(&w, b.as_ref(), stride, pad, relu)?),
            }
        } else if k == 1 && stride == 1 && pad == [0; 4] {
            ConvKind::Pointwise { w: w.reshape((cout, cin))?, b }
        } else {
            ConvKind::Candle { w, b, stride, pad }
        };
        Ok(Self { kind, relu })
    }

    /// 3x3, stride 1, padding 1.
    pub fn same3(vb: VarBuilder, cin: usize, cout: usize) -> candle_core::Result<Self> {
        Self::new(vb, cin, cout, 3, 1, [1; 4], true)
    }

    /// 1x1.
    pub fn point(vb: VarBuilder, cin: usize, cout: usize) -> candle_core::Result<Self> {
        Self::new(vb, cin, cout, 1, 1, [0; 4], true)
    }

    /// `act(conv(x)) + residual`, the add fused into the kernel where there is one.
    pub fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if let ConvKind::Fast(op) = &self.kind {
            let x = x.contiguous()?;
            return match residual {
                Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, op),
                None => x.apply_op1_no_bwd(op),
            };
        }
        let y = match &self.kind {
            ConvKind::Fast(_) => unreachable!(),
            ConvKind::Patch(op) => x.contiguous()?.apply_op1_no_bwd(op)?,
            ConvKind::Pointwise { w, b } => {
                let (n, c, h, wd) = x.dims4()?;
                let y = w.broadcast_matmul(&x.reshape((n, c, h * wd))?)?.reshape((n, w.dim(0)?, h, wd))?;
                match b {
                    Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
                    None => y,
                }
            }
            ConvKind::Candle { w, b, stride, pad } => {
                let [t, l, bo, r] = *pad;
                // WORKAROUND (candle 0.11.1): its CPU conv2d calls the GEMM
                // kernel directly (cpu_backend/conv2d.rs), which has no bf16, so
                // a bf16 conv on the CPU fails with "unsupported dtype BF16 for
                // op matmul". Run it in f32 and round back: the same result as
                // a bf16 conv with f32 accumulation.
                let widen = x.device().is_cpu() && x.dtype() == DType::BF16;
                let (xc, wc) =
                    if widen { (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?) } else { (x.clone(), w.clone()) };
                let y = if t == bo && l == r && t == l {
                    xc.conv2d(&wc, t, *stride, 1, 1)?
                } else {
                    xc.pad_with_zeros(2, t, bo)?.pad_with_zeros(3, l, r)?.conv2d(&wc, 0, *stride, 1, 1)?
                };
                let y = if widen { y.to_dtype(DType::BF16)? } else { y };
                match b {
                    Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
                    None => y,
                }
            }
        };
        let y = if self.relu { y.relu()? } else { y };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// [`Conv::forward_add`] into `dst`'s buffer, which the caller owns alone
    /// (no other tensor shares its storage): `act(conv(x))`, plus `dst` itself
    /// when `residual`. A fresh tensor where the fast kernel does not apply.
    pub fn forward_into(&self, x: &Tensor, dst: Tensor, residual: bool) -> candle_core::Result<Tensor> {
        match &self.kind {
            ConvKind::Fast(op) if dst.is_contiguous() => {
                dst.inplace_op2(&x.contiguous()?, &ConvInto { op, accumulate: residual, norm: None })?;
                Ok(dst)
            }
            ConvKind::Patch(op) if dst.is_contiguous() && !residual => {
                dst.inplace_op2(&x.contiguous()?, &PatchInto(op))?;
                Ok(dst)
            }
            _ => self.forward_add(x, residual.then_some(&dst)),
        }
    }

    /// Whether this convolution, on a frame `w` wide, reads and writes bf16
    /// channel pairs ([`ConvOp::pairs_for`]).
    pub fn pairs_for(&self, w: usize) -> bool {
        matches!(&self.kind, ConvKind::Fast(op) if op.pairs_for(w))
    }

    /// `act(conv(x))` as bf16 channel pairs into `dst` (u32 `[B, cout / 2, H,
    /// W]`, owned by the caller alone), for a convolution that
    /// [`Conv::pairs_for`] to read (its `forward_into` and
    /// `forward_plus_into` take such a tensor as `x`). Where this one does not
    /// multiply pairs, an error.
    pub fn forward_pairs_into(&self, x: &Tensor, dst: Tensor) -> candle_core::Result<Tensor> {
        match &self.kind {
            ConvKind::Fast(op) => {
                dst.inplace_op2(&x.contiguous()?, &ConvPairsInto(op))?;
                Ok(dst)
            }
            _ => candle_core::bail!("conv into pairs: not a CPU convolution"),
        }
    }

    /// `act(conv(x)) + residual` into `dst`'s buffer, which the caller owns
    /// alone; a fresh tensor where the fast kernel does not apply.
    pub fn forward_plus_into(&self, x: &Tensor, dst: Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        match &self.kind {
            ConvKind::Fast(op) if dst.is_contiguous() => {
                dst.inplace_op3(&x.contiguous()?, &residual.contiguous()?, &ConvPlusInto { op, norm: None })?;
                Ok(dst)
            }
            _ => self.forward_add(x, Some(residual)),
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_add(x, None)
    }
}

/// Dead activations, by shape, for layers to write into instead of fresh
/// memory: a fresh buffer costs the page clearing of its first touch (about
/// 15 % of a 720p frame of the default model before this pool; 10 % of the
/// full model's VAE). A tensor goes in only when no other tensor shares its
/// storage. The CaVE keeps a frame's pool for the next frame of the same
/// size; the VAE's walk keeps one per level of its resolution.
#[derive(Default)]
pub struct Pool(Vec<Tensor>);

impl Drop for Pool {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Pool {
    /// A dead f32 tensor of these dims, if the pool has one.
    pub fn take(&mut self, dims: &[usize]) -> Option<Tensor> {
        self.take_of(dims, DType::F32)
    }

    /// A dead tensor of these dims and dtype, if the pool has one.
    pub fn take_of(&mut self, dims: &[usize], dtype: DType) -> Option<Tensor> {
        let i = self.0.iter().position(|t| t.dims() == dims && t.dtype() == dtype)?;
        Some(self.0.swap_remove(i))
    }

    /// A dead tensor of these dims and dtype, or a new one (f32 on the CPU
    /// from the active spare where one fits, else zeroed); either way the
    /// caller writes every value.
    pub fn take_or_new(&mut self, dims: &[usize], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match self.take_of(dims, dtype) {
            Some(t) => Ok(t),
            None if dtype == DType::F32 && device.is_cpu() => {
                Tensor::from_vec(super::kernels::activation(dims.iter().product()), dims, device)
            }
            None => Tensor::zeros(dims, dtype, device),
        }
    }

    /// `t`, whose storage no other tensor shares, is dead.
    pub fn put(&mut self, t: Tensor) {
        self.0.push(t);
    }

    /// `conv(x)` into a dead tensor of `dims` (the output's) when there is one.
    pub fn conv(&mut self, conv: &Conv, x: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
        match self.take(dims) {
            Some(t) => conv.forward_into(x, t, false),
            None => conv.forward_add(x, None),
        }
    }

    /// `conv(x)` as bf16 channel pairs (`[B, C / 2, H, W]` u32, `C` the
    /// output's channels) into a dead tensor of those dims, or a fresh one.
    pub fn conv_pairs(&mut self, conv: &Conv, x: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
        conv.forward_pairs_into(x, self.take_or_new(dims, DType::U32, x.device())?)
    }

    /// How many dead tensors the pool holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the pool holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Drop every dead tensor (their sizes will not come back): their
    /// buffers go to the active spare ([`kernels::give_back`]).
    pub fn clear(&mut self) {
        self.0.drain(..).for_each(super::kernels::give_back);
    }

    /// `conv(norm(x))` (+ `residual`) into a dead tensor of `dims` (the
    /// output's) or a fresh one: the norm fused into the convolution where
    /// both run the CPU kernels ([`ConvInto`]'s `norm`: no normalised tensor is
    /// written), else the norm's output first.
    pub fn norm_conv(
        &mut self,
        norm: &GroupNorm,
        silu: bool,
        conv: &Conv,
        x: &Tensor,
        residual: Option<&Tensor>,
        dims: &[usize],
    ) -> candle_core::Result<Tensor> {
        match (norm.fast_op(silu), &conv.kind) {
            (Some(n), ConvKind::Fast(op)) => {
                let dst = self.take_or_new(dims, DType::F32, x.device())?;
                let x = x.contiguous()?;
                match residual {
                    None => dst.inplace_op2(&x, &ConvInto { op, accumulate: false, norm: Some(&n) })?,
                    Some(r) => dst.inplace_op3(&x, &r.contiguous()?, &ConvPlusInto { op, norm: Some(&n) })?,
                }
                Ok(dst)
            }
            _ => conv.forward_add(&norm.forward(x, silu)?, residual),
        }
    }
}

/// Gamma and beta of a norm as plain vectors, for the fast CPU kernel.
type Affine = (Arc<Vec<f32>>, Arc<Vec<f32>>);

/// Group norm with an optional fused SiLU.
pub struct GroupNorm {
    candle: nn::GroupNorm,
    gamma: Tensor,
    beta: Tensor,
    fast: Option<Affine>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> candle_core::Result<Self> {
        let gamma = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let beta = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        let fast = if fast_path(vb.device(), vb.dtype()) {
            Some((Arc::new(gamma.to_vec1::<f32>()?), Arc::new(beta.to_vec1::<f32>()?)))
        } else {
            None
        };
        Ok(Self {
            candle: nn::GroupNorm::new(gamma.clone(), beta.clone(), channels, groups, eps)?,
            gamma,
            beta,
            fast,
            groups,
            eps,
        })
    }

    /// The CPU kernel of this norm, where the fast path runs.
    fn fast_op(&self, silu: bool) -> Option<GroupNormOp> {
        let (gamma, beta) = self.fast.as_ref()?;
        Some(GroupNormOp { groups: self.groups, eps: self.eps, gamma: gamma.clone(), beta: beta.clone(), silu })
    }

    pub fn forward(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        match self.fast_op(silu) {
            Some(op) => x.contiguous()?.apply_op1_no_bwd(&op),
            None => {
                let y = self.candle.forward(x)?;
                if silu {
                    nn::ops::silu(&y)
                } else {
                    Ok(y)
                }
            }
        }
    }
}

/// Mean and biased variance of each (item, group) of one tile, and the tile's
/// pixel count: what VAEHook's `get_var_mean` records per tile.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub pixels: usize,
}

impl GroupStats {
    /// VAEHook's pooling (`GroupNormParam.summary`): the tiles' means and
    /// variances averaged with weights proportional to their pixel counts,
    /// padding included (tiles overlap by their padding, which counts in every
    /// tile that holds it). The variance is the weighted mean of the per-tile
    /// variances, not the variance of the union.
    pub fn pool(tiles: &[GroupStats]) -> candle_core::Result<GroupStats> {
        let first = tiles.first().ok_or_else(|| candle_core::Error::Msg("group norm statistics of no tile".into()))?;
        let total: usize = tiles.iter().map(|t| t.pixels).sum();
        let mut mean = vec![0f64; first.mean.len()];
        let mut var = vec![0f64; first.var.len()];
        for t in tiles {
            if t.mean.len() != mean.len() {
                candle_core::bail!("group norm statistics of {} and {} groups", t.mean.len(), mean.len());
            }
            let wgt = t.pixels as f64 / total as f64;
            mean.iter_mut().zip(&t.mean).for_each(|(m, v)| *m += wgt * v);
            var.iter_mut().zip(&t.var).for_each(|(m, v)| *m += wgt * v);
        }
        Ok(GroupStats { mean, var, pixels: total })
    }
}

/// Per-(item, group) mean and biased variance, `[B*G, 2]` f64 (CPU f32).
struct GroupStatsOp {
    groups: usize,
}

impl CustomOp1 for GroupStatsOp {
    fn name(&self) -> &'static str {
        "codiff-group-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "group stats")?;
        let dims = l.shape().dims();
        let bg = dims[0] * self.groups;
        let n = x.len() / bg.max(1);
        let out: Vec<f64> = x
            .par_chunks(n.max(1))
            .flat_map_iter(|xi| {
                let (mean, var) = super::kernels::mean_var(xi);
                [mean, var]
            })
            .collect();
        Ok((CpuStorage::F64(out), Shape::from((bg, 2))))
    }
}

impl GroupNorm {
    /// This tile's statistics for VAEHook's pooling.
    pub fn stats(&self, x: &Tensor) -> candle_core::Result<GroupStats> {
        let (b, c, h, w) = x.dims4()?;
        if c % self.groups != 0 {
            candle_core::bail!("group norm: {c} channels in {} groups", self.groups);
        }
        let bg = b * self.groups;
        let st = if fast_path(x.device(), x.dtype()) {
            x.contiguous()?.apply_op1_no_bwd(&GroupStatsOp { groups: self.groups })?
        } else {
            let v = x.to_dtype(DType::F64)?.reshape((bg, ()))?;
            let mean = v.mean_keepdim(1)?;
            let var = v.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            Tensor::cat(&[mean, var], 1)?
        };
        let st = st.to_device(&Device::Cpu)?.to_vec2::<f64>()?;
        Ok(GroupStats {
            mean: st.iter().map(|r| r[0]).collect(),
            var: st.iter().map(|r| r[1]).collect(),
            pixels: h * w,
        })
    }

    /// Normalise with given (pooled) statistics, VAEHook's `custom_group_norm`:
    /// `(x - mean) / sqrt(var + eps) * weight + bias`, then SiLU if asked.
    pub fn forward_with(&self, x: &Tensor, st: &GroupStats, silu: bool) -> candle_core::Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let cpg = c / self.groups;
        if st.mean.len() != b * self.groups {
            candle_core::bail!("group norm: statistics for {} groups, input has {}", st.mean.len(), b * self.groups);
        }
        let gamma = self.candle_weight()?;
        let beta = self.candle_bias()?;
        let ab: Vec<(f32, f32)> = (0..b * c)
            .map(|bc| {
                let (bi, ch) = (bc / c, bc % c);
                let g = bi * self.groups + ch / cpg;
                coefficients(gamma[ch], beta[ch], (st.mean[g], st.var[g]), self.eps)
            })
            .collect();
        if fast_path(x.device(), x.dtype()) {
            return x.contiguous()?.apply_op1_no_bwd(&ChannelAffine { ab, silu });
        }
        let (a, o): (Vec<f32>, Vec<f32>) = ab.into_iter().unzip();
        let shape = (b, c, 1, 1);
        let a = Tensor::from_vec(a, shape, x.device())?.to_dtype(x.dtype())?;
        let o = Tensor::from_vec(o, shape, x.device())?.to_dtype(x.dtype())?;
        let y = x.broadcast_mul(&a)?.broadcast_add(&o)?;
        if silu {
            nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }

    fn candle_weight(&self) -> candle_core::Result<Vec<f32>> {
        match &self.fast {
            Some((g, _)) => Ok(g.to_vec()),
            None => self.gamma.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1(),
        }
    }

    fn candle_bias(&self) -> candle_core::Result<Vec<f32>> {
        match &self.fast {
            Some((_, b)) => Ok(b.to_vec()),
            None => self.beta.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1(),
        }
    }
}

/// Scaled dot-product attention, `q` `[B, N, H*D]`, `k`, `v` `[B, M, H*D]`.
/// `math`: the arithmetic of both products on the CPU kernel.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, math: Math) -> candle_core::Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let d = c / heads;
    let scale = 1. / (d as f64).sqrt();
    if fast_path(q.device(), q.dtype()) {
        return q.contiguous()?.apply_op3_no_bwd(
            &k.contiguous()?,
            &v.contiguous()?,
            &AttentionOp { heads, scale: scale as f32, math },
        );
    }
    let m = k.dim(1)?;
    let split = |t: &Tensor, len: usize| t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous();
    let scores = (split(q, n)?.matmul(&split(k, m)?.t()?)? * scale)?;
    // softmax in f32 whatever the compute dtype
    let p = nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
    p.matmul(&split(v, m)?)?.transpose(1, 2)?.reshape((b, n, c))
}

/// A linear layer with its multiply-adds counted ([`super::kernels::flops`]):
/// on the CPU in f32 the kernel [`LinearOp`] (rows split over the threads,
/// the bias added as each block is written) in the layer's arithmetic (f32,
/// or [`Math::Bf16`] when built under [`super::kernels::build_with`]);
/// candle's elsewhere (CUDA, f16/bf16 tensors).
pub struct Linear {
    candle: nn::Linear,
    cpu: Option<LinearOp>,
}

impl Linear {
    pub fn new(w: Tensor, b: Option<Tensor>) -> candle_core::Result<Self> {
        let cpu = if fast_path(w.device(), w.dtype()) {
            Some(LinearOp::new(&w, b.as_ref(), super::kernels::building())?)
        } else {
            None
        };
        Ok(Self { candle: nn::Linear::new(w, b), cpu })
    }

    /// The arithmetic this layer was built for.
    pub fn math(&self) -> Math {
        self.cpu.as_ref().map_or(Math::F32, LinearOp::math)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (cout, cin) = self.candle.weight().dims2()?;
        let _counted = super::kernels::counted(super::kernels::OpKind::Linear, 2 * cout * x.elem_count() / cin.max(1));
        match &self.cpu {
            Some(op) if fast_path(x.device(), x.dtype()) => x.contiguous()?.apply_op1_no_bwd(op),
            _ => self.candle.forward(x),
        }
    }
}

/// `[cout, cin]` weight and a bias, as candle_nn's `linear`.
pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let l = nn::linear(cin, cout, vb)?;
    Linear::new(l.weight().clone(), l.bias().cloned())
}

/// `[cout, cin]` weight, no bias, as candle_nn's `linear_no_bias`.
pub fn linear_no_bias(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Linear::new(nn::linear_no_bias(cin, cout, vb)?.weight().clone(), None)
}

/// A linear layer whose weight may be stored as `[out, in]` or as a 1x1 conv
/// `[out, in, 1, 1]` (older VAE checkpoints).
pub fn linear_any(vb: VarBuilder, cin: usize, cout: usize, bias: bool) -> candle_core::Result<Linear> {
    let bound = 1. / (cin as f64).sqrt();
    let w = match vb.get_with_hints((cout, cin), "weight", Init::Uniform { lo: -bound, up: bound }) {
        Ok(w) => w,
        Err(e) => match vb.get((cout, cin, 1, 1), "weight") {
            Ok(w) => w.reshape((cout, cin))?,
            Err(_) => return Err(e),
        },
    };
    let b = if bias { Some(vb.get_with_hints(cout, "bias", Init::Const(0.))?) } else { None };
    Linear::new(w, b)
}

/// diffusers' `ResnetBlock2D`: GN-SiLU-conv, (+ time embedding), GN-SiLU-conv,
/// plus the (1x1-projected) input.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
    output_scale: f64,
    /// output channels
    cout: usize,
}

impl ResnetBlock {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale: f64,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv::same3(vb.pp("conv1"), cin, cout)?,
            time_emb_proj: match temb {
                Some(t) => Some(linear(t, cout, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: GroupNorm::new(vb.pp("norm2"), groups, cout, eps)?,
            conv2: Conv::same3(vb.pp("conv2"), cout, cout)?,
            shortcut: if cin != cout { Some(Conv::point(vb.pp("conv_shortcut"), cin, cout)?) } else { None },
            output_scale,
            cout,
        })
    }

    /// `temb_silu` is SiLU(time embedding), shared by every block of a UNet.
    pub fn forward(&self, x: &Tensor, temb_silu: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.forward_pooled(x, temb_silu, &mut Pool::default())
    }
}

impl ResnetBlock {
    /// [`ResnetBlock::forward`] with its buffers from `pool`: each norm is
    /// fused into the convolution after it ([`Pool::norm_conv`]), `conv1`'s
    /// output comes from a dead tensor and goes back once `conv2` has read
    /// it, and the output comes from one.
    pub fn forward_pooled(
        &self,
        x: &Tensor,
        temb_silu: Option<&Tensor>,
        pool: &mut Pool,
    ) -> candle_core::Result<Tensor> {
        let short = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let (b, _, hh, ww) = x.dims4()?;
        let dims = [b, self.cout, hh, ww];
        let mut h = pool.norm_conv(&self.norm1, true, &self.conv1, x, None, &dims)?;
        if let (Some(t), Some(p)) = (temb_silu, &self.time_emb_proj) {
            h = h.broadcast_add(&p.forward(t)?.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
        }
        let y = pool.norm_conv(&self.norm2, true, &self.conv2, &h, Some(&short), &dims)?;
        pool.put(h);
        if self.output_scale == 1.0 {
            Ok(y)
        } else {
            y / self.output_scale
        }
    }

    pub fn norm1(&self) -> &GroupNorm {
        &self.norm1
    }

    pub fn norm2(&self) -> &GroupNorm {
        &self.norm2
    }

    /// First half on one tile with pooled `norm1` statistics (no time
    /// embedding): `conv1(silu(norm1(x)))` and the residual (`x` or its 1x1
    /// projection), so that `x` itself can be dropped.
    pub fn first_half_with(&self, x: &Tensor, st1: &GroupStats) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self.conv1.forward(&self.norm1.forward_with(x, st1, true)?)?;
        let res = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((h, res))
    }

    /// Second half on one tile with pooled `norm2` statistics:
    /// `conv2(silu(norm2(h))) + res`, over the output scale.
    pub fn second_half_with(&self, h: &Tensor, res: &Tensor, st2: &GroupStats) -> candle_core::Result<Tensor> {
        let y = self.conv2.forward_add(&self.norm2.forward_with(h, st2, true)?, Some(res))?;
        if self.output_scale == 1.0 {
            Ok(y)
        } else {
            y / self.output_scale
        }
    }
}

/// The VAE's single-head spatial self-attention (diffusers `Attention` with
/// group norm and residual).
pub struct VaeAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl VaeAttention {
    /// Weights under either naming: `to_q/to_k/to_v/to_out.0` (current
    /// diffusers) or `query/key/value/proj_attn` (older checkpoints).
    pub fn new(vb: VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        let names = if vb.contains_tensor("query.weight") && !vb.contains_tensor("to_q.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            norm: GroupNorm::new(vb.pp("group_norm"), groups, c, 1e-6)?,
            q: linear_any(vb.pp(names[0]), c, c, true)?,
            k: linear_any(vb.pp(names[1]), c, c, true)?,
            v: linear_any(vb.pp(names[2]), c, c, true)?,
            out: linear_any(vb.pp(names[3]), c, c, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.attend(x, &self.norm.forward(x, false)?)
    }

    pub fn norm(&self) -> &GroupNorm {
        &self.norm
    }

    /// On one tile with pooled statistics; attention stays within the tile,
    /// as VAEHook runs it.
    pub fn forward_with(&self, x: &Tensor, st: &GroupStats) -> candle_core::Result<Tensor> {
        self.attend(x, &self.norm.forward_with(x, st, false)?)
    }

    fn attend(&self, x: &Tensor, normed: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = normed.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let o = attention(&self.q.forward(&t)?, &self.k.forward(&t)?, &self.v.forward(&t)?, 1, self.q.math())?;
        let o = self.out.forward(&o)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

/// diffusers' `Attention` inside a transformer block (no bias on q/k/v).
pub struct CrossAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl CrossAttention {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            q: linear_no_bias(dim, inner, vb.pp("to_q"))?,
            k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            out: linear(inner, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let o =
            attention(&self.q.forward(x)?, &self.k.forward(ctx)?, &self.v.forward(ctx)?, self.heads, self.q.math())?;
        self.out.forward(&o)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
pub struct TransformerBlock {
    norm1: nn::LayerNorm,
    attn1: CrossAttention,
    norm2: nn::LayerNorm,
    attn2: CrossAttention,
    norm3: nn::LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> candle_core::Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_in: linear(dim, 2 * inner, vb.pp("ff.net.0.proj"))?,
            ff_out: linear(inner, dim, vb.pp("ff.net.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + x)?;
        // GEGLU with the exact (erf) GELU, as PyTorch's F.gelu
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let h = if fast_path(h.device(), h.dtype()) {
            let g = h.contiguous()?.apply_op1_no_bwd(&Geglu)?;
            // the projection (the block's largest tensor: 42 MB a block at
            // 64x64 latents) is dead: its buffer serves the next block's
            super::kernels::give_back(h);
            g
        } else {
            let half = h.dim(D::Minus1)? / 2;
            (h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?)?
        };
        self.ff_out.forward(&h)? + x
    }
}

enum Proj {
    Linear(Linear),
    Conv(Conv),
}

/// `Transformer2DModel`: group norm, project in, transformer blocks, project
/// out, plus the input.
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        head_dim: usize,
        depth: usize,
        context_dim: usize,
        groups: usize,
        linear_projection: bool,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let proj = |vb: VarBuilder, i: usize, o: usize| -> candle_core::Result<Proj> {
            Ok(if linear_projection { Proj::Linear(linear(i, o, vb)?) } else { Proj::Conv(Conv::point(vb, i, o)?) })
        };
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: proj(vb.pp("proj_in"), channels, inner)?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), inner, heads, head_dim, context_dim)
                })
                .collect::<candle_core::Result<_>>()?,
            proj_out: proj(vb.pp("proj_out"), inner, channels)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x, false)?;
        let tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            let ch = t.dim(1)?;
            t.reshape((b, ch, h * w))?.transpose(1, 2)?.contiguous()
        };
        let mut t = match &self.proj_in {
            Proj::Linear(p) => p.forward(&tokens(&hn)?)?,
            Proj::Conv(p) => tokens(&p.forward(&hn)?)?,
        };
        for blk in &self.blocks {
            t = blk.forward(&t, context)?;
        }
        let inner = t.dim(2)?;
        let y = match &self.proj_out {
            Proj::Linear(p) => p.forward(&t)?.transpose(1, 2)?.reshape((b, c, h, w))?,
            Proj::Conv(p) => p.forward(&t.transpose(1, 2)?.reshape((b, inner, h, w))?)?,
        };
        y + x
    }
}

/// Nearest-neighbour upsampling (to `size`, default 2x) then a 3x3 conv.
pub struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn new(vb: VarBuilder, c: usize) -> candle_core::Result<Self> {
        Ok(Self { conv: Conv::same3(vb.pp("conv"), c, c)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let double = (th, tw) == (2 * h, 2 * w) && fast_path(x.device(), x.dtype());
        if let (true, ConvKind::Fast(op)) = (double, &self.conv.kind) {
            if op.up2_tile(h, w).is_some() {
                // the Winograd input transform reads the upsampling as it goes
                return x.contiguous()?.apply_op1_no_bwd(&Up2Conv(op));
            }
        }
        let up = if double { x.contiguous()?.apply_op1_no_bwd(&Upsample2x)? } else { x.upsample_nearest2d(th, tw)? };
        let y = self.conv.forward(&up)?;
        if double {
            // our upsampling's own buffer, dead: it serves the next frame's
            super::kernels::give_back(up);
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group norm with random affine parameters.
    fn norm(groups: usize, c: usize) -> GroupNorm {
        let vm = nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        GroupNorm::new(vb.pp("gn"), groups, c, 1e-6).unwrap();
        for v in vm.all_vars() {
            v.set(&Tensor::randn(0.5f32, 0.3, c, &Device::Cpu).unwrap()).unwrap();
        }
        GroupNorm::new(vb.pp("gn"), groups, c, 1e-6).unwrap()
    }

    #[test]
    fn pooled_statistics_weight_tiles_by_pixels_and_average_variances() {
        let a = GroupStats { mean: vec![1.0], var: vec![1.0], pixels: 30 };
        let b = GroupStats { mean: vec![3.0], var: vec![5.0], pixels: 10 };
        let p = GroupStats::pool(&[a, b]).unwrap();
        assert!((p.mean[0] - 1.5).abs() < 1e-12);
        // the tiles' variances averaged (2.0), not the union's variance (2.0 + 0.75)
        assert!((p.var[0] - 2.0).abs() < 1e-12);
        assert_eq!(p.pixels, 40);
    }

    #[test]
    fn normalising_with_a_frames_own_statistics_is_the_group_norm() {
        let gn = norm(4, 8);
        let x = (Tensor::randn(0f32, 2., (1, 8, 9, 11), &Device::Cpu).unwrap() + 3.0).unwrap();
        for silu in [false, true] {
            let st = gn.stats(&x).unwrap();
            let ours = gn.forward_with(&x, &st, silu).unwrap();
            let theirs = gn.forward(&x, silu).unwrap();
            let err = crate::engine::kernels::tests::max_err(&ours, &theirs);
            assert!(err < 1e-5, "silu {silu}: {err}");
        }
    }

    #[test]
    fn pooled_resnets_with_fused_norms_compute_the_plain_forward_and_hand_buffers_on() {
        let vm = nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        // 128 channels take the Winograd path (the norms fused into its input
        // transform), 16 -> 32 the direct kernel (normalised copies) and a 1x1
        // shortcut
        let wide = ResnetBlock::new(vb.pp("wide"), 128, 128, None, 32, 1e-6, 1.0).unwrap();
        let widening = ResnetBlock::new(vb.pp("widening"), 16, 32, None, 8, 1e-6, 2.0).unwrap();
        for v in vm.all_vars() {
            // norms with other gammas and betas than 1 and 0
            let r = (Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).unwrap() + 0.5).unwrap();
            v.set(&r).unwrap();
        }
        for (r, c) in [(&wide, 128), (&widening, 16)] {
            let x = (Tensor::randn(0f32, 2., (1, c, 20, 36), &Device::Cpu).unwrap() + 1.0).unwrap();
            // the blocks' maths one op at a time, each norm written out
            let short = match &r.shortcut {
                Some(s) => s.forward(&x).unwrap(),
                None => x.clone(),
            };
            let h = r.conv1.forward(&r.norm1.forward(&x, true).unwrap()).unwrap();
            let plain = (r.conv2.forward_add(&r.norm2.forward(&h, true).unwrap(), Some(&short)).unwrap()
                / r.output_scale)
                .unwrap();
            let mut pool = Pool::default();
            // twice: from an empty pool, then from the buffers the first run
            // left (garbage in them must not reach the output)
            for round in 0..2 {
                let pooled = r.forward_pooled(&x, None, &mut pool).unwrap();
                assert_eq!(crate::engine::kernels::tests::max_err(&pooled, &plain), 0.0, "round {round}");
                assert_eq!(crate::engine::kernels::tests::max_err(&r.forward(&x, None).unwrap(), &plain), 0.0);
                // conv1's buffer comes back
                assert_eq!(pool.len(), 1, "round {round}");
                pool.put(pooled.affine(0.0, f64::NAN).unwrap());
            }
        }
    }
}
