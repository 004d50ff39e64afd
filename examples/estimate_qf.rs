//! CaVE's JPEG-quality estimate for many images with one model load, as JSON
//! lines (used by `examples/evaluate.py`):
//!
//! ```text
//! cargo run --release --example estimate_qf -- [--weights F] [--device cpu] [--list FILE] [IMAGES...]
//! ```
//!
//! Prints `{"file": ..., "width": W, "height": H, "qf": Q, "seconds": S}` per
//! image (`--list` names one image per line). With no `--weights` it uses the
//! default compact model (`$CODIFF_WEIGHTS` or `weights/codiff-cave-compact.safetensors`).
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use gstcodiff::engine::{DeviceSpec, Engine, ModelSpec, RgbImage};

#[derive(Parser, Debug)]
#[command(about = "Estimate the JPEG quality of images with codiff's CaVE")]
struct Args {
    /// Images (PNG or JPEG)
    images: Vec<PathBuf>,
    /// Text file with one image path per line
    #[arg(long)]
    list: Option<PathBuf>,
    /// Compact CaVE model (default: the one shipped in weights/)
    #[arg(long)]
    weights: Option<PathBuf>,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let mut files = a.images.clone();
    if let Some(l) = &a.list {
        files.extend(std::fs::read_to_string(l)?.lines().filter(|s| !s.trim().is_empty()).map(PathBuf::from));
    }
    if files.is_empty() {
        return Err("no images given".into());
    }
    let mut spec = ModelSpec::compact_default();
    if let Some(w) = a.weights {
        spec.weights = w;
    }
    spec.device = a.device.parse::<DeviceSpec>()?;
    let engine = Engine::load(&spec, &mut |s| eprintln!("codiff: {s}"))?;
    for f in files {
        let decoded = image::ImageReader::open(&f)?.with_guessed_format()?.decode()?.to_rgb8();
        let (w, h) = decoded.dimensions();
        let img = RgbImage::new(w as usize, h as usize, decoded.into_raw())?;
        let t = Instant::now();
        let qf = engine.estimate_qf(&img)?;
        println!(
            "{{\"file\": {}, \"width\": {w}, \"height\": {h}, \"qf\": {qf}, \"seconds\": {:.4}}}",
            serde_json::to_string(&f.to_string_lossy())?,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
