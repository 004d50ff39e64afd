"""Write a full-size, random-weight CODiff in the official file formats.

    python3 examples/make_random_codiff.py target/codiff-random [--seed 0] [--lora-rank 16]

Layout of OUT_DIR (about 3.6 GB, so keep it under /tmp):

  unet/        diffusers UNet2DConditionModel with SD-2.1-base's config
               (block_out_channels [320,640,1280,1280], attention_head_dim
               [5,10,20,20], cross_attention_dim 1024, use_linear_projection,
               epsilon), save_pretrained(safe_serialization=True)
  vae/         AutoencoderKL [128,256,512,512], 4 latent channels (new
               to_q/to_k/to_v/to_out.0 attention names, as diffusers writes them)
  scheduler/scheduler_config.json   SD-2.1-base's (scaled_linear 0.00085..0.012,
               1000 steps, epsilon)
  cave.pth     CaVE nc [64,128,256,512] nb 4 state_dict, torch.save legacy
               (non-zip) format, as the official file; BatchNorm running stats
               mildly randomised so that BN folding is exercised
  codiff.pkl   torch.save (zip) dict as the official checkpoint:
               vae_lora_encoder_modules, unet_lora_{encoder,decoder,others}_modules,
               rank_unet, rank_vae, state_dict_unet, state_dict_vae, proj
  manifest.json  what was made and how

The LoRA module lists are built exactly as the official training code does
(OSEDiff-style `initialize_unet` / `initialize_vae` name greps, so the VAE list
has duplicates), and every listed module gets a real LoRA pair with peft's key
form `<module>.lora_A.<adapter>.weight` / `.lora_B.` (UNet adapters
default_encoder / default_decoder / default_others, VAE default_encoder).
A ~ N(0, 1/r) as peft's "gaussian" init; B ~ N(0, --lora-b-std) instead of
peft's zeros, so that a merge actually changes the weights. state_dict_unet also
holds the fine-tuned `conv_in.base_layer.{weight,bias}` (base conv_in + noise).
peft is not needed.

Base weights use diffusers' default initialisation after torch.manual_seed(seed);
the outputs are meaningless pictures, but every layer is full-size, so timings and
memory are those of the real model.
"""
import argparse
import json
import os
import sys
import time

import safetensors.torch  # noqa: F401  (diffusers 0.25's save_pretrained needs it imported)
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cave_model import CaVE  # noqa: E402

UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", default="target/codiff-random", help="output folder (default target/codiff-random)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-rank", type=int, default=16, help="rank of the UNet and VAE LoRA (released model: 16)")
    ap.add_argument("--lora-b-std", type=float, default=1e-2, help="std of the random LoRA B matrices")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return ap.parse_args()


# ------------------------------------------------------------ official module lists
def unet_lora_modules(unet):
    """The official (OSEDiff-style) initialize_unet greps."""
    enc, dec, oth = [], [], []
    grep = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
            "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in grep:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                enc.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                dec.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                oth.append(n.replace(".weight", ""))
                break
    return enc, dec, oth


def vae_lora_modules(vae):
    """The official initialize_vae grep (no break: the list has duplicates)."""
    enc = []
    grep = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in grep:
            if pattern in n and ("encoder" in n):
                enc.append(n.replace(".weight", ""))
            elif ("quant_conv" in n) and ("post_quant_conv" not in n):
                enc.append(n.replace(".weight", ""))
    return enc


