#!/usr/bin/env python3
"""Reference quality metrics for JPEG artifact removal: PSNR, SSIM and PSNR-B on Y and RGB.

    python3 examples/metrics.py REF TEST              # two image files
    python3 examples/metrics.py REF_DIR TEST_DIR      # two folders, paired by name
    options: --border N, --json FILE, --no-round-y, --quiet

Folders are paired by exact file name first, then by stem (ref/x.png with
test/x.jpg). The last line printed is a JSON object {"count", "mean"}; with
--quiet only the full JSON summary is printed ({"count", "missing", "border",
"round_y", "mean", "images": [...]}), and --json FILE writes that summary too.

Definitions (the conventions of the JPEG-artifact-removal literature:
ARCNN, FBCNN):
  Y      BT.601 studio-range luma of 8-bit RGB, as MATLAB's rgb2ycbcr:
         Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, rounded half up to an
         integer (--no-round-y keeps the fraction).
  PSNR   10 log10(255^2 / MSE); infinite for identical images.
  SSIM   Wang et al. 2004: Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03,
         L 255, computed on 'valid' positions only, no down-sampling; the RGB
         figure is the mean of the three channels' SSIMs.
  PSNR-B Yim and Bovik 2011 with 8x8 blocks: 10 log10(255^2 / (MSE + BEF)), BEF
         the blocking effect factor of the *test* image:
           D_B  mean squared step between horizontal or vertical neighbours that
                straddle a block boundary, D_Bc the same over all other pairs,
           BEF  = log2(8) / log2(min(H, W)) * (D_B - D_Bc) when D_B > D_Bc, else 0,
         with the paper's pair counts (N_HB = H (W/8 - 1), N_HBc = H (W - 1) - N_HB,
         vertically alike, so sizes that are not multiples of 8 count fractional
         blocks). For RGB: MSE over all RGB samples plus the BEF of the test's Y.
Grey images are measured on their one plane (the same figures under Y and
RGB); a grey image compared with a colour one is repeated into three channels.
16-bit grey is scaled to 8 bits (divide by 257, round); alpha is dropped.

Needs numpy and Pillow.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image

EXTENSIONS = ('.png', '.bmp', '.jpg', '.jpeg', '.ppm', '.pgm', '.tif', '.tiff', '.webp')
KEYS = ('psnr_y', 'ssim_y', 'psnrb_y', 'psnr_rgb', 'ssim_rgb', 'psnrb_rgb')
PEAK = 255.0


def read_image(path):
    """uint8 array, HxW for grey sources and HxWx3 for everything else."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ('I', 'I;16', 'I;16L', 'I;16B'):
            v = np.asarray(im, dtype=np.float64) / 257.0
            return np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)
        grey = im.mode in ('1', 'L', 'LA')
        return np.asarray(im.convert('L' if grey else 'RGB'), dtype=np.uint8)


def luma(img, round_y=True):
    if img.ndim == 2:
        return img.astype(np.float64)
    r, g, b = (img[..., c].astype(np.float64) for c in range(3))
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    return np.floor(y + 0.5) if round_y else y


def psnr(mse_value):
    return float('inf') if mse_value <= 0 else 10.0 * math.log10(PEAK * PEAK / mse_value)


def mean_sq_err(a, b):
    return float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))


WINDOW = np.exp(-np.square(np.arange(11) - 5.0) / (2 * 1.5 ** 2))
WINDOW /= WINDOW.sum()


def blur_valid(x):
    """Separable Gaussian correlation over the positions where the window fits."""
    n = len(WINDOW)
    rows = sum(WINDOW[k] * x[:, k:x.shape[1] - n + 1 + k] for k in range(n))
    return sum(WINDOW[k] * rows[k:rows.shape[0] - n + 1 + k, :] for k in range(n))


def ssim(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.shape[0] < 11 or a.shape[1] < 11:
        raise ValueError('SSIM needs at least 11x11 pixels, got %dx%d' % (a.shape[1], a.shape[0]))
    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    ma, mb = blur_valid(a), blur_valid(b)
    va = blur_valid(a * a) - ma * ma
    vb = blur_valid(b * b) - mb * mb
    cov = blur_valid(a * b) - ma * mb
    s = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())


def blocking_factor(plane, block=8):
    x = plane.astype(np.float64)
    h, w = x.shape
    step_x = np.square(np.diff(x, axis=1))      # (col i, col i+1)
    step_y = np.square(np.diff(x, axis=0))      # (row j, row j+1)
    edge_x = np.arange(w - 1) % block == block - 1
    edge_y = np.arange(h - 1) % block == block - 1
    boundary = step_x[:, edge_x].sum() + step_y[edge_y, :].sum()
    inner = step_x[:, ~edge_x].sum() + step_y[~edge_y, :].sum()
    n_b = h * (w / block - 1) + w * (h / block - 1)
    n_bc = h * (w - 1) + w * (h - 1) - n_b
    d_b, d_bc = boundary / n_b, inner / n_bc
    if d_b <= d_bc:
        return 0.0
    return float(math.log2(block) / math.log2(min(h, w)) * (d_b - d_bc))


