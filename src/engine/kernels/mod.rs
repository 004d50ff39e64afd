//! CPU convolution kernels where candle is slow, as candle custom ops.
//!
//! candle's CPU `conv2d` materialises the whole im2col matrix (gigabytes for a
//! megapixel frame) and re-lays it out around the matmul; its
//! `conv_transpose2d` is a scalar loop. These kernels:
//! - [`ConvOp`]: k x k, any stride and padding, im2col in row bands that stay
//!   in cache, one GEMM per band, bands in parallel, bias + ReLU + residual
//!   fused into the epilogue;
//! - [`PatchConv`]: k x k conv with stride k (space-to-depth + GEMM);
//! - [`PatchConvTranspose`]: k x k transposed conv with stride k (GEMM +
//!   depth-to-space).
//!
//! Narrow 3x3 layers (at most [`DIRECT_MAX_CHANNELS`] channels in and out)
//! skip im2col on CPUs with AVX-512: [`direct`] convolves in registers. Wide
//! 3x3 stride-1 layers (at least [`WINOGRAD_MIN_CHANNELS`] in and out) run
//! [`winograd`] F(4x4, 3x3) or F(2x2, 3x3) by frame size: 2.25 or 4
//! multiplies per output and channel pair instead of 9. `CODIFF_CONV=gemm`
//! keeps every layer on im2col + GEMM.
//!
//! Layout NCHW f32 on the CPU; other devices use candle's ops. Each is
//! unit-tested against candle's reference op.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Narrowest 3x3 stride-1 layer (input and output channels) that runs
/// [`winograd`] rather than im2col + GEMM (where the direct kernel does not
/// take it first), on frames of [`winograd::tile_for`]'s sizes. At 64
/// channels its transforms cost as much as they save (`bench_kernels`:
/// F(4,3) 9.4 ms vs GEMM 6.4 ms at 90x160, 107-130 vs 127-143 ms at 512x512).
pub const WINOGRAD_MIN_CHANNELS: usize = 128;
/// A layer keeps its transformed Winograd weights after the first call when
/// they take at most this many bytes (up to ~300 channels in and out for
/// F(4,3)); wider layers (SD's 512- to 2560-channel ones, whose transforms
/// would add gigabytes) transform theirs on every call, block by block where
/// the frame is small ([`winograd::run_streamed`]).
pub const WINOGRAD_KEEP_BYTES: usize = 16 << 20;

/// Whether `CODIFF_CONV=gemm` keeps every layer on im2col + GEMM (turning
/// the direct and the Winograd path off, for comparisons); read once.
pub(crate) fn gemm_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("CODIFF_CONV").is_ok_and(|v| v.eq_ignore_ascii_case("gemm")))
}

/// Whether the Winograd path is on.
fn winograd_enabled() -> bool {
    !gemm_forced()
}

/// Widest 3x3 stride-1 layer (input and output channels) that runs the
/// direct kernel; wider ones stay on im2col + GEMM, which there amortises its
/// copy. Above [`DIRECT_NARROW`] channels the direct kernel runs only on
/// frames at most [`DIRECT_MAX_WIDE_WIDTH`] px wide: `cargo run --release
/// --example bench_kernels` measured it 2-3x faster than GEMM at 3-8
/// channels, level at 16 channels and at 64 on 160 px, 2x faster at 64 on
/// 40 px, and 1.8x slower at 64 channels on 512x512 (the official CaVE's
/// first level), where the input rows and 16-channel weight blocks outgrow
/// the caches.
pub const DIRECT_MAX_CHANNELS: usize = 64;
/// See [`DIRECT_MAX_CHANNELS`].
pub const DIRECT_NARROW: usize = 16;
/// See [`DIRECT_MAX_CHANNELS`].
pub const DIRECT_MAX_WIDE_WIDTH: usize = 256;

