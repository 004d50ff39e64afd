//! An RTSP server that serves de-artifacted video:
//!
//! ```sh
//! cargo run --release --example rtsp_server -- [--port 8554] [--mount /codiff] [--input FILE]
//! gst-launch-1.0 rtspsrc location=rtsp://127.0.0.1:8554/codiff ! rtpjpegdepay ! jpegdec ! autovideosink
//! ```
//!
//! Without `--input` it serves a live test source compressed to MJPEG at quality
//! 15 (`--source-quality`), the way a cheap IP camera sends it; with `--input` a
//! file `decodebin` reads (MJPEG AVI/MKV, H.264, ...) or a JPEG sequence
//! (`frame-%05d.jpg`). Every frame goes through `codiff`; the restored frames go
//! out as JPEG over RTP (quality 90, `--wire-quality`). The media is shared: all
//! clients see one pipeline and one loaded model. The server logic lives in
//! `testkit/src/rtsp.rs` (also used by `tests/rtsp.rs`).
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;

use codiff_testkit::rtsp;

#[derive(Parser, Debug)]
#[command(about = "Serve codiff-restored video over RTSP (JPEG over RTP)")]
struct Args {
    /// Address to listen on (0.0.0.0: every interface)
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// RTSP port (0: any free port)
    #[arg(long, default_value_t = 8554)]
    port: u16,
    /// Mount point
    #[arg(long, default_value = "/codiff")]
    mount: String,
    /// Input: a video file decodebin reads, or a JPEG sequence with a printf pattern (img-%05d.jpg)
    #[arg(long)]
    input: Option<PathBuf>,
    /// A launch fragment producing raw video instead (e.g. "v4l2src ! image/jpeg ! jpegdec")
    #[arg(long, conflicts_with = "input")]
    source: Option<String>,
    /// Test source size WIDTHxHEIGHT (no --input)
    #[arg(long, default_value = "640x480")]
    size: String,
    /// Test source frame rate (no --input); frame rate of a JPEG sequence
    #[arg(long, default_value_t = 10)]
    fps: u32,
    /// JPEG quality the test source is compressed at
    #[arg(long, default_value_t = 15)]
    source_quality: u32,
    /// JPEG quality of the restored frames on the wire
    #[arg(long, default_value_t = 90)]
    wire_quality: u32,
    /// Extra codiff properties, e.g. "strength=0.8 device=cuda:0"
    #[arg(long, default_value = "")]
    codiff: String,
}

fn main() {
    let args = Args::parse();
    let Some((width, height)) = args.size.split_once('x').and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
    else {
        eprintln!("rtsp_server: --size {}: expected WIDTHxHEIGHT", args.size);
        std::process::exit(2);
    };
    let options = rtsp::ServerOptions {
        address: args.address,
        port: args.port,
        mount: args.mount,
        input: args.input,
        source: args.source,
        width,
        height,
        fps: args.fps,
        source_quality: args.source_quality,
        sequence_fps: args.fps,
        wire_quality: args.wire_quality,
        codiff_properties: args.codiff,
    };
    // This binary's own build of the plugin, so that no GST_PLUGIN_PATH is needed.
    if let Err(e) = gst::init()
        .map_err(|e| e.to_string())
        .and_then(|_| gstcodiff::plugin_register_static().map_err(|e| e.to_string()))
    {
        eprintln!("rtsp_server: cannot register the codiff plugin: {e}");
        std::process::exit(1);
    }
    let frames = AtomicU64::new(0);
    let server = match rtsp::Server::start(&options, move |event| match event {
        rtsp::MediaEvent::Qf(s) => {
            let n = frames.fetch_add(1, Ordering::Relaxed);
            // One line per second of 10 fps video is enough.
            if n.is_multiple_of(10) {
                let qf = s.get::<f64>("qf").unwrap_or(f64::NAN);
                let ms = s.get::<u64>("processing-time").unwrap_or(0) as f64 / 1e6;
                eprintln!("frame {n}: codiff-qf {qf:.1}, {ms:.0} ms");
            }
        }
        rtsp::MediaEvent::Error(e) => eprintln!("media error: {e}"),
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rtsp_server: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("media: {}", server.launch());
    println!("serving {}", server.url());
    server.wait();
}
