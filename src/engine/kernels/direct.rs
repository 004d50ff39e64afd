//! Direct 3x3 convolution (stride 1, zero padding 1) with AVX-512 or AVX2, for
//! the narrow layers where im2col + GEMM spends its time copying: the compact
//! CaVE's full-resolution stage has 8 channels, so its GEMM is 8 rows deep and
//! the im2col copy costs as much as the arithmetic.
//!
//! Layout NCHW f32. Output channels are taken in blocks of `CB` (AVX-512: 4,
//! 8 or 16; AVX2: 3 or 4), each held in `CB x S` vector accumulators over `S`
//! strips of one output row (16 pixels a zmm, 8 a ymm); every (input channel,
//! tap) loads one input vector per strip (masked at the borders, so no padded
//! copy is made) and broadcasts `CB` weights. Weights are repacked once, at
//! load time, as `[block][cin][tap][CB]` with zero weights filling the last
//! block. Bias, ReLU and the residual add run in the epilogue, as in the GEMM
//! path.
//!
//! Both builds sum each output in the same order (input channel, tap row,
//! tap column, one FMA each, then the bias), so they give the same bits; the
//! GEMM path sums in another order, so results agree with it to rounding
//! (unit-tested against candle's conv2d). The AVX2 build serves CPUs without
//! AVX-512 (and its f32 arithmetic only: bf16 pairs need AVX512_BF16).

/// Output channels per block, and strips per accumulator tile: 16-pixel
/// strips (zmm) for AVX-512, 8-pixel ones (ymm, `Y`) for AVX2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tile {
    C4S4,
    C8S3,
    C16S1,
    /// AVX2, 3 output channels or fewer: 3 over 3 strips of 8
    Y3S3,
    /// AVX2: 4 output channels over 2 strips of 8 (8 accumulators: with 12,
    /// 4 x 3, the compiler spilled them at every tap row, and the 8-channel
    /// layer at 720p took 21-24 ms against 10.5-12.4; 6 x 2 and 8 x 1 ran
    /// 11-18 ms, `bench_kernels`)
    Y4S2,
}

impl Tile {
    fn for_cout(cout: usize, isa: Isa) -> Self {
        match (isa, cout) {
            // SD VAE's output layer 128->3 at 512x512 37-41 ms against 49-50
            // in blocks of 4
            (Isa::Avx2, 0..=3) => Tile::Y3S3,
            (Isa::Avx2, _) => Tile::Y4S2,
            (Isa::Avx512, 0..=4) => Tile::C4S4,
            (Isa::Avx512, 5..=8) => Tile::C8S3,
            (Isa::Avx512, _) => Tile::C16S1,
        }
    }

    fn cb(self) -> usize {
        match self {
            Tile::Y3S3 => 3,
            Tile::C4S4 | Tile::Y4S2 => 4,
            Tile::C8S3 => 8,
            Tile::C16S1 => 16,
        }
    }

    fn isa(self) -> Isa {
        match self {
            Tile::Y3S3 | Tile::Y4S2 => Isa::Avx2,
            _ => Isa::Avx512,
        }
    }
}

/// The vector instructions a [`Direct`] layer's kernel is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (and AVX512_BF16 for the bf16 kernel)
    Avx512,
    /// AVX2 with FMA, f32 only
    Avx2,
}

impl Isa {
    /// The widest this CPU runs (checked once): AVX-512F, else AVX2 with FMA,
    /// else none.
    pub fn best() -> Option<Self> {
        static BEST: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if super::avx512_available() {
                    return Some(Isa::Avx512);
                }
                if super::avx2_available() {
                    return Some(Isa::Avx2);
                }
            }
            None
        })
    }

    /// The builds this CPU runs: [`Isa::best`] and any narrower one (tests
    /// compare them).
    pub fn all() -> Vec<Self> {
        match Self::best() {
            Some(Isa::Avx512) => vec![Isa::Avx512, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => Vec::new(),
        }
    }
}

/// The input of [`Direct::rows`]: f32 channels, or (for a layer with bf16
/// weights, [`Direct::with_bf16`]) the channel pairs another layer wrote
/// ([`Dst::Pairs`]), `[cin.div_ceil(2), h, w]` words.
#[derive(Clone, Copy, Debug)]
pub enum Src {
    F32(*const f32),
    Pairs(*const u32),
}

