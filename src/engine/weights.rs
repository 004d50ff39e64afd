//! Weight files as users download them, read without any conversion step:
//! safetensors, PyTorch zip pickles (`codiff.pkl`) and PyTorch's legacy non-zip
//! pickle format (`cave.pth`). Every tensor is brought to f32 on the CPU; the
//! models cast to their own dtype and device when they are built.
//!
//! Errors name the file, the key and the expected vs found shape.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use super::error::{EngineError, Result};

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

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_error(path, e))
}

impl TensorFile {
    /// Open a weights file of any supported format, chosen by its first bytes.
    pub fn open(path: &Path) -> Result<Self> {
        let mut head = [0u8; 8];
        let n = {
            let mut f = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
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

    /// The tensor `key`, or a `MissingTensor` error naming the file.
    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| EngineError::MissingTensor {
            path: self.path.clone(),
            key: key.to_string(),
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
        let tensors = self
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (k.to_string(), v.clone())))
            .collect();
        Self { path: self.path.clone(), tensors, ints: HashMap::new(), metadata: HashMap::new() }
    }

    // ------------------------------------------------------------ safetensors

    fn from_safetensors_file(path: &Path) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        let io = |e| io_error(path, e);
        let mut f = std::fs::File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len() as usize;
        let mut n8 = [0u8; 8];
        if len < 8 {
            return Err(truncated(path, format!("{len} bytes: no safetensors header")));
        }
        f.read_exact(&mut n8).map_err(io)?;
        let n = u64::from_le_bytes(n8) as usize;
        if n > 100_000_000 {
            return Err(format_err(path, "not a safetensors, PyTorch zip or legacy PyTorch file"));
        }
        if len < 8 + n {
            return Err(truncated(path, format!("header of {n} bytes, file has {len}")));
        }
        let mut hdr = vec![0u8; 8 + n];
        hdr[..8].copy_from_slice(&n8);
        f.read_exact(&mut hdr[8..]).map_err(io)?;
        // validate every entry against the real file length, without the data
        let (entries, metadata) = safetensors_entries(path, &hdr, len - 8 - n)?;
        let mut tensors = HashMap::new();
        let mut buf = Vec::new();
        for (name, dtype, shape, start, end) in entries {
            buf.resize(end - start, 0);
            f.seek(SeekFrom::Start((8 + n + start) as u64)).map_err(io)?;
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
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| truncated_or_format(path, &e.to_string()))?;
        let pkl_name = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl"))
            .map(|n| n.into_owned())
            .ok_or_else(|| format_err(path, "zip archive without data.pkl: not a torch.save file"))?;
        let data_dir = pkl_name.trim_end_matches(".pkl").to_string();
        let obj = {
            let entry = zip
                .by_name(&pkl_name)
                .map_err(|e| truncated_or_format(path, &format!("{pkl_name}: {e}")))?;
            let mut reader = BufReader::new(entry);
            read_pickle(path, &mut reader)?
        };
        let mut entries = Vec::new();
        flatten(path, "", obj, &mut entries)?;
        Self::assemble(path, entries, |key, rb| {
            let name = format!("{data_dir}/{}", rb.storage_key);
            let mut raw = Vec::new();
            zip.by_name(&name)
                .and_then(|mut f| f.read_to_end(&mut raw).map_err(Into::into))
                .map_err(|e| truncated(path, format!("tensor `{key}`: storage {name}: {e}")))?;
            Ok(std::borrow::Cow::Owned(raw))
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
        let mut r = std::io::Cursor::new(&bytes[15..]);
        let version = read_pickle(path, &mut r)?;
        match version {
            Object::Int(1001) | Object::Long(1001) => {}
            other => {
                return Err(format_err(path, format!("unsupported legacy protocol {other:?}")))
            }
        }
        let sys_info = read_pickle(path, &mut r)?;
        if let Object::Dict(items) = &sys_info {
            for (k, v) in items {
                if *k == Object::Unicode("little_endian".into()) && *v == Object::Bool(false) {
                    return Err(format_err(path, "big-endian legacy file"));
                }
            }
        }
        let obj = read_pickle(path, &mut r)?;
        let keys: Vec<String> = match read_pickle(path, &mut r)? {
            Object::List(items) => items
                .into_iter()
                .map(|o| o.unicode().map_err(|o| format_err(path, format!("storage key {o:?}"))))
                .collect::<Result<_>>()?,
            other => return Err(format_err(path, format!("storage key list: {other:?}"))),
        };
        let mut entries = Vec::new();
        flatten(path, "", obj, &mut entries)?;
        // storage key -> element size, from the storages the tensors name
        let mut elem_size = HashMap::new();
        for (_, e) in &entries {
            if let Flat::Tensor(rb) = e {
                elem_size.insert(rb.storage_key.clone(), rb.dtype.size_in_bytes());
            }
        }
        let mut pos = 15 + r.position() as usize;
        let mut storages: HashMap<String, &[u8]> = HashMap::new();
        for key in keys {
            if pos + 8 > bytes.len() {
                return Err(truncated(path, format!("storage {key}: header past end of file")));
            }
            let n = u64::from_le_bytes(bytes[pos..pos + 8].try_into().expect("8 bytes")) as usize;
            pos += 8;
            let size = n * elem_size.get(&key).copied().unwrap_or(4);
            if pos + size > bytes.len() {
                return Err(truncated(
                    path,
                    format!(
                        "storage {key}: needs {size} bytes at offset {pos}, file has {}",
                        bytes.len()
                    ),
                ));
            }
            storages.insert(key, &bytes[pos..pos + size]);
            pos += size;
        }
        Self::assemble(path, entries, |key, rb| {
            storages
                .get(&rb.storage_key)
                .map(|raw| std::borrow::Cow::Borrowed(*raw))
                .ok_or_else(|| truncated(path, format!("tensor `{key}`: storage {} missing", rb.storage_key)))
        })
    }

    /// Build the file from flattened pickle entries; `raw` yields the storage
    /// bytes a tensor views.
    fn assemble<'b>(
        path: &Path,
        entries: Vec<(String, Flat)>,
        mut raw: impl FnMut(&str, &Rebuild) -> Result<std::borrow::Cow<'b, [u8]>>,
    ) -> Result<Self> {
        let mut out = Self::from_tensors(path, HashMap::new());
        for (key, entry) in entries {
            match entry {
                Flat::Int(v) => {
                    out.ints.insert(key, v);
                }
                Flat::Tensor(rb) => {
                    let bytes = raw(&key, &rb)?;
                    let t = rb.build(path, &key, &bytes)?;
                    out.tensors.insert(key, t);
                }
            }
        }
        Ok(out)
    }
}

