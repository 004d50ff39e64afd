//! Tests of the `codiff` element: properties, formats, strides, caps changes,
//! passthrough, messages, meta, errors, the model cache and small pipelines.
//!
//! Tests that run frames need a model. They use, in this order: the default weights
//! (`$CODIFF_WEIGHTS` or `weights/codiff-cave-compact.safetensors`), else the tiny
//! random CODiff model of `$CODIFF_TINY_FIXTURE` or `tests/fixtures/codiff-tiny-a`
//! (diffusion mode). Without either they print why and return early; set
//! `CODIFF_REQUIRE_MODEL=1` to make that a failure (CI with weights should).
#![cfg(feature = "gst")]

use gst::prelude::*;
use gst_video::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use gstcodiff::engine::default_weights_path;

const QF_META: &str = "CodiffQfMeta";

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gstcodiff::plugin_register_static().expect("codiff plugin registers");
    });
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The README's demo picture (512x384, QF 10, 4:2:0).
fn demo_jpeg() -> PathBuf {
    manifest_dir().join("examples/data/astronaut-q10.jpg")
}

/// A small JPEG (160x96, QF 10) to cut into truncated files.
fn small_jpeg() -> PathBuf {
    manifest_dir().join("tests/fixtures/sample/input.jpg")
}

/// Properties naming a model the tests can load, or `None` (reason printed).
fn model_props() -> Option<Vec<(&'static str, String)>> {
    if default_weights_path().exists() {
        return Some(vec![]);
    }
    let tiny = std::env::var_os("CODIFF_TINY_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("tests/fixtures/codiff-tiny-a"));
    if tiny.join("codiff.pkl").exists() && tiny.join("cave.pth").exists() {
        let s = |p: &Path| p.to_string_lossy().into_owned();
        return Some(vec![
            ("mode", "diffusion".to_string()),
            ("sd-model", s(&tiny)),
            ("codiff-checkpoint", s(&tiny.join("codiff.pkl"))),
            ("cave-checkpoint", s(&tiny.join("cave.pth"))),
        ]);
    }
    let why = format!(
        "no model: {} does not exist and no tiny fixture at {}",
        default_weights_path().display(),
        tiny.display()
    );
    if std::env::var_os("CODIFF_REQUIRE_MODEL").is_some() {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

macro_rules! model_or_skip {
    () => {
        match model_props() {
            Some(props) => props,
            None => return,
        }
    };
}

fn make(props: &[(&str, String)]) -> gst::Element {
    init();
    let element = gst::ElementFactory::make("codiff")
        .build()
        .expect("codiff element");
    for (name, value) in props {
        element.set_property_from_str(name, value);
    }
    element
}

/// All messages waiting on `bus`.
fn drain(bus: &gst::Bus) -> Vec<gst::Message> {
    std::iter::from_fn(|| bus.pop()).collect()
}

/// The first error on `bus` (waiting up to `timeout`), as (message, debug).
fn first_error(bus: &gst::Bus, timeout: Duration) -> Option<(String, String)> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let msg = bus.timed_pop(gst::ClockTime::from_nseconds(left.as_nanos() as u64))?;
        if let gst::MessageView::Error(err) = msg.view() {
            return Some((
                format!(
                    "{} (from {})",
                    err.error(),
                    msg.src()
                        .map(|s| s.path_string().to_string())
                        .unwrap_or_default()
                ),
                err.debug().map(|d| d.to_string()).unwrap_or_default(),
            ));
        }
    }
}

/// A codiff element with its own bus, brought to READY (model loaded) so that a
/// failing load is reported here instead of aborting inside the harness.
fn ready_element(props: &[(&str, String)]) -> (gst::Element, gst::Bus) {
    let element = make(props);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    if element.set_state(gst::State::Ready).is_err() {
        let err = first_error(&bus, Duration::from_secs(1));
        panic!("codiff failed to reach READY: {err:?}");
    }
    (element, bus)
}

fn harness(element: &gst::Element) -> gst_check::Harness {
    gst_check::Harness::with_element(element, Some("sink"), Some("src"))
}

fn info(format: gst_video::VideoFormat, width: u32, height: u32) -> gst_video::VideoInfo {
    gst_video::VideoInfo::builder(format, width, height)
        .fps(gst::Fraction::new(30, 1))
        .build()
        .expect("valid video info")
}

const PAD_BYTE: u8 = 0xAB;

/// A frame of `info` whose planes are padded by `pad` bytes per row (described by a
/// `GstVideoMeta`), filled with a blocky gradient; padding bytes are `PAD_BYTE`.
fn padded_frame(info: &gst_video::VideoInfo, pad: usize) -> gst::Buffer {
    let finfo = info.format_info();
    let n_planes = info.n_planes() as usize;
    let mut strides = Vec::new();
    let mut offsets = Vec::new();
    let mut heights = Vec::new();
    let mut size = 0;
    for p in 0..n_planes {
        let comp = (0..finfo.n_components() as usize)
            .find(|&c| finfo.plane()[c] as usize == p)
            .unwrap();
        let h = finfo.scale_height(comp as u8, info.height()) as usize;
        let stride = info.stride()[p] as usize + pad;
        offsets.push(size);
        strides.push(stride as i32);
        heights.push(h);
        size += stride * h;
    }
    let mut data = vec![PAD_BYTE; size];
    for p in 0..n_planes {
        let row_bytes = info.stride()[p] as usize; // includes the format's own alignment
        let visible = {
            let comp = (0..finfo.n_components() as usize)
                .find(|&c| finfo.plane()[c] as usize == p)
                .unwrap();
            finfo.scale_width(comp as u8, info.width()) as usize
                * finfo.pixel_stride()[comp] as usize
        };
        for y in 0..heights[p] {
            let row = &mut data[offsets[p] + y * strides[p] as usize..][..row_bytes];
            for (x, b) in row[..visible].iter_mut().enumerate() {
                // 8x8 blocks of a gradient, like a coarse JPEG.
                *b = (((x / 8) * 29 + (y / 8) * 53 + p * 71) % 256) as u8;
            }
        }
    }
    let mut buffer = gst::Buffer::from_mut_slice(data);
    {
        let b = buffer.get_mut().unwrap();
        b.set_pts(gst::ClockTime::from_mseconds(40));
        b.set_duration(gst::ClockTime::from_mseconds(33));
        gst_video::VideoMeta::add_full(
            b,
            gst_video::VideoFrameFlags::empty(),
            info.format(),
            info.width(),
            info.height(),
            &offsets,
            &strides,
        )
        .expect("video meta");
    }
    buffer
}

/// Bytes of `buf` at the padding positions of `padded_frame`, and in alpha/x bytes.
fn untouched_bytes(info: &gst_video::VideoInfo, buf: &gst::BufferRef) -> Vec<u8> {
    let meta = buf.meta::<gst_video::VideoMeta>().expect("video meta kept");
    let map = buf.map_readable().unwrap();
    let finfo = info.format_info();
    let mut out = Vec::new();
    for p in 0..info.n_planes() as usize {
        let comp = (0..finfo.n_components() as usize)
            .find(|&c| finfo.plane()[c] as usize == p)
            .unwrap();
        let h = finfo.scale_height(comp as u8, info.height()) as usize;
        let stride = meta.stride()[p] as usize;
        let visible = finfo.scale_width(comp as u8, info.width()) as usize
            * finfo.pixel_stride()[comp] as usize;
        for y in 0..h {
            let row = &map[meta.offset()[p] + y * stride..][..stride];
            // Row padding: the format's own alignment plus `pad` extra bytes.
            out.extend_from_slice(&row[visible..]);
            if finfo.n_components() == 4 && finfo.plane()[3] as usize == p {
                let (a, ps) = (
                    finfo.poffset()[3] as usize,
                    finfo.pixel_stride()[3] as usize,
                );
                out.extend((0..info.width() as usize).map(|x| row[x * ps + a]));
            }
            if finfo.is_rgb() && finfo.n_components() == 3 && finfo.pixel_stride()[0] == 4 {
                // xRGB-style padding byte: the one offset no component uses.
                let used: Vec<usize> = (0..3).map(|c| finfo.poffset()[c] as usize).collect();
                if let Some(x_off) = (0..4).find(|o| !used.contains(o)) {
                    out.extend((0..info.width() as usize).map(|x| row[x * 4 + x_off]));
                }
            }
        }
    }
    out
}

fn run_frame(element: &gst::Element, info: &gst_video::VideoInfo, pad: usize) -> gst::Buffer {
    let mut h = harness(element);
    h.set_src_caps(info.to_caps().unwrap());
    let input = padded_frame(info, pad);
    let before = untouched_bytes(info, &input);
    h.push(input.clone()).expect("push");
    let out = h.pull().expect("output buffer");
    assert_eq!(out.size(), input.size(), "{:?} size", info.format());
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(out.as_ref(), info)
        .expect("output maps as a frame");
    assert_eq!(
        (frame.width(), frame.height()),
        (info.width(), info.height())
    );
    drop(frame);
    assert_eq!(
        untouched_bytes(info, &out),
        before,
        "{:?}: padding/alpha changed",
        info.format()
    );
    out
}

#[test]
fn plugin_and_meta_are_registered() {
    init();
    let factory = gst::ElementFactory::find("codiff").expect("codiff factory");
    assert_eq!(
        factory.metadata(gst::ELEMENT_METADATA_KLASS),
        Some("Filter/Effect/Video")
    );
    assert!(factory
        .metadata(gst::ELEMENT_METADATA_DESCRIPTION)
        .unwrap()
        .contains("gst-launch-1.0"));
    assert!(gst::meta::CustomMeta::is_registered(QF_META));
}

#[test]
fn property_defaults_and_ranges() {
    let e = make(&[]);
    assert_eq!(
        e.property::<Option<String>>("weights").map(PathBuf::from),
        Some(default_weights_path())
    );
    assert_eq!(e.property::<Option<String>>("sd-model"), None);
    assert_eq!(e.property::<Option<String>>("codiff-checkpoint"), None);
    assert_eq!(e.property::<Option<String>>("cave-checkpoint"), None);
    assert_eq!(
        e.property::<Option<String>>("device").as_deref(),
        Some("cpu")
    );
    assert_eq!(e.property::<u32>("latent-tile"), 96);
    assert_eq!(e.property::<u32>("latent-overlap"), 32);
    assert_eq!(e.property::<u32>("vae-encoder-tile"), 1024);
    assert_eq!(e.property::<u32>("vae-decoder-tile"), 224);
    assert_eq!(e.property::<u32>("cave-tile"), 2048);
    assert_eq!(e.property::<f64>("strength"), 1.0);
    assert_eq!(e.property::<u32>("qf"), 0);
    assert!(e.property::<bool>("enabled"));
    assert!(e.property::<bool>("qos"), "QoS is on by default");
    let nick = |name: &str| {
        let v = e.property_value(name);
        glib_enum_nick(&v)
    };
    assert_eq!(nick("mode"), "auto");
    assert_eq!(nick("precision"), "auto");
    assert_eq!(nick("color-fix"), "adain");
    e.set_property_from_str("mode", "diffusion");
    e.set_property_from_str("color-fix", "wavelet");
    e.set_property_from_str("precision", "bf16");
    assert_eq!(
        (nick("mode"), nick("color-fix"), nick("precision")),
        ("diffusion".into(), "wavelet".into(), "bf16".into())
    );
    // Empty or NULL weights go back to the default.
    e.set_property("weights", None::<String>);
    assert_eq!(
        e.property::<Option<String>>("weights").map(PathBuf::from),
        Some(default_weights_path())
    );
    let pspec = e.find_property("strength").unwrap();
    let pspec = pspec.downcast_ref::<gst::glib::ParamSpecDouble>().unwrap();
    assert_eq!((pspec.minimum(), pspec.maximum()), (0.0, 1.0));
    assert!(e
        .find_property("strength")
        .unwrap()
        .flags()
        .contains(gst::PARAM_FLAG_MUTABLE_PLAYING));
    assert!(e
        .find_property("weights")
        .unwrap()
        .flags()
        .contains(gst::PARAM_FLAG_MUTABLE_READY));
}

fn glib_enum_nick(v: &gst::glib::Value) -> String {
    let (_, ev) = gst::glib::EnumValue::from_value(v).expect("an enum value");
    ev.nick().to_string()
}

/// Bring a `videotestsrc ! codiff ! fakesink` pipeline to PAUSED, expecting failure;
/// returns the error text.
fn failing_pipeline(props: &[(&str, String)]) -> String {
    let codiff = make(props);
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("videotestsrc")
        .property("num-buffers", 1)
        .build()
        .unwrap();
    let sink = gst::ElementFactory::make("fakesink").build().unwrap();
    pipeline.add_many([&src, &codiff, &sink]).unwrap();
    gst::Element::link_many([&src, &codiff, &sink]).unwrap();
    let ret = pipeline.set_state(gst::State::Paused);
    let err = first_error(&pipeline.bus().unwrap(), Duration::from_secs(5));
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(ret.is_err(), "state change should fail");
    let (msg, debug) = err.expect("an error message on the bus");
    format!("{msg} | {debug}")
}

#[test]
fn missing_weights_fail_the_state_change_naming_the_file() {
    let missing = "/nonexistent/codiff-test/missing-weights.safetensors";
    let err = failing_pipeline(&[("weights", missing.to_string())]);
    assert!(err.contains(missing), "{err}");
    assert!(err.contains("weights"), "{err}");
}

#[test]
fn bad_model_settings_fail_with_a_clear_message() {
    let err = failing_pipeline(&[("mode", "diffusion".to_string())]);
    assert!(
        err.contains("sd-model") && err.contains("codiff-checkpoint"),
        "{err}"
    );
    let err = failing_pipeline(&[("device", "gpu7".to_string())]);
    assert!(err.contains("gpu7"), "{err}");
    let missing = "/nonexistent/codiff-test/codiff.pkl";
    let err = failing_pipeline(&[
        ("sd-model", "/nonexistent/codiff-test/sd".to_string()),
        ("codiff-checkpoint", missing.to_string()),
        (
            "cave-checkpoint",
            "/nonexistent/codiff-test/cave.pth".to_string(),
        ),
    ]);
    assert!(err.contains("/nonexistent/codiff-test/"), "{err}");
}

#[test]
fn every_format_round_trips_size_and_stays_valid() {
    let props = model_or_skip!();
    use gst_video::VideoFormat::*;
    for format in [
        Rgb, Rgba, Bgrx, Bgra, I420, Nv12, Y42b, Y444, Bgr, Argb, Yuy2,
    ] {
        let (element, _bus) = ready_element(&props);
        let out = run_frame(&element, &info(format, 64, 48), 0);
        assert!(
            gst::meta::CustomMeta::from_buffer(&out, QF_META).is_ok(),
            "{format:?}: meta"
        );
        element.set_state(gst::State::Null).unwrap();
    }
}

#[test]
fn odd_sizes_with_padded_strides() {
    let props = model_or_skip!();
    use gst_video::VideoFormat::*;
    // The large size only for jpegdec's I420 and a 4-byte RGB format: it is slow.
    let cases = [(1, 1), (17, 9)]
        .into_iter()
        .flat_map(|size| [I420, Nv12, Rgba, Rgb].map(|f| (f, size)))
        .chain([(I420, (641, 481)), (Rgba, (641, 481))]);
    for (format, (w, h)) in cases {
        let (element, _bus) = ready_element(&props);
        run_frame(&element, &info(format, w, h), 13);
        element.set_state(gst::State::Null).unwrap();
    }
}

/// Element messages named `name` waiting on `bus` (other messages are dropped).
fn element_messages(bus: &gst::Bus, name: &str) -> Vec<gst::Structure> {
    drain(bus)
        .into_iter()
        .filter(|m| m.type_() == gst::MessageType::Element)
        .filter_map(|m| {
            m.structure()
                .filter(|s| s.name() == name)
                .map(|s| s.to_owned())
        })
        .collect()
}

/// `step` fields of the `codiff-progress` messages waiting on `bus`.
fn progress_steps(bus: &gst::Bus) -> Vec<String> {
    element_messages(bus, "codiff-progress")
        .iter()
        .map(|s| s.get::<String>("step").expect("step is a string"))
        .collect()
}

/// `codiff-qf` structures waiting on `bus`.
fn qf_messages(bus: &gst::Bus) -> Vec<gst::Structure> {
    element_messages(bus, "codiff-qf")
}

#[test]
fn caps_change_mid_stream_keeps_the_model() {
    let props = model_or_skip!();
    let (element, bus) = ready_element(&props);
    assert!(!progress_steps(&bus).is_empty(), "loading posts progress");
    let mut h = harness(&element);
    let a = info(gst_video::VideoFormat::Rgb, 32, 24);
    h.set_src_caps(a.to_caps().unwrap());
    h.push(padded_frame(&a, 0)).unwrap();
    assert_eq!(h.pull().unwrap().size(), a.size());
    let b = info(gst_video::VideoFormat::I420, 48, 40);
    h.set_src_caps(b.to_caps().unwrap());
    h.push(padded_frame(&b, 0)).unwrap();
    assert_eq!(h.pull().unwrap().size(), b.size());
    let c = info(gst_video::VideoFormat::Bgrx, 17, 9);
    h.set_src_caps(c.to_caps().unwrap());
    h.push(padded_frame(&c, 4)).unwrap();
    assert_eq!(h.pull().unwrap().size(), padded_frame(&c, 4).size());
    let messages = drain(&bus);
    let names: Vec<_> = messages
        .iter()
        .filter_map(|m| m.structure().map(|s| s.name().to_string()))
        .collect();
    assert_eq!(
        names.iter().filter(|n| *n == "codiff-qf").count(),
        3,
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n == "codiff-progress"),
        "no reload on caps change: {names:?}"
    );
}