/// The output of [`Direct::rows`]: f32 channels, or bf16 pairs of channels
/// `2p` (low half) and `2p + 1` (high) in plane `p`, rounded as
/// [`super::bf16::pair_row`] rounds, for a bf16 layer to read
/// ([`Src::Pairs`]): what it would have converted the f32 output to.
#[derive(Clone, Copy, Debug)]
pub enum Dst {
    F32(*mut f32),
    Pairs(*mut u32),
}

// SAFETY: a Src or Dst is only an address; the convolutions hand them to
// rayon loops that block until every task is done (the buffers outlive every
// use), and each task writes rows of the output no other task touches.
unsafe impl Send for Src {}
// SAFETY: as for Send: shared references only copy the address.
unsafe impl Sync for Src {}
// SAFETY: as for Src.
unsafe impl Send for Dst {}
// SAFETY: as for Src.
unsafe impl Sync for Dst {}

impl Src {
    /// Image `bi` of a batch of `c`-channel images of `hw` pixels.
    ///
    /// # Safety
    /// The batch holds image `bi`.
    pub unsafe fn image(self, bi: usize, c: usize, hw: usize) -> Self {
        match self {
            Src::F32(p) => Src::F32(p.add(bi * c * hw)),
            Src::Pairs(p) => Src::Pairs(p.add(bi * c.div_ceil(2) * hw)),
        }
    }
}

impl Dst {
    /// Image `bi` of a batch of `c`-channel images of `hw` pixels.
    ///
    /// # Safety
    /// The batch holds image `bi`.
    pub unsafe fn image(self, bi: usize, c: usize, hw: usize) -> Self {
        match self {
            Dst::F32(p) => Dst::F32(p.add(bi * c * hw)),
            Dst::Pairs(p) => Dst::Pairs(p.add(bi * c.div_ceil(2) * hw)),
        }
    }
}

/// A 3x3 stride-1 pad-1 convolution's weights, repacked for the direct kernel.
#[derive(Clone, Debug)]
pub struct Direct {
    tile: Tile,
    cin: usize,
    cout: usize,
    /// `[cout.div_ceil(cb)][cin][9][cb]`
    packed: Vec<f32>,
    /// for bf16 arithmetic ([`Direct::with_bf16`]): `[block][cin pair][9][cb]`,
    /// each word the bf16 weights of input channels `2p` (low half) and `2p + 1`
    pairs: Option<Vec<u32>>,
}

/// Output rows per group of the bf16 kernel: their input rows (and one above
/// and below) are converted to bf16 pairs once for every output block.
const BF16_ROWS: usize = 16;

