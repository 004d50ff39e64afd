"""Side by side: the Rust engine (examples/bench.rs) vs the same pipeline in
PyTorch (examples/bench_torch.py), same machine, same thread count, same files.

The benchmark (on an otherwise idle machine; ~4 GB of random full-size weights):

    python3 examples/make_random_codiff.py target/codiff-random
    cargo build --release --no-default-features --example bench
    python3 examples/compare_torch.py --model-dir target/codiff-random \\
        --sizes 256x256,512x512 --rounds 3 --threads 2 | tee target/compare.md

For every size and round it runs one Rust bench process
(`target/release/examples/bench --model official:DIR --sizes WxH --runs 1`,
RAYON_NUM_THREADS=threads) and one PyTorch process
(`bench_torch.py --model-dir DIR --size WxH --runs 1 --threads T`), alternating
which goes first each round so that slow drifts of the machine hit both alike.
Both also get OMP_NUM_THREADS / MKL_NUM_THREADS = threads. --warmup passes
--warmup to both (one untimed restore before the timed one; without it the timed
run includes first-call costs such as allocator growth and oneDNN primitive
creation, on both sides).

Output: a Markdown table per size with the median (over rounds) seconds of each
stage, the total and the process's peak RSS, and the ratio ours / PyTorch
(> 1: the Rust engine is slower); then every raw line. Stage boundaries are the
same on both sides (see bench_torch.py's docstring). The Rust "total" is the
wall time of restore_timed; the PyTorch one of Pipeline.run.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ["cave", "vae_encode", "unet", "vae_decode", "color_fix", "output"]
LINE = re.compile(r"^(\d+)x(\d+): total ([0-9.]+) s .*?\| (.*?) \| build ([0-9.]+) s \| peak RSS ([0-9.]+) MB")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--sizes", default="256x256,512x512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", action="store_true", help="one untimed restore before the timed one (both sides)")
    ap.add_argument("--bench", default=os.path.join(ROOT, "target", "release", "examples", "bench"),
                    help="the Rust bench binary")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    return ap.parse_args()


def parse(out):
    """The first result line of a bench output -> dict (stages, total, build, rss)."""
    for line in out.splitlines():
        m = LINE.match(line.strip())
        if m:
            stages = {}
            for part in m.group(4).split(","):
                name, val = part.strip().rsplit(" ", 1)
                stages[name] = float(val)
            return {"total": float(m.group(3)), "stages": stages, "build": float(m.group(5)),
                    "rss": float(m.group(6)), "line": line.strip()}
    return None


def run(cmd, env, timeout):
    t = time.time()
    p = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    r = parse(p.stdout)
    if r is None:
        err = (p.stdout + p.stderr).strip().splitlines()
        raise RuntimeError("%s failed (exit %s):\n%s" % (" ".join(cmd), p.returncode, "\n".join(err[-20:])))
    r["wall"] = time.time() - t
    return r


def fmt(x):
    return "%.3f" % x if x < 100 else "%.1f" % x


def main():
    args = parse_args()
    if not os.path.exists(args.bench):
        sys.exit("%s missing: cargo build --release --no-default-features --example bench" % args.bench)
    env = dict(os.environ)
    env.update(RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    warm = ["--warmup"] if args.warmup else []
    sides = {
        "rust": lambda size: [args.bench, "--model", "official:" + args.model_dir, "--sizes", size, "--runs", "1"] + warm,
        "torch": lambda size: [args.python, os.path.join(HERE, "bench_torch.py"), "--model-dir", args.model_dir,
                               "--size", size, "--runs", "1", "--threads", str(args.threads)] + warm,
    }
    results = {}
    raw = []
    for size in args.sizes.split(","):
        size = size.strip()
        for rnd in range(args.rounds):
            order = ["rust", "torch"] if rnd % 2 == 0 else ["torch", "rust"]
            for side in order:
                r = run(sides[side](size), env, args.timeout)
                results.setdefault((size, side), []).append(r)
                raw.append("%s round %d %s: %s" % (size, rnd + 1, side, r["line"]))
                print(raw[-1], file=sys.stderr, flush=True)

    print("threads %d, rounds %d%s, model %s; medians over rounds, seconds (peak RSS in MB); "
          "ratio = ours / PyTorch\n" % (args.threads, args.rounds, ", warm-up run" if args.warmup else "",
                                         args.model_dir))
    for size in args.sizes.split(","):
        size = size.strip()
        rs, ts = results[(size, "rust")], results[(size, "torch")]
        print("### %s\n" % size)
        print("| stage | ours (candle) | PyTorch | ours / PyTorch |")
        print("|---|---:|---:|---:|")
        for st in STAGES + ["total", "rss"]:
            def med(rr):
                if st == "total":
                    return statistics.median(r["total"] for r in rr)
                if st == "rss":
                    return statistics.median(r["rss"] for r in rr)
                vals = [r["stages"][st] for r in rr if st in r["stages"]]
                return statistics.median(vals) if vals else None
            a, b = med(rs), med(ts)
            if a is None and b is None:
                continue
            name = {"total": "**total**", "rss": "peak RSS (MB)"}.get(st, st)
            ratio = "%.2fx" % (a / b) if a is not None and b else "-"
            fa = ("%.0f" % a if st == "rss" else fmt(a)) if a is not None else "-"
            fb = ("%.0f" % b if st == "rss" else fmt(b)) if b is not None else "-"
            print("| %s | %s | %s | %s |" % (name, fa, fb, ratio))
        print("| load (build) | %s | %s | %.2fx |\n" % (
            fmt(statistics.median(r["build"] for r in rs)), fmt(statistics.median(r["build"] for r in ts)),
            statistics.median(r["build"] for r in rs) / max(statistics.median(r["build"] for r in ts), 1e-9)))
    print("<details><summary>raw lines</summary>\n\n```")
    for line in raw:
        print(line)
    print("```\n</details>")


if __name__ == "__main__":
    main()
