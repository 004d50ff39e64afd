//! Restore one still image: `cargo run --release --example restore -- [flags] INPUT OUTPUT`.
//!
//! With no model flags it uses the compact default model in `weights/`
//! (`--mode cave`); give `--sd-dir`, `--codiff` and `--cave` for the official
//! one-step diffusion model (`--mode diffusion`).
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use gstcodiff::engine::pipeline::Trace;
use gstcodiff::engine::{
    default_weights_path, ColorFix, DeviceSpec, Engine, Mode, ModelSpec, Precision, RestoreOptions, RgbImage,
};

#[path = "common/tiles.rs"]
mod tiles;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// diffusion when --sd-dir and --codiff are given, else cave
    Auto,
    Cave,
    Diffusion,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FixArg {
    Adain,
    Wavelet,
    None,
}

#[derive(Parser, Debug)]
#[command(about = "Remove JPEG artifacts from a still image with codiff")]
struct Args {
    /// Input image (PNG or JPEG)
    input: PathBuf,
    /// Output image (format from the extension: .png or .jpg)
    output: PathBuf,
    /// Restoration mode
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Compact CaVE model for --mode cave (default: the one shipped in weights/)
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Stable Diffusion 2.1 base folder in diffusers layout (unet/, vae/, scheduler/)
    #[arg(long)]
    sd_dir: Option<PathBuf>,
    /// Official codiff.pkl (LoRA weights and projection)
    #[arg(long)]
    codiff: Option<PathBuf>,
    /// Official cave.pth (legacy PyTorch format) or a safetensors CaVE
    #[arg(long)]
    cave: Option<PathBuf>,
    /// Colour correction against the input (diffusion mode)
    #[arg(long, value_enum, default_value = "adain")]
    color_fix: FixArg,
    #[command(flatten)]
    tiles: tiles::TileArgs,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// auto, f32, f16 or bf16 (UNet and VAE)
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Write every intermediate tensor to this safetensors file
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Restore under the 8 flips and transposes and average (8x the time)
    #[arg(long)]
    self_ensemble: bool,
    /// Restore as if the JPEG quality were this (1-100; lower smooths more), for
    /// quality-conditioned models (train_cave.py --cond); unset: the model's estimate
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    qf: Option<u32>,
    /// Restore every image as the bare model does: no check that it was decoded
    /// from a JPEG, no clamp to its quantisation intervals
    #[arg(long)]
    no_guard: bool,
    /// Refuse images with more pixels than this (0 = no limit), read from the
    /// header before anything is decoded; the element's max-frame-pixels default
    #[arg(long, default_value_t = 4096 * 4096)]
    max_pixels: u64,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("codiff: error: {e}");
        std::process::exit(1);
    }
}

/// A tiny error type so the example needs no extra crates.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}

fn run(args: Args) -> anyhow_free::Result {
    // everything about the files is checked before the model loads
    let ext = args.output.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
        return Err(format!("{}: the output must end in .png, .jpg or .jpeg", args.output.display()).into());
    }
    let reader = || -> Result<_, String> {
        image::ImageReader::open(&args.input)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| format!("{}: cannot read: {e}", args.input.display()))
    };
    let (w, h) = reader()?.into_dimensions().map_err(|e| format!("{}: not a PNG or JPEG image: {e}", args.input.display()))?;
    if args.max_pixels > 0 && w as u64 * h as u64 > args.max_pixels {
        return Err(format!(
            "{}: {w}x{h} is {} pixels, more than --max-pixels={} (raise it to restore larger images)",
            args.input.display(),
            w as u64 * h as u64,
            args.max_pixels
        )
        .into());
    }
    let mode = match args.mode {
        ModeArg::Cave => Mode::Cave,
        ModeArg::Diffusion => Mode::Diffusion,
        ModeArg::Auto if args.sd_dir.is_some() && args.codiff.is_some() => Mode::Diffusion,
        ModeArg::Auto => Mode::Cave,
    };
    let spec = ModelSpec {
        mode,
        weights: args.weights.clone().unwrap_or_else(default_weights_path),
        sd_dir: args.sd_dir.clone(),
        codiff: args.codiff.clone(),
        cave: args.cave.clone(),
        device: args.device.parse::<DeviceSpec>()?,
        precision: args.precision.parse::<Precision>()?,
    };
    let opts = RestoreOptions {
        color_fix: match args.color_fix {
            FixArg::Adain => ColorFix::Adain,
            FixArg::Wavelet => ColorFix::Wavelet,
            FixArg::None => ColorFix::None,
        },
        self_ensemble: args.self_ensemble,
        quality: args.qf.map(|q| q as f32),
        guard: !args.no_guard,
        ..args.tiles.options()
    };
    let t0 = Instant::now();
    let engine = Engine::load(&spec, &mut |s| eprintln!("codiff: {s}"))?;
    eprintln!("codiff: loaded in {:.2} s", t0.elapsed().as_secs_f64());

    let decoded = reader()?.decode().map_err(|e| format!("{}: cannot decode: {e}", args.input.display()))?.to_rgb8();
    let (w, h) = decoded.dimensions();
    let mut img = RgbImage::new(w as usize, h as usize, decoded.into_raw())?;
    let mut trace = Trace::new();
    let t1 = Instant::now();
    let (qf, source, restored) = match &args.dump {
        Some(_) => (engine.restore_traced(&mut img, &opts, Some(&mut trace))?, "model", true),
        None => {
            let r = engine.restore_report(&mut img, &opts)?;
            (r.qf, r.qf_source.name(), r.restored)
        }
    };
    let secs = t1.elapsed().as_secs_f64();
    let out = image::RgbImage::from_raw(w, h, img.data).ok_or("output buffer size")?;
    out.save(&args.output).map_err(|e| format!("{}: cannot write: {e}", args.output.display()))?;
    eprintln!(
        "codiff: {}x{} {:?} {} in {:.2} s ({:.2} s/MP), estimated JPEG quality {:.1} ({source}) -> {}",
        w,
        h,
        mode,
        if restored { "restored" } else { "left unchanged (no JPEG quantisation seen)" },
        secs,
        secs / (w as f64 * h as f64 / 1e6),
        qf,
        args.output.display()
    );
    if let Some(path) = args.dump {
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = trace
            .into_iter()
            .map(|(n, t)| {
                let t = if t.dtype() == candle_core::DType::U8 { t } else { t.to_dtype(candle_core::DType::F32)? };
                Ok((n, t))
            })
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&tensors, &path)?;
        eprintln!("codiff: wrote {} intermediates to {}", tensors.len(), path.display());
    }
    Ok(())
}