thread_local! {
    /// This thread's bf16 input rows (see [`BF16_ROWS`]).
    static PAIR_ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The build of the direct kernel that runs here: this CPU's widest
/// ([`Isa::best`], checked at run time), None where it has neither AVX-512F
/// nor AVX2 and FMA or `CODIFF_CONV` is `gemm` (which keeps every layer on
/// im2col + GEMM, for comparisons).
pub fn active() -> Option<Isa> {
    Isa::best().filter(|_| !super::gemm_forced())
}

/// Whether the direct kernel runs here ([`active`]).
pub fn available() -> bool {
    active().is_some()
}

impl Direct {
    /// Repack `weight` `[cout, cin, 3, 3]` (row-major f32) for this CPU's
    /// widest build ([`Isa::best`]; [`available`] must hold).
    pub fn new(weight: &[f32], cout: usize, cin: usize) -> Self {
        Self::new_for(weight, cout, cin, Isa::best().unwrap_or(Isa::Avx2))
    }

    /// [`Direct::new`] for the build `isa`, which must be one of
    /// [`Isa::all`] to run.
    pub fn new_for(weight: &[f32], cout: usize, cin: usize, isa: Isa) -> Self {
        let tile = Tile::for_cout(cout, isa);
        let cb = tile.cb();
        let blocks = cout.div_ceil(cb);
        let mut packed = vec![0f32; blocks * cin * 9 * cb];
        for co in 0..cout {
            let (blk, lane) = (co / cb, co % cb);
            for ci in 0..cin {
                for t in 0..9 {
                    packed[((blk * cin + ci) * 9 + t) * cb + lane] = weight[(co * cin + ci) * 9 + t];
                }
            }
        }
        Self { tile, cin, cout, packed, pairs: None }
    }

    /// The same layer multiplying bf16 pairs of input channels with
    /// `vdpbf16ps` (f32 sums), where the CPU has AVX512_BF16 (and the layer
    /// is built for AVX-512); unchanged elsewhere (the f32 kernel). `weight`
    /// is the one given to [`Direct::new`].
    pub fn with_bf16(mut self, weight: &[f32]) -> Self {
        if !super::bf16::native() || self.tile.isa() != Isa::Avx512 {
            return self;
        }
        let (cin, cout, cb) = (self.cin, self.cout, self.tile.cb());
        let cp = cin.div_ceil(2);
        let mut pairs = vec![0u32; cout.div_ceil(cb) * cp * 9 * cb];
        for co in 0..cout {
            let (blk, lane) = (co / cb, co % cb);
            for p in 0..cp {
                for t in 0..9 {
                    let w = |ci: usize| if ci < cin { weight[(co * cin + ci) * 9 + t] } else { 0.0 };
                    let lo = super::bf16::round_bits(w(2 * p)) >> 16;
                    pairs[((blk * cp + p) * 9 + t) * cb + lane] = lo | super::bf16::round_bits(w(2 * p + 1));
                }
            }
        }
        self.pairs = Some(pairs);
        self
    }

    /// The build this layer's kernel runs.
    pub fn isa(&self) -> Isa {
        self.tile.isa()
    }

    /// Whether this layer multiplies in bf16.
    pub fn is_bf16(&self) -> bool {
        self.pairs.is_some()
    }

    /// Output rows `oy0..oy1` of one image: `x` `[cin, h, w]`, `out` and
    /// `residual` `[cout, h, w]` (only those rows are written / read).
    ///
    /// # Safety
    /// The CPU runs this layer's build (one of [`Isa::all`]; [`Direct::new`]'s
    /// where [`available`] returned true); `x` holds `cin * h * w` values (f32) or
    /// `cin.div_ceil(2) * h * w` words (pairs, for a layer that
    /// [`Direct::is_bf16`]), `out` `cout * h * w` values or (pairs: cout even,
    /// no residual) `cout / 2 * h * w` words, `residual` `cout * h * w`; no
    /// other thread writes rows `oy0..oy1` of `out`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows(
        &self,
        x: Src,
        h: usize,
        w: usize,
        oy0: usize,
        oy1: usize,
        bias: &[f32],
        relu: bool,
        residual: Option<*const f32>,
        out: Dst,
    ) {
        #[cfg(target_arch = "x86_64")]
        match (x, &self.pairs) {
            (Src::F32(x), Some(pairs)) => {
                // SAFETY: as below; with_bf16 found AVX512_BF16 (bf16::native) when
                // it made `pairs` ([block][cp][9][cb] words)
                return unsafe { self.rows_bf16(pairs, x, h, w, oy0, oy1, bias, relu, residual, out) };
            }
            (Src::Pairs(x), Some(pairs)) => {
                let planes = self.cin.div_ceil(2);
                let a = Args { x, y0: 0, rows: h, h, w, planes, cout: self.cout, bias, relu, residual, out };
                // SAFETY: AVX512_BF16 as above; the caller's contract: x holds
                // the frame's planes of pairs, out and residual are sized
                return unsafe { self.each_row(&a, pairs, oy0..oy1) };
            }
            (Src::Pairs(_), None) => panic!("channel pairs into an f32 layer (the caller's contract)"),
            (Src::F32(_), None) => {}
        }
        #[cfg(target_arch = "x86_64")]
        {
            let Src::F32(x) = x else { unreachable!("pairs returned above") };
            let a = Args { x, y0: 0, rows: h, h, w, planes: self.cin, cout: self.cout, bias, relu, residual, out };
            // SAFETY: the caller's contract: the CPU runs the layer's build
            // (AVX-512F, or AVX2 and FMA: the features each f32 kernel is
            // compiled for), and x, out and residual are sized as stated;
            // packed holds blocks * cin * 9 * cb values
            unsafe { self.each_row(&a, &self.packed, oy0..oy1) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, h, w, oy0, oy1, bias, relu, residual, out);
            unreachable!("direct convolution needs x86-64 with AVX-512 or AVX2");
        }
    }
}

