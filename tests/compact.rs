//! Our compact-model format (safetensors, official CaVE key names, trained by
//! `examples/train_cave.py` in PyTorch) gives the same numbers in the Rust
//! engine as in PyTorch: `tests/fixtures/compact/` holds a small model and the
//! PyTorch outputs for one JPEG-decoded input (`examples/export_reference.py`).
use std::path::PathBuf;

use candle_core::Device;
use gstcodiff::engine::{Engine, Mode, ModelSpec, RestoreOptions, RgbImage};
use image::GenericImageView;

use codiff_testkit::metrics;
use codiff_testkit::tensors::max_abs_diff;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compact")
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
    for (name, ours) in
        [("cave_embedding", tokens), ("qf_pred", q), ("cave_reconstruction", rec), ("cave_reconstruction_qf", q2)]
    {
        let err = max_abs_diff(&ours, &r[name]);
        eprintln!("{name}: {err:.2e}");
        assert!(err <= 1e-4, "{name}: max abs error {err}");
    }
}

/// A quality-conditioned model (`tests/fixtures/compact-cond/`: random
/// conditioning heads, so gamma and beta differ per channel and quality)
/// restores as PyTorch does for a given quality and for its own estimate.
#[test]
fn conditioned_model_matches_pytorch() {
    let d = dir().with_file_name("compact-cond");
    let r = candle_core::safetensors::load(d.join("reference.safetensors"), &Device::Cpu).unwrap();
    let spec = ModelSpec { mode: Mode::Cave, weights: d.join("model.safetensors"), ..ModelSpec::compact_default() };
    let engine = Engine::load(&spec, &mut |_| {}).unwrap();
    let cave = engine.cave();
    assert!(cave.conditioned());
    let x = &r["lq_raw"];
    let cancel = gstcodiff::engine::Cancel::new();
    for (name, quality) in [
        ("cave_reconstruction", None),
        ("cave_reconstruction_q20", Some(20.0)),
        ("cave_reconstruction_q70", Some(70.0)),
    ] {
        let (rec, q) = cave.reconstruct_tiled(x, 0, &cancel, quality).unwrap();
        let err = max_abs_diff(&rec, &r[name]);
        eprintln!("{name}: {err:.2e}");
        assert!(err <= 1e-4, "{name}: max abs error {err}");
        assert!(max_abs_diff(&q, &r["cave_reconstruction_qf"]) <= 1e-5, "q does not depend on the quality");
    }
    // the qualities matter far beyond the tolerance
    assert!(max_abs_diff(&r["cave_reconstruction_q20"], &r["cave_reconstruction_q70"]) > 1e-2);

    // RestoreOptions::quality reaches the model; None is the estimate path,
    // which equals naming the estimate
    let png = image::open(d.join("input.png")).unwrap().to_rgb8();
    let img = RgbImage { width: png.width() as usize, height: png.height() as usize, data: png.into_raw() };
    let restored = |quality| {
        let mut out = img.clone();
        let qf = engine.restore(&mut out, &RestoreOptions { quality, ..Default::default() }).unwrap();
        (out, qf)
    };
    let (own, estimate) = restored(None);
    assert_eq!(restored(Some(estimate)).0.data, own.data);
    assert_ne!(restored(Some(20.0)).0.data, restored(Some(70.0)).0.data);
    // an unconditioned model ignores it
    let spec = ModelSpec { mode: Mode::Cave, weights: dir().join("model.safetensors"), ..ModelSpec::compact_default() };
    let plain = Engine::load(&spec, &mut |_| {}).unwrap();
    assert!(!plain.cave().conditioned());
    let mut a = img.clone();
    let mut b = img.clone();
    plain.restore(&mut a, &RestoreOptions { quality: Some(20.0), ..Default::default() }).unwrap();
    plain.restore(&mut b, &RestoreOptions::default()).unwrap();
    assert_eq!(a.data, b.data);
}

