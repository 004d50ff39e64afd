//! [`ConvOp`]: k x k convolution, dispatched to the direct kernel, Winograd or
//! banded im2col + GEMM; [`ConvInto`], [`ConvPlusInto`] and [`AddInto`], its
//! in-place forms; [`PadInto`], the replicate padding before it.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, InplaceOp2, InplaceOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

use super::direct::{Dst, Src};
use super::{
    activation, contiguous, contiguous_mut, direct, gemm_strided, par_row_blocks, weight_values, winograd,
    winograd_enabled, ChannelAffine, GroupNormOp, Math, SendPtr,
};
use super::{DIRECT_MAX_CHANNELS, DIRECT_MAX_WIDE_WIDTH, DIRECT_NARROW, WINOGRAD_KEEP_BYTES, WINOGRAD_MIN_CHANNELS};

/// Frames of at most this many output pixels run im2col + GEMM as one band
/// (its GEMM split by output channel) when their column buffer holds at most
/// [`SMALL_FRAME_COLUMNS`] values: SD's UNet at 8x8 on 2 threads (medians
/// of 15, four interleaved rounds) took 15.2-16.1 ms in bands against
/// 10.8-11.0 as one band for 1280 channels, 22.5-23.1 against 20.2-23.9 for
/// 2560 -> 1280.
const SMALL_FRAME_PIXELS: usize = 256;
/// See [`SMALL_FRAME_PIXELS`] (8 MB of f32).
const SMALL_FRAME_COLUMNS: usize = 2 << 20;

/// k x k convolution (any stride, any zero padding per side) as banded
/// im2col + GEMM, optional fused ReLU and residual add.
#[derive(Clone, Debug)]
pub struct ConvOp {
    /// `[cout, cin, k, k]`, contiguous f32 on the CPU; shares the loaded
    /// tensor's memory (no copy of the model's weights)
    pub weight: Tensor,
    pub bias: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    /// zero padding: top, left, bottom, right
    pub pad: [usize; 4],
    pub relu: bool,
    /// the direct kernel's repacked weights, where it applies
    direct: Option<Arc<direct::Direct>>,
    /// run the direct kernel at every frame width (see [`ConvOp::direct`])
    always_direct: bool,
    /// the Winograd path applies: `Some(None)` picks the tile by frame size
    /// ([`winograd::tile_for`]), `Some(Some(m))` forces F(m x m, 3 x 3)
    winograd: Option<Option<usize>>,
    /// transformed weights kept for F(2,3) and F(4,3) (see [`WINOGRAD_KEEP_BYTES`])
    winograd_kept: [Arc<std::sync::OnceLock<Arc<winograd::Winograd>>>; 2],
    /// the arithmetic of the Winograd F(2,3) path and of the direct kernel
    /// ([`super::building`] when made); F(4,3) and im2col + GEMM multiply in
    /// f32 whatever it is (see [`ConvOp::run`])
    pub math: Math,
}

impl ConvOp {
    /// A square kernel from `w` `[cout, cin, k, k]`, stride 1, "same" padding k/2.
    pub fn from_tensors(w: &Tensor, b: Option<&Tensor>, relu: bool) -> candle_core::Result<Self> {
        let k = w.dim(3)?;
        Self::new(w, b, 1, [k / 2; 4], relu)
    }

    pub fn new(
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pad: [usize; 4],
        relu: bool,
    ) -> candle_core::Result<Self> {
        let (cout, cin, kh, kw) = w.dims4()?;
        if kh != kw || stride == 0 {
            candle_core::bail!("ConvOp needs a square kernel and a stride >= 1, got {kh}x{kw} stride {stride}");
        }
        let bias = match b {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1()?,
            None => vec![0.0; cout],
        };
        let weight = w.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.contiguous()?;
        let op = Self {
            weight,
            bias,
            cin,
            cout,
            k: kh,
            stride,
            pad,
            relu,
            direct: None,
            always_direct: false,
            winograd: None,
            winograd_kept: Default::default(),
            math: super::building(),
        };
        let op = if cin.min(cout) >= WINOGRAD_MIN_CHANNELS && winograd_enabled() { op.with_winograd(None) } else { op };
        if cin.max(cout) <= DIRECT_MAX_CHANNELS || cin.min(cout) <= DIRECT_NARROW {
            op.with_direct(false)
        } else {
            Ok(op)
        }
    }

    /// Attach the Winograd path where it applies (3x3, stride 1, padding 1),
    /// whatever the channels: F(m x m, 3 x 3) with `tile` m = 2 or 4 on every
    /// frame (benchmarks and tests), or by frame size when None.
    pub fn with_winograd(mut self, tile: Option<usize>) -> Self {
        if self.k == 3 && self.stride == 1 && self.pad == [1; 4] {
            assert!(matches!(tile, None | Some(2) | Some(4)), "Winograd F(m,3) has m = 2 or 4");
            self.winograd = Some(tile);
        }
        self
    }

    /// Whether this layer has the Winograd path.
    pub fn is_winograd(&self) -> bool {
        self.winograd.is_some()
    }

    /// The same convolution on the direct kernel where it applies (3x3,
    /// stride 1, padding 1, a CPU with AVX-512 or AVX2), whatever its channels and the
    /// frame's width (benchmarks and tests).
    pub fn direct(self) -> candle_core::Result<Self> {
        self.with_direct(true)
    }

    /// Attach the direct kernel where it applies; `always`: on every frame
    /// width, not only where [`DIRECT_MAX_CHANNELS`]' rule picks it.
    fn with_direct(mut self, always: bool) -> candle_core::Result<Self> {
        if self.k == 3 && self.stride == 1 && self.pad == [1; 4] && direct::available() {
            let w = self.weight.flatten_all()?.to_vec1::<f32>()?;
            let d = direct::Direct::new(&w, self.cout, self.cin);
            let d = if self.math == Math::Bf16 { d.with_bf16(&w) } else { d };
            self.direct = Some(Arc::new(d));
            self.always_direct = always;
        }
        Ok(self)
    }

    /// The same convolution on im2col + GEMM only (benchmarks and tests
    /// compare the two paths).
    pub fn gemm_only(mut self) -> Self {
        self.direct = None;
        self.always_direct = false;
        self.winograd = None;
        self
    }

