//! The `codiff` element: GStreamer glue around [`crate::engine::Engine`].
//!
//! Settings (property values) and the per-stream state live in separate mutexes,
//! copied or cloned at the top of each call and never held while the engine runs
//! (the locks and their order: [`Codiff`]).
//! The model is loaded at NULL->READY (again at READY->PAUSED if a model property
//! changed in READY), shared through [`super::cache`], and released at READY->NULL.
//! Model properties (`mutable_ready`) set in PAUSED or PLAYING are kept pending,
//! with a warning, and applied at the next PAUSED->READY.
//!
//! A [`Cancel`] token stops the frame in the engine: raised by FLUSH_START, by
//! PAUSED->READY (before the pads are deactivated, which waits for the frame) and by
//! `stop`; lowered by FLUSH_STOP and `start`. A cancelled frame returns
//! `FLUSHING` without an error.
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use super::category::CAT;
use super::convert::{self, ChromaSiting, ColorModel, Component, Layout, Plane, PlaneMut, YuvMatrix};
use super::loading::{self, guarded, mode_name, Failure, Loaded};
use super::settings::{self, CodiffLateFrames, CodiffOnError, Properties, Settings};
use crate::engine::temporal::TemporalFilter;
use crate::engine::{Cancel, Engine, EngineError, QfSource, Restoration, RestoreOptions, RgbImage};

mod frame;
mod live;

use frame::{check_frame_size, chroma_siting, in_pool, layout_for, read_frame, write_frame_change, FrameError};
use live::{Background, Lateness, Stats};

/// Name of the custom meta carrying the quality estimate of a processed buffer.
pub const QF_META_NAME: &str = "CodiffQfMeta";

/// Per-stream state, built in `set_info`.
struct State {
    layout: Layout,
    siting: ChromaSiting,
    /// The previous output, which `temporal-smoothing` smooths toward and
    /// `late-frames=carry` carries: reset on FLUSH_STOP, DISCONT, new caps, a
    /// frame not restored, and `stop`.
    temporal: TemporalFilter,
}

/// The element.
///
/// # Locks
///
/// Each mutex guards one part of the element's state. It is held only to
/// read, copy or update that part: never while the model runs, nor while a
/// message is posted (a bus sync handler may call back into the element:
/// `property()` takes `properties`).
///
/// No code path holds two of these mutexes at once. Where one ever must, it
/// takes them in this order (a mutex only after those above it), never the
/// other way round:
///
/// 1. `properties`: the property values and the model properties set while
///    running ([`Properties`]). Taken by the property accessors, at the top of
///    each frame (a copy), by loading and by the state changes.
/// 2. `loaded`: the model and the element's own thread pool ([`Loaded`]):
///    filled at NULL->READY and in `start`, emptied at READY->NULL; a frame
///    takes its engine and pool from it and releases it.
/// 3. `background`: the background restoration of `late-frames=carry`
///    ([`Background`]): held while the previous restoration's thread, done,
///    is joined and the next one started; `stop` takes the handle and joins
///    the thread after releasing it.
/// 4. `state`: the per-stream state ([`State`]), with the temporal filter's
///    history: held while the temporal filter runs, by the streaming thread
///    and by the background restoration's thread.
/// 5. `stats`: the processing-time statistics ([`Stats`]).
/// 6. `latency`: the pipeline latency from the LATENCY event.
/// 7. `failing`: the on-error=passthrough run of failing frames.
/// 8. `pending_qf`: hands the frame's QF from `transform_frame_ip` to
///    `transform_ip`, on the streaming thread.
///
/// Outside these: `cancel`, `upstream_live` and [`Background`]'s `busy` are
/// atomics. GStreamer's own locks (the object lock behind the element's
/// state, clock and segment) and the model cache's mutexes ([`super::cache`])
/// are taken with none of the mutexes above held; only debug logging, which
/// reads the element's name, may run while one of them is held.
#[derive(Default)]
pub struct Codiff {
    properties: Mutex<Properties>,
    loaded: Mutex<Loaded>,
    background: Mutex<Background>,
    state: Mutex<Option<State>>,
    stats: Mutex<Stats>,
    /// The pipeline latency from the LATENCY event.
    latency: Mutex<Option<gst::ClockTime>>,
    /// Whether the last frame failed under on-error=passthrough (one warning per run).
    failing: Mutex<bool>,
    /// QF of the frame just processed, for `transform_ip` to attach as meta.
    pending_qf: Mutex<Option<(f64, &'static str, bool)>>,
    /// Stops the frame in the engine (see the module doc).
    cancel: Cancel,
    /// Whether the last latency query found a live upstream. A bin sends the
    /// LATENCY event to non-live pipelines too (latency 0), and there frames
    /// are never due: a file is restored frame by frame however slow.
    upstream_live: std::sync::atomic::AtomicBool,
}

impl Codiff {
    /// The smallest CaVE tile the loaded model accepts.
    fn min_cave_tile(&self) -> Option<usize> {
        self.loaded.lock().unwrap().min_cave_tile()
    }

