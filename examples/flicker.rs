//! Flicker benchmark: does the restored video flicker more than its input?
//!
//! ```sh
//! cargo run --release --example flicker -- [--frames 30] [--qf 15] [--noise 2] [--pan 0] \
//!     [--smoothing 0,default] [--live-fps 30]
//! ```
//!
//! A scene (a crop of `examples/data/astronaut.png`) is held still (or panned by
//! `--pan` pixels per frame), each frame gets fresh sensor noise (`--noise`, the
//! standard deviation in code values, so that every frame compresses slightly
//! differently, as a camera's do) and goes through
//! `jpegenc quality=QF ! jpegdec ! codiff`, the way an MJPEG camera feed is
//! restored. It prints, on the static content (the whole frame when still; the
//! part two consecutive frames share when panning, compared at the same scene
//! position):
//!
//! * the mean absolute difference between consecutive frames (all three RGB
//!   channels, code values) of the clean noisy frames, the JPEG input and the
//!   restored output; the restored sequence flickers more than its input when its
//!   figure is higher;
//! * the RGB PSNR of each sequence against the noiseless scene (what a perfect
//!   restorer would output; over all frames and the whole frame);
//! * the per-frame QF estimate (`codiff-qf` messages): mean, standard deviation,
//!   min and max.
//!
//! One codiff runs per `--smoothing` value (`temporal-smoothing`; `default` = the
//! property's default), all on the same input frames. The measurement itself is
//! `testkit/src/flicker.rs`, shared with `tests/flicker.rs`.
use std::path::PathBuf;

use clap::Parser;
use gst::prelude::*;

use codiff_testkit::flicker;

use flicker::{consecutive_mad, psnr, Config};

#[derive(Parser, Debug)]
#[command(about = "Measure frame-to-frame flicker of codiff's restored video against its input")]
struct Args {
    /// Number of frames
    #[arg(long, default_value_t = 30)]
    frames: usize,
    /// JPEG quality of the input frames
    #[arg(long, default_value_t = 15)]
    qf: u32,
    /// Sensor noise standard deviation (code values) added to every frame
    #[arg(long, default_value_t = 2.0)]
    noise: f64,
    /// Horizontal pan in pixels per frame (0 = still scene)
    #[arg(long, default_value_t = 0)]
    pan: usize,
    /// Frame size WIDTHxHEIGHT, cut from the top-left of the scene
    #[arg(long, default_value = "320x240")]
    size: String,
    /// Scene (PNG or JPEG, at least as large as the frames plus the pan)
    #[arg(long)]
    scene: Option<PathBuf>,
    /// Push the frames as a live camera at this rate (real time, synchronised
    /// sinks, no queue before codiff): frames codiff cannot restore in time
    /// are carried (`late-frames`); measures the live policy. Run one
    /// --smoothing value at a time (the branches share the CPU)
    #[arg(long)]
    live_fps: Option<u32>,
    /// Extra codiff properties, e.g. "device=cuda:0"
    #[arg(long, default_value = "")]
    codiff: String,
    /// temporal-smoothing values to compare, one codiff each ("default" = the
    /// property's default)
    #[arg(long, default_value = "0,default", value_delimiter = ',')]
    smoothing: Vec<String>,
}

fn run(args: &Args) -> Result<(), String> {
    let (width, height) = args
        .size
        .split_once('x')
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .ok_or_else(|| format!("--size {}: expected WIDTHxHEIGHT", args.size))?;
    let scene_path = args
        .scene
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut.png"));
    let scene = image::open(&scene_path).map_err(|e| format!("{}: {e}", scene_path.display()))?.to_rgb8();

    gst::init().map_err(|e| e.to_string())?;
    gstcodiff::plugin_register_static().map_err(|e| e.to_string())?;
    let default =
        gst::ElementFactory::make("codiff").build().map_err(|e| e.to_string())?.property::<f64>("temporal-smoothing");
    let mut labels = Vec::new();
    let mut branches = Vec::new();
    for s in &args.smoothing {
        let value =
            if s == "default" { default } else { s.parse::<f64>().map_err(|e| format!("--smoothing {s}: {e}"))? };
        labels.push(if s == "default" { format!("{value} (default)") } else { format!("{value}") });
        branches.push(format!("temporal-smoothing={value} {}", args.codiff));
    }
    let cfg = Config {
        frames: args.frames,
        qf: args.qf,
        noise: args.noise,
        pan: args.pan,
        width,
        height,
        live_fps: args.live_fps,
    };
    let report = flicker::run(&cfg, &scene, &branches).map_err(|e| format!("{}: {e}", scene_path.display()))?;

    let (w, h, pan) = (width, height, args.pan);
    let (in_mad, _) = consecutive_mad(&report.input, w, h, pan);
    println!(
        "flicker: {} frames {w}x{h}, JPEG quality {}, noise sigma {}, pan {pan} px/frame{}",
        args.frames,
        args.qf,
        args.noise,
        args.live_fps.map_or(String::new(), |f| format!(", live at {f} fps"))
    );
    println!(
        "consecutive-frame mean abs difference (code values, mean / worst pair), RGB PSNR vs the noiseless scene:"
    );
    let row = |name: &str, frames: &[Vec<u8>], rel: bool| {
        let (mad, max) = consecutive_mad(frames, w, h, pan);
        let vs =
            if rel { format!("  ({:+.1} % vs input)", 100.0 * (mad / in_mad.max(1e-9) - 1.0)) } else { String::new() };
        println!("  {name:<42} {mad:6.3} / {max:6.3}   {:6.2} dB{vs}", psnr(frames, &report.truth));
    };
    row("clean + noise", &report.noisy, false);
    row("JPEG input", &report.input, false);
    for (label, (_, frames)) in labels.iter().zip(&report.outputs) {
        let name = if label == "0" {
            "codiff frame by frame (smoothing 0)".to_string()
        } else {
            format!("codiff, temporal-smoothing {label}")
        };
        row(&name, frames, true);
    }
    let qfs = &report.qfs;
    let n = qfs.len().max(1) as f64;
    let qf_mean = qfs.iter().sum::<f64>() / n;
    let qf_std = (qfs.iter().map(|q| (q - qf_mean).powi(2)).sum::<f64>() / n).sqrt();
    let qf_min = qfs.iter().cloned().fold(f64::INFINITY, f64::min);
    let qf_max = qfs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "QF estimate over {} frames: mean {qf_mean:.2}, std {qf_std:.2}, min {qf_min:.1}, max {qf_max:.1}",
        qfs.len()
    );
    if args.live_fps.is_some() {
        println!(
            "live: {} of {} frames restored by the first codiff, the others carried (late-frames)",
            qfs.len(),
            args.frames
        );
    }
    let ms = &report.ms;
    println!("codiff time per frame: {:.0} ms (mean, first codiff)", ms.iter().sum::<f64>() / ms.len().max(1) as f64);
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("flicker: {e}");
        std::process::exit(1);
    }
}
