//! Motion-compensated temporal smoothing of restored video frames.
//!
//! Each frame is restored on its own, so what each frame's JPEG did differently
//! (fresh sensor noise rounded otherwise; on a moving picture the 8x8 grid
//! falling elsewhere on the scene) comes out of the restorer as frame-to-frame
//! differences in the restored detail: the video flickers. [`TemporalFilter`]
//! keeps the previous input and output, finds the block motion from the
//! previous output to the current restoration ([`super::motion`]; the
//! restorations, not the inputs, whose shared 8x8 grid draws the match to
//! itself), and blends each restored pixel toward the previous output at its
//! matched position where the motion-compensated *input* did not change beyond
//! what compression noise explains; where it changed (a new object, a cut, a
//! light switched on, a wrong match) the restored frame is kept as it is, so
//! nothing ghosts.
//!
//! Per pixel the change `s` is the magnitude of the 5x5 mean of the signed
//! motion-compensated input change (compression noise averages out over the
//! window, a real change does not), averaged over the channels; the previous
//! output's weight is `strength * max(0, 1 - s / threshold)`, lowered further
//! where the mean absolute change is an outlier for the frame (a wrong match on
//! fine texture) and nothing after a cut. The result never differs from the
//! restored frame by more than `threshold` in any channel. Strength 0 leaves
//! the frame untouched (bit-exact) and drops the history; a frame of another
//! size starts a new history. [`TemporalFilter::carry`] shows the previous
//! output, moved the same way, on live frames that are not restored.
use super::kernels::simd_fn;
use super::motion::{self, Luma};
use super::{EngineError, Result, RgbImage};

/// The motion threshold in code values: where the motion-compensated input
/// changed by this much (the 5x5 mean of the signed change, averaged in
/// magnitude over the channels), the
/// previous output is not used; below it, its weight falls linearly from the
/// full strength. It also bounds how far a pixel moves from its restoration.
/// Compression noise changes a moving picture's pixels by 4-6 on average at
/// quality 15 (the 8x8 grid falls elsewhere on the scene each frame) but
/// averages out over a window; a change of lighting or a wrong match does not.
pub const DEFAULT_MOTION_THRESHOLD: f32 = 12.0;

/// A pixel whose mean absolute motion-compensated change exceeds this many
/// times the frame's median (a wrong match on fine texture: the signed change
/// averages out there too) loses the previous output's weight gradually, all
/// of it at twice that.
const OUTLIER_FACTOR: f32 = 3.0;

/// The least median used for the outlier test (a still, clean picture).
const LEAST_MEDIAN: f32 = 2.0;

/// A frame whose median mean absolute motion-compensated change exceeds this
/// is another picture (a cut): no pixel takes anything from the previous one.
/// JPEG at quality 5 changes a moving picture by about half of it.
const CUT_MEDIAN: f32 = 20.0;

/// Half-width of the motion window (5x5).
const RADIUS: usize = 2;

/// Recursive, motion-compensated, motion-adaptive smoothing over a sequence of
/// restored frames.
#[derive(Clone, Debug)]
pub struct TemporalFilter {
    threshold: f32,
    /// Previous input, previous output and the luma of the previous output,
    /// one size.
    history: Option<(RgbImage, RgbImage, Luma)>,
    /// [`Matched`]'s buffers, kept for the next frame
    scratch: Matched,
}

impl Default for TemporalFilter {
    fn default() -> Self {
        Self::new(DEFAULT_MOTION_THRESHOLD)
    }
}

