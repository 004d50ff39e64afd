//! Flicker through the element (issue #13): a still, noisy scene compressed
//! frame by frame at QF 15 and restored by `codiff` with the default
//! `temporal-smoothing` changes no more from frame to frame than its JPEG input,
//! less than without smoothing, and is no further from the noiseless scene; on a
//! panning scene the smoothing costs no PSNR. The measurement is
//! `testkit/src/flicker.rs` (also `examples/flicker.rs`).
//!
//! Needs the default weights (`$CODIFF_WEIGHTS` or
//! `weights/codiff-cave-compact.safetensors`); without them it prints why and
//! returns, or fails under `CODIFF_REQUIRE_MODEL=1`.
#![cfg(feature = "gst")]

use codiff_testkit::flicker;
use codiff_testkit::setup as common;

use common::weights_or_skip;
use flicker::{consecutive_mad, psnr, Config};
use gst::prelude::*;

fn scene() -> image::RgbImage {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut.png");
    image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

#[test]
fn the_default_element_does_not_flicker_more_than_its_input() {
    if !weights_or_skip() {
        return;
    }
    common::init();
    let element = gst::ElementFactory::make("codiff").build().unwrap();
    let default = element.property::<f64>("temporal-smoothing");
    assert!(default > 0.0, "smoothing is on by default");
    let pspec = element.find_property("temporal-smoothing").unwrap();
    assert!(pspec.flags().contains(gst::PARAM_FLAG_MUTABLE_PLAYING), "live");
    assert!(pspec.blurb().unwrap_or_default().len() > 20);
    let scene = scene();
    let branches = ["temporal-smoothing=0".to_string(), String::new()];
    let (w, h) = (160, 120);

    let still = Config { frames: 10, qf: 15, noise: 2.0, pan: 0, width: w, height: h, live_fps: None };
    let r = flicker::run(&still, &scene, &branches).unwrap();
    let input = consecutive_mad(&r.input, w, h, 0).0;
    let off = consecutive_mad(&r.outputs[0].1, w, h, 0).0;
    let on = consecutive_mad(&r.outputs[1].1, w, h, 0).0;
    let (psnr_in, psnr_off, psnr_on) =
        (psnr(&r.input, &r.truth), psnr(&r.outputs[0].1, &r.truth), psnr(&r.outputs[1].1, &r.truth));
    eprintln!(
        "still: flicker input {input:.3}, smoothing off {off:.3}, default {on:.3}; \
         PSNR {psnr_in:.2} / {psnr_off:.2} / {psnr_on:.2} dB"
    );
    assert!(on <= input, "default output flickers {on:.3} > input {input:.3}");
    assert!(on < off, "smoothing {on:.3} vs none {off:.3}");
    assert!(psnr_on >= psnr_off - 0.05, "{psnr_on:.2} vs {psnr_off:.2} dB");

    let panning = Config { frames: 5, pan: 2, ..still };
    let r = flicker::run(&panning, &scene, &branches).unwrap();
    let (psnr_off, psnr_on) = (psnr(&r.outputs[0].1, &r.truth), psnr(&r.outputs[1].1, &r.truth));
    eprintln!("panning 2 px/frame: PSNR smoothing off {psnr_off:.2}, default {psnr_on:.2} dB");
    assert!(psnr_on >= psnr_off - 0.05, "{psnr_on:.2} vs {psnr_off:.2} dB");
}
