"""The model families dreamnb trains, and which one a model is (from a Hub id's or a folder's model_index.json, a
single file's keys, or a loaded pipeline). Each family is one module (`base.py` says what it answers); a new family is
a new module listed in `_MODULES`.
"""
from __future__ import annotations

from .base import SUPPORTED, Family, ModelError, PromptEncoder
from . import flux, sd, sdxl

_MODULES = (sdxl, flux, sd)  # in the order single files and pipeline classes are matched: SDXL's checks before SD's
FAMILIES: dict[str, Family] = {family.key: family for module in _MODULES for family in module.FAMILIES}
DEFAULT = sd.SD1.key  # the family of the default model (sd.SD15_MODEL): whose presets apply while no model is chosen
_UNSUPPORTED_CLASSES = {
    "StableDiffusionXLInpaintPipeline": "Stable Diffusion XL inpainting",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
}
_EXAMPLE = sd.SD15_MODEL

__all__ = ["FAMILIES", "Family", "ModelError", "PromptEncoder", "SUPPORTED", "from_checkpoint", "from_class_name", "get", "of_pipeline"]


def get(key: str | None) -> Family:
    """The family saved under `key` (`ModelInfo.family`); None: the default model's (SD 1.x), while none is chosen."""
    try:
        return FAMILIES[key or DEFAULT]
    except KeyError:
        raise ModelError(f"{key!r} is not a model family dreamnb knows; use a {SUPPORTED} model.") from None


def from_class_name(class_name: str | None, where: str) -> Family:
    """The family of a diffusers pipeline class (model_index.json's `_class_name`); a ModelError for anything else."""
    if class_name == sdxl.REFINER_CLASS:
        raise sdxl.refiner_error(where)
    if class_name in _UNSUPPORTED_CLASSES:
        raise ModelError(f"{where} is a {_UNSUPPORTED_CLASSES[class_name]} model, which dreamnb does not support yet; use a {SUPPORTED} model such as {_EXAMPLE}.")
    for family in FAMILIES.values():
        if family.claims_class(class_name):
            return family
    raise ModelError(f"{where} is a {class_name}, not a {SUPPORTED} model; use a model such as {_EXAMPLE}.")


def of_pipeline(pipe) -> Family:
    """The family of a pipeline already made (SD 1.x and 2.x answer alike for everything a pipeline can be asked)."""
    return from_class_name(type(pipe).__name__, type(pipe).__name__)


def from_checkpoint(keys: list[str], shapes: dict[str, tuple[int, ...]], name: str) -> Family:
    """The family of a single-file checkpoint from its tensor names (and the first layer's shape); a ModelError naming
    what it is otherwise."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(("lora_down" in k or "lora_up" in k or "lora_A" in k or "lora_B" in k or k.startswith("lora_")) for k in keys):
        raise ModelError(f"{name} is a LoRA (small add-on weights), not a base model; choose a base model such as {_EXAMPLE} and load the LoRA after training or sampling.")
    for family in FAMILIES.values():
        found = family.recognise_checkpoint(keys, shapes, name)
        if found is not None:
            return found
    if has("model.diffusion_model.joint_blocks") or has("joint_blocks"):
        raise ModelError(f"{name} is a Stable Diffusion 3 checkpoint, which dreamnb does not support yet; use a {SUPPORTED} checkpoint.")
    if not has("model.diffusion_model.input_blocks"):
        raise ModelError(f"{name} is not a Stable Diffusion checkpoint (no UNet weights in the original layout); give a {SUPPORTED} .safetensors or .ckpt file.")
    raise ModelError(f"{name} has no text encoder weights, so it cannot be trained; use a full {SUPPORTED} checkpoint.")
