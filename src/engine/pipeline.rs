//! Engine: loads a model once, restores frames.
//!
//! `Mode::Cave`: CaVE's reconstruction branch (compact default model).
//! `Mode::Diffusion`: VAE encode (posterior mean) -> proj(CaVE tokens) -> UNet
//! at t = 499 (latent tiles) -> x0 step -> VAE decode -> clamp -> colour fix.
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::cave::{Cave, Steer};
use super::kernels::{build_with, simd_fn, Math};
use super::layers::{self, Linear};
use super::lora::{LoraSet, MergedBackend};
use super::one_step::{x0_step, Schedule, TIMESTEP};
use super::unet::{UNet, UNetConfig};
use super::vae::{VaeConfig, VaeDecoder, VaeEncoder};
use super::weights::TensorFile;
use super::*;

/// Transform `t` (0..8) of the dihedral group on `[B,C,H,W]`: bit 0 flips
/// the width, bit 1 the height, bit 2 transposes; `inverse` undoes it.
fn dihedral(x: &Tensor, t: u8, inverse: bool) -> Result<Tensor> {
    // candle's flip (index-select) needs a contiguous input
    let mut x = x.contiguous()?;
    if inverse && t & 4 != 0 {
        x = x.transpose(2, 3)?.contiguous()?;
    }
    if t & 1 != 0 {
        x = x.flip(&[3])?;
    }
    if t & 2 != 0 {
        x = x.flip(&[2])?;
    }
    if !inverse && t & 4 != 0 {
        x = x.transpose(2, 3)?.contiguous()?;
    }
    Ok(x)
}

/// Named intermediates of one restoration (the fixture manifest's names).
pub type Trace = Vec<(String, Tensor)>;

/// Time and work of each stage of one restoration.
pub type StageTimes = Vec<StageTime>;

/// One stage of a timed restore.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTime {
    pub stage: &'static str,
    /// Wall time (s).
    pub secs: f64,
    /// Floating-point operations of its convolutions, attention and linear
    /// layers ([`super::kernels::flops`]; CPU f32 kernels; exact when one
    /// restore runs in the process at a time).
    pub flops: u64,
    /// Of `secs`, the time in convolutions, attention and linear layers
    /// ([`super::kernels::op_nanos`]; the rest: norms, element-wise work,
    /// copies, colour conversion).
    pub op_secs: [f64; 3],
}

/// Collects intermediates (when tracing) and per-stage times.
struct Probe<'a> {
    trace: Option<&'a mut Trace>,
    times: StageTimes,
    t: std::time::Instant,
    /// The FLOP counter and the op times at the last lap.
    f: u64,
    ops: [u64; 3],
    device: Device,
    cancel: super::Cancel,
}

impl<'a> Probe<'a> {
    fn new(trace: Option<&'a mut Trace>, device: &Device, cancel: &super::Cancel) -> Self {
        Probe {
            trace,
            times: vec![],
            t: std::time::Instant::now(),
            f: super::kernels::flops(),
            ops: super::kernels::op_nanos(),
            device: device.clone(),
            cancel: cancel.clone(),
        }
    }

    /// Add `times` (another probe's stages) to this probe's, stage by stage.
    fn add_times(&mut self, times: StageTimes) {
        for t in times {
            match self.times.iter_mut().find(|e| e.stage == t.stage) {
                Some(e) => {
                    e.secs += t.secs;
                    e.flops += t.flops;
                    for (a, b) in e.op_secs.iter_mut().zip(t.op_secs) {
                        *a += b;
                    }
                }
                None => self.times.push(t),
            }
        }
    }

    fn keep(&mut self, name: &str, t: &Tensor) {
        if let Some(tr) = self.trace.as_deref_mut() {
            tr.push((name.to_string(), t.clone()));
        }
    }

    fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// Close the current stage (waiting for the device, so times are real);
    /// `Err(Cancelled)` when the host asked to stop.
    fn lap(&mut self, stage: &'static str) -> Result<()> {
        let _ = self.device.synchronize();
        let now = std::time::Instant::now();
        let (f, ops) = (super::kernels::flops(), super::kernels::op_nanos());
        let op_secs = [0, 1, 2].map(|k| ops[k].saturating_sub(self.ops[k]) as f64 / 1e9);
        self.times.push(StageTime {
            stage,
            secs: (now - self.t).as_secs_f64(),
            flops: f.saturating_sub(self.f),
            op_secs,
        });
        (self.t, self.f, self.ops) = (now, f, ops);
        self.cancel.check()
    }
}

struct Diffusion {
    encoder: VaeEncoder,
    decoder: VaeDecoder,
    unet: UNet,
    proj: Linear,
    vae: VaeConfig,
    alpha_bar: f64,
    dtype: DType,
    /// the VAE's dead activations, for the next frame's outputs
    spare: std::sync::Mutex<super::kernels::Spare>,
}

pub struct Engine {
    mode: Mode,
    cave: Cave,
    diffusion: Option<Diffusion>,
    device: Device,
    precision: Precision,
    /// the guard's colour planes, kept for the next frame
    planes: std::sync::Arc<super::guard::Spare>,
}

