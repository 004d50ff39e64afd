//! LoRA merged into the base weights at load time (peft 0.9 layout), so
//! inference costs what a plain UNet/VAE costs.
//!
//! Keys: `<module>.lora_A.<adapter>.weight` (Linear `[r,in]`, conv `[r,in,kh,kw]`)
//! and `<module>.lora_B.<adapter>.weight` (Linear `[out,r]`, conv `[out,r,1,1]`);
//! a fine-tuned base weight is stored as `<module>.base_layer.{weight,bias}` and
//! replaces the base file's. `lora_alpha` is not stored: it is peft's default 8,
//! so the scaling is 8 / rank. Merged weight: `W + scale * (B @ A)`.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::error::{EngineError, Result};
use super::weights::TensorFile;

/// peft's default `lora_alpha`.
pub const LORA_ALPHA: f64 = 8.0;

/// diffusers renamed the VAE attention projections; LoRA keys use the new names
/// while SD-2.1-base's file keeps the old ones. Lookups go through the new names.
fn canonical(module: &str) -> String {
    for (old, new) in [(".query", ".to_q"), (".key", ".to_k"), (".value", ".to_v"), (".proj_attn", ".to_out.0")] {
        if let Some(stem) = module.strip_suffix(old) {
            if stem.contains("attentions") {
                return format!("{stem}{new}");
            }
        }
    }
    module.to_string()
}

/// `W + scale * B @ A`, for Linear (`[out,in]`) and conv (`[out,in,kh,kw]`) weights.
pub fn merge_delta(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let r = a.dim(0)?;
    let out = b.dim(0)?;
    let b2 = b.reshape((out, r))?;
    let a2 = a.flatten_from(1)?;
    let delta = (b2.matmul(&a2)? * scale)?;
    w + delta.reshape(w.shape())?
}

/// The LoRA tensors of one model (one state dict of `codiff.pkl`).
pub struct LoraSet {
    pub path: PathBuf,
    pub rank: usize,
    pub scale: f64,
    /// canonical module name -> (A, B)
    pairs: HashMap<String, (Tensor, Tensor)>,
    /// canonical parameter name (`conv_in.weight`) -> fine-tuned base tensor
    overrides: HashMap<String, Tensor>,
}