/// Raw pointer that may cross threads: each band writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Ask the kernel to back a large, not yet touched activation buffer with
/// transparent huge pages (where THP is in `madvise` mode): one page fault
/// per 2 MB instead of per 4 kB when the buffer is first written.
fn huge_pages(buf: &mut [f32]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(buf);
    if bytes < 4 * HUGE {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = (buf.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice only, on pages inside `buf`; failure is harmless
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

/// A zeroed output buffer of `n` values, on huge pages when it is large.
pub(crate) fn activation(n: usize) -> Vec<f32> {
    // calloc maps large blocks without touching them, so the advice precedes
    // the first write
    let mut v = vec![0f32; n];
    huge_pages(&mut v);
    v
}

/// Defines `fn $name` that runs its body compiled for AVX2 + FMA on CPUs that
/// have them, else as is: the crate targets baseline x86-64 (so that one
/// build runs anywhere), whose SSE2 code runs these loops four lanes wide.
/// The body must only call `#[inline(always)]` functions to benefit.
macro_rules! avx2_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if avx2_available() {
                    // SAFETY: the CPU has AVX2 and FMA (checked at run time)
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Whether this CPU has AVX2 and FMA (checked once).
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

// after avx2_fn!, which they use
mod attention;
pub mod direct;
mod gemm;
mod norm;
mod patch;
pub mod winograd;

pub use attention::AttentionOp;
pub use norm::GroupNormOp;
pub(crate) use norm::mean_var;
pub(super) use norm::affine;
pub use patch::{PatchConv, PatchConvTranspose, PatchConvTransposeInto};
use self::gemm::gemm_strided;

/// `Σ f(x)` over `c` in 16 independent lanes (so that the compiler
/// vectorises the reduction; a plain `sum` is one sequential chain).
#[inline(always)]
fn lane_sum(c: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = c.chunks_exact(16);
    for ch in &mut it {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().map(|&x| f(x)).sum::<f32>()
}

/// Run `f(first_row, rows)` over `m` rows split into one block per thread.
fn par_row_blocks(m: usize, f: impl Fn(usize, usize) + Sync) {
    let per = m.div_ceil(rayon::current_num_threads().max(1)).max(1);
    (0..m).step_by(per).collect::<Vec<_>>().par_iter().for_each(|&r0| f(r0, per.min(m - r0)));
}

/// The f32 data of a contiguous CPU tensor; `what` names the op in errors.
pub(super) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{what}: f32 input expected"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: contiguous input expected"),
    }
}

/// The mutable twin of [`contiguous`], for in-place ops' destinations.
pub(super) fn contiguous_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
        _ => candle_core::bail!("{what}: contiguous f32 destination expected"),
    }
}

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
}

impl ConvOp {
    /// A square kernel from `w` `[cout, cin, k, k]`, stride 1, "same" padding k/2.
    pub fn from_tensors(w: &Tensor, b: Option<&Tensor>, relu: bool) -> candle_core::Result<Self> {
        let k = w.dim(3)?;
        Self::new(w, b, 1, [k / 2; 4], relu)
    }

