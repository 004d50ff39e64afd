//! The CODiff engine: pure candle, no GStreamer.
//!
//! Paper concepts live in files of their own name: [`cave`] (Compression-aware
//! Visual Embedder), [`lora`] (merge at load time), [`vae`], [`unet`],
//! [`one_step`] (the t = 499 step), [`tiling`] (latent tiles with Gaussian
//! weights), [`color_fix`] (AdaIN / wavelet), [`weights`] (safetensors, zip and
//! legacy pickle loading) and [`error`]; [`temporal`] smooths restored video
//! frames over time.
pub mod cave;
pub mod color_fix;
pub mod error;
pub mod guard;
pub mod kernels;
pub mod layers;
pub mod lora;
pub mod memory;
pub mod motion;
pub mod one_step;
pub(crate) mod pickle;
pub mod pipeline;
pub mod quant;
pub mod temporal;
pub mod tiling;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{EngineError, Result};
pub use pipeline::Engine;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A flag the host raises to stop a restore early. The engine checks it
/// between stages and between tiles and then returns
/// [`EngineError::Cancelled`], so a flush or a state change never waits for
/// a whole large frame. Clones share the flag. It also carries the host's
/// optional progress observer ([`Cancel::with_progress`]), told after each
/// group of tiles, so a long frame (a 4K diffusion restore runs for many
/// minutes on a CPU) shows how far it got.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>, Option<Arc<ProgressFn>>);

