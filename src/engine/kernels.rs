//! CPU convolution kernels where candle is slow, as candle custom ops.
//!
//! candle's CPU `conv2d` materialises the whole im2col matrix (gigabytes for a
//! megapixel frame) and re-lays it out around the matmul; its
//! `conv_transpose2d` is a scalar loop. These kernels:
//! - [`Conv3x3`]: 3x3, stride 1, padding 1, im2col in row bands that stay in
//!   cache, one GEMM per band, bands in parallel, bias + ReLU + residual fused
//!   into the epilogue;
//! - [`PatchConv`]: k x k conv with stride k (space-to-depth + GEMM);
//! - [`PatchConvTranspose`]: k x k transposed conv with stride k (GEMM +
//!   depth-to-space).
//!
//! Layout NCHW f32 on the CPU; other devices use candle's ops. Each is
//! unit-tested against candle's reference op.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Raw pointer that may cross threads: each band writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `dst[m x n] (row stride dst_rs) = lhs[m x k] (row-major) * rhs[k x n] (row stride rhs_rs)`.
///
/// # Safety
/// All pointers valid for the given extents.
unsafe fn sgemm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        1,
        rhs_rs as isize,
        0.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Run `f(first_row, rows)` over `m` rows split into one block per thread.
fn par_row_blocks(m: usize, f: impl Fn(usize, usize) + Sync) {
    let per = m.div_ceil(rayon::current_num_threads().max(1)).max(1);
    (0..m).step_by(per).collect::<Vec<_>>().par_iter().for_each(|&r0| f(r0, per.min(m - r0)));
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{what}: f32 input expected"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: contiguous input expected"),
    }
}

/// 3x3 convolution, stride 1, padding 1, optional fused ReLU and residual add.
#[derive(Clone, Debug)]
pub struct Conv3x3 {
    /// `[cout, cin, 3, 3]` row-major
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    pub relu: bool,
}

impl Conv3x3 {
    pub fn from_tensors(w: &Tensor, b: Option<&Tensor>, relu: bool) -> candle_core::Result<Self> {
        let (cout, cin, kh, kw) = w.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Conv3x3 needs a 3x3 kernel, got {kh}x{kw}");
        }
        let bias = match b {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1()?,
            None => vec![0.0; cout],
        };
        Ok(Self { weight: w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?, bias, cin, cout, relu })
    }

    /// y = act(conv(x) + b) (+ residual), x `[B, cin, H, W]`.
    fn run(&self, x: &[f32], b: usize, h: usize, w: usize, residual: Option<&[f32]>) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        let hw = h * w;
        let kk = cin * 9;
        let mut out = vec![0f32; b * cout * hw];
        // rows per band: keep the column buffer around 2 MB
        let rows = ((1usize << 19) / (kk * w).max(1)).clamp(1, h);
        let bands: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..h).step_by(rows).map(move |r0| (bi, r0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        bands.par_iter().for_each_init(Vec::new, |col: &mut Vec<f32>, &(bi, r0)| {
            let out_ptr = out_ptr;
            let r1 = (r0 + rows).min(h);
            let n = (r1 - r0) * w;
            col.clear();
            col.resize(kk * n, 0.0);
            let xb = &x[bi * cin * hw..(bi + 1) * cin * hw];
            for ci in 0..cin {
                let plane = &xb[ci * hw..(ci + 1) * hw];
                for ky in 0..3 {
                    for kx in 0..3 {
                        let row = &mut col[(ci * 9 + ky * 3 + kx) * n..(ci * 9 + ky * 3 + kx + 1) * n];
                        for r in r0..r1 {
                            let dst = &mut row[(r - r0) * w..(r - r0 + 1) * w];
                            let sy = r as isize + ky as isize - 1;
                            if sy < 0 || sy >= h as isize {
                                dst.fill(0.0);
                                continue;
                            }
                            let src = &plane[sy as usize * w..(sy as usize + 1) * w];
                            match kx {
                                0 => {
                                    dst[0] = 0.0;
                                    dst[1..].copy_from_slice(&src[..w - 1]);
                                }
                                1 => dst.copy_from_slice(src),
                                _ => {
                                    dst[..w - 1].copy_from_slice(&src[1..]);
                                    dst[w - 1] = 0.0;
                                }
                            }
                        }
                    }
                }
            }
            unsafe {
                let dst = out_ptr.0.add(bi * cout * hw + r0 * w);
                sgemm(cout, n, kk, dst, hw, self.weight.as_ptr(), kk, 1, col.as_ptr(), n);
                for co in 0..cout {
                    let d = std::slice::from_raw_parts_mut(dst.add(co * hw), n);
                    let bias = self.bias[co];
                    let res = residual.map(|r| &r[bi * cout * hw + co * hw + r0 * w..][..n]);
                    match (self.relu, res) {
                        (true, None) => d.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
                        (false, None) => d.iter_mut().for_each(|v| *v += bias),
                        (true, Some(r)) => d.iter_mut().zip(r).for_each(|(v, r)| *v = (*v + bias).max(0.0) + r),
                        (false, Some(r)) => d.iter_mut().zip(r).for_each(|(v, r)| *v += bias + r),
                    }
                }
            }
        });
        out
    }

    fn out_shape(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        if c != self.cin {
            candle_core::bail!("Conv3x3: {c} input channels, weight expects {}", self.cin);
        }
        Ok((b, h, w, Shape::from((b, self.cout, h, w))))
    }
}

