#!/usr/bin/env python3
"""Build non-photographic video content to check that the JPEG-artifact filter does no harm on it.

    python3 examples/get_content.py OUTDIR           # e.g. data/content (ignored by git)

Writes OUTDIR/train/*.png and OUTDIR/eval/*.png (8-bit RGB, sides multiples of
16, at most 640x480) and OUTDIR/MANIFEST.tsv (pool, name, category, source,
detail, licence, size). Every file name starts with its category:

  pattern_  GStreamer's own test patterns: videotestsrc pattern=X rendered to
            640x480 RGB by gst-launch-1.0 (pngenc); the noise pattern (snow)
            is left out, the zone plates get coefficients (kx2, ky2; all 0
            by default, a flat grey frame).
  text_     text and UI mock-ups drawn with Pillow in DejaVu and Liberation
            fonts: a document (dark on white), subtitles on a photo, a terminal
            (light on dark, monospace), a slide, source code, a spreadsheet, a
            news ticker.
  screen_   real screenshots from the documentation of small KDE programs
            (sweeper, kcharselect, ktimer, kteatime, kruler), cropped.
  cartoon_  vector art rasterised by rsvg-convert: Aisleriot's "bonded" card
            deck, Tango icons on a flat desktop colour, Debian desktop-base
            wallpapers.
  dark_     an all-black frame (0,0,0), a near-black smooth gradient, and
            photos darkened to night scenes (255 * 0.22 * (x/255)^1.4).
  flat_     flat colour frames (mid grey, saturated colours) and smooth
            gradients (horizontal, vertical, radial).
  photo_    a few of the project's clean photos (examples/get_images.py),
            cropped to at most 640x480, as the photographic reference.

Photos (photo_, dark_ and the photo behind subtitles) come from PHOTOS/eval for
the eval pool and from PHOTOS/train for the train pool, so no held-out photo
leaks into training content. PHOTOS is --photos (default data, the output of
examples/get_images.py; that script is run when PHOTOS/eval is missing).

Debian packages (fonts, screenshots, SVG art) are not installed: the .deb files
come from `apt-get download` and are unpacked with `dpkg-deb -x` into
$CODIFF_IMAGE_CACHE (default ~/.cache/codiff/images, shared with
get_images.py; about 15 MB). The tools gst-launch-1.0 (gstreamer1.0-tools,
-plugins-base, -plugins-good) and rsvg-convert (librsvg2-bin) are apt-installed
when missing; Pillow and numpy are pip-installed when missing.

The output is deterministic (no randomness but fixed seeds). Licences: the
renders made here (patterns, text, flat, dark gradient, icon composites) are
Apache-2.0 like the code; the fonts they use keep their own licences (DejaVu:
Bitstream Vera licence; Liberation: SIL OFL 1.1); packaged files keep their
package's licence (from its copyright file, in MANIFEST.tsv); photo-derived
images keep the photo's licence from PHOTOS/MANIFEST.tsv.
"""
import argparse
import glob
import importlib.util
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GET_IMAGES = os.path.join(ROOT, 'examples', 'get_images.py')

W, H = 640, 480
GENERATED = 'generated (Apache-2.0, like the code)'

DEBIAN = ['fonts-dejavu-core', 'fonts-liberation2', 'sweeper', 'kcharselect', 'ktimer', 'kteatime', 'kruler',
          'desktop-base', 'tango-icon-theme', 'aisleriot']

DEJAVU = 'usr/share/fonts/truetype/dejavu/'
LIBERATION = 'usr/share/fonts/truetype/liberation2/'
FONT_LICENCE = {'dejavu': 'DejaVu fonts: Bitstream Vera licence', 'liberation': 'Liberation fonts: SIL OFL 1.1'}

# videotestsrc patterns: eval, then train (no snow: pure noise); the zone plates need their
# coefficients (all 0 by default: a flat grey frame)
PATTERNS_EVAL = ['smpte', 'zone-plate kx2=32 ky2=32', 'checkers-8']
PATTERNS_TRAIN = ['smpte75', 'smpte100', 'smpte-rp-219', 'ball', 'colors', 'bar', 'pinwheel', 'spokes',
                  'gradient', 'circular', 'chroma-zone-plate kx2=20 ky2=20', 'gamut', 'checkers-4',
                  'zone-plate kx2=12 ky2=12 kx=-40']

# photos from get_images.py (stem of PHOTOS/<pool>/<stem>.png)
PHOTO = {'eval': ['skimage_coffee', 'lomiri_picosdeeuropa'],
         'train': ['mate_Aqua', 'lxqt_flowers', 'plasma_ColorfulCups', 'mate_Wood']}
DARK_PHOTO = {'eval': ['skimage_motorcycle'],
              'train': ['lxqt_fog', 'plasma_EveningGlow', 'mate_Storm', 'lomiri_life']}
SUBTITLE_PHOTO = {'eval': 'mate_Dune', 'train': 'plasma_Path'}
TICKER_PHOTO = 'lomiri_Bridge'     # train

