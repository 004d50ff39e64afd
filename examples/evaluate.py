#!/usr/bin/env python3
"""Evaluate codiff's restoration against JPEG and FFmpeg's spp filter.

Usage (from the repository root):

    python3 examples/evaluate.py                                   # default model, data/eval
    python3 examples/evaluate.py --weights runs/cave/final.safetensors  # another compact model
    python3 examples/evaluate.py --eval-dir DIR --out target/eval --qfs 5,10,20,30,50
    python3 examples/evaluate.py --spp-sweep                       # re-derive spp's qp per QF

For every clean photo in --eval-dir (default $CODIFF_EVAL_DIR, else data/eval in
the repository; when that folder is missing, examples/get_images.py is run to
create it) and every quality in --qfs:

  1. JPEG: compress with Pillow's libjpeg at that quality, 4:2:0 chroma
     (subsampling=2, as the training script does; --chroma 422 or 444 for the
     other layouts), decode with Pillow, save PNG.
     All methods start from these decoded pixels.
  2. codiff: restore each decoded PNG with the Rust still command
     target/release/examples/restore --mode cave [--weights F] (built with cargo
     when missing, or always with --build); its stderr gives the restore time
     (without model load and file I/O) and CaVE's JPEG-quality estimate.
  3. spp: FFmpeg's simple post-processing filter at its best settings,
     spp=quality=6:mode=hard:qp=Q on full-range YUV 4:4:4 made from the same
     decoded RGB with accurate rounding (the RGB -> YUV -> RGB round trip alone
     costs > 68 dB), with Q per JPEG quality from SPP_QP below. The time is the
     ffmpeg run minus the same ffmpeg run without spp (PNG I/O, conversion).
  4. Metrics: PSNR, SSIM, PSNR-B on Y (MATLAB-rounded BT.601 luma) and RGB with
     the Rust metrics (target/release/examples/metrics; the conventions of
     examples/metrics.py, tests/metrics.rs checks the agreement).

It also measures the QF-estimate mean absolute error of CaVE with
target/release/examples/estimate_qf on --qf-est-seen qualities (10..90) and on
--qf-est-unseen ones (1..7, below the training range of 8..95), and writes
<--out>/results.json and <--out>/results.md (the tables it prints). The per-QF
images stay in <--out>/q<QF>/{jpeg,codiff,spp}/.

Seconds per megapixel: codiff uses every core (the engine's threads), spp is
single-threaded; both are wall-clock, so a loaded machine inflates them.

spp's qp (SPP_QP) was chosen with --spp-sweep on the 9 eval photos (best mean
Y-PSNR over the candidates in SPP_SWEEP, so spp is tuned on the test set; the
curve is flat near the optimum, higher qp trades Y-PSNR for PSNR-B):

    QF 5   qp 16/20/24/28/32: 29.239 29.382 29.445 29.490* 29.472 dB
    QF 10  qp 12/14/16/18/20: 32.158 32.209 32.211* 32.196 32.141
    QF 20  qp 8/9/10/12:      34.574 34.591* 34.583 34.508
    QF 30  qp 6/7/8/10:       35.879 35.899* 35.882 35.761
    QF 50  qp 3/4/5/6:        37.360 37.469 37.517* 37.504

Qualities not in the table use the nearest entry.

Needs: Pillow; ffmpeg (Debian's has spp); cargo for the binaries.
"""
import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, 'target', 'release', 'examples')
EXAMPLES = ['restore', 'metrics', 'estimate_qf']
GET_IMAGES = os.path.join(ROOT, 'examples', 'get_images.py')
IMG_EXT = ('.png', '.bmp', '.ppm', '.tif', '.tiff', '.webp', '.jpg', '.jpeg')

# spp qp per JPEG quality (see the docstring and --spp-sweep)
SPP_QP = {5: 28, 10: 16, 20: 9, 30: 7, 50: 5}
# candidates tried by --spp-sweep
SPP_SWEEP = {5: [16, 20, 24, 28, 32], 10: [12, 14, 16, 18, 20], 20: [8, 9, 10, 12],
             30: [6, 7, 8, 10], 50: [3, 4, 5, 6]}
