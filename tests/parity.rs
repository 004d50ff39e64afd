//! Parity with the official PyTorch pipeline on `tests/fixtures/codiff-tiny-a`
//! (tiny random-weight model in the official file formats; every intermediate
//! stored in `reference.safetensors`, described in `manifest.json`), and on
//! `tests/fixtures/codiff-tiny-c` (a second such model whose official run
//! tiles the latent, 16/6, and which stores the official VAEHook's tiled
//! encoder and decoder results).
//!
//! Tolerance: max abs error <= 1e-4 on float intermediates (f32), at most one
//! code value on the uint8 outputs.
//! The same fixture in f16 and bf16 on the CPU is held to tolerances derived
//! from the dtype's epsilon and each stage's depth (see "half precision" below).
//!
//! `CODIFF_TEST_DEVICE` (cpu, cuda, cuda:N; default cpu) picks the engine's
//! device; the model runs in f32 there too, against the same tolerances.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use codiff_testkit::tensors::{self, max_abs_diff};
use gstcodiff::engine::pipeline::{finish, Trace};
use gstcodiff::engine::tiling::Plan;
use gstcodiff::engine::{
    ColorFix, DeviceSpec, Engine, EngineError, Mode, ModelSpec, Precision, RestoreOptions, RgbImage,
};

const FLOAT_TOL: f32 = 1e-4;

const TINY_A: &str = "codiff-tiny-a";
const TINY_C: &str = "codiff-tiny-c";

/// The official pipeline has no guard (`engine::guard`): parity runs the bare model.
fn bare() -> RestoreOptions {
    RestoreOptions { guard: false, ..RestoreOptions::default() }
}

fn fixture(name: &str) -> PathBuf {
    // cargo sets CARGO_MANIFEST_DIR at run time too; a prebuilt binary run from
    // another checkout (build-aux/gpu-check.sh) sets it to that checkout.
    let root =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    root.join("tests/fixtures").join(name)
}

/// The reference intermediates, on the engine's device.
fn reference(name: &str, device: &Device) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), device).unwrap()
}

fn test_device() -> DeviceSpec {
    std::env::var("CODIFF_TEST_DEVICE").map_or(DeviceSpec::Cpu, |d| d.parse().expect("CODIFF_TEST_DEVICE"))
}

fn spec(name: &str) -> ModelSpec {
    let f = fixture(name);
    ModelSpec {
        mode: Mode::Diffusion,
        weights: f.join("cave.pth"),
        sd_dir: Some(f.clone()),
        codiff: Some(f.join("codiff.pkl")),
        cave: Some(f.join("cave.pth")),
        device: test_device(),
        precision: Precision::F32,
    }
}

fn input(r: &HashMap<String, Tensor>) -> RgbImage {
    let t = &r["input_u8"];
    let (h, w, _) = t.dims3().unwrap();
    RgbImage::new(w, h, t.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap()
}

fn run(engine: &Engine, r: &HashMap<String, Tensor>, opts: &RestoreOptions, fix: ColorFix) -> Trace {
    let mut img = input(r);
    let mut trace = Trace::new();
    let opts = RestoreOptions { color_fix: fix, ..opts.clone() };
    engine.restore_traced(&mut img, &opts, Some(&mut trace)).unwrap();
    trace
}

fn get<'a>(trace: &'a Trace, name: &str) -> &'a Tensor {
    &trace.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no `{name}` in trace")).1
}

