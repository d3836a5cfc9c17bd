"""Find and load a Stable Diffusion base model: a Hub id, a local diffusers folder, or a single file.

What each source is gets checked before the (slow) load, so a wrong one fails at once with one
sentence saying what is wrong and what to do: SDXL/SD3/Flux, a LoRA given as a base model, a
damaged download, a folder that is not a diffusers model, a Hub id while offline.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSUPPORTED_CLASSES = {
    "StableDiffusionXLPipeline": "Stable Diffusion XL",
    "StableDiffusionXLImg2ImgPipeline": "Stable Diffusion XL",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
}
_SUPPORTED = "Stable Diffusion 1.x or 2.x"


class ModelError(UserError):
    """A base model that cannot be used; the message says what is wrong and what to do."""


@dataclass
class ModelInfo:
    source: str            # what the user gave
    source_kind: str       # "hub" | "folder" | "single_file" | "url"
    family: str            # "sd1" | "sd2"
    prediction_type: str   # "epsilon" | "v_prediction"
    resolution: int        # native image size: 512 or 768 for real models

    def describe(self) -> str:
        family = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}[self.family]
        return f"{family}, {self.prediction_type}, {self.resolution} px ({self.source_kind}: {self.source})"


@dataclass(frozen=True)
class Placement:
    """Where a base model lives and in which number format. Decided once, by `default_placement`, when the model
    is loaded; everything that uses the base model (class images, previews, sampling, compare, export) runs
    where it is, and training makes its own copies in its own formats from it."""

    device: torch.device
    dtype: torch.dtype


def default_placement() -> Placement:
    """The GPU when there is one, in fp16 (what sampling uses; a full fine-tune copies its weights from it: fp16 has
    more significant bits than bf16 training weights, though magnitudes under 6e-5 keep fewer); else the CPU in fp32.
    Under `accelerate launch` each process takes its own GPU (LOCAL_RANK)."""
    if torch.cuda.is_available():
        return Placement(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.float16)
    return Placement(torch.device("cpu"), torch.float32)


@dataclass
class BaseModel:
    info: ModelInfo
    pipeline: Any  # diffusers.StableDiffusionPipeline, on `placement`

    @property
    def placement(self) -> Placement:
        return Placement(self.pipeline.unet.device, self.pipeline.unet.dtype)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def text_encoder(self):
        return self.pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer


def resolve_hf_token() -> str | None:
    """A Hugging Face token from HF_TOKEN or Colab's secrets; None lets huggingface_hub use a stored login.

    The token is only ever passed to huggingface_hub; it is never logged, printed or written anywhere.
    """
    from .colab import read_secret

    return read_secret("HF_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def source_kind(source: str | os.PathLike) -> str:
    """'folder', 'single_file', 'url' (an http(s) link, see dreamnb.download) or 'hub' — or a ModelError when it is none of them."""
    text = str(source)
    if text.strip().lower().startswith(("http://", "https://")):
        return "url"
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "single_file"
    looks_like_path = text.lower().endswith(SINGLE_FILE_SUFFIXES) or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_like_path:
        raise ModelError(f"There is no file or folder at {text}; check the path (on Colab, is Drive mounted?).")
    if _HUB_ID_RE.match(text):
        return "hub"
    raise ModelError(f"{text!r} is neither a local file or folder nor a Hugging Face model id like {DEFAULT_MODEL!r}.")


# --- checks before loading --------------------------------------------------------------------------

def _check_pipeline_class(class_name: str | None, where: str) -> None:
    if class_name in _UNSUPPORTED_CLASSES:
        raise ModelError(f"{where} is a {_UNSUPPORTED_CLASSES[class_name]} model, which dreamnb does not support yet; use a {_SUPPORTED} model such as {DEFAULT_MODEL}.")
    if class_name and not class_name.startswith("StableDiffusion"):
        raise ModelError(f"{where} is a {class_name}, not a {_SUPPORTED} model; use a model such as {DEFAULT_MODEL}.")


def check_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{path} is a folder but not a diffusers model (it has no model_index.json); give the folder that contains model_index.json, or a .safetensors file.")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except ValueError as err:
        raise ModelError(f"{index} is damaged ({err}); download the model again.") from err
    _check_pipeline_class(class_name, str(path))
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / part).is_dir()]
    if missing:
        raise ModelError(f"{path} lacks the {', '.join(missing)} part(s) of a Stable Diffusion model; download the whole model folder again.")


def read_checkpoint_keys(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The tensor names (and a few shapes) of a single-file checkpoint, without loading it all when possible.

    safetensors checks its header against the file size, so a truncated download fails here already."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys if k.endswith("input_blocks.0.0.weight")}
            return keys, shapes
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"{path.name} could not be read as a model checkpoint ({_short(err)}); it is probably damaged or an incomplete download, so download it again.") from err
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path.name} does not contain model weights; give a Stable Diffusion checkpoint.")
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    shapes = {k: tuple(state[k].shape) for k in keys if k.endswith("input_blocks.0.0.weight")}
    return keys, shapes


def classify_checkpoint(keys: list[str], shapes: dict[str, tuple[int, ...]], name: str) -> str:
    """'sd1' or 'sd2' for a supported checkpoint; a ModelError naming what it is otherwise."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(("lora_down" in k or "lora_up" in k or "lora_A" in k or "lora_B" in k or k.startswith("lora_")) for k in keys):
        raise ModelError(f"{name} is a LoRA (small add-on weights), not a base model; choose a base model such as {DEFAULT_MODEL} and load the LoRA after training or sampling.")
    if has("conditioner.embedders"):
        raise ModelError(f"{name} is a Stable Diffusion XL checkpoint, which dreamnb does not support yet; use a {_SUPPORTED} checkpoint.")
    if has("model.diffusion_model.joint_blocks") or has("joint_blocks"):
        raise ModelError(f"{name} is a Stable Diffusion 3 checkpoint, which dreamnb does not support yet; use a {_SUPPORTED} checkpoint.")
    if has("double_blocks") or has("model.diffusion_model.double_blocks"):
        raise ModelError(f"{name} is a Flux checkpoint, which dreamnb does not support yet; use a {_SUPPORTED} checkpoint.")
    if not has("model.diffusion_model.input_blocks"):
        raise ModelError(f"{name} is not a Stable Diffusion checkpoint (no UNet weights in the original layout); give a {_SUPPORTED} .safetensors or .ckpt file.")
    in_shape = next(iter(shapes.values()), None)
    if in_shape is not None and len(in_shape) == 4 and in_shape[1] != 4:
        raise ModelError(f"{name} is an inpainting or other special model ({in_shape[1]} input channels); use a normal {_SUPPORTED} checkpoint.")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ModelError(f"{name} has no text encoder weights, so it cannot be trained; use a full {_SUPPORTED} checkpoint.")


