//! Weight files as users download them, read without any conversion step:
//! safetensors, PyTorch zip pickles (`codiff.pkl`) and PyTorch's legacy non-zip
//! pickle format (`cave.pth`). Every tensor is brought to f32 on the CPU; the
//! models cast to their own dtype and device when they are built.
//!
//! Errors name the file, the key and the expected vs found shape.
//!
//! Files we do not control never crash the host. Every size taken from a
//! file is checked against the bytes actually there before anything is
//! sliced or allocated, through one checked reader ([`Bytes`]) under all
//! three formats, with checked arithmetic. The pickles run on our own
//! machine ([`super::pickle`]: memo entries shared, not copied; no
//! recursion). A tensor view may not hold more elements than its storage
//! (so a stride-0 `[2^40]` view of one element is refused), every index it
//! reaches is checked, and the views of one storage together materialise at
//! most [`MAX_VIEWS_PER_STORAGE`] times its bytes: loading never needs much
//! more memory than the file's size. Dictionary nesting is bounded
//! ([`MAX_NESTING`]), and so is the walk over shared sub-dictionaries.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::bytes::Bytes;
use super::error::clip;
use super::error::{EngineError, Result};
use super::pickle::{self, Id, Node, Pickle};

/// All tensors of one file (or of one sub-dictionary of a pickle), by key.
#[derive(Clone, Debug)]
pub struct TensorFile {
    pub path: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// Integer entries found beside the tensors (`rank_unet`, ... in `codiff.pkl`).
    ints: HashMap<String, i64>,
    /// String metadata (safetensors `__metadata__`).
    metadata: HashMap<String, String>,
}

/// Longest tensor key quoted in an error (characters).
const KEY_CHARS: usize = 200;

fn format_err(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::Format { path: path.to_path_buf(), reason: reason.into() }
}

fn truncated(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::Truncated { path: path.to_path_buf(), reason: reason.into() }
}

/// `NotFound` for a missing file, `Io` for any other read failure.
fn io_error(path: &Path, source: std::io::Error) -> EngineError {
    match source.kind() {
        std::io::ErrorKind::NotFound => EngineError::NotFound { path: path.to_path_buf() },
        _ => EngineError::Io { path: path.to_path_buf(), source },
    }
}

/// Open `path` for reading, refusing anything but a regular file before it
/// is opened: opening a FIFO blocks until a writer comes (a state change
/// would hang), and a device or a directory is no model file.
pub(crate) fn open_regular(path: &Path) -> Result<std::fs::File> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !meta.is_file() {
        let kind = {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            if t.is_dir() {
                "a directory"
            } else if t.is_fifo() {
                "a FIFO"
            } else if t.is_socket() {
                "a socket"
            } else if t.is_block_device() || t.is_char_device() {
                "a device"
            } else {
                "not a regular file"
            }
        };
        return Err(EngineError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{kind}, not a regular file")),
        });
    }
    std::fs::File::open(path).map_err(|e| io_error(path, e))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path)?.read_to_end(&mut bytes).map_err(|e| io_error(path, e))?;
    Ok(bytes)
}

