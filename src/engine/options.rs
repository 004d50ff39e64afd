//! Per-call options of a restore: [`RestoreOptions`] (tiles, colour fix,
//! quality, guard) with the [`Cancel`] token every stage checks, and the
//! clamps that keep tile sizes where the engine handles them well.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{ColorFix, EngineError, Result};

/// A flag the host raises to stop a restore early. The engine checks it
/// between stages and between tiles and then returns
/// [`EngineError::Cancelled`], so a flush or a state change never waits for
/// a whole large frame. Clones share the flag. It also carries the host's
/// optional progress observer ([`Cancel::with_progress`]), told after each
/// group of tiles, so a long frame (a 4K diffusion restore runs for many
/// minutes on a CPU) shows how far it got.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>, Option<Arc<ProgressFn>>);

/// `(done, total)` tiles of the tiling pass under way.
pub type ProgressFn = dyn Fn(usize, usize) + Send + Sync;

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cancel").field(&self.is_cancelled()).field(&self.1.is_some()).finish()
    }
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    /// This token with `f` told the progress of every tiled pass.
    pub fn with_progress(mut self, f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        self.1 = Some(Arc::new(f));
        self
    }
    /// Tell the observer, if any, that `done` of `total` tiles are done.
    pub fn progress(&self, done: usize, total: usize) {
        if let Some(f) = &self.1 {
            f(done, total);
        }
    }
    /// Ask every restore that holds a clone of this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Lower the flag again (before the next frame).
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Cancelled)` once the flag is raised: call between stages and tiles.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(EngineError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Tokens compare equal when they share one flag.
impl PartialEq for Cancel {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Per-call settings that need no reload.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreOptions {
    pub color_fix: ColorFix,
    /// Latent tile side (latent pixels, 1/8 of image pixels); 0 = never tile.
    pub latent_tile: usize,
    pub latent_overlap: usize,
    /// VAE encoder tile side in image pixels (the official
    /// `vae_encoder_tiled_size`, default 1024). 0 = never tile.
    pub vae_encoder_tile: usize,
    /// VAE decoder tile side in latent pixels (the official
    /// `vae_decoder_tiled_size`, default 224). 0 = never tile.
    pub vae_decoder_tile: usize,
    /// Largest CaVE tile side in image pixels (diffusion mode's embedding, the
    /// QF estimate and `Mode::Cave`'s reconstruction): larger frames run in
    /// tiles whose margins make the stitched result equal the whole-frame one
    /// (reconstruction needs at least `2 * Cave::reconstruct_margin() + 32`:
    /// 800 px for the compact model). 0 = never tile.
    pub cave_tile: usize,
    /// `Mode::Cave` with a quality-conditioned model: restore as if the JPEG
    /// quality were this (0..100; lower smooths more). None: the model's own
    /// estimate. Unconditioned models (official `cave.pth`) ignore it.
    pub quality: Option<f32>,
    /// Geometric self-ensemble: restore under the 8 flips and transposes and
    /// average (8x the time; for stills). Off by default.
    pub self_ensemble: bool,
    /// Do no harm ([`guard`]): restore only frames whose pixels show they were
    /// decoded from a JPEG (others are left exactly as they are), tell a
    /// quality-conditioned model the quality read from the frame's
    /// quantisation steps, and keep the result within the JPEG's quantisation
    /// intervals. On by default; off reproduces the bare model (parity with
    /// the official code).
    pub guard: bool,
    /// Checked between stages and tiles; raise it to stop this restore.
    pub cancel: Cancel,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            color_fix: ColorFix::Adain,
            latent_tile: 96,
            latent_overlap: 32,
            vae_encoder_tile: 1024,
            vae_decoder_tile: 224,
            cave_tile: 2048,
            quality: None,
            self_ensemble: false,
            guard: true,
            cancel: Cancel::default(),
        }
    }
}

/// The smallest latent tile [`RestoreOptions::clamped`] lets through
/// (latent pixels): smaller tiles mean thousands of small UNet calls.
pub const MIN_LATENT_TILE: usize = 32;

impl RestoreOptions {
    /// These options with the tile sizes moved into what the engine handles
    /// well, and one line per change for the host to show: `latent_tile`
    /// at least [`MIN_LATENT_TILE`], `latent_overlap` at most half the latent
    /// tile, `cave_tile` at least `min_cave_tile` (the loaded CaVE's
    /// [`super::Engine::min_cave_tile`]; None: unchecked). 0 (never tile)
    /// stays 0.
    pub fn clamped(&self, min_cave_tile: Option<usize>) -> (RestoreOptions, Vec<String>) {
        let mut warnings = Vec::new();
        let mut o = self.clone();
        if o.latent_tile > 0 && o.latent_tile < MIN_LATENT_TILE {
            warnings.push(format!(
                "latent-tile {} is below {MIN_LATENT_TILE} latent px (thousands of small UNet calls): using {MIN_LATENT_TILE}",
                o.latent_tile
            ));
            o.latent_tile = MIN_LATENT_TILE;
        }
        if o.latent_tile > 0 && o.latent_overlap > o.latent_tile / 2 {
            warnings.push(format!(
                "latent-overlap {} is more than half of latent-tile {} (tiles would advance by {} latent px): using {}",
                o.latent_overlap,
                o.latent_tile,
                o.latent_tile.saturating_sub(o.latent_overlap).max(1),
                o.latent_tile / 2
            ));
            o.latent_overlap = o.latent_tile / 2;
        }
        if let Some(min) = min_cave_tile {
            if o.cave_tile > 0 && o.cave_tile < min {
                warnings.push(format!(
                    "cave-tile {} is below the {min} px the loaded CaVE needs for its tile margins: using {min}",
                    o.cave_tile
                ));
                o.cave_tile = min;
            }
        }
        (o, warnings)
    }
}
