"""Write a small CaVE parity fixture for the Rust engine's tests.

Given a codiff-cave safetensors model (or, by default, a freshly randomised small
one) and an image, this writes into --out:

  model.safetensors      the model (official key names, float32, eval-mode BN stats)
  input.png              the JPEG-decoded test input (uint8 RGB)
  input.jpg              the JPEG it was decoded from
  reference.safetensors  PyTorch outputs for input.png:
      lq_raw               [1,3,H,W]   input / 255
      cave_embedding       [1,N,c3]    get_visual_embedding (pad to 8, N = floor(Hp/32)*floor(Wp/32))
      qf_pred              [1,1]       pred_qf (pad to 8), q in (0,1), QF = 100 * (1 - q)
      cave_reconstruction  [1,3,H,W]   forward (pad to 32, crop back), not clamped
      cave_reconstruction_qf [1,1]     q from forward's own (32-padded) encoder pass
      cave_reconstruction_q20, _q70      with --cond: forward conditioned on QF 20 / 70
                                       (cave_reconstruction is conditioned on the raw
                                       estimate 100 (1 - q); the model has no calibration)
      debug.<module>       encoder intermediates during get_visual_embedding
  manifest.json          what the files are and how they were made

The default input size (66x94) is deliberately not a multiple of 8 or 32, so the
fixture exercises both padding rules; the random model uses distinct widths per
stage and randomised BatchNorm statistics so layout or BN mistakes show up.

    python3 examples/export_reference.py --out tests/fixtures/compact
    python3 examples/export_reference.py --cond 8 --out tests/fixtures/compact-cond
    python3 examples/export_reference.py --model runs/cave/final.safetensors --out target/fx
"""
import argparse
import hashlib
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cave_model import CaVE, build_from_state_dict, export_state_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="codiff-cave safetensors; default: random model (--nc, --nb)")
    ap.add_argument("--nc", default="4,8,12,16", help="widths of the random model")
    ap.add_argument("--nb", type=int, default=2, help="blocks per stage of the random model")
    ap.add_argument("--seed", type=int, default=20260211, help="seed of the random model")
    ap.add_argument("--cond", type=int, default=0,
                    help="random model with quality conditioning of this hidden width (random heads)")
    ap.add_argument("--image", default=os.path.join(ROOT, "tests", "fixtures", "codiff-tiny-a", "gt.png"),
                    help="clean source image (default: the astronaut crop of the official fixture, "
                         "tests/fixtures/codiff-tiny-a/gt.png)")
    ap.add_argument("--crop", default="0,20,66,94", help="y,x,h,w of the crop taken from --image")
    ap.add_argument("--quality", type=int, default=20, help="JPEG quality of the test input")
    ap.add_argument("--out", default="tests/fixtures/compact", help="output folder")
    return ap.parse_args()


def random_model(nc, nb, seed, cond=0):
    torch.manual_seed(seed)
    model = CaVE(nc=nc, nb=nb, cond=cond)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
        # conditioning heads start at zero in training; random here so gamma and
        # beta differ per channel and per quality
        for name, p in model.named_parameters():
            if name.startswith(("to_gamma_", "to_beta_")):
                p.copy_((3.0 if name.endswith("weight") else 1.0) * torch.randn(p.shape, generator=g))
    return model.eval()


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def main():
    args = parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    if args.model:
        sd = load_file(args.model)
        model = build_from_state_dict(sd)
        source = "trained model %s" % args.model
    else:
        model = random_model([int(c) for c in args.nc.split(",")], args.nb, args.seed, args.cond)
        source = "random init (torch defaults, seed %d) with randomised BN affine/running stats" % args.seed
    model.eval()
    sd = export_state_dict(model)
    model_path = os.path.join(args.out, "model.safetensors")
    save_file(sd, model_path, metadata={
        "format": "codiff-cave", "nc": ",".join(map(str, model.nc)), "nb": str(model.nb), "cond": str(model.cond)})

    # Test input: crop of the clean image, JPEG (4:2:0) round trip through Pillow.
    y, x, h, w = (int(v) for v in args.crop.split(","))
    clean = np.asarray(Image.open(args.image).convert("RGB"))[y:y + h, x:x + w]
    assert clean.shape[:2] == (h, w), "crop %s outside the image" % args.crop
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(clean)).save(buf, format="JPEG", quality=args.quality, subsampling=2)
    with open(os.path.join(args.out, "input.jpg"), "wb") as f:
        f.write(buf.getvalue())
    lq_u8 = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    Image.fromarray(lq_u8).save(os.path.join(args.out, "input.png"))
    # Read the PNG back so the tensors are exactly what a test decoding input.png sees.
    lq_u8 = np.asarray(Image.open(os.path.join(args.out, "input.png")).convert("RGB"))
    lq = torch.from_numpy(lq_u8.copy()).permute(2, 0, 1)[None].float() / 255.0

    out = {"lq_raw": lq}
    hooks = []
    for name in ("m_head", "m_down1", "m_down2", "m_down3", "m_body_encoder"):
        hooks.append(getattr(model, name).register_forward_hook(
            lambda mod, inp, o, name=name: out.__setitem__("debug." + name, o.detach().clone())))
    with torch.no_grad():
        out["cave_embedding"] = model.get_visual_embedding(lq)
        for hk in hooks:
            hk.remove()
        out["qf_pred"] = model.pred_qf(lq)
        rec, q = model(lq)
        out["cave_reconstruction"] = rec
        out["cave_reconstruction_qf"] = q
        if model.cond:
            for qf in (20, 70):
                out["cave_reconstruction_q%d" % qf] = model(lq, qf=torch.tensor([float(qf)]))[0]
    out = {k: v.contiguous() for k, v in out.items()}
    ref_path = os.path.join(args.out, "reference.safetensors")
    save_file(out, ref_path, metadata={"format": "codiff-cave-reference"})

    manifest = {
        "generator": "examples/export_reference.py (PyTorch %s, CPU, float32)" % torch.__version__,
        "model": {"source": source, "nc": model.nc, "nb": model.nb, "cond": model.cond,
                  "num_params": int(sum(v.numel() for k, v in sd.items()
                                        if "running_" not in k))},
        "input": {"image": os.path.basename(args.image), "crop_yxhw": [y, x, h, w],
                  "jpeg_quality": args.quality, "chroma_subsampling": "4:2:0 (Pillow subsampling=2)"},
        "padding": {
            "cave_embedding": "replicate bottom/right to multiples of 8 -> %dx%d, tokens %d" % (
                -(-h // 8) * 8, -(-w // 8) * 8, out["cave_embedding"].shape[1]),
            "qf_pred": "same 8-padded encoder pass as cave_embedding",
            "cave_reconstruction": "replicate bottom/right to multiples of 32 -> %dx%d, output cropped to %dx%d" % (
                -(-h // 32) * 32, -(-w // 32) * 32, h, w),
        },
        "tensors": {k: {"shape": list(v.shape), "min": float(v.min()), "max": float(v.max()),
                        "mean": float(v.mean())} for k, v in out.items()},
        "files": {f: {"bytes": os.path.getsize(os.path.join(args.out, f)),
                      "sha256": sha256(os.path.join(args.out, f))}
                  for f in ("model.safetensors", "input.png", "input.jpg", "reference.safetensors")},
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(v["bytes"] for v in manifest["files"].values())
    print("wrote %s (%d bytes in all); embedding %s, qf_pred %.6f, reconstruction %s" % (
        args.out, total, tuple(out["cave_embedding"].shape), out["qf_pred"].item(),
        tuple(out["cave_reconstruction"].shape)))


if __name__ == "__main__":
    main()
