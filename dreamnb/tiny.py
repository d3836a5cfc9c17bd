"""Tiny Stable Diffusion models with the real architectures, for tests and the CPU demo.

No machine here can download real weights, so tests build models with the same classes and
layouts as SD 1.x and SD 2.x (four UNet levels, four VAE levels, a CLIP text encoder with the
real tokenizer) but only a few channels, and load them through the same code path as a real
model: a diffusers folder and an A1111-style single file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent / "data" / "clip-tokenizer"

# "sd1": SD 1.x shape (CLIP ViT-L text encoder, epsilon prediction).
# "sd2-v": SD 2.x shape (OpenCLIP-style text encoder with GELU, linear attention projections,
#          v-prediction), as stabilityai/stable-diffusion-2-1.
TINY_KINDS = ("sd1", "sd2-v")


@dataclass
class TinyModelPaths:
    folder: Path          # a diffusers folder (model_index.json, unet/, vae/, ...)
    single_file: Path | None  # the same weights in the original SD key layout (.safetensors)


def tiny_pipeline(kind: str = "sd1", seed: int = 0):
    """Build a randomly initialised (seeded) tiny StableDiffusionPipeline of the given kind."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in TINY_KINDS:
        raise ValueError(f"tiny model kind must be one of {TINY_KINDS}, not {kind!r}")
    sd2 = kind == "sd2-v"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,  # 8x8 latents -> 64x64 images
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=(2, 2, 4, 4) if sd2 else 4,
        use_linear_projection=sd2,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.register_to_config(scaling_factor=unit_variance_scaling(vae, _sample_images(seed)))
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if sd2 else 49407,
    )
    text_encoder = CLIPTextModel(text_config)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!" if sd2 else "<|endoftext|>")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sample_images(seed: int, count: int = 8, size: int = 64) -> torch.Tensor:
    """Blocky coloured images in [-1, 1]: enough structure to give a random VAE typical latents."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(blocks, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def unit_variance_scaling(vae, images: torch.Tensor) -> float:
    """The VAE scaling factor that gives these images' latents unit variance, as Stable Diffusion's 0.18215 does
    for its VAE. Without it a tiny VAE's latents are ~20x smaller than the training noise and drown in it."""
    latents = vae.encode(images).latent_dist.mean
    return round(1.0 / latents.std().item(), 5)


def save_tiny_model(out_dir: str | Path, kind: str = "sd1", seed: int = 0, single_file: bool = True) -> TinyModelPaths:
    """Save a tiny model as a diffusers folder (and as a single .safetensors file) under out_dir."""
    out_dir = Path(out_dir)
    folder = out_dir / f"tiny-{kind}"
    pipe = tiny_pipeline(kind, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    file_path = None
    if single_file:
        from .convert import save_single_file

        file_path = out_dir / f"tiny-{kind}.safetensors"
        save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, file_path, dtype=torch.float32)
    log.info("saved tiny %s model to %s", kind, folder)
    return TinyModelPaths(folder=folder, single_file=file_path)


def fit_vae(vae, images: list, steps: int = 300, seed: int = 0, size: int = 64, lr: float = 2e-3) -> float:
    """Teach a tiny random VAE to reconstruct small photos (random crops and flips of `images`).

    A random VAE decodes everything to noise, so a demo grid would show nothing; a few hundred CPU
    steps make it a crude but real autoencoder, with its scaling factor re-measured on the photos.
    Returns the final reconstruction error (MSE in [-1, 1]).
    """
    import numpy as np
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    big = size + size // 4
    pool = torch.stack([
        torch.from_numpy(np.asarray(img.convert("RGB").resize((big, big), Image.LANCZOS), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        for img in images
    ])
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        rows = torch.randint(0, len(pool), (8,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, big - size + 1, (2,), generator=generator))
        batch = pool[rows, :, top:top + size, left:left + size]
        if torch.rand((), generator=generator) < 0.5:
            batch = batch.flip(-1)
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample(generator)).sample
        recon_loss = torch.nn.functional.mse_loss(recon, batch)
        (recon_loss + 1e-6 * dist.kl().mean()).backward()
        loss = recon_loss.detach()
        optimizer.step()
        optimizer.zero_grad()
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=unit_variance_scaling(vae, pool[:, :, :size, :size]))
    return loss.item()
