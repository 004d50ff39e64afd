"""The JPEG quantisation constraint, measured on restored photos.

A JPEG decoder's 8x8 luma DCT coefficients are integers k times the quantiser Q
of their frequency, so the original's coefficient lay in [(k - 1/2) Q, (k + 1/2) Q].
This script reads `examples/evaluate.py`'s output folder (ref/, qN/jpeg/,
qN/codiff/), takes k from the decoded JPEG's luma, and reports, per quality:
how many of the restored luma's coefficients leave those intervals, how many of
the original's stay inside them (near 1 when the tables below are the encoder's),
and the luma PSNR after clipping the restored coefficients back into them
(a projection onto a convex set that holds the original).

    python3 examples/evaluate.py            # writes target/eval
    python3 examples/dct_box.py target/eval --qfs 5,10,30

The tables are the IJG standard luminance table scaled as libjpeg/Pillow scale
it; luma here is the unrounded BT.601 Y of the RGB files, full range.
"""
import argparse
import os

import numpy as np
from PIL import Image

BASE = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
                 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
                 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], float).reshape(8, 8)
# orthonormal 8-point DCT-II matrix
DCT = np.array([[np.sqrt((1 if k == 0 else 2) / 8) * np.cos((2 * n + 1) * k * np.pi / 16) for n in range(8)]
                for k in range(8)])


def qtable(qf):
    s = 5000 / qf if qf < 50 else 200 - 2 * qf
    return np.clip(np.floor((BASE * s + 50) / 100), 1, 255)


def luma(path):
    rgb = np.asarray(Image.open(path).convert('RGB'), float)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2] - 128


def blocks(y):
    h, w = y.shape[0] // 8 * 8, y.shape[1] // 8 * 8
    return y[:h, :w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)


def unblock(b, y):
    out = y.copy()
    h, w = b.shape[0] * 8, b.shape[1] * 8
    out[:h, :w] = b.transpose(0, 2, 1, 3).reshape(h, w)
    return out


def psnr(a, b):
    return 10 * np.log10(255 ** 2 / np.mean((np.clip(a + 128, 0, 255) - (b + 128)) ** 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('root', help="evaluate.py's --out folder")
    ap.add_argument('--qfs', default='5,10,20,30,50')
    ap.add_argument('--method', default='codiff', help='subfolder of qN/ to test')
    a = ap.parse_args()
    print('| QF | PSNR luma JPEG | restored | projected | restored coefs outside | original coefs inside |')
    print('|---:|---:|---:|---:|---:|---:|')
    for qf in [int(q) for q in a.qfs.split(',')]:
        q = qtable(qf)
        rows = []
        for name in sorted(os.listdir(os.path.join(a.root, 'ref'))):
            yr = luma(os.path.join(a.root, 'ref', name))
            yj = luma(os.path.join(a.root, 'q%d' % qf, 'jpeg', name))
            yc = luma(os.path.join(a.root, 'q%d' % qf, a.method, name))
            k = np.round(DCT @ blocks(yj) @ DCT.T / q)
            lo, hi = (k - 0.5) * q, (k + 0.5) * q
            dc = DCT @ blocks(yc) @ DCT.T
            dr = DCT @ blocks(yr) @ DCT.T
            yp = unblock(DCT.T @ np.clip(dc, lo, hi) @ DCT, yc)
            rows.append((psnr(yj, yr), psnr(yc, yr), psnr(yp, yr),
                         np.mean((dc < lo) | (dc > hi)), np.mean((dr >= lo) & (dr <= hi))))
        m = np.mean(rows, axis=0)
        print('| %d | %.3f | %.3f | %.3f | %.4f | %.4f |' % (qf, *m))


if __name__ == '__main__':
    main()
