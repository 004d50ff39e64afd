//! The `codiff` debug category, shared by the element's modules.
use std::sync::LazyLock;

pub(super) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new("codiff", gst::DebugColorFlags::empty(), Some("CODiff JPEG artifact removal"))
});