    /// Whether this layer has the direct kernel (layers narrow on one side
    /// use it on any frame, 17-64 channel layers on frames up to
    /// [`DIRECT_MAX_WIDE_WIDTH`] with AVX-512).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The direct kernel writing into `out`; `residual` may be `out` itself
    /// (each output is read as residual right before it is written).
    ///
    /// # Safety
    /// `x` holds `b` images of `cin` channels of `h * w` values (or of
    /// `cin.div_ceil(2)` planes of pairs), `out` of `cout` channels (or
    /// `cout / 2` planes of pairs: `cout` even, no residual), `residual`
    /// `b * cout * h * w` values; `d` is this layer's (so
    /// [`direct::available`] held when it was made), bf16 where `x` or `out`
    /// are pairs.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_direct_into(
        &self,
        d: &direct::Direct,
        x: Src,
        b: usize,
        h: usize,
        w: usize,
        residual: Option<*const f32>,
        out: Dst,
    ) {
        let (cin, cout, hw) = (self.cin, self.cout, h * w);
        let threads = rayon::current_num_threads().max(1);
        // a few chunks per thread for balance, each at least a few rows
        let rows = h.div_ceil(4 * threads).max(4).min(h);
        let chunks: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..h).step_by(rows).map(move |r0| (bi, r0))).collect();
        let res_ptr = residual.map(|r| SendPtr(r as *mut f32));
        chunks.par_iter().for_each(|&(bi, r0)| {
            let res_ptr = res_ptr;
            // SAFETY: direct::available() held when `d` was made (with_direct);
            // the caller's contract sizes x, out and residual, so image bi's
            // planes lie inside them; chunk (bi, r0) alone writes rows
            // r0..r0 + rows of image bi, and where residual is out it reads
            // each of those values right before writing it; `out` outlives
            // this blocking loop
            unsafe {
                d.rows(
                    x.image(bi, cin, hw),
                    h,
                    w,
                    r0,
                    (r0 + rows).min(h),
                    &self.bias,
                    self.relu,
                    res_ptr.map(|r| r.0.add(bi * cout * hw) as *const f32),
                    out.image(bi, cout, hw),
                )
            }
        });
    }

    /// Whether this layer, on a frame `w` wide, multiplies bf16 channel pairs
    /// on the direct kernel: it can read its input as pairs ([`ConvInto`] and
    /// [`ConvPlusInto`] from a u32 tensor) and write its output as pairs
    /// ([`ConvPairsInto`]), the rounding it would do itself.
    pub fn pairs_for(&self, w: usize) -> bool {
        self.direct_for(w).is_some_and(|d| d.is_bf16())
    }

    /// Whether [`ConvOp::run`] takes the direct kernel on a frame `w` wide.
    fn direct_for(&self, w: usize) -> Option<&direct::Direct> {
        let d = self.direct.as_deref()?;
        // on AVX2 only the narrow layers: at 16 channels and more its 8-lane
        // kernel is level with GEMM or Winograd at best (see DIRECT_NARROW)
        let wide_ok = d.isa() == direct::Isa::Avx512 && w <= DIRECT_MAX_WIDE_WIDTH;
        (self.always_direct || self.cin.min(self.cout) <= DIRECT_NARROW || wide_ok).then_some(d)
    }

    fn out_hw(&self, h: usize, w: usize) -> candle_core::Result<(usize, usize)> {
        let (k, s, [pt, pl, pb, pr]) = (self.k, self.stride, self.pad);
        if h + pt + pb < k || w + pl + pr < k {
            candle_core::bail!("conv: {h}x{w} input is smaller than the {k}x{k} kernel");
        }
        Ok(((h + pt + pb - k) / s + 1, (w + pl + pr - k) / s + 1))
    }

    /// Fill `col[(ci,ky,kx), (r - r0, ox)]` for output rows `r0..r1`.
    #[allow(clippy::too_many_arguments)] // one band of one image: its geometry
    fn im2col(&self, xb: &[f32], h: usize, w: usize, ow: usize, r0: usize, r1: usize, col: &mut [f32]) {
        let (k, s) = (self.k, self.stride);
        let (pt, pl) = (self.pad[0] as isize, self.pad[1] as isize);
        let n = (r1 - r0) * ow;
        let hw = h * w;
        for ci in 0..self.cin {
            let plane = &xb[ci * hw..(ci + 1) * hw];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut col[((ci * k + ky) * k + kx) * n..][..n];
                    // output columns whose source column lies inside the image
                    let off = kx as isize - pl;
                    let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(s) };
                    let hi = if (w as isize - 1 - off) < 0 {
                        0
                    } else {
                        (((w as isize - 1 - off) as usize) / s + 1).min(ow)
                    };
                    for r in r0..r1 {
                        let dst = &mut row[(r - r0) * ow..(r - r0 + 1) * ow];
                        let sy = (r * s) as isize + ky as isize - pt;
                        if sy < 0 || sy >= h as isize || lo >= hi {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[sy as usize * w..(sy as usize + 1) * w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let first = (lo * s) as isize + off;
                        if s == 1 {
                            dst[lo..hi].copy_from_slice(&src[first as usize..first as usize + (hi - lo)]);
                        } else {
                            for (i, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[first as usize + i * s];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Bias, activation and residual on `n` outputs of channel rows `co0..co0+m`.
    ///
    /// # Safety
    /// `dst` points at channel `co0`'s first output of the band; rows `hw` apart.
    unsafe fn epilogue(&self, dst: *mut f32, co0: usize, m: usize, n: usize, hw: usize, residual: Option<&[f32]>) {
        for co in co0..co0 + m {
            let d = std::slice::from_raw_parts_mut(dst.add((co - co0) * hw), n);
            let bias = self.bias[co];
            let res = residual.map(|r| &r[co * hw..][..n]);
            match (self.relu, res) {
                (true, None) => d.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
                (false, None) => d.iter_mut().for_each(|v| *v += bias),
                (true, Some(r)) => d.iter_mut().zip(r).for_each(|(v, r)| *v = (*v + bias).max(0.0) + r),
                (false, Some(r)) => d.iter_mut().zip(r).for_each(|(v, r)| *v += bias + r),
            }
        }
    }

    /// Whether this layer keeps its F(m,3) weights (see [`WINOGRAD_KEEP_BYTES`]).
    fn keeps(&self, m: usize) -> bool {
        (m + 2) * (m + 2) * self.cout * self.cin * 4 <= WINOGRAD_KEEP_BYTES
    }

    /// The Winograd tile side [`ConvOp::run_into`] takes on an `h x w`
    /// frame; None where the direct kernel or im2col + GEMM runs.
    fn winograd_tile(&self, h: usize, w: usize) -> Option<usize> {
        if self.direct_for(w).is_some() {
            return None;
        }
        self.winograd.and_then(|t| t.or_else(|| winograd::tile_for(h, w, self.keeps(4))))
    }

    /// Count this convolution's multiply-adds for an output of `shape`.
    #[must_use]
    fn count(&self, shape: &Shape) -> super::Counted {
        super::counted(super::OpKind::Conv, 2 * self.cin * self.k * self.k * shape.elem_count())
    }

    /// y = act(conv(x) + b) (+ residual), x `[B, cin, H, W]`, in a fresh
    /// buffer.
    fn run(&self, x: &[f32], b: usize, h: usize, w: usize, residual: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let (oh, ow) = self.out_hw(h, w)?;
        let mut out = activation(b * self.cout * oh * ow);
        self.run_into(x, b, h, w, residual, None, &mut out)?;
        Ok(out)
    }

    /// [`ConvOp::run`] into `out` (`[B, cout, OH, OW]`; its values before
    /// are not read), which the residual must not be; of `pre`'s
    /// normalisation of `x` where given (a group norm fused into the Winograd
    /// input transform; the other paths read a normalised copy).
    #[allow(clippy::too_many_arguments)]
    fn run_into(
        &self,
        x: &[f32],
        b: usize,
        h: usize,
        w: usize,
        residual: Option<&[f32]>,
        pre: Option<&ChannelAffine>,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let (oh, ow) = self.out_hw(h, w)?;
        let n = b * self.cout * oh * ow;
        if pre.is_some_and(|p| p.ab.len() != b * self.cin) {
            candle_core::bail!(
                "conv: a fused norm of {} channels for {b} x {}",
                pre.map_or(0, |p| p.ab.len()),
                self.cin
            );
        }
        if x.len() < b * self.cin * h * w || out.len() != n || residual.is_some_and(|r| r.len() < n) {
            candle_core::bail!(
                "conv: buffers of {} / {} values for a {b} x {} x {h} x {w} frame",
                x.len(),
                out.len(),
                self.cin
            );
        }
        let tile = self.winograd_tile(h, w);
        if let (Some(p), None) = (pre, tile) {
            // the paths that cannot fuse the norm read a normalised copy
            let normed = p.apply(&x[..b * self.cin * h * w], h * w);
            return self.run_into(&normed, b, h, w, residual, None, out);
        }
        if let Some(d) = self.direct_for(w) {
            // SAFETY: out and residual hold b * cout * h * w values and x
            // b * cin * h * w (checked; the direct kernel keeps the frame
            // size); out is a &mut, so neither x nor residual is it
            unsafe {
                let (src, dst) = (Src::F32(x.as_ptr()), Dst::F32(out.as_mut_ptr()));
                self.run_direct_into(d, src, b, h, w, residual.map(|r| r.as_ptr()), dst)
            };
            return Ok(());
        }
        if let Some(m) = tile {
            let residual = residual.map_or(winograd::Residual::None, winograd::Residual::From);
            return self.run_winograd(x, false, b, h, w, m, residual, pre, out);
        }
        let (storage, layout) = self.weight.storage_and_layout();
        let weight = weight_values(&storage, layout, "conv")?;
        let (cin, cout) = (self.cin, self.cout);
        let ohw = oh * ow;
        let kk = cin * self.k * self.k;
        // im2col + GEMM multiplies 1x1 and strided layers in the layer's
        // math, stride-1 3x3 ones in f32 whatever it is. In bf16 SD's VAE's
        // 256->128 shortcut at 512x512 took 88-90 ms against 121-127 in f32,
        // 512->256 at 256x256 70 against 104, its encoder's 128-channel
        // stride-2 layer at 512x512 94 against 131 (`bench_kernels`' second
        // table: `vdpbf16ps`' twice the f32 rate outweighs its rounding pass
        // over the operands there), while the UNet's stride-1 layers at 8x8
        // (the rest of this path) lost in the whole model (3.4-3.6 s against
        // 3.1-3.5)
        let math = if self.k == 1 || self.stride > 1 { self.math } else { Math::F32 };
        // a 1x1 stride-1 layer without padding reads its input rows as they
        // are: no column copy
        let pointwise = self.k == 1 && self.stride == 1 && self.pad == [0; 4];
        // rows per band: keep the column buffer around 2 MB, except on frames
        // of a few dozen pixels, whose whole column buffer is a few MB: there
        // bands of 5 and 3 rows (the UNet's 8x8 layers at 512x512) made GEMMs
        // of 40 and 24 columns, far from the kernel's peak, where one band
        // split by output channel keeps all 64 (see SMALL_FRAME_PIXELS)
        let rows = if oh * ow <= SMALL_FRAME_PIXELS && kk * oh * ow <= SMALL_FRAME_COLUMNS {
            oh
        } else {
            ((1usize << 19) / (kk * ow).max(1)).clamp(1, oh)
        };
        let bands: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..oh).step_by(rows).map(move |r0| (bi, r0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        let band = |bi: usize, r0: usize, col: &mut Vec<f32>, split_rows: bool| {
            let out_ptr = out_ptr;
            let r1 = (r0 + rows).min(oh);
            let n = (r1 - r0) * ow;
            let xb = &x[bi * cin * h * w..(bi + 1) * cin * h * w];
            // the GEMM's right operand: kk rows of n columns, `rhs_rs` apart
            let (rhs, rhs_rs): (&[f32], usize) = if pointwise {
                (&xb[r0 * ow..], h * w)
            } else {
                col.clear();
                col.resize(kk * n, 0.0);
                self.im2col(xb, h, w, ow, r0, r1, col);
                (col, n)
            };
            let res = residual.map(|r| &r[bi * cout * ohw + r0 * ow..]);
            // SAFETY: `out` holds b * cout * ohw values and outlives the loops;
            // this call alone writes channels co0..co0 + m of rows r0..r1 of
            // image bi (bands own their rows, par_row_blocks hands out disjoint
            // channel ranges); `weight` holds cout * kk values from co0 * kk as
            // long as the pub fields weight, cin, cout and k still describe the
            // same [cout, cin, k, k] tensor; `rhs` holds kk rows of n values
            // rhs_rs apart (`col`, or for a pointwise layer image bi's
            // channels from row r0, whose h w = oh ow values hold them)
            let gemm_rows = |co0: usize, m: usize| unsafe {
                let out_ptr = out_ptr;
                let dst = out_ptr.0.add(bi * cout * ohw + co0 * ohw + r0 * ow);
                let w0 = weight.as_ptr().add(co0 * kk);
                gemm_strided(math, m, n, kk, false, dst, ohw, 1, w0, kk, 1, rhs.as_ptr(), rhs_rs, 1);
                self.epilogue(dst, co0, m, n, ohw, res);
            };
            if split_rows {
                par_row_blocks(cout, gemm_rows);
            } else {
                gemm_rows(0, cout);
            }
        };
        if bands.len() >= threads {
            bands.par_iter().for_each_init(Vec::new, |col, &(bi, r0)| band(bi, r0, col, false));
        } else {
            // too few bands to occupy the threads: split each GEMM by output channel
            let mut col = Vec::new();
            for &(bi, r0) in &bands {
                band(bi, r0, &mut col, true);
            }
        }
        Ok(())
    }

    /// The Winograd tile with which [`Up2Conv`] fuses the 2x upsampling of
    /// an `h x w` input into this layer (a 3x3, stride 1, pad 1 layer on
    /// Winograd there, with its transformed weights kept or made per call);
    /// None: upsample first.
    pub fn up2_tile(&self, h: usize, w: usize) -> Option<usize> {
        let (uh, uw) = (2 * h, 2 * w);
        if self.k != 3 || self.stride != 1 || self.pad != [1; 4] {
            return None;
        }
        self.winograd_tile(uh, uw).filter(|&m| self.keeps(m) || !winograd::streams(self.cin, uh, uw, m))
    }

    /// [`ConvOp::run_into`] on Winograd F(m x m, 3 x 3), plus `residual`, on
    /// `x` or (`up`) its 2x nearest upsampling (`h x w` the output's sides
    /// either way).
    #[allow(clippy::too_many_arguments)]
    fn run_winograd(
        &self,
        x: &[f32],
        up: bool,
        b: usize,
        h: usize,
        w: usize,
        m: usize,
        residual: winograd::Residual<'_>,
        pre: Option<&ChannelAffine>,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        // F(4,3) multiplies in f32 whatever the layer's math: its
        // transforms spread values over a range where bf16's 8-bit
        // mantissa loses the output (max error 26 % of the output's
        // magnitude, against 1.7 % for F(2,3) and 0.7 % for GEMM in bf16:
        // bf16_layers_match_candle_to_bf16_rounding), and F(2,3) in bf16
        // (4 products per output, 1.3x faster each) is slower than F(4,3)
        // in f32 (2.25): the VAE decoder at 512x512 took 9.1 s against 7.8
        let math = if m == 4 { Math::F32 } else { self.math };
        let (storage, layout) = self.weight.storage_and_layout();
        let weight = weight_values(&storage, layout, "conv")?;
        let (cin, cout) = (self.cin, self.cout);
        if !self.keeps(m) && winograd::streams(cin, h, w, m) {
            if up {
                candle_core::bail!("conv: no fused upsampling on the streamed Winograd path");
            }
            winograd::run_streamed(
                math,
                &weight[..cout * cin * 9],
                cout,
                cin,
                m,
                x,
                b,
                h,
                w,
                &self.bias,
                self.relu,
                residual,
                pre,
                out,
            );
            return Ok(());
        }
        let weight = &weight[..cout * cin * 9];
        let mut run = |wg: &winograd::Winograd| wg.run_into(x, up, b, h, w, &self.bias, self.relu, residual, pre, out);
        if self.keeps(m) {
            let make = || Arc::new(winograd::Winograd::new(weight, cout, cin, m).with_math(math));
            run(self.winograd_kept[m / 4].get_or_init(make));
        } else {
            let wg = winograd::Winograd::for_call(weight, cout, cin, m).with_math(math);
            run(&wg);
            wg.recycle();
        }
        Ok(())
    }

    fn out_shape(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        if c != self.cin {
            candle_core::bail!("conv: {c} input channels, weight expects {}", self.cin);
        }
        let (oh, ow) = self.out_hw(h, w)?;
        Ok((b, h, w, Shape::from((b, self.cout, oh, ow))))
    }
}

impl CustomOp1 for ConvOp {
    fn name(&self) -> &'static str {
        "codiff-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "conv")?;
        let (b, h, w, shape) = self.out_shape(l)?;
        let _counted = self.count(&shape);
        Ok((CpuStorage::F32(self.run(x, b, h, w, None)?), shape))
    }
}

/// The same convolution plus a residual input: `y = act(conv(x) + b) + r`.
impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "codiff-conv-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "conv")?;
        let r = contiguous(s2, l2, "conv residual")?;
        let (b, h, w, shape) = self.out_shape(l1)?;
        if l2.shape() != &shape {
            candle_core::bail!("conv residual shape {:?}, output {:?}", l2.shape(), shape);
        }
        let _counted = self.count(&shape);
        Ok((CpuStorage::F32(self.run(x, b, h, w, Some(r))?), shape))
    }
}

/// A [`ConvOp`] writing into an existing tensor (`dst.inplace_op2(&x, ..)`),
/// so that chains of same-shaped layers (ResBlocks) reuse their buffers
/// instead of faulting in fresh ones: `dst = act(conv(x) + b)`, or with
/// `accumulate`, `dst = act(conv(x) + b) + dst` (the residual add in place).
/// `dst` must not share storage with `x`, nor with any tensor still needed.
/// Every path writes into `dst`, except that with `accumulate` im2col + GEMM
/// computes into a fresh buffer and copies (the direct kernel and Winograd
/// add `dst` in place).
///
/// With `norm`, of the group norm (+ SiLU) of `x`: a ResNet block's norm and
/// the convolution after it, the norm fused into the Winograd input
/// transform (no normalised tensor is written; the other paths normalise a
/// copy first), the same numbers as the norm then the convolution.
pub struct ConvInto<'a> {
    pub op: &'a ConvOp,
    pub accumulate: bool,
    pub norm: Option<&'a GroupNormOp>,
}

impl InplaceOp2 for ConvInto<'_> {
    fn name(&self) -> &'static str {
        "codiff-conv-into"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let dst = contiguous_mut(s1, l1, "conv into")?;
        self.op.run_to(dst, l1, s2, l2, if self.accumulate { Add::Dst } else { Add::Nothing }, self.norm)
    }
}

