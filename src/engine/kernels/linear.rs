//! [`LinearOp`]: `y = x Wᵀ + b` on the strided GEMM in the layer's [`Math`],
//! blocks of rows in parallel.
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{activation, contiguous, gemm_strided, par_row_blocks, weight_values, Mat, Math, SendPtr};

/// A linear layer over the last dimension of a contiguous f32 CPU tensor.
#[derive(Clone, Debug)]
pub struct LinearOp {
    /// `[cout, cin]`, contiguous f32 on the CPU (shares the loaded tensor)
    weight: Tensor,
    bias: Option<Vec<f32>>,
    cin: usize,
    cout: usize,
    math: Math,
    /// Wᵀ packed for the bf16 kernel (bf16 math on an AVX512_BF16 CPU)
    packed: Option<std::sync::Arc<super::bf16::Packed>>,
}

impl LinearOp {
    /// `w` `[cout, cin]`, `b` `[cout]`, products in `math`.
    pub fn new(w: &Tensor, b: Option<&Tensor>, math: Math) -> candle_core::Result<Self> {
        let (cout, cin) = w.dims2()?;
        let weight = w.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.contiguous()?;
        let bias = b.map(|b| b.to_dtype(candle_core::DType::F32)?.to_vec1()).transpose()?;
        let packed = match math {
            // Wᵀ as B: [cin x cout], row stride 1, column stride cin
            Math::Bf16 => super::bf16::Packed::rhs(&weight.flatten_all()?.to_vec1::<f32>()?, cin, cout, 1, cin)
                .map(std::sync::Arc::new),
            Math::F32 => None,
        };
        Ok(Self { weight, bias, cin, cout, math, packed })
    }

    /// The arithmetic of its products.
    pub fn math(&self) -> Math {
        self.math
    }
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "codiff-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "linear")?;
        let dims = l.shape().dims();
        let (cin, cout) = (self.cin, self.cout);
        if dims.last() != Some(&cin) {
            candle_core::bail!("linear: input {dims:?}, weight expects {cin} features");
        }
        let rows = x.len() / cin.max(1);
        let (storage, layout) = self.weight.storage_and_layout();
        let w = &weight_values(&storage, layout, "linear")?[..cout * cin];
        let mut out = activation(rows * cout);
        let out_ptr = SendPtr(out.as_mut_ptr());
        par_row_blocks(rows, |r0, m| {
            let out_ptr = out_ptr;
            // SAFETY: rows r0..r0 + m of x ([rows x cin]) and of out ([rows x
            // cout], which outlives this blocking loop and whose row blocks
            // par_row_blocks hands out disjointly); Wᵀ read as a [cin x cout]
            // matrix with row stride 1 and column stride cin inside w
            unsafe {
                let dst = out_ptr.0.add(r0 * cout);
                let xr = x.as_ptr().add(r0 * cin);
                match &self.packed {
                    Some(p) => super::bf16::gemm_packed_rhs(m, Mat::new(dst, cout, 1), Mat::new(xr, cin, 1), p),
                    None => gemm_strided(self.math, m, cout, cin, false, dst, cout, 1, xr, cin, 1, w.as_ptr(), 1, cin),
                }
                if let Some(b) = &self.bias {
                    for r in 0..m {
                        std::slice::from_raw_parts_mut(dst.add(r * cout), cout)
                            .iter_mut()
                            .zip(b)
                            .for_each(|(y, b)| *y += b);
                    }
                }
            }
        });
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = cout;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn linear_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 37, 70), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (45, 70), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 45, &dev).unwrap();
        let reference = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
        let ours = x.apply_op1_no_bwd(&LinearOp::new(&w, Some(&b), Math::F32).unwrap()).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        assert!(super::super::tests::max_err(&ours, &reference) < 1e-4);
        // bf16 operands: relative error of a few 2^-9 per term, sums of 70
        let bf = x.apply_op1_no_bwd(&LinearOp::new(&w, Some(&b), Math::Bf16).unwrap()).unwrap();
        let err = super::super::tests::max_err(&bf, &reference);
        assert!(err > 0.0 && err < 0.25, "{err}");
    }
}