/// Each stage fed the reference's own input: errors do not accumulate.
#[test]
fn each_stage_matches_on_the_reference_inputs() {
    let engine = Engine::load(&spec(TINY_A), &mut |_| {}).unwrap();
    let r = reference(TINY_A, engine.device());
    let s = engine.stages().unwrap();
    let lq = ((&r["lq_raw"] * 2.0).unwrap() - 1.0).unwrap();
    let checks = [
        ("proj_embedding", s.proj(&r["cave_embedding"]).unwrap()),
        ("lq_latent", s.encode(&lq).unwrap()),
        ("unet_eps", s.unet(&r["lq_latent"], &r["proj_embedding_f16"].to_dtype(DType::F32).unwrap()).unwrap()),
        ("denoised_latent", s.x0(&r["lq_latent"], &r["unet_eps"]).unwrap()),
        ("decoded", s.decode(&r["denoised_latent"]).unwrap()),
    ];
    for (name, ours) in checks {
        let err = max_abs_diff(&ours, &r[name]);
        eprintln!("{name}: {err:.2e}");
        assert!(err <= FLOAT_TOL, "{name}: max abs error {err} > {FLOAT_TOL}");
    }
    // colour fixes on the reference's decoded image: at most one code value
    for (fix, name) in
        [(ColorFix::Adain, "output_adain"), (ColorFix::Wavelet, "output_wavelet"), (ColorFix::None, "output_nofix")]
    {
        let y = finish(&r["decoded"], &r["lq_raw"], fix).unwrap();
        let u8img = (y * 255.0).unwrap().round().unwrap().squeeze(0).unwrap().permute((1, 2, 0)).unwrap();
        let err = max_abs_diff(&u8img, &r[name]);
        eprintln!("{name}: {err} code values");
        assert!(err <= 1.0, "{name} differs by {err} code values");
    }
}

/// Largest per-channel std ratio source / decoded: how much the colour fix
/// amplifies a one-code difference in its 8-bit input.
fn adain_gain(r: &HashMap<String, Tensor>) -> f32 {
    let std = |t: &Tensor| {
        let t = t.squeeze(0).unwrap().flatten_from(1).unwrap();
        let m = t.mean_keepdim(1).unwrap();
        t.broadcast_sub(&m).unwrap().sqr().unwrap().mean(1).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap()
    };
    let dec = std(&((&r["decoded"] * 0.5).unwrap() + 0.5).unwrap());
    let src = std(&r["lq_raw"]);
    src.iter().zip(&dec).map(|(s, d)| s / d).fold(0f32, f32::max)
}

/// The whole pipeline from the decoded JPEG. Errors compound through the x0
/// step (x 1.61) and the decoder, so the end-to-end tolerance is relative:
/// FLOAT_TOL times the reference's largest magnitude (at least 1).
fn end_to_end(name: &str, opts: &RestoreOptions) {
    let engine = Engine::load(&spec(name), &mut |_| {}).unwrap();
    let r = reference(name, engine.device());
    let trace = run(&engine, &r, opts, ColorFix::Adain);
    let mut report = vec![];
    for name in [
        "lq_raw",
        "cave_embedding",
        "qf_pred",
        "cave_reconstruction",
        "proj_embedding",
        "lq_latent",
        "unet_eps",
        "denoised_latent",
        "decoded",
    ] {
        let ours = get(&trace, name);
        // tiny-c's CaVE reconstruction is of another input, the top-left 160x224
        // crop (the official forward fails on the whole frame: manifest notes)
        if ours.dims() != r[name].dims() {
            report.push(format!("{name}: reference of a different input {:?}, skipped", r[name].dims()));
            continue;
        }
        let err = max_abs_diff(ours, &r[name]);
        let scale = magnitude(&r[name]);
        report.push(format!("{name}: {err:.2e} (tolerance {:.1e})", FLOAT_TOL * scale));
        assert!(err <= FLOAT_TOL * scale, "{name}: max abs error {err}\n{}", report.join("\n"));
    }
    eprintln!("{}", report.join("\n"));
    // End to end, a decoded value within 1e-4 of the reference can still land
    // on the other side of an 8-bit step; the colour fix multiplies that step by
    // its gain (large for this random model, ~1 for a trained one).
    let tol = 1.0 + adain_gain(&r).ceil();
    let err = max_abs_diff(get(&trace, "output_adain"), &r["output_adain"]);
    eprintln!("output_adain: {err} code values (tolerance {tol})");
    assert!(err <= tol, "output_adain differs by {err} code values");
    let trace = run(&engine, &r, opts, ColorFix::Wavelet);
    let err = max_abs_diff(get(&trace, "output_wavelet"), &r["output_wavelet"]);
    eprintln!("output_wavelet: {err} code values (tolerance {tol})");
    assert!(err <= tol, "output_wavelet differs by {err} code values");
}