impl TemporalFilter {
    /// A filter with no history; `threshold` (code values, > 0) is the input
    /// change that counts as motion and the largest change the filter makes.
    pub fn new(threshold: f32) -> Self {
        let threshold = if threshold.is_finite() && threshold > 0.0 { threshold } else { DEFAULT_MOTION_THRESHOLD };
        Self { threshold, history: None, scratch: Matched::default() }
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Forget the previous frames (flush, discontinuity, new caps, off).
    pub fn reset(&mut self) {
        self.history = None;
    }

    /// Whether a previous frame is kept.
    pub fn has_history(&self) -> bool {
        self.history.is_some()
    }

    /// Smooth `restored` (the restoration of `input`) toward the previous
    /// output moved along the picture's motion, with `strength` 0..1 (the
    /// weight of the previous output where the input is still; 0 = off).
    /// Keeps `input` and the result for the next frame.
    pub fn apply(&mut self, strength: f32, input: &RgbImage, restored: &mut RgbImage) -> Result<()> {
        if (input.width, input.height) != (restored.width, restored.height)
            || input.data.len() != restored.data.len()
            || input.data.len() != input.width * input.height * 3
        {
            return Err(EngineError::InvalidInput(format!(
                "temporal filter: input {}x{} ({} bytes) and restored {}x{} ({} bytes) differ",
                input.width,
                input.height,
                input.data.len(),
                restored.width,
                restored.height,
                restored.data.len()
            )));
        }
        let strength = if strength.is_finite() { strength.clamp(0.0, 1.0) } else { 0.0 };
        if strength == 0.0 {
            self.reset();
            return Ok(());
        }
        let same_size = matches!(&self.history, Some((prev, _, _))
            if (prev.width, prev.height) == (input.width, input.height));
        if same_size {
            let (prev_in, prev_out, prev_luma) = self.history.as_ref().expect("checked above");
            // the motion is found on the restorations: the JPEG input's 8x8
            // grid stays put while the picture moves, and matches itself
            let luma = Luma::of_rgb(&restored.data, input.width, input.height);
            let field = motion::estimate(prev_luma, &luma);
            let m = &mut self.scratch;
            m.compute(prev_in, input, &field, self.threshold);
            m.blend(restored, prev_out, strength, self.threshold);
        }
        self.adopt(input, restored);
        Ok(())
    }

    /// Make `(input, output)` the previous frame (a restoration made
    /// elsewhere, e.g. in the background, or with smoothing off), so that the
    /// next frame is smoothed or carried from it. Sizes must agree (else the
    /// history is dropped).
    pub fn adopt(&mut self, input: &RgbImage, output: &RgbImage) {
        if (input.width, input.height, input.data.len()) != (output.width, output.height, output.data.len()) {
            self.reset();
            return;
        }
        let luma = Luma::of_rgb(&output.data, output.width, output.height);
        // Reuse the history's buffers.
        match &mut self.history {
            Some((prev_in, prev_out, prev_luma)) => {
                prev_in.clone_from(input);
                prev_out.clone_from(output);
                *prev_luma = luma;
            }
            None => self.history = Some((input.clone(), output.clone(), luma)),
        }
    }

    /// Carry the previous output onto a frame that is not restored (a live
    /// frame that would have been late): per pixel,
    /// `out = input + w * (prev_out - input)`, `prev_out` taken where the
    /// pixel was in the previous frame (the block motion from the previous
    /// output to this input) and `w` falling from 1 to 0 with the
    /// motion-compensated input change as for [`Self::apply`] at full
    /// strength, the change bounded by the threshold. Where the picture has
    /// not changed but for its motion the frame shows the previous output
    /// moved along (restored detail, without this frame's new compression
    /// noise), so restored and unrestored frames do not alternate visibly;
    /// where it changed it is left as it is. The result becomes the previous
    /// frame. Returns false (and leaves `out` as `input`) when there is no
    /// previous frame of this size.
    pub fn carry(&mut self, input: &RgbImage, out: &mut RgbImage) -> bool {
        let (w, h) = (input.width, input.height);
        let n = w * h * 3;
        let Some((prev_in, prev_out, prev_luma)) = self.history.as_ref() else {
            return false;
        };
        if [prev_in, prev_out, &*out].iter().any(|i| (i.width, i.height) != (w, h) || i.data.len() != n)
            || input.data.len() != n
        {
            return false;
        }
        // matched against the previous output: two JPEG frames share their
        // 8x8 grid, which draws the match to itself rather than to the motion
        let field = motion::estimate(prev_luma, &Luma::of_rgb(&input.data, w, h));
        let m = &mut self.scratch;
        m.compute(prev_in, input, &field, self.threshold);
        // the input, blended as `apply` blends a restoration at full strength
        out.data.copy_from_slice(&input.data);
        m.blend(out, prev_out, 1.0, self.threshold);
        self.adopt(input, out);
        true
    }
}

simd_fn! {
    /// One row of the blend of [`TemporalFilter::apply`] and [`TemporalFilter::carry`]: each pixel of `row`
    /// moves towards the previous output at its match, by `strength` times
    /// its weight, at most `t` code values.
    fn blend_row(row: &mut [u8], src: &[u32], weight: &[f32], prev_out: &[u8], strength: f32, t: f32) {
        for ((px, &src), &weight) in row.chunks_exact_mut(3).zip(src).zip(weight) {
            let a = strength * weight;
            if a == 0.0 {
                continue;
            }
            for (k, v) in px.iter_mut().enumerate() {
                let r = *v as f32;
                let d = (a * (prev_out[src as usize * 3 + k] as f32 - r)).clamp(-t, t);
                *v = (r + d).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Where each pixel of the current frame was in the previous one, and how far
/// the previous frame may stand in for it there.
#[derive(Clone, Debug, Default)]
struct Matched {
    /// Per pixel: the index of its match in the previous frame (any index
    /// where `weight` is 0).
    src: Vec<u32>,
    /// Per pixel, 0..1: 1 - s / threshold, s the mean over the channels of the
    /// magnitude of the 5x5 mean (clipped at the borders) of the signed motion-compensated
    /// input change, times the outlier factor of the mean absolute change; 0
    /// where the match lies outside the previous frame, and everywhere after
    /// a cut.
    weight: Vec<f32>,
    /// the signed change of each channel and the mean absolute change
    planes: Vec<f32>,
    /// their box means, and [`box_mean`]'s row sums
    means: [Vec<f32>; 4],
    rows: Vec<f32>,
}

/// [`Matched::new`]'s mark for a pixel whose match lies outside the previous frame.
const NO_MATCH: u32 = u32::MAX;

impl Matched {
    /// Move each pixel of `out` (a frame of the size computed) towards
    /// `prev_out` at its match, by `strength` times its weight, at most `t`
    /// code values ([`blend_row`], rows in parallel).
    fn blend(&self, out: &mut RgbImage, prev_out: &RgbImage, strength: f32, t: f32) {
        use rayon::prelude::*;
        let w = out.width.max(1);
        out.data
            .par_chunks_mut(3 * w)
            .zip(self.src.par_chunks(w).zip(self.weight.par_chunks(w)))
            .for_each(|(row, (src, weight))| blend_row(row, src, weight, &prev_out.data, strength, t));
    }

    /// The matches and weights of `input` against `prev_in` under `field`,
    /// into this one's buffers (kept from frame to frame: a fresh buffer
    /// costs the clearing of its pages).
    fn compute(&mut self, prev_in: &RgbImage, input: &RgbImage, field: &motion::Field, threshold: f32) {
        use rayon::prelude::*;
        let (w, h) = (input.width, input.height);
        let (n, w1) = (w * h, w.max(1));
        let Self { src, weight, planes, means, rows } = self;
        // the match of each pixel, by rows
        refill(src, n, NO_MATCH);
        src.par_chunks_mut(w1).enumerate().for_each(|(y, row)| {
            for (x, s) in row.iter_mut().enumerate() {
                let (dx, dy) = field.at(x, y);
                let (sx, sy) = (x as i64 + dx as i64, y as i64 + dy as i64);
                if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
                    *s = (sy as usize * w + sx as usize) as u32;
                }
            }
        });
        // per channel signed change, and the mean absolute change, in one pass
        refill(planes, 4 * n, 0.0);
        {
            let (signed, abs) = planes.split_at_mut(3 * n);
            let (r, rest) = signed.split_at_mut(n);
            let (g, b) = rest.split_at_mut(n);
            r.par_chunks_mut(w1)
                .zip(g.par_chunks_mut(w1))
                .zip(b.par_chunks_mut(w1))
                .zip(abs.par_chunks_mut(w1))
                .zip(src.par_chunks(w1).zip(input.data.par_chunks(3 * w1)))
                .for_each(|((((r, g), b), a), (src, row))| change_row(row, &prev_in.data, src, [r, g, b], a));
        }
        for (plane, mean) in planes.chunks(n.max(1)).zip(means.iter_mut()) {
            box_mean(plane, w, h, rows, mean);
        }
        let [r, g, b, abs] = &*means;
        let typical = median(abs);
        let lo = OUTLIER_FACTOR * typical.max(LEAST_MEDIAN);
        let cut = typical > CUT_MEDIAN;
        refill(weight, n, 0.0);
        weight.par_chunks_mut(w1).zip(src.par_chunks_mut(w1)).enumerate().for_each(|(y, (weights, src))| {
            let span = y * w..y * w + weights.len();
            let signed = [&r[span.clone()], &g[span.clone()], &b[span.clone()]];
            weight_row(weights, src, signed, &abs[span], lo, threshold, cut);
        });
    }
}

simd_fn! {
    /// One row of [`Matched::compute`]'s weights from the box means of the
    /// signed changes and of the absolute change; a pixel without a match
    /// gets weight 0 and source index 0 (any index serves there).
    fn weight_row(weights: &mut [f32], src: &mut [u32], signed: [&[f32]; 3], abs: &[f32], lo: f32, threshold: f32, cut: bool) {
        let [r, g, b] = signed;
        for (((((wt, s), &r), &g), &b), &abs) in weights.iter_mut().zip(src.iter_mut()).zip(r).zip(g).zip(b).zip(abs) {
            let matched = *s != NO_MATCH;
            // summed in channel order (as `Iterator::sum`, whose -0.0 start
            // changes no sum of magnitudes)
            let sm = (r.abs() + g.abs() + b.abs()) / 3.0;
            let outlier = (2.0 - abs / lo).clamp(0.0, 1.0);
            let v = (1.0 - sm / threshold).max(0.0) * outlier;
            *wt = if matched && !cut { v } else { 0.0 };
            *s = if matched { *s } else { 0 };
        }
    }
}

/// `v` as `n` copies of `value`, in its own memory when it has room.
fn refill<T: Copy + Send + Sync>(v: &mut Vec<T>, n: usize, value: T) {
    use rayon::prelude::*;
    v.truncate(n);
    v.par_chunks_mut(1 << 16).for_each(|c| c.fill(value));
    v.resize(n, value);
}

simd_fn! {
    /// One row of [`Matched::new`]'s input change: per pixel with a match,
    /// the signed change of each channel against the previous input there
    /// and the mean of their magnitudes (0 where there is no match).
    fn change_row(row: &[u8], prev_in: &[u8], src: &[u32], signed: [&mut [f32]; 3], abs: &mut [f32]) {
        let [r, g, b] = signed;
        for (i, &s) in src.iter().enumerate() {
            if s == NO_MATCH {
                continue;
            }
            let d = |k: usize| row[i * 3 + k] as f32 - prev_in[s as usize * 3 + k] as f32;
            let (dr, dg, db) = (d(0), d(1), d(2));
            (r[i], g[i], b[i]) = (dr, dg, db);
            abs[i] = [dr.abs(), dg.abs(), db.abs()].iter().sum::<f32>() / 3.0;
        }
    }
}

/// The median of non-negative values, to a sixteenth of a code value (values
/// above 64 count as 64).
fn median(values: &[f32]) -> f32 {
    use rayon::prelude::*;
    const BINS: usize = 64 * 16 + 1;
    let hist = values
        .par_chunks(1 << 16)
        .map(|chunk| {
            let mut hist = vec![0u32; BINS];
            for &v in chunk {
                hist[((v * 16.0) as usize).min(BINS - 1)] += 1;
            }
            hist
        })
        .reduce(
            || vec![0u32; BINS],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    let half = values.len().div_ceil(2) as u32;
    let mut seen = 0;
    for (b, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= half {
            return b as f32 / 16.0;
        }
    }
    0.0
}

/// Per pixel: the mean over a (2 RADIUS + 1)^2 window clipped at the borders.
/// Separable: window sums along the rows, then down the columns, each value
/// summed in window order from -0.0 (as `Iterator::sum`), a whole row of
/// sums at a time so that the loops vectorise.
/// `rows` is scratch, `out` the result (both resized to `w * h`).
fn box_mean(values: &[f32], w: usize, h: usize, rows: &mut Vec<f32>, out: &mut Vec<f32>) {
    use rayon::prelude::*;
    let w1 = w.max(1);
    // every value of both is written below
    rows.resize(w * h, 0.0);
    out.resize(w * h, 0.0);
    rows.par_chunks_mut(w1).zip(values.par_chunks(w1)).for_each(|(out, line)| box_row(line, out));
    let rows = &*rows;
    out.par_chunks_mut(w1).enumerate().for_each(|(y, out)| {
        let (y0, y1) = (y.saturating_sub(RADIUS), (y + RADIUS + 1).min(h));
        out.fill(-0.0);
        for row in rows[y0 * w..y1 * w].chunks_exact(w1) {
            add_row(out, row);
        }
        let n = (y1 - y0) as f32;
        out.iter_mut().for_each(|o| *o /= n);
    });
}

simd_fn! {
    /// `acc[i] += row[i]`.
    fn add_row(acc: &mut [f32], row: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

/// [`box_mean`]'s window means along one row.
fn box_row(line: &[f32], out: &mut [f32]) {
    let w = line.len();
    let clipped = |x: usize| {
        let (x0, x1) = (x.saturating_sub(RADIUS), (x + RADIUS + 1).min(w));
        line[x0..x1].iter().sum::<f32>() / (x1 - x0) as f32
    };
    if w <= 2 * RADIUS {
        out.iter_mut().enumerate().for_each(|(x, o)| *o = clipped(x));
        return;
    }
    // whole windows: out[x] = line[x - R] + .. + line[x + R], in that order
    let inner = &mut out[RADIUS..w - RADIUS];
    inner.fill(-0.0);
    for k in 0..=2 * RADIUS {
        add_row(inner, &line[k..k + w - 2 * RADIUS]);
    }
    let n = (2 * RADIUS + 1) as f32;
    inner.iter_mut().for_each(|o| *o /= n);
    for x in (0..RADIUS).chain(w - RADIUS..w) {
        out[x] = clipped(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift noise in -amp..=amp.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, amp: i32) -> i32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % (2 * amp as u64 + 1)) as i32 - amp
        }
    }

    /// A textured scene shifted by `dx`, plus noise.
    fn frame(w: usize, h: usize, dx: usize, rng: &mut Rng, amp: i32) -> RgbImage {
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let sx = x + dx;
                let base = if (sx / 8 + y / 8).is_multiple_of(2) { 60 } else { 190 };
                for k in 0..3 {
                    let v = base + k * 10 + rng.next(amp);
                    data.push(v.clamp(0, 255) as u8);
                }
            }
        }
        RgbImage::new(w, h, data).unwrap()
    }

    fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
        a.data.iter().zip(&b.data).map(|(&p, &q)| (p as f64 - q as f64).abs()).sum::<f64>() / a.data.len() as f64
    }

    #[test]
    fn a_still_noisy_sequence_flickers_less() {
        let (w, h) = (48, 32);
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut filter = TemporalFilter::default();
        let (mut raw_flicker, mut out_flicker) = (0.0, 0.0);
        let mut prev: Option<(RgbImage, RgbImage)> = None;
        for _ in 0..12 {
            // the "restored" frame: the input with its own noise (the restorer's
            // frame-to-frame differences)
            let input = frame(w, h, 0, &mut rng, 2);
            let raw = frame(w, h, 0, &mut rng, 2);
            let mut out = raw.clone();
            filter.apply(0.5, &input, &mut out).unwrap();
            if let Some((pr, po)) = &prev {
                raw_flicker += mad(&raw, pr);
                out_flicker += mad(&out, po);
            }
            prev = Some((raw, out));
        }
        assert!(out_flicker < 0.7 * raw_flicker, "smoothed {out_flicker} vs raw {raw_flicker}");
    }

    #[test]
    fn a_moving_edge_is_not_smeared() {
        let (w, h) = (64, 16);
        let mut rng = Rng(7);
        let mut filter = TemporalFilter::default();
        for t in 0..8 {
            // the checkerboard moves 3 px per frame: every edge moves
            let input = frame(w, h, 3 * t, &mut rng, 1);
            let mut out = input.clone();
            filter.apply(1.0, &input, &mut out).unwrap();
            let worst = out.data.iter().zip(&input.data).map(|(&p, &q)| (p as i32 - q as i32).abs()).max().unwrap();
            // never more than the threshold away, and on average hardly at all
            assert!(worst as f32 <= filter.threshold(), "frame {t}: {worst}");
            assert!(mad(&out, &input) < 1.0, "frame {t}: {}", mad(&out, &input));
        }
        // a cut to another picture: the output is the new frame
        let cut = scene(w, h, 0, 0, &mut rng, 0);
        let mut out = cut.clone();
        filter.apply(1.0, &cut, &mut out).unwrap();
        assert_eq!(out, cut);
    }

    /// `img` with fine detail of its own: every other pixel `d` brighter,
    /// the rest `d` darker (a restoration's texture, zero mean).
    fn with_detail(img: &RgbImage, d: u8) -> RgbImage {
        let mut out = img.clone();
        for (j, v) in out.data.iter_mut().enumerate() {
            *v = if (j / 3) % 2 == 0 { v.saturating_add(d) } else { v.saturating_sub(d) };
        }
        out
    }

    /// A smooth textured scene seen from `(sx, sy)`, plus noise.
    fn scene(w: usize, h: usize, sx: usize, sy: usize, rng: &mut Rng, amp: i32) -> RgbImage {
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let (u, v) = ((x + sx) as f32, (y + sy) as f32);
                let base = 120.0 + 50.0 * (u * 0.23).sin() * (v * 0.17).cos() + 30.0 * ((u + v) * 0.05).sin();
                for k in 0..3 {
                    data.push((base as i32 + 8 * k + rng.next(amp)).clamp(0, 255) as u8);
                }
            }
        }
        RgbImage::new(w, h, data).unwrap()
    }

