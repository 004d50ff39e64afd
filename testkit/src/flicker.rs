//! The flicker measurement shared by `examples/flicker.rs` and `tests/flicker.rs`.
//!
//! A scene is held still or panned by `pan` pixels per frame; every frame gets
//! fresh Gaussian sensor noise and goes through
//! `jpegenc quality=QF ! jpegdec ! tee`, and from the tee through one `codiff`
//! per branch (each with its own properties), the way an MJPEG camera feed is
//! restored. The report holds every sequence as packed RGB, so that the caller
//! can compare the input with each branch's output on the same frames.
use gst::prelude::*;

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub frames: usize,
    pub qf: u32,
    /// Sensor noise standard deviation (code values).
    pub noise: f64,
    /// Horizontal pan, pixels per frame (0 = still).
    pub pan: usize,
    pub width: usize,
    pub height: usize,
    /// Push the frames as a live source at this rate (real time, sinks
    /// synchronised), so that codiff meets frames it cannot restore in time
    /// (`late-frames`); `None`: as fast as codiff takes them.
    pub live_fps: Option<u32>,
}

/// The sequences of one run, each frame packed RGB of `width x height`.
pub struct Report {
    /// The scene crops without noise (what a perfect restorer would output).
    pub truth: Vec<Vec<u8>>,
    /// Scene plus sensor noise (what the encoder got).
    pub noisy: Vec<Vec<u8>>,
    /// The decoded JPEG frames (codiff's input).
    pub input: Vec<Vec<u8>>,
    /// Per branch: its codiff properties and its output.
    pub outputs: Vec<(String, Vec<Vec<u8>>)>,
    /// QF estimates (`codiff-qf` messages: one per frame that went through the
    /// restorer, not for frames carried live) and processing times (ms) of the
    /// first branch.
    pub qfs: Vec<f64>,
    pub ms: Vec<f64>,
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
/// show of the scene (frame t+1 is the scene shifted left by `pan`): (mean over
/// the pairs, worst pair).
pub fn consecutive_mad(frames: &[Vec<u8>], w: usize, h: usize, pan: usize) -> (f64, f64) {
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

/// RGB PSNR (dB) of `frames` against `truth`, from the MSE over all frames.
pub fn psnr(frames: &[Vec<u8>], truth: &[Vec<u8>]) -> f64 {
    let flat = |v: &[Vec<u8>]| -> Vec<f64> { v.iter().flatten().map(|&x| x as f64).collect() };
    crate::metrics::psnr_from_mse(crate::metrics::mse(&flat(frames), &flat(truth)))
}

fn pull(sink: &gst::Element, w: usize, h: usize) -> Result<Vec<u8>, String> {
    let sample: Option<gst::Sample> = sink.emit_by_name("try-pull-sample", &[&300_000_000_000u64]);
    let sample = sample.ok_or_else(|| format!("{}: no frame within 300 s", sink.name()))?;
    let buffer = sample.buffer().ok_or("sample without buffer")?;
    let map = buffer.map_readable().map_err(|e| e.to_string())?;
    let stride = (w * 3 + 3) & !3;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        rgb.extend_from_slice(&map[y * stride..y * stride + w * 3]);
    }
    Ok(rgb)
}

/// Run `cfg` on `scene` (at least `width + pan * (frames - 1)` by `height`),
/// one codiff per entry of `branches` (properties as on a gst-launch line).
/// The plugin must be registered (`gst::init`, `plugin_register_static`).
pub fn run(cfg: &Config, scene: &image::RgbImage, branches: &[String]) -> Result<Report, String> {
    let (w, h) = (cfg.width, cfg.height);
    let need_w = w + cfg.pan * cfg.frames.saturating_sub(1);
    if (scene.width() as usize) < need_w || (scene.height() as usize) < h {
        return Err(format!(
            "scene {}x{} is smaller than {need_w}x{h} (frames plus pan)",
            scene.width(),
            scene.height()
        ));
    }
    let unbounded = "queue max-size-time=0 max-size-buffers=0 max-size-bytes=0";
    let rgb = "videoconvert ! video/x-raw,format=RGB";
    let (fps, live, sync) = match cfg.live_fps {
        Some(fps) => (fps.max(1), "is-live=true do-timestamp=true", true),
        None => (10, "", false),
    };
    let mut launch = format!(
        "appsrc name=src format=time {live} caps=video/x-raw,format=RGB,width={w},height={h},framerate={fps}/1 ! \
         videoconvert ! video/x-raw,format=I420 ! jpegenc quality={q} ! jpegdec ! tee name=t \
         t. ! {unbounded} ! {rgb} ! appsink name=input sync={sync}",
        q = cfg.qf.clamp(1, 100)
    );
    for (i, props) in branches.iter().enumerate() {
        // live: no queue before codiff, so that it meets each frame when it is due
        let before = if cfg.live_fps.is_some() {
            "queue max-size-buffers=1 max-size-bytes=0 max-size-time=0"
        } else {
            unbounded
        };
        launch.push_str(&format!(
            " t. ! {before} ! codiff name=codiff{i} {props} ! {rgb} ! appsink name=out{i} sync={sync}"
        ));
    }
    let pipeline = gst::parse::launch(&launch)
        .map_err(|e| e.to_string())?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "not a pipeline".to_string())?;
    let src = pipeline.by_name("src").unwrap();
    let input_sink = pipeline.by_name("input").unwrap();
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).map_err(|e| format!("{e}"))?;
    let result = (|| {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let started = std::time::Instant::now();
        let (mut truth, mut noisy) = (Vec::new(), Vec::new());
        for t in 0..cfg.frames {
            let x0 = t * cfg.pan;
            let mut clean = Vec::with_capacity(w * h * 3);
            let mut frame = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    let p = scene.get_pixel((x0 + x) as u32, y as u32);
                    for k in 0..3 {
                        clean.push(p[k]);
                        let v = p[k] as f64 + cfg.noise * noise.gauss();
                        frame.push(v.round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
            let mut buffer = gst::Buffer::from_slice(frame.clone());
            if cfg.live_fps.is_none() {
                let b = buffer.get_mut().unwrap();
                b.set_pts(gst::ClockTime::from_mseconds(100 * t as u64));
                b.set_duration(gst::ClockTime::from_mseconds(100));
            } else {
                // real time: frame t leaves the camera t / fps after the first
                let due = started + std::time::Duration::from_secs_f64(t as f64 / fps as f64);
                std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            }
            let flow = src.emit_by_name::<gst::FlowReturn>("push-buffer", &[&buffer]);
            if flow != gst::FlowReturn::Ok {
                return Err(format!("appsrc refused frame {t}: {flow:?}"));
            }
            truth.push(clean);
            noisy.push(frame);
        }
        let _ = src.emit_by_name::<gst::FlowReturn>("end-of-stream", &[]);

        let input = (0..cfg.frames).map(|_| pull(&input_sink, w, h)).collect::<Result<Vec<_>, _>>()?;
        let mut outputs = Vec::new();
        for (i, props) in branches.iter().enumerate() {
            let sink = pipeline.by_name(&format!("out{i}")).unwrap();
            let frames = (0..cfg.frames).map(|_| pull(&sink, w, h)).collect::<Result<Vec<_>, _>>()?;
            outputs.push((props.clone(), frames));
        }
        let (mut qfs, mut ms) = (Vec::new(), Vec::new());
        while let Some(msg) = bus.pop() {
            match msg.view() {
                gst::MessageView::Element(e) => {
                    let first = msg.src().is_some_and(|s| s.name() == "codiff0");
                    if let Some(s) = e.structure().filter(|s| first && s.name() == "codiff-qf") {
                        qfs.push(s.get::<f64>("qf").unwrap_or(f64::NAN));
                        ms.push(s.get::<u64>("processing-time").unwrap_or(0) as f64 / 1e6);
                    }
                }
                gst::MessageView::Error(e) => return Err(format!("{} ({:?})", e.error(), e.debug())),
                _ => {}
            }
        }
        Ok(Report { truth, noisy, input, outputs, qfs, ms })
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}
