"""Train (or export) codiff's compact CaVE model.

The model is the FBCNN-style CaVE of CODiff (see examples/cave_model.py) with a
small width; its state_dict keys are the official ones. Training follows the
CaVE recipe of the paper: clean crops are JPEG-compressed on the fly with
Pillow's libjpeg at a random quality in [--qf-min, --qf-max] (--qf-low-frac of
them in [--qf-min, --qf-low-max]) with 4:2:0 chroma subsampling (--chroma for a
mix of layouts), and the loss is

    L1(reconstruction, clean) + --qf-weight * L1(q, (100 - QF) / 100)
        [+ --ssim-weight * (1 - SSIM of the luma)]
        [L1 -> each crop's RMSE with --pixel-loss rmse]
        [+ --edge-weight * L1 of the error's steps across the 8x8 block edges]

With --cond N the model is quality-conditioned (see cave_model.py): its decoder
is told the crop's true quality, jittered by up to +-(--cond-jitter) so that it
tolerates the estimate's error at inference. --init from an unconditioned model
adds the conditioning exactly (zero heads: the same output at step 0).

Optimiser: Adam(lr=--lr, betas 0.9/0.999), linear warm-up for --warmup steps,
then cosine decay to --lr * --lr-final-ratio at --steps. BatchNorm runs in
train mode during training; export switches to eval mode (running stats),
after optionally re-estimating them over --bn-recalib fresh batches.

Checkpoints (model + optimiser + step + RNG states) go to <--out>/last.pt every
--ckpt-minutes and at the end; a new run with the same --out resumes from it
automatically. When the run reaches --steps it exports <--out>/final.safetensors.

On a GPU machine add e.g. --device cuda --workers 8 --batch 64 (JPEG batches
are made by DataLoader worker processes).

Train:   nice -n 10 python3 examples/train_cave.py --out runs/cave --steps 20000
Resume:  the same command again.
Export:  python3 examples/train_cave.py --out runs/cave --export model.safetensors
"""
import argparse
import io
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cave_model import (COND_PREFIXES, CaVE, build_from_state_dict, export_state_dict,  # noqa: E402
                        infer_config, load_state_dict_file)
from evaluate import CHROMA  # noqa: E402  (chroma layout name -> Pillow's subsampling)

IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Photos of examples/get_images.py: $CODIFF_DATA, else data/ in the repository.
DATA = os.environ.get("CODIFF_DATA", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-dir", default=os.path.join(DATA, "train"),
                    help="clean training photos (default $CODIFF_DATA/train or data/train; made by examples/get_images.py)")
    ap.add_argument("--eval-dir", default=os.path.join(DATA, "eval"),
                    help="held-out photos, only for the PSNR printed at checkpoints ('' to skip)")
    ap.add_argument("--out", default="runs/cave", help="run directory (checkpoints, final export)")
    ap.add_argument("--nc", default="8,16,64,64", help="channel widths c0,c1,c2,c3")
    ap.add_argument("--nb", type=int, default=2, help="residual blocks per stage (>= 2 keeps official key names)")
    ap.add_argument("--cond", type=int, default=0,
                    help="quality conditioning: hidden width of the QF embedding (0: none)")
    ap.add_argument("--cond-jitter", type=float, default=3.0,
                    help="with --cond: the conditioning quality is the true one +- up to this")
    ap.add_argument("--cond-lr-mult", type=float, default=10.0,
                    help="with --cond: the conditioning's learning rate is --lr times this "
                         "(it starts from zero heads, the rest from a trained model)")
    ap.add_argument("--batch", type=int, default=16, help="crops per step")
    ap.add_argument("--crop-min", type=int, default=96, help="smallest crop side (multiple of 8)")
    ap.add_argument("--crop-max", type=int, default=128, help="largest crop side (multiple of 8)")
    ap.add_argument("--qf-min", type=int, default=8, help="lowest JPEG quality")
    ap.add_argument("--qf-max", type=int, default=95, help="highest JPEG quality")
    ap.add_argument("--qf-low-frac", type=float, default=0.0,
                    help="fraction of crops whose quality is drawn from [--qf-min, --qf-low-max] instead of "
                         "the whole range (more of the heavy compression where the model is weakest)")
    ap.add_argument("--chroma", default="420",
                    help="JPEG chroma layouts, a comma list of 420, 422, 444 drawn uniformly per crop "
                         "(repeat one to weigh it: 420,420,422,444)")
    ap.add_argument("--qf-low-max", type=int, default=25, help="top of the --qf-low-frac range")
    ap.add_argument("--qf-weight", type=float, default=1e-3, help="weight of the QF L1 loss")
    ap.add_argument("--pixel-loss", choices=("l1", "rmse"), default="l1",
                    help="reconstruction loss: L1 (the paper's) or each crop's RMSE (MSE's gradient, "
                         "what PSNR scores, on L1's scale)")
    ap.add_argument("--ssim-weight", type=float, default=0.0,
                    help="weight of 1 - SSIM of the luma (the evaluation's SSIM-Y)")
    ap.add_argument("--edge-weight", type=float, default=0.0,
                    help="weight of the block-edge loss: L1 of the error's steps across the 8x8 JPEG grid "
                         "(what PSNR-B's blocking term measures)")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak Adam learning rate")
    ap.add_argument("--lr-final-ratio", type=float, default=0.05, help="final lr = lr * this")
    ap.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    ap.add_argument("--steps", type=int, default=20000, help="total optimiser steps (cosine horizon)")
    ap.add_argument("--no-identity-init", action="store_true",
                    help="plain random init (default: start the reconstruction near identity)")
    ap.add_argument("--bn-momentum", type=float, default=0.1, help="BatchNorm running-stat momentum")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader processes making JPEG batches (0: in the training loop; "
                         "with workers the data order is not reproduced exactly on resume)")
    ap.add_argument("--no-channels-last", action="store_true",
                    help="train in NCHW (channels_last is ~15%% faster on CPU)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--stop-at", default="",
                    help="UTC wall-clock time (e.g. 2026-11-26T12:50) at which to checkpoint, export "
                         "<--out>/final.safetensors and exit even if --steps is not reached")
    ap.add_argument("--init", default="", help="start from this checkpoint/safetensors instead of scratch")
    ap.add_argument("--export", default="", metavar="OUT.safetensors",
                    help="do not train: export <--out>/last.pt (or --ckpt) in eval mode and exit")
    ap.add_argument("--ckpt", default="", help="checkpoint to export (default <--out>/last.pt); an "
                    "exported .safetensors is re-exported with a freshly fitted QF calibration "
                    "(use --bn-recalib 0 to keep its BatchNorm statistics)")
    ap.add_argument("--bn-recalib", type=int, default=0,
                    help="at export, re-estimate BN running stats over this many training batches")
    ap.add_argument("--qf-calib-size", type=int, default=512,
                    help="at export, fit the QF calibration on centre crops of at most this side of "
                         "every training photo (0: no calibration)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- data
def load_images(folder):
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMG_EXT))
    imgs = []
    for p in paths:
        im = np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8)
        imgs.append(np.ascontiguousarray(im))
    return paths, imgs


def jpeg_roundtrip(rgb_u8, quality, subsampling=2):
    buf = io.BytesIO()
    Image.fromarray(rgb_u8).save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


