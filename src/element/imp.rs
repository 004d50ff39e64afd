//! The `codiff` element: GStreamer glue around [`crate::engine::Engine`].
//!
//! Settings (property values) and the per-stream state live in separate mutexes,
//! copied or cloned at the top of each call and never held while the engine runs.
//! The model is loaded at NULL->READY (again at READY->PAUSED if a model property
//! changed in READY), shared through [`super::cache`], and released at READY->NULL.
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use super::cache;
use super::convert::{self, ColorModel, Component, Layout, Plane, PlaneMut, YuvMatrix};
use crate::engine::{
    default_weights_path, ColorFix, DeviceSpec, Engine, EngineError, Mode, ModelSpec, Precision,
    RestoreOptions, RgbImage,
};

pub(super) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "codiff",
        gst::DebugColorFlags::empty(),
        Some("CODiff JPEG artifact removal"),
    )
});

/// Name of the custom meta carrying the quality estimate of a processed buffer.
pub const QF_META_NAME: &str = "CodiffQfMeta";

/// Which network restores the frames.
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstCodiffMode")]
pub enum CodiffMode {
    #[default]
    #[enum_value(
        name = "Diffusion when sd-model and codiff-checkpoint are set, else CaVE",
        nick = "auto"
    )]
    Auto = 0,
    #[enum_value(
        name = "CaVE reconstruction (compact weights or cave-checkpoint)",
        nick = "cave"
    )]
    Cave = 1,
    #[enum_value(
        name = "One-step diffusion (SD-2.1-base + CODiff LoRA)",
        nick = "diffusion"
    )]
    Diffusion = 2,
}

/// Floating-point precision of the UNet and VAE.
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstCodiffPrecision")]
pub enum CodiffPrecision {
    #[default]
    #[enum_value(name = "f32 on CPU, f16 on CUDA", nick = "auto")]
    Auto = 0,
    #[enum_value(name = "32-bit float", nick = "f32")]
    F32 = 1,
    #[enum_value(name = "16-bit float", nick = "f16")]
    F16 = 2,
    #[enum_value(name = "bfloat16", nick = "bf16")]
    Bf16 = 3,
}

/// Colour correction of the restored frame against the input.
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstCodiffColorFix")]
pub enum CodiffColorFix {
    #[default]
    #[enum_value(name = "AdaIN: match channel mean and deviation", nick = "adain")]
    Adain = 0,
    #[enum_value(name = "Wavelet: keep the input's low frequencies", nick = "wavelet")]
    Wavelet = 1,
    #[enum_value(name = "None", nick = "none")]
    None = 2,
}

impl From<CodiffPrecision> for Precision {
    fn from(p: CodiffPrecision) -> Self {
        match p {
            CodiffPrecision::Auto => Precision::Auto,
            CodiffPrecision::F32 => Precision::F32,
            CodiffPrecision::F16 => Precision::F16,
            CodiffPrecision::Bf16 => Precision::Bf16,
        }
    }
}

impl From<CodiffColorFix> for ColorFix {
    fn from(c: CodiffColorFix) -> Self {
        match c {
            CodiffColorFix::Adain => ColorFix::Adain,
            CodiffColorFix::Wavelet => ColorFix::Wavelet,
            CodiffColorFix::None => ColorFix::None,
        }
    }
}

