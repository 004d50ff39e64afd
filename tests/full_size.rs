//! The real SD-2.1-base configuration at full size (UNet 865M parameters,
//! VAE 84M, CaVE nc [64,128,256,512] nb 4, proj 512 -> 1024) builds and runs
//! one restoration at a small size. Zero weights: the point is the shapes.
use gstcodiff::engine::cave::CaveConfig;
use gstcodiff::engine::unet::UNetConfig;
use gstcodiff::engine::vae::VaeConfig;
use gstcodiff::engine::{DeviceSpec, Engine, Precision, RestoreOptions, RgbImage};

#[test]
fn full_size_codiff_builds_and_restores_a_small_frame() {
    let engine = Engine::synthetic(
        CaveConfig { nc: [64, 128, 256, 512], nb: 4 },
        Some((UNetConfig::sd21_base(), VaeConfig::sd21_base())),
        DeviceSpec::Cpu,
        Precision::F32,
        true,
    )
    .unwrap();
    // 72x40: not a multiple of 8 or 32, so every pad-and-crop path runs
    let mut img = RgbImage::new(72, 40, (0..72 * 40 * 3).map(|i| (i % 251) as u8).collect()).unwrap();
    let qf = engine.restore(&mut img, &RestoreOptions::default()).unwrap();
    assert_eq!(img.data.len(), 72 * 40 * 3);
    assert!((0.0..=100.0).contains(&qf));
}

#[test]
fn sd21_base_configs_parse_from_diffusers_json() {
    // the folder layout users download: the config.json files as published
    let dir = std::env::temp_dir().join(format!("codiff-sd21-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unet = dir.join("unet.json");
    std::fs::write(
        &unet,
        r#"{"_class_name":"UNet2DConditionModel","act_fn":"silu","attention_head_dim":[5,10,20,20],
        "block_out_channels":[320,640,1280,1280],"center_input_sample":false,"cross_attention_dim":1024,
        "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
        "downsample_padding":1,"dual_cross_attention":false,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,
        "layers_per_block":2,"mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,
        "sample_size":64,"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
        "use_linear_projection":true}"#,
    )
    .unwrap();
    let cfg = UNetConfig::from_json(&unet).unwrap();
    let want = UNetConfig::sd21_base();
    assert_eq!(format!("{:?}", cfg.model.blocks), format!("{:?}", want.model.blocks));
    assert_eq!(cfg.model.cross_attention_dim, 1024);
    assert!(cfg.model.use_linear_projection);
    let vae = dir.join("vae.json");
    std::fs::write(
        &vae,
        r#"{"_class_name":"AutoencoderKL","act_fn":"silu","block_out_channels":[128,256,512,512],
        "down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
        "in_channels":3,"latent_channels":4,"layers_per_block":2,"norm_num_groups":32,"out_channels":3,"sample_size":768,
        "up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    assert_eq!(VaeConfig::from_json(&vae).unwrap(), VaeConfig::sd21_base());
}
