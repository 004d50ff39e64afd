//! Hostile model files, shared by `tests/fuzz.rs`, `tests/errors.rs` and
//! `examples/fuzz.rs`: a deterministic xorshift PRNG, a byte mutator seeded
//! from the tiny fixture's files, a small pickle writer that builds PyTorch
//! legacy (`cave.pth`) and zip (`codiff.pkl`) files by opcode, and a runner
//! that feeds one input to the matching parser and classifies the outcome.
//!
//! Also a counting global allocator (declared by the binaries that want it)
//! that records the largest single allocation and refuses any above a bound,
//! so a size taken unchecked from a file fails loudly instead of exhausting
//! the machine.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

// ------------------------------------------------------------------ PRNG

/// xorshift64*: small, fast and the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

// ------------------------------------------------------------------ allocator

/// Largest single allocation request seen.
pub static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);
/// Requests above this many bytes fail (the process aborts with "memory
/// allocation of N bytes failed", which a test run reports as a crash).
pub static ALLOC_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The system allocator, counting.
pub struct Counting;

// SAFETY: every call is forwarded to the system allocator with the caller's
// arguments (or refused with null, which GlobalAlloc allows); the counters
// are atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > ALLOC_LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > ALLOC_LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, as GlobalAlloc::alloc_zeroed requires.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from this allocator, i.e. from System, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        if new_size > ALLOC_LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: ptr came from System with this layout; new_size is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

// ------------------------------------------------------------------ pickle writer

/// A pickle built opcode by opcode (protocol 2, as `torch.save` writes).
#[derive(Default, Clone)]
pub struct Pk(pub Vec<u8>);

impl Pk {
    pub fn new() -> Self {
        Self(vec![0x80, 2])
    }
    pub fn op(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    pub fn mark(&mut self) -> &mut Self {
        self.op(b'(')
    }
    pub fn dict(&mut self) -> &mut Self {
        self.op(b'}')
    }
    pub fn list(&mut self) -> &mut Self {
        self.op(b']')
    }
    pub fn empty_tuple(&mut self) -> &mut Self {
        self.op(b')')
    }
    /// TUPLE: everything since the last MARK.
    pub fn tuple(&mut self) -> &mut Self {
        self.op(b't')
    }
    pub fn setitem(&mut self) -> &mut Self {
        self.op(b's')
    }
    pub fn setitems(&mut self) -> &mut Self {
        self.op(b'u')
    }
    pub fn append(&mut self) -> &mut Self {
        self.op(b'a')
    }
    pub fn appends(&mut self) -> &mut Self {
        self.op(b'e')
    }
    pub fn reduce(&mut self) -> &mut Self {
        self.op(b'R')
    }
    pub fn build(&mut self) -> &mut Self {
        self.op(b'b')
    }
    pub fn persid(&mut self) -> &mut Self {
        self.op(b'Q')
    }
    pub fn none(&mut self) -> &mut Self {
        self.op(b'N')
    }
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.op(if b { 0x88 } else { 0x89 })
    }
    pub fn stop(&mut self) -> &mut Self {
        self.op(b'.')
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.op(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }
    /// Any integer, in the shortest form pickle has for it.
    pub fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.op(b'K').op(v as u8)
        } else if (0..65536).contains(&v) {
            self.op(b'M');
            self.0.extend((v as u16).to_le_bytes());
            self
        } else if i32::try_from(v).is_ok() {
            self.op(b'J');
            self.0.extend((v as i32).to_le_bytes());
            self
        } else {
            self.op(0x8a).op(8);
            self.0.extend(v.to_le_bytes());
            self
        }
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b'c');
        self.0.extend(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend(name.as_bytes());
        self.0.push(b'\n');
        self
    }
    pub fn put(&mut self, i: u32) -> &mut Self {
        self.op(b'r');
        self.0.extend(i.to_le_bytes());
        self
    }
    pub fn get(&mut self, i: u32) -> &mut Self {
        self.op(b'j');
        self.0.extend(i.to_le_bytes());
        self
    }
    pub fn ints(&mut self, v: &[i64]) -> &mut Self {
        self.mark();
        for &x in v {
            self.int(x);
        }
        self.tuple()
    }
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, t: &TensorRef) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.mark();
        // persistent id ('storage', FloatStorage, key, 'cpu', numel)
        self.mark()
            .str("storage")
            .global("torch", &t.storage_type)
            .str(&t.storage_key)
            .str("cpu")
            .int(t.storage_numel)
            .tuple()
            .persid();
        self.int(t.offset).ints(&t.shape).ints(&t.stride).bool(false);
        self.global("collections", "OrderedDict").empty_tuple().reduce();
        self.tuple().reduce()
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// One tensor of a crafted checkpoint.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub key: String,
    pub storage_key: String,
    pub storage_type: String,
    /// The element count the persistent id claims (the data decides).
    pub storage_numel: i64,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
}