# --- loading ----------------------------------------------------------------------------------------

def load_base_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    config: str | os.PathLike | None = None,
    placement: Placement | None = None,
    prediction_type: str | None = None,
    local_files_only: bool | None = None,
) -> BaseModel:
    """Load a base model as a StableDiffusionPipeline plus what it is (family, prediction, size), on `placement`
    (default: `default_placement()`, the GPU in fp16 when there is one).

    `config` is only for single files: a diffusers folder or Hub id whose configs describe the file
    (diffusers guesses one from the weights when it is None). `prediction_type` overrides what was
    detected (an SD 2.x file alone cannot say whether it is v-prediction).
    """
    from diffusers import StableDiffusionPipeline

    source = str(source)
    kind = source_kind(source)
    token = resolve_hf_token()
    placement = placement or default_placement()
    common = dict(dtype=placement.dtype, safety_checker=None, requires_safety_checker=False)
    path = Path(source).expanduser()
    if kind == "url":  # downloaded once into a cache, then loaded as the single file it is
        from .download import download_model, shown_url

        path, source = download_model(source), shown_url(source)  # what is shown and saved holds no token
    if kind == "folder":
        check_folder(Path(source))
        pipe = _load(lambda: StableDiffusionPipeline.from_pretrained(source, **common), source)
    elif kind in ("single_file", "url"):
        keys, shapes = read_checkpoint_keys(path)
        classify_checkpoint(keys, shapes, path.name)
        extra: dict[str, Any] = {}
        if config is not None:
            extra["config"] = str(config)
            if Path(str(config)).is_dir():
                extra["local_files_only"] = True
        yaml = path.with_suffix(".yaml")
        if yaml.is_file() and config is None:
            extra["original_config"] = str(yaml)
        if "v_pred" in keys and prediction_type is None:
            prediction_type = "v_prediction"
        pipe = _load(lambda: StableDiffusionPipeline.from_single_file(str(path), token=token, **common, **extra), source)
    else:
        check_hub_model(source, token=token, local_files_only=local_files_only)
        pipe = _load(
            lambda: StableDiffusionPipeline.from_pretrained(source, token=token, local_files_only=bool(local_files_only), **common),
            source,
        )
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    info = describe_pipeline(pipe, source, kind)
    pipe.to(placement.device)
    log.info("loaded %s on %s in %s", info.describe(), placement.device, placement.dtype)
    return BaseModel(info=info, pipeline=pipe)