/// `img` flipped left-right, or transposed.
fn transformed(img: &RgbImage, transpose: bool) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let (ow, oh) = if transpose { (h, w) } else { (w, h) };
    let mut data = vec![0u8; w * h * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = if transpose { (y, x) } else { (w - 1 - x, y) };
            data[(y * ow + x) * 3..][..3].copy_from_slice(&img.data[(sy * w + sx) * 3..][..3]);
        }
    }
    RgbImage { width: ow, height: oh, data }
}

#[test]
fn self_ensemble_is_equivariant_and_changes_the_output() {
    let spec = ModelSpec { mode: Mode::Cave, weights: dir().join("model.safetensors"), ..ModelSpec::compact_default() };
    let engine = Engine::load(&spec, &mut |_| {}).unwrap();
    // the model's own behaviour: no guard (the test card is no JPEG, which
    // the guard would leave alone)
    let ens = RestoreOptions { self_ensemble: true, guard: false, ..Default::default() };
    // an asymmetric test card with 8x8 blocks of texture, 48x32 (on the 16 px grid)
    let (w, h) = (48, 32);
    let data = (0..w * h * 3).map(|i| ((i * 37 + (i / (3 * w)) * 11 + (i % 7) * 29) % 256) as u8).collect();
    let img = RgbImage { width: w, height: h, data };
    let mut plain = img.clone();
    engine.restore(&mut plain, &RestoreOptions { guard: false, ..Default::default() }).unwrap();
    let mut a = img.clone();
    engine.restore(&mut a, &ens).unwrap();
    assert_ne!(a.data, plain.data, "the ensemble must differ from one pass");
    // the average over all eight transforms commutes with each of them: the
    // same members, summed in another order
    for transpose in [false, true] {
        let mut b = transformed(&img, transpose);
        engine.restore(&mut b, &ens).unwrap();
        let back = transformed(&b, transpose);
        let worst = a.data.iter().zip(&back.data).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(worst <= 1, "transpose {transpose}: ensemble of the transformed frame differs by {worst} codes");
    }
    // any size: padded to the 16 px grid and cropped back
    let mut odd = RgbImage { width: 37, height: 29, data: vec![90; 37 * 29 * 3] };
    engine.restore(&mut odd, &ens).unwrap();
    assert_eq!(odd.data.len(), 37 * 29 * 3);
}