fn device_of(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| {
            EngineError::Device(format!(
                "cuda:{n} unavailable ({e}); build with `--features cuda` on a CUDA machine, or use device=cpu"
            ))
        }),
    }
}

/// The dtype the UNet and VAE hold their tensors in. bf16 on the CPU keeps
/// f32 tensors and multiplies in bf16 ([`math_of`]).
fn dtype_of(p: Precision, dev: &Device) -> Result<DType> {
    Ok(match (p, dev.is_cpu()) {
        (Precision::Auto, true) | (Precision::F32, _) | (Precision::Bf16, true) => DType::F32,
        (Precision::Auto, false) | (Precision::F16, _) => DType::F16,
        (Precision::Bf16, false) => DType::BF16,
    })
}

/// The arithmetic of the CPU kernels' dot products: bf16 operands with f32
/// sums for `precision=bf16` on the CPU (AVX512_BF16 where the CPU has it,
/// emulated elsewhere), else f32.
fn math_of(p: Precision, dev: &Device) -> Math {
    if p == Precision::Bf16 && dev.is_cpu() {
        Math::Bf16
    } else {
        Math::F32
    }
}

/// Build a model through a LoRA-merging backend, turning candle's errors back
/// into the typed error that the backend recorded.
fn build<T>(
    base: TensorFile,
    lora: Option<LoraSet>,
    dtype: DType,
    dev: &Device,
    f: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<(T, usize)> {
    let backend = std::sync::Arc::new(MergedBackend::new(base, lora));
    let vb = VarBuilder::from_backend(Box::new(SharedBackend(backend.clone())), dtype, dev.clone());
    match f(vb) {
        Ok(m) => Ok((m, backend.merged_count())),
        Err(e) => Err(backend.take_error().unwrap_or(EngineError::Candle(e))),
    }
}

struct SharedBackend(std::sync::Arc<MergedBackend>);

impl candle_nn::var_builder::SimpleBackend for SharedBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// The diffusers weights file of a component folder (`unet/`, `vae/`).
fn component_weights(dir: &Path) -> Result<TensorFile> {
    for name in ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors"] {
        let p = dir.join(name);
        if p.exists() {
            return TensorFile::open(&p);
        }
    }
    Err(EngineError::NotFound { path: dir.join("diffusion_pytorch_model.safetensors") })
}

impl Engine {
    /// Load every file named by `spec`; `progress` receives human-readable steps.
    pub fn load(spec: &ModelSpec, progress: &mut dyn FnMut(&str)) -> Result<Engine> {
        let device = device_of(spec.device)?;
        let cave_path = spec.cave.as_deref().unwrap_or(&spec.weights);
        progress(&format!("loading CaVE from {}", cave_path.display()));
        // the compact model (mode=cave) takes the precision's arithmetic; the
        // diffusion path's CaVE stays f32 (its embedding conditions the UNet)
        let cave_math = if spec.mode == Mode::Cave { math_of(spec.precision, &device) } else { Math::F32 };
        let cave = build_with(cave_math, || Cave::load(&TensorFile::open(cave_path)?, &device))?;
        let diffusion = match spec.mode {
            Mode::Cave => None,
            Mode::Diffusion => Some(Self::load_diffusion(spec, &cave, &device, progress)?),
        };
        progress("ready");
        Ok(Engine { mode: spec.mode, cave, diffusion, device, precision: spec.precision, planes: Default::default() })
    }

