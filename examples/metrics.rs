//! PSNR, SSIM and PSNR-B on Y and RGB (the conventions of the reference
//! `metrics.py`, see `testkit/src/metrics.rs`) for two images or two folders:
//!
//! ```text
//! cargo run --release --example metrics -- REF TEST            # two files
//! cargo run --release --example metrics -- REF_DIR TEST_DIR    # folders, matched by name, then stem
//!     [--border N] [--no-round-y] [--json FILE] [--quiet]
//! ```
//!
//! Prints a table and a one-line JSON summary (`{"count", "mean"}`); with
//! `--quiet` only the full JSON summary (`count`, `missing`, `border`,
//! `round_y`, `mean`, `images`), the same structure as `metrics.py --quiet`.
//! `--json FILE` also writes the full summary to FILE.
use std::path::PathBuf;

use clap::Parser;
use rayon::prelude::*;

use codiff_testkit::metrics;

use metrics::{json_num, Metrics, KEYS};

#[derive(Parser, Debug)]
#[command(about = "Full-reference PSNR / SSIM / PSNR-B (Y and RGB) of two images or two folders")]
struct Args {
    /// Reference image or folder
    reference: PathBuf,
    /// Test image or folder
    test: PathBuf,
    /// Crop this many pixels on every side before measuring
    #[arg(long, default_value_t = 0)]
    border: usize,
    /// Keep the BT.601 luma as floats instead of rounding it (MATLAB style)
    #[arg(long)]
    no_round_y: bool,
    /// Also write the full JSON summary to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print only the full JSON summary
    #[arg(long)]
    quiet: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("metrics: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), String> {
    let (rd, td) = (a.reference.is_dir(), a.test.is_dir());
    if rd != td {
        return Err("give two files or two folders".into());
    }
    let (pairs, missing) = if rd {
        metrics::pairs(&a.reference, &a.test).map_err(|e| e.to_string())?
    } else {
        let name = a.reference.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (vec![(name, a.reference.clone(), a.test.clone())], vec![])
    };
    if pairs.is_empty() {
        return Err("no matching images".into());
    }
    let round_y = !a.no_round_y;
    let rows: Vec<(String, Metrics)> = pairs
        .par_iter()
        .map(|(name, rp, tp)| {
            let m = metrics::measure(&metrics::load(rp)?, &metrics::load(tp)?, a.border, round_y)
                .map_err(|e| format!("{name}: {e}"))?;
            Ok((name.clone(), m))
        })
        .collect::<Result<_, String>>()?;

    let mean_keys: Vec<&str> = KEYS.iter().copied().chain(["bef_y"]).collect();
    let mean: Vec<(&str, f64)> = mean_keys
        .iter()
        .map(|k| (*k, rows.iter().map(|(_, m)| m.get(k).unwrap()).sum::<f64>() / rows.len() as f64))
        .collect();
    let mean_json = format!(
        "{{{}}}",
        mean.iter().map(|(k, v)| format!("\"{k}\": {}", json_num(*v))).collect::<Vec<_>>().join(", ")
    );
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let images: Vec<String> = rows
        .iter()
        .map(|(name, m)| {
            let mut f = vec![format!("\"width\": {}", m.width), format!("\"height\": {}", m.height)];
            for k in ["psnr_y", "ssim_y", "psnrb_y", "bef_y", "psnr_rgb", "ssim_rgb", "psnrb_rgb"] {
                f.push(format!("\"{k}\": {}", json_num(m.get(k).unwrap())));
            }
            f.push(format!("\"name\": {}", q(name)));
            format!("  {{{}}}", f.join(", "))
        })
        .collect();
    let full = format!(
        "{{\"count\": {}, \"missing\": [{}], \"border\": {}, \"round_y\": {}, \"mean\": {},\n \"images\": [\n{}\n ]}}",
        rows.len(),
        missing.iter().map(|m| q(m)).collect::<Vec<_>>().join(", "),
        a.border,
        round_y,
        mean_json,
        images.join(",\n")
    );
    if let Some(p) = &a.json {
        std::fs::write(p, format!("{full}\n")).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if a.quiet {
        println!("{full}");
        return Ok(());
    }
    let hdr = format!(
        "{:<28} {:>9}  {:>7} {:>7} {:>7}  {:>7} {:>7} {:>7}",
        "image", "size", "PSNR-Y", "SSIM-Y", "PSNRB-Y", "PSNR", "SSIM", "PSNRB"
    );
    println!("{hdr}\n{}", "-".repeat(hdr.len()));
    let line = |name: &str, size: &str, m: &dyn Fn(&str) -> f64| {
        println!(
            "{:<28} {:>9}  {:7.3} {:7.4} {:7.3}  {:7.3} {:7.4} {:7.3}",
            name.chars().take(28).collect::<String>(),
            size,
            m("psnr_y"),
            m("ssim_y"),
            m("psnrb_y"),
            m("psnr_rgb"),
            m("ssim_rgb"),
            m("psnrb_rgb")
        )
    };
    for (name, m) in &rows {
        line(name, &format!("{}x{}", m.width, m.height), &|k| m.get(k).unwrap());
    }
    println!("{}", "-".repeat(hdr.len()));
    line(&format!("MEAN ({})", rows.len()), "", &|k| mean.iter().find(|(n, _)| *n == k).unwrap().1);
    if !missing.is_empty() {
        eprintln!("no match in test folder: {}", missing.join(", "));
    }
    println!("{{\"count\": {}, \"mean\": {}}}", rows.len(), mean_json);
    Ok(())
}
