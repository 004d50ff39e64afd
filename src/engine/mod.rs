//! The CODiff engine: pure candle, no GStreamer.
//!
//! Paper concepts live in files of their own name: [`cave`] (Compression-aware
//! Visual Embedder), [`lora`] (merge at load time), [`vae`], [`unet`],
//! [`one_step`] (the t = 499 step), [`tiling`] (latent tiles with Gaussian
//! weights), [`color_fix`] (AdaIN / wavelet), [`weights`] (safetensors, zip and
//! legacy pickle loading) and [`error`]; [`temporal`] smooths restored video
//! frames over time.
pub(crate) mod bytes;
pub mod cave;
pub mod color_fix;
pub mod config;
pub mod error;
pub mod guard;
pub mod kernels;
pub mod layers;
pub mod lora;
pub mod memory;
pub mod motion;
pub mod one_step;
pub mod options;
pub(crate) mod pickle;
pub mod pipeline;
pub mod quant;
pub mod temporal;
pub mod tiling;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{EngineError, Result};
pub use options::{Cancel, ProgressFn, RestoreOptions, MIN_LATENT_TILE};
pub use pipeline::Engine;

use std::path::PathBuf;

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

/// Floating-point precision of the UNet and VAE. The diffusion path's CaVE
/// and proj always run in f32; on the CPU, `Bf16` also gives the compact
/// model (`Mode::Cave`) bf16 arithmetic in its inner layers (`kernels::bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 on CPU, f16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// What the user should know about running this precision on `device`:
    /// bf16 on a CPU without AVX512_BF16 is emulated ([`kernels::bf16`]), no
    /// faster than f32 (measured on an AVX2-only CPU: the full model's UNet
    /// 6.4-7.1 s in bf16 against 5.5-6.0 in f32). None where nothing needs
    /// saying.
    pub fn caveat(self, device: DeviceSpec) -> Option<&'static str> {
        (self == Precision::Bf16 && device == DeviceSpec::Cpu && !kernels::bf16::native()).then_some(
            "this CPU has no AVX512_BF16, so the bf16 arithmetic is emulated (bf16-rounded operands on the f32 \
             kernels), no faster than f32 and less exact; use f32 here",
        )
    }
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
            return Err(EngineError::InvalidInput(format!(
                "RGB image {width}x{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
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