    fn load_diffusion(
        spec: &ModelSpec,
        cave: &Cave,
        dev: &Device,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Diffusion> {
        let need = |o: &Option<std::path::PathBuf>, what: &str| {
            o.clone().ok_or_else(|| EngineError::InvalidInput(format!("diffusion mode needs {what}")))
        };
        let sd = need(&spec.sd_dir, "the SD-2.1-base folder (element property sd-model, restore --sd-dir)")?;
        let ckpt = need(&spec.codiff, "codiff.pkl (element property codiff-checkpoint, restore --codiff)")?;
        need(&spec.cave, "the official cave.pth (element property cave-checkpoint, restore --cave)")?;
        let dtype = dtype_of(spec.precision, dev)?;
        progress(&format!("loading LoRA and proj from {}", ckpt.display()));
        let pkl = TensorFile::open(&ckpt)?;
        let unet_lora = LoraSet::from_state_dict(&pkl.sub("state_dict_unet"), pkl.int("rank_unet"))?;
        let vae_lora = LoraSet::from_state_dict(&pkl.sub("state_dict_vae"), pkl.int("rank_vae"))?;
        let unet_cfg = UNetConfig::from_json(&sd.join("unet").join("config.json"))?;
        let vae_cfg = VaeConfig::from_json(&sd.join("vae").join("config.json"))?;
        let sched_path = sd.join("scheduler").join("scheduler_config.json");
        let schedule = if sched_path.exists() { Schedule::from_json(&sched_path)? } else { Schedule::sd21() };
        let c3 = cave.config.nc[3];
        let cross = unet_cfg.model.cross_attention_dim;
        let proj = Linear::new(
            pkl.get_shaped("proj.weight", &[cross, c3])?.to_device(dev)?,
            Some(pkl.get_shaped("proj.bias", &[cross])?.to_device(dev)?),
        )?;
        progress(&format!("loading VAE from {} (merging {} LoRA pairs)", sd.join("vae").display(), vae_lora.len()));
        let vae_file = component_weights(&sd.join("vae"))?;
        let n_vae_lora = vae_lora.len();
        let math = math_of(spec.precision, dev);
        let ((encoder, decoder), merged_vae) = build_with(math, || {
            build(vae_file, Some(vae_lora), dtype, dev, |vb| {
                Ok((VaeEncoder::new(&vae_cfg, vb.clone())?, VaeDecoder::new(&vae_cfg, vb)?))
            })
        })?;
        progress(&format!("loading UNet from {} (merging {} LoRA pairs)", sd.join("unet").display(), unet_lora.len()));
        let unet_file = component_weights(&sd.join("unet"))?;
        let n_unet_lora = unet_lora.len();
        let (unet, merged_unet) =
            build_with(math, || build(unet_file, Some(unet_lora), dtype, dev, |vb| UNet::new(vb, &unet_cfg)))?;
        // every LoRA pair must have found its base layer
        for (merged, total, what) in
            [(merged_vae, n_vae_lora, "state_dict_vae"), (merged_unet, n_unet_lora, "state_dict_unet")]
        {
            if merged < total {
                return Err(EngineError::Format {
                    path: ckpt.clone(),
                    reason: format!("{what}: only {merged} of {total} LoRA modules match a layer of the model"),
                });
            }
        }
        Ok(Diffusion {
            encoder,
            decoder,
            unet,
            proj,
            vae: vae_cfg,
            alpha_bar: schedule.alpha_bar(TIMESTEP),
            dtype,
            spare: Default::default(),
        })
    }

    /// An engine of the given architecture with random (or zero) weights: the
    /// full-size CODiff for benchmarks and shape tests without downloads.
    /// `diffusion` = None builds a CaVE-only engine.
    pub fn synthetic(
        cave: super::cave::CaveConfig,
        diffusion: Option<(UNetConfig, VaeConfig)>,
        device: DeviceSpec,
        precision: Precision,
        zeros: bool,
    ) -> Result<Engine> {
        let dev = device_of(device)?;
        let file = TensorFile::from_tensors(Path::new("<synthetic>"), super::cave::synthetic_tensors(cave, zeros)?);
        let cave_model = Cave::load(&file, &dev)?;
        let diffusion = match diffusion {
            None => None,
            Some((unet_cfg, vae_cfg)) => {
                let dtype = dtype_of(precision, &dev)?;
                let varmap = candle_nn::VarMap::new();
                let vb =
                    if zeros { VarBuilder::zeros(dtype, &dev) } else { VarBuilder::from_varmap(&varmap, dtype, &dev) };
                let (encoder, decoder, unet) = build_with(math_of(precision, &dev), || {
                    candle_core::Result::Ok((
                        VaeEncoder::new(&vae_cfg, vb.pp("vae"))?,
                        VaeDecoder::new(&vae_cfg, vb.pp("vae"))?,
                        UNet::new(vb.pp("unet"), &unet_cfg)?,
                    ))
                })?;
                let proj = layers::linear(
                    cave.nc[3],
                    unet_cfg.model.cross_attention_dim,
                    vb.pp("proj").set_dtype(DType::F32),
                )?;
                Some(Diffusion {
                    encoder,
                    decoder,
                    unet,
                    proj,
                    vae: vae_cfg,
                    alpha_bar: Schedule::sd21().alpha_bar(TIMESTEP),
                    dtype,
                    spare: Default::default(),
                })
            }
        };
        let mode = if diffusion.is_some() { Mode::Diffusion } else { Mode::Cave };
        Ok(Engine { mode, cave: cave_model, diffusion, device: dev, precision, planes: Default::default() })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `[1,3,H,W]` f32 in [0,1] on the engine's device.
    fn to_tensor(&self, img: &RgbImage) -> Result<Tensor> {
        if img.width == 0 || img.height == 0 || img.data.len() != img.width * img.height * 3 {
            return Err(EngineError::InvalidInput(format!(
                "image {}x{} with {} bytes",
                img.width,
                img.height,
                img.data.len()
            )));
        }
        if self.device.is_cpu() {
            // planar, the same arithmetic as candle's `t / 255.0` (PlanesOf)
            let (w, h) = (img.width, img.height);
            // the last frame's input buffer when the model kept one
            if let Some(t) = self.cave.spare(&[1, 3, h, w]) {
                t.inplace_op1(&PlanesOf(img))?;
                return Ok(t);
            }
            let mut planes = vec![0f32; 3 * w * h];
            PlanesOf(img).fill(&mut planes);
            return Ok(Tensor::from_vec(planes, (1, 3, h, w), &Device::Cpu)?);
        }
        let t = Tensor::from_slice(&img.data, (img.height, img.width, 3), &Device::Cpu)?
            .to_device(&self.device)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?;
        Ok((t / 255.0)?)
    }

    /// Write `[1,3,H,W]` in [0,1] back into `img`, rounding to the nearest code.
    fn write_back(img: &mut RgbImage, t: &Tensor) -> Result<()> {
        if t.device().is_cpu() && t.dtype() == DType::F32 && t.dims() == [1, 3, img.height, img.width] {
            // one pass over the (possibly cropped, strided) tensor: clamp,
            // x 255, + 0.5, floor, as the candle ops below
            let (storage, layout) = t.storage_and_layout();
            let data = match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v,
                _ => unreachable!("checked: f32 on the CPU"),
            };
            let (o, st) = (layout.start_offset(), layout.stride());
            let w = img.width;
            // rows on all threads; v >= 0.5, so the truncating cast is floor
            use rayon::prelude::*;
            img.data.par_chunks_exact_mut(3 * w).enumerate().for_each(|(y, row)| {
                let start = |c: usize| o + c * st[1] + y * st[2];
                if st[3] == 1 {
                    code_row([&data[start(0)..][..w], &data[start(1)..][..w], &data[start(2)..][..w]], row);
                    return;
                }
                for (c, plane) in (0..3).map(|c| (c, start(c))) {
                    for x in 0..w {
                        row[3 * x + c] = code(data[plane + x * st[3]]);
                    }
                }
            });
            return Ok(());
        }
        let bytes: Vec<u8> = ((t.clamp(0f32, 1f32)? * 255.0)? + 0.5)?
            .floor()?
            .squeeze(0)?
            .permute((1, 2, 0))?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        img.data.copy_from_slice(&bytes);
        Ok(())
    }

    fn check_finite(t: &Tensor, stage: &'static str, precision: Precision) -> Result<()> {
        if all_finite(t)? {
            Ok(())
        } else {
            Err(EngineError::NonFinite { stage, precision: format!("{precision:?}").to_lowercase() })
        }
    }

    /// Restore `img` in place; returns the QF estimate (0..100).
    pub fn restore(&self, img: &mut RgbImage, opts: &RestoreOptions) -> Result<f32> {
        Ok(self.run(img, opts, None)?.0.qf)
    }

    /// As [`Engine::restore`], saying what was done and where the quality came from.
    pub fn restore_report(&self, img: &mut RgbImage, opts: &RestoreOptions) -> Result<Restoration> {
        Ok(self.run(img, opts, None)?.0)
    }

    /// As [`Engine::restore`], pushing every intermediate into `trace` if given.
    pub fn restore_traced(&self, img: &mut RgbImage, opts: &RestoreOptions, trace: Option<&mut Trace>) -> Result<f32> {
        Ok(self.run(img, opts, trace)?.0.qf)
    }

    /// As [`Engine::restore`], also returning the seconds spent per stage.
    pub fn restore_timed(&self, img: &mut RgbImage, opts: &RestoreOptions) -> Result<(f32, StageTimes)> {
        let (r, times) = self.run(img, opts, None)?;
        Ok((r.qf, times))
    }

    /// `Err(NotEnoughMemory)` when a `width` x `height` frame would need more
    /// memory ([`super::memory::frame_bytes`], plus `host_bytes` the caller
    /// holds for it) than the process has left: refused before anything is
    /// allocated, where a failed allocation would abort the host.
    pub fn check_memory(&self, width: usize, height: usize, opts: &RestoreOptions, host_bytes: u64) -> Result<()> {
        let needed = super::memory::frame_bytes(width, height, opts.cave_tile, self.diffusion.is_some()) + host_bytes;
        match super::memory::available_bytes() {
            Some(available) if needed > available => Err(EngineError::NotEnoughMemory {
                width,
                height,
                needed_mb: needed >> 20,
                available_mb: available >> 20,
            }),
            _ => Ok(()),
        }
    }

    fn run(
        &self,
        img: &mut RgbImage,
        opts: &RestoreOptions,
        trace: Option<&mut Trace>,
    ) -> Result<(Restoration, StageTimes)> {
        let mut p = Probe::new(trace, &self.device, &opts.cancel);
        opts.cancel.check()?;
        self.check_memory(img.width, img.height, opts, 0)?;
        // do no harm: restore only what was decoded from a JPEG
        let analysis = if opts.guard { Some(super::guard::Analysis::of_in(img, &self.planes)) } else { None };
        let unchanged = |qf, qf_source| Restoration { qf, qf_source, restored: false, guarded_blocks: 0 };
        if analysis.as_ref().is_some_and(|a| a.evidence() == super::quant::Evidence::Unquantised) {
            p.lap("guard")?;
            return Ok((unchanged(100.0, QfSource::Unquantised), p.times));
        }
        let x = self.to_tensor(img)?;
        p.keep("lq_raw", &x);
        if let Some(a) = &analysis {
            p.lap("guard")?;
            if a.evidence() == super::quant::Evidence::Unknown {
                return Ok((unchanged(self.cave_qf(&x, opts)?, QfSource::Model), p.times));
            }
        }
        let measured = analysis.as_ref().and_then(|a| a.quality());
        let steer = match (opts.quality, measured) {
            (Some(q), _) => Steer::Told(q),
            (None, Some(m)) => Steer::Measured(m),
            (None, None) => Steer::Own,
        };
        // the share of the model's change the guard keeps; none: leave the frame
        let alpha = match &analysis {
            Some(a) => {
                let guide = match measured {
                    Some(q) => q,
                    None => self.cave_qf(&x, opts)?,
                };
                let alpha = a.profile().strength(guide);
                if alpha <= 0.0 {
                    let qf_source = if measured.is_some() { QfSource::Tables } else { QfSource::Model };
                    return Ok((unchanged(guide, qf_source), p.times));
                }
                alpha
            }
            None => 1.0,
        };
        let (y, q, full) = if opts.self_ensemble {
            let (y, q) = self.ensemble(&x, opts, steer, &mut p)?;
            (y, q, None)
        } else {
            self.restore_frame(&x, opts, steer, &mut p)?
        };
        Self::write_back(img, &y)?;
        drop(y);
        // the input and the model's output buffer serve the next frame
        // (unless a trace holds them)
        if !p.tracing() {
            self.cave.recycle(x);
            if let Some(full) = full {
                self.cave.recycle(full);
            }
        }
        let guarded_blocks = analysis.as_ref().map_or(0, |a| a.apply(img, alpha));
        p.lap("output")?;
        if let Some(tr) = p.trace.as_deref_mut() {
            let name = match (self.mode, opts.color_fix) {
                (Mode::Cave, _) => "output_cave",
                (Mode::Diffusion, ColorFix::Adain) => "output_adain",
                (Mode::Diffusion, ColorFix::Wavelet) => "output_wavelet",
                (Mode::Diffusion, ColorFix::None) => "output_nofix",
            };
            tr.push((name.to_string(), Tensor::from_slice(&img.data, (img.height, img.width, 3), &Device::Cpu)?));
        }
        let (qf, qf_source) = match measured {
            Some(q) => (q, QfSource::Tables),
            None => (self.cave.qf(q), QfSource::Model),
        };
        Ok((Restoration { qf, qf_source, restored: true, guarded_blocks }, p.times))
    }

    /// The restored frame `[1,3,H,W]` in [0,1] and CaVE's raw q for `x`,
    /// and the buffer behind the frame when it is the model's own (for
    /// [`Cave::recycle`] once the frame is dead).
    fn restore_frame(
        &self,
        x: &Tensor,
        opts: &RestoreOptions,
        steer: Steer,
        p: &mut Probe,
    ) -> Result<(Tensor, f32, Option<Tensor>)> {
        Ok(match &self.diffusion {
            None => {
                let (_, _, h, w) = x.dims4()?;
                let (full, q) = self.cave.reconstruct_padded(x, opts.cave_tile, &opts.cancel, steer)?;
                let y = full.narrow(2, 0, h)?.narrow(3, 0, w)?;
                p.keep("cave_reconstruction", &y);
                p.keep("qf_pred", &q);
                Self::check_finite(&y, "CaVE reconstruction", Precision::F32)?;
                p.lap("cave")?;
                (y, Cave::q_value(&q)?, Some(full))
            }
            Some(d) => {
                if p.tracing() {
                    p.keep(
                        "cave_reconstruction",
                        &self.cave.reconstruct_tiled(x, opts.cave_tile, &opts.cancel, steer)?.0,
                    );
                }
                let (y, q) = self.diffuse(d, x, opts, p)?;
                (y, q, None)
            }
        })
    }

    /// Geometric self-ensemble: the frame restored under each of the 8 flips
    /// and transposes, mapped back and averaged (q too). The frame is first
    /// replicate-padded to a multiple of 16 px, so JPEG's 8x8 blocks and 4:2:0
    /// macroblocks stay on their grid under every transform. Members are not
    /// traced; their stage times add up.
    fn ensemble(&self, x: &Tensor, opts: &RestoreOptions, steer: Steer, p: &mut Probe) -> Result<(Tensor, f32)> {
        let (_, _, h, w) = x.dims4()?;
        let xp = Cave::pad_to(x, 16)?;
        let (mut sum, mut q_sum) = (None::<Tensor>, 0f32);
        for t in 0..8u8 {
            let mut member = Probe::new(None, &p.device, &p.cancel);
            let (y, q, _) = self.restore_frame(&dihedral(&xp, t, false)?, opts, steer, &mut member)?;
            let y = dihedral(&y, t, true)?;
            sum = Some(match sum {
                None => y,
                Some(s) => (s + y)?,
            });
            q_sum += q;
            p.add_times(member.times);
        }
        (p.t, p.f, p.ops) = (std::time::Instant::now(), super::kernels::flops(), super::kernels::op_nanos());
        let y = (sum.expect("eight members") / 8.0)?.narrow(2, 0, h)?.narrow(3, 0, w)?;
        Ok((y, q_sum / 8.0))
    }

    fn diffuse(&self, d: &Diffusion, x: &Tensor, opts: &RestoreOptions, p: &mut Probe) -> Result<(Tensor, f32)> {
        let (_, _, h, w) = x.dims4()?;
        // the activations of the CaVE and the VAE, dead as their walks move
        // on, serve the next outputs (and the next frame's) instead of fresh
        // memory: the CaVE's go to the VAE encoder's first outputs
        let mut spare = std::mem::take(&mut *d.spare.lock().unwrap_or_else(|e| e.into_inner()));
        let dec = super::kernels::with_spare(&mut spare, || -> Result<(Tensor, Tensor)> {
            // 1. CaVE tokens -> proj, rounded to f16 as the official code does
            let (tokens, q) = self.cave.embed_tiled(x, opts.cave_tile, &opts.cancel)?;
            p.keep("cave_embedding", &tokens);
            p.keep("qf_pred", &q);
            let c = d.proj.forward(&tokens)?;
            p.keep("proj_embedding", &c);
            let c = c.to_dtype(DType::F16)?.to_dtype(d.dtype)?;
            p.lap("cave")?;
            Ok((self.diffuse_latent(d, x, &c, opts, p)?, q))
        });
        *d.spare.lock().unwrap_or_else(|e| e.into_inner()) = spare;
        let (dec, q) = dec?;
        let dec = dec.narrow(2, 0, h)?.narrow(3, 0, w)?;
        p.keep("decoded", &dec);
        p.lap("vae_decode")?;
        // 6. colour fix against the input
        let y = finish(&dec, x, opts.color_fix)?;
        p.lap("color_fix")?;
        let q = Cave::q_value(&q)?;
        Ok((y, q))
    }

    /// [`Engine::diffuse`]'s steps 2-5 on `x` with the UNet's context `c`:
    /// the decoded, clamped frame (padded).
    fn diffuse_latent(
        &self,
        d: &Diffusion,
        x: &Tensor,
        c: &Tensor,
        opts: &RestoreOptions,
        p: &mut Probe,
    ) -> Result<Tensor> {
        // 2. VAE posterior mean of the padded input in [-1,1]
        let m = d.vae.downscale();
        let xp = Cave::pad_to_min(x, m, 8 * m)?;
        let lq = ((xp * 2.0)? - 1.0)?.to_dtype(d.dtype)?;
        let z = d.encoder.encode_mean_tiled(&lq, opts.vae_encoder_tile, &opts.cancel)?;
        let z = (z * d.vae.scaling_factor)?;
        p.keep("lq_latent", &z);
        Self::check_finite(&z, "VAE encoder", self.precision)?;
        p.lap("vae_encode")?;
        // 3. UNet at t = 499, in Gaussian-weighted latent tiles
        let eps = super::tiling::gaussian_tiled(&z, opts.latent_tile, opts.latent_overlap, &opts.cancel, |zt| {
            Ok(d.unet.forward(zt, TIMESTEP as f64, c)?)
        })?;
        p.keep("unet_eps", &eps);
        Self::check_finite(&eps, "UNet", self.precision)?;
        // 4. one x0 step
        let z0 = x0_step(&z, &eps, d.alpha_bar)?;
        p.keep("denoised_latent", &z0);
        p.lap("unet")?;
        // 5. decode, clamp, crop
        let zs = (z0 / d.vae.scaling_factor)?;
        let dec = d.decoder.decode_tiled(&zs, opts.vae_decoder_tile, &opts.cancel)?.to_dtype(DType::F32)?;
        Self::check_finite(&dec, "VAE decoder", self.precision)?;
        Ok(dec.clamp(-1f32, 1f32)?)
    }

    /// The JPEG quality of `img` and where it comes from: read from the
    /// quantisation steps of a decoded JPEG ([`super::guard::Analysis::quality`]),
    /// 100 for a frame with detail and no quantisation, else CaVE's estimate
    /// (in `opts.cave_tile` tiles, cancellable).
    pub fn estimate_quality(&self, img: &RgbImage, opts: &RestoreOptions) -> Result<(f32, QfSource)> {
        let a = super::guard::Analysis::of_in(img, &self.planes);
        if let Some(q) = a.quality() {
            return Ok((q, QfSource::Tables));
        }
        if a.evidence() == super::quant::Evidence::Unquantised {
            return Ok((100.0, QfSource::Unquantised));
        }
        Ok((self.estimate_qf(img, opts)?, QfSource::Model))
    }

    /// CaVE's JPEG quality estimate (0..100) for `img` (in `opts.cave_tile`
    /// tiles, cancellable).
    pub fn estimate_qf(&self, img: &RgbImage, opts: &RestoreOptions) -> Result<f32> {
        self.cave_qf(&self.to_tensor(img)?, opts)
    }

    /// CaVE's JPEG quality estimate (0..100) for the frame tensor `x`
    /// (encoder only).
    fn cave_qf(&self, x: &Tensor, opts: &RestoreOptions) -> Result<f32> {
        let (_, q) = self.cave.embed_tiled(x, opts.cave_tile, &opts.cancel)?;
        Ok(self.cave.qf(Cave::q_value(&q)?))
    }

    /// The diffusion stages one by one (parity tests feed each stage the
    /// reference's own input); None in CaVE mode.
    pub fn stages(&self) -> Option<Stages<'_>> {
        self.diffusion.as_ref().map(|d| Stages { d })
    }

