//! Live streams and latency: the processing-time statistics behind the
//! LATENCY query and the warm-up restore that fills them before the first
//! frame, the test of whether a live frame would be restored after it is due
//! ([`Lateness`]), and `late-frames=carry`: the previous output carried onto a
//! late frame while the newest late frame is restored in the background
//! ([`Background`]).
use super::*;

/// Measured processing time, for the latency query.
#[derive(Default)]
pub(super) struct Stats {
    /// Longest processing time of one frame since `start`.
    pub(super) max: gst::ClockTime,
    /// Latency last reported (query answer or latency message).
    pub(super) reported: gst::ClockTime,
    /// Pixels of the largest frame size timed by the caps-time warm-up.
    pub(super) warmed_pixels: u64,
    /// Running mean of the processing time of restoring frames: what a live
    /// frame is expected to take.
    pub(super) typical: gst::ClockTime,
}

/// The warm-up restore runs on at most this many pixels (640x480); its time is
/// scaled by the pixel ratio for larger frames.
pub(super) const WARM_UP_PIXELS: usize = 640 * 480;

/// A live frame that cannot be restored in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lateness {
    /// Restoring it would finish after it is due.
    WouldBe,
    /// It is due already: it leaves at once, whatever the policy (a
    /// carried correction too would make the next frames later still).
    Already,
}

/// The background restoration of live frames: while late frames leave on
/// time with the last correction carried onto them, the newest of them is
/// restored on a low-priority thread pool, one at a time, and its result
/// becomes the correction carried from then on.
#[derive(Default)]
pub(super) struct Background {
    pub(super) busy: Arc<std::sync::atomic::AtomicBool>,
    pub(super) handle: Option<std::thread::JoinHandle<()>>,
    pub(super) pool: Option<Arc<rayon::ThreadPool>>,
}

impl Codiff {
    /// Whether `buf`, started now, would be restored after it is due: the
    /// element is PLAYING in a live pipeline (a LATENCY event came upstream
    /// from the sink) and now + the typical processing time of a restoring
    /// frame (the longest measured until there is one) is past the buffer's
    /// running time + the pipeline latency. Never for non-live pipelines (files restore every frame).
    pub(super) fn would_be_late(&self, buf: &gst::BufferRef) -> Option<Lateness> {
        if !self.upstream_live.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let latency = (*self.latency.lock().unwrap())?;
        let obj = self.obj();
        if obj.current_state() != gst::State::Playing {
            return None;
        }
        let (clock, base, pts) = (obj.clock()?, obj.base_time()?, buf.pts()?);
        let segment = obj.segment();
        let rt = segment.downcast_ref::<gst::ClockTime>()?.to_running_time(pts)?;
        let now = clock.time().saturating_sub(base);
        let expected = {
            let stats = self.stats.lock().unwrap();
            if stats.typical.is_zero() {
                stats.max
            } else {
                stats.typical
            }
        };
        let due = rt + latency;
        gst::trace!(CAT, imp = self, "now {now} + expected {expected} vs due {due}");
        if now >= due {
            Some(Lateness::Already)
        } else if now + expected > due {
            Some(Lateness::WouldBe)
        } else {
            None
        }
    }

    /// `late-frames=carry`: the previous output moved along the picture's
    /// motion onto `frame` where the picture did not otherwise change
    /// ([`TemporalFilter::carry`]; nothing when there is no previous frame).
    pub(super) fn carry_frame(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
        layout: &Layout,
        siting: ChromaSiting,
        settings: &Settings,
        engine: &Arc<Engine>,
    ) -> Result<(), FrameError> {
        let (width, height) = (frame.width() as usize, frame.height() as usize);
        let (strides, input) = read_frame(frame, layout, siting)?;
        let input = RgbImage::new(width, height, input).map_err(|e| FrameError::failed("frame", e))?;
        self.restore_in_background(&input, settings, engine);
        let mut out = input.clone();
        let carried = self.state.lock().unwrap().as_mut().is_some_and(|s| s.temporal.carry(&input, &mut out));
        if !carried {
            return Ok(());
        }
        write_frame_change(frame, &strides, layout, siting, &input.data, &out.data, 1.0)
    }

