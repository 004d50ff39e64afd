//! Seams, measured: restore one photo tiled (tiles forced small) and untiled,
//! print the largest difference between the two and the mean absolute
//! gradient across tile borders against inside tiles (at the other 8-pixel
//! block edges, since tile borders lie on the JPEG block grid, and elsewhere).
//!
//! `cargo run --release --example seams` restores `examples/data/astronaut.png`
//! (512x512) upscaled to 1920x1920 (Lanczos3), centre-cropped to 1920x1080
//! and JPEG-compressed at quality 10, with the compact default model, CaVE
//! tiles of 1024 px against the whole frame. `--model official:DIR` runs the
//! diffusion model in DIR (e.g. `tests/fixtures/codiff-tiny-c`) with the given
//! latent and VAE tiles against none.
use std::path::PathBuf;

use clap::Parser;
use gstcodiff::engine::tiling::{Plan, Scale};
use gstcodiff::engine::vae::{DECODER_PAD, ENCODER_PAD};
use gstcodiff::engine::{
    default_weights_path, DeviceSpec, Engine, Mode, ModelSpec, Precision, RestoreOptions, RgbImage,
};

#[derive(Parser, Debug)]
struct Args {
    /// Photo to restore (PNG or JPEG); resized to cover --size, centre-cropped
    #[arg(long, default_value = "examples/data/astronaut.png")]
    image: PathBuf,
    /// Frame size WxH
    #[arg(long, default_value = "1920x1080")]
    size: String,
    /// JPEG quality applied before restoring (0 = restore the photo as is)
    #[arg(long, default_value_t = 10)]
    quality: u8,
    /// compact (weights/ default, mode cave) or official:DIR (diffusion)
    #[arg(long, default_value = "compact")]
    model: String,
    /// CaVE tile side in px for the tiled run (cave mode's reconstruction and
    /// diffusion mode's embedding; at least twice the model's margin + 32)
    #[arg(long, default_value_t = 1024)]
    cave_tile: usize,
    /// Latent tile for the tiled run (diffusion)
    #[arg(long, default_value_t = 16)]
    latent_tile: usize,
    /// Latent tile overlap for the tiled run (diffusion)
    #[arg(long, default_value_t = 6)]
    latent_overlap: usize,
    /// VAE encoder tile (image px) for the tiled run (diffusion)
    #[arg(long, default_value_t = 256)]
    vae_encoder_tile: usize,
    /// VAE decoder tile (latent px) for the tiled run (diffusion)
    #[arg(long, default_value_t = 32)]
    vae_decoder_tile: usize,
    /// Write the tiled result here (PNG)
    #[arg(long)]
    out: Option<PathBuf>,
}

fn photo(args: &Args, w: usize, h: usize) -> Result<RgbImage, Box<dyn std::error::Error>> {
    let img = image::open(&args.image)?.to_rgb8();
    let s = (w as f64 / img.width() as f64).max(h as f64 / img.height() as f64);
    let (rw, rh) = ((img.width() as f64 * s).ceil() as u32, (img.height() as f64 * s).ceil() as u32);
    let big = image::imageops::resize(&img, rw, rh, image::imageops::FilterType::Lanczos3);
    let crop = image::imageops::crop_imm(&big, (rw - w as u32) / 2, (rh - h as u32) / 2, w as u32, h as u32).to_image();
    let crop = if args.quality > 0 {
        let mut jpg = vec![];
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, args.quality).encode_image(&crop)?;
        image::load_from_memory(&jpg)?.to_rgb8()
    } else {
        crop
    };
    Ok(RgbImage::new(w, h, crop.into_raw())?)
}

/// Mean |difference| between neighbours, over both axes: across the given
/// tile borders (a border at x lies between x-1 and x), across the other
/// 8-pixel block edges (the JPEG grid, on which tile borders also lie, so
/// this is the fair comparison) and everywhere else.
fn gradients(img: &RgbImage, cols: &[usize], rows: &[usize]) -> [f64; 3] {
    let (w, h) = (img.width, img.height);
    let px = |x: usize, y: usize, c: usize| img.data[(y * w + x) * 3 + c] as f64;
    let mut sum = [0f64; 3];
    let mut n = [0usize; 3];
    let class = |p: usize, borders: &[usize]| {
        if borders.contains(&p) {
            0
        } else if p.is_multiple_of(8) {
            1
        } else {
            2
        }
    };
    for y in 0..h {
        for x in 1..w {
            let k = class(x, cols);
            sum[k] += (0..3).map(|c| (px(x, y, c) - px(x - 1, y, c)).abs()).sum::<f64>() / 3.0;
            n[k] += 1;
        }
    }
    for y in 1..h {
        let k = class(y, rows);
        for x in 0..w {
            sum[k] += (0..3).map(|c| (px(x, y, c) - px(x, y - 1, c)).abs()).sum::<f64>() / 3.0;
            n[k] += 1;
        }
    }
    [0, 1, 2].map(|k| sum[k] / n[k].max(1) as f64)
}

