//! Full-reference quality metrics for JPEG-artifact-removal evaluation: PSNR,
//! SSIM and PSNR-B on Y and on RGB, with exactly the conventions of the
//! project's reference script `examples/metrics.py`
//! (`tests/metrics.rs` checks the agreement against values it produced):
//!
//! * **Y**: BT.601 studio-range luma as MATLAB `rgb2ycbcr` on uint8 input,
//!   `Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`, rounded half up to an
//!   integer (MATLAB/ARCNN/FBCNN convention; `round_y = false` keeps floats).
//! * **RGB**: PSNR over all samples; SSIM = mean of the three channel SSIMs.
//! * **PSNR** with peak 255 (infinite for identical images).
//! * **SSIM** (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01,
//!   K2 = 0.03, L = 255, separable 'valid' filtering, no down-sampling.
//! * **PSNR-B** (Yim & Bovik 2011, 8x8 blocks): `MSE-B = MSE + BEF(test)`,
//!   with the blocking effect factor measured on the *test* image's Y only:
//!   `BEF = eta (D_B - D_Bc)` if `D_B > D_Bc` else 0, `eta = log2 8 / log2
//!   min(H, W)`, pair counts `N_HB = H (W/8 - 1)`, `N_HBc = H (W - 1) - N_HB`
//!   (vertical likewise). "RGB" PSNR-B follows FBCNN: MSE over RGB, BEF of Y.
//! * Greyscale pairs are measured on the grey plane only (reported under both
//!   Y and RGB); a grey image compared with an RGB one is promoted to RGB.
//!
//! Loading follows the script too: 16-bit grey is scaled by 1/257 and rounded,
//! grey(+alpha) stays grey, everything else becomes 8-bit RGB (alpha dropped).
//! JPEG files are decoded by the `image` crate, not libjpeg, so for exact
//! agreement with the Python script compare PNGs.
//!
//! Used by the `metrics` and `flicker` examples and by `tests/metrics.rs`,
//! `tests/compact.rs` and `tests/flicker.rs`.
use std::path::{Path, PathBuf};

/// Image extensions considered in folders (as `metrics.py`).
pub const IMG_EXT: &[&str] = &["png", "bmp", "jpg", "jpeg", "ppm", "pgm", "tif", "tiff", "webp"];

/// The six summary metrics, in `metrics.py`'s order.
pub const KEYS: [&str; 6] = ["psnr_y", "ssim_y", "psnrb_y", "psnr_rgb", "ssim_rgb", "psnrb_rgb"];

/// An 8-bit image: `channels` is 1 (grey) or 3 (RGB), packed row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self, String> {
        if !(channels == 1 || channels == 3) || data.len() != width * height * channels {
            return Err(format!("{width}x{height}x{channels} image with {} bytes", data.len()));
        }
        Ok(Self { width, height, channels, data })
    }

    fn to_rgb(&self) -> Image {
        if self.channels == 3 {
            return self.clone();
        }
        let data = self.data.iter().flat_map(|&v| [v, v, v]).collect();
        Image { width: self.width, height: self.height, channels: 3, data }
    }

    fn crop(&self, border: usize) -> Result<Image, String> {
        if border == 0 {
            return Ok(self.clone());
        }
        if 2 * border >= self.width || 2 * border >= self.height {
            return Err(format!("border {border} leaves nothing of {}x{}", self.width, self.height));
        }
        let (w, h, c) = (self.width - 2 * border, self.height - 2 * border, self.channels);
        let mut data = Vec::with_capacity(w * h * c);
        for y in border..border + h {
            let row = (y * self.width + border) * c;
            data.extend_from_slice(&self.data[row..row + w * c]);
        }
        Ok(Image { width: w, height: h, channels: c, data })
    }

    /// All samples as f64.
    fn plane_all(&self) -> Vec<f64> {
        self.data.iter().map(|&v| v as f64).collect()
    }

    /// Channel `c` as f64.
    fn plane(&self, c: usize) -> Vec<f64> {
        self.data.iter().skip(c).step_by(self.channels).map(|&v| v as f64).collect()
    }
}

/// Decode an image file the way `metrics.py` does (see the module docs).
pub fn load(path: &Path) -> Result<Image, String> {
    use image::DynamicImage as D;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let img = image::ImageReader::open(path)
        .map_err(|e| err(&e))?
        .with_guessed_format()
        .map_err(|e| err(&e))?
        .decode()
        .map_err(|e| err(&e))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let scale16 = |v: u16| (v as f64 / 257.0 + 0.5).floor().clamp(0.0, 255.0) as u8;
    let (c, data) = match img {
        D::ImageLuma8(b) => (1, b.into_raw()),
        D::ImageLumaA8(b) => (1, b.into_raw().chunks_exact(2).map(|p| p[0]).collect()),
        D::ImageLuma16(b) => (1, b.into_raw().into_iter().map(scale16).collect()),
        D::ImageLumaA16(b) => (1, b.into_raw().chunks_exact(2).map(|p| scale16(p[0])).collect()),
        // Pillow reads 16-bit RGB(A) PNGs as 8-bit RGB keeping the high byte
        D::ImageRgb16(b) => (3, b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect()),
        D::ImageRgba16(b) => (
            3,
            b.into_raw()
                .chunks_exact(4)
                .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
                .collect(),
        ),
        other => (3, other.to_rgb8().into_raw()),
    };
    Image::new(w, h, c, data)
}

