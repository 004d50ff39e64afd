//! Bounded fuzzing of every model-file parser we wrote (legacy pickle, zip
//! pickle, safetensors, the three config files), seeded from the tiny
//! fixture: each input must give `Ok` or a clean `EngineError` naming the
//! file, never a panic, and never ask for more than 1 GiB in one allocation.
//! The same cases, longer: `cargo run --release --example fuzz -- --minutes N`.
use std::sync::atomic::Ordering;

use codiff_testkit::hostile;

#[global_allocator]
static ALLOC: hostile::Counting = hostile::Counting;

/// The run CI repeats: cases `0..CASES` of this seed, in two halves (one per
/// test thread).
const SEED: u64 = 0x00C0_D1FF;
const CASES: usize = 16_000;

fn fuzz(range: std::ops::Range<usize>, tag: &str) {
    hostile::ALLOC_LIMIT.store(1 << 30, Ordering::Relaxed);
    let seeds = hostile::seeds();
    let dir = std::env::temp_dir().join(format!("codiff-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut t = hostile::Tally::default();
    let start = std::time::Instant::now();
    hostile::run(SEED, range, &seeds, &dir, &mut t);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "fuzz {tag}: {} cases ({} loading the whole engine) in {:.1} s: {} ok, {} clean errors, {} panics; largest allocation {} bytes",
        t.cases,
        t.full_loads,
        start.elapsed().as_secs_f64(),
        t.ok,
        t.errors,
        t.panics,
        hostile::LARGEST_ALLOC.load(Ordering::Relaxed)
    );
    assert_eq!(t.panics, 0, "panics (case, file, message): {:?}", t.first_panics);
    assert!(t.unnamed.is_empty(), "errors that do not name the file: {:?}", t.unnamed);
    // the mutations reach both outcomes: the harness is not just breaking headers
    assert!(t.ok > 0 && t.errors > 0 && t.full_loads > 0, "{t:?}");
}

#[test]
fn fuzzed_files_first_half() {
    fuzz(0..CASES / 2, "a");
}

#[test]
fn fuzzed_files_second_half() {
    fuzz(CASES / 2..CASES, "b");
}

#[test]
fn every_seed_parses() {
    let seeds = hostile::seeds();
    let dir = std::env::temp_dir().join(format!("codiff-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for s in &seeds {
        match hostile::run_case(&dir, &s.name, s.target, &s.bytes) {
            hostile::Outcome::Ok => {}
            other => panic!("seed {}: {other:?}", s.name),
        }
    }
    // the whole engine loads from the unmodified copy
    let model = hostile::model_copy(&dir);
    let cave = std::fs::read(model.join("cave.pth")).unwrap();
    assert!(matches!(hostile::run_model_case(&model, "cave.pth", &cave), hostile::Outcome::Ok));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cases_are_deterministic() {
    let seeds = hostile::seeds();
    for i in [0, 7, 1234] {
        assert_eq!(hostile::case(SEED, i, &seeds).bytes, hostile::case(SEED, i, &seeds).bytes);
    }
}