fn borders(spans: &[gstcodiff::engine::tiling::Span], scale: usize) -> Vec<usize> {
    spans.iter().filter(|s| s.at > 0).map(|s| s.at * scale).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run(Args::parse())
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (w, h) = args.size.split_once('x').ok_or("size must be WxH")?;
    let (w, h): (usize, usize) = (w.parse()?, h.parse()?);
    let input = photo(&args, w, h)?;
    let (engine, tiled, untiled) = if args.model == "compact" {
        let spec = ModelSpec { mode: Mode::Cave, weights: default_weights_path(), ..ModelSpec::compact_default() };
        let e = Engine::load(&spec, &mut |_| {})?;
        let t = RestoreOptions { cave_tile: args.cave_tile, ..Default::default() };
        (e, t, RestoreOptions { cave_tile: 0, ..Default::default() })
    } else if let Some(dir) = args.model.strip_prefix("official:") {
        let dir = PathBuf::from(dir);
        let spec = ModelSpec {
            mode: Mode::Diffusion,
            weights: dir.join("cave.pth"),
            sd_dir: Some(dir.clone()),
            codiff: Some(dir.join("codiff.pkl")),
            cave: Some(dir.join("cave.pth")),
            device: DeviceSpec::Cpu,
            precision: Precision::F32,
        };
        let e = Engine::load(&spec, &mut |_| {})?;
        let t = RestoreOptions {
            cave_tile: args.cave_tile,
            latent_tile: args.latent_tile,
            latent_overlap: args.latent_overlap,
            vae_encoder_tile: args.vae_encoder_tile,
            vae_decoder_tile: args.vae_decoder_tile,
            ..Default::default()
        };
        (
            e,
            t,
            RestoreOptions {
                cave_tile: 0,
                latent_tile: 0,
                vae_encoder_tile: 0,
                vae_decoder_tile: 0,
                ..Default::default()
            },
        )
    } else {
        return Err(format!("unknown model {}", args.model).into());
    };
    let mut a = input.clone();
    let t = std::time::Instant::now();
    engine.restore(&mut a, &tiled)?;
    let ta = t.elapsed().as_secs_f64();
    let mut b = input.clone();
    let t = std::time::Instant::now();
    engine.restore(&mut b, &untiled)?;
    let tb = t.elapsed().as_secs_f64();
    // where the tiles' cores meet, in image px
    let (hp, wp) = (h.next_multiple_of(32), w.next_multiple_of(32));
    let (cols, rows) = match engine.mode() {
        Mode::Cave => {
            let plan = Plan::exact(hp, wp, args.cave_tile, engine.cave().reconstruct_margin(), 32, 1, "CaVE")?;
            (borders(&plan.cols, 1), borders(&plan.rows, 1))
        }
        Mode::Diffusion => {
            // the decoder's crops are the hard borders; its input is the latent of the 8-padded frame
            let (lh, lw) = (h.next_multiple_of(8).max(64) / 8, w.next_multiple_of(8).max(64) / 8);
            let mut cols = vec![];
            let mut rows = vec![];
            if let Some(p) = Plan::vaehook(lh, lw, args.vae_decoder_tile, DECODER_PAD, Scale::Up(8)) {
                cols.extend(borders(&p.cols, 1));
                rows.extend(borders(&p.rows, 1));
            }
            if let Some(p) = Plan::vaehook(lh * 8, lw * 8, args.vae_encoder_tile / 8 * 8, ENCODER_PAD, Scale::Down(8)) {
                cols.extend(borders(&p.cols, 8));
                rows.extend(borders(&p.rows, 8));
            }
            (cols, rows)
        }
    };
    let maxdiff = a.data.iter().zip(&b.data).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap_or(0);
    let meandiff =
        a.data.iter().zip(&b.data).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.data.len() as f64;
    println!("image {} -> {w}x{h}, JPEG quality {}, model {}", args.image.display(), args.quality, args.model);
    println!(
        "tiled: {:?}; tile borders at x {cols:?}, y {rows:?}",
        (tiled.cave_tile, tiled.latent_tile, tiled.latent_overlap, tiled.vae_encoder_tile, tiled.vae_decoder_tile)
    );
    println!("time: tiled {ta:.1} s, untiled {tb:.1} s");
    println!("tiled vs untiled: max |diff| {maxdiff} code values, mean |diff| {meandiff:.4}");
    for (name, img) in [("tiled", &a), ("untiled", &b), ("input", &input)] {
        let [gb, ge, gi] = gradients(img, &cols, &rows);
        println!(
            "{name}: mean |gradient| across tile borders {gb:.3}, across other 8-px block edges {ge:.3} (ratio {:.3}), elsewhere inside tiles {gi:.3}",
            gb / ge
        );
    }
    if let Some(out) = &args.out {
        image::save_buffer(out, &a.data, w as u32, h as u32, image::ExtendedColorType::Rgb8)?;
    }
    Ok(())
}
