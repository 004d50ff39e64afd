//! Flash-style multi-head attention ([`AttentionOp`]).
use candle_core::{CpuStorage, Layout, Shape};
use rayon::prelude::*;

use super::{activation, contiguous, fast_exp, gemm_strided, lane_sum, Math, SendPtr};

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

simd_fn! {
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

simd_fn! {
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
        #[cfg(target_arch = "x86_64")]
        if self.math == Math::Bf16 && super::bf16::native() {
            let mut out = activation(b * n * c);
            // SAFETY: native() found AVX-512F and AVX512_BF16; q, k, v and out
            // hold b n c, b m c, b m c and b n c values (shapes checked above)
            unsafe { avx512::attend(self, q, k, v, (b, n, m, c), &mut out) };
            return Ok((CpuStorage::F32(out), Shape::from((b, n, c))));
        }
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

/// The bf16 path on AVX512_BF16: per block of query rows and of keys,
/// `Sᵀ = K Qᵀ` (keys by query rows, so that each query row's softmax runs down
/// a column: its max, exponentials and sum vectorise over the rows with no
/// horizontal reductions), then the exponentials, rounded to bf16, are
/// written straight into the packed A operand of `P V`; no transposed copy
/// of K or V is made.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::bf16::{first_lanes as lanes, gemm_operands, pair16, Operand, Packed, MR};
    use super::super::{Mat, SendPtr};
    use super::{AttentionOp, ATTN_KEYS, ATTN_ROWS};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// A thread's buffers, kept from task to task.
    #[derive(Default)]
    struct Scratch {
        /// Sᵀ of one block, `[keys][rows]`
        st: Vec<f32>,
        /// the running output, `[rows][d]`
        acc: Vec<f32>,
        /// per query row: the running max (of the scaled scores) and sum
        mx: Vec<f32>,
        sum: Vec<f32>,
        /// the packed P's words
        words: Vec<u32>,
    }

    /// `exp(x)` of 16 lanes as [`super::super::fast_exp`] (same range
    /// reduction and polynomial, in FMAs; 2^n by `vscalefps`).
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }

    /// The whole op: `out` `[b, n, c]` from q `[b, n, c]`, k and v `[b, m, c]`.
    ///
    /// # Safety
    /// AVX-512F and AVX512_BF16 are present; the slices hold those shapes.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn attend(
        op: &AttentionOp,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, n, m, c): (usize, usize, usize, usize),
        out: &mut [f32],
    ) {
        let d = c / op.heads;
        // each key block of each head's K (the A of Sᵀ) and V (the B of
        // P V), packed once for all the query blocks that meet it
        let blocks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|bi| (0..op.heads).flat_map(move |h| (0..m).step_by(ATTN_KEYS).map(move |j0| (bi, h, j0))))
            .collect();
        let packed: Vec<(Packed, Packed)> = blocks
            .par_iter()
            .map(|&(bi, h, j0)| {
                let kb = ATTN_KEYS.min(m - j0);
                let at = (bi * m + j0) * c + h * d;
                let kp = Packed::lhs(&k[at..], kb, d, c, 1).expect("native bf16");
                let vp = Packed::rhs(&v[at..], kb, d, c, 1).expect("native bf16");
                (kp, vp)
            })
            .collect();
        let per_head = m.div_ceil(ATTN_KEYS);
        let optr = SendPtr(out.as_mut_ptr());
        let tasks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|bi| (0..op.heads).flat_map(move |h| (0..n).step_by(ATTN_ROWS).map(move |r0| (bi, h, r0))))
            .collect();
        tasks.par_iter().for_each_init(Scratch::default, |s, &(bi, h, r0)| {
            let optr = optr;
            let rows = ATTN_ROWS.min(n - r0);
            let head = &packed[(bi * op.heads + h) * per_head..][..per_head];
            // SAFETY: the caller's contract; bi < b, r0 + rows <= n, h d + d <= c;
            // task (bi, h, r0) alone writes its rows' columns h d .. (h + 1) d
            unsafe {
                let qp = q.as_ptr().add((bi * n + r0) * c + h * d);
                task(op.scale, rows, m, c, d, qp, head, optr.0.add((bi * n + r0) * c + h * d), s)
            }
        });
    }

    /// One block of `rows` query rows of one head against all `m` keys,
    /// whose blocks of [`ATTN_KEYS`] are `kv` (K and V packed).
    ///
    /// # Safety
    /// As [`attend`]; `q` holds `rows` rows of stride c, d values each; `o`
    /// likewise.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn task(
        scale: f32,
        rows: usize,
        m: usize,
        c: usize,
        d: usize,
        q: *const f32,
        kv: &[(Packed, Packed)],
        o: *mut f32,
        s: &mut Scratch,
    ) {
        s.acc.clear();
        s.acc.resize(rows * d, 0.0);
        s.mx.clear();
        s.mx.resize(rows, f32::NEG_INFINITY);
        s.sum.clear();
        s.sum.resize(rows, 0.0);
        crate::engine::kernels::grow(&mut s.st, ATTN_KEYS * rows);
        for (j0, (kp, vp)) in (0..m).step_by(ATTN_KEYS).zip(kv) {
            let kb = ATTN_KEYS.min(m - j0);
            let st = s.st.as_mut_ptr();
            // Sᵀ[kb x rows] = K[j0..][kb x d] Q[rows x d]ᵀ
            gemm_operands(
                kb,
                rows,
                d,
                false,
                Mat::new(st, rows, 1),
                Operand::Packed(kp, 0),
                Operand::Strided(Mat::new(q, 1, c)),
            );
            // each row's new max (scale > 0: the max of the scaled scores),
            // the factor its running sum and output are rescaled by
            for r0 in (0..rows).step_by(16) {
                let mk = lanes(rows - r0);
                let mut cm = _mm512_set1_ps(f32::NEG_INFINITY);
                for j in 0..kb {
                    cm = _mm512_max_ps(cm, _mm512_maskz_loadu_ps(mk, st.add(j * rows + r0)));
                }
                let old = _mm512_maskz_loadu_ps(mk, s.mx.as_ptr().add(r0));
                let new = _mm512_max_ps(old, _mm512_mul_ps(cm, _mm512_set1_ps(scale)));
                let alpha = exp16(_mm512_sub_ps(old, new));
                _mm512_mask_storeu_ps(s.mx.as_mut_ptr().add(r0), mk, new);
                let sum = _mm512_maskz_loadu_ps(mk, s.sum.as_ptr().add(r0));
                _mm512_mask_storeu_ps(s.sum.as_mut_ptr().add(r0), mk, _mm512_mul_ps(sum, alpha));
                let mut al = [0f32; 16];
                _mm512_storeu_ps(al.as_mut_ptr(), alpha);
                for (i, &a) in al.iter().enumerate().take(rows - r0) {
                    if a != 1.0 {
                        s.acc[(r0 + i) * d..(r0 + i + 1) * d].iter_mut().for_each(|x| *x *= a);
                    }
                }
            }
            // P = exp(scale Sᵀ - max), rounded to bf16 pairs along the keys
            // straight into the packed A of P V: 16 rows at a time, whose
            // words fall in two panels of MR (16 = MR + 4, and a chunk starts
            // 0, 4 or 8 words into its first panel)
            let mut pk = Packed::lhs_to_fill(rows, kb, std::mem::take(&mut s.words));
            let sc = _mm512_set1_ps(scale);
            let words = pk.words_mut().as_mut_ptr();
            for p in 0..kb.div_ceil(2) {
                let s0 = st.add(2 * p * rows);
                let has_hi = 2 * p + 1 < kb;
                for r in (0..rows).step_by(16) {
                    let mk = lanes(rows - r);
                    let mx = _mm512_maskz_loadu_ps(mk, s.mx.as_ptr().add(r));
                    let e0 = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, s0.add(r)), sc, mx));
                    let e1 = if has_hi {
                        exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, s0.add(rows + r)), sc, mx))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let (e0, e1) = (_mm512_maskz_mov_ps(mk, e0), _mm512_maskz_mov_ps(mk, e1));
                    let sum = _mm512_maskz_loadu_ps(mk, s.sum.as_ptr().add(r));
                    _mm512_mask_storeu_ps(s.sum.as_mut_ptr().add(r), mk, _mm512_add_ps(sum, _mm512_add_ps(e0, e1)));
                    let w = pair16(e0, e1);
                    let (i, l) = (r / MR, r % MR);
                    // lanes 0 .. MR - l to panel i from word l, the rest
                    // to panel i + 1 from word 0 (each address minus the
                    // lane index it stores first)
                    let first = lanes(MR - l) & mk;
                    let at = words.add(pk.lhs_pair_offset(i, p) + l);
                    _mm512_mask_storeu_epi32(at as *mut _, first, w);
                    let rest = mk & !first;
                    if rest != 0 {
                        let at = words.add(pk.lhs_pair_offset(i + 1, p)).wrapping_sub(MR - l);
                        _mm512_mask_storeu_epi32(at as *mut _, rest, w);
                    }
                }
            }
            // acc[rows x d] += P[rows x kb] V[j0..][kb x d]
            gemm_operands(
                rows,
                d,
                kb,
                true,
                Mat::new(s.acc.as_mut_ptr(), d, 1),
                Operand::Packed(&pk, 0),
                Operand::Packed(vp, 0),
            );
            s.words = pk.into_words();
        }
        for r in 0..rows {
            let inv = 1.0 / s.sum[r];
            let dst = std::slice::from_raw_parts_mut(o.add(r * c), d);
            dst.iter_mut().zip(&s.acc[r * d..(r + 1) * d]).for_each(|(y, a)| *y = a * inv);
        }
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
            // bf16 operands (scores, weights and values rounded to 8 bits of
            // mantissa; on AVX512_BF16 the Kᵀ-first path with fused softmax)
            let bf = q.apply_op3_no_bwd(&k, &v, &AttentionOp { heads, scale: scale as f32, math: Math::Bf16 }).unwrap();
            let err = max_err(&bf, &reference);
            assert!(err > 0.0 && err < 0.05, "bf16 {heads}x{d}, {n}x{m}: {err}");
        }
    }
}