    /// Mean absolute difference of frame `b` against `a` moved by `pan`
    /// pixels (b's column x shows a's column x + pan).
    fn mad_panned(a: &RgbImage, b: &RgbImage, pan: usize) -> f64 {
        let (w, h) = (a.width, a.height);
        let mut sum = 0.0;
        for y in 0..h {
            for x in 0..w - pan {
                for k in 0..3 {
                    sum += (a.data[(y * w + x + pan) * 3 + k] as f64 - b.data[(y * w + x) * 3 + k] as f64).abs();
                }
            }
        }
        sum / ((w - pan) * h * 3) as f64
    }

    #[test]
    fn a_panning_noisy_sequence_flickers_less_along_its_motion() {
        let (w, h) = (96, 64);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut filter = TemporalFilter::default();
        let (mut raw_flicker, mut out_flicker) = (0.0, 0.0);
        let mut prev: Option<(RgbImage, RgbImage)> = None;
        for t in 0..10 {
            // the scene pans 2 px a frame; the "restored" frame has its own noise
            let input = scene(w, h, 2 * t, 0, &mut rng, 3);
            let raw = scene(w, h, 2 * t, 0, &mut rng, 3);
            let mut out = raw.clone();
            filter.apply(0.75, &input, &mut out).unwrap();
            if let Some((pr, po)) = &prev {
                raw_flicker += mad_panned(pr, &raw, 2);
                out_flicker += mad_panned(po, &out, 2);
            }
            prev = Some((raw, out));
        }
        // without motion compensation this was the raw flicker: every pixel of
        // the texture changes by more than the threshold from frame to frame
        assert!(out_flicker < 0.6 * raw_flicker, "smoothed {out_flicker} vs raw {raw_flicker}");
    }

