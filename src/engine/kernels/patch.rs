//! Stride-k k x k convolutions: [`PatchConv`] (space-to-depth + GEMM) and
//! [`PatchConvTranspose`] (GEMM + depth-to-space), FBCNN's down- and upsampling,
//! and their forms into existing buffers ([`PatchInto`]).
use candle_core::{CpuStorage, CustomOp1, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{activation, contiguous, contiguous_mut, gemm_strided, Math, SendPtr};

simd_fn! {
    /// One row's space-to-depth: `d[j][i] = s[i k + j]` for the k = `d.len()`
    /// rows (k = 2 and 4, FBCNN's factors, as whole-vector shuffles).
    fn split_row(s: &[f32], d: &mut [&mut [f32]]) {
        match d {
            [a, b] => {
                for ((a, b), s) in a.iter_mut().zip(b.iter_mut()).zip(s.chunks_exact(2)) {
                    (*a, *b) = (s[0], s[1]);
                }
            }
            [a, b, c, e] => {
                for ((((a, b), c), e), s) in
                    a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut()).zip(e.iter_mut()).zip(s.chunks_exact(4))
                {
                    (*a, *b, *c, *e) = (s[0], s[1], s[2], s[3]);
                }
            }
            _ => {
                let k = d.len();
                for (j, dj) in d.iter_mut().enumerate() {
                    for (i, v) in dj.iter_mut().enumerate() {
                        *v = s[i * k + j];
                    }
                }
            }
        }
    }
}