def check_hub_model(repo_id: str, *, token: str | None, local_files_only: bool | None = None) -> None:
    """Fetch only model_index.json first: fails fast (offline, gated, wrong kind) before gigabytes move."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    try:
        index = hf_hub_download(repo_id, "model_index.json", token=token, local_files_only=bool(local_files_only))
    except hf_errors.GatedRepoError as err:
        raise ModelError(f"{repo_id} is gated: accept its licence on its Hugging Face page, then set HF_TOKEN (or add it to Colab's secrets).") from err
    except hf_errors.RepositoryNotFoundError as err:
        raise ModelError(f"There is no model {repo_id!r} on the Hugging Face Hub, or it is private; check the spelling, or set HF_TOKEN if it is yours.") from err
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as err:  # before EntryNotFoundError: a subclass
        raise ModelError(f"Cannot download {repo_id} (no connection to the Hugging Face Hub) and it is not in the local cache; connect to the internet, or give a local diffusers folder or .safetensors file.") from err
    except hf_errors.EntryNotFoundError as err:
        raise ModelError(f"{repo_id} on the Hugging Face Hub is not a diffusers model (no model_index.json); give a diffusers model id, or download its .safetensors file and give that path.") from err
    except OSError as err:  # connection errors that huggingface_hub did not wrap
        raise ModelError(f"Cannot download {repo_id} ({_short(err)}); check the internet connection, or give a local diffusers folder or .safetensors file.") from err
    _check_pipeline_class(json.loads(Path(index).read_text()).get("_class_name"), repo_id)


def _load(load, source: str):
    try:
        return load()
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{source} could not be loaded as a {_SUPPORTED} model ({_short(err)}); check that it is complete and of a supported kind.") from err


def describe_pipeline(pipe, source: str, kind: str) -> ModelInfo:
    te_config = pipe.text_encoder.config
    unet_config = pipe.unet.config
    if getattr(unet_config, "addition_embed_type", None):
        raise ModelError(f"{source} is not a {_SUPPORTED} model (its UNet takes extra conditioning, like SDXL).")
    sd2 = getattr(te_config, "hidden_act", "quick_gelu") == "gelu" or bool(unet_config.use_linear_projection)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return ModelInfo(
        source=source,
        source_kind=kind,
        family="sd2" if sd2 else "sd1",
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        resolution=int(unet_config.sample_size) * vae_scale,
    )


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
