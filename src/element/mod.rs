//! `codiff`: removes JPEG compression artifacts from raw video frames, in place.
//!
//! ```text
//! gst-launch-1.0 filesrc location=in.jpg ! jpegdec ! codiff ! videoconvert ! pngenc ! filesink location=out.png
//! ```
//!
//! An in-place video filter (`GstVideoFilter`) over [`crate::engine::Engine`]. It
//! takes 8-bit RGB-family and YUV frames (I420 straight from `jpegdec`, NV12, Y42B,
//! Y444, YUY2, RGB, RGBA, BGRx, ...), hands the engine packed RGB (YUV converted with
//! the caps' matrix and range, BT.601 full range as JPEG uses when unspecified) and
//! writes the result back, alpha and padding untouched.
//!
//! Loading happens at NULL->READY and may take seconds: the element posts
//! `codiff-progress` element messages (field `step`, a string) and `GstProgress`
//! messages (code `load`). A missing or broken model fails the state change with an
//! error naming the file. Elements with the same model properties share one loaded
//! model ([`cache`]).
//!
//! `guard` (default on, [`crate::engine::guard`]): only frames whose pixels show
//! JPEG quantisation are restored (never-compressed, scaled, black and flat
//! frames are not written at all: bit-exact), their quality is read from the
//! quantisation steps, less of the model's change is kept the higher it is,
//! and the result is clamped into the JPEG's quantisation intervals. Only the
//! restoration's change is written back into the frame's format.
//!
//! `qf` (0 = the quality read from the frame, default) steers a
//! quality-conditioned compact model (one that carries `qf_embed.*`, as the
//! shipped default does): frames are restored as if their JPEG quality were
//! `qf`, so a lower value smooths more and a higher one keeps more detail.
//! Official `cave.pth` files and `mode=diffusion` have no conditioning: there
//! `qf` only replaces the reported number.
//!
//! Live pipelines (`late-frames`; only when the latency query finds a live
//! source): a frame that would be restored after it is due (running time +
//! pipeline latency) is not started; its fate is `carry` (the previous output
//! moved along the picture's motion where nothing else changed), `passthrough`
//! or `drop`, and later frames never wait behind it.
//!
//! For every processed frame the element
//! - posts an element message `codiff-qf` with fields `qf` (f64, the JPEG
//!   quality 0..100, or the `qf` property when set), `estimated` (bool),
//!   `qf-source` (`tables`, `unquantised`, `model` or `property`), `restored`
//!   (bool), `pts` (u64 ns, `u64::MAX` when the buffer has none),
//!   `processing-time` (u64 ns) and `mode` (`"cave"` or `"diffusion"`);
//! - attaches a `GstCustomMeta` named `CodiffQfMeta` ([`QF_META_NAME`]) whose
//!   structure holds `qf` (f64), `qf-source` (string) and `restored` (bool). Read it with
//!   `gst::meta::CustomMeta::from_buffer(buffer, "CodiffQfMeta")` (Rust) or
//!   `gst_buffer_get_custom_meta (buffer, "CodiffQfMeta")` (C).
//!
//! The LATENCY query adds the longest per-frame processing time measured so far, and
//! a latency message is posted when it grows by more than a quarter. With `warm-up`
//! (default) one restore of a test pattern of the negotiated size (at most 640x480
//! pixels, its time scaled by the pixel ratio) is timed at caps time, so the query
//! is right before the first frame. QoS is on: frames already late are dropped
//! before processing. `enabled=false` switches to passthrough (buffers untouched,
//! no messages, no meta); `post-messages=false` drops only the `codiff-qf` message.
//!
//! Robustness:
//! - a frame above `max-frame-pixels` (default 4096x4096) is refused before any
//!   conversion buffer is allocated; a frame the engine cannot restore, or a
//!   refused one, stops the stream with an error (`on-error=fail`, default) or is
//!   pushed unchanged with a warning (`on-error=passthrough`: one bus warning per
//!   run of failing frames, the rest logged);
//! - FLUSH_START, PAUSED->READY and `stop` raise the engine's
//!   [`crate::engine::Cancel`] token, so a seek or a state change does not wait for
//!   a whole large frame; a cancelled frame returns FLUSHING, without an error;
//! - tile properties are checked against each other and the loaded model
//!   (`latent-overlap` at most half of `latent-tile`, `latent-tile` at least 32,
//!   `cave-tile` at least the CaVE encoder's margins): adjusted with a warning;
//! - model properties (`mutable_ready`) set in PAUSED or PLAYING are kept pending
//!   with a bus warning and apply at the next READY; until then the property
//!   reads the running value;
//! - interlaced caps are refused (progressive only).
//!
//! `n-threads` > 0 runs the engine inside a rayon pool of that size owned by the
//! element: it bounds the engine's kernels (convolutions, attention, GEMMs) and
//! candle's matmul and conv2d, which run on the calling rayon pool. candle's
//! element-wise ops on large tensors use candle's own process-wide pool, sized by
//! `CANDLE_NUM_THREADS` (or `RAYON_NUM_THREADS`), shared by all elements.
use gst::glib;
use gst::prelude::*;

mod category;
mod imp;
mod loading;
mod property;
mod settings;

pub mod cache;
pub mod convert;

pub use imp::QF_META_NAME;
pub use settings::{CodiffColorFix, CodiffLateFrames, CodiffMode, CodiffOnError, CodiffPrecision};

glib::wrapper! {
    pub struct Codiff(ObjectSubclass<imp::Codiff>)
        @extends gst_video::VideoFilter, gst_base::BaseTransform, gst::Element, gst::Object;
}

/// Register the `codiff` element and the `CodiffQfMeta` custom meta.
pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    if !gst::meta::CustomMeta::is_registered(QF_META_NAME) {
        gst::meta::CustomMeta::register_simple(QF_META_NAME);
    }
    CodiffMode::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    CodiffPrecision::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    CodiffColorFix::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    CodiffOnError::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    CodiffLateFrames::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(Some(plugin), "codiff", gst::Rank::NONE, Codiff::static_type())
}
