//! The still command on many files (`examples/restore.rs --out-dir`, built
//! by `cargo build --examples`): folders restore with one model load, a second
//! run resumes (skips what is done), and `--shard I/N` splits the files so
//! that the shards cover every file exactly once.
use std::path::{Path, PathBuf};
use std::process::Command;

fn restore_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|d| d.parent()).unwrap().join("examples/restore");
    if bin.exists() {
        Some(bin)
    } else {
        eprintln!("SKIPPED: no {} (cargo build --examples first)", bin.display());
        None
    }
}

fn run(bin: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn folders_restore_with_one_model_load_resume_and_shard() {
    let Some(bin) = restore_bin() else { return };
    if !gstcodiff::engine::default_weights_path().exists() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("codiff-batch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (input, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(input.join("sub")).unwrap();
    // small crops of the README JPEG (on its 16 px grid)
    let jpeg = image::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut-q10.jpg")).unwrap();
    for (i, name) in ["a.png", "b.png", "sub/c.png", "sub/d.png", "e.png"].iter().enumerate() {
        jpeg.crop_imm(16 * i as u32, 0, 64, 48).save(input.join(name)).unwrap();
    }
    std::fs::write(input.join("notes.txt"), "not an image").unwrap();
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());

    let (ok, _, err) = run(&bin, &[i, "--out-dir", o]);
    assert!(ok, "{err}");
    assert_eq!(err.matches("loading CaVE").count(), 1, "one model load: {err}");
    for name in ["a.png", "b.png", "sub/c.png", "sub/d.png", "e.png"] {
        assert!(out.join(name).is_file(), "{name}: {err}");
    }
    // resumes: an output removed is redone, the others are skipped
    std::fs::remove_file(out.join("sub/c.png")).unwrap();
    let (ok, _, err) = run(&bin, &[i, "--out-dir", o]);
    assert!(ok && err.contains("5 images, 1 to do (4 done before)"), "{err}");
    assert!(out.join("sub/c.png").is_file());

    // three shards cover every file exactly once
    let mut seen: Vec<String> = Vec::new();
    for s in 0..3 {
        let (ok, list, err) = run(&bin, &[i, "--out-dir", o, "--shard", &format!("{s}/3"), "--list"]);
        assert!(ok, "{err}");
        seen.extend(list.lines().map(|l| l.split('\t').next().unwrap().to_string()));
    }
    let (_, all, _) = run(&bin, &[i, "--out-dir", o, "--list"]);
    let mut all: Vec<String> = all.lines().map(|l| l.split('\t').next().unwrap().to_string()).collect();
    assert_eq!(all.len(), 5);
    seen.sort();
    all.sort();
    assert_eq!(seen, all);
    let _ = std::fs::remove_dir_all(&dir);
}
