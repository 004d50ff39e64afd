"""Quality gain against speed at one JPEG quality: codiff's models and FFmpeg's deblockers.

    python3 examples/tradeoff.py                                  # QF 10, default model
    python3 examples/tradeoff.py --model "conditioned=runs/cave-cond/final.safetensors" \\
        --self-ensemble --plot examples/data/tradeoff-q10.png

For each clean photo of --eval-dir (the 9 held-out photos of examples/get_images.py)
it makes the Pillow/libjpeg 4:2:0 JPEG at --qf (as examples/evaluate.py does), then
restores it with every method and measures PSNR-Y (and SSIM-Y, PSNR-B-Y) against the
original with the Rust metrics command:

- codiff: the default model and each --model LABEL=PATH (the still command
  target/release/examples/restore, its own timing: restore only, all cores);
  --self-ensemble adds the default model's 8-transform ensemble; --steer 5,20,40
  adds the default model told another quality (restore --qf N: a
  quality-conditioned model smooths more for a lower N);
- FFmpeg spp (quality 6, hard; qp swept), fspp (qp swept), pp7 (medium; qp swept)
  and deblock (weak and strong, 8 px blocks): the best qp by PSNR-Y is kept, and
  the seconds are the filter run minus a run without it (one thread, no PNG I/O).

It prints a Markdown table, writes <--out>/tradeoff.json, and with --plot draws the
PSNR-Y gain over the JPEG input against seconds per megapixel (log scale) to a PNG
(needs matplotlib: pip install matplotlib).
"""
import argparse
import json
import os
import shutil
import sys
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate as ev  # noqa: E402

