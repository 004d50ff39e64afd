//! A live source through `codiff` into a synchronising sink, measured: how far
//! behind the clock the sink renders, how many frames codiff restored and how
//! many of those the sink showed, and the process's memory. Used by
//! `examples/live.rs` (the benchmark) and `tests/live.rs` (bounded checks).
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gst::prelude::*;

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct LiveRun {
    /// Frames the sink rendered.
    pub shown: u64,
    /// Frames codiff restored (`codiff-qf` messages with `restored=true`).
    pub restored: u64,
    /// Restored frames the sink rendered.
    pub restored_shown: u64,
    /// How far behind the clock the last rendered frame was (s): render time
    /// minus the frame's running time minus the pipeline latency.
    pub last_lag: f64,
    /// The largest such lag (s).
    pub max_lag: f64,
    /// The pipeline latency (s).
    pub latency: f64,
    /// Resident memory (MB) halfway through (after the first restorations
    /// have taken their working memory) and at the end.
    pub rss_start_mb: f64,
    pub rss_end_mb: f64,
}

pub fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `videotestsrc is-live=true pattern=snow` (noise: every block carries
/// detail, so the guard restores every frame) at `width`x`height` and `fps`,
/// `jpegenc quality=20 ! jpegdec`, then `middle` (e.g. `codiff` or `codiff !
/// queue`), into `fakesink sync=true qos=<qos>`, for `seconds`.
pub fn run_live(width: u32, height: u32, fps: u32, seconds: u32, middle: &str, qos: bool) -> LiveRun {
    let description = format!(
        "videotestsrc is-live=true pattern=snow num-buffers={} ! video/x-raw,width={width},height={height},framerate={fps}/1 ! \
         jpegenc quality=20 ! jpegdec ! {middle} ! fakesink name=sink sync=true qos={qos} signal-handoffs=true",
        seconds * fps
    );
    let pipeline = gst::parse::launch(&description).expect("pipeline").downcast::<gst::Pipeline>().unwrap();
    let sink = pipeline.by_name("sink").unwrap();
    let run = Arc::new(Mutex::new(LiveRun::default()));
    {
        let (run, pipeline_weak) = (run.clone(), pipeline.downgrade());
        sink.connect("handoff", false, move |args| {
            let buffer = args[1].get::<gst::Buffer>().ok()?;
            let sink = args[0].get::<gst::Element>().ok()?;
            let pipeline = pipeline_weak.upgrade()?;
            let (clock, base) = (sink.clock()?, sink.base_time()?);
            let pts = buffer.pts()?;
            let now = clock.time().saturating_sub(base);
            let mut q = gst::query::Latency::new();
            let latency = if pipeline.query(&mut q) { q.result().1 } else { gst::ClockTime::ZERO };
            let lag = (now.nseconds() as f64 - pts.nseconds() as f64 - latency.nseconds() as f64) / 1e9;
            let mut r = run.lock().unwrap();
            r.shown += 1;
            r.last_lag = lag;
            r.max_lag = r.max_lag.max(lag);
            r.latency = latency.nseconds() as f64 / 1e9;
            let restored = gst::meta::CustomMeta::from_buffer(&buffer, "CodiffQfMeta")
                .ok()
                .and_then(|m| m.structure().get::<bool>("restored").ok())
                .unwrap_or(false);
            if restored {
                r.restored_shown += 1;
            }
            None
        });
    }
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).expect("pipeline starts");
    let started = std::time::Instant::now();
    let limit = Duration::from_secs(seconds as u64 + 60);
    loop {
        if run.lock().unwrap().rss_start_mb == 0.0 && started.elapsed() > Duration::from_secs_f64(seconds as f64 / 2.0)
        {
            run.lock().unwrap().rss_start_mb = rss_mb();
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            assert!(started.elapsed() < limit, "no EOS within {limit:?}");
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => panic!("{} ({:?})", e.error(), e.debug()),
            gst::MessageView::Latency(_) => {
                let _ = pipeline.recalculate_latency();
            }
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "codiff-qf") {
                    if s.get::<bool>("restored").unwrap_or(false) {
                        run.lock().unwrap().restored += 1;
                    }
                }
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    let mut r = run.lock().unwrap().clone();
    r.rss_end_mb = rss_mb();
    r
}
