//! Pixel conversion between mapped video planes and the engine's packed RGB.
//!
//! Pure byte code, no GStreamer types: the element describes a frame's format as a
//! [`Layout`] (where each of the three colour components lives) and hands over its
//! planes with their strides. Any 8-bit packed RGB, planar, semi-planar or packed
//! YUV format fits this description.
//!
//! Reading ([`read_rgb_sited`]) turns the frame into packed RGB for the engine (YUV
//! with the given matrix and range; sub-sampled chroma upsampled bilinearly from
//! where the caps' [`ChromaSiting`] puts the samples: centred as in JPEG, where this
//! matches libjpeg's "fancy upsampling", so the engine sees what a JPEG decoder
//! would show, or co-sited with the first luma sample as H.264/MPEG-2 decoders
//! send it). Writing ([`write_rgb_sited`]) converts the restored RGB back, filtering
//! chroma onto the same sites (a box over each sub-sampled block for centred sites,
//! as a JPEG encoder averages; a triangle centred on the luma sample for co-sited
//! ones), and blends it with the original samples by `strength`. RGB frames round-trip bit-exactly;
//! YUV frames within rounding (plus the usual chroma smoothing of sub-sampling).
//! The element writes with [`write_rgb_change`], the same filtering applied to
//! the restoration's change only, so samples the engine did not change stay as
//! they were, bit for bit.
//! Alpha, padding and any byte outside the three components are never written.

use rayon::prelude::*;

use crate::engine::kernels::simd_fn;

/// Where one colour component of a frame lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Component {
    /// Index of the plane holding the component.
    pub plane: usize,
    /// Byte offset of the component's first sample inside a row of its plane.
    pub offset: usize,
    /// Bytes from one sample of the component to the next in a row.
    pub pixel_stride: usize,
    /// log2 of the horizontal sub-sampling (1 for 4:2:0 and 4:2:2 chroma).
    pub sub_x: u32,
    /// log2 of the vertical sub-sampling (1 for 4:2:0 chroma).
    pub sub_y: u32,
}

impl Component {
    /// Width and height in samples of this component for a `width` x `height` frame.
    pub fn size(&self, width: usize, height: usize) -> (usize, usize) {
        (ceil_shift(width, self.sub_x), ceil_shift(height, self.sub_y))
    }
}

fn ceil_shift(n: usize, shift: u32) -> usize {
    (n + (1 << shift) - 1) >> shift
}

/// Y'CbCr coefficients: luma weights `kr`, `kb` and the quantisation range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YuvMatrix {
    pub kr: f32,
    pub kb: f32,
    /// true: 0..255 for all components (JPEG / JFIF); false: Y 16..235, C 16..240.
    pub full_range: bool,
}

impl YuvMatrix {
    /// BT.601 full range, what JPEG (JFIF) uses.
    pub const BT601_FULL: Self = Self { kr: 0.299, kb: 0.114, full_range: true };

    /// Coefficients from the matrix's `kr`, `kb`.
    pub fn new(kr: f64, kb: f64, full_range: bool) -> Self {
        Self { kr: kr as f32, kb: kb as f32, full_range }
    }

    fn kg(&self) -> f32 {
        1.0 - self.kr - self.kb
    }

    /// RGB (0..255) to Y, Cb, Cr in the matrix's quantisation, unrounded.
    pub fn from_rgb(&self, r: f32, g: f32, b: f32) -> [f32; 3] {
        let y = self.kr * r + self.kg() * g + self.kb * b;
        let cb = (b - y) / (2.0 * (1.0 - self.kb));
        let cr = (r - y) / (2.0 * (1.0 - self.kr));
        if self.full_range {
            [y, cb + 128.0, cr + 128.0]
        } else {
            [16.0 + y * (219.0 / 255.0), 128.0 + cb * (224.0 / 255.0), 128.0 + cr * (224.0 / 255.0)]
        }
    }

    /// Y, Cb, Cr in the matrix's quantisation to RGB (0..255), unrounded, unclamped.
    pub fn to_rgb(&self, y: f32, cb: f32, cr: f32) -> [f32; 3] {
        let (y, cb, cr) = if self.full_range {
            (y, cb - 128.0, cr - 128.0)
        } else {
            ((y - 16.0) * (255.0 / 219.0), (cb - 128.0) * (255.0 / 224.0), (cr - 128.0) * (255.0 / 224.0))
        };
        let r = y + 2.0 * (1.0 - self.kr) * cr;
        let b = y + 2.0 * (1.0 - self.kb) * cb;
        let g = (y - self.kr * r - self.kb * b) / self.kg();
        [r, g, b]
    }
}

/// Colour model of a frame's three components.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ColorModel {
    /// Components are R, G, B.
    Rgb,
    /// Components are Y, Cb (U), Cr (V).
    Yuv(YuvMatrix),
}

/// Where the samples of sub-sampled chroma sit on the luma grid, per axis: centred
/// between the luma samples they cover (JPEG/JFIF, `GST_VIDEO_CHROMA_SITE_JPEG`) or
/// co-sited with the first of them (`H_COSITED` / `V_COSITED` of
/// `GstVideoChromaSite`; MPEG-2 and H.264's default is co-sited horizontally,
/// centred vertically: `GST_VIDEO_CHROMA_SITE_MPEG2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChromaSiting {
    pub cosited_x: bool,
    pub cosited_y: bool,
}

impl ChromaSiting {
    /// Centred on both axes (JPEG).
    pub const JPEG: Self = Self { cosited_x: false, cosited_y: false };
    /// Co-sited horizontally, centred vertically (MPEG-2, H.264 "left").
    pub const MPEG2: Self = Self { cosited_x: true, cosited_y: false };
    /// Co-sited on both axes (DV, H.265 "top-left").
    pub const COSITED: Self = Self { cosited_x: true, cosited_y: true };
}

