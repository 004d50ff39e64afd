//! Real video through files: an MJPEG AVI made here from clean frames with
//! `jpegenc quality=15` goes through
//! `decodebin ! codiff ! videoconvert ! jpegenc quality=100 ! avimux`; the result
//! is a valid AVI with the same frame count, timestamps and durations, and every
//! restored frame is closer to its clean source than the compressed one.
#![cfg(feature = "gst")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use gst::prelude::*;

use codiff_testkit::setup::{init, packed_rgb, psnr, weights_or_skip};

const FRAMES: usize = 4;
const WIDTH: u32 = 192;
const HEIGHT: u32 = 128;
/// Pixels the scene pans per frame (a slow camera pan).
const PAN: u32 = 8;

/// A fresh folder under the target dir (removed at the end of a passing test).
fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("video-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run a launch line to EOS (bounded); error text on failure.
fn run(description: &str) -> Result<(), String> {
    let pipeline = gst::parse::launch(description).map_err(|e| format!("{description}: {e}"))?;
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).map_err(|e| format!("{e}"))?;
    let result = loop {
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_seconds(120)) else {
            break Err(format!("{description}: no EOS within 120 s"));
        };
        match msg.view() {
            gst::MessageView::Eos(_) => break Ok(()),
            gst::MessageView::Error(e) => break Err(format!("{}: {:?}", e.error(), e.debug())),
            _ => {}
        }
    };
    let _ = pipeline.set_state(gst::State::Null);
    result
}

/// Demux and decode an AVI: every frame's (pts, duration) as the demuxer gives
/// them, and the decoded RGB pixels.
/// One frame of an AVI: pts, duration, bytes.
type AviFrame = (Option<gst::ClockTime>, Option<gst::ClockTime>, Vec<u8>);

fn read_avi(path: &Path) -> Result<Vec<AviFrame>, String> {
    let pipeline = gst::parse::launch(&format!(
        "filesrc location=\"{}\" ! avidemux ! identity name=timing ! jpegdec ! videoconvert ! \
         video/x-raw,format=RGB ! appsink name=sink sync=false",
        path.display()
    ))
    .map_err(|e| e.to_string())?
    .downcast::<gst::Pipeline>()
    .unwrap();
    // Timestamps straight from the demuxer, before any decoder.
    let timing = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let timing = timing.clone();
        pipeline.by_name("timing").unwrap().static_pad("src").unwrap().add_probe(
            gst::PadProbeType::BUFFER,
            move |_, info| {
                if let Some(b) = info.buffer() {
                    timing.lock().unwrap().push((b.pts(), b.duration()));
                }
                gst::PadProbeReturn::Ok
            },
        );
    }
    let sink = pipeline.by_name("sink").unwrap();
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).map_err(|e| e.to_string())?;
    let mut pixels = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let result = loop {
        if std::time::Instant::now() > deadline {
            break Err("reading the AVI took over 60 s".to_string());
        }
        if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = msg.view() {
                break Err(format!("{}: {:?}", e.error(), e.debug()));
            }
        }
        let sample: Option<gst::Sample> = sink.emit_by_name("try-pull-sample", &[&500_000_000u64]);
        match sample {
            Some(sample) => {
                let map = sample.buffer().unwrap().map_readable().unwrap();
                pixels.push(packed_rgb(&map, WIDTH as usize, HEIGHT as usize));
            }
            None if sink.property::<bool>("eos") => break Ok(()),
            None => {}
        }
    };
    let _ = pipeline.set_state(gst::State::Null);
    result?;
    let timing = timing.lock().unwrap().clone();
    if timing.len() != pixels.len() {
        return Err(format!("{} demuxed frames but {} decoded", timing.len(), pixels.len()));
    }
    Ok(timing.into_iter().zip(pixels).map(|((p, d), px)| (p, d, px)).collect())
}

#[test]
fn mjpeg_avi_through_codiff_keeps_frames_and_timing_and_restores_each_frame() {
    init();
    if !weights_or_skip() {
        return;
    }
    let dir = work_dir();
    // Clean frames: a slow pan across the README's astronaut photo.
    let scene =
        image::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut.png")).unwrap().to_rgb8();
    let mut clean = Vec::new();
    for t in 0..FRAMES as u32 {
        let frame = image::imageops::crop_imm(&scene, 100 + t * PAN, 40, WIDTH, HEIGHT).to_image();
        frame.save(dir.join(format!("clean-{t}.png"))).unwrap();
        clean.push(frame.into_raw());
    }

    let input = dir.join("input.avi");
    let output = dir.join("restored.avi");
    run(&format!(
        "multifilesrc location=\"{}/clean-%d.png\" index=0 stop-index={} caps=image/png,framerate=5/1 ! \
         pngdec ! videoconvert ! video/x-raw,format=I420 ! jpegenc quality=15 ! avimux ! filesink location=\"{}\"",
        dir.display(),
        FRAMES - 1,
        input.display()
    ))
    .expect("making the MJPEG AVI");
    run(&format!(
        "filesrc location=\"{}\" ! decodebin ! codiff ! videoconvert ! jpegenc quality=100 ! avimux ! \
         filesink location=\"{}\"",
        input.display(),
        output.display()
    ))
    .expect("restoring the AVI");

    let before = read_avi(&input).expect("input AVI reads back");
    let after = read_avi(&output).expect("restored AVI is a valid AVI");
    assert_eq!(before.len(), FRAMES, "input frame count");
    assert_eq!(after.len(), FRAMES, "restored frame count");
    for (t, ((pts_in, dur_in, jpeg), (pts_out, dur_out, restored))) in before.iter().zip(&after).enumerate() {
        assert_eq!((pts_out, dur_out), (pts_in, dur_in), "frame {t}: timestamp and duration");
        assert_eq!(*pts_in, Some(gst::ClockTime::from_mseconds(200 * t as u64)), "frame {t}: 5 fps timestamps");
        let (p_jpeg, p_restored) = (psnr(jpeg, &clean[t]), psnr(restored, &clean[t]));
        eprintln!("frame {t}: JPEG {p_jpeg:.2} dB -> restored {p_restored:.2} dB");
        assert!(p_restored > p_jpeg + 0.05, "frame {t}: restored {p_restored:.2} dB, JPEG {p_jpeg:.2} dB");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
