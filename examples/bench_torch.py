"""The CODiff one-step pipeline in PyTorch (fp32, CPU), timed per stage like
examples/bench.rs, on the same official-format files.

    python3 examples/bench_torch.py --model-dir target/codiff-random --size 512x512 --runs 1 --threads 2

DIR is what examples/make_random_codiff.py writes (or the real files): unet/ and
vae/ (diffusers folders), scheduler/scheduler_config.json, codiff.pkl, and
cave.pth or cave.safetensors.

Loading (not timed): UNet and VAE are built from their config.json on the meta
device and given the safetensors tensors (no random init, no second copy: diffusers
0.25's from_pretrained without `accelerate` would hold two); codiff.pkl's LoRA is
merged into the weights, W += (8 / rank) * B @ A (convs: B[:,:,0,0] @ A flattened
over the kernel), and conv_in is replaced by `conv_in.base_layer` if present; CaVE
from examples/cave_model.py; proj = Linear(512, 1024) from codiff.pkl.

Timed stages, same names and boundaries as the Rust engine (src/engine/pipeline.rs):
  cave        uint8 -> [0,1] tensor, CaVE embedding (replicate pad to 8, min 32)
              and its QF head (the engine computes both), proj, fp16 rounding of c
  vae_encode  lq = 2x - 1 (replicate pad to 8, min 64), posterior mean * scaling_factor
  unet        eps = unet(z, t = 499, c), then the x0 step
  vae_decode  decode(z0 / scaling_factor), clamp [-1,1], crop
  color_fix   to [0,1], 8-bit truncation, AdaIN against the input
  output      back to uint8 HWC (rounded)
All under torch.inference_mode with torch.set_num_threads(--threads); diffusers'
default attention processor (SDPA). The test image is the same deterministic
frame as bench.rs (examples/test_card.py).

One line per timed run, in the Rust bench's format:
  WxH: total X s (Y s/MP) | cave a, vae_encode b, unet c, vae_decode d, color_fix e, output f | build B s | peak RSS M MB
peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss (the process's high-water
mark, loading included, like VmHWM in the Rust bench).

Only the untiled path is implemented: the reference tiles latents when the latent
is larger than 96x96 (images over 768 px on a side), so sizes up to 768x768 match
the reference's computation (256x256 and 512x512 are untiled there too). Larger
sizes are refused. Run the Rust side with its default --latent-tile 96 (no tiling
at these sizes) or --latent-tile 0.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cave_model import build_from_state_dict, load_state_dict_file  # noqa: E402

TIMESTEP = 499
LORA_ALPHA = 8.0
MAX_UNTILED = 96 * 8


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--size", default="512x512", help="WxH")
    ap.add_argument("--runs", type=int, default=1, help="timed runs")
    ap.add_argument("--warmup", action="store_true", help="one untimed run first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="", help="write PREFIX_input.png and PREFIX_output.png (last run) for a "
                    "parity check against `restore PREFIX_input.png out.png`")
    return ap.parse_args()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


from test_card import test_image  # noqa: E402,F811  (examples/test_card.py: bench.rs's frame)


# ------------------------------------------------------------------ loading
def _load_component(cls, folder):
    from safetensors.torch import load_file
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(path):  # older downloads: .bin
        return cls.from_pretrained(folder).eval()
    sd = load_file(path)
    # SD-2.1-base's VAE file keeps the old attention names
    ren = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    for k in list(sd):
        for old, new in ren.items():
            if old in k and "attentions" in k:
                t = sd.pop(k)
                if t.dim() == 4:  # very old conv-shaped linear weights
                    t = t[:, :, 0, 0]
                sd[k.replace(old, new)] = t
                break
    try:
        with torch.device("meta"):
            model = cls.from_config(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    except Exception as e:  # noqa: BLE001
        print("meta-device load failed (%s); loading with from_pretrained" % e, file=sys.stderr)
        model = cls.from_pretrained(folder)
    return model.eval()


def merge_lora(model, sd, rank, what):
    """Merge peft-style LoRA pairs of `sd` into `model`; returns the count."""
    scale = LORA_ALPHA / rank
    pairs = {}
    for k, v in sd.items():
        if ".lora_A." in k:
            pairs.setdefault(k.split(".lora_A.")[0], [None, None])[0] = v
        elif ".lora_B." in k:
            pairs.setdefault(k.split(".lora_B.")[0], [None, None])[1] = v
    with torch.no_grad():
        for k, v in sd.items():
            if ".base_layer." in k:
                module, param = k.split(".base_layer.")
                getattr(model.get_submodule(module), param).copy_(v)
        for module, (a, b) in pairs.items():
            if a is None or b is None:
                raise KeyError("%s: %s has only one of lora_A / lora_B" % (what, module))
            w = model.get_submodule(module).weight
            delta = b.reshape(b.shape[0], -1).float() @ a.reshape(a.shape[0], -1).float()
            w.add_(delta.reshape(w.shape), alpha=scale)
    return len(pairs)


def alpha_bar(sched_path, t):
    cfg = {}
    if os.path.exists(sched_path):
        with open(sched_path) as f:
            cfg = json.load(f)
    b0, b1 = cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012)
    n = cfg.get("num_train_timesteps", 1000)
    if cfg.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    return float(torch.cumprod(1.0 - betas, 0)[t])


class Pipeline:
    def __init__(self, d):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        ckpt = torch.load(os.path.join(d, "codiff.pkl"), map_location="cpu", weights_only=False)
        cave_path = next(p for p in (os.path.join(d, "cave.pth"), os.path.join(d, "cave.safetensors"))
                         if os.path.exists(p))
        self.cave = build_from_state_dict(load_state_dict_file(cave_path))
        self.vae = _load_component(AutoencoderKL, os.path.join(d, "vae"))
        self.unet = _load_component(UNet2DConditionModel, os.path.join(d, "unet"))
        self.n_lora_vae = merge_lora(self.vae, ckpt["state_dict_vae"], ckpt["rank_vae"], "state_dict_vae")
        self.n_lora_unet = merge_lora(self.unet, ckpt["state_dict_unet"], ckpt["rank_unet"], "state_dict_unet")
        p = ckpt["proj"]
        self.proj = torch.nn.Linear(p["weight"].shape[1], p["weight"].shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(p["weight"])
            self.proj.bias.copy_(p["bias"])
        self.proj.eval()
        del ckpt
        self.sf = float(self.vae.config.scaling_factor)
        self.a = alpha_bar(os.path.join(d, "scheduler", "scheduler_config.json"), TIMESTEP)

    @staticmethod
    def pad_to_min(x, m, mn):
        h, w = x.shape[-2:]
        ph = math.ceil(max(h, mn) / m) * m - h
        pw = math.ceil(max(w, mn) / m) * m - w
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x

    @staticmethod
    def adain(x, src):
        def ms(t):
            f = t.flatten(2)
            return f.mean(-1)[..., None, None], (f.var(-1, unbiased=True) + 1e-5).sqrt()[..., None, None]
        mx, sx = ms(x)
        mc, scs = ms(src)
        return ((x - mx) / sx * scs + mc).clamp(0, 1)

    def run(self, img):
        """img: uint8 [H,W,3] -> (uint8 [H,W,3], [(stage, seconds)])."""
        times = []
        t = time.perf_counter()

        def lap(name):
            nonlocal t
            now = time.perf_counter()
            times.append((name, now - t))
            t = now

        h, w = img.shape[:2]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
        # 1. CaVE tokens (+ QF head) -> proj -> f16 rounding
        feat = self.cave.encode(self.pad_to_min(x, 8, 32))[-1]
        _q = self.cave.qf_pred(feat)
        tokens = feat.flatten(2).transpose(1, 2)
        c = self.proj(tokens).half().float()
        lap("cave")
        # 2. VAE posterior mean
        lq = self.pad_to_min(x, 8, 64) * 2.0 - 1.0
        z = self.vae.encode(lq).latent_dist.mean * self.sf
        lap("vae_encode")
        # 3. UNet at t = 499 and the x0 step
        eps = self.unet(z, TIMESTEP, encoder_hidden_states=c).sample
        z0 = (z - math.sqrt(1 - self.a) * eps) / math.sqrt(self.a)
        lap("unet")
        # 4. decode
        dec = self.vae.decode(z0 / self.sf).sample.clamp(-1, 1)[..., :h, :w]
        lap("vae_decode")
        # 5. colour fix (AdaIN) on the 8-bit-truncated result
        y = ((dec + 1) * 0.5).clamp(0, 1)
        y = self.adain((y * 255).floor() / 255, x)
        lap("color_fix")
        out = (y[0] * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        lap("output")
        return out, times


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    if max(w, h) > MAX_UNTILED:
        sys.exit("%dx%d: the reference tiles latents above %d px on a side; only the untiled path is implemented"
                 % (w, h, MAX_UNTILED))
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe = Pipeline(args.model_dir)
    build = time.perf_counter() - t0
    print("model=torch:%s lora unet %d vae %d threads=%d torch %s" % (
        args.model_dir, pipe.n_lora_unet, pipe.n_lora_vae, torch.get_num_threads(), torch.__version__), flush=True)
    img = test_image(w, h)
    with torch.inference_mode():
        if args.warmup:
            pipe.run(img)
        for _ in range(args.runs):
            t = time.perf_counter()
            out, times = pipe.run(img)
            total = time.perf_counter() - t
            stages = ", ".join("%s %.3f" % (n, s) for n, s in times)
            print("%dx%d: total %.3f s (%.3f s/MP) | %s | build %.1f s | peak RSS %.0f MB" % (
                w, h, total, total / (w * h) * 1e6, stages, build, peak_rss_mb()), flush=True)
    if args.save and args.runs > 0:
        from PIL import Image
        Image.fromarray(img).save(args.save + "_input.png")
        Image.fromarray(out).save(args.save + "_output.png")


if __name__ == "__main__":
    main()