impl Direct {
    /// [`Direct::rows`] in bf16: groups of [`BF16_ROWS`] output rows, their
    /// input rows converted to channel pairs, then every output block.
    ///
    /// # Safety
    /// As [`Direct::rows`], and AVX512_BF16 is present.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_bf16(
        &self,
        pairs: &[u32],
        x: *const f32,
        h: usize,
        w: usize,
        oy0: usize,
        oy1: usize,
        bias: &[f32],
        relu: bool,
        residual: Option<*const f32>,
        out: Dst,
    ) {
        let cin = self.cin;
        let cp = cin.div_ceil(2);
        PAIR_ROWS.with_borrow_mut(|buf| {
            for g0 in (oy0..oy1).step_by(BF16_ROWS) {
                let g1 = (g0 + BF16_ROWS).min(oy1);
                let (y0, y1) = (g0.saturating_sub(1), (g1 + 1).min(h));
                let nr = y1 - y0;
                super::grow(buf, cp * nr * w);
                for p in 0..cp {
                    for y in y0..y1 {
                        let lo = x.add((2 * p * h + y) * w);
                        let hi = (2 * p + 1 < cin).then(|| x.add(((2 * p + 1) * h + y) * w));
                        // SAFETY: rows y of channels 2p, 2p + 1 lie inside x
                        // (the caller's contract); the buffer row was sized above
                        unsafe { super::bf16::pair_row(lo, hi, w, buf.as_mut_ptr().add((p * nr + y - y0) * w)) };
                    }
                }
                let a = Args {
                    x: buf.as_ptr(),
                    y0,
                    rows: nr,
                    h,
                    w,
                    planes: cp,
                    cout: self.cout,
                    bias,
                    relu,
                    residual,
                    out,
                };
                // SAFETY: AVX-512F and AVX512_BF16 present (the caller's
                // contract); `a.x` holds rows y0..y1 of cp pair planes, which
                // cover oy - 1..=oy + 1 within the frame for every oy in
                // g0..g1; pairs holds blocks * cp * 9 * cb words
                unsafe { self.each_row(&a, pairs, g0..g1) };
            }
        });
    }

    /// Output rows `oys` of every output block, `weights` being this layer's
    /// packed for `T`'s kernel (`[block][a.planes][9][cb]`).
    ///
    /// # Safety
    /// As [`avx512::Row::row`] for each block and row: the CPU has the
    /// kernel's features, and `a` describes valid buffers holding the input
    /// rows around `oys` and the output rows `oys`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn each_row<T: avx512::Row>(&self, a: &Args<T>, weights: &[T], oys: std::ops::Range<usize>) {
        let cb = self.tile.cb();
        for blk in 0..self.cout.div_ceil(cb) {
            // SAFETY: `weights` holds blocks * planes * 9 * cb values (the
            // caller's contract), block blk's from blk * planes * 9 * cb on
            let wp = unsafe { weights.as_ptr().add(blk * a.planes * 9 * cb) };
            for oy in oys.clone() {
                // SAFETY: the caller's contract (features, buffers for oys);
                // wp is block blk's weights, its output channels blk * cb..
                unsafe {
                    match self.tile {
                        Tile::C4S4 => T::row::<4, 4>(a, wp, blk * 4, oy),
                        Tile::C8S3 => T::row::<8, 3>(a, wp, blk * 8, oy),
                        Tile::C16S1 => T::row::<16, 1>(a, wp, blk * 16, oy),
                        Tile::Y3S3 => T::row_avx2::<3, 3>(a, wp, blk * 3, oy),
                        Tile::Y4S2 => T::row_avx2::<4, 2>(a, wp, blk * 4, oy),
                    }
                }
            }
        }
    }
}

/// One layer's rows: `planes` input planes of `T` (f32 channels, or bf16
/// channel pairs as u32) holding frame rows `y0..y0 + rows` each (`rows`
/// apart), the frame's size, and the output.
#[cfg(target_arch = "x86_64")]
struct Args<'a, T> {
    x: *const T,
    y0: usize,
    rows: usize,
    h: usize,
    w: usize,
    planes: usize,
    cout: usize,
    bias: &'a [f32],
    relu: bool,
    residual: Option<*const f32>,
    out: Dst,
}

