//! Times the element's frame conversion, the part of the element's frame
//! beyond the engine that is not the temporal filter: reading a frame into the
//! engine's packed RGB (chroma upsampled) and writing the restored RGB's change
//! back (chroma filtered onto its sites).
//!
//! ```sh
//! cargo run --release --example bench_convert -- [--size 1280x720] [--runs 30] [--format i420|nv12|yuy2|rgb]
//! ```
//!
//! Prints the best of `--runs` for each direction, and a checksum of every
//! output, so that two builds can be compared for speed and identity.
use clap::Parser;
use gstcodiff::element::convert::{
    read_rgb_sited, write_rgb_change, ChromaSiting, ColorModel, Component, Layout, Plane, PlaneMut, YuvMatrix,
};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// frame size, WxH
    #[arg(long, default_value = "1280x720")]
    size: String,
    /// timed runs (the best is printed)
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// i420, nv12, yuy2 or rgb
    #[arg(long, default_value = "i420")]
    format: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (w, h) = args.size.split_once('x').ok_or("size must be WxH")?;
    let (w, h): (usize, usize) = (w.parse()?, h.parse()?);
    let comp = |plane, offset, pixel_stride, sub_x, sub_y| Component { plane, offset, pixel_stride, sub_x, sub_y };
    let yuv = ColorModel::Yuv(YuvMatrix::BT601_FULL);
    let (layout, strides): (Layout, Vec<usize>) = match args.format.as_str() {
        "i420" => (
            Layout { model: yuv, comps: [comp(0, 0, 1, 0, 0), comp(1, 0, 1, 1, 1), comp(2, 0, 1, 1, 1)] },
            vec![w, w.div_ceil(2), w.div_ceil(2)],
        ),
        "nv12" => (
            Layout { model: yuv, comps: [comp(0, 0, 1, 0, 0), comp(1, 0, 2, 1, 1), comp(1, 1, 2, 1, 1)] },
            vec![w, 2 * w.div_ceil(2)],
        ),
        "yuy2" => (
            Layout { model: yuv, comps: [comp(0, 0, 2, 0, 0), comp(0, 1, 4, 1, 0), comp(0, 3, 4, 1, 0)] },
            vec![4 * w.div_ceil(2)],
        ),
        "rgb" => (
            Layout { model: ColorModel::Rgb, comps: [comp(0, 0, 3, 0, 0), comp(0, 1, 3, 0, 0), comp(0, 2, 3, 0, 0)] },
            vec![3 * w],
        ),
        f => return Err(format!("unknown format {f}").into()),
    };
    // planes of a smooth picture with some texture, rows as the layout needs them
    let rows = |p: usize| layout.comps.iter().filter(|c| c.plane == p).map(|c| c.size(w, h).1).max().unwrap_or(0);
    let planes: Vec<Vec<u8>> = strides
        .iter()
        .enumerate()
        .map(|(p, &s)| (0..s * rows(p)).map(|i| ((i % s) * 3 / 4 + (i / s) / 2 + (i * 7919 % 13)) as u8).collect())
        .collect();
    let read = || {
        let views: Vec<Plane> = planes.iter().zip(&strides).map(|(d, &stride)| Plane { data: d, stride }).collect();
        read_rgb_sited(&layout, ChromaSiting::JPEG, &views, w, h)
    };
    let rgb = read()?;
    // a "restoration": most bytes moved a little
    let restored: Vec<u8> =
        rgb.iter().enumerate().map(|(i, &b)| if i % 5 == 0 { b } else { b.wrapping_add(3) }).collect();
    let (mut best_read, mut best_write) = (f64::MAX, f64::MAX);
    let mut written = planes.clone();
    for _ in 0..args.runs {
        let t = Instant::now();
        std::hint::black_box(read()?);
        best_read = best_read.min(t.elapsed().as_secs_f64());
        written.clone_from(&planes);
        let mut views: Vec<PlaneMut> =
            written.iter_mut().zip(&strides).map(|(d, &stride)| PlaneMut { data: d, stride }).collect();
        let t = Instant::now();
        write_rgb_change(&layout, ChromaSiting::JPEG, &mut views, w, h, &rgb, &restored, 1.0)?;
        best_write = best_write.min(t.elapsed().as_secs_f64());
    }
    let checksum =
        rgb.iter().chain(written.iter().flatten()).fold(0u64, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64));
    println!(
        "{w}x{h} {}: read {:.2} ms, write (change) {:.2} ms (best of {}); checksum {checksum:016x}",
        args.format,
        best_read * 1e3,
        best_write * 1e3,
        args.runs
    );
    Ok(())
}
