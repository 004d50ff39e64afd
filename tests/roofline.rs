//! The bench's roofline counts: the FLOPs the CPU kernels count at run time
//! (`kernels::flops`, per stage in `restore_timed`) are the model's work as
//! counted from its layers (`CaveConfig::flops_per_pixel`). A test binary of
//! its own: the counter is process-wide, so no other test may run beside it.
use gstcodiff::engine::cave::CaveConfig;
use gstcodiff::engine::{DeviceSpec, Engine, Precision, RestoreOptions, RgbImage};

#[test]
fn counted_work_is_the_layers_work() {
    let cfg = CaveConfig { nc: [8, 16, 32, 32], nb: 1 };
    let engine = Engine::synthetic(cfg, None, DeviceSpec::Cpu, Precision::F32, false).unwrap();
    // a multiple of 32 px on each side: no padding, every level whole
    let (w, h) = (96, 64);
    let data = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
    let mut img = RgbImage::new(w, h, data).unwrap();
    let opts = RestoreOptions { guard: false, ..Default::default() };
    let (_, times) = engine.restore_timed(&mut img, &opts).unwrap();
    let counted: u64 = times.iter().map(|t| t.flops).sum();
    let by_layers = cfg.flops_per_pixel() * (w * h) as f64;
    assert_eq!(counted as f64, by_layers, "stages {times:?}");
    assert!(times.iter().any(|t| t.stage == "cave" && t.flops == counted), "{times:?}");
}
