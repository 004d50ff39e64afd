//! Do no harm (`engine::guard`): frames that were never JPEG-compressed come
//! out bit for bit, a black frame stays black, and a test pattern the model
//! was never trained on is not made worse, through the engine and through
//! `jpegdec ! codiff` in a real pipeline.
#![cfg(feature = "gst")]

use std::path::{Path, PathBuf};

use gst::prelude::*;
use gstcodiff::engine::{Engine, ModelSpec, QfSource, RestoreOptions, RgbImage};

use codiff_testkit::setup::{init, psnr, weights_or_skip};

fn work_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("do-no-harm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run a launch line to EOS (at most 120 s); panics with the error otherwise.
fn run(description: &str) {
    init();
    let pipeline = gst::parse::launch(description).expect("pipeline parses");
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).expect("pipeline starts");
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(120), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("EOS or error within 120 s");
    pipeline.set_state(gst::State::Null).unwrap();
    if let gst::MessageView::Error(err) = msg.view() {
        panic!("`{description}`: {} ({:?})", err.error(), err.debug());
    }
}

/// `source` (a launch-line fragment producing raw video) through `middle`,
/// written as an RGB PNG and read back.
fn rgb_of(dir: &Path, name: &str, source: &str, middle: &str) -> Vec<u8> {
    let png = dir.join(format!("{name}.png"));
    run(&format!(
        "{source} ! {middle} ! videoconvert ! video/x-raw,format=RGB ! pngenc ! filesink location=\"{}\"",
        png.display()
    ));
    image::open(&png).unwrap().to_rgb8().into_raw()
}

fn engine() -> Engine {
    Engine::load(&ModelSpec::compact_default(), &mut |_| {}).unwrap()
}

/// The clean README photo (never compressed) is left exactly as it is, and
/// its JPEG is restored with the quality read from its quantisation tables.
#[test]
fn the_engine_leaves_never_compressed_frames_alone() {
    if !weights_or_skip() {
        return;
    }
    let engine = engine();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let clean = image::open(data.join("astronaut.png")).unwrap().to_rgb8();
    let (w, h) = (clean.width() as usize, clean.height() as usize);
    let clean = RgbImage::new(w, h, clean.into_raw()).unwrap();
    let mut out = clean.clone();
    let r = engine.restore_report(&mut out, &RestoreOptions::default()).unwrap();
    assert!(!r.restored, "{r:?}");
    assert_eq!(r.qf_source, QfSource::Unquantised);
    assert_eq!(out, clean, "a never-compressed frame must come out bit for bit");
    // without the guard the bare model changes it
    let mut bare = clean.clone();
    engine.restore(&mut bare, &RestoreOptions { guard: false, ..Default::default() }).unwrap();
    assert_ne!(bare, clean);

    let jpeg = image::open(data.join("astronaut-q10.jpg")).unwrap().to_rgb8();
    let mut img = RgbImage::new(w, h, jpeg.into_raw()).unwrap();
    let input = img.clone();
    let r = engine.restore_report(&mut img, &RestoreOptions::default()).unwrap();
    assert!(r.restored, "{r:?}");
    assert_eq!((r.qf, r.qf_source), (10.0, QfSource::Tables), "{r:?}");
    let (before, after) = (psnr(&input.data, &clean.data), psnr(&img.data, &clean.data));
    eprintln!("astronaut QF 10: JPEG {before:.2} dB, guarded codiff {after:.2} dB");
    assert!(after > before + 0.5, "JPEG {before:.2} dB, codiff {after:.2} dB");
}

/// Black stays black in the engine, and black compressed hard comes out of
/// `jpegdec ! codiff` exactly as the decoder made it.
#[test]
fn a_black_frame_stays_black() {
    if !weights_or_skip() {
        return;
    }
    let mut black = RgbImage::new(64, 48, vec![0; 64 * 48 * 3]).unwrap();
    let r = engine().restore_report(&mut black, &RestoreOptions::default()).unwrap();
    assert!(!r.restored && black.data.iter().all(|&v| v == 0), "{r:?}");

    let dir = work_dir("black");
    let source =
        "videotestsrc pattern=black num-buffers=1 ! video/x-raw,width=320,height=240 ! jpegenc quality=15 ! jpegdec";
    let decoded = rgb_of(&dir, "jpeg", source, "identity");
    let restored = rgb_of(&dir, "codiff", source, "codiff");
    assert_eq!(restored, decoded, "codiff changed a black frame");
    let _ = std::fs::remove_dir_all(&dir);
}

/// GStreamer's own test patterns at JPEG quality 90 (`jpegenc ! jpegdec`)
/// come out of codiff no further from the pattern than the JPEG was, and
/// the pattern itself, never compressed, comes out bit for bit (I420: the
/// element writes nothing back when the guard leaves the frame alone).
#[test]
fn test_patterns_are_not_made_worse() {
    if !weights_or_skip() {
        return;
    }
    let dir = work_dir("patterns");
    for pattern in ["smpte", "zone-plate kx2=32 ky2=32", "ball"] {
        let name = pattern.split(' ').next().unwrap();
        let src =
            format!("videotestsrc pattern={pattern} num-buffers=1 ! video/x-raw,width=320,height=240,format=I420");
        let clean = rgb_of(&dir, &format!("{name}-clean"), &src, "identity");
        let untouched = rgb_of(&dir, &format!("{name}-codiff-clean"), &src, "codiff");
        assert_eq!(untouched, clean, "{pattern}: a never-compressed frame was changed");
        let jpeg = format!("{src} ! jpegenc quality=90 ! jpegdec");
        let decoded = rgb_of(&dir, &format!("{name}-q90"), &jpeg, "identity");
        let restored = rgb_of(&dir, &format!("{name}-q90-codiff"), &jpeg, "codiff");
        let (before, after) = (psnr(&decoded, &clean), psnr(&restored, &clean));
        eprintln!("{pattern} at quality 90: JPEG {before:.2} dB, codiff {after:.2} dB");
        assert!(after >= before - 0.1, "{pattern}: JPEG {before:.2} dB, codiff {after:.2} dB");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The guard can be switched off: the bare model then changes a clean frame.
#[test]
fn guard_false_restores_every_frame() {
    if !weights_or_skip() {
        return;
    }
    let dir = work_dir("guard-off");
    let src = "videotestsrc pattern=smpte num-buffers=1 ! video/x-raw,width=320,height=240,format=I420";
    let clean = rgb_of(&dir, "clean", src, "identity");
    let bare = rgb_of(&dir, "bare", src, "codiff guard=false");
    assert_ne!(bare, clean);
    let _ = std::fs::remove_dir_all(&dir);
}