KDE_DOC = 'usr/share/doc/HTML/en/'
# (pool, name, package, path, crop box (left, top, width, height) or None for the largest centred one, licence)
SCREENS = [
    ('eval', 'screen_sweeper', 'sweeper', KDE_DOC + 'sweeper/sweeper.png', (20, 20, 640, 480), 'LGPL-2.1+ (KDE)'),
    ('eval', 'screen_kcharselect', 'kcharselect', KDE_DOC + 'kcharselect/kcharselect.png', (10, 10, 640, 480),
     'GPL-2+ (KDE)'),
    ('train', 'screen_ktimer_main', 'ktimer', KDE_DOC + 'ktimer/main.png', None, 'GFDL-1.2+ (KDE documentation)'),
    ('train', 'screen_ktimer_two_at_once', 'ktimer', KDE_DOC + 'ktimer/two_at_once.png', None,
     'GFDL-1.2+ (KDE documentation)'),
    ('train', 'screen_kteatime_config', 'kteatime', KDE_DOC + 'kteatime/config.png', None,
     'GFDL-1.2+ (KDE documentation)'),
    ('train', 'screen_kruler_settings', 'kruler', KDE_DOC + 'kruler/kruler-settings.png', None,
     'GFDL-NIV-1.2+ (KDE documentation)'),
    ('train', 'screen_sweeper_bottom', 'sweeper', KDE_DOC + 'sweeper/sweeper.png', (200, 130, 640, 480),
     'LGPL-2.1+ (KDE)'),
]

DB = 'usr/share/desktop-base/'
WALLPAPERS = [  # (theme, licence), all train
    ('spacefun', 'GPL-2 (desktop-base)'), ('joy-inksplat', 'GPL-2+ (desktop-base)'),
    ('lines', 'GPL-2+ (desktop-base)'), ('moonlight', 'GPL-2+ (desktop-base)'),
    ('softwaves', 'GPL-2+ (desktop-base)'), ('homeworld', 'GPL-2+ (desktop-base)'),
    ('futureprototype', 'GPL-2+ (desktop-base)'), ('emerald', 'GPL-2+ (desktop-base)'),
]
CARDS = 'usr/share/aisleriot/cards/bonded.svgz'
CARDS_LICENCE = 'GPL-3+ (aisleriot)'
TANGO = 'usr/share/icons/Tango/scalable/'
TANGO_LICENCE = 'public domain (Tango icons); composite ' + GENERATED
TANGO_EVAL = ['apps/internet-web-browser', 'apps/accessories-calculator', 'apps/utilities-terminal',
              'apps/office-calendar', 'places/user-home', 'places/folder', 'places/user-trash',
              'devices/printer', 'devices/camera-photo', 'devices/audio-card', 'mimetypes/x-office-document',
              'mimetypes/image-x-generic']
TANGO_TRAIN = ['apps/internet-mail', 'apps/help-browser', 'apps/system-users', 'apps/preferences-desktop-theme',
               'places/network-server', 'places/start-here', 'devices/computer', 'devices/input-keyboard',
               'devices/media-optical', 'status/weather-storm', 'status/weather-few-clouds',
               'status/weather-showers', 'emblems/emblem-important', 'emotes/face-smile',
               'categories/applications-games']


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def need_modules():
    if not importlib.util.find_spec('numpy') or not importlib.util.find_spec('PIL'):
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'pillow', 'numpy'], check=True)


def apt_install(pkgs):
    log('apt-get install', ' '.join(pkgs))
    subprocess.run(['apt-get', 'update', '-qq'], check=True)
    subprocess.run(['apt-get', 'install', '-y', '-qq'] + pkgs, check=True)


def gst_has(element):
    return subprocess.run(['gst-inspect-1.0', element], capture_output=True).returncode == 0


def need_tools():
    if not shutil.which('gst-launch-1.0') or not gst_has('videotestsrc') or not gst_has('pngenc'):
        apt_install(['gstreamer1.0-tools', 'gstreamer1.0-plugins-base', 'gstreamer1.0-plugins-good'])
    if not shutil.which('rsvg-convert'):
        apt_install(['librsvg2-bin'])


