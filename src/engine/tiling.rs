//! The engine's one tiler. A [`Plan`] splits a frame into tiles, one span per
//! axis, and says how the tiles' outputs become the frame's output; three
//! policies cover every stage:
//!
//! - [`Plan::gaussian`]: the UNet's latent tiling as the official code does it:
//!   tiles of side T overlapping by a settable amount, the last one flush with
//!   the border, each output weighted by a Gaussian and normalised by the
//!   summed weights.
//! - [`Plan::vaehook`]: the official VAEHook split for the VAE: padded tiles
//!   whose padding is cropped off, nothing blended. The network runs on all
//!   tiles at once, block by block ([`Plan::run`] with a group of every tile),
//!   so that every GroupNorm sees statistics pooled over all tiles.
//! - [`Plan::exact`]: tiles on a grid, widened on inner sides by a margin that
//!   covers the network's receptive field, cropped to their core: the stitched
//!   output equals the whole-frame output (CaVE's embedding and the compact
//!   model's reconstruction).
//!
//! Outputs are accumulated on the host into the tile's own window of one
//! frame-sized buffer: no full-frame temporary per tile.
use candle_core::{DType, Device, Tensor};

use super::error::{EngineError, Result};
use super::Cancel;

/// One tile along one axis: input `start..start+len`; rows `skip..skip+take`
/// of its output go to output `at..at+take`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
    pub skip: usize,
    pub take: usize,
    pub at: usize,
}

/// How tile outputs are merged.
#[derive(Clone, Debug, PartialEq)]
pub enum Merge {
    /// Weighted by the official Gaussian of the tile's size, normalised by the
    /// summed weights (overlaps are averaged).
    Gaussian,
    /// Each tile writes its kept window; windows do not overlap.
    Crop,
}

/// Tiles of one frame (rows x columns) and how their outputs merge.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub rows: Vec<Span>,
    pub cols: Vec<Span>,
    pub merge: Merge,
}

/// Start offsets of tiles of side `tile` with `overlap` along an axis of
/// `size` (the official latent grid: stride `tile - overlap`, the last tile
/// flush with the end).
pub fn tile_starts(size: usize, tile: usize, overlap: usize) -> Vec<usize> {
    let tile = tile.min(size);
    let stride = tile.saturating_sub(overlap).max(1);
    let mut starts = vec![];
    let mut s = 0;
    while s + tile < size {
        starts.push(s);
        s += stride;
    }
    starts.push(size - tile);
    starts.dedup();
    starts
}

/// The official weights: `exp(-(i-m)^2 / T^2 / (2 var)) / sqrt(2 pi var)`,
/// var = 0.01, with m = (T-1)/2 along x and T/2 along y (a quirk kept on purpose).
pub fn gaussian_weights(tile_h: usize, tile_w: usize) -> Vec<f32> {
    let var = 0.01f64;
    let g = |i: usize, m: f64, t: usize| {
        let d = i as f64 - m;
        (-(d * d) / (t * t) as f64 / (2.0 * var)).exp() / (2.0 * std::f64::consts::PI * var).sqrt()
    };
    let mx = (tile_w as f64 - 1.0) / 2.0;
    let my = tile_h as f64 / 2.0;
    let mut out = Vec::with_capacity(tile_h * tile_w);
    for y in 0..tile_h {
        for x in 0..tile_w {
            out.push((g(y, my, tile_h) * g(x, mx, tile_w)) as f32);
        }
    }
    out
}

/// The official VAEHook's tile size rounding: the smallest multiple of 32
/// (else 16, 8, 4, 2) not below `lower` that does not exceed `upper`.
fn best_tile_size(lower: usize, upper: usize) -> usize {
    let mut divider = 32;
    while divider >= 2 {
        let rem = lower % divider;
        if rem == 0 {
            return lower;
        }
        let candidate = lower - rem + divider;
        if candidate <= upper {
            return candidate;
        }
        divider /= 2;
    }
    lower
}