def lora_pair(module, rank, b_std, gen):
    """(A, B) in peft's layout for a Linear or Conv2d `module`."""
    if isinstance(module, nn.Linear):
        a_shape = (rank, module.in_features)
        b_shape = (module.out_features, rank)
    elif isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        a_shape = (rank, module.in_channels // module.groups, kh, kw)
        b_shape = (module.out_channels, rank, 1, 1)
    else:
        raise TypeError("LoRA on %s is not supported" % type(module).__name__)
    a = torch.randn(a_shape, generator=gen) * (1.0 / rank)
    b = torch.randn(b_shape, generator=gen) * b_std
    return a.contiguous(), b.contiguous()


def lora_state_dict(model, groups, rank, b_std, gen):
    """groups: [(adapter, [module names])] -> peft-style state dict."""
    sd = {}
    for adapter, names in groups:
        for name in dict.fromkeys(names):  # de-duplicated, order kept
            a, b = lora_pair(model.get_submodule(name), rank, b_std, gen)
            sd["%s.lora_A.%s.weight" % (name, adapter)] = a
            sd["%s.lora_B.%s.weight" % (name, adapter)] = b
    return sd


def dir_size(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()

    # ---- VAE
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    vae_modules = vae_lora_modules(vae)
    sd_vae = lora_state_dict(vae, [("default_encoder", vae_modules)], args.lora_rank, args.lora_b_std, gen)
    n_vae_params = sum(p.numel() for p in vae.parameters())
    del vae
    print("vae: %d params, %d LoRA modules (%d listed), %.0f s" % (
        n_vae_params, len(sd_vae) // 2, len(vae_modules), time.time() - t0), flush=True)

    # ---- UNet
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    enc, dec, oth = unet_lora_modules(unet)
    sd_unet = lora_state_dict(unet, [("default_encoder", enc), ("default_decoder", dec), ("default_others", oth)],
                              args.lora_rank, args.lora_b_std, gen)
    # fine-tuned conv_in (the official state_dict_unet keeps conv_in.base_layer)
    w = unet.conv_in.weight.detach()
    sd_unet["conv_in.base_layer.weight"] = (w + torch.randn(w.shape, generator=gen) * w.std() * 0.1).contiguous()
    b = unet.conv_in.bias.detach()
    sd_unet["conv_in.base_layer.bias"] = (b + torch.randn(b.shape, generator=gen) * 0.01).contiguous()
    n_unet_params = sum(p.numel() for p in unet.parameters())
    del unet
    print("unet: %d params, %d+%d+%d LoRA modules, %.0f s" % (
        n_unet_params, len(enc), len(dec), len(oth), time.time() - t0), flush=True)

    # ---- scheduler
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)

    # ---- CaVE (legacy torch.save format, as the official cave.pth)
    cave = CaVE(nc=[64, 128, 256, 512], nb=4).eval()
    with torch.no_grad():
        for m in cave.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.05)
                m.running_var.copy_(1.0 + torch.rand(m.running_var.shape, generator=gen) * 0.5)
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=gen) * 0.05)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
    torch.save(cave.state_dict(), os.path.join(out, "cave.pth"), _use_new_zipfile_serialization=False)

    # ---- codiff.pkl
    proj = nn.Linear(512, 1024)
    ckpt = {
        "vae_lora_encoder_modules": vae_modules,
        "unet_lora_encoder_modules": enc,
        "unet_lora_decoder_modules": dec,
        "unet_lora_others_modules": oth,
        "rank_unet": args.lora_rank,
        "rank_vae": args.lora_rank,
        "state_dict_unet": sd_unet,
        "state_dict_vae": sd_vae,
        "proj": {"weight": proj.weight.detach().clone().contiguous(), "bias": proj.bias.detach().clone().contiguous()},
    }
    torch.save(ckpt, os.path.join(out, "codiff.pkl"))

    manifest = {
        "made_by": "examples/make_random_codiff.py",
        "seed": args.seed,
        "lora_rank": args.lora_rank,
        "lora_b_std": args.lora_b_std,
        "unet_params": n_unet_params,
        "vae_params": n_vae_params,
        "unet_lora_modules": {"encoder": len(enc), "decoder": len(dec), "others": len(oth)},
        "vae_lora_modules": len(sd_vae) // 2,
        "unet_config": UNET_CONFIG,
        "vae_config": VAE_CONFIG,
        "cave": {"nc": [64, 128, 256, 512], "nb": 4, "format": "torch.save legacy (non-zip)"},
        "torch": torch.__version__,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print("wrote %s (%.2f GB) in %.0f s" % (out, dir_size(out) / 1e9, time.time() - t0))


if __name__ == "__main__":
    main()