# ---------------------------------------------------------------- downloads
def fetch_debian(cache):
    """Download and unpack DEBIAN into cache; {package: version}."""
    debs, root = os.path.join(cache, 'deb'), os.path.join(cache, 'root')
    os.makedirs(debs, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    missing = [p for p in DEBIAN if not glob.glob(os.path.join(debs, p + '_*.deb'))]
    if missing:
        if subprocess.run(['apt-cache', 'show', missing[0]], capture_output=True).returncode != 0:
            subprocess.run(['apt-get', 'update', '-qq'], check=True)
        subprocess.run(['apt-get', 'download', '-q'] + missing, cwd=debs, check=True)
    versions = {}
    for pkg in DEBIAN:
        (deb,) = glob.glob(os.path.join(debs, pkg + '_*.deb'))
        versions[pkg] = urllib.parse.unquote(os.path.basename(deb).split('_')[1])
        stamp = os.path.join(root, '.unpacked-' + pkg)
        if not os.path.exists(stamp):
            subprocess.run(['dpkg-deb', '-x', deb, root], check=True)
            open(stamp, 'w').close()
    return root, versions


def ensure_photos(photos):
    if os.path.isdir(os.path.join(photos, 'eval')) and os.path.isdir(os.path.join(photos, 'train')):
        return
    log('%s/eval missing: running %s %s' % (photos, GET_IMAGES, photos))
    subprocess.run([sys.executable, GET_IMAGES, photos], check=True)


def photo_licences(photos):
    out = {}
    path = os.path.join(photos, 'MANIFEST.tsv')
    if os.path.exists(path):
        with open(path) as f:
            rows = [line.rstrip('\n').split('\t') for line in f]
        for r in rows[1:]:
            out[r[1]] = (r[2], r[4])     # package, licence
    return out


# ---------------------------------------------------------------- helpers
def fit(im, w=W, h=H, box=None):
    """Crop to box (left, top, width, height) or to the centred w x h (shrunk to the image, multiples of 16)."""
    from PIL import Image
    if im.mode in ('RGBA', 'LA', 'P'):
        im = im.convert('RGBA')
        bg = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert('RGB')
    if box:
        left, top, w, h = box
    else:
        w, h = min(w, im.width), min(h, im.height)
        w, h = w - w % 16, h - h % 16
        left, top = (im.width - w) // 2, (im.height - h) // 2
    assert left + w <= im.width and top + h <= im.height, (im.size, box)
    return im.crop((left, top, left + w, top + h))


def load_photo(photos, pool, stem):
    """A photo from get_images.py, shrunk by an integer factor while it still covers 640x480, centre-cropped."""
    from PIL import Image
    path = os.path.join(photos, pool, stem + '.png')
    if not os.path.exists(path):
        sys.exit('get_content: %s missing (rerun examples/get_images.py %s)' % (path, photos))
    im = Image.open(path).convert('RGB')
    r = max(1, min(im.width // W, im.height // H))
    if r > 1:
        im = im.reduce(r)
    return fit(im)


def darken(im):
    import numpy as np
    from PIL import Image
    x = np.asarray(im, dtype=np.float64) / 255.0
    return Image.fromarray(np.round(255.0 * 0.22 * x ** 1.4).astype(np.uint8))


def rsvg(svg, w=None, h=None):
    """Rasterise an SVG(Z) with rsvg-convert -> RGBA image."""
    from PIL import Image
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, 'o.png')
        cmd = ['rsvg-convert', '-o', out]
        if w:
            cmd += ['-w', str(w)]
        if h:
            cmd += ['-h', str(h)]
        subprocess.run(cmd + [svg], check=True)
        im = Image.open(out)
        im.load()
    return im.convert('RGBA')


def videotestsrc(spec):
    """One frame of videotestsrc; spec is the pattern name and optional properties ("zone-plate kx2=32")."""
    from PIL import Image
    pattern, *props = spec.split()
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, 'p.png')
        subprocess.run(['gst-launch-1.0', '-q', 'videotestsrc', 'pattern=' + pattern] + props + ['num-buffers=1', '!',
                        'video/x-raw,format=RGB,width=%d,height=%d' % (W, H), '!', 'pngenc', '!',
                        'filesink', 'location=' + out], check=True)
        im = Image.open(out)
        im.load()
    return im.convert('RGB')


def gst_version():
    p = subprocess.run(['gst-launch-1.0', '--version'], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith('GStreamer '):
            return line.split()[1]
    return '?'


class Fonts:
    def __init__(self, root):
        self.root = root

    def __call__(self, name, size):
        from PIL import ImageFont
        d = DEJAVU if name.startswith('DejaVu') else LIBERATION
        return ImageFont.truetype(os.path.join(self.root, d, name + '.ttf'), size)


def wrap(draw, text, font, width):
    lines, cur = [], ''
    for word in text.split():
        t = (cur + ' ' + word).strip()
        if draw.textlength(t, font=font) <= width:
            cur = t
        else:
            lines.append(cur)
            cur = word
    return lines + [cur] if cur else lines


# ---------------------------------------------------------------- text renders
DOC_PARAS = [
    'A JPEG-artifact filter sits in the middle of a live pipeline, so it sees every kind of frame a '
    'camera, a capture card or a screen grabber sends: test cards, slides, terminals, cartoons, black '
    'frames between scenes and, now and then, a photograph.',
    'On content that was never compressed it must leave the pixels alone, and on compressed content it '
    'must not invent detail: straight edges of letters stay straight, flat areas stay flat, and the '
    'black of a fade-out stays black.',
]
DOC_BULLETS = ['Sharp glyph edges at 11 to 16 pixels', 'Thin table rules one pixel wide',
               'Coloured links and a highlighted word']


def text_document(F):
    from PIL import Image, ImageDraw
    im = Image.new('RGB', (W, H), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.text((32, 24), 'Release notes 2.4', font=F('DejaVuSans-Bold', 24), fill=(20, 20, 20))
    d.line((32, 58, W - 32, 58), fill=(180, 180, 180), width=1)
    body = F('DejaVuSerif', 14)
    y = 70
    for p in DOC_PARAS:
        for line in wrap(d, p, body, W - 64):
            d.text((32, y), line, font=body, fill=(30, 30, 30))
            y += 19
        y += 8
    small = F('DejaVuSans', 12)
    for b in DOC_BULLETS:
        d.ellipse((38, y + 5, 43, y + 10), fill=(30, 30, 30))
        d.text((52, y), b, font=small, fill=(30, 30, 30))
        y += 17
    y += 6
    d.rectangle((32, y, 32 + d.textlength('highlighted', font=small) + 4, y + 16), fill=(255, 236, 120))
    d.text((34, y), 'highlighted', font=small, fill=(0, 0, 0))
    link = 'https://example.org/docs/filters'
    x = 120
    d.text((x, y), link, font=small, fill=(20, 70, 200))
    d.line((x, y + 15, x + d.textlength(link, font=small), y + 15), fill=(20, 70, 200))
    y += 30
    # a small table
    cols = [32, 200, 330, 460, W - 32]
    rows = [('Content', 'Frames', 'Bitrate', 'Result'), ('Slides', '1 800', '0.4 Mb/s', 'unchanged'),
            ('Terminal', '3 600', '0.2 Mb/s', 'unchanged'), ('Cartoon', '5 400', '1.1 Mb/s', 'cleaner')]
    th = F('DejaVuSans-Bold', 12)
    d.rectangle((cols[0], y, cols[-1], y + 20), fill=(232, 236, 242))
    for i, r in enumerate(rows):
        for j, cell in enumerate(r):
            d.text((cols[j] + 6, y + 3), cell, font=th if i == 0 else small, fill=(25, 25, 25))
        y += 20
        d.line((cols[0], y, cols[-1], y), fill=(150, 150, 150))
    d.rectangle((cols[0], y - 20 * len(rows), cols[-1], y), outline=(120, 120, 120))
    for x in cols[1:-1]:
        d.line((x, y - 20 * len(rows), x, y), fill=(150, 150, 150))
    d.text((32, H - 28), 'Page 3 of 12', font=F('DejaVuSans', 10), fill=(110, 110, 110))
    return im


def subtitles(F, bg, lines, colour=(255, 255, 255), size=26):
    from PIL import ImageDraw
    im = bg.copy()
    d = ImageDraw.Draw(im)
    font = F('DejaVuSans-Bold', size)
    y = im.height - 30 - len(lines) * (size + 8)
    for line in lines:
        x = (im.width - d.textlength(line, font=font)) / 2
        d.text((x, y), line, font=font, fill=colour, stroke_width=2, stroke_fill=(0, 0, 0))
        y += size + 8
    return im


TERMINAL = [
    ('p', 'user@host:~/src/codiff$ ', 'ls -l'),
    ('o', 'total 48'),
    ('d', 'drwxr-xr-x  4 user user  4096 Dec  5 10:12 ', 'examples'),
    ('f', '-rw-r--r--  1 user user  1342 Dec  5 10:12 Cargo.toml'),
    ('f', '-rw-r--r--  1 user user 18211 Dec  5 10:12 README.md'),
    ('d', 'drwxr-xr-x  3 user user  4096 Dec  5 10:12 ', 'src'),
    ('d', 'drwxr-xr-x  2 user user  4096 Dec  5 10:12 ', 'weights'),
    ('p', 'user@host:~/src/codiff$ ', 'gst-inspect-1.0 codiff | head -4'),
    ('o', 'Factory Details:'),
    ('o', '  Rank                     none (0)'),
    ('o', '  Long-name                JPEG artifact removal'),
    ('o', '  Klass                    Filter/Effect/Video'),
    ('p', 'user@host:~/src/codiff$ ', 'make check'),
    ('g', 'test engine::tiling::tests::seams ... ok'),
    ('g', 'test engine::cave::tests::quality_estimate ... ok'),
    ('r', 'warning: unused variable `scale` in src/engine/vae.rs:212'),
    ('g', 'test result: ok. 132 passed; 0 failed; 1 ignored'),
    ('p', 'user@host:~/src/codiff$ ', ''),
]


def text_terminal(F):
    from PIL import Image, ImageDraw
    im = Image.new('RGB', (W, H), (28, 28, 30))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, W, 24), fill=(58, 58, 62))
    for i, c in enumerate([(237, 95, 87), (245, 190, 80), (98, 197, 84)]):
        d.ellipse((10 + 20 * i, 6, 22 + 20 * i, 18), fill=c)
    title = F('DejaVuSans', 12)
    t = 'user@host: ~/src/codiff'
    d.text(((W - d.textlength(t, font=title)) / 2, 5), t, font=title, fill=(210, 210, 210))
    mono, bold = F('DejaVuSansMono', 13), F('DejaVuSansMono-Bold', 13)
    colours = {'o': (205, 205, 205), 'f': (205, 205, 205), 'g': (120, 220, 120), 'r': (240, 110, 100)}
    y = 32
    for kind, text, *rest in TERMINAL:
        if kind == 'p':
            d.text((8, y), text, font=bold, fill=(110, 220, 110))
            x = 8 + d.textlength(text, font=bold)
            d.text((x, y), rest[0], font=mono, fill=(235, 235, 235))
            if not rest[0]:
                d.rectangle((x, y + 1, x + 8, y + 16), fill=(235, 235, 235))   # cursor
        elif kind == 'd':
            d.text((8, y), text, font=mono, fill=colours['o'])
            d.text((8 + d.textlength(text, font=mono), y), rest[0], font=bold, fill=(100, 150, 255))
        else:
            d.text((8, y), text, font=mono, fill=colours[kind])
        y += 17
    return im


def text_slide(F):
    from PIL import Image, ImageDraw
    im = Image.new('RGB', (W, H), (250, 250, 247))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, W, 72), fill=(22, 62, 120))
    d.text((32, 18), 'Quarterly results', font=F('LiberationSans-Bold', 32), fill=(255, 255, 255))
    body = F('LiberationSans-Regular', 20)
    y = 96
    for b in ['Streams served: 1.2 million (+18 %)', 'Median start-up time 0.8 s',
              'Three new regions on line', 'Artifact filter on every low-bitrate stream']:
        d.rectangle((40, y + 8, 48, y + 16), fill=(22, 62, 120))
        d.text((60, y), b, font=body, fill=(30, 30, 30))
        y += 34
    boxes = [((214, 64, 52), 'Europe', '41 %'), ((46, 139, 87), 'Americas', '35 %'), ((243, 156, 18), 'Asia', '24 %')]
    bw = (W - 64 - 2 * 24) // 3
    for i, (c, name, pct) in enumerate(boxes):
        x = 32 + i * (bw + 24)
        d.rounded_rectangle((x, 280, x + bw, 400), radius=12, fill=c)
        d.text((x + 16, 292), name, font=F('LiberationSans-Bold', 20), fill=(255, 255, 255))
        d.text((x + 16, 332), pct, font=F('LiberationSans-Bold', 40), fill=(255, 255, 255))
    d.line((32, 432, W - 32, 432), fill=(200, 200, 200))
    d.text((32, 442), 'Company confidential', font=F('LiberationSans-Italic', 13), fill=(120, 120, 120))
    d.text((W - 60, 442), '7 / 21', font=F('LiberationSans-Regular', 13), fill=(120, 120, 120))
    return im