const DEFAULT_MODE: CodiffMode = CodiffMode::Auto;
const DEFAULT_DEVICE: &str = "cpu";
const DEFAULT_PRECISION: CodiffPrecision = CodiffPrecision::Auto;
const DEFAULT_COLOR_FIX: CodiffColorFix = CodiffColorFix::Adain;
const DEFAULT_LATENT_TILE: u32 = 96;
const MAX_LATENT_TILE: u32 = 4096;
const DEFAULT_LATENT_OVERLAP: u32 = 32;
const MAX_LATENT_OVERLAP: u32 = 2048;
const DEFAULT_VAE_ENCODER_TILE: u32 = 1024;
const DEFAULT_VAE_DECODER_TILE: u32 = 224;
const DEFAULT_CAVE_TILE: u32 = 2048;
const MAX_PIXEL_TILE: u32 = 32768;
const DEFAULT_STRENGTH: f64 = 1.0;
const DEFAULT_QF: u32 = 0;
const DEFAULT_ENABLED: bool = true;
/// The default `weights` is [`default_weights_path()`] (`$CODIFF_WEIGHTS` or the
/// source tree's `weights/codiff-cave-compact.safetensors`).
static DEFAULT_WEIGHTS: LazyLock<String> =
    LazyLock::new(|| default_weights_path().to_string_lossy().into_owned());

/// Property values.
#[derive(Debug, Clone)]
struct Settings {
    mode: CodiffMode,
    weights: PathBuf,
    sd_model: Option<PathBuf>,
    codiff_checkpoint: Option<PathBuf>,
    cave_checkpoint: Option<PathBuf>,
    device: String,
    precision: CodiffPrecision,
    color_fix: CodiffColorFix,
    latent_tile: u32,
    latent_overlap: u32,
    vae_encoder_tile: u32,
    vae_decoder_tile: u32,
    cave_tile: u32,
    strength: f64,
    qf: u32,
    enabled: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: DEFAULT_MODE,
            weights: PathBuf::from(DEFAULT_WEIGHTS.as_str()),
            sd_model: None,
            codiff_checkpoint: None,
            cave_checkpoint: None,
            device: DEFAULT_DEVICE.to_string(),
            precision: DEFAULT_PRECISION,
            color_fix: DEFAULT_COLOR_FIX,
            latent_tile: DEFAULT_LATENT_TILE,
            latent_overlap: DEFAULT_LATENT_OVERLAP,
            vae_encoder_tile: DEFAULT_VAE_ENCODER_TILE,
            vae_decoder_tile: DEFAULT_VAE_DECODER_TILE,
            cave_tile: DEFAULT_CAVE_TILE,
            strength: DEFAULT_STRENGTH,
            qf: DEFAULT_QF,
            enabled: DEFAULT_ENABLED,
        }
    }
}

impl Settings {
    /// The files and device to load, checked: the mode resolved, the device parsed,
    /// and every file the engine will open present.
    fn model_spec(&self) -> Result<ModelSpec, gst::ErrorMessage> {
        let mode = match self.mode {
            CodiffMode::Cave => Mode::Cave,
            CodiffMode::Diffusion => Mode::Diffusion,
            CodiffMode::Auto if self.sd_model.is_some() && self.codiff_checkpoint.is_some() => {
                Mode::Diffusion
            }
            CodiffMode::Auto => Mode::Cave,
        };
        let device: DeviceSpec = self.device.parse().map_err(|err| {
            gst::error_msg!(
                gst::ResourceError::Settings,
                ["Invalid device property: {err}"]
            )
        })?;

        let mut files: Vec<(&str, &Path)> = Vec::new();
        match &self.cave_checkpoint {
            Some(cave) => files.push(("cave-checkpoint", cave)),
            None => files.push(("weights", &self.weights)),
        }
        if mode == Mode::Diffusion {
            match (&self.sd_model, &self.codiff_checkpoint) {
                (Some(sd), Some(codiff)) => {
                    files.push(("sd-model", sd));
                    files.push(("codiff-checkpoint", codiff));
                }
                _ => {
                    return Err(gst::error_msg!(
                        gst::ResourceError::Settings,
                        ["mode=diffusion needs both sd-model and codiff-checkpoint"]
                    ))
                }
            }
        }
        for (property, path) in files {
            if !path.exists() {
                return Err(gst::error_msg!(
                    gst::ResourceError::NotFound,
                    ("{property} file not found: {}", path.display()),
                    ["Set the {property} property to an existing file"]
                ));
            }
        }

        let (sd_dir, codiff) = match mode {
            Mode::Diffusion => (self.sd_model.clone(), self.codiff_checkpoint.clone()),
            Mode::Cave => (None, None),
        };
        Ok(ModelSpec {
            mode,
            weights: self.weights.clone(),
            sd_dir,
            codiff,
            cave: self.cave_checkpoint.clone(),
            device,
            precision: self.precision.into(),
        })
    }

