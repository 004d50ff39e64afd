//! Restore still images:
//!
//! ```text
//! cargo run --release --example restore -- [flags] INPUT OUTPUT
//! cargo run --release --example restore -- [flags] INPUTS... --out-dir DIR [--shard I/N] [--list]
//! ```
//!
//! With `--out-dir`, every INPUT (a PNG/JPEG file, or a folder searched
//! recursively for them) is restored into DIR, keeping its path below the
//! folder it was found in, with one model load; outputs that already exist are
//! skipped (`--overwrite` redoes them), so an interrupted run resumes where it
//! stopped (each output is written under a temporary name and renamed when
//! complete). `--shard I/N` (0 <= I < N) takes every N-th file of the sorted
//! list starting at the I-th, so N jobs of a scheduler (a Slurm job array, a
//! Kubernetes indexed Job) cover every file exactly once. `--list` prints the
//! planned input and output of each file and stops. A progress bar (files,
//! and the tiles of a frame restored in tiles) is drawn when standard error
//! is a terminal; one line per file is printed always.
//!
//! With no model flags it uses the compact default model in `weights/`
//! (`--mode cave`); give `--sd-dir`, `--codiff` and `--cave` for the official
//! one-step diffusion model (`--mode diffusion`).
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, ValueEnum};
use gstcodiff::engine::pipeline::Trace;
use gstcodiff::engine::{
    default_weights_path, ColorFix, DeviceSpec, Engine, Mode, ModelSpec, Precision, RestoreOptions, RgbImage,
};

use codiff_testkit::tiles;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// diffusion when --sd-dir and --codiff are given, else cave
    Auto,
    Cave,
    Diffusion,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Png,
    Jpg,
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
    /// INPUT OUTPUT (one image; the output's format from its extension: .png
    /// or .jpg), or with --out-dir: input images and folders
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Restore every input into this folder (batch mode)
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Batch mode: the output format
    #[arg(long, value_enum, default_value = "png")]
    format: FormatArg,
    /// Batch mode: redo outputs that exist (default: skip them, so a run resumes)
    #[arg(long)]
    overwrite: bool,
    /// Batch mode: only this share of the files, I/N with 0 <= I < N (every
    /// N-th file of the sorted list from the I-th)
    #[arg(long)]
    shard: Option<String>,
    /// Print each planned input and output (tab-separated) and stop
    #[arg(long)]
    list: bool,
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

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The image files below `dir`, recursively, with their path relative to it.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: cannot list: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = PathBuf::from(p.file_name().unwrap_or_default());
        if p.is_dir() {
            walk(&p, &rel.join(&name), out)?;
        } else if p.is_file() && is_image(&p) {
            out.push((p, rel.join(name)));
        }
    }
    Ok(())
}

/// `I/N` with 0 <= I < N.
fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("--shard {s}: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Every (input, output) pair to do, in a fixed order, this shard's share.
fn plan(args: &Args) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    let Some(out_dir) = &args.out_dir else {
        let [input, output] = args.paths.as_slice() else {
            return Err("give INPUT OUTPUT, or inputs and --out-dir DIR".to_string());
        };
        let ext = output.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if !ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
            return Err(format!("{}: the output must end in .png, .jpg or .jpeg", output.display()));
        }
        return Ok(vec![(input.clone(), output.clone())]);
    };
    let ext = match args.format {
        FormatArg::Png => "png",
        FormatArg::Jpg => "jpg",
    };
    let mut found = Vec::new();
    for p in &args.paths {
        if p.is_dir() {
            walk(p, Path::new(""), &mut found)?;
        } else if p.is_file() {
            found.push((p.clone(), PathBuf::from(p.file_name().unwrap_or_default())));
        } else {
            return Err(format!("{}: no such file or folder", p.display()));
        }
    }
    found.sort();
    found.dedup_by(|a, b| a.0 == b.0);
    let mut jobs: Vec<_> =
        found.into_iter().map(|(input, rel)| (input, out_dir.join(rel).with_extension(ext))).collect();
    if let Some(s) = &args.shard {
        let (i, n) = parse_shard(s)?;
        jobs = jobs.into_iter().enumerate().filter(|(k, _)| k % n == i).map(|(_, j)| j).collect();
    }
    Ok(jobs)
}

