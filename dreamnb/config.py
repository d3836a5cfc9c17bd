"""Training settings: one typed dataclass, presets, and validation that speaks to the user.

Every field carries a one-line plain-language explanation in its metadata (`help`), so the CLI,
the notebook widgets and the docs all show the same words. Unknown keys are errors (nanoGPT's rule),
so a typo in a saved config never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


class ConfigError(UserError):
    """A setting that cannot work; the message is one sentence saying what to change."""


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


PRESETS = ("face", "object", "style")
METHODS = ("full", "lora")


@dataclass
class TrainConfig:
    # --- what to learn -------------------------------------------------------------------------
    token: str = _f("", "The rare made-up word that will mean your subject, e.g. 'squidarth'. Check it first.")
    class_word: str = _f("person", "What kind of thing the subject is (person, man, woman, dog, cat, car). Empty for a style.")
    instance_prompt: str = _f("", "The caption used for every photo without its own .txt caption; empty: 'photo of {token} {class}'.")
    preset: str = _f("face", "Starting values for a face, an object/pet, or an art style.", choices=PRESETS)
    resolution: int = _f(512, "Training image size in pixels; the base model's own size (512 for SD 1.5, 1024 for SDXL) works best.", min=64, max=1024, step=64)
    seed: int = _f(1234, "Makes a run repeatable: the same seed and settings give the same model.")
    held_out_photos: int = _f(-1, "Photos kept out of training, so the scores measure likeness on photos the model never saw; -1: 3 when you have 15 or more photos, else none (with fewer, every photo is needed to learn the likeness).", min=-1, max=20)

    # --- the two phases (TheLastBen's scheme) ---------------------------------------------------
    text_encoder_steps: int = _f(350, "Steps teaching the text encoder (the part that reads your prompt) what your token means; 0 keeps it frozen.", min=0, max=5000)
    text_encoder_lr: float = _f(1e-6, "How big each text-encoder step is; too high and prompts stop working.", min=0.0, max=1e-2)
    unet_steps: int = _f(1500, "Steps teaching the UNet (the part that paints the picture) your subject; too many overfit (every image looks like your photos).", min=1, max=20000)
    unet_lr: float = _f(2e-6, "How big each UNet step is; higher learns faster but overfits and breaks sooner.", min=0.0, max=1e-2)
    lr_warmup_steps: int = _f(0, "Steps at the start of each phase during which the learning rate ramps up from zero.", min=0)
    lr_scheduler: str = _f("constant", "How the learning rate changes over a phase.", choices=("constant", "linear", "cosine"))
    weight_decay: float = _f(1e-2, "Each step pulls every trained weight towards zero by learning rate × this × the weight (AdamW's decoupled decay); 1e-2 as diffusers' scripts; 0 turns it off.", min=0.0, max=1.0)

    # --- prior preservation --------------------------------------------------------------------
    with_prior_preservation: bool = _f(True, "Also trains on generic images of the class so 'a person' still means anyone, not only you (less overfitting).")
    class_prompt: str = _f("", "Prompt for the generic class images; empty: 'photo of a {class}'.")
    num_class_images: int = _f(100, "How many generic class images to generate once (reused by later attempts).", min=1, max=2000)
    prior_loss_weight: float = _f(1.0, "How much the generic class images count against your photos.", min=0.0, max=10.0)

    # --- loss and batch --------------------------------------------------------------------------
    offset_noise: float = _f(0.0, "Adds a little brightness noise so the model can learn very dark or bright images (0.05-0.1); 0 is off.", min=0.0, max=1.0)
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting (5 is usual): steadier training; 0 is off.", min=0.0, max=20.0)
    train_batch_size: int = _f(1, "Photos per step (per GPU).", min=1, max=64)
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients are added up before one update: a larger batch without more memory.", min=1, max=64)
    random_flip: bool = _f(False, "Randomly mirror photos; good for objects and styles, off for faces (faces are not symmetric).")

    # --- method, precision, memory ---------------------------------------------------------------
    method: str = _f("full", "'full' trains every weight (best likeness, a 2-4 GB model); 'lora' trains small add-on weights (a few MB, less memory).", choices=METHODS)
    lora_rank: int = _f(16, "LoRA size: higher learns more detail, bigger file.", min=1, max=256)
    lora_alpha: int = _f(16, "LoRA strength scale; usually equal to the rank.", min=1, max=512)
    mixed_precision: str = _f("auto", "Number format: 'auto' picks bf16 on new GPUs, fp16 on a T4, fp32 on a CPU.", choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: str = _f("auto", "Saves GPU memory by recomputing, a little slower; 'auto' turns it on when memory is tight.", choices=("auto", "on", "off"))
    optimizer: str = _f("auto", "'auto': on a GPU, bf16 weights with stochastic rounding (half the memory; a T4 computes in fp16 beside them), or 8-bit AdamW on a T4 that has bitsandbytes; AdamW on a CPU and for LoRA. 'adamw-bf16-kahan' (compensated sums) and 'adamw-bf16-v32' (fp32 second moment) are bf16-weight variants for GPUs with bf16 math.", choices=("auto", "adamw", "adamw8bit", "adamw-bf16", "adamw-bf16-kahan", "adamw-bf16-v32"))
    cuda_graphs: str = _f("auto", "Records a whole training step once and replays it: several times faster on a GPU ('auto': one GPU; 'on' also with several).", choices=("auto", "on", "off"))

    # --- never lose a run ------------------------------------------------------------------------
    checkpoint_every: int = _f(500, "Save a checkpoint every this many steps (and always at the end and on Stop); 0 only at the end.", min=0)
    keep_checkpoints: int = _f(2, "How many recent checkpoints to keep on disk (to compare, export or continue from); only the newest keeps the optimizer state that resuming needs.", min=1, max=100)
    sample_every: int = _f(0, "Make preview images every this many steps, to watch the subject appear (and spot overfitting early); 0 is off.", min=0)
    sample_prompts: str = _f("", "Prompts for the previews, separated by '|' ({token} and {class} are filled in); empty: the instance prompt and the subject as a painting.")
    log_every: int = _f(10, "Write the loss to log.csv every this many steps.", min=1)

    # --- continuing an attempt (set by `continue_config`) -------------------------------------------
    parent: str = _f("", "The attempt (or checkpoint, as attempt-1@500) this one continues from; empty: it starts from the base model.")
    parent_trained_text_encoder: bool = _f(False, "Whether the attempt continued from changed the text encoder, which this one then carries on.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown setting(s) {', '.join(unknown)}; valid settings are: {', '.join(sorted(known))}.")
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str = "face", method: str | None = None, *, family: str | None = None, **overrides: Any) -> "TrainConfig":
        """The preset's values for the chosen method (None: the model family's default, `Family.default_method`) and
        base model family (`ModelInfo.family`: SDXL has its own defaults), then the caller's overrides (None means 'keep')."""
        values = preset_values(preset, method, family)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    # Prompts with the placeholders filled in ------------------------------------------------------
    def resolved_instance_prompt(self) -> str:
        if self.instance_prompt:
            return self.instance_prompt.replace("{token}", self.token).replace("{class}", self.class_word)
        return " ".join(p for p in ("photo of", self.token, self.class_word) if p)

    def resolved_class_prompt(self) -> str:
        if self.class_prompt:
            return self.class_prompt.replace("{class}", self.class_word)
        return f"photo of a {self.class_word}"

    def resolved_sample_prompts(self) -> list[str]:
        """The preview prompts; by default the instance prompt and the van Gogh probe, which an overfit model ignores."""
        if not self.sample_prompts.strip():
            subject = " ".join(p for p in (self.token, self.class_word) if p)
            return [self.resolved_instance_prompt(), f"an oil painting of {subject} in the style of Vincent van Gogh"]
        prompts = (p.strip().replace("{token}", self.token).replace("{class}", self.class_word) for p in self.sample_prompts.split("|"))
        return [p for p in prompts if p]

    @property
    def total_steps(self) -> int:
        return self.text_encoder_steps + self.unet_steps

    @property
    def changes_text_encoder(self) -> bool:
        """Whether the attempt's text encoder differs from the base model's: trained here, or by the attempt it continues."""
        return self.text_encoder_steps > 0 or self.parent_trained_text_encoder