    pub fn new(w: &Tensor, b: Option<&Tensor>, stride: usize, pad: [usize; 4], relu: bool) -> candle_core::Result<Self> {
        let (cout, cin, kh, kw) = w.dims4()?;
        if kh != kw || stride == 0 {
            candle_core::bail!("ConvOp needs a square kernel and a stride >= 1, got {kh}x{kw} stride {stride}");
        }
        let bias = match b {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1()?,
            None => vec![0.0; cout],
        };
        let weight = w.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.contiguous()?;
        let op = Self { weight, bias, cin, cout, k: kh, stride, pad, relu, direct: None, always_direct: false, winograd: None, winograd_kept: Default::default() };
        let op = if cin.min(cout) >= WINOGRAD_MIN_CHANNELS && winograd_enabled() { op.with_winograd(None) } else { op };
        if cin <= DIRECT_MAX_CHANNELS && cout <= DIRECT_MAX_CHANNELS {
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
    /// stride 1, padding 1, an AVX-512 CPU), whatever its channels and the
    /// frame's width (benchmarks and tests).
    pub fn direct(self) -> candle_core::Result<Self> {
        self.with_direct(true)
    }

    /// Attach the direct kernel where it applies; `always`: on every frame
    /// width, not only where [`DIRECT_MAX_CHANNELS`]' rule picks it.
    fn with_direct(mut self, always: bool) -> candle_core::Result<Self> {
        if self.k == 3 && self.stride == 1 && self.pad == [1; 4] && direct::available() {
            let w = self.weight.flatten_all()?.to_vec1::<f32>()?;
            self.direct = Some(Arc::new(direct::Direct::new(&w, self.cout, self.cin)));
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

    /// Whether this layer has the direct kernel (narrow layers use it on any
    /// frame, 17-64 channel layers on frames up to [`DIRECT_MAX_WIDE_WIDTH`]).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The direct kernel over row chunks of every image, in parallel.
    fn run_direct(&self, d: &direct::Direct, x: &[f32], b: usize, h: usize, w: usize, residual: Option<&[f32]>) -> Vec<f32> {
        let mut out = activation(b * self.cout * h * w);
        // SAFETY: out and residual hold b * cout * h * w values
        unsafe { self.run_direct_into(d, x, b, h, w, residual.map(|r| r.as_ptr()), out.as_mut_ptr()) };
        out
    }

    /// The direct kernel writing into `out`; `residual` may be `out` itself
    /// (each output is read as residual right before it is written).
    ///
    /// # Safety
    /// `out` and `residual` hold `b * cout * h * w` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_direct_into(&self, d: &direct::Direct, x: &[f32], b: usize, h: usize, w: usize, residual: Option<*const f32>, out: *mut f32) {
        let (cin, cout) = (self.cin, self.cout);
        let threads = rayon::current_num_threads().max(1);
        // a few chunks per thread for balance, each at least a few rows
        let rows = h.div_ceil(4 * threads).max(4).min(h);
        let chunks: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..h).step_by(rows).map(move |r0| (bi, r0))).collect();
        let out_ptr = SendPtr(out);
        let res_ptr = residual.map(|r| SendPtr(r as *mut f32));
        chunks.par_iter().for_each(|&(bi, r0)| {
            let (out_ptr, res_ptr) = (out_ptr, res_ptr);
            let plane_out = bi * cout * h * w;
            // SAFETY: direct::available() held at construction; every chunk
            // writes its own rows; slices hold b * c * h * w values
            unsafe {
                d.rows(
                    x.as_ptr().add(bi * cin * h * w),
                    h,
                    w,
                    r0,
                    (r0 + rows).min(h),
                    &self.bias,
                    self.relu,
                    res_ptr.map(|r| r.0.add(plane_out) as *const f32),
                    out_ptr.0.add(plane_out),
                )
            }
        });
    }

    /// Whether [`ConvOp::run`] takes the direct kernel on a frame `w` wide.
    fn direct_for(&self, w: usize) -> Option<&direct::Direct> {
        let d = self.direct.as_deref()?;
        (self.always_direct || self.cin.max(self.cout) <= DIRECT_NARROW || w <= DIRECT_MAX_WIDE_WIDTH).then_some(d)
    }

    fn out_hw(&self, h: usize, w: usize) -> candle_core::Result<(usize, usize)> {
        let (k, s, [pt, pl, pb, pr]) = (self.k, self.stride, self.pad);
        if h + pt + pb < k || w + pl + pr < k {
            candle_core::bail!("conv: {h}x{w} input is smaller than the {k}x{k} kernel");
        }
        Ok(((h + pt + pb - k) / s + 1, (w + pl + pr - k) / s + 1))
    }

    /// Fill `col[(ci,ky,kx), (r - r0, ox)]` for output rows `r0..r1`.
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
                    let hi = if (w as isize - 1 - off) < 0 { 0 } else { (((w as isize - 1 - off) as usize) / s + 1).min(ow) };
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

    /// y = act(conv(x) + b) (+ residual), x `[B, cin, H, W]`.
    fn run(&self, x: &[f32], b: usize, h: usize, w: usize, residual: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        if let Some(d) = self.direct_for(w) {
            return Ok(self.run_direct(d, x, b, h, w, residual));
        }
        let (storage, layout) = self.weight.storage_and_layout();
        let weight = match &*storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => &v[layout.start_offset()..],
            _ => candle_core::bail!("conv: weights must be f32 on the CPU"),
        };
        let (cin, cout) = (self.cin, self.cout);
        let keep = |m: usize| (m + 2) * (m + 2) * cout * cin * 4 <= WINOGRAD_KEEP_BYTES;
        if let Some(m) = self.winograd.and_then(|t| t.or_else(|| winograd::tile_for(h, w, keep(4)))) {
            if !keep(m) && winograd::streams(cin, h, w, m) {
                return Ok(winograd::run_streamed(&weight[..cout * cin * 9], cout, cin, m, x, b, h, w, &self.bias, self.relu, residual));
            }
            let make = || Arc::new(winograd::Winograd::new(&weight[..cout * cin * 9], cout, cin, m));
            let wg = if keep(m) {
                self.winograd_kept[m / 4].get_or_init(make).clone()
            } else {
                make()
            };
            return Ok(wg.run(x, b, h, w, &self.bias, self.relu, residual));
        }
        let (oh, ow) = self.out_hw(h, w)?;
        let ohw = oh * ow;
        let kk = cin * self.k * self.k;
        let mut out = activation(b * cout * ohw);
        // rows per band: keep the column buffer around 2 MB
        let rows = ((1usize << 19) / (kk * ow).max(1)).clamp(1, oh);
        let bands: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..oh).step_by(rows).map(move |r0| (bi, r0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        let band = |bi: usize, r0: usize, col: &mut Vec<f32>, split_rows: bool| {
            let out_ptr = out_ptr;
            let r1 = (r0 + rows).min(oh);
            let n = (r1 - r0) * ow;
            col.clear();
            col.resize(kk * n, 0.0);
            self.im2col(&x[bi * cin * h * w..(bi + 1) * cin * h * w], h, w, ow, r0, r1, col);
            let res = residual.map(|r| &r[bi * cout * ohw + r0 * ow..]);
            let gemm_rows = |co0: usize, m: usize| unsafe {
                let out_ptr = out_ptr;
                let dst = out_ptr.0.add(bi * cout * ohw + co0 * ohw + r0 * ow);
                gemm_strided(m, n, kk, false, dst, ohw, 1, weight.as_ptr().add(co0 * kk), kk, 1, col.as_ptr(), n, 1);
                self.epilogue(dst, co0, m, n, ohw, res.map(|r| &r[..]));
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
        Ok(out)
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
        Ok((CpuStorage::F32(self.run(x, b, h, w, None)?), shape))
    }
}

/// The same convolution plus a residual input: `y = act(conv(x) + b) + r`.
impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "codiff-conv-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "conv")?;
        let r = contiguous(s2, l2, "conv residual")?;
        let (b, h, w, shape) = self.out_shape(l1)?;
        if l2.shape() != &shape {
            candle_core::bail!("conv residual shape {:?}, output {:?}", l2.shape(), shape);
        }
        Ok((CpuStorage::F32(self.run(x, b, h, w, Some(r))?), shape))
    }
}

/// A [`ConvOp`] writing into an existing tensor (`dst.inplace_op2(&x, ..)`),
/// so that chains of same-shaped layers (ResBlocks) reuse their buffers
/// instead of faulting in fresh ones: `dst = act(conv(x) + b)`, or with
/// `accumulate`, `dst = act(conv(x) + b) + dst` (the residual add in place).
/// `dst` must not share storage with `x`, nor with any tensor still needed.
/// The direct kernel writes in place; other paths compute and copy.
pub struct ConvInto<'a> {
    pub op: &'a ConvOp,
    pub accumulate: bool,
}

