//! The strided single-threaded GEMM shared by the kernels, in the layer's
//! arithmetic ([`Math`]): f32 (the `gemm` crate) or bf16 operands with f32
//! sums ([`super::bf16`]).
use std::cell::Cell;

/// The arithmetic of a layer's dot products, fixed when the layer is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Math {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Operands rounded to bf16, sums in f32 (`precision=bf16` on the CPU).
    Bf16,
}

thread_local! {
    /// The [`Math`] of the layers this thread builds now ([`build_with`]).
    static BUILDING: Cell<Math> = const { Cell::new(Math::F32) };
}

/// Run `f` (which builds layers) with `math` as the arithmetic of every CPU
/// kernel layer it constructs; f32 outside.
pub fn build_with<T>(math: Math, f: impl FnOnce() -> T) -> T {
    struct Restore(Math);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUILDING.set(self.0);
        }
    }
    let _restore = Restore(BUILDING.replace(math));
    f()
}

/// The arithmetic for a layer being built now (see [`build_with`]).
pub fn building() -> Math {
    BUILDING.get()
}

/// A strided f32 matrix view: element (r, c) at `p + r * rs + c * cs`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mat {
    pub p: *const f32,
    pub rs: usize,
    pub cs: usize,
}

impl Mat {
    pub fn new(p: *const f32, rs: usize, cs: usize) -> Self {
        Self { p, rs, cs }
    }

    /// Element (r, c).
    ///
    /// # Safety
    /// (r, c) lies inside the matrix.
    #[inline(always)]
    pub unsafe fn at(&self, r: usize, c: usize) -> f32 {
        *self.p.add(r * self.rs + c * self.cs)
    }
}

/// `dst[m x n] = lhs[m x k] * rhs[k x n]` (`+=` when `accumulate`), every
/// operand with its own row and column strides, in `math`; single-threaded
/// (callers parallelise around it).
///
/// # Safety
/// All pointers valid for the given extents and strides.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided(
    math: Math,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    let (d, a, b) = (Mat::new(dst, dst_rs, dst_cs), Mat::new(lhs, lhs_rs, lhs_cs), Mat::new(rhs, rhs_rs, rhs_cs));
    match math {
        Math::F32 => gemm_f32(m, n, k, accumulate, d, a, b),
        Math::Bf16 => super::bf16::gemm_bf16(m, n, k, accumulate, d, a, b),
    }
}

/// [`gemm_strided`] in f32 (the `gemm` crate), on views (`d` written).
///
/// # Safety
/// As [`gemm_strided`].
pub(super) unsafe fn gemm_f32(m: usize, n: usize, k: usize, accumulate: bool, d: Mat, a: Mat, b: Mat) {
    gemm::gemm(
        m,
        n,
        k,
        d.p as *mut f32,
        d.cs as isize,
        d.rs as isize,
        accumulate,
        a.p,
        a.cs as isize,
        a.rs as isize,
        b.p,
        b.cs as isize,
        b.rs as isize,
        if accumulate { 1.0f32 } else { 0.0f32 },
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}
