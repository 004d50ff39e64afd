//! The tile flags of the still-image examples (`restore`, `bench`).
use gstcodiff::engine::RestoreOptions;

/// Tile sizes of a restoration; `#[command(flatten)]` into an example's flags.
#[derive(clap::Args, Debug)]
pub struct TileArgs {
    /// Latent tile side in latent pixels (0 = never tile)
    #[arg(long, default_value_t = 96)]
    pub latent_tile: usize,
    /// Overlap between latent tiles
    #[arg(long, default_value_t = 32)]
    pub latent_overlap: usize,
    /// VAE encoder tile side in image pixels (official vae_encoder_tiled_size; 0 = never tile)
    #[arg(long, default_value_t = 1024)]
    pub vae_encoder_tile: usize,
    /// VAE decoder tile side in latent pixels (official vae_decoder_tiled_size; 0 = never tile)
    #[arg(long, default_value_t = 224)]
    pub vae_decoder_tile: usize,
    /// Largest CaVE tile side in pixels: diffusion mode's embedding, cave mode's
    /// reconstruction (exact stitching; >= 800 for the compact model; 0 = never tile)
    #[arg(long, default_value_t = 2048)]
    pub cave_tile: usize,
}

impl TileArgs {
    /// [`RestoreOptions`] with these tiles, the rest default.
    pub fn options(&self) -> RestoreOptions {
        RestoreOptions {
            latent_tile: self.latent_tile,
            latent_overlap: self.latent_overlap,
            vae_encoder_tile: self.vae_encoder_tile,
            vae_decoder_tile: self.vae_decoder_tile,
            cave_tile: self.cave_tile,
            ..Default::default()
        }
    }
}
