//! Property values of the `codiff` element: the enums, the property table
//! (name, nick, blurb, range, default, flags, checks of every property, in one
//! list), [`Settings`] and what the element derives from them.
use gst::glib;
use gst::prelude::*;

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use super::property::{settings, Bool, Double, Enum, File, OptionalFile, Text, UInt, UInt64};
use crate::engine::{default_weights_path, ColorFix, DeviceSpec, Mode, ModelSpec, Precision, RestoreOptions};

/// Which network restores the frames.
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstCodiffMode")]
pub enum CodiffMode {
    #[default]
    #[enum_value(name = "Diffusion when sd-model and codiff-checkpoint are set, else CaVE", nick = "auto")]
    Auto = 0,
    #[enum_value(name = "CaVE reconstruction (compact weights or cave-checkpoint)", nick = "cave")]
    Cave = 1,
    #[enum_value(name = "One-step diffusion (SD-2.1-base + CODiff LoRA)", nick = "diffusion")]
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
    #[enum_value(
        name = "bfloat16 (on the CPU: f32 tensors, bf16 dot products with f32 sums, AVX512_BF16 where present)",
        nick = "bf16"
    )]
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

/// What happens to a frame the engine cannot restore.
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstCodiffOnError")]
pub enum CodiffOnError {
    #[default]
    #[enum_value(name = "Post an error and stop the stream", nick = "fail")]
    Fail = 0,
    #[enum_value(name = "Post a warning and push the frame unchanged", nick = "passthrough")]
    Passthrough = 1,
}

/// What happens to a frame of a live stream that cannot be restored before it
/// is due (its running time plus the pipeline latency).
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstCodiffLateFrames")]
pub enum CodiffLateFrames {
    #[default]
    #[enum_value(name = "Apply the last restoration's correction where the picture has not moved", nick = "carry")]
    Carry = 0,
    #[enum_value(name = "Push the frame unrestored", nick = "passthrough")]
    Passthrough = 1,
    #[enum_value(name = "Drop the frame", nick = "drop")]
    Drop = 2,
}

/// Largest pixel tile side (`vae-encoder-tile`, `cave-tile`; `vae-decoder-tile`
/// is in latent pixels: an eighth of it).
pub(super) const MAX_PIXEL_TILE: u32 = 32768;
/// The default `weights` is [`default_weights_path()`] (`$CODIFF_WEIGHTS` or the
/// source tree's `weights/codiff-cave-compact.safetensors`).
pub(super) static DEFAULT_WEIGHTS: LazyLock<String> =
    LazyLock::new(|| default_weights_path().to_string_lossy().into_owned());

