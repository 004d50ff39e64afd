//! The RTSP server of `examples/rtsp_server.rs` (its logic in
//! `testkit/src/rtsp.rs`) on 127.0.0.1 and a free port: two `rtspsrc`
//! clients at once receive restored frames that are closer to the clean picture
//! than the JPEG the server was fed, and the server's bus carries `codiff-qf`.
//! Bounded: every wait has a timeout, and the test stops the server itself.
#![cfg(feature = "gst")]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

use codiff_testkit::rtsp;
use codiff_testkit::setup as common;

use common::{init, packed_rgb, psnr, weights_or_skip};

const FRAMES_PER_CLIENT: usize = 3;
const PULL_TIMEOUT: Duration = Duration::from_secs(30);

/// The clean picture: the top-left 256x192 of the README's astronaut photo, as
/// raw video (quoting the path for a launch line).
fn clean_source() -> String {
    let png = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut.png");
    format!(
        "filesrc location=\"{}\" ! pngdec ! videoconvert ! videocrop right=256 bottom=192 ! \
         videoconvert ! video/x-raw,format=I420",
        png.display()
    )
}

/// The JPEG the server is fed: the clean picture at quality 10 (4:2:0), decoded.
const COMPRESS: &str = "jpegenc quality=10 ! jpegdec";

/// Pull `n` RGB frames (`width x height x 3`) from the appsink `sink` of `pipeline`.
fn pull_rgb(pipeline: &gst::Element, n: usize) -> Result<Vec<(usize, usize, Vec<u8>)>, String> {
    let bin = pipeline.downcast_ref::<gst::Bin>().unwrap();
    let sink = bin.by_name("sink").ok_or("no appsink")?;
    let bus = pipeline.bus().unwrap();
    let mut frames = Vec::new();
    let deadline = Instant::now() + PULL_TIMEOUT;
    while frames.len() < n {
        if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = msg.view() {
                return Err(format!("{}: {:?}", e.error(), e.debug()));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} frames within {PULL_TIMEOUT:?}", frames.len()));
        }
        let sample: Option<gst::Sample> = sink.emit_by_name("try-pull-sample", &[&200_000_000u64]);
        let Some(sample) = sample else { continue };
        let caps = sample.caps().ok_or("sample without caps")?;
        let s = caps.structure(0).ok_or("empty caps")?;
        let (w, h) = (s.get::<i32>("width").unwrap() as usize, s.get::<i32>("height").unwrap() as usize);
        let buffer = sample.buffer().ok_or("sample without buffer")?;
        let map = buffer.map_readable().map_err(|e| e.to_string())?;
        frames.push((w, h, packed_rgb(&map, w, h)));
    }
    Ok(frames)
}

fn rgb_sink() -> &'static str {
    "videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false max-buffers=100"
}

/// One frame of a local pipeline `description ! RGB appsink`.
fn local_frame(description: &str) -> (usize, usize, Vec<u8>) {
    let p = gst::parse::launch(&format!("{description} ! {}", rgb_sink())).unwrap();
    p.set_state(gst::State::Playing).unwrap();
    let f = pull_rgb(&p, 1).unwrap().remove(0);
    p.set_state(gst::State::Null).unwrap();
    f
}

#[test]
fn two_rtsp_clients_receive_restored_frames_and_the_bus_carries_qf() {
    init();
    if !weights_or_skip() {
        return;
    }
    let clean = local_frame(&clean_source());
    let jpeg = local_frame(&format!("{} ! {COMPRESS}", clean_source()));
    assert_eq!((clean.0, clean.1), (256, 192));
    let psnr_jpeg = psnr(&jpeg.2, &clean.2);

    let qf_messages = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let options = rtsp::ServerOptions {
        address: "127.0.0.1".into(),
        port: 0,
        mount: "/codiff".into(),
        // A still picture as a live 5 fps camera that sends JPEG at quality 10.
        source: Some(format!("{} ! imagefreeze is-live=true ! video/x-raw,framerate=5/1 ! {COMPRESS}", clean_source())),
        // Near-lossless on the wire, so that what the clients see is codiff's output.
        wire_quality: 98,
        ..Default::default()
    };
    let server = {
        let (qf_messages, errors) = (qf_messages.clone(), errors.clone());
        rtsp::Server::start(&options, move |event| match event {
            rtsp::MediaEvent::Qf(_) => {
                qf_messages.fetch_add(1, Ordering::Relaxed);
            }
            rtsp::MediaEvent::Error(e) => errors.lock().unwrap().push(e),
        })
        .expect("server starts")
    };
    assert_ne!(server.port(), 0);
    let url = server.url();
    assert!(url.starts_with("rtsp://127.0.0.1:"), "{url}");

    let client = || {
        gst::parse::launch(&format!(
            "rtspsrc location={url} protocols=tcp latency=0 ! rtpjpegdepay ! jpegdec ! {}",
            rgb_sink()
        ))
        .unwrap()
    };
    let clients = [client(), client()];
    for c in &clients {
        c.set_state(gst::State::Playing).unwrap();
    }
    let received: Vec<_> = clients.iter().map(|c| pull_rgb(c, FRAMES_PER_CLIENT)).collect();
    for c in &clients {
        c.set_state(gst::State::Null).unwrap();
    }
    let qf = qf_messages.load(Ordering::Relaxed);
    server.stop();

    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "server media errors: {errors:?}");
    for (i, frames) in received.into_iter().enumerate() {
        let frames = frames.unwrap_or_else(|e| panic!("client {i}: {e}"));
        for (k, (w, h, rgb)) in frames.iter().enumerate() {
            assert_eq!((*w, *h), (256, 192), "client {i} frame {k}");
            let p = psnr(rgb, &clean.2);
            eprintln!("client {i} frame {k}: PSNR {p:.2} dB (JPEG input {psnr_jpeg:.2} dB)");
            assert!(p > psnr_jpeg + 0.1, "client {i} frame {k}: {p:.2} dB is not above the input's {psnr_jpeg:.2} dB");
        }
    }
    assert!(qf >= FRAMES_PER_CLIENT, "only {qf} codiff-qf messages on the server's bus");
}