    /// CaVE's visual embedding and q for `img` (for inspection and tests).
    /// The smallest `cave_tile` (other than 0) this engine's mode accepts:
    /// the embedding's minimum in diffusion mode, the reconstruction's in
    /// cave mode.
    pub fn min_cave_tile(&self) -> usize {
        match self.mode {
            Mode::Cave => self.cave.min_reconstruct_tile(),
            Mode::Diffusion => self.cave.min_tile(),
        }
    }

    pub fn cave(&self) -> &Cave {
        &self.cave
    }
}

/// Decoded image in [-1,1] -> final image in [0,1], colour-fixed against
/// `source` ([0,1]). The reference fixes the 8-bit image (truncated), and the
/// fix's std ratio amplifies that quantisation, so do the same; both fixes
/// re-anchor the mean, so the truncation adds no bias.
pub fn finish(decoded: &Tensor, source: &Tensor, fix: ColorFix) -> Result<Tensor> {
    let img = ((decoded.to_dtype(DType::F32)? + 1.0)? * 0.5)?.clamp(0f32, 1f32)?;
    Ok(match fix {
        ColorFix::None => img,
        fix => {
            let q8 = ((img * 255.0)?.floor()? / 255.0)?;
            super::color_fix::apply(fix, &q8, source)?
        }
    })
}