    /// The loaded model's engine, if a model is loaded.
    fn engine(&self) -> Option<Arc<Engine>> {
        self.loaded.lock().unwrap().engine()
    }

    /// The element's own thread pool, if `n-threads` asked for one.
    fn thread_pool(&self) -> Option<Arc<rayon::ThreadPool>> {
        self.loaded.lock().unwrap().thread_pool()
    }

    /// Load the model (see [`loading::ensure_model`]).
    fn ensure_model(&self) -> Result<(), gst::ErrorMessage> {
        loading::ensure_model(self.obj().upcast_ref(), &self.properties, &self.loaded)
    }

    /// Build the thread pool (see [`loading::ensure_pool`]).
    fn ensure_pool(&self) -> Result<(), gst::ErrorMessage> {
        loading::ensure_pool(self.obj().upcast_ref(), &self.properties, &self.loaded)
    }

    /// Forget `temporal-smoothing`'s previous frame.
    fn reset_temporal(&self) {
        if let Some(state) = self.state.lock().unwrap().as_mut() {
            state.temporal.reset();
        }
    }

    /// A frame that was not restored: under on-error=fail post an error and stop
    /// the stream; under passthrough post a warning (for the first frame of a run
    /// of failing ones) and push the frame unchanged.
    fn frame_failed(
        &self,
        on_error: CodiffOnError,
        what: &str,
        cause: &str,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        match on_error {
            CodiffOnError::Fail => Err(self.fail(what, cause)),
            CodiffOnError::Passthrough => {
                let first = !std::mem::replace(&mut *self.failing.lock().unwrap(), true);
                if first {
                    gst::element_imp_warning!(
                        self,
                        gst::StreamError::Failed,
                        ("codiff: {what}: {cause}"),
                        ["the frame was pushed unchanged (on-error=passthrough); following \
                          failing frames are only logged until one is restored"]
                    );
                } else {
                    gst::info!(CAT, imp = self, "passing a frame through: {what}: {cause}");
                }
                Ok(gst::FlowSuccess::Ok)
            }
        }
    }

    /// Read `frame`, restore it and write it back; returns what was done (a
    /// frame the guard leaves alone is not written at all: bit-exact).
    fn restore_frame(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
        settings: &Settings,
        engine: &Arc<Engine>,
        layout: &Layout,
        siting: ChromaSiting,
    ) -> Result<Restoration, FrameError> {
        let (width, height) = (frame.width() as usize, frame.height() as usize);
        let (opts, adjusted) = check_frame_size(settings, engine, width, height)?;
        let (strides, input) = read_frame(frame, layout, siting)?;

        let strength = settings.strength.clamp(0.0, 1.0) as f32;
        let mut image = RgbImage::new(width, height, input).map_err(|err| FrameError::failed("frame", err))?;
        let smoothing = settings.temporal_smoothing.clamp(0.0, 1.0) as f32;
        // The frame as read: the temporal filter's motion test, and the
        // reference the restored image's change is measured against.
        let original = (strength > 0.0).then(|| image.clone());
        let estimate = self.run_engine(&mut image, settings, engine, opts, adjusted, strength)?;

        if estimate.restored {
            if (image.width, image.height) != (width, height) {
                return Err(FrameError::failed(
                    "restoring the frame failed",
                    format!("engine returned {}x{} for a {width}x{height} frame", image.width, image.height),
                ));
            }
            let read = original.as_ref().expect("kept when restoring");
            self.smooth_temporally(read, &mut image, smoothing)?;
            write_frame_change(frame, &strides, layout, siting, &read.data, &image.data, strength)?;
        } else {
            self.reset_temporal();
        }
        Ok(estimate)
    }