#[test]
fn passthrough_when_disabled_and_live_toggle() {
    let props = model_or_skip!();
    let (element, bus) = ready_element(&props);
    element.set_property("enabled", false);
    let mut h = harness(&element);
    let i = info(gst_video::VideoFormat::I420, 40, 24);
    h.set_src_caps(i.to_caps().unwrap());
    let input = padded_frame(&i, 0);
    h.push(input.clone()).unwrap();
    let out = h.pull().unwrap();
    assert_eq!(
        out.map_readable().unwrap().as_slice(),
        input.map_readable().unwrap().as_slice()
    );
    assert!(
        gst::meta::CustomMeta::from_buffer(&out, QF_META).is_err(),
        "no meta in passthrough"
    );
    assert!(qf_messages(&bus).is_empty(), "no qf message in passthrough");
    // Re-enable while playing.
    element.set_property("enabled", true);
    h.push(padded_frame(&i, 0)).unwrap();
    let out = h.pull().unwrap();
    assert!(gst::meta::CustomMeta::from_buffer(&out, QF_META).is_ok());
}

#[test]
fn eos_is_forwarded() {
    let props = model_or_skip!();
    let (element, _bus) = ready_element(&props);
    let mut h = harness(&element);
    let i = info(gst_video::VideoFormat::Rgba, 16, 16);
    h.set_src_caps(i.to_caps().unwrap());
    h.push(padded_frame(&i, 0)).unwrap();
    h.pull().unwrap();
    assert!(h.push_event(gst::event::Eos::new()));
    let mut saw_eos = false;
    while let Ok(ev) = h.pull_event() {
        if ev.type_() == gst::EventType::Eos {
            saw_eos = true;
            break;
        }
    }
    assert!(saw_eos);
}