impl TensorFile {
    /// Open a weights file of any supported format, chosen by its first bytes.
    pub fn open(path: &Path) -> Result<Self> {
        let mut head = [0u8; 8];
        let n = {
            let mut f = open_regular(path)?;
            let mut n = 0;
            while n < 8 {
                match f.read(&mut head[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(source) => return Err(EngineError::Io { path: path.to_path_buf(), source }),
                }
            }
            n
        };
        let head = &head[..n];
        if !head.starts_with(b"PK\x03\x04") && !head.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
            // safetensors: read tensor by tensor, so that loading a multi-GB UNet
            // never holds the file and its tensors in memory at the same time
            return Self::from_safetensors_file(path);
        }
        let bytes = read_file(path)?;
        if bytes.starts_with(b"PK\x03\x04") {
            Self::from_zip_pickle(path, &bytes)
        } else {
            Self::from_legacy_pickle(path, &bytes)
        }
    }

    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self { path: path.to_path_buf(), tensors, ints: HashMap::new(), metadata: HashMap::new() }
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.ints.get(key).copied()
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The tensor `key`, or a `MissingTensor` error naming the file (a
    /// `Format` error when the file holds no tensor at all: it is no model
    /// file, whatever else it holds).
    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| {
            if self.tensors.is_empty() {
                EngineError::Format {
                    path: self.path.clone(),
                    reason: format!("holds no tensors at all (looked for `{key}`): not a model's state dict"),
                }
            } else {
                EngineError::MissingTensor { path: self.path.clone(), key: key.to_string() }
            }
        })
    }

    /// Replace the tensor `key` (a merged weight replacing its base).
    pub fn replace(&mut self, key: &str, t: Tensor) {
        self.tensors.insert(key.to_string(), t);
    }

    /// The tensor `key`, checked against `shape`.
    pub fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(key)?;
        if t.dims() != shape {
            return Err(EngineError::ShapeMismatch {
                path: self.path.clone(),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Entries under `prefix.` as a file of their own (keys without the prefix).
    pub fn sub(&self, prefix: &str) -> Self {
        let p = format!("{prefix}.");
        let tensors =
            self.tensors.iter().filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (k.to_string(), v.clone()))).collect();
        Self { path: self.path.clone(), tensors, ints: HashMap::new(), metadata: HashMap::new() }
    }

    // ------------------------------------------------------------ safetensors

    fn from_safetensors_file(path: &Path) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        let io = |e| io_error(path, e);
        let mut f = open_regular(path)?;
        let len = f.metadata().map_err(io)?.len();
        let mut n8 = [0u8; 8];
        if len < 8 {
            return Err(truncated(path, format!("{len} bytes: no safetensors header")));
        }
        f.read_exact(&mut n8).map_err(io)?;
        let n = u64::from_le_bytes(n8);
        if n > MAX_SAFETENSORS_HEADER {
            return Err(format_err(path, "not a safetensors, PyTorch zip or legacy PyTorch file"));
        }
        if len - 8 < n {
            return Err(truncated(path, format!("header of {n} bytes, file has {len}")));
        }
        let mut hdr = vec![0u8; 8 + n as usize];
        hdr[..8].copy_from_slice(&n8);
        f.read_exact(&mut hdr[8..]).map_err(io)?;
        // validate every entry against the real file length, without the data
        let data_len = len - 8 - n;
        let (entries, metadata) = safetensors_entries(path, &hdr, data_len)?;
        let mut tensors = HashMap::new();
        let mut buf = Vec::new();
        for (name, dtype, shape, start, end) in entries {
            // end <= data_len: checked against the file's length above
            buf.resize((end - start) as usize, 0);
            f.seek(SeekFrom::Start(8 + n + start)).map_err(io)?;
            f.read_exact(&mut buf).map_err(|e| truncated(path, format!("tensor `{name}`: {e}")))?;
            let t = Tensor::from_raw_buffer(&buf, dtype, &shape, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| format_err(path, format!("tensor `{name}`: {e}")))?;
            tensors.insert(name, t);
        }
        Ok(Self { path: path.to_path_buf(), tensors, ints: HashMap::new(), metadata })
    }

    // ------------------------------------------------------------ zip pickle

    /// A `torch.save` zip archive. Nested dictionaries are flattened with `.`
    /// (`state_dict_unet.conv_in.base_layer.weight`, `proj.weight`); integer
    /// entries (`rank_unet`) are kept in [`TensorFile::int`].
    fn from_zip_pickle(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut zip =
            zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| truncated_or_format(path, &e.to_string()))?;
        let pkl_name = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl"))
            .map(|n| n.into_owned())
            .ok_or_else(|| format_err(path, "zip archive without data.pkl: not a torch.save file"))?;
        let data_dir = pkl_name.trim_end_matches(".pkl").to_string();
        let pkl = zip_entry(path, &mut zip, bytes, &pkl_name, Some(MAX_ZIP_PICKLE))?;
        let pk = pickle::load(&mut Bytes::new(path, &pkl).part(&pkl_name))?;
        let entries = flatten(path, &pk)?;
        Self::assemble(path, entries, |key, rb| {
            let name = format!("{data_dir}/{}", rb.storage_key);
            zip_entry(path, &mut zip, bytes, &name, None).map_err(|e| match e {
                EngineError::Truncated { path, reason } => {
                    EngineError::Truncated { path, reason: format!("tensor `{key}`: {reason}") }
                }
                EngineError::Format { path, reason } => {
                    EngineError::Format { path, reason: format!("tensor `{key}`: {reason}") }
                }
                e => e,
            })
        })
    }

    // ------------------------------------------------------------ legacy pickle

    /// PyTorch's legacy (non-zip) format: five consecutive pickles — magic
    /// number, protocol version, system info, the object, the list of storage
    /// keys — then each storage as an 8-byte little-endian element count and its
    /// raw little-endian data, in the order of that list.
    fn from_legacy_pickle(path: &Path, bytes: &[u8]) -> Result<Self> {
        const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
        // pickle 1: PROTO 2, LONG1 10 bytes (the magic number), STOP
        if bytes.len() < 15 || bytes[4..14] != MAGIC || bytes[14] != b'.' {
            return Err(format_err(path, "not a PyTorch legacy file (bad magic number)"));
        }
        let mut r = Bytes::new(path, bytes);
        r.take(15, "magic number")?;
        let version = pickle::load(&mut r)?;
        if version.int(version.root) != Some(1001) {
            return Err(format_err(
                path,
                format!("unsupported legacy protocol ({})", version.node(version.root).kind()),
            ));
        }
        let sys_info = pickle::load(&mut r)?;
        if let Node::Dict(items) = sys_info.node(sys_info.root) {
            for &(k, v) in items {
                if sys_info.str(k) == Some("little_endian") && sys_info.node(v) == &Node::Bool(false) {
                    return Err(format_err(path, "big-endian legacy file"));
                }
            }
        }
        let obj = pickle::load(&mut r)?;
        let key_list = pickle::load(&mut r)?;
        let keys: Vec<String> = match key_list.node(key_list.root) {
            Node::List(items) => items
                .iter()
                .map(|&k| match key_list.node(k) {
                    Node::Str(s) => Ok(s.clone()),
                    Node::Int(i) => Ok(i.to_string()),
                    other => Err(format_err(path, format!("storage key: {}", other.kind()))),
                })
                .collect::<Result<_>>()?,
            other => return Err(format_err(path, format!("storage key list: {}", other.kind()))),
        };
        let entries = flatten(path, &obj)?;
        // storage key -> element size, from the storages the tensors name
        let mut elem_size = HashMap::new();
        for (_, e) in &entries {
            if let Flat::Tensor(rb) = e {
                elem_size.insert(rb.storage_key.clone(), rb.dtype.size_in_bytes());
            }
        }
        let mut storages: HashMap<String, &[u8]> = HashMap::new();
        for key in keys {
            let n = u64::from_le_bytes(r.array(&format!("storage {key}: element count"))?);
            let es = elem_size.get(&key).copied().unwrap_or(4) as u64;
            let size = n.checked_mul(es).ok_or_else(|| {
                truncated(path, format!("storage {key}: {n} elements of {es} bytes, more than the file can hold"))
            })?;
            let data = r.take(size, &format!("storage {key} ({n} elements of {es} bytes)"))?;
            storages.insert(key, data);
        }
        Self::assemble(path, entries, |key, rb| {
            storages
                .get(&rb.storage_key)
                .map(|raw| std::borrow::Cow::Borrowed(*raw))
                .ok_or_else(|| truncated(path, format!("tensor `{key}`: storage {} missing", rb.storage_key)))
        })
    }

    /// Build the file from flattened pickle entries; `raw` yields the storage
    /// bytes a tensor views. The tensors viewing one storage may together
    /// materialise at most [`MAX_VIEWS_PER_STORAGE`] times its bytes.
    fn assemble<'b>(
        path: &Path,
        entries: Vec<(String, Flat)>,
        mut raw: impl FnMut(&str, &Rebuild) -> Result<std::borrow::Cow<'b, [u8]>>,
    ) -> Result<Self> {
        let mut out = Self::from_tensors(path, HashMap::new());
        let mut used: HashMap<String, usize> = HashMap::new();
        for (key, entry) in entries {
            match entry {
                Flat::Int(v) => {
                    out.ints.insert(key, v);
                }
                Flat::Tensor(rb) => {
                    let bytes = raw(&key, &rb)?;
                    let t = rb.build(path, &key, &bytes)?;
                    let u = used.entry(rb.storage_key.clone()).or_insert(0);
                    *u = u.saturating_add(t.elem_count() * rb.dtype.size_in_bytes());
                    if *u > bytes.len().saturating_mul(MAX_VIEWS_PER_STORAGE) {
                        return Err(format_err(
                            path,
                            format!(
                                "tensor `{key}`: the tensors viewing storage {} materialise {} bytes from its {}: more than {MAX_VIEWS_PER_STORAGE} times",
                                rb.storage_key,
                                *u,
                                bytes.len()
                            ),
                        ));
                    }
                    out.tensors.insert(key, t);
                }
            }
        }
        Ok(out)
    }
}