    /// Run the engine on `image` in the element's thread pool (`n-threads`),
    /// a panic turned into an error: restore it in place when `strength` > 0
    /// (with `opts`, logging the tile `adjusted` ones), else only read its
    /// quality.
    fn run_engine(
        &self,
        image: &mut RgbImage,
        settings: &Settings,
        engine: &Arc<Engine>,
        mut opts: RestoreOptions,
        adjusted: Vec<String>,
        strength: f32,
    ) -> Result<Restoration, FrameError> {
        let pool = self.thread_pool();
        if strength > 0.0 {
            for a in adjusted {
                gst::debug!(CAT, imp = self, "{a}");
            }
            opts.cancel = self.cancel.clone();
            in_pool(pool.as_deref(), || guarded(|| engine.restore_report(image, &opts)))
        } else {
            opts.cancel = self.cancel.clone();
            let estimate = || -> Result<(f32, QfSource), EngineError> {
                if settings.qf > 0 {
                    Ok((settings.qf as f32, QfSource::Model))
                } else if settings.guard {
                    engine.estimate_quality(image, &opts)
                } else {
                    Ok((engine.estimate_qf(image, &opts)?, QfSource::Model))
                }
            };
            in_pool(pool.as_deref(), || guarded(estimate)).map(|(qf, qf_source)| Restoration {
                qf,
                qf_source,
                restored: false,
                guarded_blocks: 0,
            })
        }
        .map_err(|err| FrameError::engine("restoring the frame failed", err))
    }

    /// The temporal filter on a restored frame: `image` (restored from
    /// `read`) is smoothed toward the previous output when `smoothing` is
    /// above 0, and becomes the previous frame of the next one (smoothed or
    /// carried from it).
    fn smooth_temporally(&self, read: &RgbImage, image: &mut RgbImage, smoothing: f32) -> Result<(), FrameError> {
        if let Some(state) = self.state.lock().unwrap().as_mut() {
            if smoothing > 0.0 {
                state
                    .temporal
                    .apply(smoothing, read, image)
                    .map_err(|err| FrameError::failed("temporal smoothing", err))?;
            } else {
                state.temporal.adopt(read, image);
            }
        }
        Ok(())
    }

    /// Post a stream error naming `cause`; the caller returns the flow error.
    fn fail(&self, what: &str, cause: impl std::fmt::Display) -> gst::FlowError {
        gst::element_imp_error!(
            self,
            gst::StreamError::Failed,
            ("codiff: {what}: {cause}"),
            ["the frame was not processed"]
        );
        gst::FlowError::Error
    }

