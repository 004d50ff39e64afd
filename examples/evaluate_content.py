#!/usr/bin/env python3
"""Check that codiff does no harm on non-photographic content (patterns, text, screens, cartoons, dark, flat).

Usage (from the repository root):

    python3 examples/evaluate_content.py                       # both paths, data/content, QF 5..95
    python3 examples/evaluate_content.py --via restore --qualities 10,30 --check
    python3 examples/evaluate_content.py --extra-args "--qf 50"          # flags for the restore command
    python3 examples/evaluate_content.py --via element --element-props "strength=0.5"
    python3 examples/evaluate_content.py -- --self-ensemble              # flags after -- go to restore too

For every image of --content-dir/eval (default data/content, made by
examples/get_content.py when missing) and every quality Q of --qualities:
compress with Pillow/libjpeg at quality Q, 4:2:0 (subsampling=2); also the
never-compressed case "clean" (the PNG itself). Then, by --via:

  restore  the still command (--restore-bin, default
           target/release/examples/restore) on the JPEG decoded by Pillow and
           saved as PNG (as evaluate.py does); clean: on the clean PNG. Its
           stderr line "estimated JPEG quality X" gives the QF estimate.
           Input = Pillow's decode.
  element  gst-launch-1.0 with GST_PLUGIN_PATH=--plugin-dir (default
           target/release):
             JPEG:  filesrc ! jpegdec ! codiff ! videoconvert ! RGB ! pngenc
                    (the element sees jpegdec's native I420; --jpegdec-props
                    adds jpegdec properties); input = the same pipeline
                    without codiff, so conversion losses are not blamed on
                    codiff;
             clean: filesrc ! pngdec ! videoconvert ! FORMAT ! codiff !
                    videoconvert ! RGB ! pngenc with FORMAT I420 ("clean-I420")
                    and RGB ("clean-RGB"); "dB from itself" is against the same
                    pipeline without codiff (the frame the element was given);
                    the conversion's own loss is recorded too.
           The QF estimate comes from the element's codiff-qf bus message
           (gst-launch-1.0 -m).

Metrics: RGB PSNR against the clean image (numpy, peak 255; identical images
give inf), gain = output PSNR - input PSNR (both capped at 100 dB, so inf - inf
is 0), and for dark_black the largest absolute difference from the clean frame.

Criteria (--check exits 1 when one fails, per path):
  (a) every compressed case: output PSNR >= input PSNR - 0.1 dB;
  (b) every never-compressed frame >= 45 dB from itself;
  (c) dark_black stays black: at every quality and clean the output is at
      most 1 code from (0,0,0), or, where the decoded JPEG itself is not black
      (libjpeg at Q5 lifts 0 to 8: DC step 160), at most 1 code from the input
      the filter was given (it must not lift it further);
  (d) non-photo content (every category but photo) at quality <= 30: the mean
      gain is > 0.

Writes <--out>/results.json and <--out>/results.md (the tables it prints); the
images stay in <--out>/work/. The binaries are copied to <--out>/bin first, so
a rebuild during the run does not mix two builds; the element path uses its
own GStreamer registry there. At most --jobs (1 or 2) cases run at once.

Needs: Pillow and numpy (pip-installed when missing); gst-launch-1.0 with
jpegdec, pngdec, pngenc (gstreamer1.0-tools, -plugins-base, -plugins-good) for
--via element; the release build (cargo build --release --example restore and
the plugin; --build runs it).
"""
import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

try:
    import numpy as np
    from PIL import Image
except ImportError:
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'pillow', 'numpy'], check=True)
    import numpy as np
    from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GET_CONTENT = os.path.join(ROOT, 'examples', 'get_content.py')
PLUGIN = 'libgstcodiff.so'
CAP = 100.0          # PSNR cap (dB) for gains
GAIN_TOL = 0.1       # (a)
CLEAN_MIN = 45.0     # (b)
BLACK_MAX = 1        # (c)
D_MAX_Q = 30         # (d)
BLACK = 'dark_black'
QF_RE = re.compile(r'estimated JPEG quality (-?[0-9.]+|nan|NaN|inf)(?: \(([^)]*)\))?')
UNCHANGED_RE = re.compile(r'left unchanged(?: \(([^)]*)\))?')
BUS_QF_RE = re.compile(r'codiff-qf, qf=\(double\)(-?[0-9.eE+]+|nan|inf)')


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- metrics
def load(path):
    return np.asarray(Image.open(path).convert('RGB'), dtype=np.int16)