    fn restore_options(&self) -> RestoreOptions {
        RestoreOptions {
            color_fix: self.color_fix.into(),
            latent_tile: self.latent_tile as usize,
            latent_overlap: self.latent_overlap as usize,
            vae_encoder_tile: self.vae_encoder_tile as usize,
            vae_decoder_tile: self.vae_decoder_tile as usize,
            cave_tile: self.cave_tile as usize,
            ..Default::default()
        }
    }
}

/// The loaded model and what it was loaded from.
struct Model {
    spec: ModelSpec,
    engine: Arc<Engine>,
}

/// Per-stream state, built in `set_info`.
struct State {
    layout: Layout,
}

/// Measured processing time, for the latency query.
#[derive(Default)]
struct Stats {
    /// Longest processing time of one frame since `start`.
    max: gst::ClockTime,
    /// Latency last reported (query answer or latency message).
    reported: gst::ClockTime,
}

#[derive(Default)]
pub struct Codiff {
    settings: Mutex<Settings>,
    model: Mutex<Option<Model>>,
    state: Mutex<Option<State>>,
    stats: Mutex<Stats>,
    /// QF of the frame just processed, for `transform_ip` to attach as meta.
    pending_qf: Mutex<Option<f64>>,
}

/// Why a call into the engine failed.
#[derive(Debug)]
enum Failure {
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
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, Failure> {
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

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Cave => "cave",
        Mode::Diffusion => "diffusion",
    }
}

/// Where the three colour components of `info`'s format live, or `None` for formats
/// the element does not handle (not 8 bits, not RGB or YUV, fewer than 3 components).
fn layout_for(info: &gst_video::VideoInfo) -> Option<Layout> {
    let finfo = info.format_info();
    if finfo.n_components() < 3 || finfo.depth().iter().take(3).any(|&d| d != 8) {
        return None;
    }
    let model = if finfo.is_rgb() {
        ColorModel::Rgb
    } else if finfo.is_yuv() {
        let colorimetry = info.colorimetry();
        // JPEG is BT.601 full range; use it where the caps leave a choice open.
        let (kr, kb) = colorimetry.matrix().kr_kb().unwrap_or((0.299, 0.114));
        let full_range = colorimetry.range() != gst_video::VideoColorRange::Range16_235;
        ColorModel::Yuv(YuvMatrix::new(kr, kb, full_range))
    } else {
        return None;
    };
    let comp = |c: usize| -> Option<Component> {
        Some(Component {
            plane: *finfo.plane().get(c)? as usize,
            offset: *finfo.poffset().get(c)? as usize,
            pixel_stride: usize::try_from(*finfo.pixel_stride().get(c)?)
                .ok()
                .filter(|&s| s > 0)?,
            sub_x: *finfo.w_sub().get(c)?,
            sub_y: *finfo.h_sub().get(c)?,
        })
    };
    Some(Layout {
        model,
        comps: [comp(0)?, comp(1)?, comp(2)?],
    })
}