// The element's properties, in the order of their specs. `mutable_ready`
// marks a model property: loaded at NULL->READY, kept pending when set in
// PAUSED or PLAYING (see [`Properties`]). See `property.rs` for the kinds and
// what the macro makes of this list.
settings! {
    mode: CodiffMode {
        name: "mode",
        nick: "Mode",
        blurb: "Restoration network: auto picks diffusion when sd-model and codiff-checkpoint are set, else CaVE",
        kind: Enum(CodiffMode::Auto),
        flags: mutable_ready,
    }
    weights: PathBuf {
        name: "weights",
        nick: "Weights",
        blurb: "Compact CaVE model (safetensors); default $CODIFF_WEIGHTS or the shipped weights/codiff-cave-compact.safetensors",
        kind: File(DEFAULT_WEIGHTS.as_str()),
        flags: mutable_ready,
    }
    sd_model: Option<PathBuf> {
        name: "sd-model",
        nick: "SD model",
        blurb: "Stable Diffusion 2.1-base folder in diffusers layout (unet/, vae/, scheduler/), for mode=diffusion",
        kind: OptionalFile,
        flags: mutable_ready,
    }
    codiff_checkpoint: Option<PathBuf> {
        name: "codiff-checkpoint",
        nick: "CODiff checkpoint",
        blurb: "Official codiff.pkl (LoRA and projection), for mode=diffusion",
        kind: OptionalFile,
        flags: mutable_ready,
    }
    cave_checkpoint: Option<PathBuf> {
        name: "cave-checkpoint",
        nick: "CaVE checkpoint",
        blurb: "Official cave.pth (or a safetensors CaVE); replaces the CaVE of the weights file",
        kind: OptionalFile,
        flags: mutable_ready,
    }
    device: String {
        name: "device",
        nick: "Device",
        blurb: "Where the model runs: cpu, cuda or cuda:N",
        kind: Text("cpu"),
        flags: mutable_ready,
        check: Settings::device_warning,
    }
    precision: CodiffPrecision {
        name: "precision",
        nick: "Precision",
        blurb: "Floating-point precision of the UNet and VAE, and on the CPU of the compact model's inner layers; bf16 on the CPU multiplies bf16-rounded operands with f32 sums (vdpbf16ps on CPUs with AVX512_BF16; emulated elsewhere, no faster than f32 there): the compact model 1.5x faster than f32 at 720p with PSNR-Y within 0.01 dB; the full model 1.1x (Winograd F(4,3) and im2col convolutions stay f32), 50.8 dB against its f32 output",
        kind: Enum(CodiffPrecision::Auto),
        flags: mutable_ready,
    }
    color_fix: CodiffColorFix {
        name: "color-fix",
        nick: "Colour fix",
        blurb: "Colour correction of the restored frame against the input",
        kind: Enum(CodiffColorFix::Adain),
        flags: mutable_playing,
    }
    latent_tile: u32 {
        name: "latent-tile",
        nick: "Latent tile",
        blurb: "Side of the latent tiles in latent pixels (1/8 of image pixels), 0 = never tile; \
                values under 32 run as 32 (with a warning)",
        kind: UInt { max: 4096, default: 96 },
        flags: mutable_playing,
        check: Settings::latent_tile_warnings,
    }
    latent_overlap: u32 {
        name: "latent-overlap",
        nick: "Latent overlap",
        blurb: "Overlap of neighbouring latent tiles in latent pixels; more than half of latent-tile \
                runs as half (with a warning)",
        kind: UInt { max: 2048, default: 32 },
        flags: mutable_playing,
        check: Settings::latent_tile_warnings,
    }
    vae_encoder_tile: u32 {
        name: "vae-encoder-tile",
        nick: "VAE encoder tile",
        blurb: "VAE encoder tile side in image pixels (diffusion mode; the official \
                vae_encoder_tiled_size): frames larger than this are encoded in tiles, 0 = never tile",
        kind: UInt { max: MAX_PIXEL_TILE, default: 1024 },
        flags: mutable_playing,
    }
    vae_decoder_tile: u32 {
        name: "vae-decoder-tile",
        nick: "VAE decoder tile",
        blurb: "VAE decoder tile side in latent pixels (1 latent px = 8 image px; diffusion mode; \
                the official vae_decoder_tiled_size): larger latents are decoded in tiles, 0 = never tile",
        kind: UInt { max: MAX_PIXEL_TILE / 8, default: 224 },
        flags: mutable_playing,
    }
    cave_tile: u32 {
        name: "cave-tile",
        nick: "CaVE tile",
        blurb: "Largest side of the CaVE tiles in image pixels for larger frames: the embedding \
                (diffusion) and the reconstruction (cave mode), stitched exactly; 0 = never tile; \
                values under what the loaded model's margins need (736 for the official CaVE's \
                embedding, 800 for the default model's reconstruction) run as that minimum (with a warning)",
        kind: UInt { max: MAX_PIXEL_TILE, default: 2048 },
        flags: mutable_playing,
        check: Settings::cave_tile_warnings,
    }
    strength: f64 {
        name: "strength",
        nick: "Strength",
        blurb: "Blend between the input (0) and the restored frame (1)",
        kind: Double { min: 0.0, max: 1.0, default: 1.0 },
        flags: mutable_playing,
    }
    qf: u32 {
        name: "qf",
        nick: "Quality factor",
        blurb: "JPEG quality (1-100) to restore for and report instead of CaVE's estimate \
                (a quality-conditioned model smooths more at lower values; others only \
                report it); 0 = CaVE's estimate",
        kind: UInt { max: 100, default: 0 },
        flags: mutable_playing,
    }
    enabled: bool {
        name: "enabled",
        nick: "Enabled",
        blurb: "Restore frames; when false, buffers pass through untouched",
        kind: Bool(true),
        flags: mutable_playing,
    }
    on_error: CodiffOnError {
        name: "on-error",
        nick: "On error",
        blurb: "A frame that cannot be restored (engine error, above max-frame-pixels): fail \
                stops the stream with an error, passthrough posts a warning and pushes the \
                frame unchanged",
        kind: Enum(CodiffOnError::Fail),
        flags: mutable_playing,
    }
    /// Default 4096x4096: DCI 4K and 3840x2160 pass; an 8000x8000 frame (what a
    /// 2 KB JPEG can claim) is refused. CaVE mode takes about 200 bytes per
    /// pixel (3.4 GB here), diffusion mode at 3840x2160 7.6 GB peak (most of it
    /// the model).
    max_frame_pixels: u64 {
        name: "max-frame-pixels",
        nick: "Maximum frame pixels",
        blurb: "Frames with more pixels (width x height) are refused before anything is \
                allocated for them (see on-error); the default 16777216 = 4096x4096 takes \
                3840x2160; 0 = no limit",
        kind: UInt64(4096 * 4096),
        flags: mutable_playing,
    }
    post_messages: bool {
        name: "post-messages",
        nick: "Post messages",
        blurb: "Post a codiff-qf element message for every frame (the CodiffQfMeta is \
                attached either way)",
        kind: Bool(true),
        flags: mutable_playing,
    }
    n_threads: u32 {
        name: "n-threads",
        nick: "Threads",
        blurb: "CPU threads of this element's own thread pool for the engine's kernels, \
                matrix products and convolutions; 0 = rayon's global pool (all cores). \
                Element-wise tensor ops use candle's process-wide pool (CANDLE_NUM_THREADS)",
        kind: UInt { max: 1024, default: 0 },
        flags: mutable_ready,
    }
    warm_up: bool {
        name: "warm-up",
        nick: "Warm-up",
        blurb: "At caps time, time one restore of a test pattern of the negotiated size (at \
                most 640x480 pixels, the time scaled up for larger frames) so the \
                LATENCY query is right before the first frame",
        kind: Bool(true),
        flags: mutable_playing,
    }
    /// Default 0.75, the weight of the previous output on still content
    /// (examples/flicker.rs, README "Flicker"): at 0.5 a still scene at QF 15
    /// no longer flickers more than its input.
    temporal_smoothing: f64 {
        name: "temporal-smoothing",
        nick: "Temporal smoothing",
        blurb: "Against flicker: weight (0..1) of the previous output, moved along the \
                picture's block motion, where the motion-compensated input did not change \
                beyond what compression noise explains (a 5x5 mean signed change under 12 \
                code values); elsewhere (a new object, a cut, a wrong match) the frame is \
                kept as restored, and no pixel moves more than 12 code values. 0 = off \
                (frame-independent output). The history is dropped on flushes, \
                discontinuities and caps changes",
        kind: Double { min: 0.0, max: 1.0, default: 0.75 },
        flags: mutable_playing,
    }
    guard: bool {
        name: "guard",
        nick: "Guard",
        blurb: "Do no harm: restore only frames whose pixels show JPEG quantisation on the \
                8x8 grid (never-compressed, scaled and flat frames pass unchanged, bit for \
                bit), keep less of the model's change the higher the JPEG quality (none \
                from quality 80; from 45 on test patterns and other full-swing synthetic \
                content), and clamp the result into the JPEG's quantisation \
                intervals. The quality is read from the quantisation steps. false = the \
                bare model on every frame",
        kind: Bool(true),
        flags: mutable_playing,
    }
    late_frames: CodiffLateFrames {
        name: "late-frames",
        nick: "Late frames",
        blurb: "Live streams (the latency query finds a live source): a frame that \
                cannot be restored before it is due (its running time plus the pipeline \
                latency, by the recent frames' processing time) is not restored in the \
                stream: carry = it leaves at once showing the previous output moved along \
                the picture's motion where nothing else changed, while the newest such \
                frame is restored on a low-priority background thread and taken up by the \
                frames after it; passthrough = pushed unrestored; drop = dropped. Later \
                frames never wait behind it, so the stream stays on time with any sink. \
                The LATENCY query adds the longest processing time plus a quarter. With \
                sinks that send QoS, or to restore more frames in the stream, use the live \
                recipe: queue leaky=downstream max-size-buffers=1 ! codiff ! queue. \
                Non-live pipelines (files) restore every frame",
        kind: Enum(CodiffLateFrames::Carry),
        flags: mutable_playing,
    }
}