    fn attach_qf_meta(&self, buf: &mut gst::BufferRef, (qf, source, restored): (f64, &'static str, bool)) {
        let fill = |s: &mut gst::StructureRef| {
            s.set("qf", qf);
            s.set("qf-source", source);
            s.set("restored", restored);
        };
        if let Ok(mut meta) = gst::meta::CustomMeta::from_mut_buffer(buf, QF_META_NAME) {
            fill(meta.mut_structure());
            return;
        }
        match gst::meta::CustomMeta::add(buf, QF_META_NAME) {
            Ok(mut meta) => fill(meta.mut_structure()),
            Err(err) => gst::warning!(CAT, imp = self, "cannot attach {QF_META_NAME}: {err}"),
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for Codiff {
    const NAME: &'static str = "GstCodiff";
    type Type = super::Codiff;
    type ParentType = gst_video::VideoFilter;
}

impl ObjectImpl for Codiff {
    fn properties() -> &'static [glib::ParamSpec] {
        settings::param_specs()
    }

    fn constructed(&self) {
        self.parent_constructed();
        // Let basetransform drop frames that QoS events say are already late.
        self.obj().set_qos(true);
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let state = self.obj().current_state();
        if pspec.flags().contains(gst::PARAM_FLAG_MUTABLE_READY) && state > gst::State::Ready {
            // The model in use stays; property() reports it until the next READY.
            let warnings = self.properties.lock().unwrap().set_pending(value, pspec);
            for warning in warnings {
                gst::warning!(CAT, imp = self, "{warning}");
            }
            gst::element_imp_warning!(
                self,
                gst::LibraryError::Settings,
                (
                    "codiff: {} cannot change in {state:?}: the new value is kept pending and \
                     applies at the next READY",
                    pspec.name()
                ),
                ["set to {value:?}; the running value stays until then"]
            );
            return;
        }
        let min_cave_tile = self.min_cave_tile();
        let warnings = self.properties.lock().unwrap().current.set(value, pspec, min_cave_tile);
        for warning in warnings {
            gst::warning!(CAT, imp = self, "{warning}");
        }
        gst::debug!(CAT, imp = self, "{} set to {:?}", pspec.name(), value);
        if pspec.name() == "enabled" {
            let enabled = value.get::<bool>().expect("type checked upstream");
            self.obj().set_passthrough(!enabled);
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        self.properties.lock().unwrap().current.get(pspec)
    }
}

impl GstObjectImpl for Codiff {}

impl ElementImpl for Codiff {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static ELEMENT_METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "CODiff JPEG artifact removal",
                "Filter/Effect/Video",
                "Removes JPEG compression artifacts from raw video frames in place with \
                 CODiff (compression-aware one-step diffusion) or its CaVE network. Example: \
                 gst-launch-1.0 filesrc location=in.jpg ! jpegdec ! codiff ! videoconvert ! \
                 pngenc ! filesink location=out.png. Live sources: ... ! queue \
                 leaky=downstream max-size-buffers=1 ! codiff ! queue ! ... (see late-frames)",
                "codiff developers",
            )
        });
        Some(&*ELEMENT_METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static PAD_TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            use gst_video::VideoFormat::*;
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list([
                    I420, Yv12, Nv12, Nv21, Y42b, Y444, Yuy2, Uyvy, Rgb, Bgr, Rgba, Bgra, Argb, Abgr, Rgbx, Bgrx, Xrgb,
                    Xbgr,
                ])
                // fields of interlaced frames would be restored as one picture
                .field("interlace-mode", "progressive")
                .build();
            vec![
                gst::PadTemplate::new("src", gst::PadDirection::Src, gst::PadPresence::Always, &caps)
                    .expect("valid src pad template"),
                gst::PadTemplate::new("sink", gst::PadDirection::Sink, gst::PadPresence::Always, &caps)
                    .expect("valid sink pad template"),
            ]
        });
        PAD_TEMPLATES.as_ref()
    }

    fn change_state(&self, transition: gst::StateChange) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        gst::debug!(CAT, imp = self, "changing state {transition:?}");
        if transition == gst::StateChange::NullToReady {
            // Load before any data flows; this can take seconds.
            if let Err(err) = self.ensure_model() {
                self.post_error_message(err);
                return Err(gst::StateChangeError);
            }
        }
        if matches!(transition, gst::StateChange::PausedToReady | gst::StateChange::ReadyToNull) {
            // Deactivating the pads waits for the frame in progress: stop it.
            self.cancel.cancel();
        }
        let ret = self.parent_change_state(transition)?;
        match transition {
            gst::StateChange::PausedToReady => {
                let mut properties = self.properties.lock().unwrap();
                if let Some(pending) = properties.pending.take() {
                    gst::info!(CAT, imp = self, "applying the model properties set while running");
                    properties.current.take_model_fields(&pending);
                }
            }
            gst::StateChange::ReadyToNull => {
                // The cache frees the model with its last user.
                let mut loaded = self.loaded.lock().unwrap();
                loaded.model.take();
                loaded.pool.take();
            }
            _ => (),
        }
        Ok(ret)
    }
}

