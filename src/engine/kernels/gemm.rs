//! Strided single-threaded GEMM (the `gemm` crate) shared by the kernels.

/// `dst[m x n] = lhs[m x k] * rhs[k x n]` (`+=` when `accumulate`), every
/// operand with its own row and column strides; single-threaded (callers
/// parallelise around it).
///
/// # Safety
/// All pointers valid for the given extents and strides.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided(
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
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { 1.0f32 } else { 0.0f32 },
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}
