//! Motion-adaptive temporal smoothing of restored video frames.
//!
//! Each frame is restored on its own, so the small frame-to-frame differences of a
//! still, noisy scene (each frame's JPEG rounds its noise differently) come out of
//! the restorer as small differences in the restored detail: the video flickers.
//! [`TemporalFilter`] keeps the previous input and the previous output and blends
//! the restored frame toward the previous output where the *input* did not change
//! beyond what noise explains; where it changed (motion, a cut, a light switched
//! on) the restored frame is kept as it is, so nothing ghosts.
//!
//! Per pixel, the motion measure `m` is the mean absolute difference between the
//! current and the previous input over a 5x5 window and the three channels (code
//! values). The weight of the previous output is
//! `strength * max(0, 1 - m / threshold)`, and the result never differs from the
//! restored frame by more than `threshold` in any channel, which bounds how far a
//! slow change can lag behind. Strength 0 leaves the frame untouched (bit-exact)
//! and drops the history; a frame of another size starts a new history.
use super::{EngineError, Result, RgbImage};

/// Default motion threshold in code values: a 5x5 mean input change at or above
/// it counts as motion. The consecutive-frame change of a still scene with sensor
/// noise after JPEG at quality 15-30 is 1-1.5 on average (examples/flicker.rs).
pub const DEFAULT_MOTION_THRESHOLD: f32 = 6.0;

/// Half-width of the motion window (5x5).
const RADIUS: usize = 2;

/// Recursive, motion-adaptive smoothing over a sequence of restored frames.
#[derive(Clone, Debug)]
pub struct TemporalFilter {
    threshold: f32,
    /// Previous input and output, same size.
    history: Option<(RgbImage, RgbImage)>,
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
        let threshold = if threshold.is_finite() && threshold > 0.0 {
            threshold
        } else {
            DEFAULT_MOTION_THRESHOLD
        };
        Self {
            threshold,
            history: None,
        }
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

