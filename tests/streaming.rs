//! The README's live recipes, each run on loopback and read by an independent
//! client (FFmpeg from Debian), which counts the frames it decodes:
//!
//! * RTSP: a live MJPEG camera (an RTSP server of its own) read by `rtspsrc`,
//!   restored and served again over RTSP (`testkit/src/rtsp.rs`);
//! * RTMP: published with `flvmux ! rtmp2sink` to nginx-rtmp, which the test
//!   starts from its own configuration (Debian's `nginx` and
//!   `libnginx-mod-rtmp`);
//! * HLS: `hlssink2` segments served over HTTP by the same nginx.
//!
//! Every pipeline has codiff in the live recipe's shape (`queue
//! leaky=downstream max-size-buffers=1 ! codiff ! queue`). Bounded: every wait
//! has a timeout, and the test stops what it started. Without ffmpeg or nginx
//! the tests say so and pass, except under CI (`CI` set), where `.ci/deps`
//! installs them.
#![cfg(feature = "gst")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst_rtsp_server::prelude::*;

use codiff_testkit::rtsp;
use codiff_testkit::setup as common;

use common::{init, weights_or_skip};

/// The live recipe around codiff, as the README writes it.
const RECIPE: &str = "queue leaky=downstream max-size-buffers=1 ! codiff ! queue";

/// A live camera: a moving test card, JPEG at quality 15, 320x240 at 10 fps.
fn camera() -> &'static str {
    "videotestsrc is-live=true pattern=smpte horizontal-speed=2 ! \
     video/x-raw,format=I420,width=320,height=240,framerate=10/1 ! jpegenc quality=15"
}

/// H.264 for the wire: a key frame every second (players join at one).
const H264: &str = "videoconvert ! video/x-raw,format=I420 ! openh264enc gop-size=10 ! h264parse";

