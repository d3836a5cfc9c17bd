"""Seeded, batched generation from a ready pipeline, with settings stored in every PNG.

An image here depends only on its own `SampleSettings`: each image gets its own
`torch.Generator` seeded by its own seed, so it comes out the same whether it ran alone or
inside a batch, and the settings written into the PNG (in AUTOMATIC1111's "parameters"
format, which A1111, ComfyUI and civitai read) are enough to make it again.

Loading the pipeline for an attempt is not done here: callers pass a ready pipeline of the model's family
(`dreamnb.families`) in whatever dtype (fp16/bf16/fp32) and on whatever device they chose; the native size (512/768 px,
SDXL's and FLUX.1's 1024), its samplers and its default guidance are the family's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, PngImagePlugin

from . import families
from .fileio import save_with

log = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """Everything needed to make one image again (`attempt` and `base_model` say which model)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float | None = None  # None: the model's own (7.5 for Stable Diffusion, 3.5 for FLUX.1)
    scheduler: str = "dpm++"
    width: int | None = None   # None: the model's native size
    height: int | None = None
    attempt: str | None = None
    base_model: str | None = None


@dataclass
class Sample:
    image: Image.Image
    settings: SampleSettings


# Prompts that show, in every comparison grid, whether an attempt overfit or its token is weak.
PROBE_PROMPTS: list[str] = [
    # The baseline: does the attempt know the subject at all? A weak token gives a generic {class}.
    "a photo of {token} {class}",
    # Overfit attempts ignore the style and paste in one of the training photos.
    "an oil painting of {token} {class} in the style of Vincent van Gogh",
    # Overfit attempts give both figures the subject's face, or melt them into one monster.
    "a photo of {token} {class} standing next to another {class}",
    # Prior drift: the class word alone should still give varied {class}es, not the subject.
    "a photo of a {class}",
    # No token, no class: the subject leaking in here means the whole model drifted.
    "a portrait photo of an old fisherman with a grey beard, golden hour",
]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def expand_prompt(prompt: str, token: str, class_word: str) -> str:
    """Replace `{token}` and `{class}` in a prompt, so probe prompts work for any subject."""
    values = {"token": token, "class": class_word}

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(
                f"The prompt {prompt!r} has an unknown placeholder {{{name}}}; "
                "only {token} and {class} can be used."
            )
        if not values[name]:
            raise ValueError(f"The prompt {prompt!r} uses {{{name}}} but no {name} was given; pass one.")
        return values[name]

    return _PLACEHOLDER.sub(replace, prompt)


@dataclass(frozen=True)
class _SchedulerChoice:
    class_name: str          # a diffusers scheduler class
    a1111_name: str          # what A1111 calls the same sampler
    config: dict[str, Any]   # set explicitly, so that switching back and forth never leaks a tweak


