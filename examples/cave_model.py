"""PyTorch CaVE (Compression-aware Visual Embedder) for codiff.

An independent re-implementation of the FBCNN-style CaVE network used by CODiff
(arXiv 2502.09873, github.com/jp-guo/CODiff). Its ``state_dict`` uses exactly the
official key names, so official ``cave.pth`` files load with ``strict=True`` and
the models we train load in the Rust engine through the same code path.

Layout (``nc = [c0, c1, c2, c3]``, ``nb`` residual blocks per stage):

  m_head            Conv3x3(3 -> c0)
  m_down1           nb x ResBlock(c0), Conv2x2 stride 2 (c0 -> c1)   key index nb
  m_down2           nb x ResBlock(c1), Conv4x4 stride 4 (c1 -> c2)
  m_down3           nb x ResBlock(c2), Conv4x4 stride 4 (c2 -> c3)
  m_body_encoder    nb x ResBlock(c3)
  qf_pred           nb x ResBlock(c3), avgpool, flatten, Linear(c3,c3), ReLU,
                    Linear(c3,c3), ReLU, Linear(c3,1), Sigmoid
                    (Linear keys at indices nb+2, nb+4, nb+6)
  m_body_decoder    nb x ResBlock(c3)
  m_up3             [ConvTranspose4x4 stride 4 (c3 -> c2), nb x QFAttention(c2)]
  m_up2             [ConvTranspose4x4 stride 4 (c2 -> c1), nb x QFAttention(c1)]
  m_up1             [ConvTranspose2x2 stride 2 (c1 -> c0), nb x QFAttention(c0)]
  m_tail            Conv3x3(c0 -> 3)

ResBlock:    y = x + conv3x3(relu(bn(conv3x3(x))))           keys res.0, res.1, res.3
QFAttention: y = x + gamma * conv3x3(relu(bn(conv3x3(x)))) + beta, and CaVE calls
             it with the constants gamma = beta = 1, i.e. y = x + res(x) + 1.
BatchNorm eps is 1e-4.

Quality conditioning (codiff's compact models only; ``cond > 0``), after FBCNN:
the JPEG quality QF (the true one in training; at inference the model's own
calibrated estimate, or the user's value) enters as c = 1 - QF/100 and

  qf_embed          Linear(1, cond), ReLU, Linear(cond, cond)  (keys .0, .2)
  to_gamma_L.0, to_beta_L.0   Linear(cond, nc[L-1]) for the up stages L = 3, 2, 1

give per-channel gamma = 1 + tanh(to_gamma_L(e)) and beta = 1 + tanh(to_beta_L(e))
for every QFAttention block of m_upL. FBCNN uses sigmoid / tanh; the 1 + tanh
form makes zero-initialised heads reproduce the unconditioned model exactly
(gamma = beta = 1), so a conditioned model starts from a trained one; for the
same reason the embedding ends without a ReLU (a dead output unit would get no
gradient through zero heads), and its first layer starts as hinges
ReLU(c - k) with knots k spread over [0, 1], so that every quality has live
units. Official ``cave.pth`` files have none of these keys.

With nb == 1 the official ``sequential()`` helper collapses one-element
containers, so ``m_body_encoder.0.res.0.weight`` becomes
``m_body_encoder.res.0.weight``; this module reproduces that too.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-4


class ResBlock(nn.Module):
    """x + conv(relu(bn(conv(x)))) with the official child indices 0, 1, 3."""

    def __init__(self, ch, bn_momentum=0.1):
        super().__init__()
        self.res = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=True),
            nn.BatchNorm2d(ch, eps=BN_EPS, momentum=bn_momentum),
            nn.ReLU(),
            nn.Conv2d(ch, ch, 3, 1, 1, bias=True),
        )

    def forward(self, x):
        return x + self.res(x)


class QFAttention(ResBlock):
    """Decoder block; CaVE uses gamma = beta = 1: x + res(x) + 1."""

    def forward(self, x, gamma=1.0, beta=1.0):
        return x + (gamma * self.res(x) + beta)


COND_PREFIXES = ("qf_embed.", "to_gamma_", "to_beta_")


def _stack(blocks):
    # The official helper returns a lone module as is (key-name collapse for nb == 1).
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


class CaVE(nn.Module):
    def __init__(self, nc=(64, 128, 256, 512), nb=4, in_nc=3, out_nc=3, bn_momentum=0.1, cond=0):
        super().__init__()
        nc = [int(c) for c in nc]
        assert len(nc) == 4 and nb >= 1
        self.nc, self.nb, self.cond = nc, nb, int(cond)
        m = bn_momentum

        def blocks(ch, n=nb):
            return [ResBlock(ch, m) for _ in range(n)]

        self.m_head = nn.Conv2d(in_nc, nc[0], 3, 1, 1, bias=True)
        self.m_down1 = nn.Sequential(*blocks(nc[0]), nn.Conv2d(nc[0], nc[1], 2, 2, 0, bias=True))
        self.m_down2 = nn.Sequential(*blocks(nc[1]), nn.Conv2d(nc[1], nc[2], 4, 4, 0, bias=True))
        self.m_down3 = nn.Sequential(*blocks(nc[2]), nn.Conv2d(nc[2], nc[3], 4, 4, 0, bias=True))
        self.m_body_encoder = _stack(blocks(nc[3]))
        self.m_body_decoder = _stack(blocks(nc[3]))

        def up(cin, cout, s):
            return nn.ModuleList(
                [nn.ConvTranspose2d(cin, cout, s, s, 0, bias=True)]
                + [QFAttention(cout, m) for _ in range(nb)])

        self.m_up3 = up(nc[3], nc[2], 4)
        self.m_up2 = up(nc[2], nc[1], 4)
        self.m_up1 = up(nc[1], nc[0], 2)
        self.m_tail = nn.Conv2d(nc[0], out_nc, 3, 1, 1, bias=True)
        self.qf_pred = nn.Sequential(
            *blocks(nc[3]),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(nc[3], nc[3]),
            nn.ReLU(),
            nn.Linear(nc[3], nc[3]),
            nn.ReLU(),
            nn.Linear(nc[3], 1),
            nn.Sigmoid(),
        )
        if self.cond > 0:
            hid = self.cond
            self.qf_embed = nn.Sequential(nn.Linear(1, hid), nn.ReLU(), nn.Linear(hid, hid))
            # to_{gamma,beta}_L for up stage L = 3, 2, 1 (widths nc[2], nc[1], nc[0]),
            # zero-initialised: gamma = beta = 1, the unconditioned model
            for lvl in (3, 2, 1):
                for kind in ("gamma", "beta"):
                    lin = nn.Linear(hid, nc[lvl - 1])
                    nn.init.zeros_(lin.weight)
                    nn.init.zeros_(lin.bias)
                    setattr(self, "to_%s_%d" % (kind, lvl), nn.Sequential(lin))
            self.reset_conditioning()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def pad(x, multiple):
        """Replicate-pad bottom/right so H and W are multiples of `multiple`."""
        h, w = x.shape[-2:]
        pb = (multiple - h % multiple) % multiple
        pr = (multiple - w % multiple) % multiple
        if pb or pr:
            x = F.pad(x, (0, pr, 0, pb), mode="replicate")
        return x

    def encode(self, x):
        x1 = self.m_head(x)
        x2 = self.m_down1(x1)
        x3 = self.m_down2(x2)
        x4 = self.m_down3(x3)
        return x1, x2, x3, x4, self.m_body_encoder(x4)

    @torch.no_grad()
    def reset_conditioning(self):
        """Hinge first layer (knots over [0, 1]), default second layer, zero heads."""
        hid = self.cond
        first = self.qf_embed[0]
        first.weight.fill_(1.0)
        first.bias.copy_(-torch.linspace(0.0, 1.0, hid + 1)[:hid])
        for lvl in (3, 2, 1):
            for kind in ("gamma", "beta"):
                lin = getattr(self, "to_%s_%d" % (kind, lvl))[0]
                lin.weight.zero_()
                lin.bias.zero_()

    def cond_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith(COND_PREFIXES)]

    def modulation(self, qf):
        """qf: [B] qualities 0..100 -> {L: (gamma, beta)}, each [B, nc[L-1], 1, 1]."""
        e = self.qf_embed((1.0 - qf.float() / 100.0)[:, None])
        out = {}
        for lvl in (3, 2, 1):
            g = 1.0 + torch.tanh(getattr(self, "to_gamma_%d" % lvl)(e))
            b = 1.0 + torch.tanh(getattr(self, "to_beta_%d" % lvl)(e))
            out[lvl] = (g[:, :, None, None], b[:, :, None, None])
        return out

    # ----------------------------------------------------------------- official API
    def get_visual_embedding(self, x):
        """[B,3,H,W] in [0,1] -> [B, floor(Hp/32)*floor(Wp/32), nc3] (Hp, Wp: pad to 8)."""
        feat = self.encode(self.pad(x, 8))[-1]
        return feat.flatten(-2, -1).permute(0, 2, 1)

    def pred_qf(self, x):
        """[B,3,H,W] in [0,1] -> q [B,1] in (0,1); estimated QF = 100 * (1 - q)."""
        return self.qf_pred(self.encode(self.pad(x, 8))[-1])

    def forward(self, x, pad_multiple=32, qf=None):
        """Returns (reconstruction [B,3,H,W], q [B,1]).

        The official forward pads to a multiple of 8 and so only works when that is
        also a multiple of 32; padding to 32 gives identical results in that case
        and works for every size. A conditioned model (cond > 0) restores as if the
        JPEG quality were `qf` ([B] tensor, 0..100); None uses the raw estimate
        100 (1 - q) (the Rust engine uses its calibrated estimate instead).
        """
        h, w = x.shape[-2:]
        x = self.pad(x, pad_multiple)
        x1, x2, x3, x4, x = self.encode(x)
        q = self.qf_pred(x)
        mod = {}
        if self.cond > 0:
            mod = self.modulation(qf if qf is not None else 100.0 * (1.0 - q.detach()[:, 0]))
        x = self.m_body_decoder(x)
        for lvl, up, skip in ((3, self.m_up3, x4), (2, self.m_up2, x3), (1, self.m_up1, x2)):
            x = up[0](x + skip)
            for blk in up[1:]:
                x = blk(x, *mod[lvl]) if mod else blk(x)
        x = x + x1
        x = self.m_tail(x)
        return x[..., :h, :w], q


def cond_width(state_dict):
    """Hidden width of the quality conditioning (0: an unconditioned model)."""
    w = state_dict.get("qf_embed.0.weight")
    return 0 if w is None else int(w.shape[0])


def infer_config(state_dict):
    """(nc, nb) of a CaVE state_dict (official key layout)."""
    # m_down1 holds nb ResBlocks then the strided conv at index nb.
    nb = max(int(k.split(".")[1]) for k in state_dict
             if k.startswith("m_down1.") and k.split(".")[1].isdigit())
    nc = [state_dict["m_head.weight"].shape[0]]
    nc += [state_dict["m_down%d.%d.weight" % (i, nb)].shape[0] for i in (1, 2, 3)]
    return [int(c) for c in nc], nb


def load_state_dict_file(path):
    """Load an official cave.pth (legacy or zip torch.save) or a codiff safetensors
    (or a train_cave.py checkpoint) as a CaVE state_dict.

    A codiff export's `qf_calibration` table is dropped: the Rust engine applies it,
    it is no parameter of the PyTorch module, and train_cave.py refits it at export.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=False)
        for wrapper in ("params", "model"):  # official training state / our checkpoint
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
    sd.pop("qf_calibration", None)
    return sd


