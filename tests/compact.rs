//! Our compact-model format (safetensors, official CaVE key names, trained by
//! `examples/train_cave.py` in PyTorch) gives the same numbers in the Rust
//! engine as in PyTorch: `tests/fixtures/compact/` holds a small model and the
//! PyTorch outputs for one JPEG-decoded input (`examples/export_reference.py`).
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gstcodiff::engine::{Engine, Mode, ModelSpec};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compact")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn compact_model_matches_pytorch() {
    let r = candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap();
    let spec = ModelSpec { mode: Mode::Cave, weights: dir().join("model.safetensors"), ..ModelSpec::compact_default() };
    let engine = Engine::load(&spec, &mut |_| {}).unwrap();
    assert_eq!(engine.cave().config.nc, [4, 8, 12, 16]);
    let x = &r["lq_raw"];
    let (tokens, q) = engine.cave().embed(x).unwrap();
    let (rec, q2) = engine.cave().reconstruct(x).unwrap();
    for (name, ours) in [("cave_embedding", tokens), ("qf_pred", q), ("cave_reconstruction", rec), ("cave_reconstruction_qf", q2)] {
        let err = max_abs(&ours, &r[name]);
        eprintln!("{name}: {err:.2e}");
        assert!(err <= 1e-4, "{name}: max abs error {err}");
    }
}
