//! Times the 3x3 convolution's CPU paths (direct AVX-512 / AVX2 kernel, im2col +
//! GEMM, Winograd F(2,3) and F(4,3)) and candle's conv2d on the layer shapes
//! of the compact CaVE at 1280x720, the official CaVE, SD's VAE and UNet at
//! 512x512 (every path forced on every layer; `ConvOp` picks by channels and
//! width), so the choice is a measured one; then SD's 1x1 and stride-2
//! layers in f32 and in bf16, and the VAE decoder's 2x upsampling (candle's and ours).
//!
//! `cargo run --release --no-default-features --example bench_kernels [-- --runs N] [--only UNet]`
use candle_core::{Device, Tensor};
use clap::Parser;
use gstcodiff::engine::kernels::{build_with, direct, AttentionOp, ConvOp, LinearOp, Math, Upsample2x};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// timed runs per layer (the median is printed)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// also time candle's own conv2d
    #[arg(long)]
    candle: bool,
    /// only the layers whose name contains this text
    #[arg(long, default_value = "")]
    only: String,
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// `time(math)` in f32, then in bf16.
fn per_math(mut time: impl FnMut(Math) -> f64) -> [f64; 2] {
    [time(Math::F32), time(Math::Bf16)]
}

/// A row of the UNet table: ms and GFLOP/s in f32 and bf16 for `flop`.
fn rate_row(name: &str, shape: &str, flop: f64, [f32_ms, bf16_ms]: [f64; 2]) {
    println!(
        "| {name} | {shape} | {f32_ms:.2} | {bf16_ms:.2} | {:.0} | {:.0} |",
        flop / f32_ms / 1e6,
        flop / bf16_ms / 1e6
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dev = Device::Cpu;
    println!(
        "threads={} direct kernel: {}",
        rayon::current_num_threads(),
        direct::active().map_or("none".into(), |isa| format!("{isa:?}"))
    );
    println!(
        "| layer | cin->cout | HxW | direct ms | GEMM ms | F(2,3) ms | F(4,3) ms | candle ms | best GFLOP/s (direct-equivalent) | bf16: direct ms | GEMM ms | F(2,3) ms |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let layers: [(&str, usize, usize, usize, usize); 22] = [
        ("compact head", 3, 8, 720, 1280),
        ("compact level 0", 8, 8, 720, 1280),
        ("compact tail", 8, 3, 720, 1280),
        ("compact level 1", 16, 16, 360, 640),
        ("compact level 2", 64, 64, 90, 160),
        ("compact level 3", 64, 64, 23, 40),
        ("official CaVE level 0", 64, 64, 512, 512),
        ("SD VAE input", 3, 128, 512, 512),
        ("SD VAE output", 128, 3, 512, 512),
        ("SD VAE encoder output", 512, 8, 64, 64),
        ("SD VAE 128 ch", 128, 128, 256, 256),
        ("SD VAE 256 ch", 256, 256, 128, 128),
        ("SD VAE 512 ch", 512, 512, 64, 64),
        ("SD VAE decoder 128 ch", 128, 128, 512, 512),
        ("SD VAE decoder 256 ch", 256, 256, 256, 256),
        ("SD VAE decoder 512 ch", 512, 512, 128, 128),
        ("SD UNet 320 ch", 320, 320, 64, 64),
        ("SD UNet 640 ch", 640, 640, 32, 32),
        ("SD UNet 1920->640", 1920, 640, 32, 32),
        ("SD UNet 1280 ch", 1280, 1280, 16, 16),
        ("SD UNet 2560->1280", 2560, 1280, 16, 16),
        ("SD UNet 1280 ch", 1280, 1280, 8, 8),
    ];
    for (name, cin, cout, h, w) in layers.into_iter().filter(|l| l.0.contains(&args.only)) {
        let x = Tensor::randn(0f32, 1., (1, cin, h, w), &dev)?;
        let wt = (Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev)? * 0.1)?;
        let b = Tensor::zeros(cout, candle_core::DType::F32, &dev)?;
        let op = ConvOp::from_tensors(&wt, Some(&b), true)?;
        let gemm = op.clone().gemm_only();
        let f2 = gemm.clone().with_winograd(Some(2));
        let f4 = gemm.clone().with_winograd(Some(4));
        let op = op.direct()?;
        // the same layer built for bf16 arithmetic (precision=bf16 on the CPU)
        let bf = build_with(Math::Bf16, || ConvOp::from_tensors(&wt, Some(&b), true))?;
        let (bf_gemm, bf_direct) = (bf.clone().gemm_only(), bf.direct()?);
        let bf_f2 = bf_gemm.clone().with_winograd(Some(2));
        let flop = 2.0 * (cin * 9 * cout * h * w) as f64;
        let direct_ms =
            if op.is_direct() { Some(median_ms(args.runs, || drop(x.apply_op1_no_bwd(&op).unwrap()))) } else { None };
        let gemm_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&gemm).unwrap()));
        let f2_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&f2).unwrap()));
        let f4_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&f4).unwrap()));
        let candle_ms =
            if args.candle { Some(median_ms(args.runs, || drop(x.conv2d(&wt, 1, 1, 1, 1).unwrap()))) } else { None };
        let bf_direct_ms =
            bf_direct.is_direct().then(|| median_ms(args.runs, || drop(x.apply_op1_no_bwd(&bf_direct).unwrap())));
        let bf_gemm_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&bf_gemm).unwrap()));
        let bf_f2_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&bf_f2).unwrap()));
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}", flop / v / 1e6));
        let best =
            [direct_ms, Some(gemm_ms), Some(f2_ms), Some(f4_ms)].into_iter().flatten().fold(f64::INFINITY, f64::min);
        println!(
            "| {name} | {cin}->{cout} | {h}x{w} | {} | {gemm_ms:.2} | {f2_ms:.2} | {f4_ms:.2} | {} | {} | {} | {bf_gemm_ms:.2} | {bf_f2_ms:.2} |",
            show(direct_ms),
            show(candle_ms),
            rate(Some(best)),
            show(bf_direct_ms),
        );
    }
    println!("\n| 1x1 or strided layer | cin->cout | k, stride | HxW | f32 ms | bf16 ms |");
    println!("|---|---|---|---|---:|---:|");
    let gemm_layers: [(&str, usize, usize, usize, usize, usize); 7] = [
        ("SD VAE decoder shortcut", 256, 128, 1, 512, 512),
        ("SD VAE decoder shortcut", 512, 256, 1, 256, 256),
        ("SD UNet shortcut", 2560, 1280, 1, 16, 16),
        ("SD UNet shortcut", 640, 320, 1, 64, 64),
        ("SD VAE encoder downsample", 128, 128, 3, 512, 512),
        ("SD VAE encoder downsample", 256, 256, 3, 256, 256),
        ("SD UNet downsample", 320, 320, 3, 64, 64),
    ];
    for (name, cin, cout, k, h, w) in gemm_layers.into_iter().filter(|l| l.0.contains(&args.only)) {
        let x = Tensor::randn(0f32, 1., (1, cin, h, w), &dev)?;
        let wt = (Tensor::randn(0f32, 1., (cout, cin, k, k), &dev)? * 0.1)?;
        // 3x3 ones downsample as SD's do: stride 2, padded on the bottom and right
        let (stride, pad) = if k == 1 { (1, [0; 4]) } else { (2, [0, 0, 1, 1]) };
        let f32_op = ConvOp::new(&wt, None, stride, pad, false)?;
        let bf16_op = build_with(Math::Bf16, || ConvOp::new(&wt, None, stride, pad, false))?;
        let f32_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&f32_op).unwrap()));
        let bf16_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&bf16_op).unwrap()));
        println!("| {name} | {cin}->{cout} | {k}, {stride} | {h}x{w} | {f32_ms:.2} | {bf16_ms:.2} |");
    }
    println!("\n| 2x nearest upsample | channels | HxW | candle ms | ours ms |");
    println!("|---|---|---|---:|---:|");
    let upsamples: [(&str, usize, usize, usize); 3] = [
        ("SD VAE decoder upsample", 512, 64, 64),
        ("SD VAE decoder upsample", 512, 128, 128),
        ("SD VAE decoder upsample", 256, 256, 256),
    ];
    for (name, c, h, w) in upsamples.into_iter().filter(|l| l.0.contains(&args.only)) {
        let x = Tensor::randn(0f32, 1., (1, c, h, w), &dev)?;
        let candle_ms = median_ms(args.runs, || drop(x.upsample_nearest2d(2 * h, 2 * w).unwrap()));
        let ours_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&Upsample2x).unwrap()));
        println!("| {name} | {c} | {h}x{w} | {candle_ms:.2} | {ours_ms:.2} |");
    }
    println!("\n| UNet linear / attention (512x512) | shape | f32 ms | bf16 ms | f32 GFLOP/s | bf16 GFLOP/s |");
    println!("|---|---|---:|---:|---:|---:|");
    let linears: [(&str, usize, usize, usize); 9] = [
        ("linear 64x64", 4096, 320, 320),
        ("GEGLU in 64x64", 4096, 320, 2560),
        ("FF out 64x64", 4096, 1280, 320),
        ("linear 32x32", 1024, 640, 640),
        ("GEGLU in 32x32", 1024, 640, 5120),
        ("FF out 32x32", 1024, 2560, 640),
        ("linear 16x16", 256, 1280, 1280),
        ("GEGLU in 16x16", 256, 1280, 10240),
        ("FF out 16x16", 256, 5120, 1280),
    ];
    for (name, rows, cin, cout) in linears.into_iter().filter(|l| l.0.contains(&args.only)) {
        let x = Tensor::randn(0f32, 1., (1, rows, cin), &dev)?;
        let w = Tensor::randn(0f32, 1., (cout, cin), &dev)?;
        let b = Tensor::randn(0f32, 1., cout, &dev)?;
        let ms = per_math(|math| {
            let op = LinearOp::new(&w, Some(&b), math).unwrap();
            median_ms(args.runs, || drop(x.apply_op1_no_bwd(&op).unwrap()))
        });
        rate_row(name, &format!("{rows}x{cin}->{cout}"), 2.0 * (rows * cin * cout) as f64, ms);
    }
    let attentions: [(&str, usize, usize, usize, usize); 4] = [
        ("self-attention 64x64", 4096, 4096, 5, 64),
        ("cross-attention 64x64", 4096, 77, 5, 64),
        ("self-attention 32x32", 1024, 1024, 10, 64),
        ("self-attention 16x16", 256, 256, 20, 64),
    ];
    for (name, n, m, heads, d) in attentions.into_iter().filter(|l| l.0.contains(&args.only)) {
        let c = heads * d;
        let q = Tensor::randn(0f32, 1., (1, n, c), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, m, c), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, m, c), &dev)?;
        let ms = per_math(|math| {
            let op = AttentionOp { heads, scale: 1.0 / (d as f32).sqrt(), math };
            median_ms(args.runs, || drop(q.apply_op3_no_bwd(&k, &v, &op).unwrap()))
        });
        rate_row(name, &format!("{n}x{m}, {heads}x{d}"), 4.0 * (n * m * c) as f64, ms);
    }
    Ok(())
}
