//! Flicker benchmark: does the restored video flicker more than its input?
//!
//! ```sh
//! cargo run --release --example flicker -- [--frames 30] [--qf 15] [--noise 2] [--pan 0]
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
//! * the per-frame QF estimate (`codiff-qf` messages): mean, standard deviation,
//!   min and max.
use std::path::PathBuf;

use clap::Parser;
use gst::prelude::*;

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
    /// Extra codiff properties, e.g. "device=cuda:0"
    #[arg(long, default_value = "")]
    codiff: String,
}

/// Gaussian noise from a xorshift generator (Box-Muller), deterministic.
struct Noise(u64);

impl Noise {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Mean absolute difference between consecutive frames over the columns both
/// show of the scene (frame t+1 is the scene shifted left by `pan`).
fn consecutive_mad(frames: &[Vec<u8>], w: usize, h: usize, pan: usize) -> (f64, f64) {
    let per_pair: Vec<f64> = frames
        .windows(2)
        .map(|p| {
            let (a, b) = (&p[0], &p[1]);
            let mut sum = 0u64;
            let mut n = 0u64;
            for y in 0..h {
                // scene column c is at column c - t*pan in frame t
                for x in pan..w {
                    for k in 0..3 {
                        let va = a[(y * w + x) * 3 + k] as i64;
                        let vb = b[(y * w + x - pan) * 3 + k] as i64;
                        sum += (va - vb).unsigned_abs();
                        n += 1;
                    }
                }
            }
            sum as f64 / n.max(1) as f64
        })
        .collect();
    let mean = per_pair.iter().sum::<f64>() / per_pair.len().max(1) as f64;
    let max = per_pair.iter().cloned().fold(0.0, f64::max);
    (mean, max)
}

fn pull(sink: &gst::Element, w: usize, h: usize) -> Result<Vec<u8>, String> {
    let sample: Option<gst::Sample> = sink.emit_by_name("try-pull-sample", &[&60_000_000_000u64]);
    let sample = sample.ok_or("no frame within 60 s")?;
    let buffer = sample.buffer().ok_or("sample without buffer")?;
    let map = buffer.map_readable().map_err(|e| e.to_string())?;
    let stride = (w * 3 + 3) & !3;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        rgb.extend_from_slice(&map[y * stride..y * stride + w * 3]);
    }
    Ok(rgb)
}

fn run(args: &Args) -> Result<(), String> {
    let (w, h) = args
        .size
        .split_once('x')
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .ok_or_else(|| format!("--size {}: expected WIDTHxHEIGHT", args.size))?;
    let scene_path = args
        .scene
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut.png"));
    let scene = image::open(&scene_path).map_err(|e| format!("{}: {e}", scene_path.display()))?.to_rgb8();
    let need_w = w + args.pan * args.frames.saturating_sub(1);
    if (scene.width() as usize) < need_w || (scene.height() as usize) < h {
        return Err(format!(
            "{}: {}x{} is smaller than {need_w}x{h} (frames plus pan)",
            scene_path.display(),
            scene.width(),
            scene.height()
        ));
    }

    gst::init().map_err(|e| e.to_string())?;
    gstcodiff::plugin_register_static().map_err(|e| e.to_string())?;
    let unbounded = "queue max-size-time=0 max-size-buffers=0 max-size-bytes=0";
    let rgb = "videoconvert ! video/x-raw,format=RGB";
    let pipeline = gst::parse::launch(&format!(
        "appsrc name=src format=time caps=video/x-raw,format=RGB,width={w},height={h},framerate=10/1 ! \
         videoconvert ! video/x-raw,format=I420 ! jpegenc quality={q} ! jpegdec ! tee name=t \
         t. ! {unbounded} ! {rgb} ! appsink name=input sync=false \
         t. ! {unbounded} ! codiff {props} ! {rgb} ! appsink name=restored sync=false",
        q = args.qf.clamp(1, 100),
        props = args.codiff
    ))
    .map_err(|e| e.to_string())?
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = pipeline.by_name("src").unwrap();
    let input_sink = pipeline.by_name("input").unwrap();
    let restored_sink = pipeline.by_name("restored").unwrap();
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).map_err(|e| format!("{e}"))?;

    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut clean = Vec::with_capacity(args.frames);
    for t in 0..args.frames {
        let x0 = t * args.pan;
        let mut frame = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let p = scene.get_pixel((x0 + x) as u32, y as u32);
                for k in 0..3 {
                    let v = p[k] as f64 + args.noise * noise.gauss();
                    frame.push(v.round().clamp(0.0, 255.0) as u8);
                }
            }
        }
        let mut buffer = gst::Buffer::from_slice(frame.clone());
        {
            let b = buffer.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_mseconds(100 * t as u64));
            b.set_duration(gst::ClockTime::from_mseconds(100));
        }
        let flow = src.emit_by_name::<gst::FlowReturn>("push-buffer", &[&buffer]);
        if flow != gst::FlowReturn::Ok {
            return Err(format!("appsrc refused frame {t}: {flow:?}"));
        }
        clean.push(frame);
    }
    let _ = src.emit_by_name::<gst::FlowReturn>("end-of-stream", &[]);

    let mut input = Vec::new();
    let mut restored = Vec::new();
    for _ in 0..args.frames {
        input.push(pull(&input_sink, w, h)?);
    }
    for _ in 0..args.frames {
        restored.push(pull(&restored_sink, w, h)?);
    }
    let mut qfs = Vec::new();
    let mut ms = Vec::new();
    while let Some(msg) = bus.pop() {
        match msg.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "codiff-qf") {
                    qfs.push(s.get::<f64>("qf").unwrap_or(f64::NAN));
                    ms.push(s.get::<u64>("processing-time").unwrap_or(0) as f64 / 1e6);
                }
            }
            gst::MessageView::Error(e) => return Err(format!("{} ({:?})", e.error(), e.debug())),
            _ => {}
        }
    }
    let _ = pipeline.set_state(gst::State::Null);

    let (clean_mad, clean_max) = consecutive_mad(&clean, w, h, args.pan);
    let (in_mad, in_max) = consecutive_mad(&input, w, h, args.pan);
    let (out_mad, out_max) = consecutive_mad(&restored, w, h, args.pan);
    let n = qfs.len().max(1) as f64;
    let qf_mean = qfs.iter().sum::<f64>() / n;
    let qf_std = (qfs.iter().map(|q| (q - qf_mean).powi(2)).sum::<f64>() / n).sqrt();
    let qf_min = qfs.iter().cloned().fold(f64::INFINITY, f64::min);
    let qf_max = qfs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "flicker: {} frames {w}x{h}, JPEG quality {}, noise sigma {}, pan {} px/frame",
        args.frames, args.qf, args.noise, args.pan
    );
    println!("consecutive-frame mean abs difference (code values, mean / worst pair):");
    println!("  clean + noise  {clean_mad:6.3} / {clean_max:6.3}");
    println!("  JPEG input     {in_mad:6.3} / {in_max:6.3}");
    println!(
        "  codiff output  {out_mad:6.3} / {out_max:6.3}   ({:+.1} % vs input)",
        100.0 * (out_mad / in_mad.max(1e-9) - 1.0)
    );
    println!(
        "QF estimate over {} frames: mean {qf_mean:.2}, std {qf_std:.2}, min {qf_min:.1}, max {qf_max:.1}",
        qfs.len()
    );
    println!("codiff time per frame: {:.0} ms (mean)", ms.iter().sum::<f64>() / ms.len().max(1) as f64);
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("flicker: {e}");
        std::process::exit(1);
    }
}
