//! Code shared by codiff's integration tests and examples (a `publish =
//! false` dev-dependency of the plugin), so that a test runs the same
//! measurement an example prints:
//!
//! - [`setup`]: GStreamer with this build of the plugin registered, the
//!   shipped-model check, PSNR of 8-bit samples, packed RGB from a frame;
//! - [`metrics`]: PSNR, SSIM and PSNR-B (the JPEG-restoration literature's);
//! - [`flicker`]: frame-to-frame flicker of restored video against its input;
//! - [`live`]: a live source through codiff: lag behind the clock, frames
//!   restored and shown, memory;
//! - [`rtsp`]: the RTSP server of `examples/rtsp_server.rs`;
//! - [`hostile`]: hostile model files and a counting allocator (fuzzing);
//! - [`tiles`]: the tile flags of the still-image examples;
//! - [`tensors`]: largest absolute values and differences of tensors.
pub mod flicker;
pub mod hostile;
pub mod live;
pub mod metrics;
pub mod rtsp;
pub mod setup;
pub mod tensors;
pub mod tiles;