def psnr(a, b):
    if a.shape != b.shape:
        raise ValueError('size mismatch %s vs %s' % (a.shape, b.shape))
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def maxdiff(a, b):
    return int(np.max(np.abs(a.astype(np.int32) - b.astype(np.int32))))


def gain(out, inp):
    return min(out, CAP) - min(inp, CAP)


def fmt_db(v, signed=False):
    if v is None:
        return ''
    if math.isinf(v):
        return 'inf' if v > 0 else '-inf'
    return ('%+.2f' if signed else '%.2f') % v


def jsonable(v):
    if isinstance(v, float) and math.isinf(v):
        return 'inf' if v > 0 else '-inf'
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    return v


# ---------------------------------------------------------------- runners
def run(cmd, env=None, timeout=600):
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError('failed (%d): %s\n%s%s' % (p.returncode, ' '.join(cmd), p.stdout[-2000:], p.stderr[-2000:]))
    return p, time.perf_counter() - t


def restore_case(bin_path, extra, src, dst):
    p, secs = run([bin_path] + extra + [src, dst])
    m = QF_RE.search(p.stderr)
    if not m:
        raise RuntimeError('cannot parse the restore output:\n%s' % p.stderr)
    u = UNCHANGED_RE.search(p.stderr)
    note = ('unchanged' + (': ' + u.group(1) if u.group(1) else '')) if u else ''
    return {'qf_est': float(m.group(1)), 'qf_source': m.group(2) or '', 'note': note, 'seconds': secs}


def gst(env, src_chain, codiff, props, dst, fmt=None):
    """gst-launch-1.0 -m: src_chain [! videoconvert ! fmt] [! codiff props] ! videoconvert ! RGB ! pngenc."""
    cmd = ['gst-launch-1.0', '-m'] + src_chain
    if fmt:
        cmd += ['!', 'videoconvert', '!', 'video/x-raw,format=' + fmt]
    if codiff:
        cmd += ['!', 'codiff'] + props
    cmd += ['!', 'videoconvert', '!', 'video/x-raw,format=RGB', '!', 'pngenc', '!', 'filesink', 'location=' + dst]
    p, secs = run(cmd, env=env)
    m = BUS_QF_RE.search(p.stdout)
    if codiff and not m:
        log('warning: no codiff-qf message from %s' % ' '.join(cmd))
    return {'qf_est': float(m.group(1)) if m else None, 'seconds': secs}


# ---------------------------------------------------------------- setup
def ensure_content(content_dir):
    if os.path.isdir(os.path.join(content_dir, 'eval')):
        return
    log('%s/eval missing: running %s %s' % (content_dir, GET_CONTENT, content_dir))
    subprocess.run([sys.executable, GET_CONTENT, content_dir], check=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def snapshot(src, dst_dir, name):
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, name)
    shutil.copy2(src, dst)
    return dst, {'source': os.path.relpath(os.path.abspath(src), ROOT), 'sha256': sha256(dst),
                 'mtime': time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(os.path.getmtime(src)))}


def image_category(name):
    return name.split('_', 1)[0]


# ---------------------------------------------------------------- tables
def case_label(q):
    return 'q%d' % q


def table(rows, names, cols, value, fmt_cell, title):
    """Markdown table: rows = images, columns = cases."""
    by = {(r['image'], r['case']): r for r in rows}
    out = ['**%s**' % title, '', '| image | ' + ' | '.join(h for _, h in cols) + ' |',
           '|:---|' + '---:|' * len(cols)]
    for n in names:
        cells = []
        for case, _ in cols:
            r = by.get((n, case))
            cells.append(fmt_cell(value(r)) if r else '')
        out.append('| %s/%s | %s |' % (image_category(n), n, ' | '.join(cells)))
    return '\n'.join(out)