/// What the element's `properties` mutex guards: the property values in use
/// and the model properties set while running.
#[derive(Debug, Default)]
pub(super) struct Properties {
    /// What `property()` reads and the element runs with.
    pub(super) current: Settings,
    /// Model properties (`mutable_ready`) set in PAUSED or PLAYING: a copy of
    /// `current` with them changed, applied at the next READY
    /// ([`Settings::take_model_fields`]).
    pub(super) pending: Option<Settings>,
}

impl Properties {
    /// Keep the model property `pspec` set to `value` while running pending;
    /// returns warnings for the log.
    pub(super) fn set_pending(&mut self, value: &glib::Value, pspec: &glib::ParamSpec) -> Vec<String> {
        let current = &self.current;
        self.pending.get_or_insert_with(|| current.clone()).set(value, pspec, None)
    }
}

impl Settings {
    /// The files and device to load, checked: the mode resolved, the device parsed,
    /// and every file the engine will open present.
    pub(super) fn model_spec(&self) -> Result<ModelSpec, gst::ErrorMessage> {
        let mode = match self.mode {
            CodiffMode::Cave => Mode::Cave,
            CodiffMode::Diffusion => Mode::Diffusion,
            CodiffMode::Auto if self.sd_model.is_some() && self.codiff_checkpoint.is_some() => Mode::Diffusion,
            CodiffMode::Auto => Mode::Cave,
        };
        let device: DeviceSpec = self.device.parse().map_err(|err| {
            gst::error_msg!(
                gst::ResourceError::Settings,
                ("Invalid device property: {err}"),
                ["set device to cpu, cuda or cuda:N"]
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
                        ("mode=diffusion needs both sd-model and codiff-checkpoint"),
                        ["set sd-model to the SD-2.1-base folder and codiff-checkpoint to codiff.pkl, or use mode=cave"]
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

    /// Settings that something else overrides without a word otherwise: one
    /// warning each, posted when the model loads.
    pub(super) fn fallbacks(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.mode == CodiffMode::Auto {
            match (&self.sd_model, &self.codiff_checkpoint) {
                (Some(_), None) => w.push(
                    "mode=auto: sd-model is set but codiff-checkpoint is not, so the compact CaVE model runs; \
                     set codiff-checkpoint (and cave-checkpoint) for the diffusion model"
                        .to_string(),
                ),
                (None, Some(_)) => w.push(
                    "mode=auto: codiff-checkpoint is set but sd-model is not, so the compact CaVE model runs; \
                     set sd-model for the diffusion model"
                        .to_string(),
                ),
                _ => {}
            }
        }
        let precision = Precision::from(self.precision);
        if let Some(caveat) = self.device.parse::<DeviceSpec>().ok().and_then(|d| precision.caveat(d)) {
            w.push(format!("precision={}: {caveat}", format!("{precision:?}").to_lowercase()));
        }
        if self.cave_checkpoint.is_some() && self.weights != Path::new(DEFAULT_WEIGHTS.as_str()) {
            w.push(format!(
                "weights={} is not used: cave-checkpoint is set and takes its place",
                self.weights.display()
            ));
        }
        w
    }

    /// The options a frame runs with: the tile properties as set, clamped by
    /// [`RestoreOptions::clamped`]: a latent tile under
    /// [`crate::engine::MIN_LATENT_TILE`] is raised to it, the latent
    /// overlap is capped at half the tile (a stride of 1 means thousands of UNet
    /// calls per frame), and a CaVE tile under `min_cave_tile` (the loaded
    /// model's [`crate::engine::Engine::min_cave_tile`]) is raised to it. Also
    /// returns one warning per adjusted value.
    pub(super) fn restore_options(&self, min_cave_tile: Option<usize>) -> (RestoreOptions, Vec<String>) {
        RestoreOptions {
            color_fix: self.color_fix.into(),
            latent_tile: self.latent_tile as usize,
            latent_overlap: self.latent_overlap as usize,
            vae_encoder_tile: self.vae_encoder_tile as usize,
            vae_decoder_tile: self.vae_decoder_tile as usize,
            cave_tile: self.cave_tile as usize,
            quality: (self.qf > 0).then_some(self.qf as f32),
            guard: self.guard,
            ..Default::default()
        }
        // the engine's clamps (the still command applies the same)
        .clamped(min_cave_tile)
    }
}

/// The `check`s of the property table: warnings about the value just set.
impl Settings {
    /// `device`: a device that does not parse is kept as set (loading fails
    /// with the same message).
    fn device_warning(&self, _min_cave_tile: Option<usize>) -> Vec<String> {
        match self.device.parse::<DeviceSpec>() {
            Ok(_) => Vec::new(),
            Err(err) => vec![err.to_string()],
        }
    }

    /// `latent-tile`, `latent-overlap`: adjusted against each other (see
    /// [`Settings::restore_options`]).
    fn latent_tile_warnings(&self, _min_cave_tile: Option<usize>) -> Vec<String> {
        self.restore_options(None).1
    }

    /// `cave-tile`: raised to what the loaded model needs (see
    /// [`Settings::restore_options`]).
    fn cave_tile_warnings(&self, min_cave_tile: Option<usize>) -> Vec<String> {
        self.restore_options(min_cave_tile).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_settings_are_clamped_with_warnings() {
        let mut s = Settings::default();
        let (o, w) = s.restore_options(Some(416));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!((o.latent_tile, o.latent_overlap, o.cave_tile), (96, 32, 2048));
        // stride 1 and a tiny tile: both raised
        s.latent_tile = 4;
        s.latent_overlap = 32;
        let (o, w) = s.restore_options(None);
        assert_eq!((o.latent_tile, o.latent_overlap), (32, 16));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("latent-tile 4") && w[1].contains("latent-overlap 32"), "{w:?}");
        s.latent_tile = 64;
        s.latent_overlap = 64;
        let (o, w) = s.restore_options(None);
        assert_eq!((o.latent_tile, o.latent_overlap), (64, 32));
        assert!(w[0].contains("advance by 1 latent px"), "{w:?}");
        // 0 = never tile stays as set
        s.latent_tile = 0;
        s.cave_tile = 0;
        let (o, w) = s.restore_options(Some(416));
        assert_eq!((o.latent_tile, o.latent_overlap, o.cave_tile), (0, 64, 0));
        assert!(w.is_empty(), "{w:?}");
        // a CaVE tile under the encoder's minimum, known once a model is loaded
        s.cave_tile = 100;
        assert_eq!(s.restore_options(None).0.cave_tile, 100);
        let (o, w) = s.restore_options(Some(416));
        assert_eq!(o.cave_tile, 416);
        assert!(w[0].contains("cave-tile 100") && w[0].contains("416"), "{w:?}");
    }

    #[test]
    fn the_qf_property_is_the_restoration_quality() {
        // 0 (default): each frame is restored for CaVE's own estimate
        let mut s = Settings::default();
        assert_eq!(s.restore_options(None).0.quality, None);
        // N: restore as if the JPEG quality were N (conditioned models)
        s.qf = 35;
        assert_eq!(s.restore_options(None).0.quality, Some(35.0));
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
        let mut s = Settings { weights: file("w.safetensors"), ..Settings::default() };
        assert_eq!(s.model_spec().unwrap().mode, Mode::Cave);
        s.sd_model = Some(dir.clone());
        assert_eq!(s.model_spec().unwrap().mode, Mode::Cave, "auto needs both files");
        s.codiff_checkpoint = Some(file("codiff.pkl"));
        let spec = s.model_spec().unwrap();
        assert_eq!((spec.mode, spec.sd_dir.as_deref()), (Mode::Diffusion, Some(dir.as_path())));
        s.mode = CodiffMode::Cave;
        let spec = s.model_spec().unwrap();
        assert_eq!((spec.mode, spec.sd_dir, spec.codiff), (Mode::Cave, None, None));
        s.device = "cuda:1".into();
        assert_eq!(s.model_spec().unwrap().device, DeviceSpec::Cuda(1));
        s.device = "tpu".into();
        assert!(s.model_spec().unwrap_err().to_string().contains("tpu"));
        s.device = "cpu".into();
        s.weights = dir.join("missing.safetensors");
        let err = format!("{:?}", s.model_spec().unwrap_err());
        assert!(err.contains("missing.safetensors") && err.contains("weights"), "{err}");
        // A CaVE checkpoint replaces the weights file.
        s.cave_checkpoint = Some(file("cave.pth"));
        assert!(s.model_spec().is_ok());
        s.mode = CodiffMode::Diffusion;
        s.codiff_checkpoint = None;
        assert!(format!("{:?}", s.model_spec().unwrap_err()).contains("codiff-checkpoint"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