impl BaseTransformImpl for Codiff {
    const MODE: gst_base::subclass::BaseTransformMode = gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        // A model property may have changed in READY.
        self.ensure_model()?;
        self.ensure_pool()?;
        self.cancel.reset();
        *self.failing.lock().unwrap() = false;
        *self.stats.lock().unwrap() = Stats::default();
        let enabled = self.properties.lock().unwrap().current.enabled;
        self.obj().set_passthrough(!enabled);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.cancel.cancel();
        let running = self.background.lock().unwrap().handle.take();
        if let Some(running) = running {
            let _ = running.join();
        }
        self.state.lock().unwrap().take();
        self.pending_qf.lock().unwrap().take();
        *self.stats.lock().unwrap() = Stats::default();
        self.latency.lock().unwrap().take();
        self.upstream_live.store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn query(&self, direction: gst::PadDirection, query: &mut gst::QueryRef) -> bool {
        if direction == gst::PadDirection::Src {
            if let gst::QueryViewMut::Latency(q) = query.view_mut() {
                let mut upstream = gst::query::Latency::new();
                if self.obj().sink_pad().peer_query(&mut upstream) {
                    let (live, min, max) = upstream.result();
                    self.upstream_live.store(live, std::sync::atomic::Ordering::SeqCst);
                    // the longest processing time measured, and a quarter more:
                    // the slack a live frame needs for the time upstream spent
                    // on it (encoders and decoders report no latency)
                    let ours = {
                        let mut stats = self.stats.lock().unwrap();
                        stats.reported = stats.max;
                        stats.max + stats.max / 4
                    };
                    gst::debug!(
                        CAT,
                        imp = self,
                        "upstream latency live {live} min {min} max {}, adding {ours}",
                        max.display()
                    );
                    q.set(live, min + ours, max.opt_add(ours));
                    return true;
                }
                return false;
            }
        }
        BaseTransformImplExt::parent_query(self, direction, query)
    }

    fn src_event(&self, event: gst::Event) -> bool {
        // sent upstream by the sink of a live pipeline: when frames are due
        if let gst::EventView::Latency(l) = event.view() {
            *self.latency.lock().unwrap() = Some(l.latency());
        }
        self.parent_src_event(event)
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        match event.view() {
            // Not serialised: arrives while the streaming thread may be in the engine.
            gst::EventView::FlushStart(_) => self.cancel.cancel(),
            // Serialised: the frame in progress has returned.
            gst::EventView::FlushStop(_) => {
                self.cancel.reset();
                self.reset_temporal();
            }
            _ => (),
        }
        self.parent_sink_event(event)
    }

    fn transform_ip(&self, buf: &mut gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        self.pending_qf.lock().unwrap().take();
        // Maps the frame and calls transform_frame_ip.
        let ret = self.parent_transform_ip(buf)?;
        if let Some(qf) = self.pending_qf.lock().unwrap().take() {
            self.attach_qf_meta(buf, qf);
        }
        Ok(ret)
    }
}