#[test]
fn qf_message_meta_and_latency() {
    let props = model_or_skip!();
    let (element, bus) = ready_element(&props);
    let mut h = harness(&element);
    let i = info(gst_video::VideoFormat::I420, 64, 48);
    h.set_src_caps(i.to_caps().unwrap());
    h.push(padded_frame(&i, 0)).unwrap();
    let out = h.pull().unwrap();

    let msgs = qf_messages(&bus);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let s = &msgs[0];
    let qf = s.get::<f64>("qf").unwrap();
    assert!((0.0..=100.0).contains(&qf), "qf {qf}");
    assert!(s.get::<bool>("estimated").unwrap());
    assert_eq!(
        s.get::<u64>("pts").unwrap(),
        gst::ClockTime::from_mseconds(40).nseconds()
    );
    let processing = s.get::<u64>("processing-time").unwrap();
    assert!(processing > 0);
    let mode = s.get::<String>("mode").unwrap();
    assert!(mode == "cave" || mode == "diffusion", "{mode}");

    let meta =
        gst::meta::CustomMeta::from_buffer(&out, QF_META).expect("CodiffQfMeta on the buffer");
    assert_eq!(meta.structure().get::<f64>("qf").unwrap(), qf);

    // Latency: upstream's plus the processing time measured so far.
    h.set_upstream_latency(gst::ClockTime::from_mseconds(5));
    let latency = h.query_latency().expect("latency answered");
    assert!(
        latency.nseconds() >= gst::ClockTime::from_mseconds(5).nseconds() + processing,
        "{latency}"
    );

    // A known quality is reported as given.
    element.set_property("qf", 75u32);
    h.push(padded_frame(&i, 0)).unwrap();
    let out = h.pull().unwrap();
    let s = &qf_messages(&bus)[0];
    assert_eq!(s.get::<f64>("qf").unwrap(), 75.0);
    assert!(!s.get::<bool>("estimated").unwrap());
    let meta = gst::meta::CustomMeta::from_buffer(&out, QF_META).unwrap();
    assert_eq!(meta.structure().get::<f64>("qf").unwrap(), 75.0);

    // strength=0 leaves the frame exactly as it came.
    element.set_property("strength", 0.0f64);
    let input = padded_frame(&i, 0);
    h.push(input.clone()).unwrap();
    let out = h.pull().unwrap();
    assert_eq!(
        out.map_readable().unwrap().as_slice(),
        input.map_readable().unwrap().as_slice()
    );
}

