//! Setup shared by the integration tests that run the element on real media.
use std::sync::Once;

/// GStreamer initialised and the test's own build of the plugin registered in
/// this process (so `codiff` resolves to it).
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gstcodiff::plugin_register_static().expect("codiff plugin registers");
    });
}

/// Whether the default weights (`$CODIFF_WEIGHTS` or
/// `weights/codiff-cave-compact.safetensors`) exist; without them prints why
/// and returns false, or panics under `CODIFF_REQUIRE_MODEL=1`.
pub fn weights_or_skip() -> bool {
    let path = gstcodiff::engine::default_weights_path();
    if path.exists() {
        return true;
    }
    let why = format!("no model: {} does not exist", path.display());
    if std::env::var_os("CODIFF_REQUIRE_MODEL").is_some() {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// PSNR (dB) of the 8-bit samples `a` against `b` (same length).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-10)).log10()
}

/// Packed RGB (`height x width x 3`) from a mapped GStreamer RGB frame, whose
/// rows are padded to 4 bytes.
pub fn packed_rgb(frame: &[u8], width: usize, height: usize) -> Vec<u8> {
    let stride = (width * 3 + 3) & !3;
    let mut rgb = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        rgb.extend_from_slice(&frame[y * stride..y * stride + width * 3]);
    }
    rgb
}