/// The shipped default model is quality-conditioned, so the element's `qf`
/// (and the still command's `--qf`) steers it: told a lower JPEG quality it
/// deblocks harder. On the README's astronaut at QF 10 (its top-left 256x192,
/// on the JPEG grid), the restored luma's blockiness (mean squared step across
/// the 8x8 block edges minus that inside the blocks, PSNR-B's measure before
/// its clamp at 0: `block_step_excess` of testkit/src/metrics.rs) falls
/// strictly as the quality it is told falls and stays below the JPEG's (with
/// the guard on, as users run it: the quantisation intervals bound what any
/// told quality can do, and must not undo the steering), and, for the bare
/// model, no quality (its own estimate) is the same as naming the estimate.
/// With the guard, the quality reported is the one read from the tables.
#[test]
fn shipped_model_deblocks_harder_for_a_lower_quality() {
    let weights = gstcodiff::engine::default_weights_path();
    let spec = ModelSpec { mode: Mode::Cave, weights, ..ModelSpec::compact_default() };
    let engine = Engine::load(&spec, &mut |_| {}).unwrap();
    assert!(engine.cave().conditioned(), "the default model must be steerable by quality");
    let jpeg = image::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut-q10.jpg"))
        .unwrap()
        .to_rgb8();
    let (w, h) = (256, 192);
    let img = RgbImage { width: w, height: h, data: jpeg.view(0, 0, w as u32, h as u32).to_image().into_raw() };
    // PSNR-B's blockiness of the luma, unclamped (negative: edges smoother than interiors)
    let blockiness = |im: &RgbImage| {
        let y = metrics::to_y(&metrics::Image::new(w, h, 3, im.data.clone()).unwrap(), false);
        metrics::block_step_excess(&y, w, h)
    };
    let restored_with = |quality, guard| {
        let mut out = img.clone();
        let qf = engine.restore(&mut out, &RestoreOptions { quality, guard, ..Default::default() }).unwrap();
        (out, qf)
    };
    let restored = |quality| restored_with(quality, true);
    let (own, estimate) = restored_with(None, false);
    assert!((estimate - 10.0).abs() <= 3.0, "estimate {estimate} for a QF 10 JPEG");
    assert_eq!(restored_with(Some(estimate), false).0.data, own.data);
    assert_eq!(restored(None).1, 10.0, "the guard reads the quality from the tables");
    let told = [3.0, 5.0, 10.0, 20.0, 40.0, 80.0];
    let b: Vec<f64> = told.iter().map(|&q| blockiness(&restored(Some(q)).0)).collect();
    let input = blockiness(&img);
    eprintln!("blockiness: JPEG {input:.3}, told QF {told:?}: {b:.3?}");
    assert!(b.windows(2).all(|p| p[0] < p[1]), "{b:?}");
    assert!(b[told.len() - 1] < input, "{b:?} vs the JPEG {input}");
    // how much it changes the frame (mean squared change, all channels): told
    // QF 5 at least 10 % more than told QF 50 (measured: 24 % on this crop, 19 % on
    // the whole 512x384 picture)
    let change = |q: f32| {
        let out = restored(Some(q)).0;
        out.data.iter().zip(&img.data).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>()
            / img.data.len() as f64
    };
    let (hard, soft) = (change(5.0), change(50.0));
    eprintln!("mean squared change: told QF 5 {hard:.2}, told QF 50 {soft:.2}");
    assert!(hard >= 1.1 * soft, "told QF 5 changed {hard:.2}, QF 50 {soft:.2}");
}

/// `precision=bf16` on the shipped model: bf16 arithmetic in its inner
/// layers (image convolutions and QF head stay f32), the quality estimate
/// within half a step, PSNR-Y against the clean photo within 0.05 dB of f32's (the
/// eval photos: -0.0002 dB at QF 10, -0.007 dB at QF 30), and not the f32
/// output itself.
#[test]
fn shipped_model_in_bf16_keeps_the_f32_quality() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let clean = image::open(data.join("astronaut.png")).unwrap().to_rgb8();
    let jpeg = image::open(data.join("astronaut-q10.jpg")).unwrap().to_rgb8();
    let (w, h) = (jpeg.width() as usize, jpeg.height() as usize);
    let y_of = |d: Vec<u8>| metrics::to_y(&metrics::Image::new(w, h, 3, d).unwrap(), true);
    let clean_y = y_of(clean.into_raw());
    let run = |precision| {
        let spec = ModelSpec { precision, ..ModelSpec::compact_default() };
        let engine = Engine::load(&spec, &mut |_| {}).unwrap();
        let mut out = RgbImage { width: w, height: h, data: jpeg.clone().into_raw() };
        let qf = engine.restore(&mut out, &RestoreOptions { guard: false, ..Default::default() }).unwrap();
        (metrics::psnr_from_mse(metrics::mse(&clean_y, &y_of(out.data.clone()))), qf, out.data)
    };
    let (p32, q32, o32) = run(gstcodiff::engine::Precision::F32);
    let (p16, q16, o16) = run(gstcodiff::engine::Precision::Bf16);
    eprintln!("PSNR-Y f32 {p32:.4} dB, bf16 {p16:.4} dB; QF {q32} / {q16}");
    // the QF head runs in f32 on features the bf16 encoder made: 10.376 / 10.349 here
    assert!((q32 - q16).abs() <= 0.5, "quality estimate {q16} vs f32 {q32}");
    assert!((p32 - p16).abs() <= 0.05, "bf16 {p16} dB vs f32 {p32} dB");
    assert_ne!(o32, o16, "bf16 gave the f32 output: its arithmetic did not run");
}