/// Output scale of a VAEHook tiling: the encoder divides by 8, the decoder
/// multiplies by 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Down(usize),
    Up(usize),
}

impl Scale {
    fn of(self, v: usize) -> usize {
        match self {
            Scale::Down(f) => v / f,
            Scale::Up(f) => v * f,
        }
    }
}

/// The official VAEHook split of one axis of `n` input pixels (`split_tiles`):
/// `ceil((n - 2 pad) / tile)` tiles of the rounded size, starting at `pad`;
/// each padded by `pad` on both sides (clipped to the frame) and cropped back
/// to its core, the first and last cores reaching the frame's ends.
pub fn vaehook_spans(n: usize, tile: usize, pad: usize, scale: Scale) -> Vec<Span> {
    let inner = n.saturating_sub(2 * pad);
    let count = inner.div_ceil(tile.max(1)).max(1);
    let real = best_tile_size(inner.div_ceil(count), tile);
    (0..count)
        .map(|i| {
            let a = pad + i * real;
            let b = (pad + (i + 1) * real).min(n);
            let out_a = if a > pad { a } else { 0 };
            let out_b = if b + pad < n { b } else { n };
            let (in_a, in_b) = (a.saturating_sub(pad), (b + pad).min(n));
            let (oa, ob) = (scale.of(out_a), scale.of(out_b));
            Span { start: in_a, len: in_b - in_a, skip: oa - scale.of(in_a), take: ob - oa, at: oa }
        })
        .collect()
}

/// Exact-margin spans of an axis of `n` pixels: kept cores of `core` pixels
/// on a `grid` (core a multiple of it), each widened by `margin` pixels on its
/// inner sides, the last tile ending at `n` so that it sees the same remainder
/// as the whole frame. Output units are pixels / `div`; `floor(n / grid)` grid
/// cells are kept in all. An axis of at most `tile` pixels is one tile.
pub fn exact_spans(n: usize, tile: usize, core: usize, margin: usize, grid: usize, div: usize) -> Vec<Span> {
    let cells = n / grid;
    if n <= tile || cells == 0 {
        return vec![Span { start: 0, len: n, skip: 0, take: cells * grid / div, at: 0 }];
    }
    let per = (core / grid).max(1);
    let mut spans = Vec::new();
    let mut a = 0;
    while a < cells {
        let b = (a + per).min(cells);
        let start = (grid * a).saturating_sub(margin);
        let end = if b == cells { n } else { (grid * b + margin).min(n) };
        spans.push(Span {
            start,
            len: end - start,
            skip: (grid * a - start) / div,
            take: grid * (b - a) / div,
            at: grid * a / div,
        });
        a = b;
    }
    spans
}

impl Plan {
    /// The UNet's latent tiling: tiles of `tile` (official `latent_tiled_size`)
    /// overlapping by `overlap`, Gaussian-weighted. Returns None when the
    /// official code runs the latent whole (`h * w <= tile^2`, or tile 0).
    ///
    /// The official code shrinks its square tile to the short side, which on a
    /// thin frame makes the stride `short - overlap` tiny (and never ends when
    /// the short side is at most the overlap); here a side shorter than the
    /// tile is taken whole and only the long side is split, in tiles of `tile`.
    pub fn gaussian(h: usize, w: usize, tile: usize, overlap: usize) -> Option<Plan> {
        if tile == 0 || h * w <= tile * tile {
            return None;
        }
        let axis = |n: usize| {
            let t = tile.min(n);
            tile_starts(n, t, overlap).into_iter().map(|s| Span { start: s, len: t, skip: 0, take: t, at: s }).collect()
        };
        Some(Plan { rows: axis(h), cols: axis(w), merge: Merge::Gaussian })
    }