/// BT.601 studio-range luma (MATLAB `rgb2ycbcr` on uint8); grey stays as is.
pub fn to_y(img: &Image, round_y: bool) -> Vec<f64> {
    if img.channels == 1 {
        return img.plane(0);
    }
    img.data
        .chunks_exact(3)
        .map(|p| {
            let (r, g, b) = (p[0] as f64, p[1] as f64, p[2] as f64);
            // same operation order as the numpy expression, so ties round alike
            let y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0;
            if round_y {
                (y + 0.5).floor()
            } else {
                y
            }
        })
        .collect()
}

pub fn mse(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let s: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    s / a.len() as f64
}

pub fn psnr_from_mse(m: f64) -> f64 {
    if m <= 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / m).log10()
    }
}

fn gauss1d(size: usize, sigma: f64) -> Vec<f64> {
    let g: Vec<f64> = (0..size)
        .map(|i| {
            let r = i as f64 - (size as f64 - 1.0) / 2.0;
            (-(r * r) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let s: f64 = g.iter().sum();
    g.iter().map(|v| v / s).collect()
}

/// Separable 2-D 'valid' correlation of an `h x w` plane with the 1-D kernel `k`
/// (rows first, then columns, accumulating taps in order like `metrics.py`).
fn filt_valid(x: &[f64], w: usize, h: usize, k: &[f64]) -> Vec<f64> {
    let n = k.len();
    let (ow, oh) = (w - n + 1, h - n + 1);
    let mut tmp = vec![0.0f64; h * ow];
    for y in 0..h {
        let src = &x[y * w..(y + 1) * w];
        let dst = &mut tmp[y * ow..(y + 1) * ow];
        for (i, &ki) in k.iter().enumerate() {
            for (d, s) in dst.iter_mut().zip(&src[i..i + ow]) {
                *d += ki * s;
            }
        }
    }
    let mut out = vec![0.0f64; oh * ow];
    for y in 0..oh {
        let dst = &mut out[y * ow..(y + 1) * ow];
        for (i, &ki) in k.iter().enumerate() {
            for (d, s) in dst.iter_mut().zip(&tmp[(y + i) * ow..(y + i + 1) * ow]) {
                *d += ki * s;
            }
        }
    }
    out
}

/// Mean SSIM of two `h x w` planes (values in 0..255).
pub fn ssim_plane(a: &[f64], b: &[f64], w: usize, h: usize) -> Result<f64, String> {
    if w.min(h) < 11 {
        return Err("image smaller than the 11x11 SSIM window".into());
    }
    let k = gauss1d(11, 1.5);
    let c1 = (0.01f64 * 255.0).powi(2);
    let c2 = (0.03f64 * 255.0).powi(2);
    let prod = |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(x, y)| x * y).collect() };
    let mu1 = filt_valid(a, w, h, &k);
    let mu2 = filt_valid(b, w, h, &k);
    let e11 = filt_valid(&prod(a, a), w, h, &k);
    let e22 = filt_valid(&prod(b, b), w, h, &k);
    let e12 = filt_valid(&prod(a, b), w, h, &k);
    let mut sum = 0.0f64;
    for i in 0..mu1.len() {
        let (m1, m2) = (mu1[i], mu2[i]);
        let (mu11, mu22, mu12) = (m1 * m1, m2 * m2, m1 * m2);
        let (s11, s22, s12) = (e11[i] - mu11, e22[i] - mu22, e12[i] - mu12);
        sum += ((2.0 * mu12 + c1) * (2.0 * s12 + c2)) / ((mu11 + mu22 + c1) * (s11 + s22 + c2));
    }
    Ok(sum / mu1.len() as f64)
}

const B: usize = 8;

/// The mean squared step between neighbours across the 8x8 block edges minus
/// that inside the blocks (D_B - D_Bc of Yim & Bovik 2011) of one `h x w` plane:
/// positive where the grid shows, negative where the edges are smoother than
/// the interiors. [`bef`] is its positive part, scaled.
pub fn block_step_excess(x: &[f64], w: usize, h: usize) -> f64 {
    let (mut d_b, mut d_bc) = (0.0f64, 0.0f64);
    for y in 0..h {
        for i in 0..w.saturating_sub(1) {
            let d = x[y * w + i] - x[y * w + i + 1];
            if i % B == B - 1 {
                d_b += d * d;
            } else {
                d_bc += d * d;
            }
        }
    }
    for j in 0..h.saturating_sub(1) {
        let boundary = j % B == B - 1;
        for i in 0..w {
            let d = x[j * w + i] - x[(j + 1) * w + i];
            if boundary {
                d_b += d * d;
            } else {
                d_bc += d * d;
            }
        }
    }
    let (wf, hf, bf) = (w as f64, h as f64, B as f64);
    let n_hb = hf * (wf / bf - 1.0);
    let n_hbc = hf * (wf - 1.0) - n_hb;
    let n_vb = wf * (hf / bf - 1.0);
    let n_vbc = wf * (hf - 1.0) - n_vb;
    d_b / (n_hb + n_vb) - d_bc / (n_hbc + n_vbc)
}

/// Blocking effect factor of one `h x w` plane (Yim & Bovik 2011, block 8).
pub fn bef(x: &[f64], w: usize, h: usize) -> f64 {
    let excess = block_step_excess(x, w, h);
    if excess <= 0.0 {
        return 0.0;
    }
    let eta = (B as f64).log2() / (w.min(h) as f64).log2();
    eta * excess
}

/// Metrics of one pair, named as in `metrics.py`'s JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub width: usize,
    pub height: usize,
    pub psnr_y: f64,
    pub ssim_y: f64,
    pub psnrb_y: f64,
    pub bef_y: f64,
    pub psnr_rgb: f64,
    pub ssim_rgb: f64,
    pub psnrb_rgb: f64,
}