/// Checks one input before anything is decoded: readable, an image, within
/// --max-pixels (from the header); returns its decoder, the header read.
fn check_input(input: &Path, max_pixels: u64) -> Result<impl image::ImageDecoder, String> {
    let decoder = image::ImageReader::open(input)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("{}: cannot read: {e}", input.display()))?
        .into_decoder()
        .map_err(|e| format!("{}: not a PNG or JPEG image: {e}", input.display()))?;
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    if max_pixels > 0 && w as u64 * h as u64 > max_pixels {
        return Err(format!(
            "{}: {w}x{h} is {} pixels, more than --max-pixels={max_pixels} (raise it to restore larger images)",
            input.display(),
            w as u64 * h as u64
        ));
    }
    Ok(decoder)
}

fn run(args: Args) -> anyhow_free::Result {
    // everything about the files is checked before the model loads
    let jobs = plan(&args)?;
    if args.list {
        for (i, o) in &jobs {
            println!("{}\t{}", i.display(), o.display());
        }
        return Ok(());
    }
    let single = args.out_dir.is_none();
    if single {
        check_input(&jobs[0].0, args.max_pixels)?;
    } else if args.dump.is_some() {
        return Err("--dump restores one image: give INPUT OUTPUT without --out-dir".into());
    }
    let todo: Vec<_> = jobs.iter().filter(|(_, o)| args.overwrite || single || !o.exists()).cloned().collect();
    if !single {
        eprintln!("codiff: {} images, {} to do ({} done before)", jobs.len(), todo.len(), jobs.len() - todo.len());
        if todo.is_empty() {
            return Ok(());
        }
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
    if let Some(caveat) = spec.precision.caveat(spec.device) {
        eprintln!("note: --precision {}: {caveat}", args.precision);
    }
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
    // the engine's tile clamps, as the element applies them
    let (opts, adjusted) = opts.clamped(Some(engine.min_cave_tile()));
    for a in adjusted {
        eprintln!("codiff: {a}");
    }

    let bar = !single && std::io::stderr().is_terminal();
    // tiles of long frames (a 4K diffusion restore runs for many minutes):
    // shown on a terminal only
    let opts = if std::io::stderr().is_terminal() {
        RestoreOptions {
            cancel: opts.cancel.clone().with_progress(|done, total| {
                eprint!("\r  tile {done}/{total}\x1b[K");
                let _ = std::io::stderr().flush();
            }),
            ..opts
        }
    } else {
        opts
    };
    let mut failed = 0usize;
    for (k, (input, output)) in todo.iter().enumerate() {
        if bar {
            let done = k * 30 / todo.len();
            eprint!("\r[{}{}] {}/{} {}\x1b[K", "#".repeat(done), " ".repeat(30 - done), k, todo.len(), input.display());
            let _ = std::io::stderr().flush();
        }
        let one = || -> Result<(), Box<dyn std::error::Error>> {
            let decoded = image::DynamicImage::from_decoder(check_input(input, args.max_pixels)?)
                .map_err(|e| format!("{}: cannot decode: {e}", input.display()))?
                .to_rgb8();
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
            if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
            }
            // complete files only: an interrupted run leaves no output to skip
            let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("png").to_string();
            let partial = output.with_extension(format!("partial.{ext}"));
            out.save(&partial).map_err(|e| format!("{}: cannot write: {e}", output.display()))?;
            std::fs::rename(&partial, output).map_err(|e| format!("{}: cannot write: {e}", output.display()))?;
            if std::io::stderr().is_terminal() {
                eprint!("\r\x1b[K");
            }
            eprintln!(
                "codiff: {}{}x{} {:?} {} in {:.2} s ({:.2} s/MP), estimated JPEG quality {:.1} ({source}) -> {}",
                if single { String::new() } else { format!("[{}/{}] ", k + 1, todo.len()) },
                w,
                h,
                mode,
                if restored { "restored" } else { "left unchanged (no JPEG quantisation seen)" },
                secs,
                secs / (w as f64 * h as f64 / 1e6),
                qf,
                output.display()
            );
            if let Some(path) = &args.dump {
                let tensors: std::collections::HashMap<String, candle_core::Tensor> = std::mem::take(&mut trace)
                    .into_iter()
                    .map(|(n, t)| {
                        let t =
                            if t.dtype() == candle_core::DType::U8 { t } else { t.to_dtype(candle_core::DType::F32)? };
                        Ok((n, t))
                    })
                    .collect::<candle_core::Result<_>>()?;
                candle_core::safetensors::save(&tensors, path)?;
                eprintln!("codiff: wrote {} intermediates to {}", tensors.len(), path.display());
            }
            Ok(())
        };
        if let Err(e) = one() {
            if single {
                return Err(e);
            }
            if bar {
                eprint!("\r\x1b[K");
            }
            eprintln!("codiff: error: {e} (skipped)");
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} images failed", todo.len()).into());
    }
    Ok(())
}
