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
//! For every processed frame the element
//! - posts an element message `codiff-qf` with fields `qf` (f64, CaVE's JPEG
//!   quality estimate 0..100, or the `qf` property when set), `estimated` (bool),
//!   `pts` (u64 ns, `u64::MAX` when the buffer has none), `processing-time` (u64 ns)
//!   and `mode` (`"cave"` or `"diffusion"`);
//! - attaches a `GstCustomMeta` named `CodiffQfMeta` ([`QF_META_NAME`]) whose
//!   structure holds `qf` (f64). Read it with
//!   `gst::meta::CustomMeta::from_buffer(buffer, "CodiffQfMeta")` (Rust) or
//!   `gst_buffer_get_custom_meta (buffer, "CodiffQfMeta")` (C).
//!
//! The LATENCY query adds the longest per-frame processing time measured so far, and
//! a latency message is posted when it grows by more than a quarter. QoS is on:
//! frames already late are dropped before processing. `enabled=false` switches to
//! passthrough (buffers untouched, no messages, no meta).
use gst::glib;
use gst::prelude::*;

mod imp;
mod loading;
mod settings;

pub mod cache;
pub mod convert;

pub use imp::QF_META_NAME;
pub use settings::{CodiffColorFix, CodiffMode, CodiffOnError, CodiffPrecision};

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
    gst::Element::register(
        Some(plugin),
        "codiff",
        gst::Rank::NONE,
        Codiff::static_type(),
    )
}