    /// Smooth `restored` (the restoration of `input`) toward the previous output,
    /// with `strength` 0..1 (the weight of the previous output where the input is
    /// still; 0 = off). Keeps `input` and the result for the next frame.
    pub fn apply(
        &mut self,
        strength: f32,
        input: &RgbImage,
        restored: &mut RgbImage,
    ) -> Result<()> {
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
        let strength = if strength.is_finite() {
            strength.clamp(0.0, 1.0)
        } else {
            0.0
        };
        if strength == 0.0 {
            self.reset();
            return Ok(());
        }
        let same_size = matches!(&self.history, Some((prev, _))
            if (prev.width, prev.height) == (input.width, input.height));
        if same_size {
            let (prev_in, prev_out) = self.history.as_ref().expect("checked above");
            let motion = motion_map(&prev_in.data, &input.data, input.width, input.height);
            let t = self.threshold;
            for (i, &m) in motion.iter().enumerate() {
                let a = strength * (1.0 - m / t).max(0.0);
                if a == 0.0 {
                    continue;
                }
                for k in 0..3 {
                    let j = i * 3 + k;
                    let r = restored.data[j] as f32;
                    let d = (a * (prev_out.data[j] as f32 - r)).clamp(-t, t);
                    restored.data[j] = (r + d).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        // Reuse the history's buffers.
        match &mut self.history {
            Some((prev_in, prev_out)) => {
                prev_in.clone_from(input);
                prev_out.clone_from(restored);
            }
            None => self.history = Some((input.clone(), restored.clone())),
        }
        Ok(())
    }
}

/// Carry a restoration forward onto a frame that was not restored (a live
/// frame that would have been late): `out = input + w * (prev_out - prev_in)`
/// per pixel, where `(prev_in, prev_out)` are the last restored frame's input
/// and output and `w = max(0, 1 - m / threshold)` with `m` the 5x5 mean input
/// change since `prev_in` ([`DEFAULT_MOTION_THRESHOLD`] as in
/// [`TemporalFilter`]). Where the picture has not moved the frame gets the
/// same correction as the last restored one, so restored and unrestored
/// frames do not alternate visibly; where it moved it is left as it is.
/// Returns false (and leaves `out` as `input`) when the sizes differ.
pub fn carry(prev_in: &RgbImage, prev_out: &RgbImage, input: &RgbImage, out: &mut RgbImage) -> bool {
    let (w, h) = (input.width, input.height);
    let n = w * h * 3;
    if [prev_in, prev_out, &*out].iter().any(|i| (i.width, i.height) != (w, h) || i.data.len() != n) || input.data.len() != n {
        return false;
    }
    let motion = motion_map(&prev_in.data, &input.data, w, h);
    let t = DEFAULT_MOTION_THRESHOLD;
    for (i, &m) in motion.iter().enumerate() {
        let a = (1.0 - m / t).max(0.0);
        for k in 0..3 {
            let j = i * 3 + k;
            let d = a * (prev_out.data[j] as f32 - prev_in.data[j] as f32);
            out.data[j] = (input.data[j] as f32 + d).round().clamp(0.0, 255.0) as u8;
        }
    }
    true
}

/// Per pixel: the mean over a (2 RADIUS + 1)^2 window (clipped at the borders)
/// and the three channels of |a - b|.
fn motion_map(a: &[u8], b: &[u8], w: usize, h: usize) -> Vec<f32> {
    let diff: Vec<f32> = a
        .chunks_exact(3)
        .zip(b.chunks_exact(3))
        .map(|(p, q)| {
            (0..3)
                .map(|k| (p[k] as f32 - q[k] as f32).abs())
                .sum::<f32>()
                / 3.0
        })
        .collect();
    // separable box sums with clipped windows
    let mut rows = vec![0f32; w * h];
    for y in 0..h {
        let line = &diff[y * w..(y + 1) * w];
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(RADIUS), (x + RADIUS + 1).min(w));
            rows[y * w + x] = line[x0..x1].iter().sum::<f32>() / (x1 - x0) as f32;
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(RADIUS), (y + RADIUS + 1).min(h));
        for x in 0..w {
            let s: f32 = (y0..y1).map(|yy| rows[yy * w + x]).sum();
            out[y * w + x] = s / (y1 - y0) as f32;
        }
    }
    out
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
                let base = if (sx / 8 + y / 8) % 2 == 0 { 60 } else { 190 };
                for k in 0..3 {
                    let v = base + (k as i32) * 10 + rng.next(amp);
                    data.push(v.clamp(0, 255) as u8);
                }
            }
        }
        RgbImage::new(w, h, data).unwrap()
    }

    fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(&p, &q)| (p as f64 - q as f64).abs())
            .sum::<f64>()
            / a.data.len() as f64
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
        assert!(
            out_flicker < 0.7 * raw_flicker,
            "smoothed {out_flicker} vs raw {raw_flicker}"
        );
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
            let worst = out
                .data
                .iter()
                .zip(&input.data)
                .map(|(&p, &q)| (p as i32 - q as i32).abs())
                .max()
                .unwrap();
            // never more than the threshold away, and on average hardly at all
            assert!(worst as f32 <= filter.threshold(), "frame {t}: {worst}");
            assert!(mad(&out, &input) < 1.0, "frame {t}: {}", mad(&out, &input));
        }
        // a cut to another picture: the output is the new frame
        let mut cut = frame(w, h, 0, &mut rng, 0);
        cut.data.iter_mut().for_each(|v| *v = 255 - *v);
        let mut out = cut.clone();
        filter.apply(1.0, &cut, &mut out).unwrap();
        assert_eq!(out, cut);
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
    fn carry_moves_the_correction_onto_still_pixels_only() {
        let mut rng = Rng(9);
        let (w, h) = (32, 16);
        let prev_in = frame(w, h, 0, &mut rng, 0);
        let mut prev_out = prev_in.clone();
        for v in prev_out.data.iter_mut() {
            *v = v.saturating_add(5);
        }
        // the left half still, the right half changed completely
        let mut input = prev_in.clone();
        for y in 0..h {
            for x in w / 2..w {
                for k in 0..3 {
                    input.data[(y * w + x) * 3 + k] = 255 - prev_in.data[(y * w + x) * 3 + k];
                }
            }
        }
        let mut out = input.clone();
        assert!(carry(&prev_in, &prev_out, &input, &mut out));
        let px = |im: &RgbImage, x: usize, y: usize| im.data[(y * w + x) * 3];
        assert_eq!(px(&out, 2, 8), px(&input, 2, 8) + 5, "still: corrected as before");
        assert_eq!(px(&out, w - 3, 8), px(&input, w - 3, 8), "moved: left as it is");
        let small = RgbImage::new(4, 4, vec![0; 48]).unwrap();
        assert!(!carry(&small, &prev_out, &input, &mut out));
    }
}