    #[test]
    fn an_object_moving_across_a_pan_leaves_no_trail() {
        let (w, h) = (128, 64);
        let mut rng = Rng(31);
        let mut filter = TemporalFilter::default();
        for t in 0..8 {
            // background pans 1 px a frame; a bright 20x20 square crosses it at 7 px a frame
            let mut input = scene(w, h, t, 0, &mut rng, 2);
            let x0 = 10 + 7 * t;
            for y in 20..40 {
                for x in x0..x0 + 20 {
                    for k in 0..3 {
                        input.data[(y * w + x) * 3 + k] = 245;
                    }
                }
            }
            let mut out = input.clone();
            filter.apply(1.0, &input, &mut out).unwrap();
            // where the square was last frame and is no more, and on the square:
            // the output is the frame as restored, give or take the noise
            let mut worst_mean = 0.0f64;
            for (xa, xb) in [(x0.saturating_sub(7), x0), (x0, x0 + 20)] {
                let mut sum = 0.0f64;
                let mut n = 0.0f64;
                for y in 20..40 {
                    for x in xa..xb {
                        for k in 0..3 {
                            sum +=
                                (out.data[(y * w + x) * 3 + k] as f64 - input.data[(y * w + x) * 3 + k] as f64).abs();
                            n += 1.0;
                        }
                    }
                }
                worst_mean = worst_mean.max(sum / n.max(1.0));
            }
            assert!(worst_mean < 2.0, "frame {t}: the square's region moved {worst_mean:.2} from the frame");
            let worst = out.data.iter().zip(&input.data).map(|(&p, &q)| p.abs_diff(q)).max().unwrap();
            assert!(worst as f32 <= filter.threshold(), "frame {t}: {worst}");
        }
    }