impl Codiff {
    /// Load (or take from the cache) the model the properties name, unless the one
    /// held already matches them.
    fn ensure_model(&self) -> Result<(), gst::ErrorMessage> {
        let spec = self.settings.lock().unwrap().model_spec()?;
        if let Some(model) = self.model.lock().unwrap().as_ref() {
            if model.spec == spec {
                return Ok(());
            }
        }
        // Drop a model loaded for other settings before loading the new one.
        self.model.lock().unwrap().take();

        let obj = self.obj();
        // Each step is posted twice: as a `codiff-progress` element message (field
        // `step`) and as a GstProgress message (code `load`).
        let post_step = |kind: gst::ProgressType, step: &str| {
            gst::info!(CAT, imp = self, "model: {step}");
            let s = gst::Structure::builder("codiff-progress")
                .field("step", step)
                .build();
            let _ = obj.post_message(gst::message::Element::builder(s).src(&*obj).build());
            let _ = obj.post_message(
                gst::message::Progress::builder(kind, "load", step)
                    .src(&*obj)
                    .build(),
            );
        };
        post_step(
            gst::ProgressType::Start,
            &format!("loading {} model on {}", mode_name(spec.mode), spec.device),
        );
        let started = Instant::now();
        let mut progress = |step: &str| post_step(gst::ProgressType::Continue, step);
        let result = guarded(|| cache::engine(&spec, &mut progress));

        let (engine, loaded) = match result {
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
                    _ => gst::error_msg!(
                        gst::LibraryError::Init,
                        ("Cannot load the CODiff model: {text}"),
                        ["{spec:?}"]
                    ),
                });
            }
        };
        let done = if loaded {
            format!("model loaded in {:.1} s", started.elapsed().as_secs_f64())
        } else {
            "reusing the model already loaded by another element".to_string()
        };
        post_step(gst::ProgressType::Complete, &done);
        *self.model.lock().unwrap() = Some(Model { spec, engine });
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

    /// Update the processing-time statistics; announce a latency change when the
    /// longest frame time outgrew the reported latency by a quarter.
    fn record_processing_time(&self, elapsed: gst::ClockTime) {
        let announce = {
            let mut stats = self.stats.lock().unwrap();
            stats.max = stats.max.max(elapsed);
            if stats.max > stats.reported + stats.reported / 4 {
                stats.reported = stats.max;
                true
            } else {
                false
            }
        };
        if announce {
            gst::debug!(
                CAT,
                imp = self,
                "processing time grew to {elapsed}, posting latency message"
            );
            let obj = self.obj();
            let _ = obj.post_message(gst::message::Latency::builder().src(&*obj).build());
        }
    }

    fn attach_qf_meta(&self, buf: &mut gst::BufferRef, qf: f64) {
        if let Ok(mut meta) = gst::meta::CustomMeta::from_mut_buffer(buf, QF_META_NAME) {
            meta.mut_structure().set("qf", qf);
            return;
        }
        match gst::meta::CustomMeta::add(buf, QF_META_NAME) {
            Ok(mut meta) => meta.mut_structure().set("qf", qf),
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
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecEnum::builder_with_default("mode", DEFAULT_MODE)
                    .nick("Mode")
                    .blurb("Restoration network: auto picks diffusion when sd-model and codiff-checkpoint are set, else CaVE")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("weights")
                    .nick("Weights")
                    .blurb("Compact CaVE model (safetensors); default $CODIFF_WEIGHTS or the shipped weights/codiff-cave-compact.safetensors")
                    .default_value(Some(DEFAULT_WEIGHTS.as_str()))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("sd-model")
                    .nick("SD model")
                    .blurb("Stable Diffusion 2.1-base folder in diffusers layout (unet/, vae/, scheduler/), for mode=diffusion")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("codiff-checkpoint")
                    .nick("CODiff checkpoint")
                    .blurb("Official codiff.pkl (LoRA and projection), for mode=diffusion")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("cave-checkpoint")
                    .nick("CaVE checkpoint")
                    .blurb("Official cave.pth (or a safetensors CaVE); replaces the CaVE of the weights file")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("Where the model runs: cpu, cuda or cuda:N")
                    .default_value(Some(DEFAULT_DEVICE))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("precision", DEFAULT_PRECISION)
                    .nick("Precision")
                    .blurb("Floating-point precision of the UNet and VAE")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("color-fix", DEFAULT_COLOR_FIX)
                    .nick("Colour fix")
                    .blurb("Colour correction of the restored frame against the input")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("latent-tile")
                    .nick("Latent tile")
                    .blurb("Side of the latent tiles in latent pixels (1/8 of image pixels), 0 = never tile")
                    .maximum(MAX_LATENT_TILE)
                    .default_value(DEFAULT_LATENT_TILE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("latent-overlap")
                    .nick("Latent overlap")
                    .blurb("Overlap of neighbouring latent tiles in latent pixels (less than latent-tile)")
                    .maximum(MAX_LATENT_OVERLAP)
                    .default_value(DEFAULT_LATENT_OVERLAP)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("vae-encoder-tile")
                    .nick("VAE encoder tile")
                    .blurb("VAE encoder tile side in image pixels (diffusion mode; the official \
                            vae_encoder_tiled_size): frames larger than this are encoded in tiles, 0 = never tile")
                    .maximum(MAX_PIXEL_TILE)
                    .default_value(DEFAULT_VAE_ENCODER_TILE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("vae-decoder-tile")
                    .nick("VAE decoder tile")
                    .blurb("VAE decoder tile side in latent pixels (1 latent px = 8 image px; diffusion mode; \
                            the official vae_decoder_tiled_size): larger latents are decoded in tiles, 0 = never tile")
                    .maximum(MAX_PIXEL_TILE / 8)
                    .default_value(DEFAULT_VAE_DECODER_TILE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("cave-tile")
                    .nick("CaVE tile")
                    .blurb("Largest side of the CaVE encoder tiles in image pixels for larger frames (the \
                            stitched embedding is exact; at least 736 for the official CaVE), 0 = never tile")
                    .maximum(MAX_PIXEL_TILE)
                    .default_value(DEFAULT_CAVE_TILE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("strength")
                    .nick("Strength")
                    .blurb("Blend between the input (0) and the restored frame (1)")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_STRENGTH)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("qf")
                    .nick("Quality factor")
                    .blurb("Known JPEG quality (1-100) reported instead of CaVE's estimate; 0 = estimate")
                    .maximum(100)
                    .default_value(DEFAULT_QF)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("enabled")
                    .nick("Enabled")
                    .blurb("Restore frames; when false, buffers pass through untouched")
                    .default_value(DEFAULT_ENABLED)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn constructed(&self) {
        self.parent_constructed();
        // Let basetransform drop frames that QoS events say are already late.
        self.obj().set_qos(true);
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let path = |v: &glib::Value| {
            v.get::<Option<String>>()
                .expect("type checked upstream")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        let mut settings = self.settings.lock().unwrap();
        match pspec.name() {
            "mode" => settings.mode = value.get().expect("type checked upstream"),
            "weights" => {
                settings.weights =
                    path(value).unwrap_or_else(|| PathBuf::from(DEFAULT_WEIGHTS.as_str()))
            }
            "sd-model" => settings.sd_model = path(value),
            "codiff-checkpoint" => settings.codiff_checkpoint = path(value),
            "cave-checkpoint" => settings.cave_checkpoint = path(value),
            "device" => {
                let device = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| DEFAULT_DEVICE.to_string());
                if let Err(err) = device.parse::<DeviceSpec>() {
                    // Kept as is: loading fails with this message.
                    gst::warning!(CAT, imp = self, "{err}");
                }
                settings.device = device;
            }
            "precision" => settings.precision = value.get().expect("type checked upstream"),
            "color-fix" => settings.color_fix = value.get().expect("type checked upstream"),
            "latent-tile" => settings.latent_tile = value.get().expect("type checked upstream"),
            "latent-overlap" => {
                settings.latent_overlap = value.get().expect("type checked upstream")
            }
            "vae-encoder-tile" => settings.vae_encoder_tile = value.get().expect("type checked upstream"),
            "vae-decoder-tile" => settings.vae_decoder_tile = value.get().expect("type checked upstream"),
            "cave-tile" => settings.cave_tile = value.get().expect("type checked upstream"),
            "strength" => settings.strength = value.get().expect("type checked upstream"),
            "qf" => settings.qf = value.get().expect("type checked upstream"),
            "enabled" => {
                let enabled = value.get().expect("type checked upstream");
                settings.enabled = enabled;
                drop(settings);
                self.obj().set_passthrough(!enabled);
                return;
            }
            other => unimplemented!("property {other}"),
        }
        gst::debug!(CAT, imp = self, "{} set to {:?}", pspec.name(), value);
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings.lock().unwrap();
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .to_value()
        };
        match pspec.name() {
            "mode" => settings.mode.to_value(),
            "weights" => settings.weights.to_string_lossy().to_value(),
            "sd-model" => path(&settings.sd_model),
            "codiff-checkpoint" => path(&settings.codiff_checkpoint),
            "cave-checkpoint" => path(&settings.cave_checkpoint),
            "device" => settings.device.to_value(),
            "precision" => settings.precision.to_value(),
            "color-fix" => settings.color_fix.to_value(),
            "latent-tile" => settings.latent_tile.to_value(),
            "latent-overlap" => settings.latent_overlap.to_value(),
            "vae-encoder-tile" => settings.vae_encoder_tile.to_value(),
            "vae-decoder-tile" => settings.vae_decoder_tile.to_value(),
            "cave-tile" => settings.cave_tile.to_value(),
            "strength" => settings.strength.to_value(),
            "qf" => settings.qf.to_value(),
            "enabled" => settings.enabled.to_value(),
            other => unimplemented!("property {other}"),
        }
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
                 pngenc ! filesink location=out.png",
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
                    I420, Yv12, Nv12, Nv21, Y42b, Y444, Yuy2, Uyvy, Rgb, Bgr, Rgba, Bgra, Argb,
                    Abgr, Rgbx, Bgrx, Xrgb, Xbgr,
                ])
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid src pad template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid sink pad template"),
            ]
        });
        PAD_TEMPLATES.as_ref()
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        gst::debug!(CAT, imp = self, "changing state {transition:?}");
        if transition == gst::StateChange::NullToReady {
            // Load before any data flows; this can take seconds.
            if let Err(err) = self.ensure_model() {
                self.post_error_message(err);
                return Err(gst::StateChangeError);
            }
        }
        let ret = self.parent_change_state(transition)?;
        if transition == gst::StateChange::ReadyToNull {
            // The cache frees the model with its last user.
            self.model.lock().unwrap().take();
        }
        Ok(ret)
    }
}

