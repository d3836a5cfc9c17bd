"""FLUX.1 ([dev], [schnell]): a transformer trained with flow matching, prompts read by CLIP (pooled) and T5 (per
token), latents packed into 2×2 patches with their positions ("image ids"), and a guidance strength the model takes
as an input ([dev] is guidance-distilled: no negative prompt, one pass per step).

The objective is diffusers' `train_dreambooth_lora_flux.py`'s: σ drawn uniformly from the scheduler's training sigmas
(FLUX.1's scheduler shifts them only at sampling time), x_σ = (1 − σ)·z + σ·ε, and the transformer predicts ε − z.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Family, PromptEncoder
from .sd import TEXT_LORA_TARGETS  # CLIP's; T5 is not trained

# diffusers' train_dreambooth_lora_flux.py's default LoRA targets: every attention projection of both streams and
# both feed-forwards of the double blocks; the single blocks' attention (to_q/k/v) is matched by the same names.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2"]
FLUX1_DEV = "black-forest-labs/FLUX.1-dev"  # gated: its licence is accepted on its Hub page, then HF_TOKEN reads it
TRAINING_GUIDANCE = 1.0  # the guidance input while training, as kohya's sd-scripts and SimpleTuner train FLUX.1 [dev]
T5_TOKENS = 512          # the prompt length T5 reads, as FluxPipeline's default max_sequence_length


class FlowMatchSchedule:
    """Flow matching's noise and target on the training device."""

    def __init__(self, scheduler, device):
        from diffusers import FlowMatchEulerDiscreteScheduler

        flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.sigmas = flow.sigmas.to(device=device, dtype=torch.float32)  # 1 → 1/1000, one per training timestep
        self.num_train_timesteps = flow.config.num_train_timesteps

    def draw_timesteps(self, count: int, generator: torch.Generator, device) -> torch.Tensor:
        """σ of each row, drawn uniformly over the training sigmas (diffusers' weighting scheme "none")."""
        u = torch.rand(count, generator=generator, device=device)
        return self.sigmas[(u * self.num_train_timesteps).long()]

    def at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ for training timesteps (0 = no noise, `num_train_timesteps` = pure noise)."""
        return timesteps.float() / self.num_train_timesteps

    def noisy_and_target(self, latents, noise, sigmas):
        s = sigmas.view(-1, *[1] * (latents.dim() - 1))
        return (1 - s) * latents + s * noise, noise - latents

    def loss_weights(self, sigmas, min_snr_gamma: float):
        return None  # Min-SNR is DDPM's; flow matching's uniform σ weighs every row alike


class ClipT5PromptEncoder(PromptEncoder):
    """Token ids: CLIP's (its 77) then T5's, side by side in one row; embeds are T5's per-token states, pooled is
    CLIP's pooled output, as FluxPipeline.encode_prompt makes them."""

    def forward(self, input_ids):
        clip_tokens = self.text_encoder.config.max_position_embeddings
        pooled = self.text_encoder(input_ids[:, :clip_tokens].to(self.text_encoder.device), output_hidden_states=False).pooler_output
        embeds = self.text_encoder_2(input_ids[:, clip_tokens:].to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return embeds, pooled


class Flux(Family):
    key = "flux1"
    label = "FLUX.1"
    pipeline_class_name = "FluxPipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    folder_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    default_method = "lora"  # 12B weights: a full fine-tune needs far more than one GPU's memory
    methods = ("lora",)
    prefers_bf16 = True
    hub_tags = ("flux", "flux-diffusers")
    sampling_guidance = 3.5  # FluxPipeline's default guidance input
    samplers = ("flow-euler",)

    def __init__(self) -> None:
        self._ids: dict[tuple, torch.Tensor] = {}  # position ids by shape, made before a CUDA graph records a step

    def lora_targets(self, part: str) -> list[str]:
        return LORA_TARGETS if part == self.denoiser else TEXT_LORA_TARGETS

    def assemble(self, base_pipeline, **parts):
        return self.pipeline_class()(**{**base_pipeline.components, **parts})

    def recognise_checkpoint(self, keys, shapes, name):
        """A transformer in Black Forest Labs' layout, as civitai and ComfyUI share it (some with ComfyUI's prefix)."""
        return self if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys) else None

    def load_single_file(self, path, *, config, token, local_files_only=False, **options):
        """Such a file holds the transformer alone; the text encoders, VAE and scheduler come from `config`, FLUX.1
        [dev]'s Hub repository unless another is given (--model-config: a diffusers folder or Hub id)."""
        from diffusers import FluxTransformer2DModel

        source = str(config or FLUX1_DEV)
        hub = dict(token=token, local_files_only=local_files_only)
        transformer = FluxTransformer2DModel.from_single_file(str(path), config=source, subfolder="transformer", **hub, **options)
        return self.pipeline_class().from_pretrained(source, transformer=transformer, **hub, **options)

    def native_resolution(self, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def tokenize(self, tokenizers: list, prompts: list[str]) -> torch.Tensor:
        clip, t5 = tokenizers
        ids = [tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
               for tokenizer, length in ((clip, clip.model_max_length), (t5, T5_TOKENS))]
        return torch.cat(ids, dim=1)

    def prompt_encoder(self, **encoders) -> PromptEncoder:
        return ClipT5PromptEncoder(**encoders)

    def denoiser_inputs(self, pooled, image_rows):
        return {"pooled": pooled}

    def _positions(self, key: tuple, make) -> torch.Tensor:
        if key not in self._ids:
            self._ids[key] = make()
        return self._ids[key]

    def predict(self, denoiser, noisy, timesteps, embeds, extra):
        """As diffusers' FLUX.1 script calls the transformer: latents packed into 2×2 patches with their positions
        (FluxPipeline's own `_pack_latents`, `_prepare_latent_image_ids`, `_unpack_latents`)."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        device, dtype = noisy.device, embeds.dtype
        img_ids = self._positions(("img", h, w, device, dtype),
                                  lambda: FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype))
        txt_ids = self._positions(("txt", embeds.shape[1], device, dtype), lambda: torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype))
        config = getattr(denoiser, "module", denoiser).config  # under data parallel, DDP wraps the transformer
        guidance = torch.full((b,), TRAINING_GUIDANCE, device=device) if config.guidance_embeds else None
        out = denoiser(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps.to(noisy.dtype),
                       guidance=guidance, pooled_projections=extra["pooled"], encoder_hidden_states=embeds, txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)  # sizes in latents: a scale factor of 1

    def pipeline_prompt_kwargs(self, pipe, embeds, pooled, i):
        return dict(prompt_embeds=embeds[i:i + 1], pooled_prompt_embeds=pooled[i:i + 1])

    def text_inputs(self, pipe, prompt, latents):
        device, dtype, batch = pipe.transformer.device, pipe.transformer.dtype, latents.shape[0]
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device, max_sequence_length=T5_TOKENS)
        return embeds.expand(batch, -1, -1).to(dtype), {"pooled": pooled.expand(batch, -1).to(dtype)}

    def noise_schedule(self, scheduler, device) -> FlowMatchSchedule:
        return FlowMatchSchedule(scheduler, device)

    def latents_for_vae(self, pipe, latents, height: int, width: int):
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor) if latents.dim() == 3 else latents

    def latent_channels(self, pipe) -> int:
        return pipe.transformer.config.in_channels // 4  # it reads 2×2 patches of them

    def prediction(self, pipe) -> str:
        return "flow"

    def preset_overrides(self, method: str) -> dict[str, Any]:
        return dict(_OVERRIDES)

    def settings_note(self, config) -> str:
        return (f"{self.label}: LoRA on the transformer only (its T5 reads the token well, and training it needs far more "
                f"memory); {config.resolution} px, learning rate {config.unet_lr:g}.")

    def single_file_state(self, pipe) -> dict[str, torch.Tensor]:
        """The transformer alone in Black Forest Labs' layout: the file ComfyUI loads as a diffusion model (beside its
        own CLIP, T5 and VAE files) and civitai shares; `load_single_file` reads it back."""
        from .flux_bfl import transformer_to_bfl

        return transformer_to_bfl(pipe.transformer.state_dict())

    def single_file_usage(self, base, dtype):
        return ("In ComfyUI put the file in `models/diffusion_models/` and load it with FLUX.1's own CLIP-L, T5 and VAE files.",
                ["from diffusers import FluxPipeline, FluxTransformer2DModel"],
                [f'transformer = FluxTransformer2DModel.from_single_file(path, config="{base}", subfolder="transformer", torch_dtype={dtype})',
                 f'pipe = FluxPipeline.from_pretrained("{base}", transformer=transformer, torch_dtype={dtype}).to("cuda")'])

    def kohya_lora(self, peft_state, rank, alpha):
        from .flux_kohya import flux_lora_to_kohya

        return flux_lora_to_kohya(peft_state, rank, alpha)


# What FLUX.1 changes in every preset (each with its reason).
_OVERRIDES: dict[str, Any] = dict(
    text_encoder_steps=0,     # the transformer only, as diffusers' Flux script, ai-toolkit and SimpleTuner default to
    unet_lr=1e-4,             # diffusers' Flux DreamBooth LoRA script and ai-toolkit's Flux configs
    resolution=512,           # diffusers' Flux script's default: 4× fewer tokens than 1024 px; FLUX.1 keeps its detail
    lora_rank=16,             # ai-toolkit's Flux default: room for a face's detail
    lora_alpha=16,
)

FLUX1 = Flux()
FAMILIES = (FLUX1,)