/// A [`ConvOp`] on the 2x nearest upsampling of its input (the SD VAE
/// decoder's upsamplers), the upsampling read by the Winograd input transform
/// rather than written (256 MB at 512x512 for the last one); for layers and
/// sizes where [`ConvOp::up2_tile`] has a tile, else an error.
pub struct Up2Conv<'a>(pub &'a ConvOp);

impl CustomOp1 for Up2Conv<'_> {
    fn name(&self) -> &'static str {
        "codiff-upsample2x-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.0;
        let x = contiguous(s, l, "upsample conv")?;
        let (b, c, h, w) = l.shape().dims4()?;
        if c != op.cin {
            candle_core::bail!("upsample conv: {c} input channels, weight expects {}", op.cin);
        }
        let (uh, uw) = (2 * h, 2 * w);
        let Some(m) = op.up2_tile(h, w) else {
            candle_core::bail!("upsample conv: no fused upsampling for this layer at {h}x{w}")
        };
        let shape = Shape::from((b, op.cout, uh, uw));
        let _counted = op.count(&shape);
        let mut out = activation(shape.elem_count());
        op.run_winograd(x, true, b, uh, uw, m, winograd::Residual::None, None, &mut out)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

/// A [`ConvOp`] (no residual, an even number of output channels) writing
/// its output as bf16 channel pairs into a u32 tensor `[B, cout / 2, H, W]`
/// (`dst.inplace_op2(&x, ..)`), for a bf16 layer to read
/// ([`ConvOp::pairs_for`]): a ResBlock's inner activation at half the bytes
/// and without its second conversion. Where this layer does not multiply
/// pairs on the direct kernel, an error.
pub struct ConvPairsInto<'a>(pub &'a ConvOp);

