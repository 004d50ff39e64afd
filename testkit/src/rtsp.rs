//! An RTSP server whose one shared media runs `codiff`: the reusable part of
//! `examples/rtsp_server.rs`, also used by `tests/rtsp.rs` and `tests/streaming.rs`.
//!
//! The media is `SOURCE ! videoconvert ! [live recipe around] codiff ! videoconvert ! jpegenc !
//! rtpjpegpay`: JPEG over RTP on the wire (RFC 2435, payload type 26), which every
//! RTSP client and the stock Debian plugins handle. SOURCE is a live test source
//! compressed to MJPEG at a low quality (a cheap IP camera), a file or JPEG
//! sequence given with `input`, or any launch fragment given with `source`. The
//! media factory is shared: all clients see one pipeline and one loaded model.
//!
//! The server runs on its own GLib main context and thread; [`Server::stop`] closes
//! the clients and stops it. Every `codiff-qf` element message and every error on
//! the media's bus is handed to a callback.
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use gst::glib;
use gst::prelude::*;
use gst_rtsp_server::prelude::*;

/// What the server serves, and where.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Address to listen on (`127.0.0.1`: this machine only; `0.0.0.0`: every interface).
    pub address: String,
    /// TCP port for RTSP; 0 picks a free one ([`Server::port`] tells which).
    pub port: u16,
    /// Mount point, e.g. `/codiff`.
    pub mount: String,
    /// A file (`decodebin` reads it: MJPEG AVI/MKV, H.264, ...) or a JPEG sequence
    /// (a name with a printf pattern such as `frame-%05d.jpg`).
    pub input: Option<PathBuf>,
    /// A launch fragment producing raw video; overrides `input` and the test source.
    pub source: Option<String>,
    /// Test source (no input): size, frame rate and the JPEG quality it is compressed at.
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub source_quality: u32,
    /// Frame rate of a JPEG sequence.
    pub sequence_fps: u32,
    /// JPEG quality of the restored frames on the wire.
    pub wire_quality: u32,
    /// Extra `codiff` properties in launch syntax, e.g. `strength=0.8 device=cuda:0`.
    pub codiff_properties: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".into(),
            port: 8554,
            mount: "/codiff".into(),
            input: None,
            source: None,
            width: 640,
            height: 480,
            fps: 10,
            source_quality: 15,
            sequence_fps: 10,
            wire_quality: 90,
            codiff_properties: String::new(),
        }
    }
}

/// A value for a launch line, quoted; `None` when it cannot be quoted safely.
fn quoted(s: &str) -> Option<String> {
    (!s.contains(['"', '\\', '\n'])).then(|| format!("\"{s}\""))
}

impl ServerOptions {
    /// The raw-video source part of the media's launch line.
    pub fn source_launch(&self) -> Result<String, String> {
        if let Some(s) = &self.source {
            return Ok(s.clone());
        }
        if let Some(input) = &self.input {
            let name = input.to_string_lossy();
            let loc =
                quoted(&name).ok_or_else(|| format!("input {name}: quotes, backslashes or newlines in the name"))?;
            if name.contains('%') {
                return Ok(format!(
                    "multifilesrc location={loc} index=0 caps=\"image/jpeg,framerate={}/1\" ! jpegdec",
                    self.sequence_fps.max(1)
                ));
            }
            if !input.is_file() {
                return Err(format!("input {name}: no such file"));
            }
            return Ok(format!("filesrc location={loc} ! decodebin"));
        }
        Ok(format!(
            "videotestsrc is-live=true pattern=smpte horizontal-speed=2 ! \
             video/x-raw,width={},height={},framerate={}/1 ! jpegenc quality={} ! jpegdec",
            self.width,
            self.height,
            self.fps.max(1),
            self.source_quality.clamp(1, 100)
        ))
    }

    /// The media's whole launch line (the factory's description).
    /// A live source (the test source, a custom `source` such as a camera)
    /// gets the live recipe: a leaky queue of one frame before codiff, so
    /// that it always takes the newest frame, and a queue after it; a file
    /// is restored frame by frame (a leaky queue would drop its frames).
    pub fn launch(&self) -> Result<String, String> {
        let (before, after) = if self.input.is_none() || self.source.is_some() {
            ("queue leaky=downstream max-size-buffers=1 ! ", " ! queue")
        } else {
            ("", "")
        };
        Ok(format!(
            "( {} ! videoconvert ! {before}codiff name=codiff {}{after} ! videoconvert ! jpegenc quality={} ! \
             rtpjpegpay name=pay0 pt=26 )",
            self.source_launch()?,
            self.codiff_properties,
            self.wire_quality.clamp(1, 100)
        ))
    }
}

