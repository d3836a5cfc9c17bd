"""Stable Diffusion XL: SD's UNet and DDPM, larger, with two text encoders (CLIP ViT-L and OpenCLIP bigG) and each
image's size and crop numbers ("time ids") beside the prompt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import SDXL_FP16_VAE
from .base import Family, ModelError, PromptEncoder
from .sd import StableDiffusion, check_input_channels

SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"  # what the SDXL refiner is saved as


def refiner_error(where: str) -> ModelError:
    return ModelError(f"{where} is an SDXL refiner, and the SDXL refiner is not a base model for training; use an SDXL base model such as {SDXL_MODEL}.")


class DualClipPromptEncoder(PromptEncoder):
    """As SDXL's pipeline and diffusers' training script do: embeds are both encoders' penultimate hidden states side
    by side, and pooled is the second encoder's projected output, which joins the size/crop numbers (time ids) in the
    UNet's `added_cond_kwargs`."""

    def forward(self, input_ids):
        device = self.text_encoder.device
        hidden = []
        for i, encoder in enumerate((self.text_encoder, self.text_encoder_2)):
            out = encoder(input_ids[:, i].to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out[0]  # out[0]: CLIPTextModelWithProjection's text_embeds


def image_time_ids(path: Path, resolution: int) -> tuple[int, int, int, int, int, int]:
    """SDXL's size and crop conditioning for one training image, as diffusers' SDXL DreamBooth script makes it:
    (original height, original width, crop top, crop left, target height, target width), the crop in the resized image.
    The "original" is the image file as training reads it: `prepare_photos` keeps no record of the photo it was cut
    from, so a prepared photo counts as uncropped (crop 0, 0) at its prepared size; only a non-square file (crop="none")
    gets the centred crop `data.load_image_tensor` takes. A photo prepared smaller than `resolution` says so, which is
    what SDXL learned such a size to mean (softer detail)."""
    from PIL import Image

    from ..data import centre_square

    with Image.open(path) as img:
        width, height = img.size
    left, top, side = centre_square(width, height)
    scale = resolution / side
    return height, width, round(top * scale), round(left * scale), resolution, resolution


class StableDiffusionXL(StableDiffusion):
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    checked_tokenizers = ("tokenizer", "tokenizer_2")  # CLIP's and OpenCLIP bigG's (which pads with "!")
    folder_parts = StableDiffusion.folder_parts + ("text_encoder_2", "tokenizer_2")
    default_method = "lora"            # a full fine-tune of its 2.6B-weight UNet does not fit a T4's 15 GB
    keep_vae_fp32_when_forced = True   # its own VAE overflows in fp16 (NaN latents, black images)
    fp16_vae = SDXL_FP16_VAE
    hub_tags = ("stable-diffusion", "stable-diffusion-xl")

    def __init__(self) -> None:
        super().__init__("sdxl", "Stable Diffusion XL", "sdxl_base_v1-0")

    def load_options(self) -> dict[str, Any]:
        return {}  # SDXL's pipeline has no safety checker

    def assemble(self, base_pipeline, **parts):
        components = {**base_pipeline.components, **parts}
        return self.pipeline_class()(**components, force_zeros_for_empty_prompt=base_pipeline.config.force_zeros_for_empty_prompt,
                                     add_watermarker=getattr(base_pipeline, "watermark", None) is not None)

    def claims_class(self, class_name: str | None) -> bool:
        return class_name == self.pipeline_class_name

    def check_pipeline(self, pipe, source: str) -> Family:
        if getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
            raise ModelError(f"{source} is saved as an SDXL pipeline but its UNet lacks SDXL's size and crop conditioning; use an SDXL base model such as {SDXL_MODEL}.")
        return self

    def recognise_checkpoint(self, keys, shapes, name):
        """SDXL files keep their text encoders under `conditioner.embedders`: the base has CLIP ViT-L (`0.transformer.`,
        Hugging Face names) and OpenCLIP bigG (`1.model.`); the refiner has only OpenCLIP bigG, as `0.model.`."""
        def has(prefix: str) -> bool:
            return any(k.startswith(prefix) for k in keys)

        if has("conditioner.embedders.0.model."):
            raise refiner_error(name)
        if not (has("conditioner.embedders") and has("model.diffusion_model.input_blocks")):
            return None
        check_input_channels(shapes, name)
        if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
            return self
        raise ModelError(f"{name} is a Stable Diffusion XL checkpoint without both of its text encoders (CLIP ViT-L and OpenCLIP bigG), so it cannot be trained; use a full SDXL base checkpoint.")

    def prompt_encoder(self, **encoders) -> PromptEncoder:
        return DualClipPromptEncoder(**encoders)

    def image_conditioning(self, paths, resolution):
        """Each image's size and crop numbers, a row each (fp32: the UNet embeds them as it does timesteps)."""
        return torch.tensor([image_time_ids(p, resolution) for p in paths], dtype=torch.float32)

    def denoiser_inputs(self, pooled, image_rows):
        return {"text_embeds": pooled, "time_ids": image_rows}

    def pipeline_prompt_kwargs(self, pipe, embeds, pooled, i):
        """SDXL's own pipeline makes an empty negative prompt zeros (force_zeros_for_empty_prompt); so does this."""
        negative, negative_pooled = embeds[-1:], pooled[-1:]
        if pipe.config.force_zeros_for_empty_prompt:
            negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
        return dict(prompt_embeds=embeds[i:i + 1], pooled_prompt_embeds=pooled[i:i + 1], negative_prompt_embeds=negative,
                    negative_pooled_prompt_embeds=negative_pooled)

    def text_inputs(self, pipe, prompt, latents):
        """The pipeline's own prompt encoding; the size/crop numbers made at the latents' size, uncropped."""
        device, dtype, batch = pipe.unet.device, pipe.unet.dtype, latents.shape[0]
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
        size = (latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        extra = {"text_embeds": pooled.expand(batch, -1).to(dtype), "time_ids": time_ids.to(device).expand(batch, -1)}
        return embeds.expand(batch, -1, -1).to(dtype), extra

    def text_training_leaves_weights_unused(self) -> bool:
        """It reads the first text encoder's penultimate layer, so the last layer gets no gradient (diffusers' SDXL
        script says the same)."""
        return True

    def preset_overrides(self, method: str) -> dict[str, Any]:
        return dict(_OVERRIDES["common"], **_OVERRIDES[method])

    def settings_note(self, config) -> str:
        parts = [f"{config.resolution} px, the size it paints at"]
        if self.default_method == "lora":
            parts.append("LoRA, small add-on weights (a full fine-tune of its 2.6B-weight UNet needs far more GPU memory)")
        if config.text_encoder_steps == 0:
            parts.append("the UNet only, as its two text encoders already tell a rare token apart")
        return f"{self.label}: {'; '.join(parts)}."

    def kohya_key(self, key: str) -> str:
        return key  # SDXL's two text encoders keep diffusers' lora_te1_ / lora_te2_

    def single_file_state(self, pipe) -> dict[str, torch.Tensor]:
        from ..convert import pipeline_to_ldm

        return pipeline_to_ldm(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)


# SDXL (a UNet three times SD 1.5's, two text encoders, made at 1024 px) changes these, whatever the preset.
_OVERRIDES: dict[str, dict[str, Any]] = {
    "common": dict(
        resolution=1024,       # SDXL's own size: it paints at 1024 px and loses detail when trained smaller
        text_encoder_steps=0,  # UNet only, as in diffusers' SDXL DreamBooth recipe: its two text encoders already read
                               # a rare token apart, and training both (one is 700M weights) needs far more GPU memory
    ),
    "lora": dict(
        unet_lr=1e-4,          # diffusers' SDXL DreamBooth LoRA README and script (rank 4 there; 16 here, as for SD 1.x,
                               # for a face's detail: about 90 MB of adapters in fp32)
        text_encoder_lr=5e-6,  # diffusers' SDXL script's text-encoder rate, for when text-encoder steps are turned on
    ),
    "full": dict(),            # the preset's rates: full fine-tuning moves every weight, so small steps as for SD 1.x
}

SDXL = StableDiffusionXL()
FAMILIES = (SDXL,)
