//! Do no harm: keep a restoration consistent with the JPEG it came from.
//!
//! Before a frame is restored, [`Analysis::of`] reads its JPEG past from its
//! pixels (JFIF's YCbCr planes, [`super::quant`]): a frame whose blocks sit on
//! quantisation lattices was decoded from a JPEG, and the lattices say how
//! hard it was compressed; a frame with detail but no lattice never was (or
//! was scaled since); a flat frame does not say. Only the first kind is
//! restored. After restoration, [`Analysis::apply`] clamps every block of the
//! result back into the quantisation intervals of the input (the
//! projection onto the JPEG's constraint set): whatever the model does, the
//! picture stays one that the same JPEG file could have been made from.
//! The closer the JPEG is to its source, the less of the model's change is
//! kept ([`Profile::strength`]): at high quality the error left by the JPEG
//! is below what a model trained on photos gets right on graphics, text and
//! test patterns, and the frame is left as it is. Rendered content that
//! swings to full black, white or colour ([`SYNTHETIC`]) is treated more
//! carefully than photos ([`NATURAL`]).
use super::kernels::simd_fn;
use super::quant::{self, Evidence, IjgFit, Plane, Steps, CHROMA_TABLE, LUMA_TABLE};
use super::RgbImage;

/// Colour planes kept between frames by their owner (the engine): the
/// planes of [`Analysis::of_in`] and of its `apply` come from here and go back
/// once dead, so the frames of a stream reuse their memory (a fresh buffer
/// costs the clearing of its pages on first touch: about 3 ms a 720p frame's
/// three planes on 2 cores). It keeps at most [`Spare::KEEP`] planes, all of
/// one frame size.
#[derive(Debug, Default)]
pub struct Spare(std::sync::Mutex<Vec<Vec<f32>>>);

impl Spare {
    /// Planes an analysed and restored frame uses (three each).
    pub const KEEP: usize = 6;

    /// A plane of `n` values, kept or fresh (contents unspecified).
    fn take(&self, n: usize) -> Vec<f32> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match kept.iter().position(|v| v.len() == n) {
            Some(i) => kept.swap_remove(i),
            None => vec![0f32; n],
        }
    }

    /// `v` is dead: keep it (planes of another size go).
    fn put(&self, v: Vec<f32>) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|k| k.len() == v.len());
        if kept.len() < Self::KEEP {
            kept.push(v);
        }
    }
}

/// JFIF's full-range BT.601: R, G, B -> Y, Cb, Cr (offset 128), unrounded.
fn to_ycc(img: &RgbImage, spare: &Spare) -> [Plane; 3] {
    use rayon::prelude::*;
    let (w, n) = (img.width, img.width * img.height);
    let mut planes = [spare.take(n), spare.take(n), spare.take(n)];
    let [y, cb, cr] = &mut planes;
    y.par_chunks_mut(w.max(1))
        .zip(cb.par_chunks_mut(w.max(1)))
        .zip(cr.par_chunks_mut(w.max(1)))
        .zip(img.data.par_chunks(3 * w.max(1)))
        .for_each(|(((y, cb), cr), row)| ycc_row(row, y, cb, cr));
    planes.map(|data| Plane { width: img.width, height: img.height, data })
}

simd_fn! {
    /// One row of [`to_ycc`].
    fn ycc_row(row: &[u8], y: &mut [f32], cb: &mut [f32], cr: &mut [f32]) {
        for (i, px) in row.chunks_exact(3).enumerate() {
            let (r, g, b) = (px[0] as f32, px[1] as f32, px[2] as f32);
            y[i] = 0.299 * r + 0.587 * g + 0.114 * b;
            cb[i] = -0.168_735_9 * r - 0.331_264_1 * g + 0.5 * b + 128.0;
            cr[i] = 0.5 * r - 0.418_687_6 * g - 0.081_312_4 * b + 128.0;
        }
    }
}

/// The inverse of [`to_ycc`], rounded to codes.
fn write_rgb(planes: &[Plane; 3], img: &mut RgbImage) {
    use rayon::prelude::*;
    let w = img.width.max(1);
    img.data.par_chunks_mut(3 * w).enumerate().for_each(|(row, out)| {
        let at = |c: usize| &planes[c].data[row * w..(row + 1) * w];
        rgb_row(at(0), at(1), at(2), out)
    });
}