    /// The official VAEHook tiling of an `h x w` input: tiles of about `tile`
    /// input pixels padded by `pad`; None when the official code runs the
    /// network whole (`max(h, w) <= tile + 2 pad`, or tile 0).
    pub fn vaehook(h: usize, w: usize, tile: usize, pad: usize, scale: Scale) -> Option<Plan> {
        if tile == 0 || h.max(w) <= tile + 2 * pad {
            return None;
        }
        Some(Plan {
            rows: vaehook_spans(h, tile, pad, scale),
            cols: vaehook_spans(w, tile, pad, scale),
            merge: Merge::Crop,
        })
    }

    /// Exact-margin tiles of at most `tile` pixels a side (see [`exact_spans`];
    /// only sides longer than `tile` are split). Error when the margins leave
    /// no room for a core of one grid cell.
    pub fn exact(h: usize, w: usize, tile: usize, margin: usize, grid: usize, div: usize, what: &str) -> Result<Plan> {
        let core = tile.saturating_sub(2 * margin) / grid * grid;
        if (h > tile || w > tile) && core < grid {
            return Err(EngineError::InvalidInput(format!(
                "{what} tile {tile} px leaves no room for the {margin} px margins this model needs (use at least {})",
                2 * margin + grid
            )));
        }
        Ok(Plan {
            rows: exact_spans(h, tile, core, margin, grid, div),
            cols: exact_spans(w, tile, core, margin, grid, div),
            merge: Merge::Crop,
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len() * self.cols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Output height and width.
    pub fn out_size(&self) -> (usize, usize) {
        let end = |s: &[Span]| s.iter().map(|s| s.at + s.take).max().unwrap_or(0);
        (end(&self.rows), end(&self.cols))
    }

    /// Run `f` over the tiles of `x` (`[1,C,H,W]`), `group` tiles per call
    /// (`usize::MAX`: all tiles in one call, as VAEHook needs), row by row;
    /// `f` gets the tiles' (row, column) spans and inputs and returns one output
    /// per tile. The cancel token is checked before every call.
    pub fn run<F>(&self, x: &Tensor, group: usize, cancel: &Cancel, mut f: F) -> Result<Tensor>
    where
        F: FnMut(&[(Span, Span)], Vec<Tensor>) -> Result<Vec<Tensor>>,
    {
        let tiles: Vec<(Span, Span)> = self.rows.iter().flat_map(|&r| self.cols.iter().map(move |&c| (r, c))).collect();
        let (oh, ow) = self.out_size();
        let mut canvas: Option<Canvas> = None;
        let mut done = 0;
        for chunk in tiles.chunks(group.max(1)) {
            cancel.check()?;
            if tiles.len() > 1 {
                cancel.progress(done, tiles.len());
            }
            done += chunk.len();
            let inputs = chunk
                .iter()
                .map(|(r, c)| x.narrow(2, r.start, r.len)?.narrow(3, c.start, c.len))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let outs = f(chunk, inputs)?;
            if outs.len() != chunk.len() {
                return Err(EngineError::InvalidInput(format!(
                    "tiler: {} outputs for {} tiles",
                    outs.len(),
                    chunk.len()
                )));
            }
            for ((r, c), out) in chunk.iter().zip(outs) {
                let cv = match &mut canvas {
                    Some(cv) => cv,
                    None => canvas.insert(Canvas::new(out.dim(1)?, oh, ow, out.dtype(), self.merge == Merge::Gaussian)),
                };
                cv.add(&out, r, c)?;
            }
        }
        if tiles.len() > 1 {
            cancel.progress(done, tiles.len());
        }
        let canvas = canvas.ok_or_else(|| EngineError::InvalidInput("tiler: no tiles".into()))?;
        canvas.finish(x.device())
    }
}

/// A frame-sized host buffer that tiles write into.
struct Canvas {
    c: usize,
    h: usize,
    w: usize,
    dtype: DType,
    data: Vec<f32>,
    /// Summed Gaussian weights (Gaussian merge only).
    wsum: Option<Vec<f32>>,
}

impl Canvas {
    fn new(c: usize, h: usize, w: usize, dtype: DType, gaussian: bool) -> Self {
        Canvas { c, h, w, dtype, data: vec![0f32; c * h * w], wsum: gaussian.then(|| vec![0f32; h * w]) }
    }

    fn add(&mut self, out: &Tensor, r: &Span, col: &Span) -> Result<()> {
        let (b, c, th, tw) = out.dims4()?;
        if b != 1
            || c != self.c
            || r.skip + r.take > th
            || col.skip + col.take > tw
            || r.at + r.take > self.h
            || col.at + col.take > self.w
        {
            return Err(EngineError::InvalidInput(format!(
                "tiler: tile output {:?} cannot give rows {}..{} and columns {}..{} of a {}x{}x{} frame",
                out.dims(),
                r.skip,
                r.skip + r.take,
                col.skip,
                col.skip + col.take,
                self.c,
                self.h,
                self.w
            )));
        }
        let v: Vec<f32> = out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let (h, w) = (self.h, self.w);
        match &mut self.wsum {
            Some(wsum) => {
                let g = gaussian_weights(th, tw);
                for ch in 0..c {
                    for y in 0..r.take {
                        let src = &v[(ch * th + r.skip + y) * tw + col.skip..][..col.take];
                        let gw = &g[(r.skip + y) * tw + col.skip..][..col.take];
                        let dst = &mut self.data[(ch * h + r.at + y) * w + col.at..][..col.take];
                        dst.iter_mut().zip(src).zip(gw).for_each(|((d, &s), &g)| *d += s * g);
                    }
                }
                for y in 0..r.take {
                    let gw = &g[(r.skip + y) * tw + col.skip..][..col.take];
                    wsum[(r.at + y) * w + col.at..][..col.take].iter_mut().zip(gw).for_each(|(d, &g)| *d += g);
                }
            }
            None => {
                for ch in 0..c {
                    for y in 0..r.take {
                        let src = &v[(ch * th + r.skip + y) * tw + col.skip..][..col.take];
                        self.data[(ch * h + r.at + y) * w + col.at..][..col.take].copy_from_slice(src);
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(mut self, dev: &Device) -> Result<Tensor> {
        if let Some(wsum) = &self.wsum {
            for plane in self.data.chunks_mut(self.h * self.w) {
                plane.iter_mut().zip(wsum).for_each(|(d, &s)| *d /= s);
            }
        }
        Ok(Tensor::from_vec(self.data, (1, self.c, self.h, self.w), &Device::Cpu)?
            .to_device(dev)?
            .to_dtype(self.dtype)?)
    }
}

/// The UNet's latent tiling: `f` on Gaussian-weighted tiles of `z`
/// (`[1,C,H,W]`), one tile per call as the official code runs them (its
/// batching condition `len(input_list) == 1` fires on every tile, so it never
/// batches); `f` whole when the official code would not tile.
pub fn gaussian_tiled<F>(z: &Tensor, tile: usize, overlap: usize, cancel: &Cancel, mut f: F) -> Result<Tensor>
where
    F: FnMut(&Tensor) -> Result<Tensor>,
{
    let (_, _, h, w) = z.dims4()?;
    match Plan::gaussian(h, w, tile, overlap) {
        None => f(z),
        Some(plan) => plan.run(z, 1, cancel, |_, tiles| tiles.iter().map(&mut f).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn starts_cover_and_end_flush() {
        assert_eq!(tile_starts(100, 96, 32), vec![0, 4]);
        assert_eq!(tile_starts(96, 96, 32), vec![0]);
        assert_eq!(tile_starts(200, 96, 32), vec![0, 64, 104]);
        assert_eq!(tile_starts(10, 96, 32), vec![0]);
    }

    #[test]
    fn weights_peak_in_the_middle_with_the_reference_quirk() {
        let w = gaussian_weights(4, 4);
        // x centre (T-1)/2 = 1.5: columns 1 and 2 equal; y centre T/2 = 2: row 2 largest
        assert!((w[4 * 2 + 1] - w[4 * 2 + 2]).abs() < 1e-7);
        assert!(w[4 * 2 + 1] > w[4 + 1]);
        let peak = 1.0 / (2.0 * std::f64::consts::PI * 0.01);
        assert!(((w[4 * 2 + 1] as f64) - peak * (-(0.25f64) / 16.0 / 0.02).exp()).abs() < 1e-4);
    }

    #[test]
    fn gaussian_tiling_of_an_identity_returns_the_input() {
        let z = Tensor::randn(0f32, 1., (1, 4, 50, 70), &Device::Cpu).unwrap();
        let out = gaussian_tiled(&z, 24, 8, &Cancel::new(), |t| Ok(t.clone())).unwrap();
        assert!(max_diff(&out, &z) < 1e-5);
    }

    #[test]
    fn the_progress_observer_sees_every_tile() {
        let z = Tensor::randn(0f32, 1., (1, 4, 50, 70), &Device::Cpu).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let cancel = Cancel::new().with_progress(move |done, total| log.lock().unwrap().push((done, total)));
        gaussian_tiled(&z, 24, 8, &cancel, |t| Ok(t.clone())).unwrap();
        let seen = seen.lock().unwrap();
        let total = seen[0].1;
        assert!(total > 1, "{seen:?}");
        assert_eq!(seen.first(), Some(&(0, total)));
        assert_eq!(seen.last(), Some(&(total, total)));
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    }

    #[test]
    fn thin_frames_are_split_along_the_long_side_only() {
        // a 16384x16 frame's latent: 2 x 2048 runs whole (h*w <= 96^2) as officially
        assert!(Plan::gaussian(2, 2048, 96, 32).is_none());
        // 8 x 2048 (16384x64): tiles 8x96 at stride 64, not 8x8 tiles at stride 1
        let p = Plan::gaussian(8, 2048, 96, 32).unwrap();
        assert_eq!(p.rows, vec![Span { start: 0, len: 8, skip: 0, take: 8, at: 0 }]);
        assert_eq!(p.cols.len(), tile_starts(2048, 96, 32).len());
        assert_eq!(p.len(), 32);
        let z = Tensor::randn(0f32, 1., (1, 4, 8, 1200), &Device::Cpu).unwrap();
        let out = gaussian_tiled(&z, 96, 32, &Cancel::new(), |t| {
            assert_eq!(t.dims(), &[1, 4, 8, 96]);
            Ok((t * 2.0)?)
        })
        .unwrap();
        assert!(max_diff(&out, &(z * 2.0).unwrap()) < 1e-5);
    }

    #[test]
    fn vaehook_split_is_the_official_one() {
        // the fixture's log: encoder 184x232, tile 96, pad 32 -> 2x2 tiles of 96 (w) x 64 (h)
        let rows = vaehook_spans(184, 96, 32, Scale::Down(8));
        let cols = vaehook_spans(232, 96, 32, Scale::Down(8));
        assert_eq!(rows.iter().map(|s| (s.start, s.start + s.len)).collect::<Vec<_>>(), vec![(0, 128), (64, 184)]);
        assert_eq!(cols.iter().map(|s| (s.start, s.start + s.len)).collect::<Vec<_>>(), vec![(0, 160), (96, 232)]);
        // cores: rows 0..96 | 96..184 -> latent 0..12 | 12..23; crop skips the padding
        assert_eq!(rows.iter().map(|s| (s.at, s.take, s.skip)).collect::<Vec<_>>(), vec![(0, 12, 0), (12, 11, 4)]);
        assert_eq!(cols.iter().map(|s| (s.at, s.take, s.skip)).collect::<Vec<_>>(), vec![(0, 16, 0), (16, 13, 4)]);
        // decoder 23x29, tile 4, pad 11 -> 1x2 tiles
        assert!(Plan::vaehook(23, 29, 4, 11, Scale::Up(8)).unwrap().rows.len() == 1);
        let cols = vaehook_spans(29, 4, 11, Scale::Up(8));
        assert_eq!(cols.len(), 2);
        assert_eq!(cols.iter().map(|s| s.take).sum::<usize>(), 29 * 8);
        // the official thresholds: tile only above tile + 2 pad
        assert!(Plan::vaehook(1088, 1920, 1024, 32, Scale::Down(8)).is_some());
        assert!(Plan::vaehook(1088, 1088, 1024, 32, Scale::Down(8)).is_none());
        assert!(Plan::vaehook(135, 246, 224, 11, Scale::Up(8)).is_none());
        assert!(Plan::vaehook(135, 247, 224, 11, Scale::Up(8)).is_some());
        assert!(Plan::vaehook(4000, 4000, 0, 32, Scale::Down(8)).is_none());
    }

    #[test]
    fn vaehook_cores_cover_the_output_once() {
        for (n, tile, pad, scale) in [
            (2160, 1024, 32, Scale::Down(8)),
            (3840, 1024, 32, Scale::Down(8)),
            (270, 224, 11, Scale::Up(8)),
            (480, 224, 11, Scale::Up(8)),
            (1000, 96, 32, Scale::Down(8)),
            (300, 4, 11, Scale::Up(8)),
        ] {
            let spans = vaehook_spans(n, tile, pad, scale);
            let mut next = 0;
            for s in &spans {
                assert_eq!(s.at, next, "{n} {spans:?}");
                assert!(s.skip + s.take <= scale.of(s.len), "{s:?}");
                next += s.take;
            }
            assert_eq!(next, scale.of(n));
        }
    }

    #[test]
    fn exact_margins_give_the_whole_frame_result() {
        // a 5x5 box blur applied twice reaches 4 px: margins of 8 on an 8 px grid are exact
        let blur = |t: &Tensor| -> Result<Tensor> {
            let k = Tensor::ones((2, 1, 5, 5), DType::F32, &Device::Cpu)?;
            let mut t = t.clone();
            for _ in 0..2 {
                t = (t.conv2d(&k, 2, 1, 1, 2)? / 25.0)?;
            }
            Ok(t)
        };
        let x = Tensor::randn(0f32, 1., (1, 2, 70, 93), &Device::Cpu).unwrap();
        let whole = blur(&x).unwrap();
        let plan = Plan::exact(70, 93, 40, 8, 8, 1, "test").unwrap();
        assert!(plan.len() > 4);
        let tiled = plan.run(&x, 1, &Cancel::new(), |_, ts| ts.iter().map(blur).collect()).unwrap();
        // 70 and 93 px: floor(n/8) cells kept
        assert_eq!(tiled.dims(), &[1, 2, 64, 88]);
        assert!(max_diff(&tiled, &whole.narrow(2, 0, 64).unwrap().narrow(3, 0, 88).unwrap()) < 1e-5);
        // too small a margin is visibly wrong: the test could fail
        let plan = Plan::exact(70, 93, 24, 0, 8, 1, "test").unwrap();
        let bad = plan.run(&x, 1, &Cancel::new(), |_, ts| ts.iter().map(blur).collect()).unwrap();
        assert!(max_diff(&bad, &whole.narrow(2, 0, 64).unwrap().narrow(3, 0, 88).unwrap()) > 1e-2);
        // no room for a core
        let err = Plan::exact(70, 93, 20, 8, 8, 1, "CaVE").unwrap_err().to_string();
        assert!(err.contains("CaVE tile 20 px") && err.contains("at least 24"), "{err}");
    }

    #[test]
    fn a_raised_cancel_flag_stops_between_tiles() {
        let z = Tensor::zeros((1, 4, 40, 40), DType::F32, &Device::Cpu).unwrap();
        let cancel = Cancel::new();
        let mut calls = 0;
        let err = gaussian_tiled(&z, 16, 4, &cancel, |t| {
            calls += 1;
            if calls == 2 {
                cancel.cancel();
            }
            Ok(t.clone())
        })
        .unwrap_err();
        assert!(matches!(err, EngineError::Cancelled));
        assert_eq!(calls, 2);
    }
}