/// `(done, total)` tiles of the tiling pass under way.
pub type ProgressFn = dyn Fn(usize, usize) + Send + Sync;

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cancel").field(&self.is_cancelled()).field(&self.1.is_some()).finish()
    }
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    /// This token with `f` told the progress of every tiled pass.
    pub fn with_progress(mut self, f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        self.1 = Some(Arc::new(f));
        self
    }
    /// Tell the observer, if any, that `done` of `total` tiles are done.
    pub fn progress(&self, done: usize, total: usize) {
        if let Some(f) = &self.1 {
            f(done, total);
        }
    }
    /// Ask every restore that holds a clone of this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Lower the flag again (before the next frame).
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Cancelled)` once the flag is raised: call between stages and tiles.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(EngineError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Tokens compare equal when they share one flag.
impl PartialEq for Cancel {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What the engine runs on each frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// CaVE's own reconstruction branch (compact default model or official `cave.pth`).
    Cave,
    /// Full one-step diffusion: CaVE tokens condition the LoRA-merged SD-2.1 UNet.
    Diffusion,
}

/// Colour correction of the restored image against the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ColorFix {
    #[default]
    Adain,
    Wavelet,
    None,
}

impl std::str::FromStr for ColorFix {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adain" => Ok(Self::Adain),
            "wavelet" => Ok(Self::Wavelet),
            "none" => Ok(Self::None),
            _ => Err(EngineError::InvalidInput(format!("colour fix `{s}`: expected adain, wavelet or none"))),
        }
    }
}

/// Where tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(EngineError::InvalidInput(format!("device `{s}`: expected cpu, cuda or cuda:N"))),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Floating-point precision of the UNet and VAE (CaVE and proj always run in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 on CPU, f16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            _ => Err(EngineError::InvalidInput(format!("precision `{s}`: expected auto, f32, f16 or bf16"))),
        }
    }
}

/// Which files to load, on which device: the key of the process-wide model cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelSpec {
    pub mode: Mode,
    /// Compact CaVE model (safetensors) used by `Mode::Cave` when `cave` is not given.
    pub weights: PathBuf,
    /// SD-2.1-base folder in diffusers layout (`unet/`, `vae/`, `scheduler/`).
    pub sd_dir: Option<PathBuf>,
    /// Official `codiff.pkl` (LoRA + proj).
    pub codiff: Option<PathBuf>,
    /// Official `cave.pth` (legacy pickle) or a safetensors CaVE.
    pub cave: Option<PathBuf>,
    pub device: DeviceSpec,
    pub precision: Precision,
}

impl ModelSpec {
    /// The compact default model shipped in `weights/`.
    pub fn compact_default() -> Self {
        Self {
            mode: Mode::Cave,
            weights: default_weights_path(),
            sd_dir: None,
            codiff: None,
            cave: None,
            device: DeviceSpec::Cpu,
            precision: Precision::Auto,
        }
    }
}

/// Per-call settings that need no reload.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreOptions {
    pub color_fix: ColorFix,
    /// Latent tile side (latent pixels, 1/8 of image pixels); 0 = never tile.
    pub latent_tile: usize,
    pub latent_overlap: usize,
    /// VAE encoder tile side in image pixels (the official
    /// `vae_encoder_tiled_size`, default 1024). 0 = never tile.
    pub vae_encoder_tile: usize,
    /// VAE decoder tile side in latent pixels (the official
    /// `vae_decoder_tiled_size`, default 224). 0 = never tile.
    pub vae_decoder_tile: usize,
    /// Largest CaVE tile side in image pixels (diffusion mode's embedding, the
    /// QF estimate and `Mode::Cave`'s reconstruction): larger frames run in
    /// tiles whose margins make the stitched result equal the whole-frame one
    /// (reconstruction needs at least `2 * Cave::reconstruct_margin() + 32`:
    /// 800 px for the compact model). 0 = never tile.
    pub cave_tile: usize,
    /// `Mode::Cave` with a quality-conditioned model: restore as if the JPEG
    /// quality were this (0..100; lower smooths more). None: the model's own
    /// estimate. Unconditioned models (official `cave.pth`) ignore it.
    pub quality: Option<f32>,
    /// Geometric self-ensemble: restore under the 8 flips and transposes and
    /// average (8x the time; for stills). Off by default.
    pub self_ensemble: bool,
    /// Do no harm ([`guard`]): restore only frames whose pixels show they were
    /// decoded from a JPEG (others are left exactly as they are), tell a
    /// quality-conditioned model the quality read from the frame's
    /// quantisation steps, and keep the result within the JPEG's quantisation
    /// intervals. On by default; off reproduces the bare model (parity with
    /// the official code).
    pub guard: bool,
    /// Checked between stages and tiles; raise it to stop this restore.
    pub cancel: Cancel,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self { color_fix: ColorFix::Adain, latent_tile: 96, latent_overlap: 32, vae_encoder_tile: 1024, vae_decoder_tile: 224, cave_tile: 2048, quality: None, self_ensemble: false, guard: true, cancel: Cancel::default() }
    }
}

/// Where a frame's quality figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QfSource {
    /// Read from the frame's quantisation steps (the IJG quality whose table
    /// they are, or of steps of the same size for other encoders' tables):
    /// a measurement.
    Tables,
    /// The frame shows detail but no quantisation lattice: never JPEG-compressed
    /// (or at quality ~97 and above, or scaled since); reported as 100.
    Unquantised,
    /// CaVE's estimate: the frame is too flat to measure, or the guard is
    /// off. A guess on content unlike photos.
    Model,
}

impl QfSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tables => "tables",
            Self::Unquantised => "unquantised",
            Self::Model => "model",
        }
    }
}

/// What one restore did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Restoration {
    /// The JPEG quality of the input (0..100).
    pub qf: f32,
    pub qf_source: QfSource,
    /// False when the guard left the frame exactly as it was (not a decoded
    /// JPEG, or too flat to tell).
    pub restored: bool,
    /// 8x8 blocks the guard pulled back into the JPEG's intervals.
    pub guarded_blocks: usize,
}

/// A packed 8-bit RGB image, row-major `height x width x 3`, no padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            return Err(EngineError::InvalidInput(format!("RGB image {width}x{height} needs {} bytes, got {}", width * height * 3, data.len())));
        }
        Ok(Self { width, height, data })
    }
}

/// Name of the shipped compact model's file, in `weights/` of the source tree and
/// in the installed data directory (`<prefix>/share/codiff/`).
pub const DEFAULT_WEIGHTS_FILE: &str = "codiff-cave-compact.safetensors";

/// Data directory fixed at build time: `meson install` builds with
/// `CODIFF_DATADIR=<prefix>/<datadir>/codiff` and installs the default weights there.
pub const BUILD_DATADIR: Option<&str> = option_env!("CODIFF_DATADIR");

/// Default location of the shipped compact model, the first of:
/// 1. `$CODIFF_WEIGHTS` when set (used as given, even if missing: the load error names it);
/// 2. `CODIFF_DATADIR/codiff-cave-compact.safetensors`, the installed data directory
///    fixed at build time (see [`BUILD_DATADIR`]), when that file exists;
/// 3. `weights/codiff-cave-compact.safetensors` in the source tree this was built from
///    (a development build), when that file exists.
///
/// When neither 2 nor 3 exists the installed path (or, without one, the source
/// tree's) is returned, so the load error names where the file was expected.
pub fn default_weights_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CODIFF_WEIGHTS") {
        return PathBuf::from(p);
    }
    let installed = BUILD_DATADIR.filter(|d| !d.is_empty()).map(|d| PathBuf::from(d).join(DEFAULT_WEIGHTS_FILE));
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights").join(DEFAULT_WEIGHTS_FILE);
    match installed {
        Some(p) if p.is_file() => p,
        Some(p) if !source.is_file() => p,
        _ => source,
    }
}