impl CustomOp1 for Conv3x3 {
    fn name(&self) -> &'static str {
        "codiff-conv3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "conv3x3")?;
        let (b, h, w, shape) = self.out_shape(l)?;
        Ok((CpuStorage::F32(self.run(x, b, h, w, None)), shape))
    }
}

/// The same convolution plus a residual input: `y = act(conv(x) + b) + r`.
impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "codiff-conv3x3-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "conv3x3")?;
        let r = contiguous(s2, l2, "conv3x3 residual")?;
        let (b, h, w, shape) = self.out_shape(l1)?;
        if l2.shape() != &shape {
            candle_core::bail!("conv3x3 residual shape {:?}, output {:?}", l2.shape(), shape);
        }
        Ok((CpuStorage::F32(self.run(x, b, h, w, Some(r))), shape))
    }
}

/// k x k convolution with stride k, no padding (FBCNN's strided downsampling).
#[derive(Clone, Debug)]
pub struct PatchConv {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
}

impl PatchConv {
    pub fn from_tensors(w: &Tensor, b: &Tensor) -> candle_core::Result<Self> {
        let (cout, cin, k, k2) = w.dims4()?;
        if k != k2 {
            candle_core::bail!("PatchConv needs a square kernel");
        }
        Ok(Self { weight: w.flatten_all()?.to_vec1()?, bias: b.to_vec1()?, cin, cout, k })
    }
}

impl CustomOp1 for PatchConv {
    fn name(&self) -> &'static str {
        "codiff-patch-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "patch conv")?;
        let (b, c, h, w) = l.shape().dims4()?;
        if c != self.cin {
            candle_core::bail!("patch conv: {c} input channels, weight expects {}", self.cin);
        }
        let k = self.k;
        let (oh, ow) = (h / k, w / k);
        let n = oh * ow;
        let kk = c * k * k;
        let mut out = vec![0f32; b * self.cout * n];
        for bi in 0..b {
            let xb = &x[bi * c * h * w..];
            // space-to-depth: col[(ci,ky,kx), (oy,ox)]
            let mut col = vec![0f32; kk * n];
            col.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
                let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
                for oy in 0..oh {
                    let src = &xb[ci * h * w + (oy * k + ky) * w..];
                    for ox in 0..ow {
                        dst[oy * ow + ox] = src[ox * k + kx];
                    }
                }
            });
            let ob = &mut out[bi * self.cout * n..(bi + 1) * self.cout * n];
            let optr = SendPtr(ob.as_mut_ptr());
            par_row_blocks(self.cout, |co0, m| {
                let optr = optr;
                unsafe {
                    sgemm(m, n, kk, optr.0.add(co0 * n), n, self.weight.as_ptr().add(co0 * kk), kk, 1, col.as_ptr(), n);
                }
            });
            for (co, d) in ob.chunks_mut(n).enumerate() {
                d.iter_mut().for_each(|v| *v += self.bias[co]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, self.cout, oh, ow))))
    }
}