impl TensorRef {
    /// A contiguous f32 tensor over storage `storage_key`.
    pub fn contiguous(key: &str, storage_key: &str, shape: &[i64]) -> Self {
        // wrapping: hostile shapes overflow on purpose
        let mut stride = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1].wrapping_mul(shape[i + 1]);
        }
        Self {
            key: key.into(),
            storage_key: storage_key.into(),
            storage_type: "FloatStorage".into(),
            storage_numel: shape.iter().fold(1i64, |a, &d| a.wrapping_mul(d)),
            offset: 0,
            shape: shape.to_vec(),
            stride,
        }
    }
    pub fn strided(key: &str, storage_key: &str, shape: &[i64], stride: &[i64]) -> Self {
        Self { stride: stride.to_vec(), ..Self::contiguous(key, storage_key, shape) }
    }
}

/// The state-dict pickle `{key: tensor, ...}` (an OrderedDict, as torch writes).
pub fn state_dict_pickle(tensors: &[TensorRef]) -> Pk {
    let mut p = Pk::new();
    p.global("collections", "OrderedDict").empty_tuple().reduce().mark();
    for t in tensors {
        p.str(&t.key).tensor(t);
    }
    p.setitems().stop();
    p
}

/// A storage's data: `(key, f32 values)`.
pub type Storage = (String, Vec<f32>);

