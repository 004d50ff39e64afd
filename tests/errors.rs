//! Broken weight files give clear, typed errors naming the file, key and shape.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use gstcodiff::engine::weights::TensorFile;
use gstcodiff::engine::{Engine, EngineError, Mode, ModelSpec};

use codiff_testkit::hostile;

use hostile::{legacy_file, memo_bomb, nested_dicts, nested_lists, state_dict_pickle, zip_file, Pk, TensorRef};

// Every allocation above 1 GiB fails (and aborts the test binary): a size
// taken unchecked from a hostile file shows up as a crash, never as a
// machine that swaps.
#[global_allocator]
static ALLOC: hostile::Counting = hostile::Counting;

fn limit_allocations() {
    hostile::ALLOC_LIMIT.store(1 << 30, std::sync::atomic::Ordering::Relaxed);
}

/// A writable copy of the fixture model in a fresh temp dir.
fn copy_fixture(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("codiff-err-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    hostile::model_copy(&dir)
}

fn spec(dir: &Path) -> ModelSpec {
    hostile::diffusion_spec(dir)
}

fn load_err(dir: &Path) -> EngineError {
    match Engine::load(&spec(dir), &mut |_| {}) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn rewrite_safetensors(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, path).unwrap();
}

#[test]
fn truncated_unet_names_the_file() {
    let d = copy_fixture("trunc");
    let p = d.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("unet/diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn missing_vae_tensor_names_file_and_key() {
    let d = copy_fixture("drop");
    let p = d.join("vae/diffusion_pytorch_model.safetensors");
    rewrite_safetensors(&p, |t| {
        t.remove("decoder.conv_out.weight").unwrap();
    });
    let e = load_err(&d);
    match &e {
        EngineError::MissingTensor { path, key } => {
            assert!(path.ends_with("vae/diffusion_pytorch_model.safetensors"));
            assert_eq!(key, "decoder.conv_out.weight");
        }
        _ => panic!("expected MissingTensor, got {e}"),
    }
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let d = copy_fixture("shape");
    let p = d.join("unet/diffusion_pytorch_model.safetensors");
    rewrite_safetensors(&p, |t| {
        t.insert("conv_out.bias".into(), Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_err(&d);
    match &e {
        EngineError::ShapeMismatch { key, expected, found, .. } => {
            assert_eq!(key, "conv_out.bias");
            assert_eq!(expected, &vec![4]);
            assert_eq!(found, &vec![5]);
        }
        _ => panic!("expected ShapeMismatch, got {e}"),
    }
}

#[test]
fn truncated_codiff_pkl_is_reported() {
    let d = copy_fixture("pkl");
    let p = d.join("codiff.pkl");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 4096]).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Truncated { .. } | EngineError::Format { .. }), "{e}");
    assert!(e.to_string().contains("codiff.pkl"), "{e}");
}

#[test]
fn truncated_cave_pth_is_reported() {
    let d = copy_fixture("cave");
    let p = d.join("cave.pth");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("cave.pth"), "{e}");
}

#[test]
fn wrong_format_is_reported() {
    let d = copy_fixture("fmt");
    std::fs::write(d.join("cave.pth"), b"this is not a model").unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Format { .. } | EngineError::Truncated { .. }), "{e}");
}

#[test]
fn missing_file_is_not_found() {
    let d = copy_fixture("missing");
    std::fs::remove_file(d.join("codiff.pkl")).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("codiff.pkl"), "{e}");
}