impl InplaceOp2 for ConvPairsInto<'_> {
    fn name(&self) -> &'static str {
        "codiff-conv-pairs-into"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let op = self.0;
        let (b, h, w, shape) = op.out_shape(l2)?;
        let x = contiguous(s2, l2, "conv")?;
        let d = op.direct_for(w).filter(|d| d.is_bf16() && op.cout.is_multiple_of(2) && op.stride == 1);
        let Some(d) = d else { candle_core::bail!("conv into pairs: the layer does not multiply bf16 pairs here") };
        let want = Shape::from((b, op.cout / 2, h, w));
        let dst = match (s1, l1.contiguous_offsets()) {
            (CpuStorage::U32(v), Some((o0, o1))) if l1.shape() == &want => &mut v[o0..o1],
            _ => candle_core::bail!(
                "conv into pairs: a contiguous u32 {want:?} destination expected, got {:?}",
                l1.shape()
            ),
        };
        let _counted = op.count(&shape);
        // SAFETY: dst holds b * cout / 2 * h * w words (its shape checked),
        // x b * cin * h * w values (out_shape took b, h, w from its layout
        // and checked its channels); candle refuses a destination sharing
        // storage with the source; `d` came from direct_for and multiplies
        // bf16 pairs; cout is even and there is no residual
        unsafe { op.run_direct_into(d, Src::F32(x.as_ptr()), b, h, w, None, Dst::Pairs(dst.as_mut_ptr())) };
        Ok(())
    }
}