    /// Start restoring `input` on the background pool unless a restoration
    /// is already running there (see [`Background`]).
    pub(super) fn restore_in_background(&self, input: &RgbImage, settings: &Settings, engine: &Arc<Engine>) {
        use std::sync::atomic::Ordering;
        let mut bg = self.background.lock().unwrap();
        if bg.busy.load(Ordering::SeqCst) {
            return;
        }
        if let Some(done) = bg.handle.take() {
            let _ = done.join();
        }
        let pool = match &bg.pool {
            Some(pool) => pool.clone(),
            None => {
                let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
                let built = rayon::ThreadPoolBuilder::new()
                    .num_threads(cores)
                    .thread_name(|i| format!("codiff-bg-{i}"))
                    // below the streaming threads, so the frames that leave
                    // now are never slowed down by the one restored for later
                    // SAFETY: setpriority on the calling thread (Linux: per thread).
                    .start_handler(|_| unsafe {
                        libc::setpriority(libc::PRIO_PROCESS as _, 0, 10);
                    })
                    .build();
                match built {
                    Ok(pool) => bg.pool.insert(Arc::new(pool)).clone(),
                    Err(err) => {
                        gst::warning!(CAT, imp = self, "no background pool: {err}");
                        return;
                    }
                }
            }
        };
        let (mut opts, _) = settings.restore_options(Some(engine.min_cave_tile()));
        opts.cancel = self.cancel.clone();
        let smoothing = settings.temporal_smoothing.clamp(0.0, 1.0) as f32;
        let (engine, input, busy, weak) = (engine.clone(), input.clone(), bg.busy.clone(), self.obj().downgrade());
        busy.store(true, Ordering::SeqCst);
        bg.handle = Some(std::thread::spawn(move || {
            let mut out = input.clone();
            let result = pool.install(|| guarded(|| engine.restore_report(&mut out, &opts)));
            if let (Ok(r), Some(obj)) = (result, weak.upgrade()) {
                gst::debug!(CAT, obj = obj, "background restoration done (restored: {})", r.restored);
                // the newest restoration is what late frames carry (`carry`
                // refuses one of another size), smoothed toward the frames
                // before so that the carried picture does not jump
                if r.restored {
                    if let Some(state) = obj.imp().state.lock().unwrap().as_mut() {
                        if smoothing == 0.0 || state.temporal.apply(smoothing, &input, &mut out).is_err() {
                            state.temporal.adopt(&input, &out);
                        }
                    }
                }
            }
            busy.store(false, Ordering::SeqCst);
        }));
    }

    /// Time one restore of a test pattern of the negotiated size (at most
    /// [`WARM_UP_PIXELS`], the time scaled up by the pixel ratio) so the LATENCY
    /// query is right before the first frame. Runs once per size larger than any
    /// timed before; failures are left to the frames to report.
    pub(super) fn warm_up(&self, info: &gst_video::VideoInfo) {
        let settings = self.properties.lock().unwrap().current.clone();
        if !settings.warm_up || !settings.enabled || settings.strength <= 0.0 {
            return;
        }
        let (w, h) = (info.width() as usize, info.height() as usize);
        let pixels = w as u64 * h as u64;
        if pixels == 0
            || (settings.max_frame_pixels > 0 && pixels > settings.max_frame_pixels)
            || pixels <= self.stats.lock().unwrap().warmed_pixels
        {
            return;
        }
        let Some(engine) = self.engine() else {
            return;
        };
        let scale = (WARM_UP_PIXELS as f64 / pixels as f64).sqrt().min(1.0);
        let ww = ((w as f64 * scale) as usize).clamp(1, w);
        let wh = ((h as f64 * scale) as usize).clamp(1, h);
        // 8x8 blocks of a gradient, like a coarse JPEG
        let data = (0..ww * wh * 3)
            .map(|i| {
                let (x, y, c) = (i / 3 % ww, i / 3 / ww, i % 3);
                ((x / 8 * 29 + y / 8 * 53 + c * 71) % 256) as u8
            })
            .collect();
        let Ok(mut image) = RgbImage::new(ww, wh, data) else {
            return;
        };
        let (mut opts, _) = settings.restore_options(Some(engine.min_cave_tile()));
        opts.cancel = self.cancel.clone();
        let pool = self.thread_pool();
        let started = Instant::now();
        let result = in_pool(pool.as_deref(), || guarded(|| engine.restore(&mut image, &opts)));
        match result {
            Ok(_) => {
                let ratio = pixels as f64 / (ww * wh) as f64;
                let ns = started.elapsed().as_nanos() as f64 * ratio;
                let estimate = gst::ClockTime::from_nseconds(ns as u64);
                gst::info!(
                    CAT,
                    imp = self,
                    "warm-up: {ww}x{wh} restored in {}, {estimate} estimated for {w}x{h}",
                    started.elapsed().as_secs_f64()
                );
                self.stats.lock().unwrap().warmed_pixels = pixels;
                self.record_processing_time(estimate);
            }
            Err(err) => gst::debug!(CAT, imp = self, "warm-up failed: {err}"),
        }
    }

    /// Update the processing-time statistics; announce a latency change when the
    /// longest frame time outgrew the reported latency by a quarter.
    pub(super) fn record_processing_time(&self, elapsed: gst::ClockTime) {
        let announce = {
            let mut stats = self.stats.lock().unwrap();
            stats.max = stats.max.max(elapsed);
            // the typical time of a restoring frame (frames the guard leaves
            // alone take milliseconds and say nothing about the next restore)
            if elapsed * 4 > stats.max {
                stats.typical = if stats.typical.is_zero() { elapsed } else { (stats.typical * 7 + elapsed * 3) / 10 };
            }
            if stats.max > stats.reported + stats.reported / 4 {
                stats.reported = stats.max;
                true
            } else {
                false
            }
        };
        if announce {
            gst::debug!(CAT, imp = self, "processing time grew to {elapsed}, posting latency message");
            let obj = self.obj();
            let _ = obj.post_message(gst::message::Latency::builder().src(&*obj).build());
        }
    }
}