/// The walk both builds share, in the order that fixes their sums: for output
/// row `oy`, every input plane and, top to bottom, every tap row inside the
/// frame, `f(src, wrow)` with `src` that input row's first value and `wrow`
/// the plane's `CB`-wide weights of that tap row (tap column `kx` at
/// `wrow + kx CB`); the caller takes the tap columns left to right.
///
/// # Safety
/// `a` and `wp` describe valid buffers (see [`Args`]): `a.planes` planes of
/// `a.rows` rows of `a.w` values holding rows `oy - 1..=oy + 1` (those inside
/// the frame), and `a.planes * 9 * CB` weights.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn each_tap_row<T, const CB: usize>(
    a: &Args<T>,
    wp: *const T,
    oy: usize,
    mut f: impl FnMut(*const T, *const T),
) {
    for ci in 0..a.planes {
        let plane = a.x.add(ci * a.rows * a.w);
        let wci = wp.add(ci * 9 * CB);
        for ky in 0..3 {
            let sy = oy as isize + ky as isize - 1;
            if sy < 0 || sy >= a.h as isize {
                continue;
            }
            f(plane.add((sy as usize - a.y0) * a.w), wci.add(ky * 3 * CB));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Args;
    use std::arch::x86_64::*;

    /// The arithmetic of one kernel: how an input vector is loaded and how a
    /// weight (of the same element type) multiplies it into an accumulator.
    trait Arith {
        type In: Copy;
        type V: Copy;
        unsafe fn load(mask: u16, p: *const Self::In) -> Self::V;
        unsafe fn madd(acc: __m512, v: Self::V, w: Self::In) -> __m512;
    }

    /// f32 FMA.
    struct F32;

    impl Arith for F32 {
        type In = f32;
        type V = __m512;
        #[inline(always)]
        unsafe fn load(mask: u16, p: *const f32) -> __m512 {
            _mm512_maskz_loadu_ps(mask, p)
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512, v: __m512, w: f32) -> __m512 {
            _mm512_fmadd_ps(v, _mm512_set1_ps(w), acc)
        }
    }

    /// `vdpbf16ps` on bf16 pairs (two input channels per lane and word).
    struct Bf16;

    impl Arith for Bf16 {
        type In = u32;
        type V = __m512bh;
        #[inline(always)]
        unsafe fn load(mask: u16, p: *const u32) -> __m512bh {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi32(mask, p as *const i32))
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512, v: __m512bh, w: u32) -> __m512 {
            _mm512_dpbf16_ps(acc, v, std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(w as i32)))
        }
    }

    /// Lanes `l` of a 16-wide vector starting at column `start + l` whose
    /// column lies in `0..w`.
    #[inline(always)]
    fn lanes(start: isize, w: usize) -> u16 {
        let lo = (-start).clamp(0, 16) as u32;
        let hi = (w as isize - start).clamp(0, 16) as u32;
        if hi <= lo {
            return 0;
        }
        let upto = if hi == 16 { u16::MAX } else { (1u16 << hi) - 1 };
        upto & !((1u16 << lo) - 1)
    }

    /// The kernel for input planes of `Self`: one output row `oy` of output
    /// channels `co0..co0 + CB` (those below `cout` are stored).
    pub(super) trait Row: Sized {
        /// # Safety
        /// The CPU has the kernel's features (AVX-512F; for u32 pairs also
        /// AVX512_BF16); `a` and `wp` describe valid buffers (see [`Args`]).
        unsafe fn row<const CB: usize, const S: usize>(a: &Args<Self>, wp: *const Self, co0: usize, oy: usize);

        /// [`Row::row`] on the AVX2 build (8-pixel strips).
        ///
        /// # Safety
        /// As [`Row::row`], the CPU having AVX2 and FMA; f32 only.
        unsafe fn row_avx2<const CB: usize, const S: usize>(a: &Args<Self>, wp: *const Self, co0: usize, oy: usize);
    }

    impl Row for f32 {
        unsafe fn row<const CB: usize, const S: usize>(a: &Args<f32>, wp: *const f32, co0: usize, oy: usize) {
            // SAFETY: the caller's contract (AVX-512F present)
            unsafe { row_f32::<CB, S>(a, wp, co0, oy) }
        }

        unsafe fn row_avx2<const CB: usize, const S: usize>(a: &Args<f32>, wp: *const f32, co0: usize, oy: usize) {
            // SAFETY: the caller's contract (AVX2 and FMA present)
            unsafe { super::avx2::row::<CB, S>(a, wp, co0, oy) }
        }
    }

    impl Row for u32 {
        unsafe fn row<const CB: usize, const S: usize>(a: &Args<u32>, wp: *const u32, co0: usize, oy: usize) {
            // SAFETY: the caller's contract (AVX-512F and AVX512_BF16 present)
            unsafe { row_bf16::<CB, S>(a, wp, co0, oy) }
        }

        unsafe fn row_avx2<const CB: usize, const S: usize>(_: &Args<u32>, _: *const u32, _: usize, _: usize) {
            unreachable!("bf16 pairs on the AVX2 build (with_bf16 keeps AVX2 layers f32)")
        }
    }

    /// [`Row`] on f32 channels.
    #[target_feature(enable = "avx512f")]
    unsafe fn row_f32<const CB: usize, const S: usize>(a: &Args<f32>, wp: *const f32, co0: usize, oy: usize) {
        row_with::<F32, CB, S>(a, wp, co0, oy)
    }

    /// [`Row`] on bf16 channel pairs: one `vdpbf16ps` takes two input
    /// channels' products per lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn row_bf16<const CB: usize, const S: usize>(a: &Args<u32>, wp: *const u32, co0: usize, oy: usize) {
        row_with::<Bf16, CB, S>(a, wp, co0, oy)
    }

    /// The kernel of [`row_f32`] and [`row_bf16`] in `A`'s arithmetic.
    #[inline(always)]
    unsafe fn row_with<A: Arith, const CB: usize, const S: usize>(
        a: &Args<A::In>,
        wp: *const A::In,
        co0: usize,
        oy: usize,
    ) {
        let w = a.w;
        let stored = (a.cout - co0).min(CB);
        let mut x0 = 0usize;
        while x0 < w {
            let mut acc = [[_mm512_setzero_ps(); S]; CB];
            // load masks per strip and tap column
            let mut masks = [[0u16; 3]; S];
            for (s, m) in masks.iter_mut().enumerate() {
                for (kx, mk) in m.iter_mut().enumerate() {
                    *mk = lanes((x0 + 16 * s) as isize + kx as isize - 1, w);
                }
            }
            super::each_tap_row::<_, CB>(a, wp, oy, |src, wrow| {
                for kx in 0..3 {
                    // masked-off lanes are not read, so the address may lie
                    // outside the row
                    let v: [A::V; S] = std::array::from_fn(|s| {
                        let col = (x0 + 16 * s) as isize + kx as isize - 1;
                        A::load(masks[s][kx], src.wrapping_offset(col))
                    });
                    let wt = wrow.add(kx * CB);
                    for (c, acc_c) in acc.iter_mut().enumerate() {
                        let wv = *wt.add(c);
                        for s in 0..S {
                            acc_c[s] = A::madd(acc_c[s], v[s], wv);
                        }
                    }
                }
            });
            store(a, acc, co0, stored, oy, x0);
            x0 += 16 * S;
        }
    }

    /// The epilogue of [`row_with`]: bias, ReLU, residual; masked stores at
    /// the right border.
    #[inline(always)]
    unsafe fn store<T, const CB: usize, const S: usize>(
        a: &Args<T>,
        acc: [[__m512; S]; CB],
        co0: usize,
        stored: usize,
        oy: usize,
        x0: usize,
    ) {
        let (w, hw) = (a.w, a.h * a.w);
        let out = match a.out {
            super::Dst::F32(out) => out,
            super::Dst::Pairs(out) => return store_pairs(a, acc, co0, stored, oy, x0, out),
        };
        for (c, acc_c) in acc.iter().enumerate().take(stored) {
            let co = co0 + c;
            let b = _mm512_set1_ps(a.bias[co]);
            let row_off = co * hw + oy * w;
            for s in 0..S {
                let start = x0 + 16 * s;
                if start >= w {
                    break;
                }
                let m = lanes(start as isize, w);
                let mut y = _mm512_add_ps(acc_c[s], b);
                if a.relu {
                    y = _mm512_max_ps(y, _mm512_setzero_ps());
                }
                // whole strips unmasked: a masked store costs more (Zen 4)
                let full = m == u16::MAX;
                if let Some(r) = a.residual {
                    let r = r.add(row_off + start);
                    y = _mm512_add_ps(y, if full { _mm512_loadu_ps(r) } else { _mm512_maskz_loadu_ps(m, r) });
                }
                if full {
                    _mm512_storeu_ps(out.add(row_off + start), y);
                } else {
                    _mm512_mask_storeu_ps(out.add(row_off + start), m, y);
                }
            }
        }
    }

    /// [`store`] into bf16 pairs (`stored` even, no residual): channels
    /// `co0 + 2p` and `co0 + 2p + 1` after bias and ReLU, rounded into pair
    /// plane `(co0 + 2p) / 2`.
    #[inline(always)]
    unsafe fn store_pairs<T, const CB: usize, const S: usize>(
        a: &Args<T>,
        acc: [[__m512; S]; CB],
        co0: usize,
        stored: usize,
        oy: usize,
        x0: usize,
        out: *mut u32,
    ) {
        debug_assert!(stored.is_multiple_of(2) && co0.is_multiple_of(2) && a.residual.is_none());
        let (w, hw) = (a.w, a.h * a.w);
        let act = |acc: __m512, co: usize| {
            let y = _mm512_add_ps(acc, _mm512_set1_ps(a.bias[co]));
            if a.relu {
                _mm512_max_ps(y, _mm512_setzero_ps())
            } else {
                y
            }
        };
        for p in 0..stored / 2 {
            let co = co0 + 2 * p;
            let row_off = co / 2 * hw + oy * w;
            for s in 0..S {
                let start = x0 + 16 * s;
                if start >= w {
                    break;
                }
                let m = lanes(start as isize, w);
                let v = crate::engine::kernels::bf16::pair16(act(acc[2 * p][s], co), act(acc[2 * p + 1][s], co + 1));
                let dst = out.add(row_off + start) as *mut __m512i;
                if m == u16::MAX {
                    _mm512_storeu_si512(dst, v);
                } else {
                    _mm512_mask_storeu_epi32(dst as *mut _, m, v);
                }
            }
        }
    }

    #[cfg(test)]
    #[test]
    fn lanes_cover_the_row() {
        assert_eq!(lanes(0, 100), u16::MAX);
        assert_eq!(lanes(-1, 100), u16::MAX << 1);
        assert_eq!(lanes(90, 100), (1 << 10) - 1);
        assert_eq!(lanes(-1, 3), 0b1110);
        assert_eq!(lanes(100, 100), 0);
        assert_eq!(lanes(-20, 100), 0);
    }
}