/// PyTorch's legacy format around an object pickle (which must end in STOP):
/// magic, protocol 1001, system info, the object, the storage keys, then
/// each storage as an element count and its data.
pub fn legacy_file(object: &[u8], storages: &[Storage]) -> Vec<u8> {
    let mut out = vec![0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.'];
    out.extend(Pk::new().int(1001).stop().bytes());
    out.extend(
        Pk::new()
            .dict()
            .mark()
            .str("protocol_version")
            .int(1001)
            .str("little_endian")
            .bool(true)
            .setitems()
            .stop()
            .bytes(),
    );
    out.extend(object);
    let mut keys = Pk::new();
    keys.list().mark();
    for (k, _) in storages {
        keys.str(k);
    }
    out.extend(keys.appends().stop().bytes());
    for (_, data) in storages {
        out.extend((data.len() as u64).to_le_bytes());
        for v in data {
            out.extend(v.to_le_bytes());
        }
    }
    out
}

/// A `torch.save` zip archive (entries stored, as torch writes them).
pub fn zip_file(object: &[u8], storages: &[Storage]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(object).unwrap();
    for (k, data) in storages {
        w.start_file(format!("archive/data/{k}"), opts).unwrap();
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&raw).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// `depth` lists nested in one another: `[[[...]]]`.
pub fn nested_lists(depth: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', depth));
    p.extend(std::iter::repeat_n(b'a', depth - 1));
    p.push(b'.');
    p
}

/// `depth` dicts nested under key "k": `{"k": {"k": ...}}`.
pub fn nested_dicts(depth: usize) -> Vec<u8> {
    let mut p = Pk::new();
    for _ in 0..depth {
        p.dict().str("k");
    }
    p.int(1);
    for _ in 0..depth {
        p.setitem();
    }
    p.stop();
    p.bytes()
}

/// Level k = `{"a": level k-1, "b": level k-1}` through the memo, `levels`
/// deep, under key "bomb", beside a real tensor: 2^levels paths if each
/// reference were copied or walked.
pub fn memo_bomb(levels: u32, tensor: &TensorRef) -> Vec<u8> {
    let mut p = Pk::new();
    p.dict().put(0).mark();
    p.str(&tensor.key).tensor(tensor);
    p.str("bomb");
    // each level is memoised, popped, and fetched twice by the next one
    p.dict().str("x").int(1).setitem().put(1);
    for k in 1..=levels {
        p.op(b'0').dict().mark().str("a").get(k).str("b").get(k).setitems().put(k + 1);
    }
    p.setitems().stop();
    p.bytes()
}

// ------------------------------------------------------------------ mutation

/// What parses a seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Weights,
    UNetConfig,
    VaeConfig,
    Scheduler,
}

/// A seed input: the file name it is written under and its bytes; fixture
/// files also have their path in the model folder (`rel`).
#[derive(Clone)]
pub struct Seed {
    pub name: String,
    pub rel: Option<String>,
    pub target: Target,
    pub bytes: Vec<u8>,
}

/// The model files a full load reads, relative to the model folder.
pub const MODEL_FILES: [&str; 7] = [
    "cave.pth",
    "codiff.pkl",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
];

pub fn fixture_dir() -> PathBuf {
    // the repository root: this crate sits in testkit/
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/codiff-tiny-a")
}

/// The fixture's parsed files, plus small crafted checkpoints of each format
/// (so that mutations reach the tensor checks more often than in a large file).
pub fn seeds() -> Vec<Seed> {
    let dir = fixture_dir();
    let mut out = Vec::new();
    for (f, target) in [
        ("cave.pth", Target::Weights),
        ("codiff.pkl", Target::Weights),
        ("vae/diffusion_pytorch_model.safetensors", Target::Weights),
        ("unet/config.json", Target::UNetConfig),
        ("vae/config.json", Target::VaeConfig),
        ("scheduler/scheduler_config.json", Target::Scheduler),
    ] {
        let bytes = std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        let name = Path::new(f).file_name().unwrap().to_string_lossy().into_owned();
        out.push(Seed { name, rel: Some(f.to_string()), target, bytes });
    }
    let tensors = [
        TensorRef::contiguous("w", "0", &[2, 3]),
        TensorRef::strided("wt", "0", &[3, 2], &[1, 3]),
        TensorRef::contiguous("b", "1", &[4]),
    ];
    let storages: Vec<Storage> = vec![("0".into(), (0..6).map(|i| i as f32).collect()), ("1".into(), vec![1.0; 4])];
    let obj = state_dict_pickle(&tensors).bytes();
    out.push(Seed {
        name: "small.pth".into(),
        rel: None,
        target: Target::Weights,
        bytes: legacy_file(&obj, &storages),
    });
    out.push(Seed { name: "small.pkl".into(), rel: None, target: Target::Weights, bytes: zip_file(&obj, &storages) });
    out.push(Seed { name: "small.safetensors".into(), rel: None, target: Target::Weights, bytes: small_safetensors() });
    out
}

fn small_safetensors() -> Vec<u8> {
    let hdr = r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]}}"#;
    let mut out = (hdr.len() as u64).to_le_bytes().to_vec();
    out.extend(hdr.as_bytes());
    out.extend(std::iter::repeat_n(0x3c, 22));
    out
}

const INTERESTING: [u64; 12] =
    [0, 1, 2, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 1 << 40, i64::MAX as u64, u64::MAX];