impl Metrics {
    /// Value by `metrics.py` key (`KEYS` plus `bef_y`).
    pub fn get(&self, key: &str) -> Option<f64> {
        Some(match key {
            "psnr_y" => self.psnr_y,
            "ssim_y" => self.ssim_y,
            "psnrb_y" => self.psnrb_y,
            "bef_y" => self.bef_y,
            "psnr_rgb" => self.psnr_rgb,
            "ssim_rgb" => self.ssim_rgb,
            "psnrb_rgb" => self.psnrb_rgb,
            _ => return None,
        })
    }
}

/// All metrics of `test` against the reference `reference`.
pub fn measure(reference: &Image, test: &Image, border: usize, round_y: bool) -> Result<Metrics, String> {
    let (mut r, mut t) = (reference.clone(), test.clone());
    if r.channels != t.channels {
        // promote grey to RGB so a grey reference can be compared with RGB output
        r = r.to_rgb();
        t = t.to_rgb();
    }
    if (r.width, r.height) != (t.width, t.height) {
        return Err(format!("size mismatch {}x{} vs {}x{}", r.width, r.height, t.width, t.height));
    }
    let (r, t) = (r.crop(border)?, t.crop(border)?);
    let (w, h) = (r.width, r.height);
    let (y_r, y_t) = (to_y(&r, round_y), to_y(&t, round_y));
    let m_y = mse(&y_r, &y_t);
    let bef_y = bef(&y_t, w, h);
    let (psnr_y, ssim_y, psnrb_y) = (psnr_from_mse(m_y), ssim_plane(&y_r, &y_t, w, h)?, psnr_from_mse(m_y + bef_y));
    let (psnr_rgb, ssim_rgb, psnrb_rgb) = if r.channels == 3 {
        let (rp, tp): (Vec<_>, Vec<_>) = (0..3).map(|c| (r.plane(c), t.plane(c))).unzip();
        let m_rgb = mse(&r.plane_all(), &t.plane_all());
        let mut s = 0.0;
        for c in 0..3 {
            s += ssim_plane(&rp[c], &tp[c], w, h)?;
        }
        (psnr_from_mse(m_rgb), s / 3.0, psnr_from_mse(m_rgb + bef_y))
    } else {
        (psnr_y, ssim_y, psnrb_y)
    };
    Ok(Metrics { width: w, height: h, psnr_y, ssim_y, psnrb_y, bef_y, psnr_rgb, ssim_rgb, psnrb_rgb })
}

/// Matched `(name, reference, test)` files and the names only one folder has.
pub type Pairs = (Vec<(String, PathBuf, PathBuf)>, Vec<String>);

/// Pairs of (name, reference path, test path) for two folders, matched by file
/// name, then by stem (`ref/x.png` pairs with `test/x.jpg`), sorted by name;
/// plus the reference names with no match.
pub fn pairs(ref_dir: &Path, test_dir: &Path) -> std::io::Result<Pairs> {
    fn listing(d: &Path) -> std::io::Result<Vec<String>> {
        let mut v = vec![];
        for e in std::fs::read_dir(d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let ext = Path::new(&name).extension().map(|x| x.to_string_lossy().to_lowercase());
            if ext.is_some_and(|x| IMG_EXT.contains(&x.as_str())) && e.path().is_file() {
                v.push(name);
            }
        }
        v.sort();
        Ok(v)
    }
    let stem = |f: &str| Path::new(f).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tests = listing(test_dir)?;
    let mut by_stem = std::collections::HashMap::new();
    for f in &tests {
        by_stem.entry(stem(f)).or_insert_with(|| f.clone());
    }
    let (mut out, mut missing) = (vec![], vec![]);
    for f in listing(ref_dir)? {
        let t = if tests.contains(&f) { Some(f.clone()) } else { by_stem.get(&stem(&f)).cloned() };
        match t {
            Some(t) => out.push((f.clone(), ref_dir.join(&f), test_dir.join(t))),
            None => missing.push(f),
        }
    }
    Ok((out, missing))
}

/// A number as JSON the way Python's `json` writes it (`Infinity`, `NaN`).
pub fn json_num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v:?}")
    }
}