#[test]
fn two_instances_share_one_model_freed_with_the_last() {
    let mut props = model_or_skip!();
    // A precision no other test uses, so this test owns its cache entry.
    props.push(("precision", "f32".to_string()));
    let (first, bus1) = ready_element(&props);
    let (second, bus2) = ready_element(&props);
    let steps1 = progress_steps(&bus1);
    let steps2 = progress_steps(&bus2);
    assert!(
        steps1.iter().any(|s| s.contains("model loaded")),
        "{steps1:?}"
    );
    assert!(steps2.iter().any(|s| s.contains("reusing")), "{steps2:?}");
    first.set_state(gst::State::Null).unwrap();
    second.set_state(gst::State::Null).unwrap();
    // Both released: a third element loads afresh.
    let (third, bus3) = ready_element(&props);
    let steps3 = progress_steps(&bus3);
    assert!(
        steps3.iter().any(|s| s.contains("model loaded")),
        "{steps3:?}"
    );
    third.set_state(gst::State::Null).unwrap();
}

/// Run `description` to EOS or error; returns the error text and the element that
/// posted it, if any.
fn run_pipeline(description: &str) -> Option<(String, String)> {
    init();
    let pipeline = gst::parse::launch(description).expect("pipeline parses");
    let bus = pipeline.bus().unwrap();
    if pipeline.set_state(gst::State::Playing).is_err() {
        let err = first_error(&bus, Duration::from_secs(1));
        pipeline.set_state(gst::State::Null).unwrap();
        panic!("pipeline `{description}` failed to start: {err:?}");
    }
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(600),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("EOS or error within 10 minutes");
    pipeline.set_state(gst::State::Null).unwrap();
    match msg.view() {
        gst::MessageView::Error(err) => Some((
            format!("{} | {:?}", err.error(), err.debug()),
            msg.src().map(|s| s.name().to_string()).unwrap_or_default(),
        )),
        _ => None,
    }
}