fn truncated_or_format(path: &Path, msg: &str) -> EngineError {
    let lower = msg.to_lowercase();
    if lower.contains("eof") || lower.contains("end of") || lower.contains("central directory") {
        truncated(path, msg.to_string())
    } else {
        format_err(path, msg.to_string())
    }
}

fn read_pickle<R: BufRead>(path: &Path, r: &mut R) -> Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(r).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("failed to fill whole buffer") || msg.contains("EOF") {
            truncated(path, format!("pickle ends early ({msg})"))
        } else {
            format_err(path, format!("pickle: {msg}"))
        }
    })?;
    stack.finalize().map_err(|e| format_err(path, format!("pickle: {e}")))
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
    /// Gather the (possibly strided) view out of the raw storage bytes.
    fn build(&self, path: &Path, key: &str, raw: &[u8]) -> Result<Tensor> {
        let es = self.dtype.size_in_bytes();
        let n_storage = raw.len() / es;
        let numel: usize = self.shape.iter().product();
        if numel > 0 {
            let last = self.offset
                + self.shape.iter().zip(&self.stride).map(|(d, s)| (d - 1) * s).sum::<usize>();
            if last >= n_storage {
                return Err(truncated(
                    path,
                    format!(
                        "tensor `{key}` {:?}: storage has {n_storage} elements, view needs {}",
                        self.shape,
                        last + 1
                    ),
                ));
            }
        }
        let storage = Tensor::from_raw_buffer(&raw[..n_storage * es], self.dtype, &[n_storage], &Device::Cpu)
            .map_err(|e| format_err(path, format!("tensor `{key}`: {e}")))?;
        let contiguous = {
            let mut s = 1;
            let mut ok = true;
            for (d, st) in self.shape.iter().zip(&self.stride).rev() {
                if *d > 1 && *st != s {
                    ok = false;
                }
                s *= d;
            }
            ok
        };
        let t = if contiguous {
            storage.narrow(0, self.offset, numel)?.reshape(self.shape.as_slice())?
        } else {
            let mut idx = Vec::with_capacity(numel);
            let mut coord = vec![0usize; self.shape.len()];
            for _ in 0..numel {
                idx.push(
                    (self.offset + coord.iter().zip(&self.stride).map(|(c, s)| c * s).sum::<usize>())
                        as u32,
                );
                for d in (0..coord.len()).rev() {
                    coord[d] += 1;
                    if coord[d] < self.shape[d] {
                        break;
                    }
                    coord[d] = 0;
                }
            }
            let idx = Tensor::from_vec(idx, numel, &Device::Cpu)?;
            storage.index_select(&idx, 0)?.reshape(self.shape.as_slice())?
        };
        Ok(t.to_dtype(DType::F32)?)
    }
}