/// Where `name` is: on PATH, or in /usr/sbin (nginx, for users whose PATH
/// lacks it).
fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tool(name: &str) -> bool {
    let found = find(name).is_some();
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{name} is missing (.ci/deps installs it)");
        eprintln!("skipped: {name} is not installed");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Frames FFmpeg decodes from `url` within `seconds` of stream (a hard limit
/// of 60 s), and its last lines of output.
fn ffmpeg_frames(args: &[&str], url: &str, seconds: u32) -> (usize, String) {
    let out = Command::new("timeout")
        .arg("60")
        .arg("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error"])
        .args(args)
        .args(["-i", url, "-t", &seconds.to_string(), "-f", "framecrc", "-"])
        .output()
        .expect("ffmpeg runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let frames = stdout.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
    (frames, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
}

/// A pipeline playing until dropped.
struct Running(gst::Pipeline);

impl Running {
    fn start(launch: &str) -> Running {
        let pipeline =
            gst::parse::launch(launch).unwrap_or_else(|e| panic!("{launch}: {e}")).downcast::<gst::Pipeline>().unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        Running(pipeline)
    }

    /// Panics on an error message so far.
    fn check(&self) {
        let bus = self.0.bus().unwrap();
        while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = msg.view() {
                panic!("{}: {} ({:?})", msg.src().map(|s| s.path_string()).unwrap_or_default(), e.error(), e.debug());
            }
        }
    }

    /// Send EOS and wait for it (at most `limit`).
    fn finish(self, limit: Duration) {
        self.0.send_event(gst::event::Eos::new());
        let bus = self.0.bus().unwrap();
        let msg = bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(limit.as_nanos() as u64),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        if let Some(gst::MessageView::Error(e)) = msg.as_ref().map(|m| m.view()) {
            panic!("{} ({:?})", e.error(), e.debug());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

/// nginx from a configuration of the test's own: RTMP `live` application on
/// one port, the HLS folder over HTTP on another.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(rtmp_port: u16, http_port: u16, hls: &Path) -> Nginx {
        let dir = std::env::temp_dir().join(format!("codiff-nginx-{}-{rtmp_port}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let module = ["/usr/lib/nginx/modules/ngx_rtmp_module.so", "/usr/lib64/nginx/modules/ngx_rtmp_module.so"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx's RTMP module (Debian: libnginx-mod-rtmp)");
        let conf = format!(
            "load_module {module};\n\
             daemon off;\nmaster_process off;\nworker_processes 1;\n\
             error_log {d}/logs/error.log info;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{rtmp_port}; application live {{ live on; record off; }} }} }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n  \
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n  \
               types {{ application/vnd.apple.mpegurl m3u8; video/mp2t ts; }}\n  \
               server {{ listen 127.0.0.1:{http_port}; root {hls}; }}\n}}\n",
            d = dir.display(),
            hls = hls.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(find("nginx").expect("nginx"))
            .args(["-e", &dir.join("logs/stderr.log").to_string_lossy(), "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        // listening?
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", rtmp_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {rtmp_port}: {}",
                std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn rtsp_camera_restored_and_served_over_rtsp_is_read_by_ffmpeg() {
    if !weights_or_skip() || !tool("ffmpeg") {
        return;
    }
    init();
    // the camera: an RTSP server of MJPEG
    let camera_server = gst_rtsp_server::RTSPServer::new();
    camera_server.set_address("127.0.0.1");
    camera_server.set_service("0");
    let factory = gst_rtsp_server::RTSPMediaFactory::new();
    factory.set_launch(&format!("( {} ! rtpjpegpay name=pay0 pt=26 )", camera()));
    factory.set_shared(true);
    camera_server.mount_points().unwrap().add_factory("/camera", factory);
    let main_context = gst::glib::MainContext::new();
    let source = camera_server.attach(Some(&main_context)).unwrap();
    let main_loop = gst::glib::MainLoop::new(Some(&main_context), false);
    let loop_thread = {
        let main_loop = main_loop.clone();
        std::thread::spawn(move || main_loop.run())
    };
    let camera_url = format!("rtsp://127.0.0.1:{}/camera", camera_server.bound_port());

    // codiff between the camera and its own RTSP server, in the live recipe
    let options = rtsp::ServerOptions {
        port: 0,
        source: Some(format!("rtspsrc location={camera_url} latency=200 ! rtpjpegdepay ! jpegdec")),
        ..Default::default()
    };
    let server = rtsp::Server::start(&options, |_| {}).expect("server starts");
    let launch = server.launch();
    assert!(
        launch.contains("queue leaky=downstream max-size-buffers=1 ! codiff") && launch.contains(" ! queue !"),
        "{launch}"
    );
    let (frames, log) = ffmpeg_frames(&["-rtsp_transport", "tcp"], &server.url(), 4);
    server.stop();
    main_loop.quit();
    let _ = loop_thread.join();
    if let Some(s) = main_context.find_source_by_id(&source) {
        s.destroy();
    }
    eprintln!("ffmpeg decoded {frames} frames over RTSP");
    assert!(frames >= 3, "ffmpeg decoded {frames} frames over RTSP:\n{log}");
}

#[test]
fn rtmp_publish_to_nginx_and_hls_over_http_are_read_by_ffmpeg() {
    if !weights_or_skip() || !tool("ffmpeg") || !tool("nginx") {
        return;
    }
    init();
    let hls = std::env::temp_dir().join(format!("codiff-hls-{}", std::process::id()));
    std::fs::create_dir_all(&hls).unwrap();
    let (rtmp_port, http_port) = (free_port(), free_port());
    let nginx = Nginx::start(rtmp_port, http_port, &hls);

    // RTMP: publish, and read while it plays
    let rtmp_url = format!("rtmp://127.0.0.1:{rtmp_port}/live/codiff");
    let publisher = Running::start(&format!(
        "{} ! jpegdec ! {RECIPE} ! {H264} ! flvmux streamable=true ! rtmp2sink location={rtmp_url}",
        camera()
    ));
    std::thread::sleep(Duration::from_secs(1));
    publisher.check();
    let (frames, log) = ffmpeg_frames(&[], &rtmp_url, 4);
    publisher.check();
    drop(publisher);
    eprintln!("ffmpeg decoded {frames} frames over RTMP");
    assert!(frames >= 3, "ffmpeg decoded {frames} frames over RTMP:\n{log}");

    // HLS: segments for 5 s, then the playlist over HTTP
    let segments = Running::start(&format!(
        "{} ! jpegdec ! {RECIPE} ! {H264} ! hlssink2 target-duration=1 max-files=0 playlist-length=0 \
         location={dir}/segment%05d.ts playlist-location={dir}/live.m3u8",
        camera(),
        dir = hls.display()
    ));
    std::thread::sleep(Duration::from_secs(5));
    segments.check();
    segments.finish(Duration::from_secs(30));
    let (frames, log) = ffmpeg_frames(&[], &format!("http://127.0.0.1:{http_port}/live.m3u8"), 30);
    drop(nginx);
    let _ = std::fs::remove_dir_all(&hls);
    eprintln!("ffmpeg decoded {frames} frames over HLS");
    assert!(frames >= 3, "ffmpeg decoded {frames} frames over HLS:\n{log}");
}
