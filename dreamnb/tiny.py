"""Tiny Stable Diffusion models with the real architectures, for tests.

No machine here can download real weights, so tests build models with the same classes and
layouts as SD 1.x and SD 2.x (four UNet levels, four VAE levels, a CLIP text encoder with the
real tokenizer) and SDXL (three UNet levels with "text_time" conditioning, two text encoders)
but only a few channels, and load them through the same code path as a real model: a diffusers
folder and an A1111-style single file.
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


# SDXL base shape: a UNet with SDXL's extra "text_time" conditioning (pooled text embedding plus original size,
# crop and target size), two text encoders (CLIP ViT-L and OpenCLIP bigG shapes) and an Euler scheduler.
# "sdxl-refiner": the refiner's shape (only the OpenCLIP encoder, aesthetic-score conditioning), for refusal tests.
TINY_SDXL_KINDS = ("sdxl", "sdxl-refiner")
_SDXL_TIME_DIM = 8  # addition_time_embed_dim (256 in SDXL): each of the 6 (base) or 5 (refiner) time ids gets this many


@dataclass
class TinyModelPaths:
    folder: Path          # a diffusers folder (model_index.json, unet/, vae/, ...)
    single_file: Path | None  # the same weights in the original SD key layout (.safetensors)


def tiny_pipeline(kind: str = "sd1", seed: int = 0):
    """Build a randomly initialised (seeded) tiny StableDiffusionPipeline of the given kind."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
    vae = tiny_vae(seed)
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


def tiny_sdxl_pipeline(kind: str = "sdxl", seed: int = 0):
    """Build a randomly initialised (seeded) tiny StableDiffusionXLPipeline (or the refiner's Img2Img pipeline).

    SDXL's cross-attention reads both text encoders' penultimate hidden states side by side, so its dimension is
    the sum of their hidden sizes; its "text_time" embedding reads the second encoder's pooled (projected) output
    plus 6 size/crop numbers (the refiner: 5, with an aesthetic score instead of the target size).
    """
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if kind not in TINY_SDXL_KINDS:
        raise ValueError(f"tiny SDXL kind must be one of {TINY_SDXL_KINDS}, not {kind!r}")
    refiner = kind == "sdxl-refiner"
    torch.manual_seed(seed)

    def text_config(hidden_act: str, hidden: int, layers: int, pad_token_id: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=layers,
            max_position_embeddings=77, hidden_act=hidden_act, projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=pad_token_id,
        )

    # CLIP ViT-L (quick GELU) and OpenCLIP bigG (GELU, with a text projection whose pooled output conditions the UNet).
    # Their widths differ as in SDXL (768 and 1280): diffusers' single-file loader tells the two encoders apart by
    # width, so equal widths would load one into the other. Ten layers in the second one because diffusers
    # recognises an SDXL single file by `...embedders.1.model.transformer.resblocks.9...`.
    text_encoder = None if refiner else CLIPTextModel(text_config("quick_gelu", 32, 3, 49407))
    text_encoder_2 = CLIPTextModelWithProjection(text_config("gelu", 48, 10, 0))
    context_dim = text_encoder_2.config.hidden_size + (0 if refiner else text_encoder.config.hidden_size)
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        sample_size=8,  # 8x8 latents -> 64x64 images (SDXL: 128 -> 1024)
        in_channels=4,
        out_channels=4,
        # SDXL's layout: no attention at the top level, more transformer layers deeper down (SDXL: 1, 2, 10).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=context_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + time_ids * _SDXL_TIME_DIM,
        norm_num_groups=16,
    )
    vae = tiny_vae(seed, force_upcast=True)  # as SDXL's own VAE, which overflows in fp16 (the fp16-fix VAE says False)
    # SDXL's second tokenizer is OpenCLIP bigG's: the same BPE vocabulary and merges as CLIP ViT-L's (the bundled
    # one), padding with "!" (id 0) instead of "<|endoftext|>". So the real tokenizer serves for both.
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")
    scheduler = EulerDiscreteScheduler(  # stabilityai/stable-diffusion-xl-base-1.0's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2, unet=unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def tiny_vae(seed: int, latent_channels: int = 4, **config):
    """The tiny VAE (the real AutoencoderKL, 8× down), its latents scaled to unit variance on the sample images."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=8, sample_size=64, **config)
    vae.register_to_config(scaling_factor=unit_variance_scaling(vae, _sample_images(seed)))
    return vae


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


def tiny_t5_tokenizer(vocab_size: int = 300):
    """A T5 tokenizer (T5TokenizerFast, SentencePiece-style Unigram with `</s>` at the end) trained here on a few
    prompts: T5's own vocabulary cannot be downloaded, and FLUX.1's pipeline only needs one of its class."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    words = "a an the photo painting portrait of in on with by style oil person dog thing zwx sks ohwx man woman cat".split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] + ["Vincent van Gogh Rembrandt Monet"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                                                   unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=512)


def tiny_flux_pipeline(seed: int = 0, schnell: bool = False):
    """A randomly initialised (seeded) tiny FluxPipeline: FLUX.1's transformer (one double and one single block, guidance
    embedding), a 16-channel VAE with FLUX.1's shift and scale, CLIP (pooled) and T5 text encoders, and FLUX.1 [dev]'s
    flow-matching scheduler; `schnell`: FLUX.1 [schnell]'s shape (no guidance embedding, a fixed shift of 1)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5_tokenizer = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4))
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=49408, projection_dim=32, max_position_embeddings=77))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=not schnell, axes_dims_rope=(4, 6, 6))
    vae = tiny_vae(seed, latent_channels=16, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False) if schnell else
                 FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    return pipe


def save_tiny_model(out_dir: str | Path, kind: str = "sd1", seed: int = 0, single_file: bool = True) -> TinyModelPaths:
    """Save a tiny model (a TINY_KINDS or TINY_SDXL_KINDS kind) as a diffusers folder and a single .safetensors file under out_dir."""
    out_dir = Path(out_dir)
    folder = out_dir / f"tiny-{kind}"
    if kind.startswith("flux1"):
        pipe = tiny_flux_pipeline(seed, schnell=kind == "flux1-schnell")
    else:
        pipe = tiny_sdxl_pipeline(kind, seed) if kind in TINY_SDXL_KINDS else tiny_pipeline(kind, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    file_path = None
    if single_file and not kind.startswith("flux1"):  # FLUX.1's own single file is its transformer's (families/flux_bfl.py)
        file_path = out_dir / f"tiny-{kind}.safetensors"
        from .convert import save_single_file

        save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, file_path, dtype=torch.float32,
                         text_encoder_2=getattr(pipe, "text_encoder_2", None))
    log.info("saved tiny %s model to %s", kind, folder)
    return TinyModelPaths(folder=folder, single_file=file_path)