impl InplaceOp2 for ConvInto<'_> {
    fn name(&self) -> &'static str {
        "codiff-conv-into"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let x = contiguous(s2, l2, "conv")?;
        let (b, h, w, shape) = self.op.out_shape(l2)?;
        if l1.shape() != &shape {
            candle_core::bail!("conv into a {:?} tensor, output {:?}", l1.shape(), shape);
        }
        let dst = contiguous_mut(s1, l1, "conv into")?;
        if std::ptr::eq(dst.as_ptr(), x.as_ptr()) {
            candle_core::bail!("conv into: the destination is the input");
        }
        if let Some(d) = self.op.direct_for(w) {
            let out = dst.as_mut_ptr();
            // SAFETY: dst holds b * cout * h * w values (shape checked); the
            // kernel reads each residual value right before writing it
            unsafe { self.op.run_direct_into(d, x, b, h, w, self.accumulate.then_some(out as *const f32), out) };
        } else {
            let y = self.op.run(x, b, h, w, self.accumulate.then_some(&*dst))?;
            dst.copy_from_slice(&y);
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
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
        Ok(())
    }
}

/// `e^x` for f32 in straight-line code the compiler can vectorise (Cephes'
/// polynomial after a ln 2 range reduction); relative error below 2e-7 for
/// x in [-87, 88], saturating outside.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    // max/min rather than clamp: branch-free, so loops over it vectorise
    let x = x.max(-87.0).min(88.0);
    // round(x / ln 2) without a libm call: the 1.5 * 2^23 trick
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.500_000_01;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    pub(super) fn max_err(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Input, weight, bias and residual of a random 3x3 layer on a batch of 2,
    /// with candle's conv2d + bias, and ReLU of that plus the residual.
    fn conv_case(cin: usize, cout: usize, h: usize, w: usize) -> [Tensor; 6] {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., cout, &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (2, cout, h, w), &dev).unwrap();
        let reference = x.conv2d(&wt, 1, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap();
        let relu_res = (reference.relu().unwrap() + &r).unwrap();
        [x, wt, b, r, reference, relu_res]
    }

    #[test]
    fn conv3x3_matches_candle() {
        let dev = Device::Cpu;
        for (cin, cout, h, w) in [(3, 8, 17, 9), (16, 16, 33, 47), (5, 3, 1, 1), (8, 4, 2, 70)] {
            let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., cout, &dev).unwrap();
            let r = Tensor::randn(0f32, 1., (2, cout, h, w), &dev).unwrap();
            let reference = x.conv2d(&wt, 1, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap();
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
        for (cin, cout, h, w) in [(3, 3, 5, 1), (8, 8, 1, 16), (8, 8, 4, 48), (8, 8, 3, 49), (16, 16, 7, 31), (64, 64, 5, 17), (3, 17, 6, 33), (13, 40, 2, 65)] {
            let [x, wt, b, r, reference, relu_res] = conv_case(cin, cout, h, w);
            for relu in [false, true] {
                let op = ConvOp::from_tensors(&wt, Some(&b), relu).unwrap().direct().unwrap();
                assert_eq!(op.is_direct(), direct::available(), "{cin}->{cout} should take the direct path on AVX-512");
                for op in [op.clone(), op.gemm_only()] {
                    let want = if relu { reference.relu().unwrap() } else { reference.clone() };
                    let tol = 1e-4 * (cin as f32).sqrt() * 3.0;
                    assert!(max_err(&x.apply_op1_no_bwd(&op).unwrap(), &want) < tol, "{cin}->{cout} {h}x{w} relu {relu}");
                    if relu {
                        assert!(max_err(&x.apply_op2_no_bwd(&r, &op).unwrap(), &relu_res) < tol, "{cin}->{cout} {h}x{w} residual");
                    }
                }
            }
        }
        // wide layers stay on GEMM unless asked
        let wide = Tensor::randn(0f32, 1., (128, 128, 3, 3), &dev).unwrap();
        assert!(!ConvOp::from_tensors(&wide, None, false).unwrap().is_direct());
        assert_eq!(ConvOp::from_tensors(&wide, None, false).unwrap().direct().unwrap().is_direct(), direct::available());
    }

    #[test]
    fn winograd_matches_candle() {
        // F(2,3) and F(4,3); frames not a multiple of the tile, narrower and
        // shorter than one tile, one pixel; batch 2; bias, ReLU, residual
        let dev = Device::Cpu;
        for (cin, cout, h, w) in [(32, 32, 17, 9), (40, 33, 5, 70), (64, 48, 1, 1), (32, 64, 9, 3), (33, 32, 23, 31), (128, 128, 48, 40), (24, 150, 7, 10)] {
            let [x, wt, b, r, reference, relu_res] = conv_case(cin, cout, h, w);
            // outputs have a standard deviation of sqrt(9 cin)
            let scale = (9.0 * cin as f32).sqrt();
            for m in [2, 4] {
                let plain = ConvOp::from_tensors(&wt, Some(&b), false).unwrap().gemm_only().with_winograd(Some(m));
                assert!(plain.is_winograd());
                let err = max_err(&x.apply_op1_no_bwd(&plain).unwrap(), &reference) / scale;
                let relu = ConvOp::from_tensors(&wt, Some(&b), true).unwrap().gemm_only().with_winograd(Some(m));
                let err_res = max_err(&x.apply_op2_no_bwd(&r, &relu).unwrap(), &relu_res) / scale;
                eprintln!("F({m},3) {cin}->{cout} {h}x{w}: relative error {err:.1e}, with ReLU + residual {err_res:.1e}");
                // measured: F(2,3) ~2e-6, F(4,3) ~1.5e-5 (its transforms' constants
                // up to 8 cost precision); im2col + GEMM ~1e-6
                let tol = if m == 2 { 1e-5 } else { 6e-5 };
                assert!(err < tol && err_res < tol, "F({m},3) {cin}->{cout} {h}x{w}: {err} / {err_res}");
                // the path of layers too wide to keep their transform: blocks of
                // output channels, weights transformed on the fly
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (xs, ws, bs, rs) = (v(&x), v(&wt), v(&b), v(&r));
                let streamed = winograd::run_streamed(&ws, cout, cin, m, &xs, 2, h, w, &bs, true, Some(&rs));
                let streamed = Tensor::from_vec(streamed, (2, cout, h, w), &dev).unwrap();
                let err_streamed = max_err(&streamed, &relu_res) / scale;
                assert!(err_streamed < tol, "streamed F({m},3) {cin}->{cout} {h}x{w}: {err_streamed}");
            }
        }
        // wide layers take it by default, narrow ones do not
        let wide = Tensor::randn(0f32, 1., (128, 256, 3, 3), &dev).unwrap();
        assert_eq!(ConvOp::from_tensors(&wide, None, false).unwrap().is_winograd(), winograd_enabled());
        let narrow = Tensor::randn(0f32, 1., (64, 256, 3, 3), &dev).unwrap();
        assert!(!ConvOp::from_tensors(&narrow, None, false).unwrap().is_winograd());
    }

    #[test]
    fn conv_strided_and_padded_matches_candle() {
        let dev = Device::Cpu;
        // stride 2 with symmetric padding (UNet downsampler), stride 2 with the
        // VAE encoder's (0,1,0,1) padding, 1x1, and a 5x5
        for (k, s, pad, h, w) in [(3, 2, [1, 1, 1, 1], 16, 12), (3, 2, [0, 0, 1, 1], 15, 10), (1, 1, [0; 4], 7, 9), (5, 1, [2; 4], 9, 11)] {
            let x = Tensor::randn(0f32, 1., (2, 6, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (5, 6, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 5, &dev).unwrap();
            let padded = x.pad_with_zeros(2, pad[0], pad[2]).unwrap().pad_with_zeros(3, pad[1], pad[3]).unwrap();
            let reference = padded.conv2d(&wt, 0, s, 1, 1).unwrap().broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap()).unwrap();
            let op = ConvOp::new(&wt, Some(&b), s, pad, false).unwrap();
            let ours = x.apply_op1_no_bwd(&op).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            assert!(max_err(&ours, &reference) < 1e-4);
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
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        for i in -8700..8799 {
            let x = i as f32 * 0.01 + 0.003;
            let (a, b) = (fast_exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "{worst}");
        assert!((fast_exp(-1000.0) / (-87f32).exp() - 1.0).abs() < 1e-6);
        assert!((fast_exp(1000.0) / 88f32.exp() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn in_place_conv_and_add_match() {
        // ConvInto (direct and GEMM paths, with and without the residual) and
        // AddInto give the numbers of the ops that allocate
        let dev = Device::Cpu;
        for (c, direct) in [(8, true), (8, false), (40, false)] {
            let x = Tensor::randn(0f32, 1., (1, c, 11, 23), &dev).unwrap();
            let r = Tensor::randn(0f32, 1., (1, c, 11, 23), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (c, c, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., c, &dev).unwrap();
            let op = ConvOp::from_tensors(&wt, Some(&b), false).unwrap();
            let op = if direct { op.direct().unwrap() } else { op.gemm_only() };
            let plain = x.apply_op1_no_bwd(&op).unwrap();
            let with_res = x.apply_op2_no_bwd(&r, &op).unwrap();
            let dst = r.copy().unwrap();
            dst.inplace_op2(&x, &ConvInto { op: &op, accumulate: false }).unwrap();
            assert_eq!(max_err(&dst, &plain), 0.0, "{c} direct {direct}");
            let dst = r.copy().unwrap();
            dst.inplace_op2(&x, &ConvInto { op: &op, accumulate: true }).unwrap();
            assert_eq!(max_err(&dst, &with_res), 0.0, "{c} direct {direct} residual");
            let sum = x.copy().unwrap();
            sum.inplace_op2(&r, &AddInto).unwrap();
            assert_eq!(max_err(&sum, &(&x + &r).unwrap()), 0.0);
            // a wrong-shaped destination is refused
            let small = Tensor::zeros((1, c, 5, 5), candle_core::DType::F32, &dev).unwrap();
            assert!(small.inplace_op2(&x, &ConvInto { op: &op, accumulate: false }).is_err());
        }
    }
}