/// A position biased towards the parts that hold structure: the head
/// (pickles, safetensors headers) and the tail (zip central directory).
fn position(rng: &mut Rng, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    match rng.below(10) {
        0..=4 => rng.below(len.min(1 << 17)),
        5..=6 => len - 1 - rng.below(len.min(1 << 16)),
        _ => rng.below(len),
    }
}

/// One to four mutations of `input`: bit flips, interesting bytes, length
/// fields overwritten with edge values, truncation, deletion, duplication,
/// splices from another seed, nesting bombs and (for JSON) number edits.
pub fn mutate(rng: &mut Rng, input: &[u8], others: &[Seed], json: bool) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(if json { 11 } else { 10 }) {
            0 if len > 0 => {
                let p = position(rng, len);
                b[p] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let p = position(rng, len);
                b[p] = *rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'.', b'(', b']', b'}', b'q', b'h']);
            }
            2 if len >= 8 => {
                // a length / count / offset field: 1, 2, 4 or 8 bytes little-endian
                let w = *rng.pick(&[1usize, 2, 4, 8]);
                let p = position(rng, len - w + 1).min(len - w);
                let v = *rng.pick(&INTERESTING);
                let v = if rng.chance(0.3) { v.wrapping_add(rng.below(3) as u64).wrapping_sub(1) } else { v };
                b[p..p + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            3 if len > 0 => {
                let p = if rng.chance(0.5) { position(rng, len) } else { rng.below(len) };
                b.truncate(p);
            }
            4 if len > 1 => {
                let p = position(rng, len);
                let n = 1 + rng.below((len - p).min(64));
                b.drain(p..p + n);
            }
            5 if len > 1 => {
                let p = position(rng, len);
                let n = 1 + rng.below((len - p).min(256));
                let chunk = b[p..p + n].to_vec();
                let at = position(rng, len);
                b.splice(at..at, chunk);
            }
            6 if !others.is_empty() => {
                let o = &rng.pick(others).bytes;
                if !o.is_empty() && len > 0 {
                    let p = position(rng, o.len());
                    let n = 1 + rng.below((o.len() - p).min(512));
                    let at = position(rng, len);
                    let end = (at + n).min(len);
                    b.splice(at..end, o[p..p + n].iter().copied());
                }
            }
            7 => {
                // nesting bomb: many container openers in one place
                let at = position(rng, len);
                let op = *rng.pick(b"(]}[{");
                let n = *rng.pick(&[64usize, 1000, 100_000]);
                b.splice(at..at, std::iter::repeat_n(op, n));
            }
            8 if len > 0 => {
                // memo references: BINGET/BINPUT of random slots
                let at = position(rng, len);
                let op = *rng.pick(b"hqjr");
                let mut ins = vec![op, rng.below(256) as u8];
                if op == b'j' || op == b'r' {
                    ins.extend([0, 0, 0]);
                }
                b.splice(at..at, ins);
            }
            9 if len > 0 => {
                let at = position(rng, len);
                let n = 1 + rng.below(16);
                b.splice(at..at, (0..n).map(|_| rng.below(256) as u8));
            }
            10 => {
                // JSON: one number becomes an edge value
                let s = String::from_utf8_lossy(&b).into_owned();
                let spots: Vec<usize> = s.match_indices(|c: char| c.is_ascii_digit()).map(|(i, _)| i).collect();
                if !spots.is_empty() {
                    let i = *rng.pick(&spots);
                    let end = s[i..]
                        .find(|c: char| !c.is_ascii_digit() && c != '.' && c != 'e' && c != '-')
                        .map_or(s.len(), |e| i + e);
                    let v = *rng.pick(&[
                        "0",
                        "-1",
                        "1e10",
                        "10000000000",
                        "18446744073709551615",
                        "1e308",
                        "0.5",
                        "3",
                        "99999",
                    ]);
                    b = format!("{}{}{}", &s[..i], v, &s[end..]).into_bytes();
                }
            }
            _ => {}
        }
    }
    b
}

