"""What every model family answers: the one place where one family differs from another.

A family is one object (listed in its module's `FAMILIES`), looked up by its key (`ModelInfo.family`: "sd1", "sd2",
"sdxl", "flux1") through `dreamnb.families.get`. The trainer's stages, sampling, previews, compare, export, the CLI and
the notebook ask it and never name a family. What it answers, in the order a run needs it:

- recognising a model: its pipeline class names (model_index.json, a Hub id's), a single file's keys, a loaded
  pipeline's parts; a diffusers folder's parts; its label as shown to people;
- loading and assembling: the pipeline class, its loading options, a pipeline from another's parts;
- the parts: which part paints (`denoiser`), the text encoders and their tokenizers, where LoRA goes;
- prompts: a `PromptEncoder` (token ids in, (embeds, pooled) out), per-image conditioning (SDXL's size and crop
  numbers), and how the denoiser is called with them;
- the noise schedule and training target (`noise_schedule`);
- presets: the values that differ for this family, and the method it trains with by default;
- export: kohya's names and metadata, the model card's tags, the single-file layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


SUPPORTED = "Stable Diffusion 1.x, 2.x or XL, or FLUX.1"  # what error messages offer instead


class ModelError(UserError):
    """A base model that cannot be used; the message says what is wrong and what to do."""


class PromptEncoder(torch.nn.Module):
    """The one owner of how prompts become the denoiser's conditioning: a family's text encoder(s) as one module, token
    ids from `Family.tokenize` in, (embeds, pooled) out (pooled is None where the family has none). One module, so a
    phase trains, moves, freezes or wraps (DDP) all encoders alike. The encoders are attributes named as the pipeline
    names them (`text_encoder`, `text_encoder_2`), which are also their checkpoint key prefixes."""

    def __init__(self, **encoders: torch.nn.Module | None):
        super().__init__()
        self._names = [name for name, encoder in encoders.items() if encoder is not None]
        for name in self._names:
            setattr(self, name, encoders[name])

    def parts(self) -> dict[str, torch.nn.Module]:
        """The encoders by the names they are saved under."""
        return {name: getattr(self, name) for name in self._names}

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class Family:
    """The answers of one model family; a family module subclasses it (or another family: SDXL is SD with more)."""

    key: str = ""                      # as saved in ModelInfo.family and in cache keys
    label: str = ""                    # as shown to people: "Stable Diffusion 1.x"
    pipeline_class_name: str = ""      # the diffusers pipeline it loads as
    denoiser: str = "unet"             # the part that paints, by its pipeline name (also its phase's name)
    text_encoders: tuple[str, ...] = ("text_encoder",)   # the text encoders, by their pipeline names, in prompt order
    tokenizers: tuple[str, ...] = ("tokenizer",)         # each text encoder's tokenizer, in the same order
    checked_tokenizers: tuple[str, ...] = ("tokenizer",)  # the CLIP tokenizers the token check reads a trigger word with
    folder_parts: tuple[str, ...] = ()                   # a diffusers folder's parts that must be there
    default_method: str = "full"       # "full" or "lora": what the presets train with unless told
    methods: tuple[str, ...] = ("full", "lora")  # the methods it can train with
    sampling_guidance: float = 7.5     # the guidance strength its pipeline samples with by default
    samplers: tuple[str, ...] = ("dpm++", "dpm++-karras", "euler", "euler-a", "ddim")  # `sample.SCHEDULERS` it takes, default first
    prefers_bf16: bool = False         # placed in bf16 (not fp16) on a GPU that has it: made in bf16, outgrows fp16
    keep_vae_fp32_when_forced: bool = False  # a VAE marked force_upcast stays in fp32 (it overflows in fp16)
    fp16_vae: str | None = None        # a VAE made for this family that stays in fp16, to suggest

    # --- parts ------------------------------------------------------------------------------------------

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """The parts training may change, by the names their weights are saved under (checkpoint key prefixes, final/'s
        folders, the prefixes of diffusers' LoRA files)."""
        return (self.denoiser, *self.text_encoders)

    def tokenizer_list(self, pipeline) -> list:
        """The tokenizer of each text encoder, in the prompt encoder's order."""
        return [t for t in (getattr(pipeline, name, None) for name in self.tokenizers) if t is not None]

    def lora_targets(self, part: str) -> list[str]:
        """The layers LoRA adapts in a part."""
        raise NotImplementedError

    # --- loading and assembling --------------------------------------------------------------------------

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_options(self) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline's `from_pretrained` / `from_single_file`."""
        return {}

    def load_single_file(self, path, *, config, token, **options):
        """A pipeline from one checkpoint file, its configs from `config` (a diffusers folder or Hub id; None: diffusers
        guesses from the weights); `options` go to the loader (dtype, local_files_only, ...)."""
        return self.pipeline_class().from_single_file(str(path), token=token, **({"config": str(config)} if config else {}), **options)

    def assemble(self, base_pipeline, **parts):
        """A pipeline of this family with `base_pipeline`'s parts and settings, some parts replaced by `parts`."""
        raise NotImplementedError

    def claims_class(self, class_name: str | None) -> bool:
        """Whether a diffusers pipeline class (model_index.json's `_class_name`) loads as this family."""
        return class_name == self.pipeline_class_name

    def check_pipeline(self, pipe, source: str) -> "Family":
        """The family of a loaded pipeline of this family's class, checked against what it claimed to be (a family may
        tell its versions apart only once loaded: SD 1.x from 2.x)."""
        return self

    def native_resolution(self, pipe) -> int:
        """The image size a loaded pipeline of this family was made for."""
        return int(getattr(pipe, self.denoiser).config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def latent_channels(self, pipe) -> int:
        """How many channels the VAE's latents must have for this pipeline's denoiser."""
        return getattr(pipe, self.denoiser).config.in_channels

    def prediction(self, pipe) -> str:
        """What its denoiser predicts ("epsilon", "v_prediction"; "flow" for flow matching), as shown and cache-keyed."""
        return pipe.scheduler.config.get("prediction_type", "epsilon")

    def recognise_checkpoint(self, keys: list[str], shapes: dict[str, tuple[int, ...]], name: str) -> "Family | None":
        """This family (or one of its versions) when a single file's keys are its own, else None; a ModelError for a
        near miss that cannot be trained (an inpainting model, a refiner)."""
        return None

    # --- prompts and conditioning -------------------------------------------------------------------------

    def tokenize(self, tokenizers: list, prompts: list[str]) -> torch.Tensor:
        """Token ids of each prompt, a row per prompt, as this family's `PromptEncoder` reads them."""
        from ..data import tokenize_all

        return tokenize_all(tokenizers, prompts)

    def prompt_encoder(self, **encoders) -> PromptEncoder:
        raise NotImplementedError

    def image_conditioning(self, paths: list[Path], resolution: int) -> torch.Tensor | None:
        """Numbers each training image adds to its prompt's conditioning, a row per image; None for none."""
        return None

    def denoiser_inputs(self, pooled: torch.Tensor | None, image_rows: torch.Tensor | None) -> dict | None:
        """The denoiser's extra inputs for a batch, from its pooled prompts and its rows of `image_conditioning`."""
        return None

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, extra: dict | None):
        """The denoiser's prediction for a batch."""
        raise NotImplementedError

    def pipeline_prompt_kwargs(self, pipe, embeds: torch.Tensor, pooled: torch.Tensor | None, i: int) -> dict:
        """Prompt `i` of `embeds` and the empty negative prompt (the last row), as this family's pipeline takes them."""
        raise NotImplementedError

    def latents_for_vae(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A pipeline's latent output (`output_type="latent"`) as the VAE's (B, C, h, w) latents, still scaled."""
        return latents

    def fast_sampling(self, pipe, *, cuda_graphs: bool, compile_unet: bool) -> None:
        """Set up the fastest sampling path this family has on `pipe` (none by default)."""

    def text_inputs(self, pipe, prompt: str, latents: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """The denoiser's conditioning for `prompt` at the batch and size of `latents`, without classifier-free
        guidance, from a pipeline's own text encoders: (embeds, extra inputs for `predict`)."""
        raise NotImplementedError

    def noise_schedule(self, scheduler, device):
        """The training noise schedule and target, on `device`, from the pipeline's scheduler."""
        raise NotImplementedError

    def text_training_leaves_weights_unused(self) -> bool:
        """Training the text encoders leaves some of their weights without a gradient (data parallel must be told)."""
        return False

    # --- presets -----------------------------------------------------------------------------------------

    def preset_overrides(self, method: str) -> dict[str, Any]:
        """The settings this family changes in every preset, for a method."""
        return {}

    def settings_note(self, preset_config) -> str:
        """One line on why this family's defaults differ, for the notebook's form; '' when they don't."""
        return ""

    # --- export ------------------------------------------------------------------------------------------

    hub_tags: tuple[str, ...] = ()     # the model card's tags for this family

    def kohya_lora(self, peft_state: dict[str, torch.Tensor], rank: int, alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A LoRA in peft's names (`<part>.<layer>.lora_A.weight`) in kohya's layout, which A1111, ComfyUI and Forge
        load, and kohya's `ss_*` metadata that names the network and the base model's kind."""
        raise NotImplementedError

    def single_file_state(self, pipe) -> dict[str, torch.Tensor]:
        """The pipeline's weights in the original single-file layout A1111 and ComfyUI load."""
        raise NotImplementedError

    def single_file_usage(self, base: str, dtype: str) -> tuple[str, list[str], list[str]]:
        """For a model card: where other tools take that file, and the diffusers imports and lines that load it from
        `path` (`base`: the base model's Hub id, for what the file lacks)."""
        cls = self.pipeline_class_name
        return ("In AUTOMATIC1111 put the file in `models/Stable-diffusion/`, in ComfyUI in `models/checkpoints/`.",
                [f"from diffusers import {cls}"], [f'pipe = {cls}.from_single_file(path, torch_dtype={dtype}).to("cuda")'])
