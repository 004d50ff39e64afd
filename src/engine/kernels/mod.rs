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
//! Narrow 3x3 layers (at most [`DIRECT_MAX_CHANNELS`] channels in and out
//! with AVX-512, at most [`DIRECT_NARROW`] on one side with AVX2) skip im2col:
//! [`direct`] convolves in registers. Wide
//! 3x3 stride-1 layers (at least [`WINOGRAD_MIN_CHANNELS`] in and out) run
//! [`winograd`] F(4x4, 3x3) or F(2x2, 3x3) by frame size: 2.25 or 4
//! multiplies per output and channel pair instead of 9. `CODIFF_CONV=gemm`
//! keeps every layer on im2col + GEMM.
//!
//! Layout NCHW f32 on the CPU; other devices use candle's ops. Each is
//! unit-tested against candle's reference op.
//!
//! This file holds the dispatch policy (which layer takes which path) and
//! the helpers the kernels share; the ops live in `conv.rs` ([`ConvOp`],
//! [`ConvInto`], [`ConvPlusInto`], [`ConvPairsInto`], [`AddInto`], [`PadInto`]), `patch.rs` ([`PatchConv`],
//! [`PatchConvTranspose`], [`PatchInto`]), `norm.rs`
//! ([`GroupNormOp`]), `attention.rs` ([`AttentionOp`]), `linear.rs`
//! ([`LinearOp`]), `gemm.rs` (the strided GEMM they call, in the layer's
//! [`Math`]: f32, or bf16 operands with f32 sums from [`bf16`]), [`direct`]
//! and [`winograd`].
//!
//! `precision=bf16` on the CPU builds the UNet and VAE (and the compact
//! model's inner layers) under [`build_with`]`(Math::Bf16, ..)`: every
//! Winograd F(2,3) layer, direct-kernel convolution, patch convolution,
//! linear layer and attention built then multiplies bf16-rounded operands
//! (their weights packed once); Winograd F(4,3) and im2col + GEMM
//! convolutions stay f32 (see [`ConvOp`]).
// `let ptr = ptr;` inside a closure makes it capture the whole Send wrapper
// (edition 2021 closures would capture only its raw-pointer field, which is
// not Send); the kernels index by loop variables on purpose (several arrays
// per index, layouts spelled out).
#![allow(clippy::redundant_locals, clippy::needless_range_loop)]
// Other architectures compile the x86 kernels out (the portable paths run
// there), leaving the data those kernels read (packed operands, feature
// checks, tile constants) unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))]