/// A checkpoint built by the pickle writer with random sizes, strides,
/// offsets, storage lengths and nesting: reaches the view checks directly.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let n_storage = rng.below(3) + 1;
    let storages: Vec<Storage> = (0..n_storage).map(|k| (k.to_string(), vec![0.5; rng.below(40)])).collect();
    let edge = |rng: &mut Rng| -> i64 {
        *rng.pick(&[0i64, 1, 2, 3, 7, 40, 1 << 20, 1 << 31, 1 << 40, (1 << 62) + 1, i64::MAX, -1, i64::MIN])
    };
    let tensors: Vec<TensorRef> = (0..rng.below(4) + 1)
        .map(|i| {
            let dims = rng.below(4);
            let shape: Vec<i64> =
                (0..dims).map(|_| if rng.chance(0.7) { rng.below(5) as i64 } else { edge(rng) }).collect();
            let stride: Vec<i64> = (0..if rng.chance(0.9) { dims } else { rng.below(4) })
                .map(|_| if rng.chance(0.6) { rng.below(6) as i64 } else { edge(rng) })
                .collect();
            TensorRef {
                key: format!("t{i}"),
                storage_key: rng.below(n_storage + 1).to_string(),
                storage_type: rng
                    .pick(&["FloatStorage", "FloatStorage", "HalfStorage", "LongStorage", "ByteStorage", "IntStorage"])
                    .to_string(),
                storage_numel: edge(rng),
                offset: if rng.chance(0.7) { rng.below(4) as i64 } else { edge(rng) },
                shape,
                stride,
            }
        })
        .collect();
    let obj = match rng.below(4) {
        0 => memo_bomb(rng.below(70) as u32, &tensors[0]),
        1 => nested_dicts(*rng.pick(&[10usize, 64, 65, 1000])),
        _ => state_dict_pickle(&tensors).bytes(),
    };
    if rng.chance(0.5) {
        legacy_file(&obj, &storages)
    } else {
        zip_file(&obj, &storages)
    }
}

// ------------------------------------------------------------------ runner

/// What one input did.
#[derive(Debug)]
pub enum Outcome {
    Ok,
    /// A clean `EngineError` (its message).
    Error(String),
    /// A panic (its message): a bug.
    Panic(String),
}

/// Write `bytes` as `dir/name` and run the parser for `target` on it,
/// catching panics.
pub fn run_case(dir: &Path, name: &str, target: Target, bytes: &[u8]) -> Outcome {
    use gstcodiff::engine::{one_step::Schedule, unet::UNetConfig, vae::VaeConfig, weights::TensorFile};
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let r = std::panic::catch_unwind(|| -> Result<(), String> {
        let s = |e: gstcodiff::engine::EngineError| e.to_string();
        match target {
            Target::Weights => TensorFile::open(&p).map(|_| ()).map_err(s),
            Target::UNetConfig => UNetConfig::from_json(&p).map(|_| ()).map_err(s),
            Target::VaeConfig => VaeConfig::from_json(&p).map(|_| ()).map_err(s),
            Target::Scheduler => Schedule::from_json(&p).map(|_| ()).map_err(s),
        }
    });
    outcome(r)
}

/// A writable copy of the fixture model in `dir`.
pub fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    for f in MODEL_FILES {
        let p = m.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(fixture_dir().join(f), &p).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    m
}

/// The full diffusion model in the folder `model` (a [`model_copy`]), on the
/// CPU in f32.
pub fn diffusion_spec(model: &Path) -> gstcodiff::engine::ModelSpec {
    use gstcodiff::engine::{DeviceSpec, Mode, ModelSpec, Precision};
    ModelSpec {
        mode: Mode::Diffusion,
        weights: model.join("cave.pth"),
        sd_dir: Some(model.to_path_buf()),
        codiff: Some(model.join("codiff.pkl")),
        cave: Some(model.join("cave.pth")),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
    }
}