    #[test]
    fn strength_zero_is_exact_and_drops_the_history() {
        let mut rng = Rng(99);
        let mut filter = TemporalFilter::default();
        let a = frame(16, 16, 0, &mut rng, 2);
        let mut out = a.clone();
        filter.apply(0.8, &a, &mut out).unwrap();
        assert!(filter.has_history());
        for _ in 0..3 {
            let b = frame(16, 16, 0, &mut rng, 2);
            let mut out = b.clone();
            filter.apply(0.0, &b, &mut out).unwrap();
            assert_eq!(out, b);
            assert!(!filter.has_history());
        }
        let b = frame(16, 16, 0, &mut rng, 2);
        let mut out = b.clone();
        filter.apply(f32::NAN, &b, &mut out).unwrap();
        assert_eq!(out, b, "NaN strength = off");
    }

    #[test]
    fn a_size_change_resets_and_mismatches_are_errors() {
        let mut rng = Rng(5);
        let mut filter = TemporalFilter::default();
        let a = frame(16, 16, 0, &mut rng, 2);
        let mut out = a.clone();
        filter.apply(1.0, &a, &mut out).unwrap();
        // same content, another size: no blending with the old frame
        let b = frame(24, 16, 0, &mut rng, 2);
        let mut out = b.clone();
        filter.apply(1.0, &b, &mut out).unwrap();
        assert_eq!(out, b);
        // the next frame of the new size is smoothed toward it
        let c = frame(24, 16, 0, &mut rng, 2);
        let mut out = c.clone();
        filter.apply(1.0, &c, &mut out).unwrap();
        assert!(mad(&out, &b) < mad(&c, &b));
        // input and restored of different sizes
        let mut small = frame(8, 8, 0, &mut rng, 0);
        let err = filter.apply(1.0, &c, &mut small).unwrap_err().to_string();
        assert!(err.contains("24x16") && err.contains("8x8"), "{err}");
        filter.reset();
        assert!(!filter.has_history());
    }

