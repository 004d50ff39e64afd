//! Per-stage time and peak memory of one restoration.
//!
//! `cargo run --release --example bench -- --model full --sizes 256x256,512x512`
//! builds the full-size CODiff architecture (SD-2.1-base UNet and VAE, CaVE
//! nc [64,128,256,512], nb 4) with random weights; `--model compact` loads the
//! shipped default model. Each size runs in a child process so that its peak
//! resident memory (VmHWM) is its own.
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use gstcodiff::engine::cave::CaveConfig;
use gstcodiff::engine::unet::UNetConfig;
use gstcodiff::engine::vae::VaeConfig;
use gstcodiff::engine::{default_weights_path, DeviceSpec, Engine, Mode, ModelSpec, Precision, RgbImage};

use codiff_testkit::tiles;

#[derive(Parser, Debug)]
struct Args {
    /// full (random-weight full-size CODiff), compact (weights/ default) or
    /// cave:NC0,NC1,NC2,NC3:NB (random-weight CaVE of that size) or
    /// official:DIR (official-format files in DIR)
    #[arg(long, default_value = "compact")]
    model: String,
    /// Comma-separated WxH sizes
    #[arg(long, default_value = "512x512")]
    sizes: String,
    /// Timed runs per size (after one warm-up run when --warmup)
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Run once untimed first
    #[arg(long)]
    warmup: bool,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// auto, f32, f16, bf16
    #[arg(long, default_value = "auto")]
    precision: String,
    #[command(flatten)]
    tiles: tiles::TileArgs,
    /// Time the bare model: no guard (`engine::guard`); by default the frame
    /// is a JPEG (quality 25) and the guard's analysis and clamp are timed too
    #[arg(long)]
    no_guard: bool,
    /// Internal: run this one size in this process
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A synthetic test card, JPEG-compressed at quality 25 and decoded, so the
/// guard sees a decoded JPEG and restores it as it would a real one.
fn test_image(w: usize, h: usize) -> RgbImage {
    let card = test_card(w, h);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 25)
        .encode(&card.data, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .expect("JPEG of the test card");
    let decoded = image::load_from_memory(&jpeg).expect("decodes").to_rgb8();
    RgbImage { width: w, height: h, data: decoded.into_raw() }
}

fn test_card(w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    let mut s = 12345u32;
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                let v = (x * 255 / w.max(1) + y * 128 / h.max(1) + c * 40) as u32 + (s >> 28);
                // kept off 0 and 255: blocks with clipped samples tell the guard nothing
                data.push((16 + v % 224) as u8);
            }
        }
    }
    RgbImage { width: w, height: h, data }
}

