"""Check examples/cave_model.py against the official CaVE outputs.

Loads an official cave.pth (legacy torch.save) with strict key matching, runs it
on the fixture's `lq_raw` and compares with the stored official outputs.

    python3 examples/check_cave_parity.py [--fixture DIR] [--tol 1e-5]

Exits with status 1 when any max-abs error exceeds the tolerance.
"""
import argparse
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cave_model import CaVE, infer_config, load_state_dict_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", default=os.path.join(ROOT, "tests", "fixtures", "codiff-tiny-a"),
                    help="directory holding cave.pth and reference.safetensors "
                         "(default: the repository's tests/fixtures/codiff-tiny-a)")
    ap.add_argument("--tol", type=float, default=1e-5, help="max allowed abs error")
    args = ap.parse_args()
    torch.set_num_threads(1)

    sd = load_state_dict_file(os.path.join(args.fixture, "cave.pth"))
    nc, nb = infer_config(sd)
    model = CaVE(nc=nc, nb=nb)
    model.load_state_dict(sd, strict=True)  # every official key, nothing else
    model.eval()
    ref = load_file(os.path.join(args.fixture, "reference.safetensors"))
    x = ref["lq_raw"]
    print("config nc=%s nb=%d, input %s" % (nc, nb, tuple(x.shape)))

    got = {}
    hooks = {}
    for name in ("m_head", "m_down1", "m_down2", "m_down3", "m_body_encoder"):
        hooks[name] = getattr(model, name).register_forward_hook(
            lambda mod, inp, out, name=name: got.__setitem__("debug.cave." + name, out.clone()))
    with torch.no_grad():
        got["cave_embedding"] = model.get_visual_embedding(x)
        for h in hooks.values():
            h.remove()
        got["qf_pred"] = model.pred_qf(x)
        rec, q = model(x)
        got["cave_reconstruction"] = rec
        got["cave_reconstruction_qf"] = q

    ok = True
    for key, val in got.items():
        if key not in ref:
            print("%-28s (not in reference)" % key)
            continue
        r = ref[key]
        if tuple(r.shape) != tuple(val.shape):
            print("%-28s SHAPE MISMATCH got %s want %s" % (key, tuple(val.shape), tuple(r.shape)))
            ok = False
            continue
        err = (val - r).abs().max().item()
        good = err <= args.tol
        ok &= good
        print("%-28s max|err| = %.3e  %s" % (key, err, "ok" if good else "FAIL"))
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