/// Floating-point operations (a multiply-add counts 2) of the convolutions,
/// attention and linear layers run in this process, counted from each call's
/// shapes: the roofline figures of the bench ([`flops`]). Other work
/// (norms, activations, adds) is not counted. Every engine in the process adds
/// to it, so a per-stage figure is exact when one restore runs at a time.
static FLOPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The floating-point operations counted so far ([`FLOPS`]).
pub fn flops() -> u64 {
    FLOPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Count `n` floating-point operations.
pub(crate) fn count_flops(n: usize) {
    FLOPS.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

/// The kinds of counted ops, for [`op_nanos`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Convolutions (3x3, 1x1, strided, patch and transposed patch).
    Conv = 0,
    /// Scaled dot-product attention.
    Attention = 1,
    /// Linear layers.
    Linear = 2,
}

/// Wall time (ns) spent in the counted ops, by [`OpKind`] (same caveat as
/// [`FLOPS`]).
static NANOS: [std::sync::atomic::AtomicU64; 3] = [const { std::sync::atomic::AtomicU64::new(0) }; 3];

/// Wall time (ns) spent so far in convolutions, attention and linear layers.
pub fn op_nanos() -> [u64; 3] {
    NANOS.each_ref().map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
}

/// Counts an op's floating-point operations now and its time when dropped.
pub(crate) struct Counted(OpKind, std::time::Instant);

/// Count `flops` of a `kind` op that runs until the returned guard drops.
pub(crate) fn counted(kind: OpKind, flops: usize) -> Counted {
    count_flops(flops);
    Counted(kind, std::time::Instant::now())
}

impl Drop for Counted {
    fn drop(&mut self) {
        NANOS[self.0 as usize].fetch_add(self.1.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

/// Narrowest 3x3 stride-1 layer (input and output channels) that runs
/// [`winograd`] rather than im2col + GEMM (where the direct kernel does not
/// take it first), on frames of [`winograd::tile_for`]'s sizes. At 64
/// channels its transforms once cost as much as they saved (F(4,3) 107-130
/// vs GEMM 127-143 ms at 512x512); since they run as compile-time vector
/// passes F(4,3) takes 64 ms there against GEMM's 122 (`bench_kernels`,
/// official CaVE level 0, medians of 5), and 3.0 against 6.3 ms at 90x160
/// (where the direct kernel runs first).
pub const WINOGRAD_MIN_CHANNELS: usize = 64;
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
/// Layers with at most this many channels on one side (input or output)
/// run the direct kernel whatever the other side and the frame: a GEMM with
/// so few rows or so short a sum runs far from its peak. f32, 2 threads,
/// best of 4: SD VAE's output layer 128->3 at 512x512 13.2 ms against
/// 45-58 on GEMM, its encoder's 512->8 at 64x64 2.3 against 4.9, 3->128
/// at 512x512 19.5 against 23.2, the UNet's 320->4 0.5 against 1.9; in bf16
/// 9.6, 1.3, 15.9 and 0.3 ms. On CPUs with AVX2 but not AVX-512 only these
/// layers take it (its 8-lane build, f32, 2 threads, medians of 7-11 over
/// two runs): the compact CaVE's 8-channel layer at 1280x720 10.5-12.4 ms
/// against 21-22 on GEMM, its 3->8 head 4.9-5.6 against 9.4, 8->3 tail
/// 4.1-4.7 against 12.8-13.5, SD VAE's output layer 128->3 37-41 against
/// 60-64, its encoder's 512->8 3.3-4.2 against 7-8, 3->128 30-34 against
/// 35-37, while at 16 channels it is level with GEMM (11-12 against 13-14 ms
/// at 360x640) and at 64 Winograd F(4,3) takes half its time (4.3-4.8
/// against 7.8-8.1 ms at 90x160).
pub const DIRECT_NARROW: usize = 16;
/// See [`DIRECT_MAX_CHANNELS`].
pub const DIRECT_MAX_WIDE_WIDTH: usize = 256;

/// Raw pointer that may cross threads: each band writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: a SendPtr is only an address; it is dereferenced inside rayon
// loops that block until every task is done, so the buffer it points into
// (owned by the caller of the loop) outlives every use, and each task writes
// a region of it that no other task reads or writes (stated at each use).
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: shared references to it only copy the address.
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

/// Makes a scratch buffer reused across calls at least `n` long: it grows
/// but never shrinks, so calls of varying sizes (a band's last rows, a
/// block's edge) clear only what is new rather than what a shrink dropped.
/// The caller writes the first `n` values before reading them.
pub(crate) fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// An output buffer of `n` values, which the caller writes in full: a dead
/// activation's from the active [`Spare`] when one fits (its old values),
/// else zeroed fresh memory, on huge pages when it is large.
pub(crate) fn activation(n: usize) -> Vec<f32> {
    if let Some(v) = spare::take(n) {
        return v;
    }
    // calloc maps large blocks without touching them, so the advice precedes
    // the first write
    let mut v = vec![0f32; n];
    huge_pages(&mut v);
    v
}

/// Defines `fn $name` that runs its body compiled for AVX-512F (with AVX2 and
/// FMA) or else AVX2 + FMA on CPUs that have them, else as is (the vector
/// builds of one body, whence the name): the crate
/// targets baseline x86-64 (so that one build runs anywhere), whose SSE2 code
/// runs these loops four lanes wide. The body must only call
/// `#[inline(always)]` functions to benefit. Rust never reorders or fuses
/// float operations, so the three builds of a body give the same bits; AVX-512
/// runs its slice loops 16 lanes wide (the Winograd transforms, the norms'
/// SiLU: the full model's VAE decode at 512x512 4.98-5.66 s against 5.42-6.15
/// with AVX2 in three interleaved rounds of `bench`).
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if $crate::engine::kernels::avx512_available() && $crate::engine::kernels::avx2_available() {
                    // SAFETY: `avx512` enables AVX-512F, AVX2 and FMA, which
                    // avx512_available() and avx2_available() just found on
                    // this CPU (is_x86_feature_detected!)
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if $crate::engine::kernels::avx2_available() {
                    // SAFETY: `avx2` enables only AVX2 and FMA, which
                    // avx2_available() just found on this CPU
                    // (is_x86_feature_detected!)
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

pub(crate) use simd_fn;

/// Whether this CPU has AVX2 and FMA (checked once).
pub(crate) fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has AVX-512F (checked once).
pub(crate) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

// after simd_fn!, which they use
mod attention;
pub mod bf16;
mod conv;
pub mod direct;
mod geglu;
mod gemm;
mod linear;
mod norm;
mod patch;
mod spare;
mod upsample;
pub mod winograd;

pub use self::gemm::{build_with, building, Math};
use self::gemm::{gemm_strided, Mat};
pub use attention::AttentionOp;
pub use conv::{AddInto, ConvInto, ConvOp, ConvPairsInto, ConvPlusInto, PadInto, Up2Conv};
pub use geglu::Geglu;
pub use linear::LinearOp;
pub(super) use norm::coefficients;
pub(crate) use norm::mean_var;
pub use norm::{ChannelAffine, GroupNormOp, ImageAffine};
pub use patch::{Patch, PatchConv, PatchConvTranspose, PatchInto};
pub use spare::{give_back, with_spare, Spare};
pub use upsample::Upsample2x;

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

/// A layer's f32 weights from the storage and layout that the weight
/// tensor's `storage_and_layout` returned (the values from the layout's
/// start); `what` names the op in errors.
pub(super) fn weight_values<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[l.start_offset()..]),
        _ => candle_core::bail!("{what}: weights must be f32 on the CPU"),
    }
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

/// `e^x` for f32 in straight-line code the compiler can vectorise (Cephes'
/// polynomial after a ln 2 range reduction); relative error below 2e-7 for
/// x in [-87, 88], saturating outside.
#[inline(always)]
#[allow(clippy::manual_clamp, clippy::excessive_precision)] // branch-free; Cephes' constants as published
pub fn fast_exp(x: f32) -> f32 {
    // max/min rather than clamp: branch-free, so loops over it vectorise
    let x = x.max(-87.0).min(88.0);
    // round(x / ln 2) without a libm call: the 1.5 * 2^23 trick; k holds
    // n in its low mantissa bits
    let k = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = k - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r
        + 0.500_000_01;
    let y = p * r * r + r + 1.0;
    // 2^n from k's bits (n as i32 would be a saturating conversion the
    // compiler does one lane at a time)
    y * f32::from_bits(((k.to_bits() as i32 - 0x4B40_0000 + 127) as u32) << 23)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    pub(crate) fn max_err(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Input, weight, bias and residual of a random 3x3 layer on a batch of 2,
    /// with candle's conv2d + bias, and ReLU of that plus the residual.
    pub(super) fn conv_case(cin: usize, cout: usize, h: usize, w: usize) -> [Tensor; 6] {
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
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        for i in -8700..8799 {
            let x = i as f32 * 0.01 + 0.003;
            let (a, b) = (fast_exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            // 2^n from the rounding constant's bits is 2^n from n itself
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let k = x * std::f32::consts::LOG2_E + 12_582_912.0;
            assert_eq!((k.to_bits() as i32 - 0x4B40_0000) as f32, n, "{x}");
        }
        assert!(worst < 5e-7, "{worst}");
        assert!((fast_exp(-1000.0) / (-87f32).exp() - 1.0).abs() < 1e-6);
        assert!((fast_exp(1000.0) / 88f32.exp() - 1.0).abs() < 1e-6);
    }
}