/// [`ConvInto`] with the residual from a third tensor
/// (`dst.inplace_op3(&x, &residual, ..)`): `dst = act(conv(x) + b) +
/// residual`, the first ResBlock of a level writing into a dead buffer while
/// its input lives on as the skip. candle refuses a `residual` or `x` that
/// shares `dst`'s storage. `norm` as in [`ConvInto`].
pub struct ConvPlusInto<'a> {
    pub op: &'a ConvOp,
    pub norm: Option<&'a GroupNormOp>,
}

impl InplaceOp3 for ConvPlusInto<'_> {
    fn name(&self) -> &'static str {
        "codiff-conv-plus-into"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        if l3.shape() != l1.shape() {
            candle_core::bail!("conv residual shape {:?}, output {:?}", l3.shape(), l1.shape());
        }
        let r = contiguous(s3, l3, "conv residual")?;
        let dst = contiguous_mut(s1, l1, "conv into")?;
        self.op.run_to(dst, l1, s2, l2, Add::From(r), self.norm)
    }
}

/// What [`ConvOp::run_to`] adds to the convolution's output.
enum Add<'a> {
    Nothing,
    /// the destination's own values (the residual add in place)
    Dst,
    /// a tensor of the output's shape
    From(&'a [f32]),
}

impl Add<'_> {
    /// The direct kernel's residual for a destination at `out`.
    fn residual(&self, out: *mut f32) -> Option<*const f32> {
        match self {
            Add::Nothing => None,
            Add::Dst => Some(out as *const f32),
            Add::From(r) => Some(r.as_ptr()),
        }
    }
}

impl ConvOp {
    /// The convolution of `x` (layout `lx`: f32 channels, or u32 bf16 pairs
    /// of them where [`ConvOp::pairs_for`] holds) into `dst` (layout `ld`,
    /// checked to be the output's shape), plus `add`. `dst` must not be `x`.
    /// With `norm`, of the group norm of an f32 `x` (fused where the layer
    /// runs Winograd, see [`ConvOp::run_into`]).
    fn run_to(
        &self,
        dst: &mut [f32],
        ld: &Layout,
        xs: &CpuStorage,
        lx: &Layout,
        add: Add<'_>,
        norm: Option<&GroupNormOp>,
    ) -> candle_core::Result<()> {
        let (b, c, h, w) = lx.shape().dims4()?;
        // the input: f32 channels (`x`), or bf16 pairs of them, which only
        // the bf16 direct kernel reads
        let (x, src) = match xs {
            CpuStorage::U32(v) => match lx.contiguous_offsets() {
                Some((o0, o1)) if c == self.cin.div_ceil(2) => (None, Src::Pairs(v[o0..o1].as_ptr())),
                _ => candle_core::bail!(
                    "conv from pairs: contiguous [B, {}, H, W] pairs expected, got {:?}",
                    self.cin.div_ceil(2),
                    lx.shape()
                ),
            },
            _ => {
                let x = contiguous(xs, lx, "conv")?;
                if c != self.cin {
                    candle_core::bail!("conv: {c} input channels, weight expects {}", self.cin);
                }
                (Some(x), Src::F32(x.as_ptr()))
            }
        };
        let (oh, ow) = self.out_hw(h, w)?;
        let shape = Shape::from((b, self.cout, oh, ow));
        if ld.shape() != &shape {
            candle_core::bail!("conv into a {:?} tensor, output {:?}", ld.shape(), shape);
        }
        if x.is_some_and(|x| std::ptr::eq(dst.as_ptr(), x.as_ptr())) {
            candle_core::bail!("conv into: the destination is the input");
        }
        let _counted = self.count(&shape);
        let pre = match (norm, x) {
            (Some(n), Some(x)) => Some(n.channel_affine(x, lx)?),
            (Some(_), None) => candle_core::bail!("conv: a norm fused on bf16 pairs"),
            (None, _) => None,
        };
        match (self.direct_for(w).filter(|d| pre.is_none() && (x.is_some() || d.is_bf16())), x) {
            (Some(d), _) => {
                let out = dst.as_mut_ptr();
                let residual = add.residual(out);
                // SAFETY: dst holds b * cout * h * w values (shape checked;
                // the direct kernel keeps the frame size), as does a residual
                // from another tensor (its shape checked by the caller), and
                // x b * cin * h * w values or b * cin.div_ceil(2) * h * w
                // words of pairs (its channels checked above, b, h, w read
                // from its layout); dst is not an f32 x (checked) nor a u32
                // one (another dtype), and candle refuses a destination
                // sharing storage with a source, so the only alias is
                // residual = out, whose values the kernel reads right before
                // writing them; `d` came from direct_for, bf16 where x is pairs
                unsafe { self.run_direct_into(d, src, b, h, w, residual, Dst::F32(out)) };
            }
            (None, Some(x)) => match add {
                Add::Nothing => self.run_into(x, b, h, w, None, pre.as_ref(), dst)?,
                Add::From(r) => self.run_into(x, b, h, w, Some(r), pre.as_ref(), dst)?,
                // the residual is the destination: Winograd adds it in place
                // (its output transform reads each value as it replaces it),
                // the GEMM path through a fresh buffer
                Add::Dst => match (pre, self.winograd_tile(h, w)) {
                    (Some(_), _) => candle_core::bail!("conv: a fused norm with the destination as residual"),
                    (None, Some(m)) => self.run_winograd(x, false, b, h, w, m, winograd::Residual::Out, None, dst)?,
                    (None, None) => {
                        let y = self.run(x, b, h, w, Some(&*dst))?;
                        dst.copy_from_slice(&y);
                    }
                },
            },
            (None, None) => candle_core::bail!("conv from pairs: the layer does not multiply bf16 pairs here"),
        }
        Ok(())
    }
}

