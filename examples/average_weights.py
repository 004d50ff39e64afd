#!/usr/bin/env python3
"""Average two compact CaVE safetensors files weight by weight (a "model soup").

    python3 examples/average_weights.py A.safetensors B.safetensors --alpha 0.5 --out SOUP.safetensors

Every floating-point tensor becomes (1 - alpha) A + alpha B (BatchNorm statistics and
the QF calibration too); metadata and other tensors come from B. Both files must have
the same keys and shapes, which holds for a run started from A with `train_cave.py
--init A` at the same width. Evaluate the result with `examples/evaluate.py --weights`.
"""
import argparse
import sys

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('a')
    ap.add_argument('b')
    ap.add_argument('--alpha', type=float, default=0.5, help="B's weight (0: A, 1: B)")
    ap.add_argument('--out', required=True)
    args = ap.parse_args()
    a, b = load_file(args.a), load_file(args.b)
    if set(a) != set(b):
        sys.exit('average_weights: the files have different keys: %s' % sorted(set(a) ^ set(b))[:10])
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            sys.exit('average_weights: %s is %s in A but %s in B' % (k, list(ta.shape), list(tb.shape)))
        out[k] = ((1 - args.alpha) * ta.float() + args.alpha * tb.float()).to(ta.dtype) if ta.is_floating_point() else tb
    with safe_open(args.b, 'pt') as f:
        meta = dict(f.metadata() or {})
    meta['soup'] = '%s (%.2f) + %s (%.2f)' % (args.a, 1 - args.alpha, args.b, args.alpha)
    save_file(out, args.out, metadata=meta)
    print('wrote %s: %d tensors, alpha %.2f' % (args.out, len(out), args.alpha))


if __name__ == '__main__':
    main()
