//! Broken weight files give clear, typed errors naming the file, key and shape.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use gstcodiff::engine::{DeviceSpec, Engine, EngineError, Mode, ModelSpec, Precision};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codiff-tiny-a")
}

/// A writable copy of the fixture model in a fresh temp dir.
fn copy_fixture(tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("codiff-err-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    for sub in ["", "unet", "vae", "scheduler"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
    }
    for f in [
        "cave.pth",
        "codiff.pkl",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::copy(fixture().join(f), dst.join(f)).unwrap();
    }
    dst
}

fn spec(dir: &Path) -> ModelSpec {
    ModelSpec {
        mode: Mode::Diffusion,
        weights: dir.join("cave.pth"),
        sd_dir: Some(dir.to_path_buf()),
        codiff: Some(dir.join("codiff.pkl")),
        cave: Some(dir.join("cave.pth")),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
    }
}

fn load_err(dir: &Path) -> EngineError {
    match Engine::load(&spec(dir), &mut |_| {}) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn rewrite_safetensors(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, path).unwrap();
}

#[test]
fn truncated_unet_names_the_file() {
    let d = copy_fixture("trunc");
    let p = d.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("unet/diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn missing_vae_tensor_names_file_and_key() {
    let d = copy_fixture("drop");
    let p = d.join("vae/diffusion_pytorch_model.safetensors");
    rewrite_safetensors(&p, |t| {
        t.remove("decoder.conv_out.weight").unwrap();
    });
    let e = load_err(&d);
    match &e {
        EngineError::MissingTensor { path, key } => {
            assert!(path.ends_with("vae/diffusion_pytorch_model.safetensors"));
            assert_eq!(key, "decoder.conv_out.weight");
        }
        _ => panic!("expected MissingTensor, got {e}"),
    }
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let d = copy_fixture("shape");
    let p = d.join("unet/diffusion_pytorch_model.safetensors");
    rewrite_safetensors(&p, |t| {
        t.insert("conv_out.bias".into(), Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_err(&d);
    match &e {
        EngineError::ShapeMismatch { key, expected, found, .. } => {
            assert_eq!(key, "conv_out.bias");
            assert_eq!(expected, &vec![4]);
            assert_eq!(found, &vec![5]);
        }
        _ => panic!("expected ShapeMismatch, got {e}"),
    }
}

#[test]
fn truncated_codiff_pkl_is_reported() {
    let d = copy_fixture("pkl");
    let p = d.join("codiff.pkl");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 4096]).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Truncated { .. } | EngineError::Format { .. }), "{e}");
    assert!(e.to_string().contains("codiff.pkl"), "{e}");
}

#[test]
fn truncated_cave_pth_is_reported() {
    let d = copy_fixture("cave");
    let p = d.join("cave.pth");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("cave.pth"), "{e}");
}

#[test]
fn wrong_format_is_reported() {
    let d = copy_fixture("fmt");
    std::fs::write(d.join("cave.pth"), b"this is not a model").unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Format { .. } | EngineError::Truncated { .. }), "{e}");
}

#[test]
fn missing_file_is_not_found() {
    let d = copy_fixture("missing");
    std::fs::remove_file(d.join("codiff.pkl")).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("codiff.pkl"), "{e}");
}

#[test]
fn cave_shape_change_names_key() {
    let d = copy_fixture("caveshape");
    // a CaVE whose tail is too narrow, saved as safetensors
    let f = gstcodiff::engine::weights::TensorFile::open(&d.join("cave.pth")).unwrap();
    let mut t: HashMap<String, Tensor> = f.keys().map(|k| (k.clone(), f.get(k).unwrap().clone())).collect();
    t.insert("m_tail.weight".into(), Tensor::zeros((3, 4, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
    let p = d.join("cave.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = match Engine::load(&ModelSpec { mode: Mode::Cave, cave: Some(p), ..spec(&d) }, &mut |_| {}) {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    };
    match &e {
        EngineError::ShapeMismatch { key, expected, found, .. } => {
            assert_eq!(key, "m_tail.weight");
            assert_eq!(expected, &vec![3, 8, 3, 3]);
            assert_eq!(found, &vec![3, 4, 3, 3]);
        }
        _ => panic!("expected ShapeMismatch, got {e}"),
    }
}
