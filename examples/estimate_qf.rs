//! CaVE's JPEG-quality estimate for many images with one model load, as JSON
//! lines (used by `examples/evaluate.py`):
//!
//! ```text
//! cargo run --release --example estimate_qf -- [--weights F] [--device cpu] [--list FILE] [IMAGES...]
//! ```
//!
//! Prints `{"file": ..., "width": W, "height": H, "qf": Q, "seconds": S,
//! "evidence": E, "tables_qf": T, "agreement": A, "ac_measured": M, "ac_quantised": N}`
//! per image: `qf` is CaVE's estimate, the rest the guard's reading of the
//! luma's quantisation steps (`engine::quant`; `tables_qf` is null when no
//! IJG table explains them) (`--list` names one image per line). With no `--weights` it uses the
//! default compact model (`$CODIFF_WEIGHTS` or `weights/codiff-cave-compact.safetensors`).
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use gstcodiff::engine::guard::Analysis;
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
        let qf = engine.estimate_qf(&img, &Default::default())?;
        let seconds = t.elapsed().as_secs_f64();
        let a = Analysis::of(&img);
        let (measured, quantised) = a.steps[0].ac_counts();
        let fit = a.fit.as_ref();
        println!(
            "{{\"file\": {}, \"width\": {w}, \"height\": {h}, \"qf\": {qf}, \"seconds\": {seconds:.4}, \"evidence\": \"{:?}\", \"tables_qf\": {}, \"agreement\": {}, \"ac_measured\": {measured}, \"ac_quantised\": {quantised}, \"steps\": {:?}}}",
            serde_json::to_string(&f.to_string_lossy())?,
            a.evidence(),
            a.quality().map_or("null".to_string(), |q| q.to_string()),
            fit.map_or("null".to_string(), |f| format!("{:.2}", f.agreement)),
            a.steps[0].step.map(|s| s.map_or(0, |q| q as i32)),
        );
    }
    Ok(())
}