impl LoraSet {
    /// Collect the pairs of `sd`; `rank` as stored in the file (`rank_unet`),
    /// otherwise read off the A matrices.
    pub fn from_state_dict(sd: &TensorFile, rank: Option<i64>) -> Result<Self> {
        let mut a_map = HashMap::new();
        let mut b_map = HashMap::new();
        let mut overrides = HashMap::new();
        for key in sd.keys() {
            if let Some((module, _)) = key.split_once(".lora_A.") {
                a_map.insert(canonical(module), key.clone());
            } else if let Some((module, _)) = key.split_once(".lora_B.") {
                b_map.insert(canonical(module), key.clone());
            } else if let Some((module, param)) = key.split_once(".base_layer.") {
                overrides.insert(format!("{}.{param}", canonical(module)), sd.get(key)?.clone());
            }
        }
        let mut pairs = HashMap::new();
        let mut found_rank = None;
        for (module, a_key) in &a_map {
            let b_key = b_map.get(module).ok_or_else(|| EngineError::MissingTensor {
                path: sd.path.clone(),
                key: a_key.replace(".lora_A.", ".lora_B."),
            })?;
            let a = sd.get(a_key)?.clone();
            let b = sd.get(b_key)?.clone();
            let r = a.dim(0)?;
            if b.dims().len() < 2 || b.dim(1)? != r {
                return Err(EngineError::ShapeMismatch {
                    path: sd.path.clone(),
                    key: b_key.clone(),
                    expected: vec![b.dims().first().copied().unwrap_or(0), r],
                    found: b.dims().to_vec(),
                });
            }
            if let Some(fr) = found_rank {
                if fr != r {
                    return Err(EngineError::ShapeMismatch {
                        path: sd.path.clone(),
                        key: a_key.clone(),
                        expected: vec![fr, a.dims().get(1).copied().unwrap_or(0)],
                        found: a.dims().to_vec(),
                    });
                }
            }
            found_rank = Some(r);
            pairs.insert(module.clone(), (a, b));
        }
        let rank = match (rank, found_rank) {
            (Some(r), Some(fr)) if r as usize != fr => {
                return Err(EngineError::Format {
                    path: sd.path.clone(),
                    reason: format!("stored rank {r} but LoRA matrices have rank {fr}"),
                })
            }
            (Some(r), _) => r as usize,
            (None, Some(fr)) => fr,
            (None, None) => 1,
        };
        Ok(Self { path: sd.path.clone(), rank, scale: LORA_ALPHA / rank as f64, pairs, overrides })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// A `VarBuilder` backend over a base weights file with a LoRA set merged in.
/// The first typed error it meets is kept, so that a model constructor's
/// candle error can be turned back into an [`EngineError`] naming the key.
pub struct MergedBackend {
    /// Base tensors; a merged weight replaces its base tensor here, so the
    /// unmerged copy is freed and a second request (candle's loaders probe
    /// shapes) gets the same merged tensor.
    base: Mutex<TensorFile>,
    merged: Mutex<std::collections::HashSet<String>>,
    base_path: PathBuf,
    lora: Option<LoraSet>,
    used_lora: Mutex<usize>,
    last_error: Mutex<Option<EngineError>>,
}

impl MergedBackend {
    pub fn new(base: TensorFile, lora: Option<LoraSet>) -> Self {
        Self {
            base_path: base.path.clone(),
            base: Mutex::new(base),
            merged: Mutex::new(Default::default()),
            lora,
            used_lora: Mutex::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// The typed error behind a failed build: the last one the backend saw
    /// (earlier ones may be shape probes that the loader recovered from).
    pub fn take_error(&self) -> Option<EngineError> {
        self.last_error.lock().ok()?.take()
    }

    /// Number of LoRA pairs that were merged into requested weights.
    pub fn merged_count(&self) -> usize {
        self.used_lora.lock().map(|n| *n).unwrap_or(0)
    }

    fn lookup(&self, name: &str, expected: Option<&[usize]>) -> Result<Tensor> {
        let canon = match name.rsplit_once('.') {
            Some((module, param)) => format!("{}.{param}", canonical(module)),
            None => name.to_string(),
        };
        let over = self.lora.as_ref().and_then(|l| l.overrides.get(&canon));
        let poisoned = || EngineError::Unsupported("weights lock poisoned".into());
        let already = self.merged.lock().map_err(|_| poisoned())?.contains(name);
        let w = match over {
            Some(t) if !already => t.clone(),
            _ => self.base.lock().map_err(|_| poisoned())?.get(name)?.clone(),
        };
        if let Some(shape) = expected {
            if w.dims() != shape {
                return Err(EngineError::ShapeMismatch {
                    path: if over.is_some() {
                        self.lora.as_ref().map(|l| l.path.clone()).unwrap_or_default()
                    } else {
                        self.base_path.clone()
                    },
                    key: name.to_string(),
                    expected: shape.to_vec(),
                    found: w.dims().to_vec(),
                });
            }
        }
        if let (Some(lora), Some(module)) = (&self.lora, canon.strip_suffix(".weight")) {
            if let Some((a, b)) = lora.pairs.get(module) {
                let ok = a.dims().len() == w.dims().len()
                    && b.dim(0).ok() == w.dims().first().copied()
                    && a.dims()[1..] == w.dims()[1..];
                if !ok {
                    return Err(EngineError::ShapeMismatch {
                        path: lora.path.clone(),
                        key: format!("{module}.lora_A"),
                        expected: [&[lora.rank][..], &w.dims()[1..]].concat(),
                        found: a.dims().to_vec(),
                    });
                }
                if already {
                    return Ok(w);
                }
                if let Ok(mut n) = self.used_lora.lock() {
                    *n += 1;
                }
                let m = merge_delta(&w, a, b, lora.scale)?;
                self.base.lock().map_err(|_| poisoned())?.replace(name, m.clone());
                self.merged.lock().map_err(|_| poisoned())?.insert(name.to_string());
                return Ok(m);
            }
        }
        Ok(w)
    }

    fn record(&self, e: EngineError) -> candle_core::Error {
        let msg = e.to_string();
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(e);
        }
        candle_core::Error::Msg(msg)
    }
}

impl SimpleBackend for MergedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.lookup(name, Some(s.dims())) {
            Ok(t) => t.to_dtype(dtype)?.to_device(dev),
            Err(e) => Err(self.record(e)),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.lookup(name, None) {
            Ok(t) => t.to_dtype(dtype)?.to_device(dev),
            Err(e) => Err(self.record(e)),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.lock().map(|b| b.contains(name)).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_merge_is_w_plus_scaled_ba() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 0.], [0., 1.], [2., 2.]], &dev).unwrap(); // [3,2]
        let a = Tensor::new(&[[1f32, 2.]], &dev).unwrap(); // [1,2]
        let b = Tensor::new(&[[1f32], [0.], [-1.]], &dev).unwrap(); // [3,1]
        let m = merge_delta(&w, &a, &b, 0.5).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, vec![vec![1.5, 1.0], vec![0., 1.], vec![1.5, 1.0]]);
    }

    #[test]
    fn conv_merge_matches_sequential_convs() {
        // conv_B(1x1)(conv_A(kxk)(x)) == conv_{merged delta}(x)
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (2, 3, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., (4, 2, 1, 1), &dev).unwrap();
        let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 3, 8, 8), &dev).unwrap();
        let seq = x.conv2d(&a, 1, 1, 1, 1).unwrap().conv2d(&b, 0, 1, 1, 1).unwrap();
        let merged = merge_delta(&w, &a, &b, 1.0).unwrap();
        let one = x.conv2d(&merged, 1, 1, 1, 1).unwrap();
        let err = (seq - one).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-4, "{err}");
    }

    #[test]
    fn old_attention_names_map_to_new() {
        assert_eq!(canonical("encoder.mid_block.attentions.0.query"), "encoder.mid_block.attentions.0.to_q");
        assert_eq!(canonical("encoder.mid_block.attentions.0.proj_attn"), "encoder.mid_block.attentions.0.to_out.0");
        assert_eq!(canonical("down_blocks.0.resnets.0.conv1"), "down_blocks.0.resnets.0.conv1");
    }
}