simd_fn! {
    /// One row's depth-to-space plus a bias: `row[i k + j] = t[j][i] + bias`
    /// for the k = `t.len()` rows ([`split_row`] backwards).
    fn merge_row(t: &[&[f32]], bias: f32, row: &mut [f32]) {
        match t {
            [a, b] => {
                for ((a, b), r) in a.iter().zip(b.iter()).zip(row.chunks_exact_mut(2)) {
                    (r[0], r[1]) = (a + bias, b + bias);
                }
            }
            [a, b, c, e] => {
                for ((((a, b), c), e), r) in a.iter().zip(b.iter()).zip(c.iter()).zip(e.iter()).zip(row.chunks_exact_mut(4)) {
                    (r[0], r[1], r[2], r[3]) = (a + bias, b + bias, c + bias, e + bias);
                }
            }
            _ => {
                let k = t.len();
                for (j, tj) in t.iter().enumerate() {
                    for (i, v) in tj.iter().enumerate() {
                        row[i * k + j] = v + bias;
                    }
                }
            }
        }
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
    /// the GEMM's arithmetic ([`super::building`] when made)
    pub math: Math,
}

impl PatchConv {
    pub fn from_tensors(w: &Tensor, b: &Tensor) -> candle_core::Result<Self> {
        let (cout, cin, k, k2) = w.dims4()?;
        if k != k2 {
            candle_core::bail!("PatchConv needs a square kernel");
        }
        Ok(Self { weight: w.flatten_all()?.to_vec1()?, bias: b.to_vec1()?, cin, cout, k, math: super::building() })
    }
}

impl PatchConv {
    /// `out` `[b, cout, h / k, w / k]` from `x` `[b, cin, h, w]`: bands of
    /// output rows in parallel, each gathering its patches into a band-sized
    /// scratch `[(ci, ky, kx), (y, x)]` (space-to-depth, no frame-sized
    /// intermediate) and multiplying it into its rows of every channel.
    fn run_bands(&self, x: &[f32], b: usize, h: usize, w: usize, out: &mut [f32]) {
        let (c, k, cout) = (self.cin, self.k, self.cout);
        let (oh, ow) = (h / k, w / k);
        let n = oh * ow;
        let kk = c * k * k;
        let _counted = super::counted(super::OpKind::Conv, 2 * kk * b * cout * n);
        // output rows per band: the scratch within ~1 MB, and enough bands for the threads
        let threads = rayon::current_num_threads().max(1);
        let rows = ((1usize << 18) / (kk * ow).max(1)).clamp(1, oh.div_ceil(2 * threads).max(1));
        let bands: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..oh).step_by(rows).map(move |y0| (bi, y0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        bands.par_iter().for_each_init(Vec::new, |col: &mut Vec<f32>, &(bi, y0)| {
            let out_ptr = out_ptr;
            let y1 = (y0 + rows).min(oh);
            let nb = (y1 - y0) * ow;
            super::grow(col, kk * nb);
            let xb = &x[bi * c * h * w..(bi + 1) * c * h * w];
            // the k planes (ci, ky, 0..k) of `col` take input row oy k + ky split by column
            for (cky, planes) in col[..kk * nb].chunks_exact_mut(k * nb).enumerate() {
                let (ci, ky) = (cky / k, cky % k);
                let mut planes: Vec<&mut [f32]> = planes.chunks_exact_mut(nb).collect();
                for oy in y0..y1 {
                    let src = &xb[ci * h * w + (oy * k + ky) * w..][..ow * k];
                    let mut rows: Vec<&mut [f32]> = planes.iter_mut().map(|p| &mut p[(oy - y0) * ow..][..ow]).collect();
                    split_row(src, &mut rows);
                }
            }
            // SAFETY: `out` holds b * cout * n values (the caller's
            // contract) and outlives this blocking loop; this band alone
            // writes columns y0 * ow..y1 * ow of image bi's cout rows (row
            // stride n); lhs is the cout x kk weight (from_tensors; the pub
            // fields must keep describing it); `col` (this thread's) holds
            // the kk x nb rhs, all of it written above
            unsafe {
                let ob = out_ptr.0.add(bi * cout * n + y0 * ow);
                gemm_strided(
                    self.math,
                    cout,
                    nb,
                    kk,
                    false,
                    ob,
                    n,
                    1,
                    self.weight.as_ptr(),
                    kk,
                    1,
                    col.as_ptr(),
                    nb,
                    1,
                );
                for (co, bias) in self.bias.iter().enumerate() {
                    std::slice::from_raw_parts_mut(ob.add(co * n), nb).iter_mut().for_each(|v| *v += bias);
                }
            }
        });
    }
}

impl Patch for PatchConv {
    const NAME: &'static str = "patch conv";
    const INTO: &'static str = "codiff-patch-conv-into";

    fn channels(&self) -> (usize, usize) {
        (self.cin, self.cout)
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (h / self.k, w / self.k)
    }

    fn run_into(&self, x: &[f32], b: usize, h: usize, w: usize, out: &mut [f32]) {
        self.run_bands(x, b, h, w, out)
    }
}

impl CustomOp1 for PatchConv {
    fn name(&self) -> &'static str {
        "codiff-patch-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fresh(self, s, l)
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
    /// the GEMM's arithmetic ([`super::building`] when made)
    pub math: Math,
}

impl PatchConvTranspose {
    pub fn from_tensors(w: &Tensor, b: &Tensor) -> candle_core::Result<Self> {
        let (cin, cout, k, _) = w.dims4()?;
        Ok(Self { weight: w.flatten_all()?.to_vec1()?, bias: b.to_vec1()?, cin, cout, k, math: super::building() })
    }

    /// `out` `[b, cout, h k, w k]` from `x` `[b, cin, h, w]`: bands of input
    /// rows in parallel, each one GEMM into a band-sized scratch
    /// `[(co, ky, kx), (y, x)]` scattered into its k output rows per input
    /// row (no frame-sized intermediate).
    fn run_bands(&self, x: &[f32], b: usize, h: usize, w: usize, out: &mut [f32]) {
        let (c, k) = (self.cin, self.k);
        let m = self.cout * k * k;
        let (oh, ow) = (h * k, w * k);
        // input rows per band: the scratch within ~1 MB, and enough bands for the threads
        let threads = rayon::current_num_threads().max(1);
        let rows = ((1usize << 18) / (m * w).max(1)).clamp(1, h.div_ceil(2 * threads).max(1));
        let bands: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..h).step_by(rows).map(move |y0| (bi, y0))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        bands.par_iter().for_each_init(Vec::new, |tmp: &mut Vec<f32>, &(bi, y0)| {
            let out_ptr = out_ptr;
            let y1 = (y0 + rows).min(h);
            let n = (y1 - y0) * w;
            super::grow(tmp, m * n);
            let xb = &x[bi * c * h * w..(bi + 1) * c * h * w];
            // SAFETY: lhs element (r, ci) at weight[ci * m + r] (row stride 1,
            // column stride m) within the c * m weights (from_tensors; the pub
            // fields must keep describing them); rhs rows y0..y1 of each
            // channel (row stride h w) within `xb`; `tmp` (this thread's) was
            // grown to m * n
            unsafe {
                gemm_strided(
                    self.math,
                    m,
                    n,
                    c,
                    false,
                    tmp.as_mut_ptr(),
                    n,
                    1,
                    self.weight.as_ptr(),
                    1,
                    m,
                    xb.as_ptr().add(y0 * w),
                    h * w,
                    1,
                )
            };
            for co in 0..self.cout {
                let bias = self.bias[co];
                for ky in 0..k {
                    // the k scratch rows (co, ky, 0..k) merge into output row y k + ky
                    let planes = &tmp[(co * k + ky) * k * n..][..k * n];
                    for y in y0..y1 {
                        // SAFETY: `out` holds b * cout * oh * ow values (allocated
                        // or shape-checked by the caller) and outlives this
                        // blocking loop; band (bi, y0) alone writes rows
                        // y0 k .. y1 k of image bi's planes
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(
                                out_ptr.0.add(((bi * self.cout + co) * oh + y * k + ky) * ow),
                                ow,
                            )
                        };
                        let t: Vec<&[f32]> = planes.chunks_exact(n).map(|p| &p[(y - y0) * w..][..w]).collect();
                        merge_row(&t, bias, row);
                    }
                }
            }
        });
    }
}