TO_YUV = 'scale=out_range=full:flags=accurate_rnd+full_chroma_int,format=yuv444p'
TO_RGB = 'scale=flags=accurate_rnd+full_chroma_int,format=rgb24'
KEYS = ['psnr_y', 'ssim_y', 'psnrb_y', 'psnr_rgb', 'ssim_rgb', 'psnrb_rgb']
RESTORE_RE = re.compile(r'(?:restored|left unchanged [^)]*\)) in ([0-9.]+) s .*estimated JPEG quality (-?[0-9.]+)')


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_list(s):
    out = []
    for part in s.split(','):
        if '-' in part.strip()[1:]:
            lo, hi = part.split('-')
            out += list(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def ensure_binaries(force):
    missing = [e for e in EXAMPLES if not os.path.exists(os.path.join(BIN, e))]
    if missing or force:
        cmd = ['cargo', 'build', '--release'] + sum([['--example', e] for e in EXAMPLES], [])
        log('building:', ' '.join(cmd))
        subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_eval_dir(d):
    if os.path.isdir(d):
        return
    parent = os.path.dirname(os.path.abspath(d))
    if os.path.basename(os.path.normpath(d)) != 'eval':
        sys.exit('%s does not exist (get_images.py only makes folders named eval)' % d)
    log('%s missing: running %s %s' % (d, GET_IMAGES, parent))
    subprocess.run([sys.executable, GET_IMAGES, parent], check=True)


def weights_info(path):
    """safetensors metadata (training step etc.) of the model, if readable."""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            return json.loads(f.read(n)).get('__metadata__', {})
    except (OSError, ValueError):
        return {}


# --chroma: Pillow's subsampling argument for each JPEG chroma layout
CHROMA = {'420': 2, '422': 1, '444': 0}
chroma = '420'


def chroma_label():
    return '4:%s:%s' % (chroma[1], chroma[2])


def jpeg_decode(img, qf):
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=qf, subsampling=CHROMA[chroma])
    buf.seek(0)
    return Image.open(buf).convert('RGB'), buf.getbuffer().nbytes