/// `dst += src` in place (same shape, contiguous f32): the decoder's skip
/// additions without a fresh buffer.
pub struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "codiff-add-into"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let src = contiguous(s2, l2, "add")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("add into a {:?} tensor from {:?}", l1.shape(), l2.shape());
        }
        let dst = contiguous_mut(s1, l1, "add into")?;
        let chunk = (dst.len() / (4 * rayon::current_num_threads().max(1))).max(1 << 14);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
        Ok(())
    }
}

/// `src` `[B,C,H,W]` (contiguous f32) into `dst` `[B,C,Hp,Wp]` (Hp >= H,
/// Wp >= W), replicate-padded at the bottom and right: the padding of a
/// frame to the model's grid, into a buffer the caller already has.
pub struct PadInto;

impl InplaceOp2 for PadInto {
    fn name(&self) -> &'static str {
        "codiff-pad-into"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let src = contiguous(s2, l2, "pad")?;
        let (d, s) = (l1.dims(), l2.dims());
        if d.len() != 4 || s.len() != 4 || d[..2] != s[..2] || d[2] < s[2] || d[3] < s[3] || s[2] * s[3] == 0 {
            candle_core::bail!("pad a {:?} tensor into {:?}", l2.shape(), l1.shape());
        }
        let dst = contiguous_mut(s1, l1, "pad into")?;
        let ((h, w), (hp, wp)) = ((s[2], s[3]), (d[2], d[3]));
        dst.par_chunks_exact_mut(wp).enumerate().for_each(|(r, row)| {
            let (plane, y) = (r / hp, (r % hp).min(h - 1));
            let from = &src[(plane * h + y) * w..][..w];
            row[..w].copy_from_slice(from);
            row[w..].fill(from[w - 1]);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{conv_case, max_err};
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn pad_into_equals_candles_replicate_padding() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        for (hp, wp) in [(5, 7), (8, 7), (5, 16), (9, 10)] {
            let dst = Tensor::full(f32::NAN, (2, 3, hp, wp), &dev).unwrap();
            dst.inplace_op2(&x, &PadInto).unwrap();
            let want = x.pad_with_same(2, 0, hp - 5).unwrap().pad_with_same(3, 0, wp - 7).unwrap();
            assert_eq!(max_err(&dst, &want), 0.0, "{hp}x{wp}");
        }
        let small = Tensor::zeros((2, 3, 4, 7), DType::F32, &dev).unwrap();
        assert!(small.inplace_op2(&x, &PadInto).is_err(), "a destination smaller than the source");
    }

    #[test]
    fn fused_upsampling_is_the_conv_of_the_upsampled_input() {
        let dev = Device::Cpu;
        // F(4,3) (f32) and F(2,3) (f32 and bf16), half-sizes odd and even,
        // a batch of 2, with and without ReLU
        for (m, math, h, w) in
            [(4, Math::F32, 17, 19), (4, Math::F32, 8, 10), (2, Math::F32, 8, 9), (2, Math::Bf16, 7, 8)]
        {
            for relu in [false, true] {
                let (cin, cout) = (6, 10);
                let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev).unwrap();
                let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
                let b = Tensor::randn(0f32, 1., cout, &dev).unwrap();
                let op = super::super::build_with(math, || ConvOp::from_tensors(&wt, Some(&b), relu).unwrap())
                    .gemm_only()
                    .with_winograd(Some(m));
                assert_eq!(op.up2_tile(h, w), Some(m));
                let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
                let want = up.apply_op1_no_bwd(&op).unwrap();
                let got = x.apply_op1_no_bwd(&Up2Conv(&op)).unwrap();
                assert_eq!(got.dims(), want.dims());
                // the same input tiles: the same numbers, bit for bit
                assert_eq!(max_err(&got, &want), 0.0, "F({m},3) {math:?} {h}x{w} relu {relu}");
            }
        }
        // a layer off Winograd there (GEMM only) refuses
        let wt = Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap();
        let op = ConvOp::from_tensors(&wt, None, false).unwrap().gemm_only();
        assert_eq!(op.up2_tile(8, 8), None);
        let x = Tensor::randn(0f32, 1., (1, 3, 8, 8), &dev).unwrap();
        assert!(x.apply_op1_no_bwd(&Up2Conv(&op)).is_err());
    }

    #[test]
    fn conv3x3_matches_candle() {
        let dev = Device::Cpu;
        for (cin, cout, h, w) in [(3, 8, 17, 9), (16, 16, 33, 47), (5, 3, 1, 1), (8, 4, 2, 70)] {
            let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., cout, &dev).unwrap();
            let r = Tensor::randn(0f32, 1., (2, cout, h, w), &dev).unwrap();
            let reference =
                x.conv2d(&wt, 1, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            let op = ConvOp::from_tensors(&wt, Some(&b), false).unwrap();
            assert!(max_err(&x.apply_op1(op.clone()).unwrap(), &reference) < 1e-4);
            let with_res = x.apply_op2(&r, op).unwrap();
            assert!(max_err(&with_res, &(&reference + &r).unwrap()) < 1e-4);
            let relu = ConvOp::from_tensors(&wt, Some(&b), true).unwrap();
            assert!(max_err(&x.apply_op1(relu).unwrap(), &reference.relu().unwrap()) < 1e-4);
        }
    }

