#!/usr/bin/env python3
"""Make the README picture: JPEG | codiff | original, whole and zoomed.

Usage (from the repository root):

    python3 examples/side_by_side.py                       # default model and photo
    python3 examples/side_by_side.py --weights runs/cave/final.safetensors \\
        --image data/eval/skimage_astronaut.png --qf 10 --out examples/data/side_by_side.png

The photo is compressed with Pillow/libjpeg at --qf (4:2:0), decoded, and
restored with the Rust still command (target/release/examples/restore --mode
cave, built with cargo when missing). The picture has two rows: the three
whole images (down-scaled to --panel-width, the zoomed region outlined), and
the region (--crop X,Y,SIZE, default: the SIZE-pixel square where the JPEG
differs most from the original) enlarged --zoom times with nearest-neighbour
pixels, so blocking and ringing stay visible. Labels give the Y-PSNR (Rust
metrics, MATLAB-rounded BT.601 luma). The PNG is kept under --max-kb by
shrinking the whole-image row if needed.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, 'target', 'release', 'examples')


def ensure_binaries():
    need = [e for e in ('restore', 'metrics') if not os.path.exists(os.path.join(BIN, e))]
    if need:
        subprocess.run(['cargo', 'build', '--release'] + sum([['--example', e] for e in need], []),
                       cwd=ROOT, check=True)


def psnr_y(ref, test):
    p = subprocess.run([os.path.join(BIN, 'metrics'), '--quiet', ref, test],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)['mean']['psnr_y']


def worst_square(a, b, size, stride=8):
    """Top-left corner of the size x size square where a and b differ most (MSE)."""
    w, h = a.size
    da, db = a.convert('L').tobytes(), b.convert('L').tobytes()
    # squared difference, integrated for O(1) window sums
    sq = [(x - y) * (x - y) for x, y in zip(da, db)]
    integ = [[0] * (w + 1) for _ in range(h + 1)]
    for y in range(h):
        row, acc = integ[y + 1], 0
        prev = integ[y]
        for x in range(w):
            acc += sq[y * w + x]
            row[x + 1] = prev[x + 1] + acc
    best, at = -1, (0, 0)
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            s = integ[y + size][x + size] - integ[y][x + size] - integ[y + size][x] + integ[y][x]
            if s > best:
                best, at = s, (x, y)
    return at


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                      # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def compose(panels, labels, box, zoom, panel_w, gap=6, label_h=22):
    """panels: [jpeg, restored, original] (same size); box = (x, y, size)."""
    x, y, s = box
    w, h = panels[0].size
    scale = panel_w / w
    ph = round(h * scale)
    cs = s * zoom
    col_w = max(panel_w, cs)
    W = 3 * col_w + 4 * gap
    H = label_h + ph + gap + cs + 2 * gap
    canvas = Image.new('RGB', (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    f = font(14)
    for i, (im, label) in enumerate(zip(panels, labels)):
        x0 = gap + i * (col_w + gap)
        tw = d.textlength(label, font=f)
        d.text((x0 + (col_w - tw) / 2, 3), label, fill=(0, 0, 0), font=f)
        small = im.resize((panel_w, ph), Image.LANCZOS)
        px = x0 + (col_w - panel_w) // 2
        canvas.paste(small, (px, label_h))
        r = [px + x * scale, label_h + y * scale, px + (x + s) * scale, label_h + (y + s) * scale]
        d.rectangle(r, outline=(255, 230, 0), width=2)
        crop = im.crop((x, y, x + s, y + s)).resize((cs, cs), Image.NEAREST)
        cx = x0 + (col_w - cs) // 2
        canvas.paste(crop, (cx, label_h + ph + gap))
        d.rectangle([cx - 1, label_h + ph + gap - 1, cx + cs, label_h + ph + gap + cs], outline=(255, 230, 0))
    return canvas


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n', 2)[2])
    ap.add_argument('--image', default=os.path.join(ROOT, 'data', 'eval', 'skimage_astronaut.png'),
                    help='clean photo (default data/eval/skimage_astronaut.png of examples/get_images.py)')
    ap.add_argument('--qf', type=int, default=10, help='JPEG quality')
    ap.add_argument('--weights', default=None, help='compact CaVE model (default: the restore default)')
    ap.add_argument('--out', default=os.path.join(ROOT, 'examples', 'data', 'side_by_side.png'))
    ap.add_argument('--crop', default=None, help='X,Y,SIZE of the zoomed region (default: worst JPEG square)')
    ap.add_argument('--crop-size', type=int, default=64, help='side of the automatic zoom region')
    ap.add_argument('--zoom', type=int, default=4)
    ap.add_argument('--panel-width', type=int, default=256, help='width of each whole image')
    ap.add_argument('--max-kb', type=int, default=290, help='shrink the whole images until the PNG fits')
    a = ap.parse_args()

    ensure_binaries()
    orig = Image.open(a.image).convert('RGB')
    with tempfile.TemporaryDirectory() as td:
        buf = io.BytesIO()
        orig.save(buf, format='JPEG', quality=a.qf, subsampling=2)
        buf.seek(0)
        jpeg = Image.open(buf).convert('RGB')
        pj, pr, po = (os.path.join(td, n) for n in ('jpeg.png', 'restored.png', 'orig.png'))
        jpeg.save(pj)
        orig.save(po)
        cmd = [os.path.join(BIN, 'restore'), '--mode', 'cave'] + (['--weights', a.weights] if a.weights else [])
        p = subprocess.run(cmd + [pj, pr], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(p.stderr)
        restored = Image.open(pr).convert('RGB')
        restored.load()
        q_j, q_r = psnr_y(po, pj), psnr_y(po, pr)
    if a.crop:
        box = tuple(int(v) for v in a.crop.split(','))
    else:
        box = worst_square(jpeg, orig, a.crop_size) + (a.crop_size,)
    labels = ['JPEG QF %d  (%.2f dB)' % (a.qf, q_j), 'codiff  (%.2f dB)' % q_r, 'original']
    pw = a.panel_width
    while True:
        pic = compose([jpeg, restored, orig], labels, box, a.zoom, pw)
        png = io.BytesIO()
        pic.save(png, format='PNG', optimize=True)
        if png.tell() <= a.max_kb * 1024 or pw <= 96:
            break
        pw = int(pw * 0.9)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, 'wb') as f:
        f.write(png.getvalue())
    print('%s: %dx%d, %.0f KB; zoom box %s; Y-PSNR JPEG %.2f dB, codiff %.2f dB' % (
        a.out, pic.width, pic.height, png.tell() / 1024, box, q_j, q_r))
    return 0


if __name__ == '__main__':
    sys.exit(main())