impl Patch for PatchConvTranspose {
    const NAME: &'static str = "patch conv transpose";
    const INTO: &'static str = "codiff-patch-conv-transpose-into";

    fn channels(&self) -> (usize, usize) {
        (self.cin, self.cout)
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (h * self.k, w * self.k)
    }

    fn run_into(&self, x: &[f32], b: usize, h: usize, w: usize, out: &mut [f32]) {
        let _counted = super::counted(super::OpKind::Conv, 2 * self.cin * b * self.cout * h * self.k * w * self.k);
        self.run_bands(x, b, h, w, out)
    }
}

impl CustomOp1 for PatchConvTranspose {
    fn name(&self) -> &'static str {
        "codiff-patch-conv-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fresh(self, s, l)
    }
}

/// What [`PatchConv`] and [`PatchConvTranspose`] share: an input `[b, cin,
/// h, w]` checked against the weights, an output `[b, cout, ..]` of
/// [`Patch::out_hw`], computed into a buffer, so that one fresh-output path
/// ([`fresh`]) and one in-place op ([`PatchInto`]) serve both.
pub trait Patch {
    /// the layer in error messages
    const NAME: &'static str;
    /// the name of its [`PatchInto`] op
    const INTO: &'static str;
    /// (cin, cout)
    fn channels(&self) -> (usize, usize);
    /// The output's height and width for an input `h` x `w`.
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize);
    /// The output of `x` `[b, cin, h, w]` into `out` (its whole shape),
    /// counting its work ([`super::counted`]).
    fn run_into(&self, x: &[f32], b: usize, h: usize, w: usize, out: &mut [f32]);
}

/// `(b, h, w)` of `op`'s input layout, its channels checked, and the output shape.
fn shapes<P: Patch>(op: &P, l: &Layout) -> candle_core::Result<((usize, usize, usize), Shape)> {
    let (b, c, h, w) = l.shape().dims4()?;
    let (cin, cout) = op.channels();
    if c != cin {
        candle_core::bail!("{}: {c} input channels, weight expects {cin}", P::NAME);
    }
    let (oh, ow) = op.out_hw(h, w);
    Ok(((b, h, w), Shape::from((b, cout, oh, ow))))
}