    #[test]
    fn direct_and_gemm_paths_match_candle() {
        // every direct tile shape (4/8/16 output channels per block, a partial
        // last block), widths around the 16-lane strips, one-row and one-column
        // frames, batch 2; the GEMM path on the same layers
        let dev = Device::Cpu;
        for (cin, cout, h, w) in [
            (3, 3, 5, 1),
            (8, 8, 1, 16),
            (8, 8, 4, 48),
            (8, 8, 3, 49),
            (16, 16, 7, 31),
            (64, 64, 5, 17),
            (3, 17, 6, 33),
            (13, 40, 2, 65),
            (128, 3, 4, 300),
            (4, 96, 3, 270),
        ] {
            let [x, wt, b, r, reference, relu_res] = conv_case(cin, cout, h, w);
            for relu in [false, true] {
                let op = ConvOp::from_tensors(&wt, Some(&b), relu).unwrap().direct().unwrap();
                assert_eq!(
                    op.is_direct(),
                    direct::available(),
                    "{cin}->{cout} should take the direct path on AVX-512 or AVX2"
                );
                for op in [op.clone(), op.gemm_only()] {
                    let want = if relu { reference.relu().unwrap() } else { reference.clone() };
                    let tol = 1e-4 * (cin as f32).sqrt() * 3.0;
                    assert!(
                        max_err(&x.apply_op1_no_bwd(&op).unwrap(), &want) < tol,
                        "{cin}->{cout} {h}x{w} relu {relu}"
                    );
                    if relu {
                        assert!(
                            max_err(&x.apply_op2_no_bwd(&r, &op).unwrap(), &relu_res) < tol,
                            "{cin}->{cout} {h}x{w} residual"
                        );
                    }
                }
            }
        }
        // layers narrow on one side take it whatever the other (SD VAE's
        // output layer, 128->3)
        let out = Tensor::randn(0f32, 1., (3, 128, 3, 3), &dev).unwrap();
        assert_eq!(ConvOp::from_tensors(&out, None, false).unwrap().is_direct(), direct::available());
        // wide layers stay on GEMM unless asked
        let wide = Tensor::randn(0f32, 1., (128, 128, 3, 3), &dev).unwrap();
        assert!(!ConvOp::from_tensors(&wide, None, false).unwrap().is_direct());
        assert_eq!(
            ConvOp::from_tensors(&wide, None, false).unwrap().direct().unwrap().is_direct(),
            direct::available()
        );
    }