/// How a frame stores its three colour components (alpha, padding and other bytes
/// are left alone).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub model: ColorModel,
    /// R, G, B or Y, U, V, in that order.
    pub comps: [Component; 3],
}

/// One plane of a frame, read-only.
#[derive(Clone, Copy, Debug)]
pub struct Plane<'a> {
    pub data: &'a [u8],
    /// Bytes from one row to the next (may include padding).
    pub stride: usize,
}

/// One plane of a frame, writable.
#[derive(Debug)]
pub struct PlaneMut<'a> {
    pub data: &'a mut [u8],
    pub stride: usize,
}

/// A frame that does not match its layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("component {comp} lives in plane {plane}, but the frame has {planes} planes")]
    MissingPlane { comp: usize, plane: usize, planes: usize },
    #[error(
        "plane {plane} holds {len} bytes with stride {stride}, component {comp} of a \
         {width}x{height} frame needs {needed}"
    )]
    PlaneTooSmall { plane: usize, comp: usize, len: usize, stride: usize, needed: usize, width: usize, height: usize },
    #[error("component {comp} has pixel stride 0")]
    ZeroPixelStride { comp: usize },
    #[error("RGB buffer holds {len} bytes, a {width}x{height} image needs {needed}")]
    RgbSize { len: usize, width: usize, height: usize, needed: usize },
}

/// Check that every component of a `width` x `height` frame fits its plane.
fn check(layout: &Layout, plane_sizes: &[(usize, usize)], width: usize, height: usize) -> Result<(), ConvertError> {
    for (ci, c) in layout.comps.iter().enumerate() {
        let Some(&(len, stride)) = plane_sizes.get(c.plane) else {
            return Err(ConvertError::MissingPlane { comp: ci, plane: c.plane, planes: plane_sizes.len() });
        };
        if c.pixel_stride == 0 {
            return Err(ConvertError::ZeroPixelStride { comp: ci });
        }
        let (cw, ch) = c.size(width, height);
        if cw == 0 || ch == 0 {
            continue;
        }
        let needed = (ch - 1)
            .checked_mul(stride)
            .and_then(|n| n.checked_add((cw - 1).checked_mul(c.pixel_stride)?))
            .and_then(|n| n.checked_add(c.offset + 1))
            .unwrap_or(usize::MAX);
        if needed > len {
            return Err(ConvertError::PlaneTooSmall { plane: c.plane, comp: ci, len, stride, needed, width, height });
        }
    }
    Ok(())
}

fn check_rgb(len: usize, width: usize, height: usize) -> Result<(), ConvertError> {
    let needed = width * height * 3;
    if len != needed {
        return Err(ConvertError::RgbSize { len, width, height, needed });
    }
    Ok(())
}

#[inline]
fn index(c: &Component, stride: usize, x: usize, y: usize) -> usize {
    y * stride + x * c.pixel_stride + c.offset
}

#[inline]
fn to_u8(v: f32) -> u8 {
    // round half away from zero, clamped, NaN to 0 (as `v.round().clamp(0.0,
    // 255.0) as u8`) without libm's `roundf` call, which baseline x86-64 has no
    // instruction for: on [0, 255] the fraction v - trunc(v) is exact;
    // branch-free, through i32, so that row loops vectorise
    let v = v.clamp(0.0, 255.0);
    let t = v as i32; // truncates; NaN -> 0
    (t + (v - t as f32 >= 0.5) as i32) as u8
}

/// One output sample of bilinear upsampling: the two input samples and the
/// second one's weight.
type Tap = (usize, usize, f32);

/// Sample positions and weights for bilinear upsampling: output sample `i` of a
/// component sub-sampled by `f = 2^shift` (of `n` samples) lies at `(i + 0.5) / f - 0.5`
/// in the component's samples when they are centred, at `i / f` when co-sited.
fn upsample_taps(out_len: usize, shift: u32, n: usize, cosited: bool) -> Vec<Tap> {
    let f = (1usize << shift) as f32;
    (0..out_len)
        .map(|i| {
            if shift == 0 {
                return (i, i, 0.0);
            }
            let pos = if cosited { i as f32 / f } else { ((i as f32 + 0.5) / f - 0.5).max(0.0) };
            let i0 = (pos.floor() as usize).min(n - 1);
            let i1 = (i0 + 1).min(n - 1);
            (i0, i1, pos - i0 as f32)
        })
        .collect()
}

/// Full-resolution samples feeding sub-sampled sample `j` (of a component
/// sub-sampled by `f = 2^shift` on an axis of `len` samples), with weights summing
/// to 1: the `f` samples of its block when centred (a box), a triangle of
/// half-width `f` centred on sample `j * f` when co-sited (`1/4, 1/2, 1/4` for
/// 4:2:x). Taps outside the frame are left out.
fn downsample_taps(len: usize, shift: u32, n: usize, cosited: bool) -> Vec<Vec<(usize, f32)>> {
    let f = 1usize << shift;
    (0..n)
        .map(|j| {
            let mut taps: Vec<(usize, f32)> = if !cosited || shift == 0 {
                (j * f..((j + 1) * f).min(len)).map(|i| (i, 1.0)).collect()
            } else {
                let c = (j * f) as isize;
                (c - f as isize + 1..c + f as isize)
                    .filter(|&i| i >= 0 && (i as usize) < len)
                    .map(|i| (i as usize, 1.0 - (i - c).unsigned_abs() as f32 / f as f32))
                    .collect()
            };
            let total: f32 = taps.iter().map(|t| t.1).sum();
            for t in &mut taps {
                t.1 /= total;
            }
            taps
        })
        .collect()
}