class CropSampler:
    """Random crops from in-memory uint8 images, JPEG-compressed on the fly."""

    def __init__(self, imgs, args, rng):
        self.imgs = [im for im in imgs if min(im.shape[:2]) >= args.crop_max]
        if not self.imgs:
            raise SystemExit("no training image is at least %d px on its short side" % args.crop_max)
        # Sample images proportionally to sqrt(area): big photos give more crops,
        # small ones are not starved.
        w = np.array([math.sqrt(im.shape[0] * im.shape[1]) for im in self.imgs])
        self.p = w / w.sum()
        self.args = args
        self.rng = rng
        self.chroma = args.chroma.split(",")
        if not all(c in CHROMA for c in self.chroma):
            raise SystemExit("--chroma: a comma list of 420, 422, 444")

    def batch(self, n):
        a, rng = self.args, self.rng
        sizes = list(range(a.crop_min, a.crop_max + 1, 8))
        s = int(rng.choice(sizes))
        clean, lq, qfs = [], [], []
        for _ in range(n):
            im = self.imgs[rng.choice(len(self.imgs), p=self.p)]
            y = rng.integers(0, im.shape[0] - s + 1)
            x = rng.integers(0, im.shape[1] - s + 1)
            c = im[y:y + s, x:x + s]
            if rng.random() < 0.5:
                c = c[:, ::-1]
            c = np.rot90(c, int(rng.integers(0, 4)))
            c = np.ascontiguousarray(c)
            top = a.qf_low_max if rng.random() < a.qf_low_frac else a.qf_max
            q = int(rng.integers(a.qf_min, top + 1))
            clean.append(c)
            lq.append(jpeg_roundtrip(c, q, CHROMA[self.chroma[int(rng.integers(len(self.chroma)))]]))
            qfs.append(q)
        to_t = lambda arr: torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float().div_(255.0)
        return to_t(clean), to_t(lq), torch.tensor(qfs, dtype=torch.float32)


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless batches from a CropSampler, one independent RNG per worker."""

    def __init__(self, imgs, args, seed):
        super().__init__()
        self.imgs, self.args, self.seed = imgs, args, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        sampler = CropSampler(self.imgs, self.args, np.random.default_rng([self.seed, wid]))
        while True:
            yield sampler.batch(self.args.batch)


def make_eval_set(folder, size=256, qualities=(10, 30, 50)):
    if not folder or not os.path.isdir(folder):
        return []
    _, imgs = load_images(folder)
    out = []
    for im in imgs:
        h, w = im.shape[:2]
        s = min(size, h, w) // 8 * 8
        y, x = (h - s) // 2, (w - s) // 2
        c = np.ascontiguousarray(im[y:y + s, x:x + s])
        for q in qualities:
            out.append((q, c, jpeg_roundtrip(c, q)))
    return out


def psnr(a, b):
    mse = F.mse_loss(a, b).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(model, evalset):
    """Mean PSNR (input, output) and QF MAE per quality on the held-out crops."""
    if not evalset:
        return ""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    res = {}
    for q, c, l in evalset:
        ct = torch.from_numpy(c.copy()).permute(2, 0, 1)[None].float() / 255
        lt = torch.from_numpy(l.copy()).permute(2, 0, 1)[None].float() / 255
        # a conditioned model is told the true quality here (the Rust engine
        # uses its calibrated estimate, which raw BatchNorm-eval q is not)
        rec, qp = model(lt.to(dev), qf=torch.tensor([float(q)], device=dev) if model.cond else None)
        rec = rec.cpu()
        r = res.setdefault(q, [0.0, 0.0, 0.0, 0])
        r[0] += psnr(lt, ct)
        r[1] += psnr(rec.clamp(0, 1), ct)
        r[2] += abs(100 * (1 - qp.item()) - q)
        r[3] += 1
    model.train(was_training)
    return "  ".join("QF%d psnr %.2f->%.2f qfErr %.1f" % (q, r[0] / r[3], r[1] / r[3], r[2] / r[3])
                     for q, r in sorted(res.items()))


# ---------------------------------------------------------------------------- model
def build_model(args):
    nc = [int(c) for c in args.nc.split(",")]
    model = CaVE(nc=nc, nb=args.nb, bn_momentum=args.bn_momentum, cond=args.cond)
    # Start every residual branch near zero so the untrained net is close to
    # identity-plus-skips (faster, steadier start on CPU budgets).
    for name, mod in model.named_modules():
        if name.endswith(".res"):
            with torch.no_grad():
                mod[3].weight.mul_(0.1)
                mod[3].bias.zero_()
    if not args.no_identity_init:
        # The reconstruction has no global input skip, so a random start spends
        # hundreds of steps learning the identity. Instead: m_head copies RGB into
        # its first 3 channels, the decoder's last upsampling starts at zero (its
        # QFAttention blocks then add about nb * 1.0), and m_tail reads the 3 RGB
        # channels back and subtracts that offset: output ~= input at step 0.
        with torch.no_grad():
            for i in range(3):
                model.m_head.weight[i].zero_()
                model.m_head.weight[i, i, 1, 1] = 1.0
                model.m_head.bias[i] = 0.0
            model.m_up1[0].weight.zero_()
            model.m_up1[0].bias.zero_()
            model.m_tail.weight.zero_()
            for i in range(3):
                model.m_tail.weight[i, i, 1, 1] = 1.0
            model.m_tail.bias.fill_(-float(args.nb))
    return model, nc


def block_edge_loss(rec, clean):
    """Mean |step of (rec - clean)| across the 8x8 grid's block edges, both axes.

    Crops are compressed from their top-left corner, so the JPEG grid starts at
    (0, 0): the steps are between columns 8k - 1 and 8k (and rows likewise). A
    restoration that leaves a blocking step the clean image does not have pays
    for it here, on top of the plain L1.
    """
    d = rec - clean
    gx = d[..., :, 8::8] - d[..., :, 7:-1:8]
    gy = d[..., 8::8, :] - d[..., 7:-1:8, :]
    return gx.abs().mean() + gy.abs().mean()


_SSIM_WIN = {}


def ssim_y(rec, clean):
    """Mean SSIM of each crop's luma (BT.601 weights, Gaussian window 11, sigma 1.5,
    the constants of Wang et al. for a [0, 1] range), as the evaluation's SSIM-Y."""
    w = torch.tensor([0.299, 0.587, 0.114], device=rec.device).view(1, 3, 1, 1)
    x, y = (rec * w).sum(1, keepdim=True), (clean * w).sum(1, keepdim=True)
    key = (rec.device, rec.dtype)
    if key not in _SSIM_WIN:
        g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
        g = (g / g.sum()).to(device=rec.device, dtype=rec.dtype)
        _SSIM_WIN[key] = (g.view(1, 1, 1, 11), g.view(1, 1, 11, 1))
    gh, gv = _SSIM_WIN[key]
    blur = lambda t: F.conv2d(F.conv2d(t, gh), gv)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean()


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    lo = args.lr * args.lr_final_ratio
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * t))