/// Single stages of the diffusion path, in the model's dtype.
pub struct Stages<'a> {
    d: &'a Diffusion,
}

impl Stages<'_> {
    /// `proj(tokens)` in f32.
    pub fn proj(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(self.d.proj.forward(tokens)?)
    }

    /// Scaled posterior mean of `lq` in [-1,1].
    pub fn encode(&self, lq: &Tensor) -> Result<Tensor> {
        Ok((self.d.encoder.encode_mean(&lq.to_dtype(self.d.dtype)?)? * self.d.vae.scaling_factor)?)
    }

    /// The UNet's noise prediction at t = 499.
    pub fn unet(&self, z: &Tensor, c: &Tensor) -> Result<Tensor> {
        Ok(self.d.unet.forward(&z.to_dtype(self.d.dtype)?, TIMESTEP as f64, &c.to_dtype(self.d.dtype)?)?)
    }

    pub fn x0(&self, z: &Tensor, eps: &Tensor) -> Result<Tensor> {
        Ok(x0_step(z, eps, self.d.alpha_bar)?)
    }

    /// Clamped decoded image in [-1,1] from a scaled latent.
    pub fn decode(&self, z0: &Tensor) -> Result<Tensor> {
        self.decode_tiled(z0, 0)
    }

    /// [`Stages::encode`] through the official VAEHook tiling (`tile` image px).
    pub fn encode_tiled(&self, lq: &Tensor, tile: usize) -> Result<Tensor> {
        Ok((self.d.encoder.encode_mean_tiled(&lq.to_dtype(self.d.dtype)?, tile, &Cancel::new())?
            * self.d.vae.scaling_factor)?)
    }

    /// [`Stages::decode`] through the official VAEHook tiling (`tile` latent px).
    pub fn decode_tiled(&self, z0: &Tensor, tile: usize) -> Result<Tensor> {
        let z = (z0.to_dtype(self.d.dtype)? / self.d.vae.scaling_factor)?;
        Ok(self.d.decoder.decode_tiled(&z, tile, &Cancel::new())?.clamp(-1f32, 1f32)?)
    }
}