/// Bytes a compressed `data.pkl` may expand to (torch writes it uncompressed;
/// a real SD-2.1 UNet's is about 100 KB).
const MAX_ZIP_PICKLE: usize = 64 << 20;

/// How many times its own bytes the tensors viewing one storage may
/// materialise together: views never hold more elements than their storage
/// ([`Rebuild::build`]), and a few tied weights may share one.
pub const MAX_VIEWS_PER_STORAGE: usize = 4;

/// Most dimensions of one tensor.
const MAX_DIMS: usize = 16;

/// Deepest dictionary nesting [`flatten`] follows (state dicts nest 2 or 3).
pub const MAX_NESTING: usize = 64;

/// Longest dotted key.
const MAX_KEY: usize = 4096;

/// The bytes of zip entry `name`: a slice of the file when stored (as torch
/// writes every entry), else decompressed up to `cap` bytes when a cap is
/// given; compressed storages are refused.
fn zip_entry<'a>(
    path: &Path,
    zip: &mut zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    bytes: &'a [u8],
    name: &str,
    cap: Option<usize>,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let mut f = zip.by_name(name).map_err(|e| truncated_or_format(path, &format!("{name}: {e}")))?;
    let size = f.size();
    if f.compression() == zip::CompressionMethod::Stored {
        let start = f.data_start().ok_or_else(|| format_err(path, format!("{name}: no data offset")))?;
        if f.compressed_size() != size {
            return Err(format_err(
                path,
                format!("{name}: stored entry of {} bytes claims {size}", f.compressed_size()),
            ));
        }
        let mut r = Bytes::new(path, bytes).part(name);
        r.seek(start)?;
        return Ok(std::borrow::Cow::Borrowed(r.take(size, "entry data")?));
    }
    let Some(cap) = cap else {
        return Err(format_err(
            path,
            format!("{name} is compressed ({:?}): torch.save stores tensor data uncompressed", f.compression()),
        ));
    };
    let mut out = Vec::new();
    (&mut f).take(cap as u64 + 1).read_to_end(&mut out).map_err(|e| truncated(path, format!("{name}: {e}")))?;
    if out.len() > cap {
        return Err(format_err(path, format!("{name} expands to more than {cap} bytes")));
    }
    Ok(std::borrow::Cow::Owned(out))
}

