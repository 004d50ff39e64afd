//! Fuzz every model-file parser (legacy pickle `cave.pth`, zip pickle
//! `codiff.pkl`, safetensors, UNet / VAE / scheduler configs) for a while:
//!
//! ```text
//! cargo run --release --example fuzz -- --minutes 10 [--seed N] [--jobs J] [--crashes DIR]
//! ```
//!
//! Cases are mutations of the tiny fixture's files (bit flips, edge values in
//! length fields, truncations, splices, nesting bombs, memo references, JSON
//! number edits) and generated checkpoints with random shapes, strides and
//! offsets. Each must give `Ok` or a clean error naming the file; panics are
//! counted and their inputs written to `--crashes`; any single allocation
//! above 1 GiB aborts the run. Prints cases tried, ok, errors and panics.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

use codiff_testkit::hostile;

#[global_allocator]
static ALLOC: hostile::Counting = hostile::Counting;

#[derive(Parser, Debug)]
#[command(about = "Fuzz codiff's model-file parsers for a bounded time")]
struct Args {
    /// Minutes to run
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// Run seed (case i of a seed is always the same input)
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
    /// Worker threads (default: all cores)
    #[arg(long)]
    jobs: Option<usize>,
    /// Write every panicking input here
    #[arg(long)]
    crashes: Option<std::path::PathBuf>,
    /// Run only these case numbers (comma-separated), printing each outcome
    #[arg(long, value_delimiter = ',')]
    replay: Vec<usize>,
}

fn main() {
    let args = Args::parse();
    hostile::ALLOC_LIMIT.store(1 << 30, Ordering::Relaxed);
    let seeds = hostile::seeds();
    if !args.replay.is_empty() {
        let dir = std::env::temp_dir().join(format!("codiff-fuzz-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for &i in &args.replay {
            let c = hostile::case(args.seed, i, &seeds);
            let out = match &c.full_load {
                Some(rel) => hostile::run_model_case(&hostile::model_copy(&dir), rel, &c.bytes),
                None => hostile::run_case(&dir, &c.name, c.target, &c.bytes),
            };
            println!("case {i} ({}, {} bytes, full load: {:?}): {out:?}", c.name, c.bytes.len(), c.full_load);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    // panics are counted and reported below, not printed as they happen
    std::panic::set_hook(Box::new(|_| {}));
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let deadline = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let tallies: Vec<hostile::Tally> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs)
            .map(|j| {
                let (seeds, next, stop, crashes) = (&seeds, &next, &stop, &args.crashes);
                s.spawn(move || {
                    let dir = std::env::temp_dir().join(format!("codiff-fuzz-{}-{j}", std::process::id()));
                    std::fs::create_dir_all(&dir).unwrap();
                    let mut t = hostile::Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(50, Ordering::Relaxed);
                        let before = t.panics;
                        hostile::run(args.seed, i..i + 50, seeds, &dir, &mut t);
                        if t.panics > before {
                            if let Some(c) = crashes {
                                std::fs::create_dir_all(c).unwrap();
                                for (k, name, _) in t.first_panics.iter().filter(|p| p.0 >= i) {
                                    let bytes = hostile::case(args.seed, *k, seeds).bytes;
                                    std::fs::write(c.join(format!("{k}-{name}")), bytes).unwrap();
                                }
                            }
                        }
                        if Instant::now() >= deadline {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                    t
                })
            })
            .collect();
        // progress every 30 s
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let el = start.elapsed().as_secs();
            if el > 0 && el.is_multiple_of(30) {
                eprintln!("fuzz: {} s, about {} cases", el, next.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        workers.into_iter().map(|w| w.join().expect("worker")).collect()
    });
    let mut total = hostile::Tally::default();
    for t in tallies {
        total.cases += t.cases;
        total.full_loads += t.full_loads;
        total.ok += t.ok;
        total.errors += t.errors;
        total.panics += t.panics;
        total.first_panics.extend(t.first_panics);
        total.unnamed.extend(t.unnamed);
    }
    println!(
        "fuzz: seed {} for {:.1} min on {jobs} threads: {} cases tried ({} loading the whole engine), {} ok, {} clean errors, {} panics; largest allocation {} bytes",
        args.seed,
        start.elapsed().as_secs_f64() / 60.0,
        total.cases,
        total.full_loads,
        total.ok,
        total.errors,
        total.panics,
        hostile::LARGEST_ALLOC.load(Ordering::Relaxed)
    );
    for (i, name, msg) in &total.first_panics {
        println!("panic: case {i} ({name}): {msg}");
    }
    for e in total.unnamed.iter().take(5) {
        println!("error without the file name: {e}");
    }
    if total.panics > 0 || !total.unnamed.is_empty() {
        std::process::exit(1);
    }
}