def fmt_qf(v):
    return '' if v is None else ('%.1f' % v if not math.isinf(v) else 'inf')


def criteria(rows, via, qualities):
    comp = [r for r in rows if r['quality'] is not None]
    clean = [r for r in rows if r['quality'] is None]
    fa = ['%s %s: in %s, out %s (%+.2f dB)' % (r['image'], r['case'], fmt_db(r['psnr_in']), fmt_db(r['psnr_out']),
                                                r['gain']) for r in comp if r['gain'] < -GAIN_TOL]
    fb = ['%s %s: %s dB' % (r['image'], r['case'], fmt_db(r['psnr_self'])) for r in clean
          if r['psnr_self'] < CLEAN_MIN]
    black = [r for r in rows if r['image'] == BLACK]
    fc = ['%s: max |out| %d, max |out - in| %d' % (r['case'], r['black_max_out'], r['black_max_change'])
          for r in black if r['black_max_out'] > BLACK_MAX and r['black_max_change'] > BLACK_MAX]
    dgains = [r['gain'] for r in comp if image_category(r['image']) != 'photo' and r['quality'] <= D_MAX_Q]
    dmean = sum(dgains) / len(dgains) if dgains else float('nan')
    per_cat = {}
    for r in comp:
        if r['quality'] <= D_MAX_Q:
            per_cat.setdefault(image_category(r['image']), []).append(r['gain'])
    res = {
        'a': {'pass': not fa, 'failures': fa, 'cases': len(comp)},
        'b': {'pass': not fb, 'failures': fb, 'cases': len(clean)},
        'c': {'pass': not fc, 'skipped': not black, 'failures': fc,
              'max_out': max((r['black_max_out'] for r in black), default=None)},
        'd': {'pass': bool(dgains) and dmean > 0, 'mean_gain': dmean, 'cases': len(dgains),
              'per_category': {k: sum(v) / len(v) for k, v in sorted(per_cat.items())}},
    }
    lines = ['Criteria (%s):' % via,
             '- (a) compressed cases, output >= input - %.1f dB: %s (%d cases%s)' % (
                 GAIN_TOL, 'PASS' if res['a']['pass'] else 'FAIL', len(comp),
                 '' if not fa else '; %d failures: %s' % (len(fa), '; '.join(fa))),
             '- (b) never-compressed frames >= %.0f dB from themselves: %s (%d cases%s)' % (
                 CLEAN_MIN, 'PASS' if res['b']['pass'] else 'FAIL', len(clean),
                 '' if not fb else '; failures: %s' % '; '.join(fb)),
             '- (c) %s stays black (output <= %d code from black, or from a non-black decoded JPEG, at every '
             'quality and clean): %s (largest output %s%s)' % (
                 BLACK, BLACK_MAX, 'SKIP (no %s)' % BLACK if not black else 'PASS' if res['c']['pass'] else 'FAIL',
                 res['c']['max_out'],
                 '' if not fc else '; failures: %s' % '; '.join(res['c']['failures'])),
             '- (d) mean gain of non-photo content at quality <= %d: %s dB over %d cases: %s '
             '(per category, photo for reference: %s)' % (
                 D_MAX_Q, fmt_db(dmean, True), len(dgains), 'PASS' if res['d']['pass'] else 'FAIL',
                 ', '.join('%s %s' % (k, fmt_db(v, True)) for k, v in res['d']['per_category'].items()))]
    return res, '\n'.join(lines)