def run_restore(weights, src, dst, extra=()):
    cmd = [os.path.join(BIN, 'restore'), '--mode', 'cave'] + list(extra)
    if weights:
        cmd += ['--weights', weights]
    p = subprocess.run(cmd + [src, dst], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit('restore failed on %s:\n%s' % (src, p.stderr))
    m = RESTORE_RE.search(p.stderr)
    if not m:
        sys.exit('cannot parse the restore output:\n%s' % p.stderr)
    return float(m.group(1)), float(m.group(2))


def ffmpeg(src, dst, vf):
    t = time.perf_counter()
    subprocess.run(['ffmpeg', '-nostdin', '-hide_banner', '-v', 'error', '-y', '-i', src,
                    '-vf', vf, '-frames:v', '1', dst], check=True)
    return time.perf_counter() - t


def run_spp(src, dst, qp, timed=True):
    """spp on src -> dst; returns the seconds spp itself took (approximately)."""
    t_spp = ffmpeg(src, dst, '%s,spp=quality=6:mode=hard:qp=%d,%s' % (TO_YUV, qp, TO_RGB))
    if not timed:
        return t_spp
    scratch = dst + '.null.png'
    t_null = ffmpeg(src, scratch, '%s,%s' % (TO_YUV, TO_RGB))
    os.remove(scratch)
    return max(t_spp - t_null, 0.0)


def spp_qp_for(qf, table):
    return table[min(table, key=lambda k: (abs(k - qf), k))]


def metrics(ref_dir, test_dir):
    p = subprocess.run([os.path.join(BIN, 'metrics'), '--quiet', ref_dir, test_dir],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit('metrics failed:\n%s' % p.stderr)
    r = json.loads(p.stdout)
    if r['missing']:
        sys.exit('metrics: no output for %s in %s' % (r['missing'], test_dir))
    return r


def estimate_qf(weights, files):
    with tempfile.NamedTemporaryFile('w', suffix='.txt', delete=False) as f:
        f.write('\n'.join(files) + '\n')
        lst = f.name
    cmd = [os.path.join(BIN, 'estimate_qf'), '--list', lst]
    if weights:
        cmd += ['--weights', weights]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.remove(lst)
    if p.returncode != 0:
        sys.exit('estimate_qf failed:\n%s' % p.stderr)
    return {r['file']: r['qf'] for r in map(json.loads, p.stdout.splitlines())}


def qf_sweep(weights, photos, qfs, workdir):
    """CaVE's estimate for every photo at every quality in qfs -> per-QF stats."""
    files, truth = [], {}
    for name, img in photos:
        for qf in qfs:
            dec, _ = jpeg_decode(img, qf)
            p = os.path.join(workdir, 'q%d_%s.png' % (qf, os.path.splitext(name)[0]))
            dec.save(p, compress_level=1)
            files.append(p)
            truth[p] = qf
    est = estimate_qf(weights, files)
    per = {}
    for p, qf in truth.items():
        per.setdefault(qf, []).append(est[p])
    rows = {qf: {'mean_estimate': sum(v) / len(v), 'mae': sum(abs(e - qf) for e in v) / len(v)}
            for qf, v in sorted(per.items())}
    allerr = [abs(est[p] - qf) for p, qf in truth.items()]
    return {'qfs': qfs, 'mae': sum(allerr) / len(allerr), 'per_qf': rows}


def fmt_table(rows, spp_used):
    hdr = ('| QF | method | PSNR-Y | SSIM-Y | PSNR-B-Y | PSNR | SSIM | PSNR-B | s/MP | QF MAE |\n'
           '|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|')
    out = [hdr]
    for r in rows:
        m = r['mean']
        label = r['method'] + (' (qp %d)' % r['spp_qp'] if r['method'] == 'spp' else '')
        label += ' (%.2f bpp)' % r['bpp'] if 'bpp' in r else ''
        out.append('| %d | %s | %.3f | %.4f | %.3f | %.3f | %.4f | %.3f | %s | %s |' % (
            r['qf'], label, m['psnr_y'], m['ssim_y'], m['psnrb_y'], m['psnr_rgb'], m['ssim_rgb'],
            m['psnrb_rgb'], '%.3f' % r['s_per_mp'] if r.get('s_per_mp') is not None else '',
            '%.2f' % r['qf_mae'] if r.get('qf_mae') is not None else ''))
    return '\n'.join(out)


def fmt_qf(sweep, title):
    lines = ['%s: MAE %.2f over %s' % (title, sweep['mae'], ','.join(map(str, sweep['qfs']))), '',
             '| QF | ' + ' | '.join(str(q) for q in sweep['per_qf']) + ' |',
             '|---|' + '---:|' * len(sweep['per_qf']),
             '| mean estimate | ' + ' | '.join('%.1f' % v['mean_estimate'] for v in sweep['per_qf'].values()) + ' |',
             '| MAE | ' + ' | '.join('%.1f' % v['mae'] for v in sweep['per_qf'].values()) + ' |']
    return '\n'.join(lines)


def spp_sweep(photos, ref_dir, qfs, out):
    best = {}
    for qf in qfs:
        cands = SPP_SWEEP.get(qf) or sorted({max(1, spp_qp_for(qf, SPP_QP) + d) for d in (-4, -2, 0, 2, 4)})
        jdir = os.path.join(out, 'sweep', 'q%d' % qf, 'jpeg')
        os.makedirs(jdir, exist_ok=True)
        for name, img in photos:
            jpeg_decode(img, qf)[0].save(os.path.join(jdir, name), compress_level=1)
        res = {}
        for qp in cands:
            sdir = os.path.join(out, 'sweep', 'q%d' % qf, 'spp%d' % qp)
            os.makedirs(sdir, exist_ok=True)
            for name, _ in photos:
                run_spp(os.path.join(jdir, name), os.path.join(sdir, name), qp, timed=False)
            res[qp] = metrics(ref_dir, sdir)['mean']
            log('spp sweep QF %d qp %d: PSNR-Y %.3f SSIM-Y %.4f PSNR-B-Y %.3f PSNR %.3f' % (
                qf, qp, res[qp]['psnr_y'], res[qp]['ssim_y'], res[qp]['psnrb_y'], res[qp]['psnr_rgb']))
        best[qf] = max(res, key=lambda q: res[q]['psnr_y'])
        log('spp sweep QF %d: best qp %d' % (qf, best[qf]))
    shutil.rmtree(os.path.join(out, 'sweep'))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n', 2)[2])
    ap.add_argument('--eval-dir', default=os.environ.get('CODIFF_EVAL_DIR', os.path.join(ROOT, 'data', 'eval')),
                    help='clean photos (created with examples/get_images.py when missing)')
    ap.add_argument('--weights', default=None,
                    help='compact CaVE model (default: the restore command\'s default, '
                         '$CODIFF_WEIGHTS or weights/codiff-cave-compact.safetensors)')
    ap.add_argument('--out', default=os.path.join(ROOT, 'target', 'eval'), help='work and result folder')
    ap.add_argument('--qfs', default='5,10,20,30,50', help='JPEG qualities of the main table')
    ap.add_argument('--qf-est-seen', default='10,20,30,40,50,60,70,80,90',
                    help='qualities for the QF-estimate MAE ("" to skip)')
    ap.add_argument('--qf-est-unseen', default='1-7',
                    help='qualities below the training range for a separate MAE ("" to skip)')
    ap.add_argument('--spp-qp', default=None,
                    help='override spp qp per QF, e.g. "5:24,10:16" (others from the built-in table)')
    ap.add_argument('--spp-sweep', action='store_true',
                    help='first pick spp\'s qp per QF by a sweep on these photos (best Y-PSNR)')
    ap.add_argument('--no-spp', action='store_true')
    ap.add_argument('--self-ensemble', action='store_true',
                    help='also restore with --self-ensemble (8 flips/transposes averaged): row "codiff x8"')
    ap.add_argument('--chroma', choices=sorted(CHROMA), default='420',
                    help='JPEG chroma subsampling: 420 (default, as in training), 422 (most MJPEG cameras), 444')
    ap.add_argument('--limit', type=int, default=0, help='use only the first N photos (quick check)')
    ap.add_argument('--build', action='store_true', help='run cargo build even when the binaries exist')
    a = ap.parse_args()
    global chroma
    chroma = a.chroma

    t_start = time.time()
    ensure_eval_dir(a.eval_dir)
    ensure_binaries(a.build)
    if not shutil.which('ffmpeg') and not a.no_spp:
        sys.exit('ffmpeg not found (or use --no-spp)')
    weights = os.path.abspath(a.weights) if a.weights else None
    wpath = weights or os.environ.get('CODIFF_WEIGHTS') or os.path.join(ROOT, 'weights', 'codiff-cave-compact.safetensors')
    if not os.path.exists(wpath):
        sys.exit('model %s not found: give --weights' % wpath)
    winfo = weights_info(wpath)

    names = sorted(f for f in os.listdir(a.eval_dir) if f.lower().endswith(IMG_EXT))
    if a.limit:
        names = names[:a.limit]
    if not names:
        sys.exit('no images in %s' % a.eval_dir)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    # references as PNG in out/ref (so metrics pairs them by stem with any source format)
    ref_dir = os.path.join(out, 'ref')
    shutil.rmtree(ref_dir, ignore_errors=True)
    os.makedirs(ref_dir)
    photos = []
    for n in names:
        img = Image.open(os.path.join(a.eval_dir, n)).convert('RGB')
        stem = os.path.splitext(n)[0] + '.png'
        img.save(os.path.join(ref_dir, stem), compress_level=1)
        photos.append((stem, img))
    mp = sum(img.width * img.height for _, img in photos) / 1e6
    log('%d photos (%.2f MP) from %s; model %s (step %s)' % (
        len(photos), mp, a.eval_dir, wpath, winfo.get('step', '?')))

    qfs = parse_list(a.qfs)
    spp_table = dict(SPP_QP)
    if a.spp_sweep and not a.no_spp:
        spp_table.update(spp_sweep(photos, ref_dir, qfs, out))
    if a.spp_qp:
        spp_table.update({int(k): int(v) for k, v in (kv.split(':') for kv in a.spp_qp.split(','))})

    rows = []
    for qf in qfs:
        methods = ('jpeg', 'codiff') + (('codiff-x8',) if a.self_ensemble else ()) + (() if a.no_spp else ('spp',))
        d = {m: os.path.join(out, 'q%d' % qf, m) for m in methods}
        for p in d.values():
            shutil.rmtree(p, ignore_errors=True)
            os.makedirs(p)
        nbytes = 0
        for name, img in photos:
            dec, nb = jpeg_decode(img, qf)
            dec.save(os.path.join(d['jpeg'], name), compress_level=1)
            nbytes += nb
        t_codiff, errs = 0.0, []
        for name, _ in photos:
            secs, est = run_restore(weights, os.path.join(d['jpeg'], name), os.path.join(d['codiff'], name))
            t_codiff += secs
            errs.append(abs(est - qf))
        rows.append({'qf': qf, 'method': 'jpeg', 'mean': metrics(ref_dir, d['jpeg'])['mean'],
                     'bpp': 8 * nbytes / (mp * 1e6)})
        rows.append({'qf': qf, 'method': 'codiff', 'mean': metrics(ref_dir, d['codiff'])['mean'],
                     's_per_mp': t_codiff / mp, 'qf_mae': sum(errs) / len(errs)})
        if a.self_ensemble:
            t_x8 = sum(run_restore(weights, os.path.join(d['jpeg'], n), os.path.join(d['codiff-x8'], n),
                                   ['--self-ensemble'])[0] for n, _ in photos)
            rows.append({'qf': qf, 'method': 'codiff x8', 'mean': metrics(ref_dir, d['codiff-x8'])['mean'],
                         's_per_mp': t_x8 / mp})
        if not a.no_spp:
            qp = spp_qp_for(qf, spp_table)
            t_spp = sum(run_spp(os.path.join(d['jpeg'], n), os.path.join(d['spp'], n), qp) for n, _ in photos)
            rows.append({'qf': qf, 'method': 'spp', 'spp_qp': qp, 'mean': metrics(ref_dir, d['spp'])['mean'],
                         's_per_mp': t_spp / mp})
        log('[%4.0f s] QF %d: ' % (time.time() - t_start, qf) + '  '.join('%s %.3f dB' % (r['method'], r['mean']['psnr_y'])
                                      for r in rows if r['qf'] == qf))

    sweeps = {}
    log('[%4.0f s] QF estimates' % (time.time() - t_start))
    for key, spec, title in (('seen', a.qf_est_seen, 'QF estimate, trained qualities'),
                             ('unseen', a.qf_est_unseen, 'QF estimate, unseen qualities')):
        if spec:
            with tempfile.TemporaryDirectory(dir=out) as td:
                sweeps[key] = qf_sweep(weights, photos, parse_list(spec), td)
            sweeps[key]['title'] = title

    config = {'eval_dir': os.path.abspath(a.eval_dir), 'images': [n for n, _ in photos], 'megapixels': mp,
              'weights': wpath, 'weights_metadata': winfo, 'qfs': qfs,
              'jpeg': 'Pillow %s libjpeg, %s (subsampling=%d)' % (Image.__version__, chroma_label(), CHROMA[chroma]),
              'spp': 'spp=quality=6:mode=hard:qp=Q on full-range YUV 4:4:4', 'spp_qp': spp_table,
              'seconds': None}
    md = ['# codiff evaluation', '',
          'Model `%s` (training step %s); %d photos (%.2f MP) from `%s`; JPEG by Pillow/libjpeg %s.' % (
              wpath, winfo.get('step', '?'), len(photos), mp, config['eval_dir'], chroma_label()),
          'Metrics: means over photos; Y = MATLAB-rounded BT.601 luma; RGB PSNR-B with BEF on Y (FBCNN).',
          's/MP: wall-clock seconds per megapixel (codiff: all cores, without model load; '
          'spp: one thread, without PNG I/O). QF MAE: |CaVE estimate - QF|.', '',
          fmt_table(rows, spp_table)]
    for s in sweeps.values():
        md += ['', fmt_qf(s, s['title'])]
    config['seconds'] = round(time.time() - t_start, 1)
    md += ['', 'Evaluation took %.0f s.' % config['seconds']]
    text = '\n'.join(md) + '\n'
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump({'config': config, 'rows': rows, 'qf_estimate': sweeps}, f, indent=1)
        f.write('\n')
    print(text)
    log('wrote %s and %s' % (os.path.join(out, 'results.md'), os.path.join(out, 'results.json')))
    return 0


if __name__ == '__main__':
    sys.exit(main())
