//! Flash-style multi-head attention ([`AttentionOp`]).
use candle_core::{CpuStorage, Layout, Shape};
use rayon::prelude::*;

use super::{activation, avx2_available, contiguous, fast_exp, gemm_strided, lane_sum, Math, SendPtr};

/// Multi-head scaled dot-product attention on `q` `[B, N, H*D]`, `k`, `v`
/// `[B, M, H*D]` (heads interleaved as the projections produce them), output
/// `[B, N, H*D]`. Flash-style: blocks of query rows meet blocks of keys with
/// an online softmax, so the largest temporary is one `rows x keys` tile per
/// thread, never the `N x M` score matrix.
#[derive(Clone, Debug)]
pub struct AttentionOp {
    pub heads: usize,
    pub scale: f32,
    /// the arithmetic of both products (scores and the weighted values)
    pub math: Math,
}

const ATTN_ROWS: usize = 128;
const ATTN_KEYS: usize = 512;

avx2_fn! {
    fn row_max(row: &[f32]) -> f32 {
        let mut mx = [f32::NEG_INFINITY; 16];
        let mut chunks = row.chunks_exact(16);
        for ch in &mut chunks {
            for (m, &x) in mx.iter_mut().zip(ch) {
                *m = m.max(x);
            }
        }
        chunks.remainder().iter().chain(&mx).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
}

avx2_fn! {
    /// `row[i] = exp(scale * row[i] - shift)` in place; returns the sum.
    fn exp_shifted(row: &mut [f32], scale: f32, shift: f32) -> f32 {
        row.iter_mut().for_each(|x| *x = fast_exp(*x * scale - shift));
        lane_sum(row, |x| x)
    }
}

impl candle_core::CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "codiff-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous(sq, lq, "attention q")?;
        let k = contiguous(sk, lk, "attention k")?;
        let v = contiguous(sv, lv, "attention v")?;
        let (b, n, c) = lq.shape().dims3()?;
        let (bk, m, ck) = lk.shape().dims3()?;
        if lv.shape() != lk.shape() || bk != b || ck != c || c % self.heads != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}, {} heads",
                lq.shape(),
                lk.shape(),
                lv.shape(),
                self.heads
            );
        }
        let d = c / self.heads;
        // Q K^T and the weighted sum of V: 2 n m d multiply-adds a head
        let _counted = super::counted(super::OpKind::Attention, 4 * b * self.heads * n * m * d);
        // per (batch, head): K^T as [d x m] and V as [m x d], contiguous, so the
        // GEMMs read unit-stride panels however many query blocks reuse them
        let bh = b * self.heads;
        let mut kt = vec![0f32; bh * d * m];
        let mut vh = vec![0f32; bh * m * d];
        kt.par_chunks_mut(d * m).zip(vh.par_chunks_mut(m * d)).enumerate().for_each(|(i, (ktc, vc))| {
            let (bi, h) = (i / self.heads, i % self.heads);
            for j in 0..m {
                let src = bi * m * c + j * c + h * d;
                vc[j * d..(j + 1) * d].copy_from_slice(&v[src..src + d]);
                for dd in 0..d {
                    ktc[dd * m + j] = k[src + dd];
                }
            }
        });
        let mut out = activation(b * n * c);
        let optr = SendPtr(out.as_mut_ptr());
        let tasks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|bi| (0..self.heads).flat_map(move |h| (0..n).step_by(ATTN_ROWS).map(move |r0| (bi, h, r0))))
            .collect();
        tasks.par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(scores, acc, mx, sum): &mut (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>), &(bi, h, r0)| {
                let optr = optr;
                let rows = ATTN_ROWS.min(n - r0);
                let head = bi * self.heads + h;
                let (ktp, vp) = (kt[head * d * m..].as_ptr(), vh[head * m * d..].as_ptr());
                // SAFETY: bi < b, r0 < n and h d < c, so the offset lies inside
                // q's b * n * c values (shape read from its layout)
                let qp = unsafe { q.as_ptr().add(bi * n * c + r0 * c + h * d) };
                acc.clear();
                acc.resize(rows * d, 0.0);
                mx.clear();
                mx.resize(rows, f32::NEG_INFINITY);
                sum.clear();
                sum.resize(rows, 0.0);
                // online softmax over key blocks: the running max, sum and
                // output of each query row are rescaled as new keys arrive
                for j0 in (0..m).step_by(ATTN_KEYS) {
                    let kb = ATTN_KEYS.min(m - j0);
                    // the product overwrites every score: no clearing (which
                    // wrote 1.6 GB a frame in SD's UNet at 512x512)
                    scores.truncate(rows * kb);
                    scores.resize(rows * kb, 0.0);
                    // SAFETY: scores was resized to rows * kb; the Q block's
                    // rows r0..r0 + rows (stride c) and K^T's columns
                    // j0..j0 + kb of this head's [d x m] lie inside q and kt
                    unsafe {
                        // scores[rows x kb] = Q[rows x d] K^T[d x kb]
                        gemm_strided(
                            self.math,
                            rows,
                            kb,
                            d,
                            false,
                            scores.as_mut_ptr(),
                            kb,
                            1,
                            qp,
                            c,
                            1,
                            ktp.add(j0),
                            m,
                            1,
                        );
                    }
                    for (r, row) in scores.chunks_mut(kb).enumerate() {
                        let new_max = mx[r].max(row_max(row) * self.scale);
                        let alpha = fast_exp(mx[r] - new_max);
                        mx[r] = new_max;
                        let s = exp_shifted(row, self.scale, new_max);
                        sum[r] = sum[r] * alpha + s;
                        if alpha != 1.0 {
                            acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
                        }
                    }
                    // SAFETY: acc holds rows * d values, scores rows * kb; V's
                    // rows j0..j0 + kb of this head's [m x d] lie inside vh
                    unsafe {
                        // acc[rows x d] += P[rows x kb] V[kb x d]
                        gemm_strided(
                            self.math,
                            rows,
                            d,
                            kb,
                            true,
                            acc.as_mut_ptr(),
                            d,
                            1,
                            scores.as_ptr(),
                            kb,
                            1,
                            vp.add(j0 * d),
                            d,
                            1,
                        );
                    }
                }
                for r in 0..rows {
                    let inv = 1.0 / sum[r];
                    // SAFETY: `out` holds b * n * c values and outlives this
                    // blocking loop; task (bi, h, r0) alone writes columns
                    // h d..(h + 1) d of rows r0..r0 + rows of image bi
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(optr.0.add(bi * n * c + (r0 + r) * c + h * d), d) };
                    dst.iter_mut().zip(&acc[r * d..(r + 1) * d]).for_each(|(o, a)| *o = a * inv);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_err;
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn attention_matches_candle() {
        let dev = Device::Cpu;
        // multi-head self-attention with more rows than one block, and cross-attention
        for (heads, d, n, m) in [(3, 8, 150, 150), (2, 16, 70, 7), (1, 32, 5, 200), (2, 8, 300, 1100)] {
            let c = heads * d;
            let q = Tensor::randn(0f32, 1., (2, n, c), &dev).unwrap();
            let k = Tensor::randn(0f32, 1., (2, m, c), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (2, m, c), &dev).unwrap();
            let split = |t: &Tensor, len: usize| {
                t.reshape((2, len, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
            };
            let scale = 1.0 / (d as f64).sqrt();
            let scores = split(&q, n).matmul(&split(&k, m).t().unwrap()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&(scores * scale).unwrap()).unwrap();
            let reference = p.matmul(&split(&v, m)).unwrap().transpose(1, 2).unwrap().reshape((2, n, c)).unwrap();
            let ours =
                q.apply_op3_no_bwd(&k, &v, &AttentionOp { heads, scale: scale as f32, math: Math::F32 }).unwrap();
            assert!(max_err(&ours, &reference) < 1e-4);
        }
    }
}