def report(rows, via, names, qualities):
    rs = [r for r in rows if r['via'] == via]
    qcols = [(case_label(q), 'Q%d' % q) for q in qualities]
    cases = ['clean'] if via == 'restore' else ['clean-I420', 'clean-RGB']
    ccols = [(c, c + ': dB from itself') for c in cases]
    cplain = [(c, c) for c in cases]
    md = ['## via %s' % via, '']
    md.append(table(rs, names, qcols + ccols,
                    lambda r: fmt_db(r['gain'], True) if r['quality'] is not None else fmt_db(r['psnr_self']),
                    str, 'RGB PSNR gain (dB, output - input) per quality; clean: PSNR of the output against its input'))
    md += ['', table(rs, names, qcols, lambda r: r['psnr_in'], fmt_db,
                     'Input RGB PSNR (dB) against the clean image (%s)' % (
                         "Pillow's decode" if via == 'restore' else 'jpegdec ! videoconvert, no codiff'))]
    md += ['', table(rs, names, qcols + cplain, lambda r: fmt_qf(r['qf_est']) + (' u' if r.get('note') else ''),
                     str, 'QF estimate' + (' (u: the restore command left the image unchanged)'
                                           if via == 'restore' else ''))]
    if via == 'element':
        md += ['', table(rs, names, cplain, lambda r: r.get('psnr_conv'), fmt_db,
                         'Clean frames: the conversion alone (no codiff) against the clean PNG (dB)')]
    notes = sorted({(r['case'], r['image'], r['note']) for r in rs if r.get('note')})
    if notes:
        counts = {}
        for _, _, n in notes:
            counts[n] = counts.get(n, 0) + 1
        md += ['', 'Restore notes: ' + '; '.join('"%s" in %d cases' % kv for kv in sorted(counts.items()))]
    black = {r['case']: r for r in rs if r['image'] == BLACK}
    if black:
        md += ['', '%s, max abs difference from (0,0,0) of input / output (output - input): ' % BLACK + ', '.join(
            '%s %d/%d (%d)' % (c, black[c]['black_max_in'], black[c]['black_max_out'], black[c]['black_max_change'])
            for c, _ in qcols + ccols if c in black)]
    res, text = criteria(rs, via, qualities)
    md += ['', text]
    return '\n'.join(md), res