impl VideoFilterImpl for Codiff {
    fn set_info(
        &self,
        incaps: &gst::Caps,
        in_info: &gst_video::VideoInfo,
        outcaps: &gst::Caps,
        out_info: &gst_video::VideoInfo,
    ) -> Result<(), gst::LoggableError> {
        // Caps may change mid-stream: only the pixel layout changes, the model stays.
        if in_info.interlace_mode() != gst_video::VideoInterlaceMode::Progressive {
            return Err(gst::loggable_error!(
                CAT,
                "interlaced video ({:?}) is not supported: deinterlace first",
                in_info.interlace_mode()
            ));
        }
        let layout = layout_for(in_info)
            .ok_or_else(|| gst::loggable_error!(CAT, "unsupported format {:?}", in_info.format()))?;
        let siting = chroma_siting(in_info);
        gst::debug!(CAT, imp = self, "caps {incaps}: layout {layout:?}, chroma {siting:?}");
        *self.state.lock().unwrap() = Some(State { layout, siting, temporal: TemporalFilter::default() });
        self.warm_up(in_info);
        self.parent_set_info(incaps, in_info, outcaps, out_info)
    }

    fn transform_frame_ip(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        if self.cancel.is_cancelled() {
            return Err(gst::FlowError::Flushing);
        }
        let settings = self.properties.lock().unwrap().current.clone();
        let Some(engine) = self.engine() else {
            return Err(self.fail("no model", "the element was not started"));
        };
        let discont = frame.buffer().flags().contains(gst::BufferFlags::DISCONT);
        let Some((layout, siting)) = self.state.lock().unwrap().as_mut().map(|s| {
            if discont {
                s.temporal.reset();
            }
            (s.layout, s.siting)
        }) else {
            return Err(gst::FlowError::NotNegotiated);
        };
        if let Some(lateness) = self.would_be_late(frame.buffer()) {
            gst::debug!(
                CAT,
                imp = self,
                "frame {} {lateness:?} late: {:?}",
                frame.buffer().pts().display(),
                settings.late_frames
            );
            return match (settings.late_frames, lateness) {
                (CodiffLateFrames::Drop, _) => Ok(gst_base::BASE_TRANSFORM_FLOW_DROPPED),
                (CodiffLateFrames::Passthrough, _) | (_, Lateness::Already) => Ok(gst::FlowSuccess::Ok),
                (CodiffLateFrames::Carry, Lateness::WouldBe) => {
                    if let Err(FrameError::Failed(what, cause)) =
                        self.carry_frame(frame, &layout, siting, &settings, &engine)
                    {
                        gst::info!(CAT, imp = self, "late frame passed through: {what}: {cause}");
                    }
                    Ok(gst::FlowSuccess::Ok)
                }
            };
        }
        let started = Instant::now();
        let estimate = match self.restore_frame(frame, &settings, &engine, &layout, siting) {
            Ok(estimate) => estimate,
            Err(err) => {
                // The next frame must not be blended with an older one.
                self.reset_temporal();
                return match err {
                    FrameError::Cancelled => {
                        gst::debug!(CAT, imp = self, "frame cancelled (flush or state change)");
                        Err(gst::FlowError::Flushing)
                    }
                    FrameError::Failed(what, cause) => self.frame_failed(settings.on_error, what, &cause),
                };
            }
        };
        *self.failing.lock().unwrap() = false;

        let elapsed = gst::ClockTime::from_nseconds(started.elapsed().as_nanos() as u64);
        self.record_processing_time(elapsed);
        let (qf, qf_source) = if settings.qf > 0 {
            (settings.qf as f64, "property")
        } else {
            (estimate.qf as f64, estimate.qf_source.name())
        };
        let pts = frame.buffer().pts();
        gst::trace!(CAT, imp = self, "frame {} qf {qf:.1} in {elapsed}", pts.display());
        if settings.post_messages {
            let obj = self.obj();
            let s = gst::Structure::builder("codiff-qf")
                .field("qf", qf)
                .field("estimated", settings.qf == 0)
                .field("qf-source", qf_source)
                .field("restored", estimate.restored)
                .field("pts", pts.map_or(u64::MAX, gst::ClockTime::nseconds))
                .field("processing-time", elapsed.nseconds())
                .field("mode", mode_name(engine.mode()))
                .build();
            let _ = obj.post_message(gst::message::Element::builder(s).src(&*obj).build());
        }
        *self.pending_qf.lock().unwrap() = Some((qf, qf_source, estimate.restored));
        Ok(gst::FlowSuccess::Ok)
    }
}