def build_from_state_dict(sd, strict=True):
    nc, nb = infer_config(sd)
    model = CaVE(nc=nc, nb=nb, cond=cond_width(sd))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # num_batches_tracked is optional in our safetensors files.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):
        raise KeyError("state_dict mismatch: missing %s unexpected %s" % (missing, unexpected))
    return model.eval()


def export_state_dict(model):
    """float32 tensors with official names, without num_batches_tracked."""
    return {k: v.detach().cpu().to(torch.float32).contiguous().clone()
            for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def macs_per_pixel(nc, nb):
    """Approximate multiply-accumulates per input pixel of forward()."""
    c0, c1, c2, c3 = nc
    k = 9
    full = 3 * c0 * k * 2 + 4 * nb * c0 * c0 * k            # head, tail, down1/up1 blocks
    full += c0 * c1 * 4 / 4 + c1 * c0 * 4 / 4                # 2x2 down / up
    l2 = (4 * nb * c1 * c1 * k + c1 * c2 * 16 * 2 / 16) / 4
    l3 = (4 * nb * c2 * c2 * k + c2 * c3 * 16 * 2 / 16) / 64
    l4 = 6 * nb * c3 * c3 * k / 1024
    return full + l2 + l3 + l4


if __name__ == "__main__":
    m = CaVE(nc=[16, 32, 64, 128], nb=2)
    for k, v in m.state_dict().items():
        print(k, tuple(v.shape))
    print("params", sum(p.numel() for p in m.parameters()))
    print("MAC/px", macs_per_pixel([16, 32, 64, 128], 2))