# ---------------------------------------------------------------- main
def main():
    argv = sys.argv[1:]
    tail = []
    if '--' in argv:
        i = argv.index('--')
        argv, tail = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n', 2)[2])
    ap.add_argument('--content-dir', default=os.path.join(ROOT, 'data', 'content'),
                    help='output of examples/get_content.py (default data/content; made when missing)')
    ap.add_argument('--via', choices=['restore', 'element', 'both'], default='both')
    ap.add_argument('--qualities', default='5,10,20,30,50,70,90,95')
    ap.add_argument('--out', default=os.path.join(ROOT, 'target', 'content-eval'))
    ap.add_argument('--check', action='store_true', help='exit 1 when a criterion (a)-(d) fails')
    ap.add_argument('--restore-bin', default=os.path.join(ROOT, 'target', 'release', 'examples', 'restore'))
    ap.add_argument('--plugin-dir', default=os.path.join(ROOT, 'target', 'release'),
                    help='folder with %s (GST_PLUGIN_PATH)' % PLUGIN)
    ap.add_argument('--extra-args', default='', help='flags for the restore command (also: anything after --)')
    ap.add_argument('--element-props', default='', help='codiff properties, e.g. "strength=1 qf=50"')
    ap.add_argument('--jpegdec-props', default='',
                    help='jpegdec properties, e.g. "idct-method=islow" (the default ifast IDCT garbles '
                         'saturated chroma with libjpeg-turbo 2.1 SIMD)')
    ap.add_argument('--jobs', type=int, choices=[1, 2], default=2, help='cases run at once')
    ap.add_argument('--limit', type=int, default=0, help='only the first N images (quick check)')
    ap.add_argument('--build', action='store_true', help='cargo build --release (plugin and restore) first')
    a = ap.parse_args(argv)

    t_start = time.time()
    vias = ['restore', 'element'] if a.via == 'both' else [a.via]
    qualities = [int(q) for q in a.qualities.split(',') if q.strip()]
    extra = shlex.split(a.extra_args) + tail
    props = shlex.split(a.element_props)
    jprops = shlex.split(a.jpegdec_props)
    if a.build:
        subprocess.run(['cargo', 'build', '--release', '--lib', '--example', 'restore'], cwd=ROOT, check=True)
    ensure_content(a.content_dir)
    eval_dir = os.path.join(a.content_dir, 'eval')
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(eval_dir) if f.endswith('.png'))
    if a.limit:
        names = names[:a.limit]
    if not names:
        sys.exit('no images in %s' % eval_dir)

    out = os.path.abspath(a.out)
    work = os.path.join(out, 'work')
    shutil.rmtree(work, ignore_errors=True)
    binaries = {}
    env = dict(os.environ)
    if 'restore' in vias:
        if not os.path.exists(a.restore_bin):
            sys.exit('%s missing: build it (cargo build --release --example restore) or give --restore-bin'
                     % a.restore_bin)
        restore_bin, binaries['restore'] = snapshot(a.restore_bin, os.path.join(out, 'bin'), 'restore')
    if 'element' in vias:
        so = os.path.join(a.plugin_dir, PLUGIN)
        if not os.path.exists(so):
            sys.exit('%s missing: build it (cargo build --release) or give --plugin-dir' % so)
        if not shutil.which('gst-launch-1.0'):
            sys.exit('gst-launch-1.0 not found (apt-get install gstreamer1.0-tools gstreamer1.0-plugins-good)')
        plugdir = os.path.join(out, 'bin', 'plugin')
        _, binaries['plugin'] = snapshot(so, plugdir, PLUGIN)
        env['GST_PLUGIN_PATH'] = plugdir
        env['GST_REGISTRY'] = os.path.join(out, 'bin', 'registry.bin')
        p = subprocess.run(['gst-inspect-1.0', 'codiff'], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit('the codiff element does not load from %s:\n%s' % (so, p.stderr[-2000:]))

    # inputs: clean PNG, JPEG per quality, Pillow's decode as PNG
    clean, jpeg, jdec, jbytes = {}, {}, {}, {}
    for n in names:
        clean[n] = os.path.abspath(os.path.join(eval_dir, n + '.png'))
        img = Image.open(clean[n]).convert('RGB')
        for q in qualities:
            d = os.path.join(work, 'jpeg', case_label(q))
            os.makedirs(d, exist_ok=True)
            jpeg[n, q] = os.path.join(d, n + '.jpg')
            img.save(jpeg[n, q], format='JPEG', quality=q, subsampling=2)
            jbytes[n, q] = os.path.getsize(jpeg[n, q])
            jdec[n, q] = os.path.join(d, n + '.png')
            Image.open(jpeg[n, q]).convert('RGB').save(jdec[n, q], compress_level=1)
    log('%d images x (%d qualities + clean) from %s; via %s; %d jobs' % (
        len(names), len(qualities), eval_dir, ', '.join(vias), a.jobs))

    # tasks: (key, function) -> result dict
    tasks = []
    for via in vias:
        for n in names:
            for q in qualities + [None]:
                case = 'clean' if q is None else case_label(q)
                d = os.path.join(work, via, case)
                os.makedirs(d, exist_ok=True)
                if via == 'restore':
                    src = clean[n] if q is None else jdec[n, q]
                    tasks.append(((via, n, case, 'out'), restore_case, (restore_bin, extra, src,
                                                                       os.path.join(d, n + '.png'))))
                elif q is not None:
                    chain = ['filesrc', 'location=' + jpeg[n, q], '!', 'jpegdec'] + jprops
                    tasks.append(((via, n, case, 'base'), gst, (env, chain, False, props,
                                                                os.path.join(d, n + '.base.png'))))
                    tasks.append(((via, n, case, 'out'), gst, (env, chain, True, props, os.path.join(d, n + '.png'))))
                else:
                    chain = ['filesrc', 'location=' + clean[n], '!', 'pngdec']
                    for fmt in ('I420', 'RGB'):
                        c = 'clean-' + fmt
                        dd = os.path.join(work, via, c)
                        os.makedirs(dd, exist_ok=True)
                        tasks.append(((via, n, c, 'base'), gst, (env, chain, False, props,
                                                                 os.path.join(dd, n + '.base.png'), fmt)))
                        tasks.append(((via, n, c, 'out'), gst, (env, chain, True, props,
                                                                os.path.join(dd, n + '.png'), fmt)))
    results = {}
    done = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = {ex.submit(f, *args): key for key, f, args in tasks}
        for fut in concurrent.futures.as_completed(futs):
            key = futs[fut]
            try:
                results[key] = fut.result()
            except Exception as e:  # noqa: BLE001 - report and stop
                for f in futs:
                    f.cancel()
                sys.exit('%s %s %s: %s' % (key[0], key[1], key[2], e))
            done += 1
            if done % 50 == 0 or done == len(tasks):
                log('[%4.0f s] %d/%d runs' % (time.time() - t_start, done, len(tasks)))
    t_runs = time.time() - t_start

    # metrics
    rows = []
    zero = {}
    for via in vias:
        cases = [(case_label(q), q) for q in qualities]
        cases += [('clean', None)] if via == 'restore' else [('clean-I420', None), ('clean-RGB', None)]
        for n in names:
            ref = load(clean[n])
            if n == BLACK:
                zero[n] = np.zeros_like(ref)
            for case, q in cases:
                d = os.path.join(work, via, case)
                r = results[via, n, case, 'out']
                outp = load(os.path.join(d, n + '.png'))
                row = {'via': via, 'image': n, 'category': image_category(n), 'case': case, 'quality': q,
                       'qf_est': r.get('qf_est'), 'note': r.get('note', ''), 'seconds': round(r['seconds'], 3)}
                if via == 'restore':
                    inp = ref if q is None else load(jdec[n, q])
                else:
                    inp = load(os.path.join(d, n + '.base.png'))
                if q is not None:
                    row['bytes'] = jbytes[n, q]
                    row['psnr_in'] = psnr(inp, ref)
                    row['psnr_out'] = psnr(outp, ref)
                    row['gain'] = gain(row['psnr_out'], row['psnr_in'])
                else:
                    row['psnr_self'] = psnr(outp, inp)       # against the frame the filter was given
                    row['psnr_conv'] = psnr(inp, ref)        # the conversion alone (element path)
                    row['psnr_out'] = psnr(outp, ref)
                if n == BLACK:
                    row['black_max_in'] = maxdiff(inp, zero[n])
                    row['black_max_out'] = maxdiff(outp, zero[n])
                    row['black_max_change'] = maxdiff(outp, inp)
                rows.append(row)

    mds, crit = [], {}
    for via in vias:
        md, res = report(rows, via, names, qualities)
        mds.append(md)
        crit[via] = res
    seconds = round(time.time() - t_start, 1)
    config = {'content_dir': os.path.relpath(os.path.abspath(a.content_dir), ROOT), 'images': names,
              'qualities': qualities, 'via': vias,
              'jpeg': 'Pillow %s libjpeg, 4:2:0 (subsampling=2)' % Image.__version__,
              'restore_args': extra, 'element_props': props, 'jpegdec_props': jprops, 'binaries': binaries,
              'jobs': a.jobs,
              'runs': len(tasks), 'seconds_runs': round(t_runs, 1), 'seconds': seconds,
              'date': time.strftime('%Y-%m-%d %H:%M:%S')}
    head = ['# codiff on non-photographic content', '',
            '%d images from `%s` (%s); JPEG by Pillow/libjpeg 4:2:0 at Q %s; RGB PSNR against the clean image; '
            'gain = output - input (capped at %.0f dB). restore args: `%s`; element props: `%s`; '
            'jpegdec props: `%s`.' % (
                len(names), config['content_dir'], ', '.join(sorted({image_category(n) for n in names})),
                ','.join(map(str, qualities)), CAP, ' '.join(extra), ' '.join(props), ' '.join(jprops)),
            'Binaries: ' + '; '.join('%s %s (built %s, sha256 %s)' % (k, v['source'], v['mtime'], v['sha256'][:12])
                                     for k, v in binaries.items()), '']
    allpass = all(r['pass'] for res in crit.values() for r in res.values())
    tail_line = 'Overall: %s. %d runs, %.0f s.' % ('PASS' if allpass else 'FAIL', len(tasks), seconds)
    text = '\n'.join(head + ['\n\n'.join(mds), '', tail_line]) + '\n'
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(jsonable({'config': config, 'criteria': crit, 'rows': rows}), f, indent=1)
        f.write('\n')
    print(text)
    log('wrote %s and %s' % (os.path.join(out, 'results.md'), os.path.join(out, 'results.json')))
    return 1 if a.check and not allpass else 0


if __name__ == '__main__':
    sys.exit(main())