impl BaseTransformImpl for Codiff {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        // A model property may have changed in READY.
        self.ensure_model()?;
        *self.stats.lock().unwrap() = Stats::default();
        let enabled = self.settings.lock().unwrap().enabled;
        self.obj().set_passthrough(!enabled);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.state.lock().unwrap().take();
        self.pending_qf.lock().unwrap().take();
        *self.stats.lock().unwrap() = Stats::default();
        Ok(())
    }

    fn query(&self, direction: gst::PadDirection, query: &mut gst::QueryRef) -> bool {
        if direction == gst::PadDirection::Src {
            if let gst::QueryViewMut::Latency(q) = query.view_mut() {
                let mut upstream = gst::query::Latency::new();
                if self.obj().sink_pad().peer_query(&mut upstream) {
                    let (live, min, max) = upstream.result();
                    let ours = {
                        let mut stats = self.stats.lock().unwrap();
                        stats.reported = stats.max;
                        stats.max
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
        let layout = layout_for(in_info).ok_or_else(|| {
            gst::loggable_error!(CAT, "unsupported format {:?}", in_info.format())
        })?;
        gst::debug!(CAT, imp = self, "caps {incaps}: layout {layout:?}");
        *self.state.lock().unwrap() = Some(State { layout });
        self.parent_set_info(incaps, in_info, outcaps, out_info)
    }

    fn transform_frame_ip(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = self.settings.lock().unwrap().clone();
        let Some(engine) = self
            .model
            .lock()
            .unwrap()
            .as_ref()
            .map(|m| m.engine.clone())
        else {
            return Err(self.fail("no model", "the element was not started"));
        };
        let Some(layout) = self.state.lock().unwrap().as_ref().map(|s| s.layout) else {
            return Err(gst::FlowError::NotNegotiated);
        };
        let started = Instant::now();
        let (width, height) = (frame.width() as usize, frame.height() as usize);
        let n_planes = frame.n_planes() as usize;
        let strides = frame.plane_stride()[..n_planes]
            .iter()
            .map(|&s| usize::try_from(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| self.fail("frame", "negative plane strides are not supported"))?;

        let input = {
            let mut planes = Vec::with_capacity(n_planes);
            for (p, &stride) in strides.iter().enumerate() {
                let data = frame
                    .plane_data(p as u32)
                    .map_err(|err| self.fail("frame", err))?;
                planes.push(Plane { data, stride });
            }
            convert::read_rgb(&layout, &planes, width, height)
                .map_err(|err| self.fail("reading the frame", err))?
        };

        let strength = settings.strength.clamp(0.0, 1.0) as f32;
        let mut image =
            RgbImage::new(width, height, input).map_err(|err| self.fail("frame", err))?;
        let estimate = if strength > 0.0 {
            guarded(|| engine.restore(&mut image, &settings.restore_options()))
        } else if settings.qf == 0 {
            guarded(|| engine.estimate_qf(&image))
        } else {
            Ok(settings.qf as f32)
        }
        .map_err(|err| self.fail("restoring the frame failed", err))?;

        if strength > 0.0 {
            if (image.width, image.height) != (width, height) {
                return Err(self.fail(
                    "restoring the frame failed",
                    format!(
                        "engine returned {}x{} for a {width}x{height} frame",
                        image.width, image.height
                    ),
                ));
            }
            let mut planes: Vec<PlaneMut> = frame
                .planes_data_mut()
                .into_iter()
                .zip(&strides)
                .map(|(data, &stride)| PlaneMut { data, stride })
                .collect();
            convert::write_rgb(&layout, &mut planes, width, height, &image.data, strength)
                .map_err(|err| self.fail("writing the frame", err))?;
        }

        let elapsed = gst::ClockTime::from_nseconds(started.elapsed().as_nanos() as u64);
        self.record_processing_time(elapsed);
        let qf = if settings.qf > 0 {
            settings.qf as f64
        } else {
            estimate as f64
        };
        let pts = frame.buffer().pts();
        gst::trace!(
            CAT,
            imp = self,
            "frame {} qf {qf:.1} in {elapsed}",
            pts.display()
        );
        let obj = self.obj();
        let s = gst::Structure::builder("codiff-qf")
            .field("qf", qf)
            .field("estimated", settings.qf == 0)
            .field("pts", pts.map_or(u64::MAX, gst::ClockTime::nseconds))
            .field("processing-time", elapsed.nseconds())
            .field("mode", mode_name(engine.mode()))
            .build();
        let _ = obj.post_message(gst::message::Element::builder(s).src(&*obj).build());
        *self.pending_qf.lock().unwrap() = Some(qf);
        Ok(gst::FlowSuccess::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_panics_and_errors_become_failures() {
        let r: Result<(), _> = guarded(|| panic!("boom {}", 7));
        assert!(
            matches!(&r, Err(Failure::Panic(m)) if m == "boom 7"),
            "{r:?}"
        );
        assert_eq!(r.unwrap_err().to_string(), "engine panicked: boom 7");
        let r: Result<(), _> = guarded(|| {
            Err(EngineError::NotFound {
                path: "/x/w.safetensors".into(),
            })
        });
        assert_eq!(
            r.unwrap_err().to_string(),
            "/x/w.safetensors: file not found"
        );
        assert_eq!(guarded(|| Ok(3)).unwrap(), 3);
    }

    #[test]
    fn settings_resolve_the_mode_and_check_files() {
        let dir = std::env::temp_dir().join(format!("codiff-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| {
            let p = dir.join(name);
            std::fs::write(&p, b"").unwrap();
            p
        };
        let mut s = Settings {
            weights: file("w.safetensors"),
            ..Settings::default()
        };
        assert_eq!(s.model_spec().unwrap().mode, Mode::Cave);
        s.sd_model = Some(dir.clone());
        assert_eq!(
            s.model_spec().unwrap().mode,
            Mode::Cave,
            "auto needs both files"
        );
        s.codiff_checkpoint = Some(file("codiff.pkl"));
        let spec = s.model_spec().unwrap();
        assert_eq!(
            (spec.mode, spec.sd_dir.as_deref()),
            (Mode::Diffusion, Some(dir.as_path()))
        );
        s.mode = CodiffMode::Cave;
        let spec = s.model_spec().unwrap();
        assert_eq!(
            (spec.mode, spec.sd_dir, spec.codiff),
            (Mode::Cave, None, None)
        );
        s.device = "cuda:1".into();
        assert_eq!(s.model_spec().unwrap().device, DeviceSpec::Cuda(1));
        s.device = "tpu".into();
        assert!(s.model_spec().unwrap_err().to_string().contains("tpu"));
        s.device = "cpu".into();
        s.weights = dir.join("missing.safetensors");
        let err = format!("{:?}", s.model_spec().unwrap_err());
        assert!(
            err.contains("missing.safetensors") && err.contains("weights"),
            "{err}"
        );
        // A CaVE checkpoint replaces the weights file.
        s.cave_checkpoint = Some(file("cave.pth"));
        assert!(s.model_spec().is_ok());
        s.mode = CodiffMode::Diffusion;
        s.codiff_checkpoint = None;
        assert!(format!("{:?}", s.model_spec().unwrap_err()).contains("codiff-checkpoint"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn layouts_of_common_formats() {
        gst::init().unwrap();
        let layout = |caps: &str| {
            let caps: gst::Caps = caps.parse().unwrap();
            layout_for(&gst_video::VideoInfo::from_caps(&caps).unwrap())
        };
        let jpeg = layout("video/x-raw,format=I420,width=17,height=9,colorimetry=1:4:0:0").unwrap();
        assert_eq!(
            jpeg.model,
            ColorModel::Yuv(YuvMatrix::new(0.299, 0.114, true))
        );
        assert_eq!(
            (
                jpeg.comps[1].plane,
                jpeg.comps[1].sub_x,
                jpeg.comps[1].sub_y
            ),
            (1, 1, 1)
        );
        let hd =
            layout("video/x-raw,format=NV12,width=1920,height=1080,colorimetry=bt709").unwrap();
        assert_eq!(
            hd.model,
            ColorModel::Yuv(YuvMatrix::new(0.2126, 0.0722, false))
        );
        assert_eq!(
            hd.comps[2],
            Component {
                plane: 1,
                offset: 1,
                pixel_stride: 2,
                sub_x: 1,
                sub_y: 1
            }
        );
        let bgrx = layout("video/x-raw,format=BGRx,width=1,height=1").unwrap();
        assert_eq!(bgrx.model, ColorModel::Rgb);
        assert_eq!(
            bgrx.comps.map(|c| (c.offset, c.pixel_stride)),
            [(2, 4), (1, 4), (0, 4)]
        );
        let argb = layout("video/x-raw,format=ARGB,width=3,height=2").unwrap();
        assert_eq!(argb.comps.map(|c| c.offset), [1, 2, 3]);
        let yuy2 = layout("video/x-raw,format=YUY2,width=4,height=2").unwrap();
        assert_eq!(
            yuy2.comps.map(|c| (c.offset, c.pixel_stride, c.sub_x)),
            [(0, 2, 0), (1, 4, 1), (3, 4, 1)]
        );
        assert!(layout("video/x-raw,format=GRAY8,width=4,height=2").is_none());
        assert!(layout("video/x-raw,format=I420_10LE,width=4,height=2").is_none());
    }
}
