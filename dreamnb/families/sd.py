"""Stable Diffusion 1.x and 2.x: a UNet, one CLIP text encoder, DDPM noise with an ε or v target.

SD 2.x differs from 1.x only in its text encoder (OpenCLIP ViT-H, saved in CLIP's layout) and, for the 768 px models,
v-prediction; both load as a StableDiffusionPipeline and are told apart once loaded. SDXL (`sdxl.py`) builds on this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import SUPPORTED, Family, ModelError, PromptEncoder

SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # dreamnb's default base model (`models.DEFAULT_MODEL`)
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class DDPMSchedule:
    """DDPM's noise schedule on the training device (diffusers' add_noise copies its tables to the device each call),
    and its training target: the noise (ε) or the velocity (v)."""

    sqrt_alpha: torch.Tensor
    sqrt_one_minus_alpha: torch.Tensor
    snr: torch.Tensor
    prediction_type: str
    num_train_timesteps: int

    @classmethod
    def from_scheduler(cls, scheduler, device) -> "DDPMSchedule":
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(scheduler.config)
        alphas = ddpm.alphas_cumprod.to(device=device, dtype=torch.float32)
        return cls(sqrt_alpha=alphas.sqrt(), sqrt_one_minus_alpha=(1 - alphas).sqrt(), snr=alphas / (1 - alphas),
                   prediction_type=ddpm.config.prediction_type, num_train_timesteps=ddpm.config.num_train_timesteps)

    def draw_timesteps(self, count: int, generator: torch.Generator, device) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (count,), generator=generator, device=device)

    def at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What `noisy_and_target` and the denoiser take for training timesteps (0 = no noise): the timesteps."""
        return timesteps

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        a = self.sqrt_alpha[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha[timesteps].view(-1, 1, 1, 1)
        target = a * noise - s * latents if self.prediction_type == "v_prediction" else noise
        return a * latents + s * noise, target

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor | None:
        """Min-SNR weighting (Hang et al. 2023) per sample, or None when it is off."""
        if not min_snr_gamma:
            return None
        snr = self.snr[timesteps]
        clipped = torch.clamp(snr, max=min_snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


def check_input_channels(shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """A UNet whose first layer takes other than 4 channels (an inpainting model) cannot be trained here."""
    in_shape = next(iter(shapes.values()), None)
    if in_shape is not None and len(in_shape) == 4 and in_shape[1] != 4:
        raise ModelError(f"{name} is an inpainting or other special model ({in_shape[1]} input channels); use a normal {SUPPORTED} checkpoint.")


class ClipPromptEncoder(PromptEncoder):
    """SD 1.x/2.x: embeds are the text encoder's last hidden state; no pooled embedding."""

    def forward(self, input_ids):
        return self.text_encoder(input_ids[:, 0].to(self.text_encoder.device))[0], None


class StableDiffusion(Family):
    pipeline_class_name = "StableDiffusionPipeline"
    folder_parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    hub_tags = ("stable-diffusion",)

    def __init__(self, key: str, label: str, kohya_version: str):
        self.key, self.label, self.kohya_version = key, label, kohya_version

    def lora_targets(self, part: str) -> list[str]:
        return UNET_LORA_TARGETS if part == self.denoiser else TEXT_LORA_TARGETS

    def load_options(self) -> dict[str, Any]:
        return dict(safety_checker=None, requires_safety_checker=False)

    def assemble(self, base_pipeline, **parts):
        components = {**base_pipeline.components, **parts}
        return self.pipeline_class()(**components, requires_safety_checker=False)

    def claims_class(self, class_name: str | None) -> bool:
        """Every Stable Diffusion pipeline class but those families before it claim (or refuse); none said: this."""
        return class_name is None or class_name.startswith("StableDiffusion")

    def check_pipeline(self, pipe, source: str) -> Family:
        from . import get

        if getattr(pipe.unet.config, "addition_embed_type", None):
            raise ModelError(f"{source} is not a {SUPPORTED} model (its UNet takes extra conditioning, like SDXL, but it is saved as an SD 1.x/2.x pipeline).")
        sd2 = getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu") == "gelu" or bool(pipe.unet.config.use_linear_projection)
        return get("sd2" if sd2 else "sd1")

    def recognise_checkpoint(self, keys, shapes, name):
        from . import get

        if not any(k.startswith("model.diffusion_model.input_blocks") for k in keys):
            return None
        check_input_channels(shapes, name)
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return get("sd2")
        if any(k.startswith("cond_stage_model.transformer.") for k in keys):
            return get("sd1")
        return None

    def prompt_encoder(self, **encoders) -> PromptEncoder:
        return ClipPromptEncoder(**encoders)

    def predict(self, denoiser, noisy, timesteps, embeds, extra):
        return denoiser(noisy, timesteps, embeds, added_cond_kwargs=extra).sample

    def pipeline_prompt_kwargs(self, pipe, embeds, pooled, i):
        return dict(prompt_embeds=embeds[i:i + 1], negative_prompt_embeds=embeds[-1:])

    def fast_sampling(self, pipe, *, cuda_graphs: bool, compile_unet: bool) -> None:
        from ..fast import enable_fast_sampling

        enable_fast_sampling(pipe, cuda_graphs=cuda_graphs, compile_unet=compile_unet)

    def text_inputs(self, pipe, prompt, latents):
        device, dtype, batch = pipe.unet.device, pipe.unet.dtype, latents.shape[0]
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        return pipe.text_encoder(ids.to(device))[0].expand(batch, -1, -1).to(dtype), None

    def noise_schedule(self, scheduler, device) -> DDPMSchedule:
        return DDPMSchedule.from_scheduler(scheduler, device)

    def kohya_lora(self, peft_state, rank, alpha):
        """diffusers' own `convert_state_dict_to_kohya`: each layer's diffusers path with '.' turned into '_'
        (`lora_unet_down_blocks_0_..._attn1_to_q`, `lora_te1_text_model_...`), alpha the attempt's own."""
        from diffusers.utils import convert_state_dict_to_kohya

        state = {}
        for key, value in convert_state_dict_to_kohya(peft_state).items():
            key = self.kohya_key(key)
            # diffusers writes alpha = rank; the attempt's own alpha is what it trained with
            state[key] = torch.tensor(alpha, dtype=torch.float32) if key.endswith(".alpha") else value
        return state, {"ss_network_module": "networks.lora", "ss_base_model_version": self.kohya_version,
                       "ss_v2": str(self.key == "sd2")}

    def kohya_key(self, key: str) -> str:
        return key.replace("lora_te1_", "lora_te_", 1)  # kohya's (and A1111's) name for the only text encoder

    def single_file_state(self, pipe) -> dict[str, torch.Tensor]:
        from ..convert import pipeline_to_ldm

        return pipeline_to_ldm(pipe.unet, pipe.vae, pipe.text_encoder)


SD1 = StableDiffusion("sd1", "Stable Diffusion 1.x", "sd_v1")
SD2 = StableDiffusion("sd2", "Stable Diffusion 2.x", "sd_v2")
FAMILIES = (SD1, SD2)