/// Read a `width` x `height` frame into packed RGB (`height x width x 3`),
/// upsampling sub-sampled components from the sites `siting` gives.
pub fn read_rgb_sited(
    layout: &Layout,
    siting: ChromaSiting,
    planes: &[Plane<'_>],
    width: usize,
    height: usize,
) -> Result<Vec<u8>, ConvertError> {
    let sizes: Vec<_> = planes.iter().map(|p| (p.data.len(), p.stride)).collect();
    check(layout, &sizes, width, height)?;
    let mut out = vec![0u8; width * height * 3];
    if width == 0 || height == 0 {
        return Ok(out);
    }
    // sub-sampled components: each of their rows upsampled across once
    // (`top` and `bottom` below), in parallel
    let across: Vec<Option<(Vec<f32>, Vec<Tap>)>> = layout
        .comps
        .iter()
        .map(|c| {
            if c.sub_x == 0 && c.sub_y == 0 {
                return None;
            }
            let (cw, ch) = c.size(width, height);
            let p = &planes[c.plane];
            let tx = upsample_taps(width, c.sub_x, cw, siting.cosited_x);
            let mut rows = vec![0f32; width * ch];
            rows.par_chunks_mut(width).enumerate().for_each(|(cy, out)| {
                let r = &p.data[cy * p.stride + c.offset..];
                let s = |x: usize| r[x * c.pixel_stride] as f32;
                for (o, &(x0, x1, fx)) in out.iter_mut().zip(&tx) {
                    *o = s(x0) + fx * (s(x1) - s(x0));
                }
            });
            Some((rows, upsample_taps(height, c.sub_y, ch, siting.cosited_y)))
        })
        .collect();
    // rows in parallel (the engine's threads are idle while the frame
    // converts), each component's first into a row of f32
    let model = layout.model;
    out.par_chunks_mut(width * 3).enumerate().for_each_init(
        || [vec![0f32; width], vec![0f32; width], vec![0f32; width]],
        |rows, (y, out)| {
            for ((c, across), row) in layout.comps.iter().zip(&across).zip(rows.iter_mut()) {
                match across {
                    // full resolution: the samples themselves (what the taps give)
                    None => {
                        let p = &planes[c.plane];
                        let r = &p.data[y * p.stride + c.offset..];
                        if c.pixel_stride == 1 {
                            samples_row(&r[..width], row);
                        } else {
                            row.iter_mut().enumerate().for_each(|(x, o)| *o = r[x * c.pixel_stride] as f32);
                        }
                    }
                    Some((across, ty)) => {
                        let (y0, y1, fy) = ty[y];
                        lerp_row(&across[y0 * width..][..width], &across[y1 * width..][..width], fy, row);
                    }
                }
            }
            rgb_row(model, [&rows[0], &rows[1], &rows[2]], out);
        },
    );
    Ok(out)
}

simd_fn! {
    /// `top + f (bottom - top)`: a bilinear upsampling's second axis.
    fn lerp_row(top: &[f32], bottom: &[f32], f: f32, out: &mut [f32]) {
        for ((o, &t), &b) in out.iter_mut().zip(top).zip(bottom) {
            *o = t + f * (b - t);
        }
    }
}

simd_fn! {
    /// Bytes to f32.
    fn samples_row(src: &[u8], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(src) {
            *o = v as f32;
        }
    }
}

simd_fn! {
    /// One packed RGB row from the three components' full-resolution rows.
    fn rgb_row(model: ColorModel, rows: [&[f32]; 3], out: &mut [u8]) {
        let [a, b, c] = rows;
        // plain loops: a closure would be compiled apart, without AVX2
        match model {
            ColorModel::Rgb => {
                for (((px, &r), &g), &b) in out.chunks_exact_mut(3).zip(a).zip(b).zip(c) {
                    (px[0], px[1], px[2]) = (to_u8(r), to_u8(g), to_u8(b));
                }
            }
            ColorModel::Yuv(m) => {
                for (((px, &y), &cb), &cr) in out.chunks_exact_mut(3).zip(a).zip(b).zip(c) {
                    let [r, g, b] = m.to_rgb(y, cb, cr);
                    (px[0], px[1], px[2]) = (to_u8(r), to_u8(g), to_u8(b));
                }
            }
        }
    }
}

/// Write the engine's `restored` RGB image (same size as the frame) back into the
/// frame: each sample becomes `original + strength * (converted - original)`, the
/// converted value being the restored colour in the frame's colour space, filtered
/// onto the sub-sampled sites `siting` gives (see [`downsample_taps`]). `strength`
/// is clamped to 0..1 (0 writes nothing); bytes outside the three components are
/// not touched.
pub fn write_rgb_sited(
    layout: &Layout,
    siting: ChromaSiting,
    planes: &mut [PlaneMut<'_>],
    width: usize,
    height: usize,
    restored: &[u8],
    strength: f32,
) -> Result<(), ConvertError> {
    write_impl(layout, siting, planes, width, height, None, restored, strength)
}

/// Write only the change the engine made: each sample becomes `original +
/// strength * (converted(restored) - converted(input))`, `input` being the RGB
/// image [`read_rgb_sited`] read from these planes. Where the restoration left
/// a pixel as it was read, the frame keeps its own sample bit for bit (the
/// RGB round trip and its chroma filtering cost nothing there).
#[allow(clippy::too_many_arguments)]
pub fn write_rgb_change(
    layout: &Layout,
    siting: ChromaSiting,
    planes: &mut [PlaneMut<'_>],
    width: usize,
    height: usize,
    input: &[u8],
    restored: &[u8],
    strength: f32,
) -> Result<(), ConvertError> {
    check_rgb(input.len(), width, height)?;
    write_impl(layout, siting, planes, width, height, Some(input), restored, strength)
}

#[allow(clippy::too_many_arguments)]
fn write_impl(
    layout: &Layout,
    siting: ChromaSiting,
    planes: &mut [PlaneMut<'_>],
    width: usize,
    height: usize,
    input: Option<&[u8]>,
    restored: &[u8],
    strength: f32,
) -> Result<(), ConvertError> {
    let sizes: Vec<_> = planes.iter().map(|p| (p.data.len(), p.stride)).collect();
    check(layout, &sizes, width, height)?;
    check_rgb(restored.len(), width, height)?;
    let strength = if strength.is_finite() { strength.clamp(0.0, 1.0) } else { 1.0 };
    if width == 0 || height == 0 || strength == 0.0 {
        return Ok(());
    }

    // each component on its own, its full-resolution rows converted from the
    // packed RGB as they are needed (no frame-sized intermediate)
    let model = layout.model;
    let restored_row = |y: usize| &restored[y * width * 3..][..width * 3];
    let input_row = |y: usize| input.map(|i| &i[y * width * 3..][..width * 3]);
    for (ci, c) in layout.comps.iter().enumerate() {
        let p = &mut planes[c.plane];
        let (cw, ch) = c.size(width, height);
        if cw == 0 || ch == 0 {
            continue;
        }
        let tx = downsample_taps(width, c.sub_x, cw, siting.cosited_x);
        let ty = downsample_taps(height, c.sub_y, ch, siting.cosited_y);
        let full_res = c.sub_x == 0 && c.sub_y == 0;
        // one row of the component, from the start of its row in the plane
        let write_row = |prow: &mut [u8], ys: &Vec<(usize, f32)>, (v, converted): &mut (Vec<f32>, Vec<f32>)| {
            v.resize(width, 0.0);
            if full_res && c.pixel_stride == 1 {
                // one tap of weight 1 each way: the sample's own value
                let y = ys[0].0;
                component_row(model, ci, restored_row(y), input_row(y), v);
                blend_row(v, &mut prow[c.offset..][..width], strength, input.is_some());
                return;
            }
            // Σ_y wy Σ_x wx v[y][x], summed in that order
            converted.clear();
            converted.resize(cw, 0.0);
            for &(y, wy) in ys {
                component_row(model, ci, restored_row(y), input_row(y), v);
                for (o, xs) in converted.iter_mut().zip(&tx) {
                    *o += wy * xs.iter().map(|&(x, wx)| wx * v[x]).sum::<f32>();
                }
            }
            for (cx, &converted) in converted.iter().enumerate() {
                let idx = index(c, 0, cx, 0);
                let old = prow[idx] as f32;
                let change = if input.is_some() { converted } else { converted - old };
                prow[idx] = to_u8(old + strength * change);
            }
        };
        if p.stride > c.offset + (cw - 1) * c.pixel_stride {
            // each row within its stride: rows in parallel
            p.data
                .par_chunks_mut(p.stride)
                .zip(ty.par_iter())
                .for_each_init(Default::default, |scratch, (prow, ys)| write_row(prow, ys, scratch));
        } else {
            // rows that overlap (a stride shorter than a row): in order
            let mut scratch = Default::default();
            for (cy, ys) in ty.iter().enumerate() {
                write_row(&mut p.data[cy * p.stride..], ys, &mut scratch);
            }
        }
    }
    Ok(())
}

simd_fn! {
    /// Component `ci` of a frame's row from a packed RGB row `src` (or, given
    /// the row `input` it was restored from, its change: 0 where the pixel is
    /// unchanged).
    fn component_row(model: ColorModel, ci: usize, src: &[u8], input: Option<&[u8]>, out: &mut [f32]) {
        // plain loops (a closure would be compiled apart, without AVX2), one
        // per component, so that each computes only its own
        macro_rules! rows {
            ($k:literal) => {{
                let convert = |px: &[u8]| {
                    let (r, g, b) = (px[0] as f32, px[1] as f32, px[2] as f32);
                    match model {
                        ColorModel::Rgb => [r, g, b][$k],
                        ColorModel::Yuv(m) => m.from_rgb(r, g, b)[$k],
                    }
                };
                match input {
                    None => {
                        for (o, px) in out.iter_mut().zip(src.chunks_exact(3)) {
                            *o = convert(px);
                        }
                    }
                    Some(input) => {
                        for ((o, px), a) in out.iter_mut().zip(src.chunks_exact(3)).zip(input.chunks_exact(3)) {
                            *o = if a == px { 0.0 } else { convert(px) - convert(a) };
                        }
                    }
                }
            }};
        }
        match ci {
            0 => rows!(0),
            1 => rows!(1),
            _ => rows!(2),
        }
    }
}

simd_fn! {
    /// A full-resolution component's row into its samples: `old + strength *
    /// change`, the change being `v` itself (`v_is_change`) or `v - old`.
    fn blend_row(v: &[f32], samples: &mut [u8], strength: f32, v_is_change: bool) {
        for (s, &v) in samples.iter_mut().zip(v) {
            let old = *s as f32;
            let change = if v_is_change { v } else { v - old };
            *s = to_u8(old + strength * change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(bpp: usize, r: usize, g: usize, b: usize) -> Layout {
        let c = |offset| Component { plane: 0, offset, pixel_stride: bpp, sub_x: 0, sub_y: 0 };
        Layout { model: ColorModel::Rgb, comps: [c(r), c(g), c(b)] }
    }

    fn planar(m: YuvMatrix, sub_x: u32, sub_y: u32) -> Layout {
        let c = |plane, sub_x, sub_y| Component { plane, offset: 0, pixel_stride: 1, sub_x, sub_y };
        Layout { model: ColorModel::Yuv(m), comps: [c(0, 0, 0), c(1, sub_x, sub_y), c(2, sub_x, sub_y)] }
    }

    fn nv12(m: YuvMatrix) -> Layout {
        Layout {
            model: ColorModel::Yuv(m),
            comps: [
                Component { plane: 0, offset: 0, pixel_stride: 1, sub_x: 0, sub_y: 0 },
                Component { plane: 1, offset: 0, pixel_stride: 2, sub_x: 1, sub_y: 1 },
                Component { plane: 1, offset: 1, pixel_stride: 2, sub_x: 1, sub_y: 1 },
            ],
        }
    }

    fn yuy2(m: YuvMatrix) -> Layout {
        Layout {
            model: ColorModel::Yuv(m),
            comps: [
                Component { plane: 0, offset: 0, pixel_stride: 2, sub_x: 0, sub_y: 0 },
                Component { plane: 0, offset: 1, pixel_stride: 4, sub_x: 1, sub_y: 0 },
                Component { plane: 0, offset: 3, pixel_stride: 4, sub_x: 1, sub_y: 0 },
            ],
        }
    }

    /// Deterministic pseudo-random bytes (xorshift).
    fn noise(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Planes for `layout` at `width` x `height`, every row padded by `pad` bytes,
    /// filled with noise (so padding and unused bytes are recognisable).
    fn alloc(layout: &Layout, width: usize, height: usize, pad: usize, seed: u32) -> Vec<(Vec<u8>, usize)> {
        let n = layout.comps.iter().map(|c| c.plane).max().unwrap() + 1;
        (0..n)
            .map(|p| {
                let (mut row, mut rows) = (0, 0);
                for c in layout.comps.iter().filter(|c| c.plane == p) {
                    let (cw, ch) = c.size(width, height);
                    row = row.max(cw * c.pixel_stride + c.offset);
                    rows = rows.max(ch);
                }
                let stride = row + pad;
                (noise(stride * rows, seed + p as u32), stride)
            })
            .collect()
    }

    fn read(layout: &Layout, planes: &[(Vec<u8>, usize)], w: usize, h: usize) -> Vec<u8> {
        let p: Vec<_> = planes.iter().map(|(d, s)| Plane { data: d, stride: *s }).collect();
        read_rgb_sited(layout, ChromaSiting::JPEG, &p, w, h).unwrap()
    }

    fn write(layout: &Layout, planes: &mut [(Vec<u8>, usize)], w: usize, h: usize, restored: &[u8], s: f32) {
        let mut p: Vec<_> = planes.iter_mut().map(|(d, s)| PlaneMut { data: d, stride: *s }).collect();
        write_rgb_sited(layout, ChromaSiting::JPEG, &mut p, w, h, restored, s).unwrap();
    }

    fn all_layouts() -> Vec<(&'static str, Layout)> {
        let m = YuvMatrix::BT601_FULL;
        vec![
            ("RGB", packed(3, 0, 1, 2)),
            ("BGR", packed(3, 2, 1, 0)),
            ("RGBA", packed(4, 0, 1, 2)),
            ("BGRx", packed(4, 2, 1, 0)),
            ("ARGB", packed(4, 1, 2, 3)),
            ("I420", planar(m, 1, 1)),
            ("Y42B", planar(m, 1, 0)),
            ("Y444", planar(m, 0, 0)),
            ("NV12", nv12(m)),
            ("YUY2", yuy2(m)),
            ("I420 BT.709 limited", planar(YuvMatrix::new(0.2126, 0.0722, false), 1, 1)),
        ]
    }

    /// A smooth test image with some texture, `w x h x 3`.
    fn smooth_rgb(w: usize, h: usize) -> Vec<u8> {
        (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    [
                        (40 + x * 150 / w.max(1)) as u8,
                        (60 + y * 120 / h.max(1)) as u8,
                        (90 + (x + y) * 100 / (w + h)) as u8,
                    ]
                })
            })
            .collect()
    }

    fn max_abs_diff(a: &[u8], b: &[u8]) -> i32 {
        a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap_or(0)
    }

    /// Which bytes of each plane hold one of the three components.
    fn component_mask(layout: &Layout, planes: &[(Vec<u8>, usize)], w: usize, h: usize) -> Vec<Vec<bool>> {
        let mut mask: Vec<Vec<bool>> = planes.iter().map(|(d, _)| vec![false; d.len()]).collect();
        for c in &layout.comps {
            let (cw, ch) = c.size(w, h);
            for y in 0..ch {
                for x in 0..cw {
                    mask[c.plane][index(c, planes[c.plane].1, x, y)] = true;
                }
            }
        }
        mask
    }

    #[test]
    fn to_u8_rounds_as_libm_round_then_clamps() {
        let mut vals = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.5,
            -0.0,
            0.5,
            1.5,
            2.5,
            254.5,
            255.49,
            255.5,
            1e9,
            -1e9,
        ];
        vals.extend((-2000..300_000).map(|i| i as f32 * 0.001 - 1.0));
        // every tie and its two neighbours
        vals.extend((0..=255).flat_map(|i| {
            let h = i as f32 + 0.5;
            [h, f32::from_bits(h.to_bits() - 1), f32::from_bits(h.to_bits() + 1)]
        }));
        for v in vals {
            assert_eq!(to_u8(v), v.round().clamp(0.0, 255.0) as u8, "{v}");
        }
    }

    #[test]
    fn identity_restore_keeps_rgb_frames_bit_exact() {
        for (name, layout) in all_layouts().into_iter().filter(|(_, l)| l.model == ColorModel::Rgb) {
            for (w, h) in [(1, 1), (2, 2), (17, 9), (64, 3)] {
                for pad in [0, 5] {
                    let mut planes = alloc(&layout, w, h, pad, 7 + w as u32);
                    let before = planes.clone();
                    let rgb = read(&layout, &planes, w, h);
                    assert_eq!(rgb.len(), w * h * 3);
                    write(&layout, &mut planes, w, h, &rgb, 1.0);
                    assert_eq!(planes, before, "{name} {w}x{h} pad {pad}");
                }
            }
        }
    }

    /// Writing only the change: every format, noisy content (sub-sampled
    /// chroma that the RGB round trip would smooth), an unchanged picture
    /// leaves the frame bit for bit; a change of one pixel's colour reaches
    /// only the samples whose filters cover that pixel.
    #[test]
    fn writing_the_change_keeps_untouched_samples_bit_exact() {
        for (name, layout) in all_layouts() {
            for (w, h) in [(1, 1), (2, 2), (17, 9), (64, 33)] {
                let mut planes = alloc(&layout, w, h, 3, 11 + w as u32);
                let before = planes.clone();
                let rgb = read(&layout, &planes, w, h);
                let mut p: Vec<_> = planes.iter_mut().map(|(d, s)| PlaneMut { data: d, stride: *s }).collect();
                write_rgb_change(&layout, ChromaSiting::JPEG, &mut p, w, h, &rgb, &rgb, 1.0).unwrap();
                assert_eq!(planes, before, "{name} {w}x{h}: unchanged picture");
                // one pixel made white: the far corner's samples stay as they were
                let mut changed = rgb.clone();
                changed[..3].copy_from_slice(&[255, 255, 255]);
                let mut p: Vec<_> = planes.iter_mut().map(|(d, s)| PlaneMut { data: d, stride: *s }).collect();
                write_rgb_change(&layout, ChromaSiting::JPEG, &mut p, w, h, &rgb, &changed, 1.0).unwrap();
                if w >= 17 {
                    let back = read(&layout, &planes, w, h);
                    let last = 3 * (w * h - 1);
                    let old = read(&layout, &before, w, h);
                    assert_eq!(back[last..], old[last..], "{name} {w}x{h}: far corner");
                    assert_ne!(planes, before, "{name} {w}x{h}: the change was written");
                }
            }
        }
    }

    #[test]
    fn identity_restore_keeps_yuv_frames_within_rounding() {
        // YUV content as a decoder produces it (from an RGB picture): reading and
        // writing back unchanged moves luma by at most one step; chroma only by the
        // smoothing of sub-sampled blocks.
        for (name, layout) in all_layouts().into_iter().filter(|(_, l)| l.model != ColorModel::Rgb) {
            for (w, h) in [(1, 1), (2, 2), (17, 9), (64, 33)] {
                let mut planes = alloc(&layout, w, h, 3, 5);
                write(&layout, &mut planes, w, h, &smooth_rgb(w, h), 1.0);
                let before = planes.clone();
                let rgb = read(&layout, &planes, w, h);
                write(&layout, &mut planes, w, h, &rgb, 1.0);
                let (mut luma, mut chroma) = (0, 0);
                for (ci, c) in layout.comps.iter().enumerate() {
                    let (cw, ch) = c.size(w, h);
                    for yy in 0..ch {
                        for xx in 0..cw {
                            let i = index(c, planes[c.plane].1, xx, yy);
                            let d = (planes[c.plane].0[i] as i32 - before[c.plane].0[i] as i32).abs();
                            if ci == 0 {
                                luma = luma.max(d)
                            } else {
                                chroma = chroma.max(d)
                            }
                        }
                    }
                }
                assert!(luma <= 1, "{name} {w}x{h}: luma moved by {luma}");
                assert!(chroma <= 3, "{name} {w}x{h}: chroma moved by {chroma}");
            }
        }
    }

    #[test]
    fn bytes_outside_the_components_are_never_written() {
        for (name, layout) in all_layouts() {
            let (w, h) = (17, 9);
            let mut planes = alloc(&layout, w, h, 6, 21);
            let before = planes.clone();
            write(&layout, &mut planes, w, h, &noise(w * h * 3, 4), 1.0);
            let mask = component_mask(&layout, &planes, w, h);
            for p in 0..planes.len() {
                for (i, &is_comp) in mask[p].iter().enumerate() {
                    if !is_comp {
                        assert_eq!(planes[p].0[i], before[p].0[i], "{name}: plane {p} byte {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn packed_rgb_reads_and_writes_channels_in_order() {
        // One BGRA pixel, B=10 G=20 R=30 A=40, in a row padded to 8 bytes.
        let layout = packed(4, 2, 1, 0);
        let mut planes = vec![(vec![10, 20, 30, 40, 99, 99, 99, 99], 8)];
        assert_eq!(read(&layout, &planes, 1, 1), vec![30, 20, 10]);
        write(&layout, &mut planes, 1, 1, &[1, 2, 3], 1.0);
        assert_eq!(planes[0].0, vec![3, 2, 1, 40, 99, 99, 99, 99]);
    }

    #[test]
    fn strength_blends_between_input_and_restored() {
        let layout = packed(3, 0, 1, 2);
        let mut planes = vec![(vec![100, 0, 255], 3)];
        write(&layout, &mut planes, 1, 1, &[200, 100, 55], 0.5);
        assert_eq!(planes[0].0, vec![150, 50, 155]);
        write(&layout, &mut planes, 1, 1, &[0, 0, 0], 0.0);
        assert_eq!(planes[0].0, vec![150, 50, 155]);
        // Out-of-range strengths are clamped, NaN means full strength.
        write(&layout, &mut planes, 1, 1, &[1, 2, 3], 7.0);
        assert_eq!(planes[0].0, vec![1, 2, 3]);
        write(&layout, &mut planes, 1, 1, &[4, 5, 6], f32::NAN);
        assert_eq!(planes[0].0, vec![4, 5, 6]);
    }

    #[test]
    fn bt601_full_range_round_trip_is_within_two_steps() {
        // RGB -> YUV (rounded, as a JPEG decoder stores it) -> RGB.
        let m = YuvMatrix::BT601_FULL;
        let layout = planar(m, 0, 0);
        let mut max_err = 0;
        for r in (0..=255).step_by(15) {
            for g in (0..=255).step_by(15) {
                for b in (0..=255).step_by(15) {
                    let yuv = m.from_rgb(r as f32, g as f32, b as f32);
                    let planes: Vec<_> = yuv.iter().map(|v| (vec![to_u8(*v)], 1)).collect();
                    let rgb = read(&layout, &planes, 1, 1);
                    max_err = max_err.max(max_abs_diff(&rgb, &[r as u8, g as u8, b as u8]));
                }
            }
        }
        assert!(max_err <= 2, "max error {max_err}");
    }

    #[test]
    fn known_bt601_values() {
        let m = YuvMatrix::BT601_FULL;
        let y = m.from_rgb(255.0, 0.0, 0.0);
        assert!((y[0] - 76.245).abs() < 0.01 && (y[1] - 84.97).abs() < 0.05 && (y[2] - 255.5).abs() < 0.05, "{y:?}");
        // Limited range: 16 is black, 235 white, 128 neutral chroma.
        let l = YuvMatrix::new(0.299, 0.114, false);
        let layout = planar(l, 0, 0);
        let px = |y| read(&layout, &[(vec![y], 1), (vec![128], 1), (vec![128], 1)], 1, 1);
        assert_eq!(px(16), vec![0, 0, 0]);
        assert_eq!(px(235), vec![255, 255, 255]);
        assert_eq!(px(0), vec![0, 0, 0]);
    }

    #[test]
    fn every_format_stores_the_restored_picture() {
        // Restoring to a given picture: every format must read back (nearly) it,
        // whatever noise the frame held before.
        for (name, layout) in all_layouts() {
            for (w, h) in [(1, 1), (17, 9), (33, 20)] {
                let mut planes = alloc(&layout, w, h, 3, 11);
                let flat: Vec<u8> = [200u8, 120, 40].iter().copied().cycle().take(w * h * 3).collect();
                write(&layout, &mut planes, w, h, &flat, 1.0);
                let err = max_abs_diff(&read(&layout, &planes, w, h), &flat);
                assert!(err <= 2, "{name} {w}x{h} flat: max error {err}");
                let smooth = smooth_rgb(w, h);
                write(&layout, &mut planes, w, h, &smooth, 1.0);
                let back = read(&layout, &planes, w, h);
                let mean = back.iter().zip(&smooth).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>()
                    / smooth.len() as f64;
                assert!(mean < 1.5, "{name} {w}x{h} smooth: mean abs error {mean}");
            }
        }
    }

    #[test]
    fn short_planes_and_bad_sizes_are_errors_not_panics() {
        let layout = planar(YuvMatrix::BT601_FULL, 1, 1);
        // 4x4 I420 with a chroma plane one byte short.
        let planes = [
            Plane { data: &[0; 16], stride: 4 },
            Plane { data: &[0; 4], stride: 2 },
            Plane { data: &[0; 3], stride: 2 },
        ];
        assert!(matches!(
            read_rgb_sited(&layout, ChromaSiting::JPEG, &planes, 4, 4),
            Err(ConvertError::PlaneTooSmall { plane: 2, .. })
        ));
        assert!(matches!(
            read_rgb_sited(&layout, ChromaSiting::JPEG, &planes[..2], 4, 4),
            Err(ConvertError::MissingPlane { plane: 2, .. })
        ));
        let mut y = [0u8; 16];
        let mut u = [0u8; 4];
        let mut v = [0u8; 4];
        let mut planes = [
            PlaneMut { data: &mut y, stride: 4 },
            PlaneMut { data: &mut u, stride: 2 },
            PlaneMut { data: &mut v, stride: 2 },
        ];
        let rgb = vec![0u8; 4 * 4 * 3];
        assert!(matches!(
            write_rgb_sited(&layout, ChromaSiting::JPEG, &mut planes, 4, 4, &rgb[1..], 1.0),
            Err(ConvertError::RgbSize { .. })
        ));
        assert!(write_rgb_sited(&layout, ChromaSiting::JPEG, &mut planes, 4, 4, &rgb, 1.0).is_ok());
        // Huge sizes overflow-check instead of wrapping.
        assert!(read_rgb_sited(
            &layout,
            ChromaSiting::JPEG,
            &[Plane { data: &[0; 16], stride: usize::MAX / 2 }; 3],
            4,
            4
        )
        .is_err());
        // 1x1 I420: one sample per plane.
        let one =
            [Plane { data: &[81], stride: 1 }, Plane { data: &[90], stride: 1 }, Plane { data: &[240], stride: 1 }];
        assert_eq!(read_rgb_sited(&layout, ChromaSiting::JPEG, &one, 1, 1).unwrap().len(), 3);
        // Empty frames are fine.
        assert!(read_rgb_sited(&layout, ChromaSiting::JPEG, &one, 0, 0).unwrap().is_empty());
    }

    /// Planes with their strides.
    type Planes = Vec<(Vec<u8>, usize)>;

    /// An I420 frame whose chroma is a horizontal ramp sampled left-cosited (as an
    /// H.264 decoder delivers it) against the full-resolution picture it stands for.
    fn cosited_ramp(w: usize, h: usize) -> (Layout, Planes, Vec<u8>) {
        let m = YuvMatrix::BT601_FULL;
        let layout = planar(m, 1, 1);
        // Full-resolution Y, Cb, Cr: flat luma, chroma ramps along x (steep, but
        // inside the RGB gamut for w <= 16, so that no colour is clipped).
        let cb = |x: f32| 60.0 + 8.0 * x;
        let cr = |x: f32| 190.0 - 8.0 * x;
        let truth: Vec<u8> = (0..h)
            .flat_map(|_| (0..w).flat_map(move |x| m.to_rgb(128.0, cb(x as f32), cr(x as f32)).map(to_u8)))
            .collect();
        let (cw, ch) = layout.comps[1].size(w, h);
        let plane = |f: &dyn Fn(f32) -> f32| -> Vec<u8> {
            (0..ch).flat_map(|_| (0..cw).map(|j| to_u8(f((2 * j) as f32))).collect::<Vec<_>>()).collect()
        };
        let planes = vec![(vec![128u8; w * h], w), (plane(&cb), cw), (plane(&cr), cw)];
        (layout, planes, truth)
    }

    fn read_sited(layout: &Layout, s: ChromaSiting, planes: &[(Vec<u8>, usize)], w: usize, h: usize) -> Vec<u8> {
        let p: Vec<_> = planes.iter().map(|(d, st)| Plane { data: d, stride: *st }).collect();
        read_rgb_sited(layout, s, &p, w, h).unwrap()
    }

    fn mean_abs(a: &[u8], b: &[u8]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn left_cosited_chroma_reads_and_writes_better_with_its_siting() {
        let (w, h) = (16, 8);
        let (layout, planes, truth) = cosited_ramp(w, h);
        // Reading: the picture seen with the caps' siting is the true one (within
        // rounding); assuming centred sites shifts chroma by half a luma pixel.
        let right = mean_abs(&read_sited(&layout, ChromaSiting::MPEG2, &planes, w, h), &truth);
        let wrong = mean_abs(&read_sited(&layout, ChromaSiting::JPEG, &planes, w, h), &truth);
        eprintln!("left-cosited ramp read: mean RGB error {right:.3} (MPEG-2 siting) vs {wrong:.3} (centred)");
        // (all of it in the last column, which has no chroma sample to its right)
        assert!(right < 1.0, "MPEG-2 siting: mean error {right}");
        assert!(wrong > 2.0 * right + 0.5, "centred {wrong} vs MPEG-2 {right}");

        // Writing the true picture back: co-sited filtering reproduces the decoder's
        // chroma samples; a box over each block (centred) moves them.
        let write_planes = |s: ChromaSiting| {
            let mut out = planes.clone();
            let mut p: Vec<_> = out.iter_mut().map(|(d, st)| PlaneMut { data: d, stride: *st }).collect();
            write_rgb_sited(&layout, s, &mut p, w, h, &truth, 1.0).unwrap();
            out
        };
        let chroma_err = |out: &[(Vec<u8>, usize)]| {
            // interior samples (the first column's triangle is cut by the frame edge)
            let (cw, _) = layout.comps[1].size(w, h);
            let mut e = 0i32;
            for c in 1..3 {
                for (i, (a, b)) in out[c].0.iter().zip(&planes[c].0).enumerate() {
                    if i % cw != 0 {
                        e = e.max((*a as i32 - *b as i32).abs());
                    }
                }
            }
            e
        };
        let right = chroma_err(&write_planes(ChromaSiting::MPEG2));
        let wrong = chroma_err(&write_planes(ChromaSiting::JPEG));
        eprintln!("left-cosited ramp write: chroma moved by {right} (MPEG-2 siting) vs {wrong} (centred)");
        assert!(right <= 1, "MPEG-2 siting moved chroma by {right}");
        assert!(wrong >= 3, "centred siting moved chroma by only {wrong}");

        // And a full read -> write round trip with the right siting keeps the planes
        // (within the rounding of the 8-bit RGB in between).
        let rgb = read_sited(&layout, ChromaSiting::MPEG2, &planes, w, h);
        let mut out = planes.clone();
        let mut p: Vec<_> = out.iter_mut().map(|(d, st)| PlaneMut { data: d, stride: *st }).collect();
        write_rgb_sited(&layout, ChromaSiting::MPEG2, &mut p, w, h, &rgb, 1.0).unwrap();
        assert!(chroma_err(&out) <= 2, "round trip moved chroma by {}", chroma_err(&out));
    }

    #[test]
    fn downsample_taps_are_normalised_boxes_or_triangles() {
        let boxes = downsample_taps(5, 1, 3, false);
        assert_eq!(boxes[0], vec![(0, 0.5), (1, 0.5)]);
        assert_eq!(boxes[2], vec![(4, 1.0)]);
        let tri = downsample_taps(5, 1, 3, true);
        assert_eq!(tri[1], vec![(1, 0.25), (2, 0.5), (3, 0.25)]);
        // the left edge drops the tap outside the frame and renormalises
        assert_eq!(tri[0], vec![(0, 2.0 / 3.0), (1, 1.0 / 3.0)]);
        assert_eq!(downsample_taps(4, 0, 4, true)[2], vec![(2, 1.0)]);
        // co-sited upsampling puts chroma sample j on luma sample 2j
        let up = upsample_taps(6, 1, 3, true);
        assert_eq!((up[2].0, up[2].2), (1, 0.0));
        assert_eq!((up[3].0, up[3].1, up[3].2), (1, 2, 0.5));
    }
}