# FFmpeg filters (label, filter with {qp}, qp candidates); the first is spp as in evaluate.py
FILTERS = [
    ('spp', 'spp=quality=6:mode=hard:qp={qp}', [8, 12, 16, 20, 24, 28]),
    ('fspp', 'fspp=quality=5:qp={qp}', [4, 6, 8, 12, 16, 20, 24]),
    ('pp7', 'pp7=mode=medium:qp={qp}', [4, 8, 12, 16, 20]),
    ('deblock weak', 'deblock=filter=weak:block=8', [None]),
    ('deblock strong', 'deblock=filter=strong:block=8', [None]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n', 2)[2])
    ap.add_argument('--eval-dir', default=os.environ.get('CODIFF_EVAL_DIR', os.path.join(ev.ROOT, 'data', 'eval')))
    ap.add_argument('--qf', type=int, default=10, help='JPEG quality')
    ap.add_argument('--model', action='append', default=[], metavar='LABEL=PATH',
                    help='another compact model to place on the plot (repeatable)')
    ap.add_argument('--self-ensemble', action='store_true', help="also the default model's x8 ensemble")
    ap.add_argument('--steer', default='', help='also the default model with restore --qf N for these N (e.g. 5,20,40)')
    ap.add_argument('--out', default=os.path.join(ev.ROOT, 'target', 'tradeoff'))
    ap.add_argument('--plot', default='', help='write the plot to this PNG')
    ap.add_argument('--limit', type=int, default=0, help='first N photos only (quick check)')
    ap.add_argument('--replot', default='', metavar='JSON', help='only draw --plot from an earlier tradeoff.json')
    a = ap.parse_args()
    if a.replot:
        with open(a.replot) as f:
            r = json.load(f)
        plot(r['rows'], r['qf'], len(r['photos']), a.plot)
        return 0

    ev.ensure_eval_dir(a.eval_dir)
    ev.ensure_binaries(False)
    if not shutil.which('ffmpeg'):
        sys.exit('ffmpeg not found')
    names = sorted(f for f in os.listdir(a.eval_dir) if f.lower().endswith(ev.IMG_EXT))[:a.limit or None]
    out = os.path.abspath(a.out)
    shutil.rmtree(out, ignore_errors=True)
    ref, jpg = os.path.join(out, 'ref'), os.path.join(out, 'jpeg')
    os.makedirs(ref)
    os.makedirs(jpg)
    mp = 0.0
    for n in names:
        img = Image.open(os.path.join(a.eval_dir, n)).convert('RGB')
        stem = os.path.splitext(n)[0] + '.png'
        img.save(os.path.join(ref, stem), compress_level=1)
        ev.jpeg_decode(img, a.qf)[0].save(os.path.join(jpg, stem), compress_level=1)
        mp += img.width * img.height / 1e6
    stems = sorted(os.listdir(jpg))
    base = ev.metrics(ref, jpg)['mean']
    ev.log('%d photos, %.2f MP, QF %d: JPEG PSNR-Y %.3f' % (len(stems), mp, a.qf, base['psnr_y']))

    rows = []

    def add(label, kind, d, secs, extra=None):
        m = ev.metrics(ref, d)['mean']
        r = {'method': label, 'kind': kind, 's_per_mp': secs / mp, 'gain_psnr_y': m['psnr_y'] - base['psnr_y'],
             'mean': m}
        r.update(extra or {})
        rows.append(r)
        ev.log('%-16s PSNR-Y %+.3f dB  %.3f s/MP' % (label, r['gain_psnr_y'], r['s_per_mp']))

    models = [('codiff (default)', None, ())]
    if a.self_ensemble:
        models.append(('codiff x8', None, ('--self-ensemble',)))
    for q in ev.parse_list(a.steer):
        models.append(('codiff qf=%d' % q, None, ('--qf', str(q))))
    for spec in a.model:
        label, _, path = spec.partition('=')
        if not path:
            sys.exit('--model wants LABEL=PATH, got %r' % spec)
        models.append(('codiff ' + label, os.path.abspath(path), ()))
    for label, weights, extra in models:
        d = os.path.join(out, label.replace(' ', '_').replace('(', '').replace(')', '').replace('=', ''))
        os.makedirs(d)
        secs = sum(ev.run_restore(weights, os.path.join(jpg, s), os.path.join(d, s), extra)[0] for s in stems)
        add(label, 'codiff', d, secs, {'weights': weights or 'default'})

    for label, vf, qps in FILTERS:
        best = None
        for qp in qps:
            d = os.path.join(out, '%s_%s' % (label.replace(' ', '_'), qp))
            os.makedirs(d)
            f = vf.format(qp=qp)
            secs = 0.0
            for s in stems:
                t = ev.ffmpeg(os.path.join(jpg, s), os.path.join(d, s), '%s,%s,%s' % (ev.TO_YUV, f, ev.TO_RGB))
                scratch = os.path.join(d, 'null-' + s)
                t0 = ev.ffmpeg(os.path.join(jpg, s), scratch, '%s,%s' % (ev.TO_YUV, ev.TO_RGB))
                os.remove(scratch)
                secs += max(t - t0, 0.0)
            m = ev.metrics(ref, d)['mean']
            if best is None or m['psnr_y'] > best[1]['psnr_y']:
                best = (qp, m, secs, d)
        qp, _, secs, d = best
        add(label if qp is None else '%s (qp %d)' % (label, qp), 'ffmpeg', d, secs, {'filter': vf.format(qp=qp)})

    md = ['| method | PSNR-Y gain | PSNR-Y | SSIM-Y | PSNR-B-Y | s/MP |', '|---|---:|---:|---:|---:|---:|',
          '| JPEG QF %d | | %.2f | %.3f | %.2f | |' % (a.qf, base['psnr_y'], base['ssim_y'], base['psnrb_y'])]
    for r in sorted(rows, key=lambda r: -r['gain_psnr_y']):
        m = r['mean']
        md.append('| %s | %+.2f dB | %.2f | %.3f | %.2f | %.2f |' % (
            r['method'], r['gain_psnr_y'], m['psnr_y'], m['ssim_y'], m['psnrb_y'], r['s_per_mp']))
    text = '\n'.join(md)
    print(text)
    with open(os.path.join(out, 'tradeoff.json'), 'w') as f:
        json.dump({'qf': a.qf, 'photos': stems, 'megapixels': mp, 'jpeg': base, 'rows': rows,
                   'date': time.strftime('%Y-%m-%d')}, f, indent=1)
        f.write('\n')
    if a.plot:
        plot(rows, a.qf, len(stems), a.plot)
    return 0


def plot(rows, qf, n, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('--plot needs matplotlib (pip install matplotlib)')
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    # a log axis has no 0: filters faster than the timer resolves sit at 1 ms/MP
    pts = [(max(r['s_per_mp'], 1e-3), r['gain_psnr_y'], r) for r in rows]
    for x, y, r in pts:
        codiff = r['kind'] == 'codiff'
        ax.scatter(x, y, s=40, marker='o' if codiff else 's',
                   color='tab:red' if codiff else 'tab:blue', zorder=3)
    ax.set_xscale('log')
    ax.margins(x=0.25, y=0.15)
    fig.canvas.draw()
    # codiff's labels go left of their points, the filters' right; a label that
    # would overlap one already placed on its side moves down a line at a time
    placed = []
    for x, y, r in sorted(pts, key=lambda p: -p[1]):
        left = r['kind'] == 'codiff'
        px, py = ax.transData.transform((x, y))
        dy = 4
        while any(side == left and abs(px - qx) < 140 and abs(py + dy - qy) < 12
                  for side, qx, qy in placed):
            dy -= 12
        placed.append((left, px, py + dy))
        # a moved label stands further out, with a thin leader to its point
        moved = dy < 4
        gap = 14 if moved else 7
        ax.annotate(r['method'], (x, y), textcoords='offset pixels', fontsize=8,
                    xytext=(-gap if left else gap, dy), ha='right' if left else 'left',
                    va='center' if moved else 'baseline',
                    arrowprops=dict(arrowstyle='-', lw=0.5, color='0.5') if moved else None)
    ax.set_xlabel('seconds per megapixel (2-core CPU, log scale)')
    ax.set_ylabel('PSNR-Y gain over the JPEG (dB)')
    ax.set_title('JPEG QF %d, %d held-out photos: quality vs speed' % (qf, n), fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    ev.log('wrote', path)


if __name__ == '__main__':
    sys.exit(main())
