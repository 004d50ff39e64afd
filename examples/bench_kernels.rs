//! Times the 3x3 convolution's two CPU paths (direct AVX-512 kernel, im2col +
//! GEMM) and candle's conv2d on the layer shapes of the compact CaVE at
//! 1280x720 and two of SD's VAE (where the direct kernel is forced: `ConvOp`
//! keeps layers wider than `DIRECT_MAX_CHANNELS` on GEMM), so the choice is a
//! measured one.
//!
//! `cargo run --release --no-default-features --example bench_kernels [-- --runs N]`
use candle_core::{Device, Tensor};
use clap::Parser;
use gstcodiff::engine::kernels::{direct, ConvOp};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// timed runs per layer (the median is printed)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// also time candle's own conv2d
    #[arg(long)]
    candle: bool,
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dev = Device::Cpu;
    println!("threads={} avx512 direct kernel available: {}", rayon::current_num_threads(), direct::available());
    println!("| layer | cin->cout | HxW | direct ms | GEMM ms | candle ms | direct GFLOP/s | GEMM GFLOP/s |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    let layers: [(&str, usize, usize, usize, usize); 9] = [
        ("compact head", 3, 8, 720, 1280),
        ("compact level 0", 8, 8, 720, 1280),
        ("compact tail", 8, 3, 720, 1280),
        ("compact level 1", 16, 16, 360, 640),
        ("compact level 2", 64, 64, 90, 160),
        ("compact level 3", 64, 64, 23, 40),
        ("official CaVE level 0", 64, 64, 512, 512),
        ("SD VAE 128 ch", 128, 128, 256, 256),
        ("SD VAE 512 ch", 512, 512, 64, 64),
    ];
    for (name, cin, cout, h, w) in layers {
        let x = Tensor::randn(0f32, 1., (1, cin, h, w), &dev)?;
        let wt = (Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev)? * 0.1)?;
        let b = Tensor::zeros(cout, candle_core::DType::F32, &dev)?;
        let op = ConvOp::from_tensors(&wt, Some(&b), true)?;
        let gemm = op.clone().gemm_only();
        let op = op.direct()?;
        let flop = 2.0 * (cin * 9 * cout * h * w) as f64;
        let direct_ms = if op.is_direct() { Some(median_ms(args.runs, || drop(x.apply_op1_no_bwd(&op).unwrap()))) } else { None };
        let gemm_ms = median_ms(args.runs, || drop(x.apply_op1_no_bwd(&gemm).unwrap()));
        let candle_ms = if args.candle { Some(median_ms(args.runs, || drop(x.conv2d(&wt, 1, 1, 1, 1).unwrap()))) } else { None };
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}", flop / v / 1e6));
        println!(
            "| {name} | {cin}->{cout} | {h}x{w} | {} | {gemm_ms:.2} | {} | {} | {} |",
            show(direct_ms),
            show(candle_ms),
            rate(direct_ms),
            rate(Some(gemm_ms))
        );
    }
    Ok(())
}