/// The f32 kernel on AVX2 + FMA: 8-pixel strips in ymm registers; tiles that
/// reach a frame border load and store under lane masks, the others plainly.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Args;
    use std::arch::x86_64::*;

    /// Lane mask (all bits set where the lane is in) of an 8-wide vector
    /// starting at column `start`: the lanes whose column lies in `0..w`.
    #[inline(always)]
    unsafe fn lanes(start: isize, w: usize) -> __m256i {
        let col = _mm256_add_epi32(_mm256_set1_epi32(start as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        let inside = _mm256_cmpgt_epi32(col, _mm256_set1_epi32(-1));
        _mm256_and_si256(inside, _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), col))
    }

    /// One output row `oy` of output channels `co0..co0 + CB` (those below
    /// `cout` are stored), tile by tile of `8 S` pixels.
    ///
    /// # Safety
    /// AVX2 and FMA present; `a` and `wp` describe valid buffers (see
    /// [`Args`]), `a.out` f32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row<const CB: usize, const S: usize>(a: &Args<f32>, wp: *const f32, co0: usize, oy: usize) {
        let w = a.w;
        let mut x0 = 0usize;
        while x0 < w {
            // a tile whose taps (one column either side) all lie in the row
            if x0 >= 1 && x0 + 8 * S < w {
                tile::<CB, S, false>(a, wp, co0, oy, x0);
            } else {
                tile::<CB, S, true>(a, wp, co0, oy, x0);
            }
            x0 += 8 * S;
        }
    }

    /// The tile of [`row`] at column `x0`; `MASKED`: it reaches a border.
    #[inline(always)]
    unsafe fn tile<const CB: usize, const S: usize, const MASKED: bool>(
        a: &Args<f32>,
        wp: *const f32,
        co0: usize,
        oy: usize,
        x0: usize,
    ) {
        let w = a.w;
        let mut acc = [[_mm256_setzero_ps(); S]; CB];
        // load masks per strip and tap column (border tiles only)
        let masks: [[__m256i; 3]; S] = std::array::from_fn(|s| {
            std::array::from_fn(|kx| {
                if MASKED {
                    lanes((x0 + 8 * s) as isize + kx as isize - 1, w)
                } else {
                    _mm256_setzero_si256()
                }
            })
        });
        super::each_tap_row::<_, CB>(a, wp, oy, |src, wrow| {
            for kx in 0..3 {
                // masked-off lanes are not read, so the address may lie
                // outside the row
                let v: [__m256; S] = std::array::from_fn(|s| {
                    let p = src.wrapping_offset((x0 + 8 * s) as isize + kx as isize - 1);
                    if MASKED {
                        _mm256_maskload_ps(p, masks[s][kx])
                    } else {
                        _mm256_loadu_ps(p)
                    }
                });
                let wt = wrow.add(kx * CB);
                for (c, acc_c) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*wt.add(c));
                    for s in 0..S {
                        acc_c[s] = _mm256_fmadd_ps(v[s], wv, acc_c[s]);
                    }
                }
            }
        });
        store(a, acc, co0, oy, x0);
    }

    /// The epilogue: bias, ReLU, residual; masked stores at the right border.
    #[inline(always)]
    unsafe fn store<const CB: usize, const S: usize>(
        a: &Args<f32>,
        acc: [[__m256; S]; CB],
        co0: usize,
        oy: usize,
        x0: usize,
    ) {
        let (w, hw) = (a.w, a.h * a.w);
        let super::Dst::F32(out) = a.out else { unreachable!("bf16 pairs out of the AVX2 build") };
        let stored = (a.cout - co0).min(CB);
        for (c, acc_c) in acc.iter().enumerate().take(stored) {
            let co = co0 + c;
            let b = _mm256_set1_ps(a.bias[co]);
            let row_off = co * hw + oy * w;
            for s in 0..S {
                let start = x0 + 8 * s;
                if start >= w {
                    break;
                }
                let mut y = _mm256_add_ps(acc_c[s], b);
                if a.relu {
                    y = _mm256_max_ps(y, _mm256_setzero_ps());
                }
                let dst = out.add(row_off + start);
                if start + 8 <= w {
                    if let Some(r) = a.residual {
                        y = _mm256_add_ps(y, _mm256_loadu_ps(r.add(row_off + start)));
                    }
                    _mm256_storeu_ps(dst, y);
                } else {
                    let m = lanes(start as isize, w);
                    if let Some(r) = a.residual {
                        y = _mm256_add_ps(y, _mm256_maskload_ps(r.add(row_off + start), m));
                    }
                    _mm256_maskstore_ps(dst, m, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution summed in the kernels' order (input channel, tap row,
    /// tap column, one fused multiply-add each, then bias, ReLU, residual).
    fn reference(x: &[f32], wt: &[f32], bias: &[f32], res: Option<&[f32]>, relu: bool, dims: [usize; 4]) -> Vec<f32> {
        let [cin, cout, h, w] = dims;
        let mut out = vec![0f32; cout * h * w];
        for co in 0..cout {
            for oy in 0..h {
                for ox in 0..w {
                    let mut acc = 0f32;
                    for ci in 0..cin {
                        for ky in 0..3 {
                            // rows outside the frame are skipped, columns
                            // outside it multiply a zero (a masked load)
                            let Some(sy) = (oy + ky).checked_sub(1).filter(|&sy| sy < h) else { continue };
                            for kx in 0..3 {
                                let v = (ox + kx)
                                    .checked_sub(1)
                                    .filter(|&sx| sx < w)
                                    .map_or(0.0, |sx| x[(ci * h + sy) * w + sx]);
                                acc = v.mul_add(wt[((co * cin + ci) * 3 + ky) * 3 + kx], acc);
                            }
                        }
                    }
                    let mut y = acc + bias[co];
                    if relu {
                        y = y.max(0.0);
                    }
                    let i = (co * h + oy) * w + ox;
                    out[i] = y + res.map_or(0.0, |r| r[i]);
                }
            }
        }
        out
    }

    #[test]
    fn every_build_sums_in_the_same_order() {
        // every build this CPU runs (AVX-512 and AVX2 where it has AVX-512),
        // widths around the 8- and 16-lane strips and their tiles, output
        // channels around the blocks: the same bits as the scalar sum in the
        // kernels' order, so the builds agree with each other bit for bit
        let pseudo = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 8e6 - 1.0)
                .collect()
        };
        for [cin, cout, h, w] in
            [[3, 3, 4, 1], [8, 8, 3, 24], [8, 5, 5, 25], [5, 17, 3, 49], [16, 16, 4, 23], [2, 4, 2, 57]]
        {
            let x = pseudo(cin * h * w, 1);
            let wt = pseudo(cout * cin * 9, 2);
            let bias = pseudo(cout, 3);
            let res = pseudo(cout * h * w, 4);
            for isa in Isa::all() {
                let d = Direct::new_for(&wt, cout, cin, isa);
                for (relu, residual) in [(false, None), (true, Some(&res[..]))] {
                    let mut out = vec![f32::NAN; cout * h * w];
                    // SAFETY: Isa::all() lists builds this CPU runs; x, out
                    // and res hold cin / cout planes of h * w values
                    unsafe {
                        d.rows(
                            Src::F32(x.as_ptr()),
                            h,
                            w,
                            0,
                            h,
                            &bias,
                            relu,
                            residual.map(|r| r.as_ptr()),
                            Dst::F32(out.as_mut_ptr()),
                        )
                    };
                    let want = reference(&x, &wt, &bias, residual, relu, [cin, cout, h, w]);
                    let same = out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} {cin}->{cout} {h}x{w} relu {relu}");
                }
            }
        }
    }
}