/// k x k transposed convolution with stride k (FBCNN's upsampling).
#[derive(Clone, Debug)]
pub struct PatchConvTranspose {
    /// `[cin, cout, k, k]` as PyTorch stores it
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
}

impl PatchConvTranspose {
    pub fn from_tensors(w: &Tensor, b: &Tensor) -> candle_core::Result<Self> {
        let (cin, cout, k, _) = w.dims4()?;
        Ok(Self { weight: w.flatten_all()?.to_vec1()?, bias: b.to_vec1()?, cin, cout, k })
    }
}

impl CustomOp1 for PatchConvTranspose {
    fn name(&self) -> &'static str {
        "codiff-patch-conv-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "patch conv transpose")?;
        let (b, c, h, w) = l.shape().dims4()?;
        if c != self.cin {
            candle_core::bail!("patch conv transpose: {c} input channels, weight expects {}", self.cin);
        }
        let k = self.k;
        let n = h * w;
        let m = self.cout * k * k;
        let (oh, ow) = (h * k, w * k);
        let mut out = vec![0f32; b * self.cout * oh * ow];
        for bi in 0..b {
            // tmp[(co,ky,kx), (y,x)] = sum_ci W[ci,(co,ky,kx)] x[ci,(y,x)]
            let mut tmp = vec![0f32; m * n];
            let tptr = SendPtr(tmp.as_mut_ptr());
            let xb = &x[bi * c * n..(bi + 1) * c * n];
            par_row_blocks(m, |r0, rows| {
                let tptr = tptr;
                unsafe {
                    // lhs element (r, ci) at weight[ci * m + r]: row stride 1, column stride m
                    sgemm(rows, n, c, tptr.0.add(r0 * n), n, self.weight.as_ptr().add(r0), 1, m, xb.as_ptr(), n);
                }
            });
            let ob = &mut out[bi * self.cout * oh * ow..(bi + 1) * self.cout * oh * ow];
            ob.par_chunks_mut(oh * ow).enumerate().for_each(|(co, plane)| {
                for ky in 0..k {
                    for kx in 0..k {
                        let t = &tmp[((co * k + ky) * k + kx) * n..][..n];
                        for y in 0..h {
                            let row = &mut plane[(y * k + ky) * ow..][..ow];
                            for xx in 0..w {
                                row[xx * k + kx] = t[y * w + xx] + self.bias[co];
                            }
                        }
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, self.cout, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn max_err(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
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
            let op = Conv3x3::from_tensors(&wt, Some(&b), false).unwrap();
            assert!(max_err(&x.apply_op1(op.clone()).unwrap(), &reference) < 1e-4);
            let with_res = x.apply_op2(&r, op).unwrap();
            assert!(max_err(&with_res, &(&reference + &r).unwrap()) < 1e-4);
            let relu = Conv3x3::from_tensors(&wt, Some(&b), true).unwrap();
            assert!(max_err(&x.apply_op1(relu).unwrap(), &reference.relu().unwrap()) < 1e-4);
        }
    }

    #[test]
    fn patch_conv_matches_candle() {
        let dev = Device::Cpu;
        for (k, h, w) in [(2, 8, 6), (4, 16, 12), (4, 9, 13)] {
            let x = Tensor::randn(0f32, 1., (2, 5, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (7, 5, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 7, &dev).unwrap();
            let reference = x.conv2d(&wt, 0, k, 1, 1).unwrap().broadcast_add(&b.reshape((1, 7, 1, 1)).unwrap()).unwrap();
            let ours = x.apply_op1(PatchConv::from_tensors(&wt, &b).unwrap()).unwrap();
            assert!(max_err(&ours, &reference) < 1e-4);
        }
    }

    #[test]
    fn patch_conv_transpose_matches_candle() {
        let dev = Device::Cpu;
        for (k, h, w) in [(2, 3, 5), (4, 2, 3)] {
            let x = Tensor::randn(0f32, 1., (2, 6, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (6, 4, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
            let reference = x
                .conv_transpose2d(&wt, 0, 0, k, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let ours = x.apply_op1(PatchConvTranspose::from_tensors(&wt, &b).unwrap()).unwrap();
            assert!(max_err(&ours, &reference) < 1e-4);
        }
    }
}