# Small on purpose: the samplers people compare in practice. Every entry sets every tweak that
# another entry changes, because `from_config` carries the previous scheduler's values along.
SCHEDULERS: dict[str, _SchedulerChoice] = {
    "dpm++": _SchedulerChoice(
        "DPMSolverMultistepScheduler", "DPM++ 2M",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++-karras": _SchedulerChoice(
        "DPMSolverMultistepScheduler", "DPM++ 2M Karras",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": _SchedulerChoice("EulerDiscreteScheduler", "Euler", {"use_karras_sigmas": False}),
    "euler-a": _SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a", {}),
    "ddim": _SchedulerChoice("DDIMScheduler", "DDIM", {}),
    # flow-matching models' (FLUX.1's) own sampler; A1111-Forge calls it Euler with the Simple schedule
    "flow-euler": _SchedulerChoice("FlowMatchEulerDiscreteScheduler", "Euler Simple", {}),
}


def _scheduler_choice(name: str) -> _SchedulerChoice:
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; use one of: {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[name]


def set_scheduler(pipe, name: str) -> None:
    """Give `pipe` a fresh scheduler of the named kind, keeping the model's noise schedule."""
    import diffusers

    choice = _scheduler_choice(name)
    scheduler_class = getattr(diffusers, choice.class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **choice.config)


def check_settings(settings: SampleSettings) -> None:
    """Raise a one-sentence ValueError for settings that cannot be generated."""
    if not isinstance(settings.prompt, str) or not settings.prompt.strip():
        raise ValueError("The prompt is empty; write what the image should show.")
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, int) or settings.seed < 0:
        raise ValueError(f"The seed must be a whole number of 0 or more, not {settings.seed!r}.")
    if not isinstance(settings.num_inference_steps, int) or settings.num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a whole number of 1 or more, not {settings.num_inference_steps!r}.")
    if settings.guidance_scale is not None and settings.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be 0 or more, not {settings.guidance_scale!r}.")
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
            raise ValueError(f"The {name} must be a multiple of 8 (e.g. 512), not {value!r}.")
    _scheduler_choice(settings.scheduler)


def generate(
    pipe,
    settings: list[SampleSettings],
    *,
    batch_size: int = 4,
    progress: bool = True,
    on_batch_end: Callable[[int, int], None] | None = None,
    cuda_graphs: bool = True,
    compile_unet: bool = False,
) -> list[Sample]:
    """Generate one image per settings, in the same order, batching those that can run together.

    Settings that share steps, guidance, scheduler and size run in batches of up to
    `batch_size` (prompts may differ inside a batch). `on_batch_end(done, total)` is called
    after each batch, for a progress display. The pipeline's scheduler and progress-bar
    setting are restored afterwards. On a GPU the UNet replays CUDA graphs (`cuda_graphs`),
    several times faster at these batch sizes; the first call per batch shape records them.
    `compile_unet` runs the UNet through torch.compile: worth it for long sampling sessions only,
    as each new batch size first waits for a compile (about 45 s on an H200, seconds once cached).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, not {batch_size!r}.")
    for item in settings:
        check_settings(item)
    device = getattr(pipe, "_execution_device", pipe.device)
    family = families.of_pipeline(pipe)
    native_size = family.native_resolution(pipe)

    groups: dict[tuple, list[int]] = {}
    for index, item in enumerate(settings):
        scheduler = item.scheduler if item.scheduler in family.samplers else family.samplers[0]  # the model's own kind
        guidance = family.sampling_guidance if item.guidance_scale is None else float(item.guidance_scale)
        key = (item.num_inference_steps, guidance, scheduler,
               item.width or native_size, item.height or native_size)
        groups.setdefault(key, []).append(index)

    results: list[Sample | None] = [None] * len(settings)
    family.fast_sampling(pipe, cuda_graphs=cuda_graphs, compile_unet=compile_unet)
    old_scheduler = pipe.scheduler
    old_progress = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**old_progress, "disable": not progress})
    done = 0
    try:
        for (steps, guidance, scheduler, width, height), indices in groups.items():
            set_scheduler(pipe, scheduler)
            for start in range(0, len(indices), batch_size):
                batch = [settings[i] for i in indices[start:start + batch_size]]
                log.info("generating %d image(s): %d steps, %s, CFG %s, %dx%d",
                         len(batch), steps, scheduler, guidance, width, height)
                latents = pipe(
                    prompt=[s.prompt for s in batch],
                    # None when there is none: each pipeline's own "no negative prompt" (SDXL's: zero embeddings)
                    negative_prompt=[s.negative_prompt for s in batch] if any(s.negative_prompt for s in batch) else None,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    # One generator per image: its noise depends on its own seed only.
                    generator=[torch.Generator(device=device).manual_seed(s.seed) for s in batch],
                    output_type="latent",
                ).images
                images = decode_latents(pipe, latents, height, width)
                for i, s, image in zip(indices[start:start + batch_size], batch, images):
                    results[i] = Sample(image=image, settings=dataclasses.replace(s, width=width, height=height, scheduler=scheduler,
                                                                                      guidance_scale=guidance))
                done += len(batch)
                if on_batch_end is not None:
                    on_batch_end(done, len(settings))
    finally:
        pipe.scheduler = old_scheduler
        pipe.set_progress_bar_config(**old_progress)
    return results  # type: ignore[return-value]


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    """PIL images from a pipeline's final latents, as its own decoding step makes them, but with the latents cast to the
    VAE's dtype first: dreamnb keeps SDXL's VAE in fp32 under an fp16 UNet (see models.load_base_model), and diffusers'
    SDXL pipeline casts the latents for that only on Apple's MPS (elsewhere fp16 latents meet fp32 weights and fail)."""
    vae = pipe.vae
    latents = families.of_pipeline(pipe).latents_for_vae(pipe, latents, height, width).to(vae.device, vae.dtype)
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:  # VAEs that normalise their latents per channel
        shape = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
    image = torch.cat([vae.decode(row[None], return_dict=False)[0] for row in latents])  # one at a time: ~3 GB each at 1024 px in fp32
    if getattr(pipe, "watermark", None) is not None:  # SDXL's invisible watermark, where the pipeline would add it
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")


# --- AUTOMATIC1111 "parameters" text --------------------------------------------------------

# A1111's own pattern for one "Key: value" pair of the last line (modules/infotext_utils.py).
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
_ATTEMPT_KEY = "dreamnb attempt"


def _quote(value: Any) -> str:
    """A1111's quoting: a value with a comma, colon or newline is written as a JSON string."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def a1111_parameters(settings: SampleSettings) -> str:
    """The settings as AUTOMATIC1111 writes them into a PNG's "parameters" text chunk."""
    fields: dict[str, Any] = {
        "Steps": settings.num_inference_steps,
        "Sampler": _scheduler_choice(settings.scheduler).a1111_name,
        # None: the model's own, which `generate` writes in before its samples are saved
        **({} if settings.guidance_scale is None else {"CFG scale": float(settings.guidance_scale)}),
        "Seed": settings.seed,
    }
    if settings.width is not None and settings.height is not None:
        fields["Size"] = f"{settings.width}x{settings.height}"
    if settings.base_model:
        fields["Model"] = settings.base_model
    if settings.attempt:
        fields[_ATTEMPT_KEY] = settings.attempt
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> SampleSettings:
    """Read A1111 "parameters" text (ours or A1111's own) back into SampleSettings.

    Follows A1111's own parser: the last line holds the "Key: value" pairs when it has at
    least three; the lines before it are the prompt, then the negative prompt. Keys dreamnb
    does not use (Model hash, VAE, Version, ...) are ignored.
    """
    if not text or not text.strip():
        raise ValueError("The parameters text is empty; there are no settings to read.")
    *lines, last_line = text.strip().split("\n")
    pairs = _A1111_PARAM.findall(last_line)
    if len(pairs) < 3:
        lines.append(last_line)
        pairs = []
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative_lines.append(line[len("Negative prompt:"):].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    fields = {key.strip(): _unquote(value.strip()) for key, value in pairs}

    settings = SampleSettings(prompt="\n".join(prompt_lines), negative_prompt="\n".join(negative_lines))
    if "Steps" in fields:
        settings.num_inference_steps = _parse_number(fields, "Steps", int)
    if "CFG scale" in fields:
        settings.guidance_scale = _parse_number(fields, "CFG scale", float)
    if "Seed" in fields:
        settings.seed = _parse_number(fields, "Seed", int)
    if "Sampler" in fields:
        settings.scheduler = _scheduler_from_a1111(fields["Sampler"], fields.get("Schedule type", ""))
    if "Size" in fields:
        match = _A1111_SIZE.match(fields["Size"])
        if not match:
            raise ValueError(f"The Size {fields['Size']!r} in the parameters text is not WIDTHxHEIGHT, e.g. 512x512.")
        settings.width, settings.height = int(match.group(1)), int(match.group(2))
    settings.base_model = fields.get("Model") or None
    settings.attempt = fields.get(_ATTEMPT_KEY) or None
    return settings


def _parse_number(fields: dict[str, str], key: str, kind: type) -> Any:
    try:
        return kind(fields[key])
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"The {key} value {fields[key]!r} in the parameters text is not {what}.") from None


def _scheduler_from_a1111(sampler: str, schedule_type: str) -> str:
    """Map A1111's sampler name (and, since A1111 1.9, its separate "Schedule type") to ours."""
    name = sampler.strip()
    if schedule_type.strip().lower() not in ("", "automatic") and not name.lower().endswith(schedule_type.strip().lower()):
        name = f"{name} {schedule_type.strip()}"
    for key, choice in SCHEDULERS.items():
        if choice.a1111_name.lower() == name.lower():
            return key
    known = ", ".join(choice.a1111_name for choice in SCHEDULERS.values())
    raise ValueError(f"The sampler {name!r} is not one dreamnb can use; these are: {known}.")


# --- PNG files ---------------------------------------------------------------------------------

def save_png(sample: Sample, path: str | Path) -> Path:
    """Write the image as a PNG whose "parameters" text chunk holds its settings, atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path} does not end in .png; samples are saved as PNG so their settings travel with them.")
    info = PngImagePlugin.PngInfo()
    # Pillow writes a tEXt chunk, or an iTXt chunk when the text is not Latin-1 (as A1111 does).
    info.add_text("parameters", a1111_parameters(sample.settings))
    save_with(path, lambda tmp: sample.image.save(tmp, format="PNG", pnginfo=info))
    return path


def read_png_settings(path: str | Path) -> SampleSettings:
    """The settings stored in a PNG saved by dreamnb or AUTOMATIC1111."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("parameters") or image.info.get("parameters")
    if not text:
        raise ValueError(f"{path} has no 'parameters' text; it was not saved by dreamnb or AUTOMATIC1111.")
    return parse_parameters(text)
