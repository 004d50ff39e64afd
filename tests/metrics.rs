//! The Rust metrics (testkit/src/metrics.rs) agree with the reference
//! `metrics.py`: tests/fixtures/metrics.json holds its values for small image
//! pairs (made by tests/fixtures/make_metrics_fixture.py).
use std::path::Path;

use codiff_testkit::metrics;

const DB_TOL: f64 = 1e-3;
const SSIM_TOL: f64 = 1e-5;

#[test]
fn metrics_match_reference_script() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/metrics.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    let (mut max_db, mut max_ssim, mut max_bef) = (0.0f64, 0.0f64, 0.0f64);
    for case in cases {
        let r = metrics::load(&root.join(case["reference"].as_str().unwrap())).unwrap();
        let t = metrics::load(&root.join(case["test"].as_str().unwrap())).unwrap();
        let border = case["border"].as_u64().unwrap() as usize;
        let m = metrics::measure(&r, &t, border, case["round_y"].as_bool().unwrap()).unwrap();
        let e = &case["expected"];
        let what = format!("{} vs {} (border {border})", case["reference"], case["test"]);
        assert_eq!(m.width as u64, e["width"].as_u64().unwrap(), "{what}");
        assert_eq!(m.height as u64, e["height"].as_u64().unwrap(), "{what}");
        for key in metrics::KEYS.iter().chain(&["bef_y"]) {
            let (got, want) = (m.get(key).unwrap(), e[*key].as_f64().unwrap());
            let d = (got - want).abs();
            let tol = match *key {
                k if k.starts_with("ssim") => {
                    max_ssim = max_ssim.max(d);
                    SSIM_TOL
                }
                "bef_y" => {
                    max_bef = max_bef.max(d / want.abs().max(1.0));
                    1e-6 * want.abs().max(1.0)
                }
                _ => {
                    max_db = max_db.max(d);
                    DB_TOL
                }
            };
            assert!(d <= tol, "{what}: {key} = {got}, metrics.py says {want} (|diff| {d:e} > {tol:e})");
        }
    }
    eprintln!(
        "{} cases: max |diff| PSNR/PSNR-B {max_db:.3e} dB, SSIM {max_ssim:.3e}, BEF (relative) {max_bef:.3e}",
        cases.len()
    );
}

#[test]
fn identical_images_and_small_cases() {
    let data: Vec<u8> = (0..32 * 24 * 3).map(|i| (i * 37 % 251) as u8).collect();
    let a = metrics::Image::new(32, 24, 3, data).unwrap();
    let m = metrics::measure(&a, &a, 0, true).unwrap();
    assert!(m.psnr_y.is_infinite() && m.psnr_rgb.is_infinite());
    assert!((m.ssim_y - 1.0).abs() < 1e-12 && (m.ssim_rgb - 1.0).abs() < 1e-12);
    // PSNR-B of an identical pair is finite when the test image is blocky
    assert_eq!(m.psnrb_y.is_infinite(), m.bef_y == 0.0);
    // too small for the SSIM window
    let tiny = metrics::Image::new(10, 10, 1, vec![0; 100]).unwrap();
    assert!(metrics::measure(&tiny, &tiny, 0, true).is_err());
    // grey vs RGB promotes the grey one
    let g = metrics::Image::new(16, 16, 1, vec![100; 256]).unwrap();
    let c = metrics::Image::new(16, 16, 3, vec![100; 768]).unwrap();
    assert!(metrics::measure(&g, &c, 0, true).unwrap().psnr_rgb.is_infinite());
}