/// A value in [0,1] as an 8-bit code: clamp, x 255, + 0.5, floor (the
/// truncating cast, as the value is >= 0.5).
#[inline(always)]
fn code(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

simd_fn! {
    /// One row of [`Engine::write_back`] from contiguous R, G, B rows.
    fn code_row(planes: [&[f32]; 3], row: &mut [u8]) {
        let [r, g, b] = planes;
        for (((px, &r), &g), &b) in row.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
            (px[0], px[1], px[2]) = (code(r), code(g), code(b));
        }
    }
}

/// An RGB image as the model's input: planar R, G, B in [0,1], written into
/// a `[1,3,H,W]` f32 buffer (`inplace_op1`).
struct PlanesOf<'a>(&'a RgbImage);

impl PlanesOf<'_> {
    /// One pass, rows on all threads, the same arithmetic as candle's
    /// `t / 255.0` (a multiply by the f32 reciprocal).
    fn fill(&self, planes: &mut [f32]) {
        use rayon::prelude::*;
        let (img, inv) = (self.0, (1.0f64 / 255.0) as f32);
        let (w, n) = (img.width, img.width * img.height);
        let (r, gb) = planes.split_at_mut(n);
        let (g, b) = gb.split_at_mut(n);
        (r.par_chunks_exact_mut(w), g.par_chunks_exact_mut(w), b.par_chunks_exact_mut(w))
            .into_par_iter()
            .zip(img.data.par_chunks_exact(3 * w))
            .for_each(|((r, g, b), row)| {
                for (i, px) in row.chunks_exact(3).enumerate() {
                    r[i] = px[0] as f32 * inv;
                    g[i] = px[1] as f32 * inv;
                    b[i] = px[2] as f32 * inv;
                }
            });
    }
}

