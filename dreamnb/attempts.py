"""Turn a trained attempt back into a pipeline, reusing the base model already in memory.

An attempt stores only what training changed (final/unet, final/text_encoder, SDXL's final/text_encoder_2, or one
LoRA file), so switching between attempts loads those parts and shares the VAE, tokenizers and any frozen part
with the base pipeline instead of reading the whole model from disk again. SD 1.x/2.x and SDXL attempts go the same
way; what differs between them (the pipeline class, the parts, the denoiser's conditioning) the family answers
(`BaseModel.family`).
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import families
from .models import BaseModel
from .session import FINAL, LORA_FILE, Session, attempt_weights_dir, reading
from .train import add_lora

log = logging.getLogger(__name__)


def attempt_config(session: Session, name: str | None = None) -> dict:
    path = session.attempt_dir(session.attempt(name).name) / "config.json"
    with reading(path, "the attempt's settings are lost, so train it again (its weights stay where they are)"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"it holds a {type(config).__name__}, not settings")
    return config


def attempt_pipeline(base: BaseModel, session: Session, name: str | None = None, checkpoint: int | None = None):
    """A pipeline of the base model's class (its family's: StableDiffusionPipeline, StableDiffusionXLPipeline) with the weights of
    attempt `name` (NAME or NAME@STEP; or `checkpoint`'s step); parts it did not change are the base's own objects."""
    weights_dir = attempt_weights_dir(session, name, checkpoint)
    config = attempt_config(session, name)
    with reading(weights_dir, "use another checkpoint of the attempt, or train it again"):
        return pipeline_with_weights(base, weights_dir, config)


def pipeline_with_weights(base: BaseModel, weights_dir: Path, config: dict):
    components = dict(base.pipeline.components)
    if weights_dir.name != FINAL:
        components.update(_from_checkpoint(base, weights_dir, config))
    elif (weights_dir / LORA_FILE).is_file():
        return _with_lora_file(base, weights_dir / LORA_FILE)
    else:
        components.update(_from_folders(base, weights_dir))
    return base.family.assemble(base.pipeline, **components)


def lora_file_parts(base: BaseModel, lora_file: Path) -> list[str]:
    """The parts a LoRA file in diffusers' names adapts (its keys start with the part's name: `unet.`, `text_encoder.`)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        prefixes = {key.split(".", 1)[0] for key in f.keys()}
    return [part for part in base.family.trained_parts if part in prefixes]


def _with_lora_file(base: BaseModel, lora_file: Path):
    """diffusers' own loader reads the file (alpha/rank from its metadata) into copies of the parts it adapts, then fuses
    it, so the pipeline samples as fast as the base."""
    components = dict(base.pipeline.components)
    parts = lora_file_parts(base, lora_file)
    for part in parts:
        components[part] = copy.deepcopy(components[part])
    pipe = base.family.assemble(base.pipeline, **components)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora(components=parts)
    return pipe


def _from_folders(base: BaseModel, weights_dir: Path) -> dict:
    """A full fine-tune's final/: a diffusers folder for each part it trained, loaded with the base part's own class
    (UNet2DConditionModel, CLIPTextModel, SDXL's CLIPTextModelWithProjection), dtype and device."""
    parts = {}
    for part in base.family.trained_parts:
        module = getattr(base.pipeline, part, None)
        if module is not None and (weights_dir / part).is_dir():
            parts[part] = type(module).from_pretrained(weights_dir / part, dtype=module.dtype).to(module.device)
    return parts


def _from_checkpoint(base: BaseModel, checkpoint_dir: Path, config: dict) -> dict:
    """Copies of the base parts with a checkpoint's weights loaded into them."""
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint_dir / "weights.safetensors"))
    parts = {}
    for part in base.family.trained_parts:
        prefix, module = part + ".", getattr(base.pipeline, part, None)
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not state or module is None:
            continue
        model = copy.deepcopy(module)
        if config.get("method") == "lora":
            from peft.utils import set_peft_model_state_dict

            add_lora(model, config["lora_rank"], config["lora_alpha"], base.family.lora_targets(part))
            set_peft_model_state_dict(model, state)
            merge_lora(model)
        else:
            model.load_state_dict({k: v.to(module.dtype) for k, v in state.items()})
        parts[part] = model.to(module.device)
    return parts


