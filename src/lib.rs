//! codiff: CODiff JPEG artifact removal as a GStreamer element.
//!
//! `engine` is pure candle (builds with `--no-default-features`); `element`
//! is the GStreamer glue.
pub mod engine;

#[cfg(feature = "gst")]
pub mod element;

#[cfg(feature = "gst")]
fn plugin_init(plugin: &gst::Plugin) -> Result<(), gst::glib::BoolError> {
    element::register(plugin)
}

#[cfg(feature = "gst")]
gst::plugin_define!(
    codiff,
    "CODiff: one-step diffusion JPEG artifact removal on candle",
    plugin_init,
    env!("CARGO_PKG_VERSION"),
    "Apache-2.0",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY")
);