enum Flat {
    Tensor(Rebuild),
    Int(i64),
}

/// Walk nested dicts, collecting tensors and ints under dotted keys; lists of
/// strings (module-name lists) and other values are skipped.
fn flatten(path: &Path, prefix: &str, obj: Object, out: &mut Vec<(String, Flat)>) -> Result<()> {
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match obj {
        Object::Dict(items) => {
            for (k, v) in items {
                let k = match k {
                    Object::Unicode(s) => s,
                    _ => continue,
                };
                flatten(path, &join(&k), v, out)?;
            }
        }
        Object::Build { callable, args } => {
            // OrderedDict with attributes, or a module: the entries are in `callable`.
            flatten(path, prefix, *callable, out)?;
            let _ = args;
        }
        Object::Int(v) => out.push((prefix.to_string(), Flat::Int(v as i64))),
        Object::Long(v) => out.push((prefix.to_string(), Flat::Int(v))),
        obj @ Object::Reduce { .. } => {
            if let Some(rb) = tensor_rebuild(path, prefix, obj)? {
                out.push((prefix.to_string(), Flat::Tensor(rb)));
            }
        }
        _ => {}
    }
    Ok(())
}

fn tensor_rebuild(path: &Path, key: &str, obj: Object) -> Result<Option<Rebuild>> {
    let bad = |what: &str| format_err(path, format!("tensor `{key}`: {what}"));
    let (callable, args) = obj.reduce().map_err(|_| bad("not a reduce"))?;
    let (callable, args) = match callable {
        Object::Class { module_name, class_name }
            if module_name == "torch._utils" && class_name == "_rebuild_parameter" =>
        {
            let mut a = args.tuple().map_err(|_| bad("parameter args"))?;
            if a.is_empty() {
                return Err(bad("empty parameter args"));
            }
            a.remove(0).reduce().map_err(|_| bad("parameter data"))?
        }
        c => (c, args),
    };
    match &callable {
        Object::Class { module_name, class_name }
            if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        _ => return Ok(None),
    }
    let mut a = args.tuple().map_err(|_| bad("rebuild args"))?;
    if a.len() < 4 {
        return Err(bad("short rebuild args"));
    }
    let usizes = |o: Object| -> Result<Vec<usize>> {
        match o {
            Object::Tuple(v) | Object::List(v) => v
                .into_iter()
                .map(|x| x.int_or_long().map(|x| x as usize).map_err(|_| bad("size/stride")))
                .collect(),
            _ => Err(bad("size/stride")),
        }
    };
    let stride = usizes(a.remove(3))?;
    let shape = usizes(a.remove(2))?;
    let offset = a.remove(1).int_or_long().map_err(|_| bad("storage offset"))? as usize;
    let storage = a.remove(0).persistent_load().map_err(|_| bad("storage reference"))?;
    let mut st = storage.tuple().map_err(|_| bad("storage tuple"))?;
    if st.len() < 5 {
        return Err(bad("storage tuple"));
    }
    let storage_key = match st.remove(2) {
        Object::Unicode(s) => s,
        Object::Int(i) => i.to_string(),
        Object::Long(i) => i.to_string(),
        _ => return Err(bad("storage key")),
    };
    let (_, class_name) = st.remove(1).class().map_err(|_| bad("storage type"))?;
    let dtype = match class_name.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => return Err(bad(&format!("unsupported storage {other}"))),
    };
    Ok(Some(Rebuild { storage_key, dtype, offset, shape, stride }))
}