#[test]
fn every_intermediate_matches_the_official_pipeline() {
    end_to_end(TINY_A, &bare());
}

/// tiny-c's official run tiles the latent (16/6: 6 UNet calls, Gaussian
/// weights) with the VAE tiling on at the official sizes (1024 / 224, which
/// leave this small image whole, as officially).
#[test]
fn latent_tiled_run_matches_the_official_pipeline() {
    let opts = RestoreOptions { latent_tile: 16, latent_overlap: 6, ..bare() };
    assert_eq!((opts.vae_encoder_tile, opts.vae_decoder_tile), (1024, 224));
    end_to_end(TINY_C, &opts);
}

/// Our latent tile grid is the official one (`latent_tile_offsets_yx`).
#[test]
fn latent_tiles_sit_where_the_official_ones_do() {
    let r = reference(TINY_C, &Device::Cpu);
    let (_, _, h, w) = r["lq_latent"].dims4().unwrap();
    let plan = Plan::gaussian(h, w, 16, 6).expect("tiled");
    let mut ours: Vec<(i64, i64)> =
        plan.rows.iter().flat_map(|r| plan.cols.iter().map(move |c| (r.start as i64, c.start as i64))).collect();
    let offs = r["latent_tile_offsets_yx"].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let mut theirs: Vec<(i64, i64)> = offs.iter().map(|o| (o[0], o[1])).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert!(plan.rows.iter().chain(&plan.cols).all(|s| s.len == 16));
}

/// The official VAEHook with tiling forced on tiny-c's small image: encoder
/// tiles of 96 image px (2x2, padded by 32) fed the reference `lq_raw`, decoder
/// tiles of 4 latent px (1x2, padded by 11) fed `denoised_latent`; each within
/// 1e-4 of the tensor's range. The untiled results lie far away (the pooled
/// GroupNorm statistics matter), so this cannot pass by not tiling.
#[test]
fn vae_tiling_matches_the_official_vaehook() {
    let engine = Engine::load(&spec(TINY_C), &mut |_| {}).unwrap();
    let r = reference(TINY_C, engine.device());
    let s = engine.stages().unwrap();
    let lq = ((&r["lq_raw"] * 2.0).unwrap() - 1.0).unwrap();
    let range = |t: &Tensor| {
        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        t.max(0).unwrap().to_scalar::<f32>().unwrap() - t.min(0).unwrap().to_scalar::<f32>().unwrap()
    };
    for (name, tiled, untiled) in [
        ("vae_tiled_lq_latent", s.encode_tiled(&lq, 96).unwrap(), s.encode(&lq).unwrap()),
        (
            "vae_tiled_decoded",
            s.decode_tiled(&r["denoised_latent"], 4).unwrap(),
            s.decode(&r["denoised_latent"]).unwrap(),
        ),
    ] {
        let tol = FLOAT_TOL * range(&r[name]);
        let err = max_abs_diff(&tiled, &r[name]);
        let far = max_abs_diff(&untiled, &r[name]);
        eprintln!("{name}: {err:.2e} (tolerance {tol:.1e}; untiled is {far:.2e} away)");
        assert!(err <= tol, "{name}: max abs error {err} > {tol}");
        assert!(far > 100.0 * tol, "{name}: the untiled result is only {far} away");
    }
    // and through the pipeline: the restore's latent with encoder tiles of 96 px
    let opts =
        RestoreOptions { latent_tile: 16, latent_overlap: 6, vae_encoder_tile: 96, vae_decoder_tile: 4, ..bare() };
    let trace = run(&engine, &r, &opts, ColorFix::Adain);
    let err = max_abs_diff(get(&trace, "lq_latent"), &r["vae_tiled_lq_latent"]);
    assert!(err <= FLOAT_TOL * range(&r["vae_tiled_lq_latent"]), "pipeline lq_latent with VAE tiles: {err}");
}

