//! Loading the model of the `codiff` element: the engine call guarded against
//! panics, progress messages, the process-wide [`super::cache`], and the
//! element's own thread pool. Works on the element's [`Loaded`] and
//! [`Properties`] mutexes; the element module calls in, nothing here calls it.
use gst::prelude::*;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::cache;
use super::category::CAT;
use super::settings::Properties;
use crate::engine::{Engine, EngineError, Mode, ModelSpec};

/// The loaded model and what it was loaded from.
pub(super) struct Model {
    pub(super) spec: ModelSpec,
    pub(super) engine: Arc<Engine>,
}

/// What runs the frames, set up before data flows (NULL->READY, `start`) and
/// released at READY->NULL: the model and the thread pool it runs in.
#[derive(Default)]
pub(super) struct Loaded {
    pub(super) model: Option<Model>,
    /// The element's own thread pool (`n-threads` > 0) and its size.
    pub(super) pool: Option<(u32, Arc<rayon::ThreadPool>)>,
}

impl Loaded {
    /// The loaded model's engine, if a model is loaded.
    pub(super) fn engine(&self) -> Option<Arc<Engine>> {
        self.model.as_ref().map(|m| m.engine.clone())
    }

    /// The smallest CaVE tile the loaded model accepts.
    pub(super) fn min_cave_tile(&self) -> Option<usize> {
        self.model.as_ref().map(|m| m.engine.min_cave_tile())
    }

    /// The element's own thread pool, if `n-threads` asked for one.
    pub(super) fn thread_pool(&self) -> Option<Arc<rayon::ThreadPool>> {
        self.pool.as_ref().map(|(_, p)| p.clone())
    }
}

/// Why a call into the engine failed.
#[derive(Debug)]
pub(super) enum Failure {
    Engine(EngineError),
    Panic(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // EngineError's Display names the file, tensor key and shapes.
            Failure::Engine(err) => write!(f, "{err}"),
            Failure::Panic(what) => write!(f, "engine panicked: {what}"),
        }
    }
}

/// Run engine code, turning a panic into an error instead of unwinding into C.
pub(super) fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(Failure::Engine(err)),
        Err(payload) => Err(Failure::Panic(
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string()),
        )),
    }
}

pub(super) fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Cave => "cave",
        Mode::Diffusion => "diffusion",
    }
}

/// Load (or take from the cache) the model the properties name, unless the
/// one held already matches them.
pub(super) fn ensure_model(
    element: &gst::Element,
    properties: &Mutex<Properties>,
    loaded: &Mutex<Loaded>,
) -> Result<(), gst::ErrorMessage> {
    let (spec, fallbacks) = {
        let properties = properties.lock().unwrap();
        (properties.current.model_spec()?, properties.current.fallbacks())
    };
    if let Some(model) = loaded.lock().unwrap().model.as_ref() {
        if model.spec == spec {
            return Ok(());
        }
    }
    for warning in fallbacks {
        gst::element_warning!(element, gst::ResourceError::Settings, ("{warning}"));
    }
    // Drop a model loaded for other settings before loading the new one.
    loaded.lock().unwrap().model.take();

    // Each step is posted twice: as a `codiff-progress` element message (field
    // `step`) and as a GstProgress message (code `load`).
    let post_step = |kind: gst::ProgressType, step: &str| {
        gst::info!(CAT, obj = element, "model: {step}");
        let s = gst::Structure::builder("codiff-progress").field("step", step).build();
        let _ = element.post_message(gst::message::Element::builder(s).src(element).build());
        let _ = element.post_message(gst::message::Progress::builder(kind, "load", step).src(element).build());
    };
    post_step(gst::ProgressType::Start, &format!("loading {} model on {}", mode_name(spec.mode), spec.device));
    let started = Instant::now();
    let mut progress = |step: &str| post_step(gst::ProgressType::Continue, step);
    let result = guarded(|| cache::engine(&spec, &mut progress));

    let (engine, newly_loaded) = match result {
        Ok(v) => v,
        Err(err) => {
            let text = err.to_string();
            post_step(gst::ProgressType::Error, &format!("loading failed: {text}"));
            return Err(match err {
                Failure::Engine(EngineError::NotFound { .. }) => gst::error_msg!(
                    gst::ResourceError::NotFound,
                    ("Cannot load the CODiff model: {text}"),
                    ["{spec:?}"]
                ),
                Failure::Engine(EngineError::Io { .. }) => gst::error_msg!(
                    gst::ResourceError::OpenRead,
                    ("Cannot load the CODiff model: {text}"),
                    ["{spec:?}"]
                ),
                _ => gst::error_msg!(gst::LibraryError::Init, ("Cannot load the CODiff model: {text}"), ["{spec:?}"]),
            });
        }
    };
    let done = if newly_loaded {
        format!("model loaded in {:.1} s", started.elapsed().as_secs_f64())
    } else {
        "reusing the model already loaded by another element".to_string()
    };
    post_step(gst::ProgressType::Complete, &done);
    // Tile properties this model cannot use as set (adjusted at each frame).
    let min_cave_tile = engine.min_cave_tile();
    let (_, adjusted) = properties.lock().unwrap().current.restore_options(Some(min_cave_tile));
    for warning in adjusted {
        gst::warning!(CAT, obj = element, "{warning}");
    }
    loaded.lock().unwrap().model = Some(Model { spec, engine });
    Ok(())
}

/// Build the element's own thread pool when `n-threads` asks for one.
pub(super) fn ensure_pool(
    element: &gst::Element,
    properties: &Mutex<Properties>,
    loaded: &Mutex<Loaded>,
) -> Result<(), gst::ErrorMessage> {
    let n = properties.lock().unwrap().current.n_threads;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as u32;
    let n = if n > cores {
        gst::element_warning!(
            element,
            gst::ResourceError::Settings,
            ("n-threads={n} is more than the {cores} cores of this machine (threads beyond them only wait on each other): using {cores}")
        );
        cores
    } else {
        n
    };
    let mut loaded = loaded.lock().unwrap();
    let pool = &mut loaded.pool;
    if n == 0 {
        *pool = None;
    } else if pool.as_ref().is_none_or(|(size, _)| *size != n) {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .thread_name(|i| format!("codiff-{i}"))
            .build()
            .map_err(|err| {
                gst::error_msg!(gst::ResourceError::Settings, ["Cannot start n-threads={n} threads: {err}"])
            })?;
        gst::debug!(CAT, obj = element, "own thread pool of {n} threads");
        *pool = Some((n, Arc::new(built)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_panics_and_errors_become_failures() {
        let r: Result<(), _> = guarded(|| panic!("boom {}", 7));
        assert!(matches!(&r, Err(Failure::Panic(m)) if m == "boom 7"), "{r:?}");
        assert_eq!(r.unwrap_err().to_string(), "engine panicked: boom 7");
        let r: Result<(), _> = guarded(|| Err(EngineError::NotFound { path: "/x/w.safetensors".into() }));
        assert_eq!(r.unwrap_err().to_string(), "/x/w.safetensors: file not found");
        assert_eq!(guarded(|| Ok(3)).unwrap(), 3);
    }
}
