//! A frame between GStreamer and the engine: where its colour components
//! live ([`layout_for`], [`chroma_siting`]), the size and memory checks before
//! anything is allocated, reading it as packed RGB and writing back only what
//! the engine changed, and why a frame was not restored ([`FrameError`]).
use super::*;

/// Why a frame was not restored.
pub(super) enum FrameError {
    /// The cancel token was raised (flush, state change): not an error.
    Cancelled,
    /// What failed, and why.
    Failed(&'static str, String),
}

impl FrameError {
    pub(super) fn failed(what: &'static str, cause: impl std::fmt::Display) -> Self {
        Self::Failed(what, cause.to_string())
    }

    pub(super) fn engine(what: &'static str, err: Failure) -> Self {
        match err {
            Failure::Engine(EngineError::Cancelled) => Self::Cancelled,
            err => Self::failed(what, err),
        }
    }
}

/// Run `f` inside `pool` when the element has its own (`n-threads`), else on
/// rayon's global pool.
pub(super) fn in_pool<T: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// The size limits, checked before anything is allocated for the frame:
/// refuse a `width`x`height` frame above `max-frame-pixels`, and one the
/// process has not the memory for. Returns the options the frame runs with
/// and the warnings about tile properties adjusted in them.
pub(super) fn check_frame_size(
    settings: &Settings,
    engine: &Engine,
    width: usize,
    height: usize,
) -> Result<(RestoreOptions, Vec<String>), FrameError> {
    let pixels = width as u64 * height as u64;
    if settings.max_frame_pixels > 0 && pixels > settings.max_frame_pixels {
        return Err(FrameError::failed(
            "frame too large",
            format!("{width}x{height} is {pixels} pixels, more than max-frame-pixels={}", settings.max_frame_pixels),
        ));
    }
    // ... and frames the process has not the memory for (the element's own
    // copies of the frame: packed RGB three times)
    let (opts, adjusted) = settings.restore_options(Some(engine.min_cave_tile()));
    engine
        .check_memory(width, height, &opts, 9 * pixels)
        .map_err(|err| FrameError::failed("frame too large for the memory left", err))?;
    Ok((opts, adjusted))
}

/// The frame's plane strides and its picture as packed RGB.
pub(super) fn read_frame(
    frame: &gst_video::VideoFrameRef<&mut gst::BufferRef>,
    layout: &Layout,
    siting: ChromaSiting,
) -> Result<(Vec<usize>, Vec<u8>), FrameError> {
    let n_planes = frame.n_planes() as usize;
    let strides = frame.plane_stride()[..n_planes]
        .iter()
        .map(|&s| usize::try_from(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| FrameError::failed("frame", "negative plane strides are not supported"))?;
    let mut planes = Vec::with_capacity(n_planes);
    for (p, &stride) in strides.iter().enumerate() {
        let data = frame.plane_data(p as u32).map_err(|err| FrameError::failed("frame", err))?;
        planes.push(Plane { data, stride });
    }
    let rgb = convert::read_rgb_sited(layout, siting, &planes, frame.width() as usize, frame.height() as usize)
        .map_err(|err| FrameError::failed("reading the frame", err))?;
    Ok((strides, rgb))
}

/// Write the change from `input` to `output` (packed RGB, as [`read_frame`]
/// gave) into the frame's planes (see [`convert::write_rgb_change`]).
pub(super) fn write_frame_change(
    frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    strides: &[usize],
    layout: &Layout,
    siting: ChromaSiting,
    input: &[u8],
    output: &[u8],
    strength: f32,
) -> Result<(), FrameError> {
    let (width, height) = (frame.width() as usize, frame.height() as usize);
    let mut planes: Vec<PlaneMut> =
        frame.planes_data_mut().into_iter().zip(strides).map(|(data, &stride)| PlaneMut { data, stride }).collect();
    convert::write_rgb_change(layout, siting, &mut planes, width, height, input, output, strength)
        .map_err(|err| FrameError::failed("writing the frame", err))
}

/// Where the three colour components of `info`'s format live, or `None` for formats
/// the element does not handle (not 8 bits, not RGB or YUV, fewer than 3 components).
pub(super) fn layout_for(info: &gst_video::VideoInfo) -> Option<Layout> {
    let finfo = info.format_info();
    if finfo.n_components() < 3 || finfo.depth().iter().take(3).any(|&d| d != 8) {
        return None;
    }
    let model = if finfo.is_rgb() {
        ColorModel::Rgb
    } else if finfo.is_yuv() {
        let colorimetry = info.colorimetry();
        // JPEG is BT.601 full range; use it where the caps leave a choice open.
        let (kr, kb) = colorimetry.matrix().kr_kb().unwrap_or((0.299, 0.114));
        let full_range = colorimetry.range() != gst_video::VideoColorRange::Range16_235;
        ColorModel::Yuv(YuvMatrix::new(kr, kb, full_range))
    } else {
        return None;
    };
    let comp = |c: usize| -> Option<Component> {
        Some(Component {
            plane: *finfo.plane().get(c)? as usize,
            offset: *finfo.poffset().get(c)? as usize,
            pixel_stride: usize::try_from(*finfo.pixel_stride().get(c)?).ok().filter(|&s| s > 0)?,
            sub_x: *finfo.w_sub().get(c)?,
            sub_y: *finfo.h_sub().get(c)?,
        })
    };
    Some(Layout { model, comps: [comp(0)?, comp(1)?, comp(2)?] })
}

/// Chroma sites of `info`'s caps (no `chroma-site` field = unknown = centred, as JPEG).
pub(super) fn chroma_siting(info: &gst_video::VideoInfo) -> ChromaSiting {
    let site = info.chroma_site();
    ChromaSiting {
        cosited_x: site.contains(gst_video::VideoChromaSite::H_COSITED),
        cosited_y: site.contains(gst_video::VideoChromaSite::V_COSITED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_of_common_formats() {
        gst::init().unwrap();
        let layout = |caps: &str| {
            let caps: gst::Caps = caps.parse().unwrap();
            layout_for(&gst_video::VideoInfo::from_caps(&caps).unwrap())
        };
        let jpeg = layout("video/x-raw,format=I420,width=17,height=9,colorimetry=1:4:0:0").unwrap();
        assert_eq!(jpeg.model, ColorModel::Yuv(YuvMatrix::new(0.299, 0.114, true)));
        assert_eq!((jpeg.comps[1].plane, jpeg.comps[1].sub_x, jpeg.comps[1].sub_y), (1, 1, 1));
        let hd = layout("video/x-raw,format=NV12,width=1920,height=1080,colorimetry=bt709").unwrap();
        assert_eq!(hd.model, ColorModel::Yuv(YuvMatrix::new(0.2126, 0.0722, false)));
        assert_eq!(hd.comps[2], Component { plane: 1, offset: 1, pixel_stride: 2, sub_x: 1, sub_y: 1 });
        let bgrx = layout("video/x-raw,format=BGRx,width=1,height=1").unwrap();
        assert_eq!(bgrx.model, ColorModel::Rgb);
        assert_eq!(bgrx.comps.map(|c| (c.offset, c.pixel_stride)), [(2, 4), (1, 4), (0, 4)]);
        let argb = layout("video/x-raw,format=ARGB,width=3,height=2").unwrap();
        assert_eq!(argb.comps.map(|c| c.offset), [1, 2, 3]);
        let yuy2 = layout("video/x-raw,format=YUY2,width=4,height=2").unwrap();
        assert_eq!(yuy2.comps.map(|c| (c.offset, c.pixel_stride, c.sub_x)), [(0, 2, 0), (1, 4, 1), (3, 4, 1)]);
        assert!(layout("video/x-raw,format=GRAY8,width=4,height=2").is_none());
        assert!(layout("video/x-raw,format=I420_10LE,width=4,height=2").is_none());
    }

    #[test]
    fn chroma_siting_of_the_caps() {
        gst::init().unwrap();
        // GStreamer 1.22 reads chroma-site only next to a colorimetry field (which
        // decoders and videoconvert always set); without one it assumes centred.
        let siting = |site: &str| {
            let caps: gst::Caps =
                format!("video/x-raw,format=I420,width=16,height=16,colorimetry=bt601{site}").parse().unwrap();
            chroma_siting(&gst_video::VideoInfo::from_caps(&caps).unwrap())
        };
        assert_eq!(siting(",chroma-site=mpeg2"), ChromaSiting::MPEG2);
        assert_eq!(siting(",chroma-site=jpeg"), ChromaSiting::JPEG);
        assert_eq!(siting(",chroma-site=cosited"), ChromaSiting::COSITED);
        assert_eq!(siting(""), ChromaSiting::JPEG, "no field: centred");
    }
}