def merge_lora(model) -> None:
    """Adds each LoRA adapter into the layer it wraps and puts the plain layer back (as diffusers' fuse_lora and
    unload_lora_weights do for the LoRA files they load): a model like any other, for sampling and export."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


@torch.no_grad()
def denoising_error(pipe, latents: torch.Tensor, prompt: str, *, seed: int = 0, timesteps=(100, 300, 500, 700)) -> float:
    """How well a model denoises given latents under a prompt (mean squared error of its prediction of the family's
    training target at fixed timesteps and noise). A model that learned the instance photos scores lower on them."""
    family = families.of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser)
    device, dtype = denoiser.device, denoiser.dtype
    schedule = family.noise_schedule(pipe.scheduler, "cpu")
    embeds, extra = family.text_inputs(pipe, prompt, latents)
    generator = torch.Generator().manual_seed(seed)
    errors = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        t_batch = schedule.at(torch.full((latents.shape[0],), t, dtype=torch.long))
        noisy, target = schedule.noisy_and_target(latents, noise, t_batch)
        pred = family.predict(denoiser, noisy.to(device, dtype), t_batch.to(device), embeds, extra)
        errors.append(torch.mean((pred.float().cpu() - target) ** 2).item())
    return sum(errors) / len(errors)


@dataclass
class Comparison:
    grid: Any                           # PIL image: prompts down, attempts × seeds across
    prompts: list[str]                  # with {token} and {class} filled in
    samples: dict[str, list[Any]]       # attempt name → its Samples, prompt-major then seed


def comparison_grid(
    session: Session,
    base: BaseModel,
    attempt_names: list[str],
    prompts: list[str] | None = None,
    seeds=(1, 2),
    *,
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    scheduler: str = "dpm++",
    checkpoint: int | None = None,
    cell_size: int | None = None,
    compile_unet: bool = False,
) -> Comparison:
    """Generate the same prompts and seeds with each attempt ('base' is the untrained model) and lay
    them out in one labelled grid; column labels name only the settings that differ between attempts.
    `cell_size` enlarges small images (the CPU demo's 64 px) so the grid stays readable; `compile_unet`
    is `generate`'s (every attempt reuses the same compiled code)."""
    from .grid import differing_settings, make_grid
    from .sample import PROBE_PROMPTS, SampleSettings, expand_prompt, generate

    seeds = list(seeds)
    configs = {name: attempt_config(session, name) for name in attempt_names if name != "base"}
    first = next(iter(configs.values()), {})
    prompts = [expand_prompt(p, first.get("token", ""), first.get("class_word", "")) for p in (prompts or PROBE_PROMPTS)]
    lineage = {name: f"from {c['parent']}" for name, c in configs.items() if c.get("parent")}  # what it continued
    labels = differing_settings(configs) if len(configs) > 1 else lineage
    samples: dict[str, list[Any]] = {}
    col_labels = []
    for name in attempt_names:
        pipe = base.pipeline if name == "base" else attempt_pipeline(base, session, name, checkpoint)
        settings = [
            SampleSettings(prompt=p, negative_prompt=negative_prompt, seed=s, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, scheduler=scheduler, attempt=name, base_model=base.info.source)
            for p in prompts for s in seeds
        ]
        samples[name] = generate(pipe, settings, progress=False, compile_unet=compile_unet)
        col_labels += [f"{name} · seed {s}" + (f"\n{labels[name]}" if labels.get(name) else "") for s in seeds]
    rows = [
        [sample.image for name in attempt_names for sample in samples[name][i * len(seeds):(i + 1) * len(seeds)]]
        for i in range(len(prompts))
    ]
    return Comparison(grid=make_grid(rows, prompts, col_labels, cell_size=cell_size), prompts=prompts, samples=samples)