simd_fn! {
    /// One row of [`write_rgb`].
    fn rgb_row(y: &[f32], cb: &[f32], cr: &[f32], out: &mut [u8]) {
        let code = |v: f32| (v.clamp(0.0, 255.0) + 0.5) as u8;
        for (((px, &y), &cb), &cr) in out.chunks_exact_mut(3).zip(y).zip(cb).zip(cr) {
            let (cb, cr) = (cb - 128.0, cr - 128.0);
            px[0] = code(y + 1.402 * cr);
            px[1] = code(y - 0.344_136_3 * cb - 0.714_136_3 * cr);
            px[2] = code(y + 1.772 * cb);
        }
    }
}

/// How the guard treats one kind of frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    /// JPEG qualities up to this keep all of the model's change ...
    pub full_below: f32,
    /// ... falling linearly to none from this quality on (the frame is then
    /// left as it is).
    pub none_from: f32,
    /// Half-width, in steps, of the interval a coefficient the JPEG kept
    /// (non-zero level) may move in ([`quant::project`]; 1/2 is the whole
    /// quantisation interval).
    pub nonzero_half_width: f32,
}

impl Profile {
    /// The share of the model's change kept at JPEG quality `qf`.
    pub fn strength(&self, qf: f32) -> f32 {
        ((self.none_from - qf) / (self.none_from - self.full_below)).clamp(0.0, 1.0)
    }
}

/// Photos and most video: measured on the 9 eval photos
/// (`examples/evaluate.py`) and the content set
/// (`examples/evaluate_content.py`). The whole interval for kept
/// coefficients deblocks best (PSNR-B-Y at QF 5 29.37 dB, 29.15 with a
/// quarter step); at quality 90-95 the model's change costs graphics (text,
/// screens, cartoons) 0.2-1 dB even within the intervals while photos gain
/// at most 0.4 dB, so none of it is kept from 80.
pub const NATURAL: Profile = Profile { full_below: 50.0, none_from: 80.0, nonzero_half_width: 0.5 };

/// Rendered content that swings to full black and white or full colour
/// (test patterns, cards, slides): a model trained on photos smooths its
/// sharp, strong detail (a zone plate at quality 30-50 lost 0.4-0.9 dB with
/// the whole change kept, 0.1-0.5 dB with kept coefficients held to a
/// quarter step) and its saturated colour edges (a card game at quality 50:
/// -0.2 dB, all in chroma).
pub const SYNTHETIC: Profile = Profile { full_below: 20.0, none_from: 45.0, nonzero_half_width: 0.25 };

/// A frame is synthetic when at least this share of its 8x8 blocks hold a
/// sample at 0 or 255 in R, G or B: 0.95-0.98 for the content set's test
/// patterns, cards and white pages, at most 0.42 for the 9 eval photos (0.19
/// on average) and 0.0-0.18 for screenshots, subtitles over video and dark scenes.
pub const SYNTHETIC_CLIPPED_SHARE: f32 = 0.6;

/// Side of the tiles over which chroma activity is measured: a 4:2:0
/// JPEG's chroma block covers 16x16 pixels.
const ACTIVITY_TILE: usize = 16;

/// How much of the input's local chroma range a restoration may move a
/// chroma sample by (0.25, 0.5 and 1 measured the same on photos and the
/// content set; 0 would keep the input's colour).
const ACTIVITY_SHARE: f32 = 0.5;