/// `op` on a CPU tensor into a fresh buffer.
fn fresh<P: Patch>(op: &P, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous(s, l, P::NAME)?;
    let ((b, h, w), shape) = shapes(op, l)?;
    let mut out = activation(shape.elem_count());
    op.run_into(x, b, h, w, &mut out);
    Ok((CpuStorage::F32(out), shape))
}

/// A [`Patch`] layer into an existing buffer of the output's shape, owned by
/// the caller alone (`dst.inplace_op2(&x, &PatchInto(&op))`): the CaVE
/// encoder's downsampling and its decoder's upsampling write into dead
/// activations of their level instead of fresh ones.
pub struct PatchInto<'a, P>(pub &'a P);

impl<P: Patch> InplaceOp2 for PatchInto<'_, P> {
    fn name(&self) -> &'static str {
        P::INTO
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let x = contiguous(s2, l2, P::NAME)?;
        let ((b, h, w), shape) = shapes(self.0, l2)?;
        if l1.shape() != &shape {
            candle_core::bail!("{} into a {:?} tensor, output {:?}", P::NAME, l1.shape(), shape);
        }
        let dst = contiguous_mut(s1, l1, P::NAME)?;
        self.0.run_into(x, b, h, w, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_err;
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn patch_conv_matches_candle() {
        let dev = Device::Cpu;
        // k = 2 and 4 (vectorised row splits) and 3 (the general one)
        for (k, h, w) in [(2, 8, 6), (4, 16, 12), (4, 9, 13), (3, 9, 14)] {
            let x = Tensor::randn(0f32, 1., (2, 5, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (7, 5, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 7, &dev).unwrap();
            let reference =
                x.conv2d(&wt, 0, k, 1, 1).unwrap().broadcast_add(&b.reshape((1, 7, 1, 1)).unwrap()).unwrap();
            let op = PatchConv::from_tensors(&wt, &b).unwrap();
            let ours = x.apply_op1(op.clone()).unwrap();
            assert!(max_err(&ours, &reference) < 1e-4);
            // into a buffer of the output's shape, whatever it held
            let dst = Tensor::full(7f32, (2, 7, h / k, w / k), &dev).unwrap();
            dst.inplace_op2(&x, &PatchInto(&op)).unwrap();
            assert_eq!(max_err(&dst, &ours), 0.0);
            let wrong = Tensor::zeros((2, 7, h / k + 1, w / k), candle_core::DType::F32, &dev).unwrap();
            assert!(wrong.inplace_op2(&x, &PatchInto(&op)).is_err());
        }
    }

    #[test]
    fn patch_conv_transpose_matches_candle() {
        let dev = Device::Cpu;
        // one band per input row and several rows per band
        for (k, h, w) in [(2, 3, 5), (4, 2, 3), (2, 37, 29), (3, 4, 5)] {
            let x = Tensor::randn(0f32, 1., (2, 6, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (6, 4, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
            let reference =
                x.conv_transpose2d(&wt, 0, 0, k, 1).unwrap().broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap();
            let op = PatchConvTranspose::from_tensors(&wt, &b).unwrap();
            let ours = x.apply_op1(op.clone()).unwrap();
            assert!(max_err(&ours, &reference) < 1e-4);
            // into a buffer of the output's shape, whatever it held
            let dst = Tensor::full(7f32, (2, 4, h * k, w * k), &dev).unwrap();
            dst.inplace_op2(&x, &PatchInto(&op)).unwrap();
            assert!(max_err(&dst, &reference) < 1e-4);
            let wrong = Tensor::zeros((2, 4, h * k, w * k + 1), candle_core::DType::F32, &dev).unwrap();
            assert!(wrong.inplace_op2(&x, &PatchInto(&op)).is_err());
        }
    }
}