CODE = '''use std::io::{self, Read};

/// Count the 8x8 blocks whose edges step by more than `limit`.
fn blocky(frame: &[u8], width: usize, limit: i32) -> usize {
    let mut n = 0;
    for (y, row) in frame.chunks(width).enumerate() {
        // only the last row of each block
        if y % 8 != 7 { continue; }
        for x in (8..width).step_by(8) {
            let step = row[x] as i32 - row[x - 1] as i32;
            if step.abs() > limit { n += 1; }
        }
    }
    n
}

fn main() -> io::Result<()> {
    let mut buf = Vec::new();
    io::stdin().read_to_end(&mut buf)?;
    println!("{} blocky edges", blocky(&buf, 640, 12));
    Ok(())
}'''
KEYWORDS = {'use', 'fn', 'let', 'mut', 'for', 'in', 'if', 'continue', 'as', 'return'}


def text_code(F):
    import re
    from PIL import Image, ImageDraw
    im = Image.new('RGB', (W, H), (253, 253, 250))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, 40, H), fill=(238, 238, 232))
    mono, bold = F('LiberationMono-Regular', 13), F('LiberationMono-Bold', 13)
    y = 6
    for i, line in enumerate(CODE.split('\n')):
        d.text((34 - d.textlength(str(i + 1), font=mono), y), str(i + 1), font=mono, fill=(150, 150, 150))
        x = 48
        if line.strip().startswith('//'):
            d.text((x, y), line, font=mono, fill=(60, 140, 60))
        else:
            for tok in re.findall(r'"[^"]*"|\w+|\s+|.', line):
                if tok in KEYWORDS:
                    f, c = bold, (30, 60, 200)
                elif tok.startswith('"'):
                    f, c = mono, (180, 40, 40)
                elif tok.isdigit():
                    f, c = mono, (150, 60, 170)
                else:
                    f, c = mono, (30, 30, 30)
                d.text((x, y), tok, font=f, fill=c)
                x += d.textlength(tok, font=f)
        y += 19.5
    return im