#[test]
fn qf_estimate_follows_the_reference_formula() {
    let engine = Engine::load(&ModelSpec { mode: Mode::Cave, ..spec(TINY_A) }, &mut |_| {}).unwrap();
    let r = reference(TINY_A, engine.device());
    let q = r["qf_pred"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    let qf = engine.estimate_qf(&input(&r), &Default::default()).unwrap();
    assert!((qf - 100.0 * (1.0 - q)).abs() < 1e-3, "{qf} vs {}", 100.0 * (1.0 - q));
}

#[test]
fn cave_mode_output_is_the_clamped_reconstruction() {
    let engine = Engine::load(&ModelSpec { mode: Mode::Cave, ..spec(TINY_A) }, &mut |_| {}).unwrap();
    let r = reference(TINY_A, engine.device());
    let trace = run(&engine, &r, &bare(), ColorFix::None);
    assert!(max_abs_diff(get(&trace, "cave_reconstruction"), &r["cave_reconstruction"]) <= FLOAT_TOL);
    let expect = ((r["cave_reconstruction"].clamp(0f32, 1f32).unwrap() * 255.0).unwrap().round().unwrap())
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap();
    assert!(max_abs_diff(get(&trace, "output_cave"), &expect) <= 1.0);
}

// ---- half precision (the CUDA default) on the CPU --------------------------
//
// The same fixture in f16 and bf16, so the half-precision code path (weight
// casts after the LoRA merge, the f16 embedding, the f32 colour fix, the
// non-finite checks) runs in CI without a GPU. bf16 on the CPU is the bf16
// CPU path (f32 tensors, dot products of bf16-rounded operands with f32
// sums: `kernels::bf16`), held to the same bound: it rounds fewer values
// than a bf16 tensor pipeline, so the bound is loose for it.
//
// Tolerance, derived from the dtype: every op rounds its result to the dtype,
// a relative error of at most u = eps/2 (eps = 2^-10 for f16, 2^-7 for bf16).
// The GroupNorms keep activations near unit scale, so a relative error passes
// from layer to layer with gain about 1, and the roundings of the N ops on a
// stage's longest path, independent and of either sign, add like a random
// walk: relative error ~ u * sqrt(N). A stage is held to
// DEPTH_SAFETY * u * sqrt(N) * (its output's magnitude), DEPTH_SAFETY = 3
// standard deviations of that walk. Chained stages add their relative
// tolerances (the x0 step multiplies the UNet's by 1 / sqrt(alpha_bar) = 1.61).
//
// Checked by hand (Dec 2026) that these tolerances still catch real faults:
// LoRA merge skipped (lq_latent 3.3 vs 0.047 in f16, 3.2 vs 0.38 in bf16), the
// UNet attention LoRA alone skipped (unet_eps 0.15 vs 0.047 in f16; bf16 is too
// coarse to see it: 0.13 vs 0.37), no colour fix (97 codes vs 17 in f16, 105
// vs 96 in bf16), AdaIN and wavelet swapped (174 vs 17, 178 vs 96).

const DEPTH_SAFETY: f32 = 3.0;
/// 1 / sqrt(alpha_bar(499)): the x0 step's gain on the noise prediction.
const X0_GAIN: f32 = 1.61;

/// Rounded ops N on the longest path of each tiny-a stage (its configs: VAE
/// 4 blocks x 2 resnets, UNet 4 down / mid / 4 up blocks). A resnet is
/// GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, add: 7 roundings; a VAE
/// attention block norm, q/k/v, scores, softmax, product, out, add: 8; a UNet
/// transformer block adds self- and cross-attention and the GEGLU MLP: 16.
fn depth(stage: &str) -> f32 {
    match stage {
        // conv_in, 4 blocks x 2 resnets, 3 downsamples, mid (2 resnets + attn), norm, SiLU, conv_out, quant_conv
        "lq_latent" => 1.0 + 8.0 * 7.0 + 3.0 + 2.0 * 7.0 + 8.0 + 4.0,
        // time embedding 3, conv_in, 4 down blocks x 2 (resnet + transformer in 3 of them), 3 downsamples,
        // mid (2 resnets + transformer), 4 up blocks x 3 (resnet + transformer in 3 of them), 3 upsamples, norm, SiLU, conv_out
        "unet_eps" => {
            3.0 + 1.0 + 8.0 * 7.0 + 6.0 * 16.0 + 3.0 + 2.0 * 7.0 + 16.0 + 12.0 * 7.0 + 9.0 * 16.0 + 3.0 * 2.0 + 3.0
        }
        // post_quant_conv, conv_in, mid (2 resnets + attn), 4 blocks x 3 resnets, 3 upsamples (nearest + conv), norm, SiLU, conv_out
        "decoded" => 2.0 + 2.0 * 7.0 + 8.0 + 12.0 * 7.0 + 3.0 * 2.0 + 3.0,
        _ => unreachable!("no depth for {stage}"),
    }
}

fn eps_of(p: Precision) -> f32 {
    match p {
        Precision::F16 => 9.765625e-4, // 2^-10
        Precision::Bf16 => 7.8125e-3,  // 2^-7
        _ => f32::EPSILON,
    }
}

/// Relative tolerance of one stage run alone.
fn stage_rel_tol(p: Precision, stage: &str) -> f32 {
    DEPTH_SAFETY * eps_of(p) / 2.0 * depth(stage).sqrt()
}

/// The largest absolute value of `t`, at least 1.
fn magnitude(t: &Tensor) -> f32 {
    tensors::max_abs(t).max(1.0)
}

fn load_in(name: &str, precision: Precision) -> Engine {
    Engine::load(&ModelSpec { precision, ..spec(name) }, &mut |_| {}).unwrap()
}

/// Each diffusion stage in `p`, fed the reference's own input.
fn half_stages(p: Precision) {
    let engine = load_in(TINY_A, p);
    let r = reference(TINY_A, engine.device());
    let s = engine.stages().unwrap();
    let lq = ((&r["lq_raw"] * 2.0).unwrap() - 1.0).unwrap();
    let checks = [
        ("lq_latent", s.encode(&lq).unwrap()),
        ("unet_eps", s.unet(&r["lq_latent"], &r["proj_embedding_f16"].to_dtype(DType::F32).unwrap()).unwrap()),
        ("decoded", s.decode(&r["denoised_latent"]).unwrap()),
    ];
    // bf16 on the CPU keeps f32 tensors and rounds the dot products'
    // operands to bf16 (the AVX512_BF16 kernels, or their emulation): its
    // stages must differ from the f32 engine's, or bf16 silently ran in f32
    let f32_stages = (p == Precision::Bf16).then(|| {
        let e = load_in(TINY_A, Precision::F32);
        let s = e.stages().unwrap();
        [
            s.encode(&lq).unwrap(),
            s.unet(&r["lq_latent"], &r["proj_embedding_f16"].to_dtype(DType::F32).unwrap()).unwrap(),
            s.decode(&r["denoised_latent"]).unwrap(),
        ]
    });
    for (i, (name, ours)) in checks.into_iter().enumerate() {
        assert_eq!(
            ours.dtype(),
            if p == Precision::F16 { DType::F16 } else { DType::F32 },
            "{name} ran in another dtype"
        );
        if let Some(f) = &f32_stages {
            let moved = max_abs_diff(&ours, &f[i]);
            assert!(moved > 0.0, "{name}: bf16 gave the f32 result exactly");
        }
        let err = max_abs_diff(&ours, &r[name]);
        let tol = stage_rel_tol(p, name) * magnitude(&r[name]);
        eprintln!("{p:?} {name}: {err:.2e} (tolerance {tol:.1e})");
        assert!(err <= tol, "{p:?} {name}: max abs error {err} > {tol}");
    }
}

/// The whole pipeline in `p`: every diffusion intermediate within the sum of
/// the relative tolerances of the stages that made it, and the 8-bit outputs
/// within what the measured decoded error allows once the colour fix has
/// multiplied it (and the one-code 8-bit step) by its gain.
fn half_end_to_end(p: Precision) {
    let engine = load_in(TINY_A, p);
    let r = reference(TINY_A, engine.device());
    let trace = run(&engine, &r, &bare(), ColorFix::Adain);
    let enc = stage_rel_tol(p, "lq_latent");
    let unet = enc + stage_rel_tol(p, "unet_eps");
    let x0 = enc + X0_GAIN * stage_rel_tol(p, "unet_eps");
    let dec = x0 + stage_rel_tol(p, "decoded");
    let mut report = vec![];
    for (name, rel) in [("lq_latent", enc), ("unet_eps", unet), ("denoised_latent", x0), ("decoded", dec)] {
        let err = max_abs_diff(get(&trace, name), &r[name]);
        let tol = rel * magnitude(&r[name]);
        report.push(format!("{p:?} {name}: {err:.2e} (tolerance {tol:.1e})"));
        assert!(err <= tol, "{name}: max abs error {err} > {tol}\n{}", report.join("\n"));
    }
    // decoded is in [-1,1]: 127.5 code values per unit
    let dec_codes = max_abs_diff(get(&trace, "decoded"), &r["decoded"]) * 127.5;
    let tol = 1.0 + (adain_gain(&r) * (1.0 + dec_codes)).ceil();
    for (fix, out) in [(ColorFix::Adain, "output_adain"), (ColorFix::Wavelet, "output_wavelet")] {
        let trace = if fix == ColorFix::Adain { trace.clone() } else { run(&engine, &r, &bare(), fix) };
        let err = max_abs_diff(get(&trace, out), &r[out]);
        report.push(format!("{p:?} {out}: {err} code values (tolerance {tol})"));
        assert!(err <= tol, "{out} differs by {err} code values\n{}", report.join("\n"));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn f16_stages_match_within_the_f16_tolerance() {
    half_stages(Precision::F16);
}

#[test]
fn f16_pipeline_matches_within_the_f16_tolerance() {
    half_end_to_end(Precision::F16);
}

#[test]
fn bf16_stages_match_within_the_bf16_tolerance() {
    half_stages(Precision::Bf16);
}

#[test]
fn bf16_pipeline_matches_within_the_bf16_tolerance() {
    half_end_to_end(Precision::Bf16);
}

/// A copy of tiny-a whose VAE encoder's conv_in is scaled by 1e6: its
/// activations (~1e5 and up) overflow f16 (max 65504) but not f32. The f16 run
/// must stop with `NonFinite` naming the VAE encoder, not write a black frame;
/// the f32 run of the same weights stays finite.
#[test]
fn f16_overflow_is_reported_as_non_finite_naming_the_stage() {
    let src = fixture(TINY_A);
    let dir = std::env::temp_dir().join(format!("codiff-f16-overflow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    for f in ["cave.pth", "codiff.pkl", "unet", "scheduler"] {
        std::os::unix::fs::symlink(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(src.join("vae/config.json"), dir.join("vae/config.json")).unwrap();
    let vae = src.join("vae/diffusion_pytorch_model.safetensors");
    let mut w = candle_core::safetensors::load(&vae, &Device::Cpu).unwrap();
    for k in ["encoder.conv_in.weight", "encoder.conv_in.bias"] {
        let t = (&w[k] * 1e6).unwrap();
        w.insert(k.to_string(), t);
    }
    candle_core::safetensors::save(&w, dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let spec_at = |precision| ModelSpec {
        weights: dir.join("cave.pth"),
        sd_dir: Some(dir.clone()),
        codiff: Some(dir.join("codiff.pkl")),
        cave: Some(dir.join("cave.pth")),
        precision,
        ..spec(TINY_A)
    };
    let r = reference(TINY_A, &Device::Cpu);
    let f16 = Engine::load(&spec_at(Precision::F16), &mut |_| {}).unwrap();
    let mut img = input(&r);
    let before = img.data.clone();
    let res = f16.restore(&mut img, &bare());
    let f32_engine = Engine::load(&spec_at(Precision::F32), &mut |_| {}).unwrap();
    let f32_res = f32_engine.restore(&mut input(&r), &bare());
    let _ = std::fs::remove_dir_all(&dir);
    match res {
        Err(e @ EngineError::NonFinite { stage: "VAE encoder", .. }) => {
            assert!(e.to_string().contains("try precision=f32"), "{e}");
        }
        other => panic!("f16 overflow gave {other:?}, expected NonFinite in the VAE encoder"),
    }
    assert_eq!(img.data, before, "the failed frame was written");
    f32_res.expect("the same weights in f32 do not overflow");
}