/// The arithmetic peak of this CPU, measured: `threads` threads each run
/// 12 independent multiply-add chains in registers (no memory traffic), the
/// best of three runs of 0.1-0.3 s (the clock ramps up in the first). Returns (path, GFLOP/s) for the paths this CPU has: f32 FMA
/// on AVX-512 and on AVX2 (the engine's kernels), and bf16 dot products with
/// f32 accumulation (AVX512_BF16 `vdpbf16ps`; 64 flops an instruction).
fn measured_peaks(threads: usize) -> Vec<(&'static str, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        const ITERS: u64 = 100_000_000;
        macro_rules! chains {
            ($feature:literal, $name:ident, $ty:ty, $init:expr, $step:expr) => {
                #[target_feature(enable = $feature)]
                unsafe fn $name(iters: u64) -> f32 {
                    // Twelve chains that start apart: with equal starts the
                    // compiler proves them equal and keeps one, and the
                    // loop times one chain's latency, not the throughput.
                    let mut a: [$ty; 12] = std::array::from_fn(|i| $init(1.0 + i as f32 / 64.0));
                    for _ in 0..iters {
                        for v in a.iter_mut() {
                            *v = $step(*v);
                        }
                    }
                    // keep every chain alive
                    let mut sum = 0f32;
                    for v in a.iter() {
                        let mut out = [0f32; 16];
                        std::ptr::copy_nonoverlapping(v as *const $ty as *const f32, out.as_mut_ptr(), 4);
                        sum += out[0];
                    }
                    sum
                }
            };
        }
        chains!("avx512f", f32_512, __m512, |x| _mm512_set1_ps(x), |v| _mm512_fmadd_ps(
            v,
            _mm512_set1_ps(0.999_999),
            _mm512_set1_ps(1e-7)
        ));
        chains!("avx2,fma", f32_256, __m256, |x| _mm256_set1_ps(x), |v| _mm256_fmadd_ps(
            v,
            _mm256_set1_ps(0.999_999),
            _mm256_set1_ps(1e-7)
        ));
        chains!("avx512bf16,avx512f", bf16_512, __m512, |x| _mm512_set1_ps(x), |v| _mm512_dpbf16_ps(
            v,
            _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0), _mm512_set1_ps(1.0)),
            _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-7), _mm512_set1_ps(1e-7))
        ));
        let once = |f: unsafe fn(u64) -> f32, flops_per_step: f64| -> f64 {
            let t = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        // SAFETY: called only when the CPU has the feature (checked below).
                        unsafe { f(ITERS) }
                    })
                })
                .collect();
            let keep: f32 = handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum();
            std::hint::black_box(keep);
            threads as f64 * ITERS as f64 * 12.0 * flops_per_step / t.elapsed().as_secs_f64() / 1e9
        };
        let run =
            |f: unsafe fn(u64) -> f32, flops_per_step: f64| (0..3).map(|_| once(f, flops_per_step)).fold(0.0, f64::max);
        let mut peaks = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            peaks.push(("f32 AVX-512 FMA", run(f32_512, 32.0)));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            peaks.push(("f32 AVX2 FMA", run(f32_256, 16.0)));
        }
        if is_x86_feature_detected!("avx512bf16") {
            peaks.push(("bf16 AVX512_BF16 dot", run(bf16_512, 64.0)));
        }
        peaks
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        Vec::new()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let Some(size) = args.child.clone() else {
        println!(
            "model={} device={} precision={} threads={}",
            args.model,
            args.device,
            args.precision,
            std::env::var("RAYON_NUM_THREADS")
                .unwrap_or_else(|_| format!("{}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)))
        );
        if args.device == "cpu" {
            let threads = std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let peaks: Vec<String> =
                measured_peaks(threads).iter().map(|(p, g)| format!("{p} {g:.0} GFLOP/s")).collect();
            println!("peak ({threads} threads, measured): {}", peaks.join(", "));
            // which builds of the kernels this CPU runs, so that figures from
            // different machines can be told apart
            use gstcodiff::engine::kernels::{bf16, direct};
            println!(
                "kernels: direct 3x3 {}, bf16 dot products {}",
                direct::active().map_or("off (im2col + GEMM)".into(), |isa| format!("{isa:?}")),
                if bf16::native() { "AVX512_BF16" } else { "emulated" }
            );
        }
        for size in args.sizes.split(',') {
            let exe = std::env::current_exe()?;
            let status = Command::new(exe).args(std::env::args().skip(1)).args(["--child", size]).status()?;
            if !status.success() {
                println!("{size}: failed ({status})");
            }
        }
        return Ok(());
    };
    let (w, h) = size.split_once('x').ok_or("size must be WxH")?;
    let (w, h): (usize, usize) = (w.parse()?, h.parse()?);
    let device: DeviceSpec = args.device.parse()?;
    let precision: Precision = args.precision.parse()?;
    let t0 = Instant::now();
    let engine = match args.model.as_str() {
        "full" => Engine::synthetic(
            CaveConfig { nc: [64, 128, 256, 512], nb: 4 },
            Some((UNetConfig::sd21_base(), VaeConfig::sd21_base())),
            device,
            precision,
            false,
        )?,
        "compact" => Engine::load(
            &ModelSpec {
                device,
                precision,
                mode: Mode::Cave,
                weights: default_weights_path(),
                ..ModelSpec::compact_default()
            },
            &mut |_| {},
        )?,
        m if m.starts_with("official:") => {
            // official:DIR — DIR holds unet/ vae/ scheduler/ codiff.pkl and cave.pth or cave.safetensors
            let dir = std::path::PathBuf::from(&m[9..]);
            let cave = ["cave.pth", "cave.safetensors"]
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.exists())
                .ok_or("no cave.pth")?;
            let spec = ModelSpec {
                mode: Mode::Diffusion,
                weights: cave.clone(),
                sd_dir: Some(dir.clone()),
                codiff: Some(dir.join("codiff.pkl")),
                cave: Some(cave),
                device,
                precision,
            };
            Engine::load(&spec, &mut |_| {})?
        }
        m if m.starts_with("cave:") => {
            // cave:NC0,NC1,NC2,NC3:NB — a random-weight CaVE of that size
            let (nc, nb) = m[5..].split_once(':').ok_or("cave:NC0,NC1,NC2,NC3:NB")?;
            let nc: Vec<usize> = nc.split(',').map(str::parse).collect::<Result<_, _>>()?;
            let nc: [usize; 4] = nc.try_into().map_err(|_| "four widths")?;
            Engine::synthetic(CaveConfig { nc, nb: nb.parse()? }, None, device, precision, false)?
        }
        m => return Err(format!("unknown model {m}").into()),
    };
    let load = t0.elapsed().as_secs_f64();
    let opts = gstcodiff::engine::RestoreOptions { guard: !args.no_guard, ..args.tiles.options() };
    if args.warmup {
        let r = engine.restore_report(&mut test_image(w, h), &opts)?;
        println!("{w}x{h}: {r:?}");
    }
    for _ in 0..args.runs {
        let mut img = test_image(w, h);
        let t = Instant::now();
        let (_, times) = engine.restore_timed(&mut img, &opts)?;
        let total = t.elapsed().as_secs_f64();
        let stages: Vec<String> = times.iter().map(|t| format!("{} {:.3}", t.stage, t.secs)).collect();
        println!(
            "{w}x{h}: total {total:.3} s ({:.3} s/MP) | {} | build {load:.1} s | peak RSS {:.0} MB",
            total / (w * h) as f64 * 1e6,
            stages.join(", "),
            peak_rss_mb()
        );
        // the roofline: each stage's counted work and rate
        let work: Vec<String> = times
            .iter()
            .filter(|t| t.flops > 0)
            .map(|t| {
                let [conv, attn, lin] = t.op_secs;
                format!(
                    "{} {:.1} GFLOP {:.0} GFLOP/s (conv {conv:.2} s, attention {attn:.2} s, linear {lin:.2} s, other {:.2} s)",
                    t.stage,
                    t.flops as f64 / 1e9,
                    t.flops as f64 / t.secs / 1e9,
                    (t.secs - conv - attn - lin).max(0.0)
                )
            })
            .collect();
        if !work.is_empty() {
            println!("roofline {w}x{h}: {}", work.join(", "));
        }
        if engine.mode() == Mode::Cave {
            // the layer count of the model, against the kernels' count above
            let padded = (w.div_ceil(32) * 32 * h.div_ceil(32) * 32) as f64;
            let c = engine.cave().config;
            println!(
                "roofline {w}x{h}: CaVE nc {:?} nb {}: {:.3} MFLOP/px by its layers x {:.2} MP (padded) = {:.1} GFLOP",
                c.nc,
                c.nb,
                c.flops_per_pixel() / 1e6,
                padded / 1e6,
                c.flops_per_pixel() * padded / 1e9
            );
        }
    }
    Ok(())
}