def text_spreadsheet(F):
    from PIL import Image, ImageDraw
    rng = random.Random(7)
    im = Image.new('RGB', (W, H), (255, 255, 255))
    d = ImageDraw.Draw(im)
    f, fb = F('LiberationSans-Regular', 12), F('LiberationSans-Bold', 12)
    cw, rh, x0, y0 = 96, 20, 40, 22
    d.rectangle((0, 0, W, y0), fill=(230, 230, 230))
    d.rectangle((0, 0, x0, H), fill=(230, 230, 230))
    for j in range(6):
        t = chr(ord('A') + j)
        d.text((x0 + j * cw + (cw - d.textlength(t, font=f)) / 2, 4), t, font=f, fill=(60, 60, 60))
    heads = ['Month', 'Viewers', 'Hours', 'Peak', 'Errors', 'Share']
    months = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec']
    for i in range(22):
        y = y0 + i * rh
        d.text((x0 - 6 - d.textlength(str(i + 1), font=f), y + 3), str(i + 1), font=f, fill=(60, 60, 60))
        for j in range(6):
            x = x0 + j * cw
            if i == 0:
                d.rectangle((x, y, x + cw, y + rh), fill=(210, 225, 245))
                d.text((x + 4, y + 3), heads[j], font=fb, fill=(20, 20, 20))
            elif i <= 12:
                if j == 0:
                    t = months[i - 1]
                elif j == 5:
                    t = '%.1f %%' % rng.uniform(5, 40)
                else:
                    t = '{:,}'.format(rng.randrange(10 ** (j + 1), 10 ** (j + 2)))
                fill = (200, 30, 30) if j == 4 and i % 5 == 0 else (20, 20, 20)
                d.text((x + cw - 4 - d.textlength(t, font=f) if j else x + 4, y + 3), t, font=f, fill=fill)
    for j in range(7):
        d.line((x0 + j * cw, y0, x0 + j * cw, H), fill=(200, 200, 200))
    for i in range(23):
        d.line((x0, y0 + i * rh, W, y0 + i * rh), fill=(200, 200, 200))
    d.rectangle((x0 + 2 * cw, y0 + 3 * rh, x0 + 3 * cw, y0 + 4 * rh), outline=(30, 110, 230), width=2)
    return im