fn props_string(props: &[(&str, String)]) -> String {
    props.iter().map(|(k, v)| format!(" {k}=\"{v}\"")).collect()
}

#[test]
fn jpeg_to_png_pipeline_keeps_the_size() {
    let props = model_or_skip!();
    let dir = std::env::temp_dir().join(format!("codiff-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // jpegdec ! codiff <args> ! pngenc into `png`
    let decode_through_codiff = |args: &str, png: &std::path::Path| {
        run_pipeline(&format!(
            "filesrc location=\"{}\" ! jpegdec ! codiff {args}{} ! videoconvert ! pngenc ! filesink location=\"{}\"",
            demo_jpeg().display(),
            props_string(&props),
            png.display()
        ))
    };
    let out = dir.join("out.png");
    assert_eq!(decode_through_codiff("name=codiff", &out), None);
    let input = image::open(demo_jpeg()).unwrap();
    let output = image::open(&out).unwrap();
    assert_eq!(
        (output.width(), output.height()),
        (input.width(), input.height())
    );
    // the same pipeline in passthrough gives jpegdec's own pixels
    let plain = dir.join("plain.png");
    assert_eq!(decode_through_codiff("enabled=false", &plain), None);
    // with the shipped model, the restored frame is closer to the original
    if props.is_empty() {
        let original = image::open(manifest_dir().join("examples/data/astronaut.png")).unwrap().to_rgb8();
        let psnr = |img: &image::RgbImage| {
            let mse = img.as_raw().iter().zip(original.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>()
                / original.as_raw().len() as f64;
            10.0 * (255.0f64 * 255.0 / mse).log10()
        };
        let (jpeg_db, ours_db) = (psnr(&image::open(&plain).unwrap().to_rgb8()), psnr(&output.to_rgb8()));
        eprintln!("PSNR vs original: JPEG {jpeg_db:.2} dB, codiff {ours_db:.2} dB");
        assert!(ours_db > jpeg_db + 0.3, "JPEG {jpeg_db:.2} dB, codiff {ours_db:.2} dB");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_jpeg_errors_come_from_the_decoder() {
    let props = model_or_skip!();
    let jpeg = std::fs::read(small_jpeg()).unwrap();
    let dir = std::env::temp_dir().join(format!("codiff-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // jpegdec conceals a cut in the entropy-coded data (grey rows, then EOS), so
    // codiff gets a damaged frame; with nothing past the SOI marker it fails.
    for (i, len) in [jpeg.len() / 2, 300, 20, 2].into_iter().enumerate() {
        let path = dir.join(format!("truncated-{i}.jpg"));
        std::fs::write(&path, &jpeg[..len]).unwrap();
        let result = run_pipeline(&format!(
            "filesrc location=\"{}\" ! jpegdec name=dec ! codiff name=codiff{} ! fakesink",
            path.display(),
            props_string(&props)
        ));
        if let Some((err, src)) = &result {
            assert_eq!(src, "dec", "{len} bytes: error not from the decoder: {err}");
        }
        if len == 2 {
            let (err, _) = result.expect("jpegdec fails on a JPEG cut after SOI");
            assert!(err.contains("No valid frames"), "{err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
