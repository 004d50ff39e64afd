"""Speed of the Rust engine against the OFFICIAL CODiff code (github.com/jp-guo/CODiff),
each on its own pinned environment, interleaved on one machine, per stage.

    examples/official_env.sh /work/official-venv          # the official pins (once)
    git clone https://github.com/jp-guo/CODiff /path/to/CODiff
    /work/official-venv/bin/python examples/make_random_codiff.py target/codiff-random  # or real files
    /work/official-venv/bin/python examples/compare_official.py --official /path/to/CODiff \\
        --model-dir target/codiff-random --rust-bench target/release/examples/bench \\
        --size 512x512 --rounds 3 --threads 2

Run it with the official venv's python (the official modules are imported in
child processes started with the same interpreter). The official code is read
from --official DIR and never modified; nothing of it is copied here.

Each round k runs, one after the other on the same machine:
  1. official: a child process of this script (`--child`) that imports the
     official modules from DIR (diffusion/codiff.py's CODiff_test, cave/cave.py's
     CaVE, diffusion/my_utils/wavelet_color_fix.py's adain_color_fix), builds them
     on --model-dir as main_test_codiff.py does (SD folders unet/ vae/ scheduler/
     as --pretrained_model, codiff.pkl as --codiff_path, cave.pth as --cave_path,
     --mixed_precision fp32, --merge_and_unload_lora True, the test script's tile
     defaults 224 / 1024 / 96 / 32), then restores the test image --runs times
     with the test script's own per-image lines;
  2. ours: `RUST_BENCH --model official:MODEL_DIR --sizes WxH --runs N --no-guard
     --precision f32` (plus --rust-args), a fresh process too.
Both are fresh processes each round (load, optional untimed warm-up, timed runs),
so their peak RSS is their own and only one model is in memory at a time.
Threads: torch.set_num_threads(--threads) and OMP/MKL_NUM_THREADS for the
official child; RAYON_NUM_THREADS / CANDLE_NUM_THREADS for ours.

Stages (names and boundaries of examples/bench.rs and bench_torch.py). The
official forward runs unchanged, as one call `model(lq, visual_embedding)`;
its stage boundaries are taken from forward hooks (timestamps only):
  cave        uint8 -> lq_raw in [0,1], lq = 2 lq_raw - 1, cave.get_visual_embedding(lq_raw)
              (outside the model, as in the test script), plus the time inside
              model.proj (a forward pre-/post-hook on proj)
  vae_encode  from the model call to proj's start: vae.encode(lq).latent_dist.sample()
              * scaling_factor (the official code samples the posterior; ours
              takes its mean)
  unet        from proj's end to vae.post_quant_conv's start: the fp16 cast of
              the embedding, the UNet (tiled above 96x96 latents, as the official
              code), DDPMScheduler.step, / scaling_factor
  vae_decode  from post_quant_conv's start to the model's return: post_quant_conv,
              the decoder (VAEHook, tiled above 224 latent px), clamp
  color_fix   ToPILImage(img_E * 0.5 + 0.5) and adain_color_fix(img_E, img_L), as the test script
  output      np.array(img_E)
Differences in what the two sides compute, all small next to the UNet/VAE: our
cave stage also runs CaVE's QF head (the engine computes it; the official test
script does not call it), and ours replicate-pads to 8 px (min 32 / 64), crops,
and takes the posterior mean instead of a sample.

What the official code needed to run on a CPU, fp32 (applied at run time from
this script; the official files are not edited):
  * sys.path: DIR (for `diffusion.`, `cave.`), DIR/diffusion (codiff.py appends
    os.getcwd()/diffusion, so it expects to run from DIR) and DIR/diffusion/my_utils
    (vaehook.py does a bare `import devices`, its sibling file).
  * CUDA -> CPU while CODiff_test(args) is constructed only: CODiff_test.__init__
    calls set_timesteps(1, device="cuda"), proj.to("cuda"), unet/vae.to("cuda"),
    torch.tensor([499], device="cuda") and alphas_cumprod.cuda(); Tensor.to /
    Tensor.cuda / Module.to / Module.cuda / torch.tensor are wrapped to map a
    CUDA device to "cpu" (the counts of redirected calls are printed), and
    torch.load gets map_location="cpu" (an official codiff.pkl saved from GPU
    tensors loads on a CPU-only torch). forward() has no CUDA calls and runs
    unpatched. The test script's `cave.to("cuda")` is left out, and its
    torch.load(cave_path) gets map_location="cpu".
  * fp32: forward() casts the proj output to float16 unconditionally
    (`self.proj(visual_embedding).to(torch.float16)`), which an fp32 UNet cannot
    take (on CPU: RuntimeError "addmm_impl_cpu_" not implemented for 'Half' in
    the cross-attention; a GPU would presumably refuse the mixed dtypes too, so
    the released code runs only in its default fp16). A forward
    pre-hook on the UNet casts encoder_hidden_states back to the UNet's dtype:
    the values are the fp16-rounded ones, exactly what our engine and
    bench_torch.py compute (c.half().float()). With --no-fp16-hook the hook is
    left out (to see the failure).
  * nothing else: the modules are imported from DIR (checked), CODiff_test's own
    merge_and_unload merges the LoRA (peft), and forward(), VAEHook and the
    colour fix run as released. The hooks on proj and post_quant_conv only read
    the clock.
"build" is the model construction (CODiff_test(args) with its LoRA load and
merge, and the CaVE load; imports not counted), like the Rust bench's load time.
Without --warmup each timed run is the first after loading on both sides.
The test image: examples/bench.rs's test card (the same LCG pattern), JPEG
quality 25 and decoded, with Pillow (bench.rs uses the `image` crate, so pixels
differ slightly; the dense fp32 work does not depend on them). The official test
script additionally resizes to a multiple of 8 and uses cv2 for the JPEG; the
size here must be a multiple of 8.

Output: one line per run in the bench format, prefixed "official k:" / "ours k:",
  WxH: total X s (Y s/MP) | cave a, vae_encode b, ... | build B s | peak RSS M MB
then a table: per stage, total, build and peak RSS, the official median, ours
median and ours/official (< 1: ours is faster). Medians are over all timed runs.
"""
import argparse
import contextlib
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ["cave", "vae_encode", "unet", "vae_decode", "color_fix", "output"]
LINE = re.compile(r"^(\d+)x(\d+): total ([0-9.]+) s \([0-9.]+ s/MP\) \| (.*?) \| build ([0-9.]+) s \| peak RSS ([0-9.]+) MB")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="a checkout of github.com/jp-guo/CODiff")
    ap.add_argument("--model-dir", required=True,
                    help="unet/ vae/ scheduler/ codiff.pkl cave.pth (examples/make_random_codiff.py or the real files)")
    ap.add_argument("--rust-bench", default=os.path.join(ROOT, "target", "release", "examples", "bench"),
                    help="the Rust bench binary (examples/bench.rs)")
    ap.add_argument("--size", default="512x512", help="WxH, multiples of 8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1, help="timed runs per process")
    ap.add_argument("--warmup", action="store_true", help="one untimed restore after loading (both sides)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rust-args", default="", help="extra flags for the Rust bench (shell words)")
    ap.add_argument("--precisions", default="f32",
                    help="comma-separated precisions of our side (f32, bf16), each run every round against "
                         "the official fp32")
    ap.add_argument("--only", choices=["official", "ours"], default=None, help="run one side only")
    ap.add_argument("--no-fp16-hook", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def parse_size(s):
    w, h = (int(v) for v in s.lower().split("x"))
    return w, h


# ------------------------------------------------------------------ the image
from test_card import test_image  # noqa: E402  (examples/test_card.py: bench.rs's frame)


# ------------------------------------------------------------------ the official side (child)
@contextlib.contextmanager
def cuda_as_cpu(counts):
    """Map CUDA devices to the CPU in the calls CODiff_test.__init__ makes."""
    import torch

    def cpu(d):
        if isinstance(d, torch.device) and d.type == "cuda":
            return torch.device("cpu")
        if isinstance(d, str) and d.startswith("cuda"):
            return "cpu"
        return d

    def fix(name, args, kwargs):
        new_args = tuple(cpu(a) for a in args)
        new_kwargs = dict(kwargs)
        if "device" in new_kwargs:
            new_kwargs["device"] = cpu(new_kwargs["device"])
        if any(x is not y for x, y in zip(new_args, args)) or new_kwargs.get("device") is not kwargs.get("device"):
            counts[name] = counts.get(name, 0) + 1
        return new_args, new_kwargs

    targets = [(torch.Tensor, "to"), (torch.Tensor, "cuda"), (torch.nn.Module, "to"), (torch.nn.Module, "cuda"),
               (torch, "tensor"), (torch, "load")]
    # what each target holds itself (Tensor.to / .cuda are inherited from the C base class)
    saved = {t: t[0].__dict__.get(t[1]) for t in targets}
    t_to, m_to, t_tensor, t_load = torch.Tensor.to, torch.nn.Module.to, torch.tensor, torch.load

    def tensor_to(self, *a, **k):
        a, k = fix("Tensor.to", a, k)
        return t_to(self, *a, **k)

    def tensor_cuda(self, *a, **k):
        counts["Tensor.cuda"] = counts.get("Tensor.cuda", 0) + 1
        return self

    def module_to(self, *a, **k):
        a, k = fix("Module.to", a, k)
        return m_to(self, *a, **k)

    def module_cuda(self, *a, **k):
        counts["Module.cuda"] = counts.get("Module.cuda", 0) + 1
        return self

    def tensor(*a, **k):
        a, k = fix("torch.tensor", a, k)
        return t_tensor(*a, **k)

    def load(*a, **k):
        if "map_location" not in k and len(a) < 2:
            k["map_location"] = "cpu"
            counts["torch.load"] = counts.get("torch.load", 0) + 1
        return t_load(*a, **k)

    torch.Tensor.to, torch.Tensor.cuda = tensor_to, tensor_cuda
    torch.nn.Module.to, torch.nn.Module.cuda = module_to, module_cuda
    torch.tensor, torch.load = tensor, load
    try:
        yield
    finally:
        for (obj, name), fn in saved.items():
            if fn is None:
                delattr(obj, name)
            else:
                setattr(obj, name, fn)


def official_child(args):
    import numpy as np
    import torch

    w, h = parse_size(args.size)
    torch.set_num_threads(args.threads)
    off = os.path.abspath(args.official)
    for p in (os.path.join(off, "diffusion", "my_utils"), os.path.join(off, "diffusion"), off):
        if p not in sys.path:
            sys.path.insert(0, p)

    import inspect

    from torchvision import transforms

    from cave.cave import CaVE
    from diffusion.codiff import CODiff_test
    from diffusion.my_utils.wavelet_color_fix import adain_color_fix
    for obj in (CaVE, CODiff_test, adain_color_fix):
        if not os.path.abspath(inspect.getfile(obj)).startswith(off + os.sep):
            sys.exit("%s was not imported from %s but from %s" % (obj.__name__, off, inspect.getfile(obj)))

    t0 = time.perf_counter()  # build: the model construction, as the Rust bench's (imports not counted)
    d = os.path.abspath(args.model_dir)
    cave_path = os.path.join(d, "cave.pth")
    # main_test_codiff.py's arguments (its defaults), fp32 and LoRA merged
    margs = argparse.Namespace(
        input_image="", output_dir="", pretrained_model=d, seed=42, process_size=128, align_method="adain",
        codiff_path=os.path.join(d, "codiff.pkl"), cave_path=cave_path, mixed_precision="fp32",
        merge_and_unload_lora=True, vae_decoder_tiled_size=224, vae_encoder_tiled_size=1024,
        latent_tiled_size=96, latent_tiled_overlap=32)
    redirected = {}
    with cuda_as_cpu(redirected):
        model = CODiff_test(margs)
    # main_test_codiff.py's CaVE, without .to("cuda")
    cave = CaVE(in_nc=3, out_nc=3, nc=[64, 128, 256, 512], nb=4, act_mode="BR")
    cave.load_state_dict(torch.load(cave_path, map_location="cpu"), strict=True)
    cave.eval()
    for _, v in cave.named_parameters():
        v.requires_grad = False
    build = time.perf_counter() - t0

    marks = {}

    def mark(name):
        marks[name] = time.perf_counter()

    model.proj.register_forward_pre_hook(lambda m, a: mark("proj_start"))
    model.proj.register_forward_hook(lambda m, a, o: mark("proj_end"))
    model.vae.post_quant_conv.register_forward_pre_hook(lambda m, a: mark("decode_start"))
    if not args.no_fp16_hook:
        def fp32_condition(module, a, k):
            c = k.get("encoder_hidden_states")
            if c is not None and c.dtype != module.dtype:
                k["encoder_hidden_states"] = c.to(module.dtype)
            return a, k
        model.unet.register_forward_pre_hook(fp32_condition, with_kwargs=True)

    n_lora = sum(1 for n, _ in model.named_modules() if "lora_" in n)
    print("model=official:%s (%s) %s, %s, merged (lora modules left %d), unet %s, cuda->cpu redirects %s, "
          "threads=%d, torch %s" % (off, git_head(off), os.path.relpath(inspect.getfile(CODiff_test), off),
                                    os.path.relpath(inspect.getfile(CaVE), off), n_lora, type(model.unet).__module__,
                        ",".join("%s %d" % kv for kv in sorted(redirected.items())) or "none",
                        torch.get_num_threads(), torch.__version__), flush=True)

    img = test_image(w, h)

    def restore():
        """main_test_codiff.py's lines for one image (no resize, JPEG, metrics or save)."""
        times = []
        marks.clear()
        t_start = time.perf_counter()
        img_L = img
        lq_raw = torch.from_numpy(img_L).permute(2, 0, 1).float().div(255.).unsqueeze(0)  # 0, 1
        lq = lq_raw * 2 - 1  # -1, 1
        with torch.no_grad():
            visual_embedding = cave.get_visual_embedding(lq_raw)
            t_call = time.perf_counter()
            img_E = model(lq, visual_embedding)
            t_ret = time.perf_counter()
        img_E = transforms.ToPILImage()(img_E[0].cpu() * 0.5 + 0.5)
        img_E = adain_color_fix(target=img_E, source=img_L)
        t_fix = time.perf_counter()
        out = np.array(img_E)
        t_out = time.perf_counter()
        proj = marks["proj_end"] - marks["proj_start"]
        times.append(("cave", t_call - t_start + proj))
        times.append(("vae_encode", marks["proj_start"] - t_call))
        times.append(("unet", marks["decode_start"] - marks["proj_end"]))
        times.append(("vae_decode", t_ret - marks["decode_start"]))
        times.append(("color_fix", t_fix - t_ret))
        times.append(("output", t_out - t_fix))
        return out, times, t_out - t_start

    if args.warmup:
        restore()
    for _ in range(args.runs):
        out, times, total = restore()
        stages = ", ".join("%s %.3f" % (n, s) for n, s in times)
        print("%dx%d: total %.3f s (%.3f s/MP) | %s | build %.1f s | peak RSS %.0f MB" % (
            w, h, total, total / (w * h) * 1e6, stages, build,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0), flush=True)
    assert out.shape == (h, w, 3)


def git_head(d):
    try:
        return subprocess.run(["git", "-C", d, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "no git"
    except (OSError, subprocess.SubprocessError):
        return "no git"


# ------------------------------------------------------------------ the orchestration (parent)
def parse_lines(out):
    """All result lines of a bench output -> [dict(stages, total, build, rss)]."""
    res = []
    for line in out.splitlines():
        m = LINE.match(line.strip())
        if not m:
            continue
        stages = {}
        for part in m.group(4).split(","):
            name, _, val = part.strip().rpartition(" ")
            stages[name] = float(val)
        res.append({"stages": stages, "total": float(m.group(3)), "build": float(m.group(5)),
                    "rss": float(m.group(6)), "line": line.strip()})
    return res


def run_side(label, cmd, env, timeout, header_seen):
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "timed out after %.0f s" % timeout, "timeout"
    wall = time.perf_counter() - t
    side = label.split()[0]
    for line in out.splitlines():
        if line.startswith("model=") and side not in header_seen:
            header_seen.add(side)
            print("# %s %s" % (side, line), flush=True)
    res = parse_lines(out)
    for r in res:
        print("%s: %s" % (label, r["line"]), flush=True)
    if rc != 0 or not res:
        print("%s: FAILED (exit %s, %.0f s)\n%s" % (label, rc, wall, "\n".join(
            ("  | " + l) for l in (out + "\n" + err).strip().splitlines()[-25:])), flush=True)
    return res


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(official, ours):
    rows = [(s, lambda r, s=s: r["stages"].get(s)) for s in STAGES]
    rows += [("total", lambda r: r["total"]), ("build", lambda r: r["build"]), ("peak RSS MB", lambda r: r["rss"])]
    print()
    print("| stage | official median | ours median | ours / official |")
    print("| --- | ---: | ---: | ---: |")
    for name, get in rows:
        a = median([v for v in map(get, official) if v is not None])
        b = median([v for v in map(get, ours) if v is not None])
        ratio = "%.2f" % (b / a) if a == a and b == b and a > 0 else "-"
        fmt = "%.0f" if name == "peak RSS MB" else "%.3f"
        print("| %s | %s | %s | %s |" % (name, fmt % a, fmt % b, ratio))
    print("\n(seconds; medians over %d official and %d ours timed runs)" % (len(official), len(ours)), flush=True)


def main():
    args = parse_args()
    if args.child:
        return official_child(args)
    if not os.path.isfile(os.path.join(args.official, "diffusion", "codiff.py")):
        sys.exit("--official %s: no diffusion/codiff.py (git clone https://github.com/jp-guo/CODiff)" % args.official)
    w, h = parse_size(args.size)
    if w % 8 or h % 8:
        sys.exit("--size: the official code needs multiples of 8 (its test script resizes to them)")
    env = dict(os.environ)
    n = str(args.threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, RAYON_NUM_THREADS=n, CANDLE_NUM_THREADS=n,
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    child = [sys.executable, os.path.abspath(__file__), "--child", "--official", args.official,
             "--model-dir", args.model_dir, "--size", args.size, "--runs", str(args.runs),
             "--threads", n] + (["--warmup"] if args.warmup else []) + (["--no-fp16-hook"] if args.no_fp16_hook else [])
    precisions = args.precisions.split(",")
    rusts = {p: [args.rust_bench, "--model", "official:" + os.path.abspath(args.model_dir), "--sizes", args.size,
                 "--runs", str(args.runs), "--no-guard", "--precision", p] +
             (["--warmup"] if args.warmup else []) + shlex.split(args.rust_args) for p in precisions}
    if args.only != "official" and not os.access(args.rust_bench, os.X_OK):
        sys.exit("%s: no Rust bench binary (cargo build --release --example bench)" % args.rust_bench)
    print("# %s, %d rounds, threads %d, runs %d%s; official child: %s" % (
        args.size, args.rounds, args.threads, args.runs, ", warm-up" if args.warmup else "", shlex.join(child)))
    for p, rust in rusts.items():
        print("# ours %s: %s" % (p, shlex.join(rust)), flush=True)
    official, ours, seen = [], {p: [] for p in precisions}, set()
    for k in range(1, args.rounds + 1):
        if args.only != "ours":
            official += run_side("official %d" % k, child, env, args.timeout, seen)
        if args.only != "official":
            for p, rust in rusts.items():
                ours[p] += run_side("ours %s %d" % (p, k), rust, env, args.timeout, seen)
    for p in precisions:
        print("\n## ours in %s against the official fp32" % p)
        table(official, ours[p])
    if (args.only != "ours" and not official) or (args.only != "official" and not all(ours.values())):
        sys.exit(1)


if __name__ == "__main__":
    main()