def save_ckpt(path, model, opt, step, rng, args):
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "np_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "args": vars(args),
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_weights(model, path):
    """Load a checkpoint/safetensors into `model`; a narrower model (smaller nc) is
    embedded function-preservingly (see widen_into, which also does the plain load)."""
    widen_into(model, load_state_dict_file(path))


@torch.no_grad()
def widen_into(model, sd):
    """Copy a CaVE of the same nb and each nc[i] <= the model's into `model` so that
    the model computes exactly the same reconstruction and q (with equal widths this is
    a plain strict load).

    Every tensor is copied into the leading slice of the model's. The new channels keep
    their fresh initialisation, except the weights by which a new channel would feed an
    old one, which are zeroed: old channels then see only old channels (BatchNorm is per
    channel, QFAttention's +1 is per channel), so the old function is untouched, while
    those zero weights still get gradients and the new channels start learning at once.
    Weight layout: [out, in, ...] for Conv2d/Linear, [in, out, ...] for ConvTranspose2d
    (the m_up*.0 keys).
    """
    own = model.state_dict()
    # an unconditioned source gains the conditioning, whose zero heads keep its function
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")
               and not k.startswith(COND_PREFIXES)]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise KeyError("weights do not match: missing %s unexpected %s" % (missing, unexpected))
    for k, src in sd.items():
        dst = own[k]
        if src.dim() != dst.dim() or any(a > b for a, b in zip(src.shape, dst.shape)):
            raise ValueError("cannot widen %s: %s into %s" % (k, tuple(src.shape), tuple(dst.shape)))
        if src.dim() == 0:
            dst.copy_(src)
            continue
        lead = tuple(slice(0, n) for n in src.shape)
        if src.dim() >= 2:
            transposed = k.startswith("m_up") and k.split(".")[1] == "0"
            o_ax, i_ax = (1, 0) if transposed else (0, 1)
            cut = [slice(None)] * dst.dim()
            cut[o_ax] = slice(0, src.shape[o_ax])
            cut[i_ax] = slice(src.shape[i_ax], None)
            dst[tuple(cut)] = 0  # new inputs -> old outputs
        dst[lead] = src.to(dst.dtype)
    model.load_state_dict(own)