// ---------------------------------------------------------------- safetensors

fn header(path: &Path, bytes: &[u8]) -> Result<(serde_json::Map<String, serde_json::Value>, usize)> {
    if bytes.len() < 8 {
        return Err(truncated(path, format!("{} bytes: no safetensors header", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if n > 100_000_000 {
        return Err(format_err(path, "not a safetensors, PyTorch zip or legacy PyTorch file"));
    }
    if bytes.len() < 8 + n {
        return Err(truncated(path, format!("header of {n} bytes, file has {}", bytes.len())));
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| format_err(path, format!("safetensors header: {e}")))?;
    match json {
        serde_json::Value::Object(m) => Ok((m, 8 + n)),
        _ => Err(format_err(path, "safetensors header is not an object")),
    }
}

type StEntry = (String, DType, Vec<usize>, usize, usize);

/// Name, dtype, shape and data byte range of every tensor; `data_len` is the
/// number of data bytes the file holds after the header.
fn safetensors_entries(path: &Path, header_bytes: &[u8], data_len: usize) -> Result<(Vec<StEntry>, HashMap<String, String>)> {
    let (hdr, _) = header(path, header_bytes)?;
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
        let bad = |what: &str| format_err(path, format!("tensor `{name}`: {what}"));
        let dtype = match v.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("I64") => DType::I64,
            Some("U8") => DType::U8,
            Some("U32") => DType::U32,
            other => return Err(bad(&format!("unsupported dtype {other:?}"))),
        };
        let list = |field: &str| -> Result<Vec<usize>> {
            v.get(field)
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad(&format!("no {field}")))?
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(|| bad(field)))
                .collect()
        };
        let shape = list("shape")?;
        let offs = list("data_offsets")?;
        if offs.len() != 2 || offs[1] < offs[0] {
            return Err(bad("data_offsets"));
        }
        if offs[1] > data_len {
            return Err(truncated(
                path,
                format!("tensor `{name}` {shape:?} ends at byte {} of the data, file holds {data_len}", offs[1]),
            ));
        }
        let want = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if offs[1] - offs[0] != want {
            return Err(bad(&format!("{} bytes for shape {shape:?}, expected {want}", offs[1] - offs[0])));
        }
        out.push((name, dtype, shape, offs[0], offs[1]));
    }
    out.sort_by_key(|e| e.3);
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
        let rb = Rebuild {
            storage_key: "0".into(),
            dtype: DType::F32,
            offset: 1,
            shape: vec![2, 2],
            stride: vec![1, 3],
        };
        let raw: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = rb.build(Path::new("x"), "k", &raw).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![1.0, 4.0], vec![2.0, 5.0]]);
    }
}