def text_ticker(F, bg):
    from PIL import ImageDraw
    im = bg.copy()
    d = ImageDraw.Draw(im)
    d.rectangle((0, H - 96, W, H - 52), fill=(16, 40, 110))
    d.rectangle((0, H - 52, W, H - 24), fill=(240, 240, 240))
    d.rectangle((16, H - 88, 78, H - 60), fill=(210, 20, 30))
    d.text((24, H - 86), 'LIVE', font=F('DejaVuSans-Bold', 20), fill=(255, 255, 255))
    d.text((92, H - 88), 'Bridge reopens after repairs', font=F('DejaVuSans-Bold', 22), fill=(255, 255, 255))
    d.text((12, H - 48), 'Traffic expected to return to normal by Monday  \u2022  Weather: clear, 14 \u00b0C  \u2022  ',
           font=F('DejaVuSans', 16), fill=(20, 20, 20))
    d.text((W - 70, 12), '21:04', font=F('DejaVuSansMono-Bold', 18), fill=(255, 255, 255), stroke_width=1,
           stroke_fill=(0, 0, 0))
    return im


# ---------------------------------------------------------------- flat / dark
def ramp(a, b, t):
    import numpy as np
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return a + (b - a) * t[..., None]


def to_image(arr):
    import numpy as np
    from PIL import Image
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def flat(colour):
    from PIL import Image
    return Image.new('RGB', (W, H), colour)


def gradient(kind, a, b):
    import numpy as np
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    if kind == 'h':
        t = xx / (W - 1)
    elif kind == 'v':
        t = yy / (H - 1)
    elif kind == 'd':
        t = (xx + yy) / (W + H - 2)
    else:
        t = np.minimum(np.hypot(xx - W / 2, yy - H / 2) / math.hypot(W / 2, H / 2), 1.0)
    return to_image(ramp(a, b, t))


# ---------------------------------------------------------------- cartoons
def cards(root, box, felt=(22, 110, 56)):
    from PIL import Image
    deck = rsvg(os.path.join(root, CARDS), w=2600)
    bg = Image.new('RGBA', deck.size, felt + (255,))
    return fit(Image.alpha_composite(bg, deck), box=box)