/// Put `bytes` at `rel` in the model copy `model`, load the whole diffusion
/// engine from it (every file, LoRA merge, configs against weights) catching
/// panics, then restore the fixture's file.
pub fn run_model_case(model: &Path, rel: &str, bytes: &[u8]) -> Outcome {
    use gstcodiff::engine::Engine;
    let p = model.join(rel);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let spec = diffusion_spec(model);
    let r = std::panic::catch_unwind(|| Engine::load(&spec, &mut |_| {}).map(|_| ()).map_err(|e| e.to_string()));
    std::fs::copy(fixture_dir().join(rel), &p).unwrap_or_else(|e| panic!("{rel}: {e}"));
    outcome(r)
}

/// Counts over a run.
#[derive(Debug, Default)]
pub struct Tally {
    pub cases: usize,
    /// Cases that loaded the whole engine.
    pub full_loads: usize,
    pub ok: usize,
    pub errors: usize,
    pub panics: usize,
    /// The first few panics: (case number, seed name, message).
    pub first_panics: Vec<(usize, String, String)>,
    /// Error messages that do not name the file.
    pub unnamed: Vec<String>,
}

/// One input: the name it is written under, its parser, its bytes, and for
/// the cases that load the whole engine, its path in the model folder.
pub struct Case {
    pub name: String,
    pub target: Target,
    pub bytes: Vec<u8>,
    pub full_load: Option<String>,
}

/// Case `i` of the run seeded by `seed`: a mutated fixture file (3 in 4) or
/// a generated checkpoint. Every 8th case that mutates a fixture file loads
/// the whole engine with it in place of the original.
pub fn case(seed: u64, i: usize, seeds: &[Seed]) -> Case {
    let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    if rng.below(4) == 0 {
        let name = if rng.chance(0.5) { "gen.pth" } else { "gen.pkl" };
        return Case { name: name.into(), target: Target::Weights, bytes: generate(&mut rng), full_load: None };
    }
    let s = rng.pick(seeds);
    let json = s.target != Target::Weights;
    let bytes = mutate(&mut rng, &s.bytes, seeds, json);
    let full_load = if i % 8 == 7 { s.rel.clone() } else { None };
    Case { name: s.name.clone(), target: s.target, bytes, full_load }
}

/// Run cases `range` of the run seeded by `seed` in `dir`, tallying outcomes.
pub fn run(seed: u64, range: std::ops::Range<usize>, seeds: &[Seed], dir: &Path, tally: &mut Tally) {
    let model = model_copy(dir);
    for i in range {
        let Case { name, target, bytes, full_load } = case(seed, i, seeds);
        tally.cases += 1;
        // a full load's error may name another file of the model (a config
        // that contradicts the weights is reported at the weights)
        let (outcome, must_name) = match &full_load {
            Some(rel) => {
                tally.full_loads += 1;
                (run_model_case(&model, rel, &bytes), model.to_string_lossy().into_owned())
            }
            None => (run_case(dir, &name, target, &bytes), name.clone()),
        };
        match outcome {
            Outcome::Ok => tally.ok += 1,
            Outcome::Error(e) => {
                tally.errors += 1;
                if !e.contains(&must_name) && tally.unnamed.len() < 5 {
                    tally.unnamed.push(e);
                }
            }
            Outcome::Panic(m) => {
                tally.panics += 1;
                if tally.first_panics.len() < 10 {
                    tally.first_panics.push((i, name, m));
                }
            }
        }
    }
}

/// The outcome of one parse run under `catch_unwind`: fine, an error (its
/// message) or a panic (its message).
fn outcome(r: std::thread::Result<Result<(), String>>) -> Outcome {
    match r {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(e)) => Outcome::Error(e),
        Err(p) => Outcome::Panic(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
    }
}