    #[test]
    fn conv_strided_and_padded_matches_candle() {
        let dev = Device::Cpu;
        // stride 2 with symmetric padding (UNet downsampler), stride 2 with the
        // VAE encoder's (0,1,0,1) padding, 1x1, and a 5x5
        for (k, s, pad, h, w) in
            [(3, 2, [1, 1, 1, 1], 16, 12), (3, 2, [0, 0, 1, 1], 15, 10), (1, 1, [0; 4], 7, 9), (5, 1, [2; 4], 9, 11)]
        {
            let x = Tensor::randn(0f32, 1., (2, 6, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (5, 6, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 5, &dev).unwrap();
            let padded = x.pad_with_zeros(2, pad[0], pad[2]).unwrap().pad_with_zeros(3, pad[1], pad[3]).unwrap();
            let reference =
                padded.conv2d(&wt, 0, s, 1, 1).unwrap().broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap()).unwrap();
            let op = ConvOp::new(&wt, Some(&b), s, pad, false).unwrap();
            let ours = x.apply_op1_no_bwd(&op).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            assert!(max_err(&ours, &reference) < 1e-4);
        }
    }

    /// Layers built in bf16 arithmetic ([`super::super::build_with`]): on
    /// Winograd F(2,3) within bf16's rounding of the f32 result (2 x 2^-9
    /// relative per product, sums of cin * 9 terms as a random walk, doubled
    /// by the transforms) and not equal to it; on the GEMM path (one band,
    /// and split by channel) equal to the f32 layer's.
    #[test]
    fn bf16_layers_match_candle_to_bf16_rounding() {
        for (cin, cout, h, w, tile) in
            [(70, 67, 1, 5, None), (72, 130, 9, 20, None), (128, 136, 12, 14, Some(2)), (130, 128, 9, 11, Some(2))]
        {
            let [x, wt, b, _, reference, _] = conv_case(cin, cout, h, w);
            let built = |math| super::super::build_with(math, || ConvOp::from_tensors(&wt, Some(&b), false).unwrap());
            let (op, f32_op) = (built(Math::Bf16), built(Math::F32));
            let Some(m) = tile else {
                // im2col + GEMM multiplies in f32 in every layer (faster than
                // in bf16 on the layers that take it): the f32 layer's numbers
                let (ours, f32s) = (x.apply_op1_no_bwd(&op.gemm_only()), x.apply_op1_no_bwd(&f32_op.gemm_only()));
                assert_eq!(max_err(&ours.unwrap(), &f32s.unwrap()), 0.0, "{cin}->{cout} {h}x{w}");
                continue;
            };
            let op = op.gemm_only().with_winograd(Some(m));
            let ours = x.apply_op1_no_bwd(&op).unwrap();
            let err = max_err(&ours, &reference);
            // F(2,3)'s transforms double the rounding error (measured 0.57 vs
            // 0.25 for GEMM at 128 channels; F(4,3) 9.0, which is why F(4,3)
            // multiplies in f32 in every layer)
            let tol = 3.0 * 2.0 * 2f32.powi(-9) * ((cin * 9) as f32).sqrt() * 4.0;
            assert!(err > 0.0 && err < tol, "{cin}->{cout} {h}x{w} {tile:?}: {err} vs {tol}");
        }
    }

    /// The direct kernel in bf16 (channel pairs, odd channel counts, every
    /// tile shape, borders, the residual in place) within bf16's rounding.
    #[test]
    fn bf16_direct_matches_candle_to_bf16_rounding() {
        for (cin, cout, h, w) in [(3, 8, 4, 20), (8, 8, 19, 40), (16, 16, 7, 33), (13, 40, 2, 65), (64, 64, 5, 17)] {
            let [x, wt, b, r, reference, relu_res] = conv_case(cin, cout, h, w);
            for relu in [false, true] {
                let op = super::super::build_with(Math::Bf16, || {
                    ConvOp::from_tensors(&wt, Some(&b), relu).unwrap().direct().unwrap()
                });
                assert_eq!(
                    op.direct.as_ref().is_some_and(|d| d.is_bf16()),
                    direct::available() && super::super::bf16::native(),
                    "{cin}->{cout}: bf16 direct kernel where the CPU has it"
                );
                let tol = 3.0 * 2.0 * 2f32.powi(-9) * ((cin * 9) as f32).sqrt() * 2.0;
                let (ours, want) = if relu {
                    (x.apply_op2_no_bwd(&r, &op).unwrap(), relu_res.clone())
                } else {
                    (x.apply_op1_no_bwd(&op).unwrap(), reference.clone())
                };
                let err = max_err(&ours, &want);
                assert!(err < tol, "{cin}->{cout} {h}x{w} relu {relu}: {err} vs {tol}");
                if super::super::bf16::native() {
                    assert!(err > 0.0, "{cin}->{cout}: bf16 gave the f32 result");
                }
            }
        }
    }

    /// A ResBlock's inner activation handed over as bf16 channel pairs
    /// (ConvPairsInto, then ConvInto / ConvPlusInto reading u32) gives the
    /// f32 hand-over's numbers exactly (odd widths and heights, masked
    /// borders, every tile, a batch of two); layers that do not multiply
    /// pairs refuse them.
    #[test]
    fn pairs_between_bf16_layers_equal_the_f32_hand_over() {
        let dev = Device::Cpu;
        for (c, h, w) in [(8, 19, 37), (16, 5, 17), (64, 3, 20), (4, 2, 16)] {
            let [x, wt, b, r, _, _] = conv_case(c, c, h, w);
            let built = |relu| {
                super::super::build_with(Math::Bf16, || ConvOp::from_tensors(&wt, Some(&b), relu).unwrap().direct())
                    .unwrap()
            };
            let (conv1, conv2) = (built(true), built(false));
            if !conv1.pairs_for(w) {
                // no AVX512_BF16 here: the layer refuses to write pairs
                let dst = Tensor::zeros((2, c / 2, h, w), DType::U32, &dev).unwrap();
                assert!(dst.inplace_op2(&x, &ConvPairsInto(&conv1)).is_err());
                continue;
            }
            let h1 = Tensor::zeros((2, c, h, w), DType::F32, &dev).unwrap();
            h1.inplace_op2(&x, &ConvInto { op: &conv1, accumulate: false, norm: None }).unwrap();
            let pairs = Tensor::full(7u32, (2, c / 2, h, w), &dev).unwrap();
            pairs.inplace_op2(&x, &ConvPairsInto(&conv1)).unwrap();
            for accumulate in [false, true] {
                let (want, got) = (r.copy().unwrap(), r.copy().unwrap());
                want.inplace_op2(&h1, &ConvInto { op: &conv2, accumulate, norm: None }).unwrap();
                got.inplace_op2(&pairs, &ConvInto { op: &conv2, accumulate, norm: None }).unwrap();
                assert_eq!(max_err(&want, &got), 0.0, "{c} channels {h}x{w} accumulate {accumulate}");
            }
            let (want, got) = (r.zeros_like().unwrap(), r.zeros_like().unwrap());
            want.inplace_op3(&h1, &x, &ConvPlusInto { op: &conv2, norm: None }).unwrap();
            got.inplace_op3(&pairs, &x, &ConvPlusInto { op: &conv2, norm: None }).unwrap();
            assert_eq!(max_err(&want, &got), 0.0, "{c} channels {h}x{w} plus");
            // an f32 layer takes no pairs, and pairs must have cin / 2 planes
            let f32_op = super::super::build_with(Math::F32, || ConvOp::from_tensors(&wt, Some(&b), false).unwrap());
            assert!(r
                .copy()
                .unwrap()
                .inplace_op2(&pairs, &ConvInto { op: &f32_op, accumulate: false, norm: None })
                .is_err());
            let wrong = Tensor::zeros((2, c, h, w), DType::U32, &dev).unwrap();
            assert!(r
                .copy()
                .unwrap()
                .inplace_op2(&wrong, &ConvInto { op: &conv2, accumulate: false, norm: None })
                .is_err());
        }
    }

    #[test]
    fn conv_splits_channels_when_bands_are_few() {
        // one output row: a single band, so the GEMM is split by output channel
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 32, 1, 5), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1., (67, 32, 3, 3), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (1, 67, 1, 5), &dev).unwrap();
        let reference = (x.conv2d(&wt, 1, 1, 1, 1).unwrap() + &r).unwrap();
        let ours = x.apply_op2_no_bwd(&r, &ConvOp::from_tensors(&wt, None, false).unwrap()).unwrap();
        assert!(max_err(&ours, &reference) < 1e-4);
    }

    #[test]
    fn in_place_conv_and_add_match() {
        // ConvInto (direct, GEMM and Winograd F(2,3) / F(4,3) paths, with and
        // without the residual; Winograd adds the destination in place) and
        // AddInto give the numbers of the ops that allocate
        let dev = Device::Cpu;
        for (c, direct, tile, relu) in [
            (8, true, None, false),
            (8, false, None, false),
            (40, false, None, false),
            (40, false, Some(2), false),
            (40, false, Some(4), true),
        ] {
            let x = Tensor::randn(0f32, 1., (1, c, 11, 23), &dev).unwrap();
            let r = Tensor::randn(0f32, 1., (1, c, 11, 23), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (c, c, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., c, &dev).unwrap();
            let op = ConvOp::from_tensors(&wt, Some(&b), relu).unwrap();
            let op = if direct { op.direct().unwrap() } else { op.gemm_only() };
            let op = if tile.is_some() { op.with_winograd(tile) } else { op };
            assert_eq!(op.is_winograd(), tile.is_some());
            let plain = x.apply_op1_no_bwd(&op).unwrap();
            let with_res = x.apply_op2_no_bwd(&r, &op).unwrap();
            let dst = r.copy().unwrap();
            dst.inplace_op2(&x, &ConvInto { op: &op, accumulate: false, norm: None }).unwrap();
            assert_eq!(max_err(&dst, &plain), 0.0, "{c} direct {direct}");
            let dst = r.copy().unwrap();
            dst.inplace_op2(&x, &ConvInto { op: &op, accumulate: true, norm: None }).unwrap();
            assert_eq!(max_err(&dst, &with_res), 0.0, "{c} direct {direct} residual");
            let dst = x.copy().unwrap();
            dst.inplace_op3(&x, &r, &ConvPlusInto { op: &op, norm: None }).unwrap();
            assert_eq!(max_err(&dst, &with_res), 0.0, "{c} direct {direct} residual from a third tensor");
            // the residual may not be the destination itself
            assert!(dst.inplace_op3(&x, &dst, &ConvPlusInto { op: &op, norm: None }).is_err());
            let sum = x.copy().unwrap();
            sum.inplace_op2(&r, &AddInto).unwrap();
            assert_eq!(max_err(&sum, &(&x + &r).unwrap()), 0.0);
            // a wrong-shaped destination is refused
            let small = Tensor::zeros((1, c, 5, 5), candle_core::DType::F32, &dev).unwrap();
            assert!(small.inplace_op2(&x, &ConvInto { op: &op, accumulate: false, norm: None }).is_err());
        }
    }
}