/// What the media's bus reports to [`Server::start`]'s callback.
#[derive(Debug)]
pub enum MediaEvent<'a> {
    /// A `codiff-qf` element message (`qf`, `pts`, `processing-time`, `mode`).
    Qf(&'a gst::StructureRef),
    /// An error from an element of the media (`source: message (debug)`).
    Error(String),
}

/// A running server (stop it with [`Server::stop`]; dropping it stops it too).
pub struct Server {
    server: gst_rtsp_server::RTSPServer,
    source: Option<glib::Source>,
    main_loop: glib::MainLoop,
    thread: Option<JoinHandle<()>>,
    port: u16,
    address: String,
    mount: String,
    launch: String,
}

impl Server {
    /// Start serving `options` on a thread of its own. `on_event` is called from
    /// streaming threads for every `codiff-qf` message and error of the media.
    pub fn start(
        options: &ServerOptions,
        on_event: impl Fn(MediaEvent<'_>) + Send + Sync + 'static,
    ) -> Result<Server, String> {
        gst::init().map_err(|e| format!("GStreamer: {e}"))?;
        // The factory's launch line would otherwise leave a gap where codiff is
        // missing and fail only when a client plays the media.
        for name in ["codiff", "rtpjpegpay", "jpegenc", "jpegdec", "videoconvert"] {
            if gst::ElementFactory::find(name).is_none() {
                return Err(format!(
                    "no GStreamer element {name:?} (codiff: register the plugin or set GST_PLUGIN_PATH)"
                ));
            }
        }
        if !options.mount.starts_with('/') {
            return Err(format!("mount {:?} must start with '/'", options.mount));
        }
        let launch = options.launch()?;
        let server = gst_rtsp_server::RTSPServer::new();
        server.set_address(&options.address);
        server.set_service(&options.port.to_string());

        let factory = gst_rtsp_server::RTSPMediaFactory::new();
        factory.set_launch(&launch);
        // One media, one pipeline and one loaded model for every client.
        factory.set_shared(true);
        let on_event = Arc::new(on_event);
        factory.connect_media_configure(move |_, media| {
            let Some(bus) = media.element().parent().and_downcast::<gst::Pipeline>().map(|p| p.bus().unwrap()) else {
                on_event(MediaEvent::Error("media without a pipeline: codiff-qf messages are not reported".into()));
                return;
            };
            // The media watches its bus itself; synchronous emission runs alongside.
            bus.enable_sync_message_emission();
            let on_event = on_event.clone();
            bus.connect_sync_message(None, move |_, msg| match msg.view() {
                gst::MessageView::Element(e) => {
                    if let Some(s) = e.structure().filter(|s| s.name() == "codiff-qf") {
                        on_event(MediaEvent::Qf(s));
                    }
                }
                gst::MessageView::Error(e) => on_event(MediaEvent::Error(format!(
                    "{}: {} ({})",
                    msg.src().map(|s| s.path_string().to_string()).unwrap_or_default(),
                    e.error(),
                    e.debug().map(|d| d.to_string()).unwrap_or_default()
                ))),
                _ => {}
            });
        });
        server.mount_points().ok_or("RTSP server without mount points")?.add_factory(&options.mount, factory);

        let context = glib::MainContext::new();
        let main_loop = glib::MainLoop::new(Some(&context), false);
        let source = server
            .create_source(gst_rtsp_server::gio::Cancellable::NONE)
            .map_err(|e| format!("cannot listen on {}:{}: {e}", options.address, options.port))?;
        source.attach(Some(&context));
        let port = u16::try_from(server.bound_port()).map_err(|_| "RTSP server has no bound port".to_string())?;
        let thread = {
            let main_loop = main_loop.clone();
            std::thread::Builder::new()
                .name("rtsp-server".into())
                .spawn(move || {
                    context.with_thread_default(|| main_loop.run()).expect("the server's main context is free")
                })
                .map_err(|e| format!("cannot start the server thread: {e}"))?
        };
        Ok(Server {
            server,
            source: Some(source),
            main_loop,
            thread: Some(thread),
            port,
            address: options.address.clone(),
            mount: options.mount.clone(),
            launch,
        })
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rtsp://ADDRESS:PORT/MOUNT` (with the listening address; `0.0.0.0` means any
    /// of this machine's addresses).
    pub fn url(&self) -> String {
        format!("rtsp://{}:{}{}", self.address, self.port, self.mount)
    }

    /// The media's launch line.
    pub fn launch(&self) -> &str {
        &self.launch
    }

    /// Run until the server is stopped (the example's main thread).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stop accepting, close every client (their media is shut down with them) and
    /// stop the server's thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(source) = self.source.take() {
            source.destroy();
        }
        self.server.client_filter(Some(&mut |_, _| gst_rtsp_server::RTSPFilterResult::Remove));
        self.main_loop.quit();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