def measure(ref, test, border=0, round_y=True):
    """Metrics of a test image against its reference (uint8 arrays)."""
    if ref.ndim != test.ndim:
        ref, test = [np.stack([x] * 3, axis=2) if x.ndim == 2 else x for x in (ref, test)]
    if ref.shape != test.shape:
        raise ValueError('size mismatch %s vs %s' % (ref.shape, test.shape))
    if border:
        ref, test = ref[border:-border, border:-border], test[border:-border, border:-border]
    h, w = ref.shape[:2]
    yr, yt = luma(ref, round_y), luma(test, round_y)
    mse_y, bef_y = mean_sq_err(yr, yt), blocking_factor(yt)
    out = {'width': w, 'height': h, 'psnr_y': psnr(mse_y), 'ssim_y': ssim(yr, yt),
           'psnrb_y': psnr(mse_y + bef_y), 'bef_y': bef_y}
    if ref.ndim == 2:
        out.update(psnr_rgb=out['psnr_y'], ssim_rgb=out['ssim_y'], psnrb_rgb=out['psnrb_y'])
    else:
        mse_rgb = mean_sq_err(ref, test)
        out.update(psnr_rgb=psnr(mse_rgb),
                   ssim_rgb=float(np.mean([ssim(ref[..., c], test[..., c]) for c in range(3)])),
                   psnrb_rgb=psnr(mse_rgb + bef_y))
    return out


# Names the older tools used, kept so that callers can import either spelling.
load = read_image


def pair_folders(ref_dir, test_dir):
    def images(d):
        return sorted(f for f in os.listdir(d)
                      if os.path.splitext(f)[1].lower() in EXTENSIONS and os.path.isfile(os.path.join(d, f)))
    tests = images(test_dir)
    first_by_stem = {}
    for f in tests:
        first_by_stem.setdefault(os.path.splitext(f)[0], f)
    pairs, missing = [], []
    for f in images(ref_dir):
        match = f if f in tests else first_by_stem.get(os.path.splitext(f)[0])
        if match is None:
            missing.append(f)
        else:
            pairs.append((f, os.path.join(ref_dir, f), os.path.join(test_dir, match)))
    return pairs, missing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('ref', help='reference image or folder')
    ap.add_argument('test', help='test image or folder')
    ap.add_argument('--border', type=int, default=0, help='pixels cropped from every side first')
    ap.add_argument('--json', help='also write the JSON summary to this file')
    ap.add_argument('--no-round-y', action='store_true', help='keep fractional luma')
    ap.add_argument('--quiet', action='store_true', help='print only the JSON summary')
    a = ap.parse_args(argv)
    if os.path.isdir(a.ref) != os.path.isdir(a.test):
        ap.error('give two files or two folders')
    if os.path.isdir(a.ref):
        pairs, missing = pair_folders(a.ref, a.test)
    else:
        pairs, missing = [(os.path.basename(a.ref), a.ref, a.test)], []
    if not pairs:
        ap.error('no matching images')

    images = []
    for name, ref_path, test_path in pairs:
        m = measure(read_image(ref_path), read_image(test_path), a.border, not a.no_round_y)
        m['name'] = name
        images.append(m)
    mean = {k: float(np.mean([m[k] for m in images])) for k in KEYS + ('bef_y',)}
    summary = {'count': len(images), 'missing': missing, 'border': a.border, 'round_y': not a.no_round_y,
               'mean': mean, 'images': images}

    if a.quiet:
        print(json.dumps(summary, indent=1))
    else:
        row = '%-28s %9s  %7.3f %7.4f %7.3f  %7.3f %7.4f %7.3f'
        head = '%-28s %9s  %7s %7s %7s  %7s %7s %7s' % ('image', 'size', 'PSNR-Y', 'SSIM-Y', 'PSNRB-Y',
                                                         'PSNR', 'SSIM', 'PSNRB')
        print(head)
        print('-' * len(head))
        for m in images:
            print(row % ((m['name'][:28], '%dx%d' % (m['width'], m['height'])) + tuple(m[k] for k in KEYS)))
        print('-' * len(head))
        print(row % (('MEAN (%d)' % len(images), '') + tuple(mean[k] for k in KEYS)))
        if missing:
            print('no match in test folder: %s' % ', '.join(missing), file=sys.stderr)
        print(json.dumps({'count': len(images), 'mean': mean}))
    if a.json:
        with open(a.json, 'w') as f:
            f.write(json.dumps(summary, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