@torch.no_grad()
def recalibrate_bn(model, sampler, batches, batch_size):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(batches):
        _, lq, _ = sampler.batch(batch_size)
        model(lq.to(next(model.parameters()).device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


CALIB_QUALITIES = (8, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95)


@torch.no_grad()
def fit_qf_calibration(model, imgs, size, qualities=CALIB_QUALITIES):
    """Monotone piecewise-linear map raw estimate -> QF, as a [2, K] tensor.

    The QF head is trained with BatchNorm in batch-statistics mode; in eval mode
    (running statistics) its estimates drift, reading up to ~10 low at high
    qualities. For each trained quality, the knot is the median raw estimate
    over centre crops of the training photos; knots are made increasing, and
    the engine interpolates between them (slope 1 beyond the ends).
    """
    dev = next(model.parameters()).device
    model.eval()
    raw = []
    for q in qualities:
        est = []
        for im in imgs:
            h, w = im.shape[:2]
            s_h, s_w = min(h, size), min(w, size)
            c = np.ascontiguousarray(im[(h - s_h) // 2:(h - s_h) // 2 + s_h, (w - s_w) // 2:(w - s_w) // 2 + s_w])
            lq = torch.from_numpy(jpeg_roundtrip(c, q).copy()).permute(2, 0, 1)[None].float().div_(255.0)
            est.append(100.0 * (1.0 - model.pred_qf(lq.to(dev)).item()))
        raw.append(float(np.median(est)))
    xs = np.maximum.accumulate(np.array(raw))
    xs = xs + 1e-3 * np.arange(len(xs))  # strictly increasing
    print("QF calibration (quality: median raw estimate): " +
          " ".join("%d:%.1f" % (q, r) for q, r in zip(qualities, raw)))
    return torch.tensor(np.stack([xs, np.array(qualities, dtype=np.float64)]), dtype=torch.float32)


def export(args):
    import json
    from safetensors.torch import save_file
    ckpt = args.ckpt or os.path.join(args.out, "last.pt")
    if ckpt.endswith(".safetensors"):
        # an earlier export: keep its weights and metadata, refit the calibration
        from safetensors import safe_open
        with safe_open(ckpt, framework="pt") as f:
            file_meta = f.metadata() or {}
        model = build_from_state_dict(load_state_dict_file(ckpt))
        nc, nb = infer_config(model.state_dict())
        state = {"step": int(file_meta.get("step", 0))}
        run_args = json.loads(file_meta.get("train", "{}"))
    else:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        run_args = state.get("args", {})
        nc = [int(c) for c in run_args.get("nc", args.nc).split(",")]
        nb = int(run_args.get("nb", args.nb))
        model = CaVE(nc=nc, nb=nb, cond=int(run_args.get("cond", 0) or 0))
        model.load_state_dict(state["model"], strict=True)
    model.to(torch.device(args.device))
    # training photos, read once for both BN re-estimation and the QF calibration
    imgs = load_images(args.train_dir)[1] if args.bn_recalib > 0 or args.qf_calib_size > 0 else []
    if args.bn_recalib > 0:
        sampler = CropSampler(imgs, args, np.random.default_rng(args.seed + 7))
        recalibrate_bn(model, sampler, args.bn_recalib, args.batch)
    model.eval()
    sd = export_state_dict(model)
    if args.qf_calib_size > 0:
        sd["qf_calibration"] = fit_qf_calibration(model, imgs, args.qf_calib_size)
    meta = {
        "format": "codiff-cave",
        "nc": ",".join(str(c) for c in nc),
        "nb": str(nb),
        "step": str(state.get("step", 0)),
        "cond": str(model.cond),
        "train": json.dumps({k: run_args.get(k) for k in
                             ("lr", "batch", "crop_min", "crop_max", "qf_min", "qf_max", "qf_low_frac", "qf_low_max", "chroma",
                              "qf_weight", "steps", "cond", "cond_jitter", "edge_weight", "pixel_loss",
                              "ssim_weight")}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.export)), exist_ok=True)
    save_file(sd, args.export, metadata=meta)
    print("exported step %s (%d tensors, %.2f MB) -> %s" % (
        meta["step"], len(sd), sum(v.numel() * 4 for v in sd.values()) / 1e6, args.export))
    print("eval:", evaluate(model, make_eval_set(args.eval_dir)))


# ----------------------------------------------------------------------------- train
def train(args):
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "last.pt")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    device = torch.device(args.device)
    model, nc = build_model(args)
    model.to(device)
    cond = set(id(p) for p in (model.cond_parameters() if args.cond else []))
    groups = [{"params": [p for p in model.parameters() if id(p) not in cond], "lr_mult": 1.0}]
    if cond:
        groups.append({"params": [p for p in model.parameters() if id(p) in cond], "lr_mult": args.cond_lr_mult})
    opt = torch.optim.Adam(groups, lr=args.lr, betas=(0.9, 0.999))
    step = 0
    if os.path.exists(ckpt_path):
        st = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        rng.bit_generator.state = st["np_rng"]
        torch.set_rng_state(st["torch_rng"])
        random.setstate(st["py_rng"])
        print("resumed from %s at step %d" % (ckpt_path, step), flush=True)
    elif args.init:
        load_weights(model, args.init)
        print("initialised from", args.init, flush=True)

    t0 = time.time()
    paths, imgs = load_images(args.train_dir)
    sampler = CropSampler(imgs, args, rng)
    evalset = make_eval_set(args.eval_dir)
    batches = None
    if args.workers > 0:
        stream = _BatchStream(sampler.imgs, args, args.seed * 1000003 + step)
        batches = iter(torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=args.workers, persistent_workers=True,
            prefetch_factor=4, pin_memory=device.type == "cuda"))
    nparam = sum(p.numel() for p in model.parameters())
    print("nc=%s nb=%d params=%d; %d train images (%.1f MP) loaded in %.1fs; eval crops %d" % (
        nc, args.nb, nparam, len(sampler.imgs), sum(i.shape[0] * i.shape[1] for i in imgs) / 1e6,
        time.time() - t0, len(evalset)), flush=True)
    print("args:", vars(args), flush=True)

    fmt = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = model.to(memory_format=fmt)
    for st_ in opt.state.values():  # keep Adam moments in the parameters' layout
        for k, v in st_.items():
            if torch.is_tensor(v) and v.dim() == 4:
                st_[k] = v.contiguous(memory_format=fmt)
    stop_at = None
    if args.stop_at:
        import datetime
        stop_at = datetime.datetime.fromisoformat(args.stop_at).replace(
            tzinfo=datetime.timezone.utc).timestamp()
    model.train()
    last_ckpt = time.time()
    acc = {"loss": 0.0, "l1": 0.0, "qf": 0.0, "n": 0, "imgs": 0, "t": time.time(), "data": 0.0}
    while step < args.steps:
        td = time.time()
        clean, lq, qf = next(batches) if batches is not None else sampler.batch(args.batch)
        clean, lq, qf = (t.to(device, non_blocking=True) for t in (clean, lq, qf))
        acc["data"] += time.time() - td
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args) * g.get("lr_mult", 1.0)
        cond_qf = None
        if args.cond:
            jit = (torch.rand(qf.shape, device=device) * 2 - 1) * args.cond_jitter
            cond_qf = (qf + jit).clamp(1.0, 100.0)
        rec, q = model(lq.contiguous(memory_format=fmt), qf=cond_qf)
        target_q = (100.0 - qf[:, None]) / 100.0
        l1 = F.l1_loss(rec, clean)
        lqf = F.l1_loss(q, target_q)
        if args.pixel_loss == "rmse":
            # each crop's root mean squared error: the MSE's gradient (what PSNR scores),
            # on the scale of L1 so that the other weights keep their meaning
            pix = (rec - clean).pow(2).mean(dim=(1, 2, 3)).add(1e-8).sqrt().mean()
        else:
            pix = l1
        loss = pix + args.qf_weight * lqf
        if args.edge_weight:
            loss = loss + args.edge_weight * block_edge_loss(rec, clean)
        if args.ssim_weight:
            loss = loss + args.ssim_weight * (1.0 - ssim_y(rec, clean))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1

        acc["loss"] += loss.item()
        acc["l1"] += l1.item()
        acc["qf"] += 100.0 * lqf.item()
        acc["n"] += 1
        acc["imgs"] += args.batch
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - acc["t"]
            n = acc["n"]
            print("step %d loss %.5f l1 %.5f qfErr %.2f lr %.2e  %.1f img/s (data %.0f%%)" % (
                step, acc["loss"] / n, acc["l1"] / n, acc["qf"] / n, lr_at(step - 1, args),
                acc["imgs"] / dt, 100 * acc["data"] / dt), flush=True)
            acc = {"loss": 0.0, "l1": 0.0, "qf": 0.0, "n": 0, "imgs": 0, "t": time.time(), "data": 0.0}
        stopping = stop_at is not None and time.time() >= stop_at
        if time.time() - last_ckpt > 60 * args.ckpt_minutes or step == args.steps or stopping:
            save_ckpt(ckpt_path, model, opt, step, rng, args)
            last_ckpt = time.time()
            print("checkpoint step %d -> %s | eval %s" % (step, ckpt_path, evaluate(model, evalset)),
                  flush=True)
            # do not count checkpoint/eval time in img/s
            acc = {"loss": 0.0, "l1": 0.0, "qf": 0.0, "n": 0, "imgs": 0, "t": time.time(), "data": 0.0}
        if stopping:
            print("--stop-at %s reached at step %d" % (args.stop_at, step), flush=True)
            break

    final = os.path.join(args.out, "final.safetensors")
    args.export = final
    args.ckpt = ckpt_path
    export(args)


def main():
    args = parse_args()
    if args.export:
        torch.set_num_threads(args.threads)
        export(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