    #[test]
    fn carry_shows_the_previous_output_where_the_picture_did_not_change() {
        let mut rng = Rng(9);
        let (w, h) = (64, 32);
        let prev_in = scene(w, h, 0, 0, &mut rng, 0);
        // the restoration: fine detail of its own (zero mean)
        let prev_out = with_detail(&prev_in, 3);
        let mut filter = TemporalFilter::default();
        let mut out = prev_in.clone();
        assert!(!filter.carry(&prev_in, &mut out), "no previous frame yet");
        assert_eq!(out, prev_in);
        filter.adopt(&prev_in, &prev_out);
        // the left half still, the right half another picture
        let mut input = prev_in.clone();
        for y in 0..h {
            for x in w / 2..w {
                for k in 0..3 {
                    input.data[(y * w + x) * 3 + k] = 255 - prev_in.data[(y * w + x) * 3 + k];
                }
            }
        }
        let mut out = input.clone();
        assert!(filter.carry(&input, &mut out));
        let px = |im: &RgbImage, x: usize, y: usize| im.data[(y * w + x) * 3];
        assert_eq!(px(&out, 4, 16), px(&prev_out, 4, 16), "still: the previous output");
        assert_eq!(px(&out, w - 3, 16), px(&input, w - 3, 16), "changed: left as it is");
        // the picture pans by 3 px: the previous output moved along
        let moved_in = scene(w, h, 3, 0, &mut rng, 0);
        let mut moved_out = moved_in.clone();
        filter.adopt(&prev_in, &prev_out);
        assert!(filter.carry(&moved_in, &mut moved_out));
        assert_eq!(px(&moved_out, 20, 16), px(&prev_out, 23, 16), "moved: the previous output from where it was");
        let small = RgbImage::new(4, 4, vec![0; 48]).unwrap();
        let mut small_out = small.clone();
        assert!(!filter.carry(&small, &mut small_out));
    }

    #[test]
    fn carry_is_the_full_strength_blend_of_the_input() {
        // a carried frame is what `apply` at strength 1 makes of the input
        // taken as its own restoration (one blend serves both)
        let mut rng = Rng(21);
        let (w, h) = (80, 48);
        let prev_in = scene(w, h, 0, 0, &mut rng, 6);
        let prev_out = with_detail(&prev_in, 4);
        let input = scene(w, h, 2, 1, &mut rng, 6);
        let (mut carried, mut applied) = (TemporalFilter::default(), TemporalFilter::default());
        carried.adopt(&prev_in, &prev_out);
        applied.adopt(&prev_in, &prev_out);
        let mut out = input.clone();
        assert!(carried.carry(&input, &mut out));
        let mut restored = input.clone();
        applied.apply(1.0, &input, &mut restored).unwrap();
        assert_eq!(out, restored);
        assert_ne!(out, input, "the carry moved some pixels");
    }
}