fn truncated_or_format(path: &Path, msg: &str) -> EngineError {
    let lower = msg.to_lowercase();
    if lower.contains("eof") || lower.contains("end of") || lower.contains("central directory") {
        truncated(path, msg.to_string())
    } else {
        format_err(path, msg.to_string())
    }
}

/// Elements of `shape`, `None` when the product of its nonzero sizes
/// overflows: an empty tensor `[0, 2^40, 2^40]` still has strides to compute.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d.max(1)))?;
    Some(shape.iter().product())
}

/// Arguments of `torch._utils._rebuild_tensor_v2`.
#[derive(Debug)]
struct Rebuild {
    storage_key: String,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl Rebuild {
    /// Gather the (possibly strided) view out of the raw storage bytes. A view
    /// may not have more elements than its storage holds: strides of 0 or
    /// overlapping strides (`expand`) could otherwise make a few bytes of file
    /// into any amount of memory. Every index the view reaches is checked.
    fn build(&self, path: &Path, key: &str, raw: &[u8]) -> Result<Tensor> {
        let es = self.dtype.size_in_bytes();
        let n_storage = raw.len() / es;
        let (shape, stride, offset) = (&self.shape, &self.stride, self.offset);
        let desc = || format!("tensor `{key}` of shape {shape:?} (stride {stride:?}, offset {offset})");
        if shape.len() != stride.len() {
            return Err(format_err(path, format!("{}: {} sizes but {} strides", desc(), shape.len(), stride.len())));
        }
        if shape.len() > MAX_DIMS {
            return Err(format_err(path, format!("{}: more than {MAX_DIMS} dimensions", desc())));
        }
        let numel =
            checked_numel(shape).ok_or_else(|| format_err(path, format!("{}: the element count overflows", desc())))?;
        if numel > n_storage {
            return Err(format_err(
                path,
                format!(
                    "{}: {numel} elements viewed from storage {} of {n_storage}; a view may not hold more elements than its storage",
                    desc(),
                    self.storage_key
                ),
            ));
        }
        if numel == 0 {
            return Ok(Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?);
        }
        // the largest index the view reaches, over every dimension
        let last = shape
            .iter()
            .zip(stride)
            .try_fold(offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
        match last {
            Some(last) if last < n_storage => {}
            _ => {
                return Err(truncated(
                    path,
                    format!(
                        "{}: storage {} has {n_storage} elements, the view reaches past them",
                        desc(),
                        self.storage_key
                    ),
                ))
            }
        }
        let contiguous = {
            let mut s = 1;
            let mut ok = true;
            for (d, st) in shape.iter().zip(stride).rev() {
                if *d > 1 && *st != s {
                    ok = false;
                }
                s *= d;
            }
            ok
        };
        // numel <= n_storage: the copy is never larger than the storage
        let data: std::borrow::Cow<[u8]> = if contiguous {
            std::borrow::Cow::Borrowed(&raw[offset * es..(offset + numel) * es])
        } else {
            let mut out = Vec::with_capacity(numel * es);
            let mut coord = vec![0usize; shape.len()];
            for _ in 0..numel {
                let i = offset + coord.iter().zip(stride).map(|(c, s)| c * s).sum::<usize>();
                out.extend_from_slice(&raw[i * es..(i + 1) * es]);
                for d in (0..coord.len()).rev() {
                    coord[d] += 1;
                    if coord[d] < shape[d] {
                        break;
                    }
                    coord[d] = 0;
                }
            }
            std::borrow::Cow::Owned(out)
        };
        let t = Tensor::from_raw_buffer(&data, self.dtype, shape, &Device::Cpu)
            .map_err(|e| format_err(path, format!("tensor `{key}`: {e}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

enum Flat {
    Tensor(Rebuild),
    Int(i64),
}

/// Walk nested dicts, collecting tensors and ints under dotted keys; lists of
/// strings (module-name lists) and other values are skipped. Nesting is
/// bounded by [`MAX_NESTING`] and the walk by the number of objects (shared
/// sub-dictionaries cannot multiply it).
fn flatten(path: &Path, pk: &Pickle) -> Result<Vec<(String, Flat)>> {
    let mut out = Vec::new();
    let mut budget = pk.nodes.len().saturating_mul(2).saturating_add(1024);
    walk(path, pk, pk.root, "", 0, &mut budget, &mut out)?;
    Ok(out)
}

fn walk(
    path: &Path,
    pk: &Pickle,
    id: Id,
    prefix: &str,
    depth: usize,
    budget: &mut usize,
    out: &mut Vec<(String, Flat)>,
) -> Result<()> {
    if depth > MAX_NESTING {
        return Err(format_err(
            path,
            format!("dictionaries nested deeper than {MAX_NESTING} levels at `{}`", clip(prefix, KEY_CHARS)),
        ));
    }
    if *budget == 0 {
        return Err(format_err(
            path,
            "pickle: objects reached more often than the file holds objects (shared dictionaries)",
        ));
    }
    *budget -= 1;
    match pk.node(id) {
        Node::Dict(items) => {
            for &(k, v) in items {
                let Some(k) = pk.str(k) else { continue };
                let key = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                if key.len() > MAX_KEY {
                    return Err(format_err(
                        path,
                        format!("key longer than {MAX_KEY} bytes: `{}`", clip(&key, KEY_CHARS)),
                    ));
                }
                walk(path, pk, v, &key, depth + 1, budget, out)?;
            }
        }
        // OrderedDict with attributes, or a module: the entries are in `obj`.
        Node::Build { obj, .. } => walk(path, pk, *obj, prefix, depth + 1, budget, out)?,
        Node::Int(v) => out.push((prefix.to_string(), Flat::Int(*v))),
        Node::Reduce { .. } => {
            if let Some(rb) = tensor_rebuild(path, pk, prefix, id)? {
                out.push((prefix.to_string(), Flat::Tensor(rb)));
            }
        }
        _ => {}
    }
    Ok(())
}

fn tensor_rebuild(path: &Path, pk: &Pickle, key: &str, id: Id) -> Result<Option<Rebuild>> {
    let bad = |what: &str| format_err(path, format!("tensor `{}`: {what}", clip(key, KEY_CHARS)));
    let (mut callable, mut args) = match pk.node(id) {
        Node::Reduce { callable, args } => (*callable, *args),
        _ => return Ok(None),
    };
    // parameters and tensor subclasses wrap the plain rebuild (one level each)
    for _ in 0..2 {
        match pk.global(callable) {
            Some(("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")) => {
                let a = pk.items(args).ok_or_else(|| bad("parameter args"))?;
                match a.first().map(|&d| pk.node(d)) {
                    Some(Node::Reduce { callable: c, args: x }) => (callable, args) = (*c, *x),
                    _ => return Err(bad("parameter data")),
                }
            }
            Some(("torch._tensor", "_rebuild_from_type_v2")) => {
                let a = pk.items(args).ok_or_else(|| bad("rebuild_from_type args"))?;
                if a.len() < 3 {
                    return Err(bad("short rebuild_from_type args"));
                }
                (callable, args) = (a[0], a[2]);
            }
            _ => break,
        }
    }
    if pk.global(callable) != Some(("torch._utils", "_rebuild_tensor_v2")) {
        return Ok(None);
    }
    let a = pk.items(args).ok_or_else(|| bad("rebuild args"))?;
    if a.len() < 4 {
        return Err(bad("short rebuild args"));
    }
    let usize_of = |id: Id, what: &str| -> Result<usize> {
        match pk.int(id) {
            Some(v) => usize::try_from(v).map_err(|_| bad(&format!("{what} {v} is negative"))),
            None => Err(bad(&format!("{what} is a {}", pk.node(id).kind()))),
        }
    };
    let usizes = |id: Id, what: &str| -> Result<Vec<usize>> {
        let items = pk.items(id).ok_or_else(|| bad(&format!("{what} is a {}", pk.node(id).kind())))?;
        if items.len() > MAX_DIMS {
            return Err(bad(&format!("{what} has {} dimensions, at most {MAX_DIMS}", items.len())));
        }
        items.iter().map(|&x| usize_of(x, what)).collect()
    };
    let shape = usizes(a[2], "size")?;
    let stride = usizes(a[3], "stride")?;
    let offset = usize_of(a[1], "storage offset")?;
    let st = match pk.node(a[0]) {
        Node::PersId(t) => pk.items(*t).ok_or_else(|| bad("storage tuple"))?,
        _ => return Err(bad("storage reference")),
    };
    if st.len() < 5 {
        return Err(bad("storage tuple"));
    }
    let storage_key = match pk.node(st[2]) {
        Node::Str(s) => s.clone(),
        Node::Int(i) => i.to_string(),
        other => return Err(bad(&format!("storage key is a {}", other.kind()))),
    };
    let (_, class_name) = pk.global(st[1]).ok_or_else(|| bad("storage type"))?;
    let dtype = match class_name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => return Err(bad(&format!("unsupported storage {}", clip(other, KEY_CHARS)))),
    };
    Ok(Some(Rebuild { storage_key, dtype, offset, shape, stride }))
}

// ---------------------------------------------------------------- safetensors

/// Largest safetensors JSON header (the format's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

fn header(path: &Path, bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut r = Bytes::new(path, bytes);
    let n = u64::from_le_bytes(r.array("safetensors header length")?);
    if n > MAX_SAFETENSORS_HEADER {
        return Err(format_err(path, "not a safetensors, PyTorch zip or legacy PyTorch file"));
    }
    let json: serde_json::Value = serde_json::from_slice(r.take(n, "safetensors header")?)
        .map_err(|e| format_err(path, format!("safetensors header: {e}")))?;
    match json {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(format_err(path, "safetensors header is not an object")),
    }
}

type StEntry = (String, DType, Vec<usize>, u64, u64);

/// Name, dtype, shape and data byte range of every tensor; `data_len` is the
/// number of data bytes the file holds after the header. Sizes are computed
/// with checked arithmetic and ranges may not overlap, so the tensors together
/// never need more bytes than the file holds.
fn safetensors_entries(
    path: &Path,
    header_bytes: &[u8],
    data_len: u64,
) -> Result<(Vec<StEntry>, HashMap<String, String>)> {
    let hdr = header(path, header_bytes)?;
    let mut out = Vec::new();
    let mut meta = HashMap::new();
    for (name, v) in hdr {
        if name == "__metadata__" {
            if let serde_json::Value::Object(m) = v {
                for (k, v) in m {
                    if let serde_json::Value::String(s) = v {
                        meta.insert(k, s);
                    }
                }
            }
            continue;
        }
        let bad = |what: &str| format_err(path, format!("tensor `{}`: {what}", clip(&name, KEY_CHARS)));
        let dtype = match v.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("I64") => DType::I64,
            Some("U8") => DType::U8,
            Some("U32") => DType::U32,
            other => return Err(bad(&format!("unsupported dtype {:?}", other.map(|k| clip(k, KEY_CHARS))))),
        };
        let list = |field: &str| -> Result<Vec<u64>> {
            let items = v.get(field).and_then(|s| s.as_array()).ok_or_else(|| bad(&format!("no {field}")))?;
            if items.len() > MAX_DIMS {
                return Err(bad(&format!("{field} has {} entries, at most {MAX_DIMS}", items.len())));
            }
            items
                .iter()
                .map(|x| x.as_u64().ok_or_else(|| bad(&format!("{field} must hold unsigned integers"))))
                .collect()
        };
        let shape: Vec<usize> = list("shape")?.into_iter().map(|d| d as usize).collect();
        let offs = list("data_offsets")?;
        if offs.len() != 2 || offs[1] < offs[0] {
            return Err(bad(&format!("data_offsets {offs:?}")));
        }
        if offs[1] > data_len {
            return Err(truncated(
                path,
                format!(
                    "tensor `{}` {shape:?} ends at byte {} of the data, file holds {data_len}",
                    clip(&name, KEY_CHARS),
                    offs[1]
                ),
            ));
        }
        let want = checked_numel(&shape).and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        match want {
            Some(w) if w as u64 == offs[1] - offs[0] => {}
            Some(w) => return Err(bad(&format!("{} bytes for shape {shape:?}, expected {w}", offs[1] - offs[0]))),
            None => return Err(bad(&format!("shape {shape:?}: the byte size overflows"))),
        }
        out.push((name, dtype, shape, offs[0], offs[1]));
    }
    out.sort_by_key(|e| (e.3, e.4));
    for w in out.windows(2) {
        if w[1].3 < w[0].4 {
            return Err(format_err(
                path,
                format!(
                    "tensors `{}` and `{}` overlap in the data",
                    clip(&w[0].0, KEY_CHARS),
                    clip(&w[1].0, KEY_CHARS)
                ),
            ));
        }
    }
    Ok((out, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codiff-tiny-a").join(name)
    }

    #[test]
    fn legacy_pickle_reads_every_cave_tensor() {
        let f = TensorFile::open(&fixture("cave.pth")).unwrap();
        let w = f.get("m_head.weight").unwrap();
        assert_eq!(w.dims(), &[8, 3, 3, 3]);
        assert_eq!(f.get("qf_pred.8.weight").unwrap().dims(), &[1, 24]);
        assert!(f.contains("m_down1.0.res.1.running_var"));
        // running variances are positive: the bytes landed in the right tensors
        let v: Vec<f32> = f.get("m_down1.0.res.1.running_var").unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| *x > 0.0), "{v:?}");
    }

    #[test]
    fn zip_pickle_reads_nested_dicts_and_ranks() {
        let f = TensorFile::open(&fixture("codiff.pkl")).unwrap();
        assert_eq!(f.int("rank_unet"), Some(4));
        assert_eq!(f.int("rank_vae"), Some(4));
        assert_eq!(f.get("proj.weight").unwrap().dims(), &[48, 24]);
        let unet = f.sub("state_dict_unet");
        assert_eq!(unet.len(), 516);
        assert!(unet.contains("conv_in.base_layer.weight"));
        assert_eq!(f.sub("state_dict_vae").len(), 60);
    }

    #[test]
    fn zip_storages_are_sliced_from_the_right_bytes() {
        // values and sums read with Python's zipfile + struct from the entries
        let f = TensorFile::open(&fixture("codiff.pkl")).unwrap();
        for (key, first, sum) in [
            ("proj.weight", [-0.16230431f32, 0.042676132], 0.21757861f64),
            ("state_dict_unet.conv_in.base_layer.weight", [0.12785248, -0.013588025], 3.7247422),
        ] {
            let v: Vec<f32> = f.get(key).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(&v[..2], &first, "{key}");
            let s: f64 = v.iter().map(|&x| x as f64).sum();
            assert!((s - sum).abs() < 1e-5, "{key}: {s} vs {sum}");
        }
    }

    #[test]
    fn truncated_legacy_file_is_reported_as_truncated() {
        let bytes = std::fs::read(fixture("cave.pth")).unwrap();
        let dir = std::env::temp_dir().join(format!("codiff-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("cave.pth");
        std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
        let err = TensorFile::open(&p).unwrap_err();
        assert!(matches!(err, EngineError::Truncated { .. }), "{err}");
        assert!(err.to_string().contains("cave.pth"), "{err}");
    }

    #[test]
    fn strided_views_are_gathered() {
        let rb =
            Rebuild { storage_key: "0".into(), dtype: DType::F32, offset: 1, shape: vec![2, 2], stride: vec![1, 3] };
        let raw: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = rb.build(Path::new("x"), "k", &raw).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![1.0, 4.0], vec![2.0, 5.0]]);
    }
}