impl candle_core::InplaceOp1 for PlanesOf<'_> {
    fn name(&self) -> &'static str {
        "codiff-planes-of-rgb"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
        let n = 3 * self.0.width * self.0.height;
        match (s, l.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(d), Some((a, b))) if b - a == n => {
                self.fill(&mut d[a..b]);
                Ok(())
            }
            _ => candle_core::bail!(
                "planes of a {}x{} image: a contiguous f32 buffer of {n} expected",
                self.0.width,
                self.0.height
            ),
        }
    }
}

/// Whether every value of `t` is finite. f32 CPU tensors (contiguous, or
/// rows of a cropped `[B,C,H,W]`) are scanned in place: candle's `sum_all`
/// on a cropped frame walks it element by element with an index division
/// each (20 ms, 6 % of a 720p frame on the compact model); other tensors
/// are summed (a non-finite value makes the sum non-finite).
fn all_finite(t: &Tensor) -> Result<bool> {
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage {
            let finite = |s: &[f32]| s.iter().all(|x| x.is_finite());
            if let Some((a, b)) = layout.contiguous_offsets() {
                return Ok(finite(&v[a..b]));
            }
            if let ([b, c, h, w], [sb, sc, sh, 1]) = (layout.dims(), layout.stride()) {
                let o = layout.start_offset();
                return Ok(
                    (0..*b).all(|i| (0..*c).all(|j| (0..*h).all(|y| finite(&v[o + i * sb + j * sc + y * sh..][..*w]))))
                );
            }
        }
    }
    Ok(t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The input, output and guard buffers a frame leaves for the next one
    /// carry nothing over: frames of sizes on and off the 32-pixel grid,
    /// guard on and off, restored in one order and then in the reverse
    /// order, come out the same, and the buffers are kept.
    #[test]
    fn kept_buffers_carry_nothing_into_the_next_frame() {
        let cfg = super::super::cave::CaveConfig { nc: [4, 8, 8, 8], nb: 1 };
        let engine = Engine::synthetic(cfg, None, DeviceSpec::Cpu, Precision::F32, false).unwrap();
        let frames: Vec<_> =
            [(96, 64, 7, false), (96, 64, 13, false), (50, 40, 7, false), (50, 40, 31, true), (50, 40, 5, false)]
                .into_iter()
                .map(|(w, h, seed, guard)| {
                    let data = (0..w * h * 3).map(|i| ((i * seed + i / 7) % 251) as u8).collect();
                    (RgbImage::new(w, h, data).unwrap(), guard)
                })
                .collect();
        let restore = |(img, guard): &(RgbImage, bool)| {
            let mut out = img.clone();
            engine.restore(&mut out, &RestoreOptions { guard: *guard, ..Default::default() }).unwrap();
            out
        };
        let first: Vec<_> = frames.iter().map(restore).collect();
        assert!(first[0] != frames[0].0, "the model changes a frame");
        assert!(engine.cave.spare(&[1, 3, 40, 50]).is_some(), "the last input's buffer is kept");
        assert!(engine.cave.spare(&[1, 3, 64, 64]).is_some(), "and its output's");
        assert!(engine.cave.spare(&[1, 3, 64, 96]).is_none(), "nothing of another size is");
        for (i, f) in frames.iter().enumerate().rev() {
            assert!(restore(f) == first[i], "frame {i} restored again differs");
        }
    }

    #[test]
    fn all_finite_sees_only_the_tensors_own_values() {
        let mut v = vec![0.5f32; 2 * 3 * 5 * 7];
        v[(3 + 1) * 35 + 4 * 7 + 6] = f32::NAN; // image 1, channel 1, row 4, column 6
        let t = Tensor::from_vec(v, (2, 3, 5, 7), &Device::Cpu).unwrap();
        assert!(!all_finite(&t).unwrap(), "contiguous");
        assert!(!all_finite(&t.narrow(2, 1, 4).unwrap().narrow(3, 2, 5).unwrap()).unwrap(), "cropped around it");
        assert!(all_finite(&t.narrow(2, 0, 4).unwrap()).unwrap(), "cropped off (row)");
        assert!(all_finite(&t.narrow(3, 0, 6).unwrap()).unwrap(), "cropped off (column)");
        assert!(all_finite(&t.narrow(0, 0, 1).unwrap()).unwrap(), "other image");
        assert!(!all_finite(&t.to_dtype(DType::F16).unwrap()).unwrap(), "f16 (summed)");
        let inf = Tensor::new(&[1f32, f32::INFINITY], &Device::Cpu).unwrap();
        assert!(!all_finite(&inf).unwrap());
    }
}