# A sampling knob, not a training one; here so the CLI and the widgets say the same thing.
COMPILE_UNET_HELP = ("GPU: compile the UNet with torch.compile, about 1.4× faster sampling once each batch size has "
                     "waited about a minute to compile (seconds when cached); pays off over many grids.")
# A base-model knob (models.load_base_model's `vae`), likewise.
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"  # SDXL's VAE fine-tuned to stay within fp16's range
VAE_HELP = (f"Another VAE (the part that turns pictures into the model's compact latents and back), e.g. {SDXL_FP16_VAE}: "
            "SDXL's own VAE runs in fp32 (slower, more memory); this one stays in fp16.")


def help_for(name: str) -> str:
    """The one-line explanation of a setting, for CLI help and widgets."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}[name]


def field_meta(name: str) -> dict[str, Any]:
    return dict(next(f.metadata for f in dataclasses.fields(TrainConfig) if f.name == name))


# Values from TheLastBen's fast-DreamBooth and the diffusers DreamBooth guide: faces want the text encoder
# trained and prior preservation; objects learn in fewer steps; styles have no class and live in captions.
_PRESETS: dict[str, dict[str, Any]] = {
    "face": dict(class_word="person", unet_steps=1500, unet_lr=2e-6, text_encoder_steps=350, text_encoder_lr=1e-6,
                 with_prior_preservation=True, num_class_images=100, random_flip=False),
    "object": dict(class_word="", unet_steps=800, unet_lr=2e-6, text_encoder_steps=200, text_encoder_lr=1e-6,
                   with_prior_preservation=True, num_class_images=100, random_flip=True),
    "style": dict(class_word="", unet_steps=2000, unet_lr=2e-6, text_encoder_steps=250, text_encoder_lr=1e-6,
                  with_prior_preservation=False, random_flip=True, instance_prompt="{token} style"),
}
# LoRA trains far fewer weights, so each may move much further (diffusers' LoRA script uses 1e-4).
_LORA_OVERRIDES: dict[str, Any] = dict(unet_lr=1e-4, text_encoder_lr=5e-5)


def preset_values(preset: str, method: str | None = None, family: str | None = None) -> dict[str, Any]:
    """The one place where settings depend on the preset, the method and the base model's family (whose own values
    are `Family.preset_overrides`)."""
    from . import families

    method = method or families.get(family).default_method
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if method not in METHODS:
        raise ConfigError(f"Unknown method {method!r}; choose 'full' or 'lora'.")
    values = dict(_PRESETS[preset], preset=preset, method=method)
    if method == "lora":
        values.update(_LORA_OVERRIDES)
    values.update(families.get(family).preset_overrides(method))
    return values


def validate(config: TrainConfig) -> None:
    """Refuse settings that cannot work, before any model is loaded. Photo checks live in the trainer."""
    c = config
    for f in dataclasses.fields(c):
        value, meta = getattr(c, f.name), f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{f.name} is {value!r}; choose one of {', '.join(map(str, meta['choices']))}.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "min" in meta and value < meta["min"]:
                raise ConfigError(f"{f.name} is {value} but must be at least {meta['min']}.")
            if "max" in meta and value > meta["max"]:
                raise ConfigError(f"{f.name} is {value} but must be at most {meta['max']}.")
    if not c.token.strip():
        raise ConfigError("The token is empty; pick a rare made-up word such as one `dreamnb check-token` suggests.")
    if c.instance_prompt and "{token}" not in c.instance_prompt and c.token not in c.instance_prompt:
        raise ConfigError(f"The instance prompt {c.instance_prompt!r} does not contain the token {c.token!r}; add it, or the model cannot learn what it means.")
    if c.resolution % 8:
        raise ConfigError(f"The resolution must be a multiple of 8 but is {c.resolution}; use e.g. {c.resolution // 64 * 64 or 512}.")
    if c.with_prior_preservation and not c.class_word.strip():
        raise ConfigError("Prior preservation needs a class word (person, dog, ...); give one or turn prior preservation off.")
    if c.text_encoder_steps > 0 and c.text_encoder_lr <= 0:
        raise ConfigError("The text-encoder learning rate is 0 but text-encoder steps are set; set a rate (1e-6) or 0 steps.")
    if c.sample_every and not c.resolved_sample_prompts():
        raise ConfigError("Previews are on but sample_prompts has no prompt; write one, or leave it empty for the defaults.")
    if c.unet_lr <= 0:
        raise ConfigError("The UNet learning rate must be above 0 (2e-6 is a good start for a face).")
