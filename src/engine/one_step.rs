//! The one-step restoration: the UNet predicts the noise of the compressed
//! image's latent as if it were at t = 499, and one DDPM x0 step removes it.
use std::path::Path;

use candle_core::Tensor;

use super::config::{json_usize, read_json};
use super::error::{EngineError, Result};

/// The fixed timestep of CODiff's one-step restorer.
pub const TIMESTEP: usize = 499;

/// Most `num_train_timesteps` a scheduler config may ask for (SD uses 1,000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// DDPM noise schedule (`scheduler/scheduler_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub alphas_cumprod: Vec<f64>,
}

impl Schedule {
    pub fn new(beta_start: f64, beta_end: f64, steps: usize, scaled_linear: bool) -> Self {
        let betas: Vec<f64> = (0..steps)
            .map(|i| {
                let t = if steps > 1 { i as f64 / (steps - 1) as f64 } else { 0.0 };
                if scaled_linear {
                    let b = beta_start.sqrt() + t * (beta_end.sqrt() - beta_start.sqrt());
                    b * b
                } else {
                    beta_start + t * (beta_end - beta_start)
                }
            })
            .collect();
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self { alphas_cumprod }
    }

    /// SD-2.1's schedule: scaled-linear betas 0.00085..0.012 over 1000 steps.
    pub fn sd21() -> Self {
        Self::new(0.00085, 0.012, 1000, true)
    }

    pub fn from_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let f = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let kind = v.get("beta_schedule").and_then(|x| x.as_str()).unwrap_or("scaled_linear");
        if kind != "scaled_linear" && kind != "linear" {
            return Err(EngineError::Config {
                path: path.to_path_buf(),
                reason: format!("beta_schedule `{kind}` not supported"),
            });
        }
        if let Some(p) = v.get("prediction_type").and_then(|x| x.as_str()) {
            if p != "epsilon" {
                return Err(EngineError::Config {
                    path: path.to_path_buf(),
                    reason: format!("prediction_type `{p}`: CODiff needs epsilon"),
                });
            }
        }
        let bad = |reason: String| Err(EngineError::Config { path: path.to_path_buf(), reason });
        // the schedule is computed for every step: bounded, as no weights stand behind it
        let steps = json_usize(&v, "num_train_timesteps", Some(1000), path)?;
        if !(TIMESTEP < steps && steps <= MAX_TRAIN_TIMESTEPS) {
            return bad(format!("`num_train_timesteps` is {steps}: CODiff needs t = {TIMESTEP}, at most {MAX_TRAIN_TIMESTEPS} are accepted"));
        }
        let (b0, b1) = (f("beta_start", 0.00085), f("beta_end", 0.012));
        if !(b0 > 0.0 && b0 <= b1 && b1 < 1.0) {
            return bad(format!("betas {b0}..{b1}: expected 0 < beta_start <= beta_end < 1"));
        }
        Ok(Self::new(b0, b1, steps, kind == "scaled_linear"))
    }

    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }
}

/// `z0 = (z - sqrt(1 - a) * eps) / sqrt(a)`, a = alpha_bar(t).
pub fn x0_step(z: &Tensor, eps: &Tensor, alpha_bar: f64) -> candle_core::Result<Tensor> {
    (z - (eps * (1.0 - alpha_bar).sqrt())?)? / alpha_bar.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_bar_499_matches_diffusers() {
        let a = Schedule::sd21().alpha_bar(TIMESTEP);
        assert!((a - 0.27766943).abs() < 1e-6, "{a}");
    }
}