def tango_desktop(root, icons, bg, size=112, cols=4):
    from PIL import Image
    im = Image.new('RGBA', (W, H), bg + (255,))
    rows = (len(icons) + cols - 1) // cols
    gx, gy = (W - cols * size) // (cols + 1), (H - rows * size) // (rows + 1)
    for i, name in enumerate(icons):
        icon = rsvg(os.path.join(root, TANGO, name + '.svg'), w=size, h=size)
        x, y = gx + (i % cols) * (size + gx), gy + (i // cols) * (size + gy)
        im.alpha_composite(icon, (x, y))
    return im.convert('RGB')


def wallpaper(root, theme):
    svg = os.path.join(root, DB, '%s-theme/wallpaper/contents/images/1280x1024.svg' % theme)
    return fit(rsvg(svg, w=640, h=512))


# ---------------------------------------------------------------- the set
def build(root, versions, photos, F):
    """Yield (pool, name, category, source, detail, licence, image)."""
    lic = photo_licences(photos)
    gst = 'GStreamer %s videotestsrc' % gst_version()

    def pkg(p):
        return '%s %s' % (p, versions[p])

    def photo_src(pool, stem):
        package, licence = lic.get(stem, ('get_images.py', 'see %s/MANIFEST.tsv' % photos))
        return 'get_images.py %s/%s (%s)' % (pool, stem, package), licence

    seen = set()
    for pool, patterns in (('eval', PATTERNS_EVAL), ('train', PATTERNS_TRAIN)):
        for p in patterns:
            name = 'pattern_' + p.split()[0].replace('-', '_')
            name += '_b' if name in seen else ''
            seen.add(name)
            yield (pool, name, 'pattern', gst, 'pattern=%s, RGB %dx%d' % (p, W, H), GENERATED, videotestsrc(p))

    dejavu = 'Pillow + ' + pkg('fonts-dejavu-core')
    liberation = 'Pillow + ' + pkg('fonts-liberation2')
    gen_dv = '%s; %s' % (GENERATED, FONT_LICENCE['dejavu'])
    gen_lib = '%s; %s' % (GENERATED, FONT_LICENCE['liberation'])
    yield ('eval', 'text_document', 'text', dejavu, 'dark text on white, table', gen_dv, text_document(F))
    src, licence = photo_src('eval', SUBTITLE_PHOTO['eval'])
    yield ('eval', 'text_subtitles', 'text', dejavu + '; ' + src, 'white outlined subtitles on a photo',
           'photo: %s; text: %s' % (licence, gen_dv),
           subtitles(F, load_photo(photos, 'eval', SUBTITLE_PHOTO['eval']),
                     ['The dunes move a few metres every year,', 'and the wind decides where.']))
    yield ('eval', 'text_terminal', 'text', dejavu, 'terminal, light on dark, monospace', gen_dv, text_terminal(F))
    yield ('train', 'text_slide', 'text', liberation, 'slide: title, bullets, coloured boxes', gen_lib,
           text_slide(F))
    yield ('train', 'text_code', 'text', liberation, 'syntax-highlighted source code', gen_lib, text_code(F))
    yield ('train', 'text_spreadsheet', 'text', liberation, 'spreadsheet grid', gen_lib, text_spreadsheet(F))
    src, licence = photo_src('train', SUBTITLE_PHOTO['train'])
    yield ('train', 'text_subtitles_yellow', 'text', dejavu + '; ' + src, 'yellow subtitles on a darkened photo',
           'photo: %s; text: %s' % (licence, gen_dv),
           subtitles(F, darken(load_photo(photos, 'train', SUBTITLE_PHOTO['train'])),
                     ['- Did you hear that?', '- Only the sea.'], colour=(255, 230, 40), size=24))
    src, licence = photo_src('train', TICKER_PHOTO)
    yield ('train', 'text_ticker', 'text', dejavu + '; ' + src, 'news lower third and ticker on a photo',
           'photo: %s; text: %s' % (licence, gen_dv), text_ticker(F, load_photo(photos, 'train', TICKER_PHOTO)))

    from PIL import Image
    for pool, name, package, rel, box, licence in SCREENS:
        yield (pool, name, 'screen', pkg(package), '/' + rel + (' crop %d,%d %dx%d' % box if box else ''),
               licence, fit(Image.open(os.path.join(root, rel)), box=box))

    yield ('eval', 'cartoon_cards_court', 'cartoon', 'rsvg-convert + ' + pkg('aisleriot'),
           '/' + CARDS + ' at 2600 px, crop 1960,0 640x480 on green', CARDS_LICENCE,
           cards(root, (1960, 0, W, H)))
    yield ('eval', 'cartoon_tango_desktop', 'cartoon', 'rsvg-convert + ' + pkg('tango-icon-theme'),
           '12 scalable icons at 112 px on a flat colour', TANGO_LICENCE,
           tango_desktop(root, TANGO_EVAL, (58, 110, 165)))
    yield ('train', 'cartoon_cards_numbers', 'cartoon', 'rsvg-convert + ' + pkg('aisleriot'),
           '/' + CARDS + ' at 2600 px, crop 0,620 640x480 on green', CARDS_LICENCE,
           cards(root, (0, 620, W, H)))
    yield ('train', 'cartoon_cards_backs', 'cartoon', 'rsvg-convert + ' + pkg('aisleriot'),
           '/' + CARDS + ' at 2600 px, crop 0,1072 640x480 on blue', CARDS_LICENCE,
           cards(root, (0, 1072, W, H), felt=(30, 60, 140)))
    yield ('train', 'cartoon_tango_desktop_b', 'cartoon', 'rsvg-convert + ' + pkg('tango-icon-theme'),
           '15 scalable icons at 96 px on a flat colour', TANGO_LICENCE,
           tango_desktop(root, TANGO_TRAIN, (236, 232, 222), size=96, cols=5))
    for theme, licence in WALLPAPERS:
        yield ('train', 'cartoon_wallpaper_' + theme.replace('-', '_'), 'cartoon', 'rsvg-convert + ' +
               pkg('desktop-base'), '/%s%s-theme/wallpaper/contents/images/1280x1024.svg at 640x512, centre crop'
               % (DB, theme), licence, wallpaper(root, theme))

    yield ('eval', 'dark_black', 'dark', 'generated', 'RGB (0,0,0)', GENERATED, flat((0, 0, 0)))
    yield ('train', 'dark_gradient', 'dark', 'generated', 'diagonal ramp 0..24, no noise', GENERATED,
           gradient('d', (0, 0, 0), (24, 24, 24)))
    yield ('train', 'dark_gradient_blue', 'dark', 'generated', 'radial ramp (4,6,18)..(0,0,0)', GENERATED,
           gradient('r', (4, 6, 18), (0, 0, 0)))
    for pool in ('eval', 'train'):
        for stem in DARK_PHOTO[pool]:
            src, licence = photo_src(pool, stem)
            yield (pool, 'dark_' + stem.split('_', 1)[1].replace('-', '_').lower(), 'dark', src,
                   '255 * 0.22 * (x/255)^1.4', licence, darken(load_photo(photos, pool, stem)))

    yield ('eval', 'flat_grey', 'flat', 'generated', 'RGB (128,128,128)', GENERATED, flat((128, 128, 128)))
    yield ('eval', 'flat_gradient_h', 'flat', 'generated', 'horizontal ramp (16,32,96)..(224,160,64)', GENERATED,
           gradient('h', (16, 32, 96), (224, 160, 64)))
    for name, colour in (('red', (220, 30, 40)), ('blue', (20, 60, 210)), ('green', (30, 190, 70)),
                         ('white', (255, 255, 255)), ('yellow', (250, 220, 0))):
        yield ('train', 'flat_' + name, 'flat', 'generated', 'RGB (%d,%d,%d)' % colour, GENERATED, flat(colour))
    yield ('train', 'flat_gradient_v', 'flat', 'generated', 'vertical grey ramp 0..255', GENERATED,
           gradient('v', (0, 0, 0), (255, 255, 255)))
    yield ('train', 'flat_gradient_radial', 'flat', 'generated', 'radial ramp (250,240,200)..(40,20,90)',
           GENERATED, gradient('r', (250, 240, 200), (40, 20, 90)))

    for pool in ('eval', 'train'):
        for stem in PHOTO[pool]:
            src, licence = photo_src(pool, stem)
            yield (pool, 'photo_' + stem.split('_', 1)[1].replace('-', '_').lower(), 'photo', src,
                   'integer reduce while >= 640x480, centre crop', licence, load_photo(photos, pool, stem))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n', 2)[2])
    ap.add_argument('out', help='output folder (train/, eval/, MANIFEST.tsv)')
    ap.add_argument('--photos', default=os.path.join(ROOT, 'data'),
                    help='output folder of examples/get_images.py (default data; made when missing)')
    ap.add_argument('--cache', default=os.environ.get('CODIFF_IMAGE_CACHE',
                                                      os.path.join(os.path.expanduser('~'), '.cache', 'codiff',
                                                                   'images')),
                    help='download cache (default $CODIFF_IMAGE_CACHE or ~/.cache/codiff/images)')
    a = ap.parse_args()
    need_modules()
    need_tools()
    ensure_photos(a.photos)
    root, versions = fetch_debian(a.cache)

    for pool in ('train', 'eval'):
        d = os.path.join(a.out, pool)
        if os.path.isdir(d):
            for f in glob.glob(os.path.join(d, '*.png')):
                os.remove(f)
        os.makedirs(d, exist_ok=True)
    rows = [['pool', 'name', 'category', 'source', 'detail', 'licence', 'size']]
    seen = set()
    for pool, name, category, source, detail, licence, im in build(root, versions, a.photos, Fonts(root)):
        assert name.startswith(category + '_') and name not in seen, name
        assert im.mode == 'RGB' and im.width % 16 == 0 and im.height % 16 == 0, (name, im.mode, im.size)
        assert im.width <= W and im.height <= H, (name, im.size)
        seen.add(name)
        im.save(os.path.join(a.out, pool, name + '.png'), compress_level=6)
        rows.append([pool, name, category, source, detail, licence, '%dx%d' % im.size])
    with open(os.path.join(a.out, 'MANIFEST.tsv'), 'w') as f:
        f.writelines('\t'.join(r) + '\n' for r in rows)
    for pool in ('eval', 'train'):
        cats = {}
        for r in rows[1:]:
            if r[0] == pool:
                cats[r[2]] = cats.get(r[2], 0) + 1
        print('%s: %d images (%s)' % (pool, sum(cats.values()), ', '.join('%s %d' % kv for kv in cats.items())))
    print('-> %s' % a.out)


if __name__ == '__main__':
    main()
