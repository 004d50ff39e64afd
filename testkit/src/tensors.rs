//! Comparing tensors in tests: the largest absolute value, and the largest
//! absolute difference (in f32, on the CPU, whatever the tensors' dtype and
//! device).
use candle_core::{DType, Device, Tensor};

/// The largest absolute value of `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    let t = t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The largest absolute difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let f32_cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    max_abs(&(f32_cpu(a) - f32_cpu(b)).unwrap())
}