#[test]
fn cave_shape_change_names_key() {
    let d = copy_fixture("caveshape");
    // a CaVE whose tail is too narrow, saved as safetensors
    let f = gstcodiff::engine::weights::TensorFile::open(&d.join("cave.pth")).unwrap();
    let mut t: HashMap<String, Tensor> = f.keys().map(|k| (k.clone(), f.get(k).unwrap().clone())).collect();
    t.insert("m_tail.weight".into(), Tensor::zeros((3, 4, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
    let p = d.join("cave.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = match Engine::load(&ModelSpec { mode: Mode::Cave, cave: Some(p), ..spec(&d) }, &mut |_| {}) {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    };
    match &e {
        EngineError::ShapeMismatch { key, expected, found, .. } => {
            assert_eq!(key, "m_tail.weight");
            assert_eq!(expected, &vec![3, 8, 3, 3]);
            assert_eq!(found, &vec![3, 4, 3, 3]);
        }
        _ => panic!("expected ShapeMismatch, got {e}"),
    }
}

// ------------------------------------------------------------ hostile files
// Each was a crash (abort, stack overflow or panic) before the checked reader.

fn hostile_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("codiff-hostile-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn open_err(path: &Path, bytes: &[u8]) -> EngineError {
    limit_allocations();
    std::fs::write(path, bytes).unwrap();
    match TensorFile::open(path) {
        Ok(f) => panic!("{} should fail, loaded {} tensors", path.display(), f.len()),
        Err(e) => e,
    }
}

/// `torch.zeros(1).as_strided((2**40,), (0,))`: one element of storage viewed
/// 2^40 times.
fn stride0_bomb(key: &str) -> (Vec<u8>, Vec<hostile::Storage>) {
    let t = TensorRef::strided(key, "0", &[1 << 40], &[0]);
    (state_dict_pickle(&[t]).bytes(), vec![("0".into(), vec![1.0])])
}

#[test]
fn stride0_view_in_legacy_cave_pth_is_refused() {
    let d = copy_fixture("stride0");
    let (obj, st) = stride0_bomb("m_head.weight");
    std::fs::write(d.join("cave.pth"), legacy_file(&obj, &st)).unwrap();
    limit_allocations();
    let e = match Engine::load(&ModelSpec { mode: Mode::Cave, ..spec(&d) }, &mut |_| {}) {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(matches!(e, EngineError::Format { .. }), "{msg}");
    assert!(msg.contains("cave.pth") && msg.contains("m_head.weight") && msg.contains("[1099511627776]"), "{msg}");
    assert!(msg.contains("may not hold more elements than its storage"), "{msg}");
}

/// The same hostile `cave.pth` given to the element: the host process lives
/// and the state change fails with an error on the bus naming file and key
/// (it used to abort gst-launch-1.0 with SIGABRT at model load).
#[test]
#[cfg(feature = "gst")]
fn stride0_cave_pth_through_the_element_is_a_bus_error() {
    use gst::prelude::*;
    let d = copy_fixture("stride0elem");
    let (obj, st) = stride0_bomb("m_head.weight");
    std::fs::write(d.join("cave.pth"), legacy_file(&obj, &st)).unwrap();
    limit_allocations();
    gst::init().unwrap();
    gstcodiff::plugin_register_static().unwrap();
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers=1 ! video/x-raw,width=64,height=64 ! \
         codiff mode=diffusion sd-model=\"{0}\" codiff-checkpoint=\"{0}/codiff.pkl\" cave-checkpoint=\"{0}/cave.pth\" ! fakesink",
        d.display()
    ))
    .unwrap();
    let started = pipeline.set_state(gst::State::Playing);
    let bus = pipeline.bus().unwrap();
    let msg =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(120), &[gst::MessageType::Error, gst::MessageType::Eos]);
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(started.is_err(), "the state change must fail");
    let msg = msg.expect("an error on the bus");
    let gst::MessageView::Error(err) = msg.view() else { panic!("expected an error, got {msg:?}") };
    let text = format!("{} {:?}", err.error(), err.debug());
    assert!(text.contains("cave.pth") && text.contains("m_head.weight"), "{text}");
}

#[test]
fn stride0_view_in_zip_codiff_pkl_is_refused() {
    let d = copy_fixture("stride0zip");
    let (obj, st) = stride0_bomb("proj.weight");
    std::fs::write(d.join("codiff.pkl"), zip_file(&obj, &st)).unwrap();
    limit_allocations();
    let e = load_err(&d);
    let msg = e.to_string();
    assert!(msg.contains("codiff.pkl") && msg.contains("proj.weight") && msg.contains("[1099511627776]"), "{msg}");
}

#[test]
fn overlapping_views_cannot_multiply_a_storage() {
    // 8 views of a whole 1000-element storage: 8x its bytes
    let d = hostile_dir("views");
    let ts: Vec<TensorRef> = (0..8).map(|i| TensorRef::contiguous(&format!("w{i}"), "0", &[1000])).collect();
    let obj = state_dict_pickle(&ts).bytes();
    let e = open_err(&d.join("cave.pth"), &legacy_file(&obj, &[("0".into(), vec![0.5; 1000])]));
    let msg = e.to_string();
    assert!(msg.contains("cave.pth") && msg.contains("storage 0") && msg.contains("4 times"), "{msg}");
    // four views (tied weights) are fine
    let obj = state_dict_pickle(&ts[..4]).bytes();
    std::fs::write(d.join("ok.pth"), legacy_file(&obj, &[("0".into(), vec![0.5; 1000])])).unwrap();
    assert_eq!(TensorFile::open(&d.join("ok.pth")).unwrap().len(), 4);
}

#[test]
fn views_reaching_past_their_storage_are_truncation_errors() {
    let d = hostile_dir("reach");
    // the last index is in range, the first dimension's is not
    for (shape, stride, offset) in
        [(vec![3i64, 2], vec![4i64, 1], 0i64), (vec![2, 2], vec![1 << 62, 1], 0), (vec![1], vec![1], 9)]
    {
        let t = TensorRef { offset, ..TensorRef::strided("w", "0", &shape, &stride) };
        let obj = state_dict_pickle(&[t]).bytes();
        let e = open_err(&d.join("cave.pth"), &legacy_file(&obj, &[("0".into(), vec![0.0; 8])]));
        let msg = e.to_string();
        assert!(
            matches!(e, EngineError::Truncated { .. }) && msg.contains("`w`") && msg.contains("8 elements"),
            "{msg}"
        );
    }
}

#[test]
fn overflowing_and_negative_sizes_are_refused() {
    let d = hostile_dir("overflow");
    // element counts whose product overflows usize
    let t = TensorRef::strided("w", "0", &[1 << 32, 1 << 32, 16], &[0, 0, 0]);
    let e = open_err(&d.join("a.pth"), &legacy_file(&state_dict_pickle(&[t]).bytes(), &[("0".into(), vec![0.0])]));
    assert!(e.to_string().contains("overflows") && e.to_string().contains("a.pth"), "{e}");
    // an empty view whose other sizes overflow (found by the fuzzer: a
    // panic computing the empty tensor's strides)
    for shape in [vec![0i64, 1 << 40, 1 << 40], vec![1 << 40, 1 << 40, 0]] {
        let t = TensorRef::strided("w", "0", &shape, &[1, 1, 1]);
        let e = open_err(&d.join("z.pth"), &legacy_file(&state_dict_pickle(&[t]).bytes(), &[("0".into(), vec![0.0])]));
        assert!(e.to_string().contains("overflows") && e.to_string().contains("z.pth"), "{e}");
    }
    let hdr = r#"{"w":{"dtype":"F32","shape":[0,1099511627776,1099511627776],"data_offsets":[0,0]}}"#;
    let mut st = (hdr.len() as u64).to_le_bytes().to_vec();
    st.extend(hdr.as_bytes());
    let e = open_err(&d.join("z.safetensors"), &st);
    assert!(e.to_string().contains("overflows"), "{e}");
    // a negative size
    let t = TensorRef::strided("w", "0", &[-1], &[1]);
    let e = open_err(&d.join("b.pth"), &legacy_file(&state_dict_pickle(&[t]).bytes(), &[("0".into(), vec![0.0])]));
    assert!(e.to_string().contains("negative") && e.to_string().contains("`w`"), "{e}");
    // a legacy storage whose element count times its element size overflows
    let mut f =
        legacy_file(&state_dict_pickle(&[TensorRef::contiguous("w", "0", &[1])]).bytes(), &[("0".into(), vec![0.0])]);
    let at = f.len() - 12;
    f[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let e = open_err(&d.join("c.pth"), &f);
    assert!(matches!(e, EngineError::Truncated { .. }) && e.to_string().contains("storage 0"), "{e}");
    // a safetensors shape whose byte size overflows: not "expected 0"
    let hdr = r#"{"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}}"#;
    let mut st = (hdr.len() as u64).to_le_bytes().to_vec();
    st.extend(hdr.as_bytes());
    let e = open_err(&d.join("d.safetensors"), &st);
    let msg = e.to_string();
    assert!(msg.contains("overflows") && !msg.contains("expected 0") && msg.contains("d.safetensors"), "{msg}");
    // overlapping safetensors ranges
    let hdr = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let mut st = (hdr.len() as u64).to_le_bytes().to_vec();
    st.extend(hdr.as_bytes());
    st.extend([0u8; 12]);
    let e = open_err(&d.join("e.safetensors"), &st);
    assert!(e.to_string().contains("overlap"), "{e}");
    // a string length past the end of the pickle
    let mut obj = Pk::new().bytes();
    obj.extend([b'X', 0xff, 0xff, 0xff, 0x7f]);
    let e = open_err(&d.join("f.pth"), &legacy_file(&obj, &[]));
    assert!(matches!(e, EngineError::Truncated { .. }) && e.to_string().contains("2147483647"), "{e}");
}

#[test]
fn deeply_nested_pickles_never_overflow_the_stack() {
    let d = hostile_dir("nest");
    // 200,000 nested lists: no tensors in them, a clean (empty) file
    let f = legacy_file(&nested_lists(200_000), &[]);
    std::fs::write(d.join("lists.pth"), &f).unwrap();
    assert_eq!(TensorFile::open(&d.join("lists.pth")).unwrap().len(), 0);
    // loaded as a model, it says it holds no tensors (not "missing tensor")
    let spec = ModelSpec { mode: Mode::Cave, weights: d.join("lists.pth"), ..ModelSpec::compact_default() };
    let msg = Engine::load(&spec, &mut |_| {}).err().expect("no model in it").to_string();
    assert!(msg.contains("lists.pth") && msg.contains("holds no tensors"), "{msg}");
    std::fs::write(d.join("lists.pkl"), zip_file(&nested_lists(200_000), &[])).unwrap();
    assert_eq!(TensorFile::open(&d.join("lists.pkl")).unwrap().len(), 0);
    // 200,000 nested dicts: refused by depth, naming the key path
    let e = open_err(&d.join("dicts.pth"), &legacy_file(&nested_dicts(200_000), &[]));
    let msg = e.to_string();
    assert!(msg.contains("dicts.pth") && msg.contains("deeper than 64") && msg.contains("k.k.k"), "{msg}");
    // 64 levels are allowed
    std::fs::write(d.join("ok.pth"), legacy_file(&nested_dicts(63), &[])).unwrap();
    let f = TensorFile::open(&d.join("ok.pth")).unwrap();
    assert_eq!(f.int(&vec!["k"; 63].join(".")), Some(1));
}

#[test]
fn memo_refetch_cannot_grow_exponentially() {
    let d = hostile_dir("memo");
    let t = TensorRef::contiguous("w", "0", &[2]);
    let st = [("0".to_string(), vec![1.0f32, 2.0])];
    // 40 levels of {a: previous, b: previous} under a walked key: 2^40
    // paths, within the nesting bound, so the walk's budget must stop it
    let e = open_err(&d.join("bomb.pth"), &legacy_file(&memo_bomb(40, &t), &st));
    assert!(e.to_string().contains("bomb.pth") && e.to_string().contains("shared"), "{e}");
    let e = open_err(&d.join("bomb.pkl"), &zip_file(&memo_bomb(40, &t), &st));
    assert!(e.to_string().contains("bomb.pkl") && e.to_string().contains("shared"), "{e}");
    // 64 levels stop at the nesting bound
    let e = open_err(&d.join("deep.pth"), &legacy_file(&memo_bomb(64, &t), &st));
    assert!(e.to_string().contains("deeper than 64"), "{e}");
    // a few shared levels (2^4 paths) load, with the tensor beside them
    std::fs::write(d.join("small.pth"), legacy_file(&memo_bomb(4, &t), &st)).unwrap();
    let f = TensorFile::open(&d.join("small.pth")).unwrap();
    assert_eq!(f.get("w").unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
}

fn edit_json(path: &Path, key: &str, value: &str) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = serde_json::from_str(value).unwrap();
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn absurd_config_sizes_are_refused_before_allocating() {
    limit_allocations();
    let cases: &[(&str, &str, &str, &str)] = &[
        ("scheduler/scheduler_config.json", "num_train_timesteps", "10000000000", "num_train_timesteps"),
        ("scheduler/scheduler_config.json", "num_train_timesteps", "1e10", "not an unsigned integer"),
        ("scheduler/scheduler_config.json", "num_train_timesteps", "499", "t = 499"),
        ("scheduler/scheduler_config.json", "beta_end", "1.5", "beta"),
        ("unet/config.json", "attention_head_dim", "0", "attention_head_dim"),
        ("unet/config.json", "attention_head_dim", "[1, 2, 0, 4]", "attention_head_dim"),
        ("unet/config.json", "attention_head_dim", "3", "does not divide"),
        ("unet/config.json", "norm_num_groups", "0", "norm_num_groups"),
        ("unet/config.json", "block_out_channels", "[]", "0 channel counts"),
        ("unet/config.json", "layers_per_block", "1000000000", "layers_per_block"),
        ("unet/config.json", "transformer_layers_per_block", "0", "transformer_layers_per_block"),
        ("vae/config.json", "block_out_channels", "[32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32]", "block_out_channels"),
        ("vae/config.json", "norm_num_groups", "0", "norm_num_groups"),
        ("vae/config.json", "latent_channels", "0", "latent_channels"),
        // found by the fuzzer: 2 * latent_channels overflowed building the encoder
        ("vae/config.json", "latent_channels", "18446744073709551615", "latent_channels"),
        ("vae/config.json", "block_out_channels", "[32, 32, 32, 310000000000]", "block_out_channels"),
        ("unet/config.json", "cross_attention_dim", "4611686018427387904", "cross_attention_dim"),
        ("unet/config.json", "downsample_padding", "1000000000", "downsample_padding"),
    ];
    for (i, (file, key, value, want)) in cases.iter().enumerate() {
        let d = copy_fixture(&format!("cfg{i}"));
        edit_json(&d.join(file), key, value);
        let e = load_err(&d);
        let msg = e.to_string();
        assert!(matches!(e, EngineError::Config { .. }), "{key} = {value}: {msg}");
        assert!(msg.contains(file) && msg.contains(want), "{key} = {value}: {msg}");
        let _ = std::fs::remove_dir_all(d.parent().unwrap());
    }
}

/// The still command (`examples/restore.rs`, built by `cargo build --examples`)
/// as a user meets it: a 8.5 KB JPEG whose header claims 8000x8000 is refused
/// at once from its header (it used to run for a minute and take 2.4 GB); a
/// bad output name and a missing input are plain one-line errors naming the
/// file, found before the model loads.
#[test]
fn the_still_command_refuses_bad_requests_before_loading() {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|d| d.parent()).unwrap().join("examples/restore");
    if !bin.exists() {
        eprintln!("SKIPPED: no {} (cargo build --examples first)", bin.display());
        return;
    }
    let dir = std::env::temp_dir().join(format!("codiff-still-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jpeg = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/astronaut-q10.jpg");
    let mut bytes = std::fs::read(&jpeg).unwrap();
    let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline SOF0");
    bytes[sof + 5..sof + 9].copy_from_slice(&[0x1F, 0x40, 0x1F, 0x40]); // 8000 x 8000
    let huge = dir.join("huge.jpg");
    std::fs::write(&huge, &bytes).unwrap();
    let run = |args: &[&Path]| {
        let t = std::time::Instant::now();
        let out = std::process::Command::new(&bin).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), t.elapsed())
    };
    let (code, err, took) = run(&[&huge, &dir.join("out.png")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("8000x8000") && err.contains("--max-pixels"), "{err}");
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    let (code, err, _) = run(&[&jpeg, &dir.join("out.bmp")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("out.bmp") && !err.contains("loading CaVE"), "{err}");
    let (code, err, _) = run(&[&dir.join("missing.jpg"), &dir.join("out.png")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.jpg") && !err.contains("Os {"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
