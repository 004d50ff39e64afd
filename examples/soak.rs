//! Soak benchmark: pushes thousands of JPEG-compressed frames through one `codiff`
//! element in one process, samples the resident memory (RSS) as it goes, and prints
//! the memory slope after warm-up (bytes per frame, by least squares) and the
//! frames per second.
//!
//! ```text
//! cargo run --release --example soak -- [--frames 2000] [--width 320] [--height 240]
//!     [--quality 10] [--sample-every 50] [--warm-up 0.2] [PROPERTY=VALUE ...]
//! ```
//!
//! The stream is `videotestsrc pattern=ball ! jpegenc quality=Q ! jpegdec ! codiff !
//! fakesink` (a moving scene, so every frame differs); trailing `PROPERTY=VALUE`
//! arguments are set on `codiff` (e.g. `n-threads=2`, `mode=diffusion ...`).
use clap::Parser;
use gst::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Frames to push.
    #[arg(long, default_value_t = 2000)]
    frames: u32,
    #[arg(long, default_value_t = 320)]
    width: u32,
    #[arg(long, default_value_t = 240)]
    height: u32,
    /// JPEG quality of the compressed stream.
    #[arg(long, default_value_t = 10)]
    quality: i32,
    /// Sample RSS every this many frames.
    #[arg(long, default_value_t = 50)]
    sample_every: u32,
    /// Fraction of the frames left out of the slope and the fps (warm-up).
    #[arg(long, default_value_t = 0.2)]
    warm_up: f64,
    /// Properties of codiff, as PROPERTY=VALUE.
    properties: Vec<String>,
}

/// Resident set size of this process in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) =
        points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + (x - mx) * (y - my), b + (x - mx) * (x - mx)));
    if sxx > 0.0 {
        sxy / sxx
    } else {
        0.0
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    gst::init()?;
    gstcodiff::plugin_register_static()?;

    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers={} pattern=ball ! video/x-raw,format=I420,width={},height={},framerate=30/1 \
         ! jpegenc quality={} ! jpegdec ! codiff name=codiff ! fakesink name=sink sync=false signal-handoffs=true",
        args.frames, args.width, args.height, args.quality
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    let codiff = pipeline.by_name("codiff").ok_or("no codiff")?;
    codiff.set_property("post-messages", false);
    for p in &args.properties {
        let (name, value) = p.split_once('=').ok_or_else(|| format!("`{p}`: expected PROPERTY=VALUE"))?;
        codiff.set_property_from_str(name, value);
    }

    // (frame, seconds since the first frame, RSS bytes)
    let samples: Arc<Mutex<Vec<(u32, f64, u64)>>> = Arc::default();
    let sink = pipeline.by_name("sink").ok_or("no sink")?;
    {
        let samples = samples.clone();
        let every = args.sample_every.max(1);
        let counter = Mutex::new((0u32, None::<Instant>));
        sink.connect("handoff", false, move |_| {
            let mut c = counter.lock().unwrap();
            c.0 += 1;
            let frame = c.0;
            let t0 = *c.1.get_or_insert_with(Instant::now);
            if frame == 1 || frame.is_multiple_of(every) {
                samples.lock().unwrap().push((frame, t0.elapsed().as_secs_f64(), rss_bytes()));
            }
            None
        });
    }

    let started = Instant::now();
    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().ok_or("no bus")?;
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::NONE, &[gst::MessageType::Eos, gst::MessageType::Error])
        .ok_or("no EOS")?;
    pipeline.set_state(gst::State::Null)?;
    if let gst::MessageView::Error(err) = msg.view() {
        return Err(format!("{} ({:?})", err.error(), err.debug()).into());
    }

    let samples = samples.lock().unwrap().clone();
    println!("frame  seconds  RSS MB");
    for (frame, t, rss) in &samples {
        println!("{frame:5}  {t:7.1}  {:7.1}", *rss as f64 / 1e6);
    }
    let skip = (args.frames as f64 * args.warm_up) as u32;
    let steady: Vec<_> = samples.iter().filter(|s| s.0 >= skip.max(1)).collect();
    let (Some(first), Some(last)) = (steady.first(), steady.last()) else {
        return Err("too few frames to measure".into());
    };
    let points: Vec<(f64, f64)> = steady.iter().map(|s| (s.0 as f64, s.2 as f64)).collect();
    let fps = (last.0 - first.0) as f64 / (last.1 - first.1).max(1e-9);
    println!(
        "{} frames {}x{} (JPEG quality {}) in {:.1} s; after warm-up (frames {}..{}): \
         {:.2} fps, RSS {:.1} -> {:.1} MB, slope {:.1} bytes/frame",
        args.frames,
        args.width,
        args.height,
        args.quality,
        started.elapsed().as_secs_f64(),
        first.0,
        last.0,
        fps,
        first.2 as f64 / 1e6,
        last.2 as f64 / 1e6,
        slope(&points) + 0.0 // no "-0.0"
    );
    Ok(())
}