/// Subsampled chroma, upsampled by the decoder, shows no lattice to project
/// onto. Limit the change instead to a share of the input's chroma range
/// around each sample (the tile's and its 8 neighbours'): where the input's
/// colour is flat (grey patterns, white pages, black) the model may not
/// paint colour in; where JPEG left chroma blocks and smears, it may move
/// them. Returns the number of tiles changed.
fn limit_to_activity(input: &Plane, output: &mut Plane) -> usize {
    use rayon::prelude::*;
    let (w, h, t) = (input.width, input.height, ACTIVITY_TILE);
    let (tw, th) = (w.div_ceil(t), h.div_ceil(t));
    if tw * th == 0 {
        return 0;
    }
    // each tile's range, a row of tiles at a time in parallel
    let mut range = vec![0f32; tw * th];
    range.par_chunks_mut(tw).enumerate().for_each(|(ty, row)| {
        for (tx, r) in row.iter_mut().enumerate() {
            let (mut lo, mut hi) = (f32::MAX, f32::MIN);
            for y in ty * t..((ty + 1) * t).min(h) {
                for &v in &input.data[y * w + tx * t..y * w + ((tx + 1) * t).min(w)] {
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
            }
            *r = hi - lo;
        }
    });
    // then each row of tiles' samples (t rows of the plane) in parallel
    output
        .data
        .par_chunks_mut(t * w)
        .enumerate()
        .map(|(ty, rows)| {
            let mut changed = 0;
            for tx in 0..tw {
                let mut r = 0f32;
                for ny in ty.saturating_sub(1)..(ty + 2).min(th) {
                    for nx in tx.saturating_sub(1)..(tx + 2).min(tw) {
                        r = r.max(range[ny * tw + nx]);
                    }
                }
                let lim = ACTIVITY_SHARE * r;
                let mut moved = false;
                let (x0, x1) = (tx * t, ((tx + 1) * t).min(w));
                for (dy, row) in rows.chunks_mut(w).enumerate() {
                    let y = ty * t + dy;
                    for (o, &i) in row[x0..x1].iter_mut().zip(&input.data[y * w + x0..y * w + x1]) {
                        let v = o.clamp(i - lim, i + lim);
                        moved |= v != *o;
                        *o = v;
                    }
                }
                changed += moved as usize;
            }
            changed
        })
        .sum()
}

/// What a frame's pixels say about its JPEG past, and the input planes the
/// guard projects onto.
#[derive(Debug)]
pub struct Analysis {
    /// Steps measured on Y, Cb, Cr (chroma only for frames whose luma has
    /// an IJG table; otherwise nothing measured there).
    pub steps: [Steps; 3],
    /// The luma steps matched against the IJG tables.
    pub fit: Option<IjgFit>,
    /// Share of the 8x8 blocks with a sample at 0 or 255 in R, G or B.
    pub clipped_share: f32,
    planes: [Plane; 3],
    /// where the planes come from and go back to
    spare: std::sync::Arc<Spare>,
}

impl Drop for Analysis {
    fn drop(&mut self) {
        for p in &mut self.planes {
            self.spare.put(std::mem::take(&mut p.data));
        }
    }
}

impl Analysis {
    pub fn of(img: &RgbImage) -> Self {
        Self::of_in(img, &Default::default())
    }

    /// [`Analysis::of`], the planes (its own and those of
    /// [`Analysis::apply`]) from and back to `spare`.
    pub fn of_in(img: &RgbImage, spare: &std::sync::Arc<Spare>) -> Self {
        let planes = to_ycc(img, spare);
        // blocks with a clamped R, G or B sample: the conversion to RGB lost
        // their YCbCr values
        let w = img.width;
        let clipped = |bx: usize, by: usize| {
            (0..quant::B).any(|y| {
                img.data[3 * ((by * quant::B + y) * w + bx * quant::B)..][..3 * quant::B]
                    .iter()
                    .any(|&v| v == 0 || v == 255)
            })
        };
        let luma = quant::estimate_steps(&planes[0], &clipped);
        let fit = quant::fit_ijg(&luma, &LUMA_TABLE);
        // chroma steps only matter for 4:4:4 JPEGs of IJG encoders (see
        // `chroma_fit`): measured only when the luma has an IJG table
        let measure_chroma =
            luma.evidence() == Evidence::Quantised && fit.as_ref().is_some_and(|f| f.agreement >= quant::FIT_AGREEMENT);
        let chroma = |c: usize| {
            if measure_chroma {
                quant::estimate_steps(&planes[c], &clipped)
            } else {
                Steps { step: [None; 64] }
            }
        };
        let steps = [luma, chroma(1), chroma(2)];
        let (nbx, nby) = planes[0].blocks();
        let n = (nbx * nby).max(1);
        let clipped_share = (0..nbx * nby).filter(|&i| clipped(i % nbx, i / nbx)).count() as f32 / n as f32;
        Analysis { steps, fit, clipped_share, planes, spare: spare.clone() }
    }

    /// [`SYNTHETIC`] or [`NATURAL`], by [`Analysis::clipped_share`].
    pub fn profile(&self) -> Profile {
        if self.clipped_share >= SYNTHETIC_CLIPPED_SHARE {
            SYNTHETIC
        } else {
            NATURAL
        }
    }

    /// The luma's evidence: whether the frame was decoded from a JPEG.
    pub fn evidence(&self) -> Evidence {
        self.steps[0].evidence()
    }

    /// The JPEG quality of a decoded JPEG, read from its luma steps: the IJG
    /// quality when an IJG table explains them, else the IJG quality of
    /// equivalent step sizes ([`quant::equivalent_quality`]: FFmpeg's MJPEG
    /// at `-q:v 20` reads as 14). None for frames that are not decoded JPEGs.
    pub fn quality(&self) -> Option<f32> {
        if self.evidence() != Evidence::Quantised {
            return None;
        }
        match &self.fit {
            Some(fit) if fit.agreement >= quant::FIT_AGREEMENT => Some(fit.quality),
            _ => quant::equivalent_quality(&self.steps[0], &LUMA_TABLE),
        }
    }

    /// The IJG chroma table of plane `c` (1: Cb, 2: Cr) when that plane was
    /// coded at full resolution (4:4:4): its steps fit the chroma table at
    /// the luma's quality, as every IJG encoder scales both tables with one
    /// quality. Subsampled chroma, upsampled by the decoder, has no lattice
    /// of its own, but its flat stretches can mimic one: on the eval photos
    /// at QF 5 (4:2:0) projecting such chroma on a spurious table cost
    /// 0.23 dB RGB PSNR.
    fn chroma_fit(&self, c: usize) -> Option<IjgFit> {
        let luma = self.fit.as_ref().filter(|f| f.agreement >= quant::FIT_AGREEMENT)?.quality;
        if self.steps[c].evidence() != Evidence::Quantised {
            return None;
        }
        quant::fit_ijg(&self.steps[c], &CHROMA_TABLE)
            .filter(|f| f.agreement >= quant::FIT_AGREEMENT && (f.quality - luma).abs() <= 2.0)
    }

    /// Keep `alpha` of the model's change to the frame (`output` is the
    /// restored frame) and clamp the result into the input's quantisation
    /// intervals: always in luma, in a chroma plane when that plane shows its
    /// own lattice (4:4:4 JPEGs; subsampled chroma upsampled by the decoder
    /// shows none, and keeps the restoration's colour). Returns the number of
    /// 8x8 blocks the clamp moved.
    pub fn apply(&self, output: &mut RgbImage, alpha: f32) -> usize {
        assert_eq!((output.width, output.height), (self.planes[0].width, self.planes[0].height), "the analysed frame");
        let mut out = to_ycc(output, &self.spare);
        if alpha < 1.0 {
            use rayon::prelude::*;
            for (o, i) in out.iter_mut().zip(&self.planes) {
                o.data.par_chunks_mut(1 << 16).zip(i.data.par_chunks(1 << 16)).for_each(|(o, i)| {
                    for (a, b) in o.iter_mut().zip(i) {
                        *a = b + alpha * (*a - b);
                    }
                });
            }
        }
        let half = self.profile().nonzero_half_width;
        let mut moved =
            quant::project(&self.planes[0], &mut out[0], &quant::full_table(&self.steps[0], self.fit.as_ref()), half);
        for (c, plane) in out.iter_mut().enumerate().skip(1) {
            match self.chroma_fit(c) {
                Some(fit) => {
                    moved +=
                        quant::project(&self.planes[c], plane, &quant::full_table(&self.steps[c], Some(&fit)), half)
                }
                None => moved += limit_to_activity(&self.planes[c], plane),
            }
        }
        if moved > 0 || alpha < 1.0 {
            write_rgb(&out, output);
        }
        out.into_iter().for_each(|p| self.spare.put(p.data));
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_round_trip_is_exact_on_codes() {
        let data: Vec<u8> = (0..64 * 48 * 3).map(|i| ((i * 7919) % 256) as u8).collect();
        let img = RgbImage::new(64, 48, data).unwrap();
        let mut back = img.clone();
        write_rgb(&to_ycc(&img, &Spare::default()), &mut back);
        assert_eq!(back, img);
    }
}
