"""Find and load a Stable Diffusion base model: a Hub id, a local diffusers folder, or a single file.

What each source is gets checked before the (slow) load, so a wrong one fails at once with one
sentence saying what is wrong and what to do: the SDXL refiner, SD3, Flux, a LoRA given as a base
model, a damaged download, a folder that is not a diffusers model, a Hub id while offline.

Whether a source is SDXL or SD 1.x/2.x is decided once, before loading, by `_check_source` (from
model_index.json's `_class_name` or the checkpoint's keys); it picks the pipeline class, and the
loaded model carries it on as `ModelInfo.family`.

Another VAE can replace the model's own (`load_base_model(vae=...)`), above all madebyollin/sdxl-vae-fp16-fix: SDXL's
own VAE overflows in fp16 and is kept in fp32, this one stays in fp16. It is checked like the model, before the load.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SDXL_FP16_VAE
from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SDXL_CLASS = "StableDiffusionXLPipeline"
_UNSUPPORTED_CLASSES = {
    "StableDiffusionXLInpaintPipeline": "Stable Diffusion XL inpainting",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
}
_REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"  # what the SDXL refiner is saved as
_SUPPORTED = "Stable Diffusion 1.x, 2.x or XL"
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}


class ModelError(UserError):
    """A base model that cannot be used; the message says what is wrong and what to do."""


@dataclass
class ModelInfo:
    source: str            # what the user gave
    source_kind: str       # "hub" | "folder" | "single_file" | "url"
    family: str            # "sd1" | "sd2" | "sdxl"
    prediction_type: str   # "epsilon" | "v_prediction"
    resolution: int        # native image size: 512 or 768 for SD 1.x/2.x, 1024 for SDXL
    vae: str | None = None  # another VAE used instead of the model's own, as given; None: its own

    def describe(self) -> str:
        family = FAMILY_NAMES[self.family]
        vae = f", VAE {self.vae}" if self.vae else ""
        return f"{family}, {self.prediction_type}, {self.resolution} px ({self.source_kind}: {self.source}{vae})"

    @property
    def cache_key(self) -> str:
        """What latents and class images made with this model are keyed by: another model, prediction or VAE makes
        other ones. Without a VAE of its own choosing the key is the one caches had before a VAE could be chosen."""
        key = f"{self.source}|{self.family}|{self.prediction_type}"
        return f"{key}|vae={self.vae}" if self.vae else key


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


class ModelBusyError(UserError):
    """The base model is in use by another thread of this process (the notebook's training, which parks it on the CPU)."""


class _Use:
    """Which thread uses a base model now, for what, and how deeply (the trainer parks what it already uses)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.thread: int | None = None
        self.what = ""
        self.depth = 0
        self.parked = False


@dataclass
class BaseModel:
    info: ModelInfo
    pipeline: Any  # diffusers.StableDiffusionPipeline, on `placement`
    _use: _Use = field(default_factory=_Use, init=False, repr=False, compare=False)

    @contextlib.contextmanager
    def in_use(self, what: str, *, wait: bool = False):
        """Use the base model from this thread for the duration; `what` says what for, to whoever is refused. One thread
        at a time: a training run in the notebook's background thread moves its parts to the CPU and back (`parked`),
        and a pipeline is not made to be run from two threads. Another thread's use: ModelBusyError, or with `wait`,
        wait until it ends. The thread that uses it may take it again."""
        use, me = self._use, threading.get_ident()
        with use.changed:
            while use.thread not in (None, me):
                if not wait:
                    where = " (its UNet and text encoder wait on the CPU meanwhile)" if use.parked else ""
                    raise ModelBusyError(f"The base model is in use by {use.what} in this notebook{where}; stop it or wait "
                                         "until it ends, then try again.")
                use.changed.wait()
            if use.thread is None:
                use.thread, use.what = me, what
            use.depth += 1
        try:
            yield self
        finally:
            with use.changed:
                use.depth -= 1
                if not use.depth:
                    use.thread, use.what = None, ""
                    use.changed.notify_all()

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

    @property
    def text_encoder_2(self):
        """SDXL's second text encoder (OpenCLIP bigG, with projection); None for SD 1.x/2.x."""
        return getattr(self.pipeline, "text_encoder_2", None)

    @property
    def tokenizer_2(self):
        """SDXL's second tokenizer (OpenCLIP bigG's: CLIP's vocabulary, padded with "!"); None for SD 1.x/2.x."""
        return getattr(self.pipeline, "tokenizer_2", None)

    @contextlib.contextmanager
    def parked(self):
        """On a GPU, the UNet and text encoder(s) wait on the CPU for the duration, then go back; yields whether they
        moved. A training run works on its own copies and needs the memory: 2 GB for SD 1.5, 6.7 GB for SDXL (fp16),
        which decides whether SDXL fits a T4. Moving back takes a second or two. The VAE stays, for previews.
        Sampling graphs recorded on the UNet point at its old memory, so they are dropped. The model is in use by this
        thread meanwhile (`in_use`): parking waits for another thread's use to end, and another thread's use is refused
        until the parts are back, so nothing ever runs on a half-moved model."""
        with self.in_use("training", wait=True):  # another thread's sampling ends first; none starts while parked
            device = self.placement.device
            if device.type != "cuda":
                yield False
                return
            from .fast import drop_sampling_graphs

            parts = [m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None]
            drop_sampling_graphs(self.unet)
            self._use.parked = True
            try:
                for part in parts:
                    torch.nn.Module.to(part, "cpu")
                torch.cuda.empty_cache()
                yield True
            finally:
                for part in parts:
                    torch.nn.Module.to(part, device)
                self._use.parked = False


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

def _refiner_error(where: str) -> ModelError:
    return ModelError(f"{where} is an SDXL refiner, and the SDXL refiner is not a base model for training; use an SDXL base model such as {SDXL_MODEL}.")


def _check_pipeline_class(class_name: str | None, where: str) -> str:
    """'sdxl' for an SDXL base pipeline, 'sd' for SD 1.x/2.x (told apart once loaded); a ModelError for anything else."""
    if class_name == _REFINER_CLASS:
        raise _refiner_error(where)
    if class_name in _UNSUPPORTED_CLASSES:
        raise ModelError(f"{where} is a {_UNSUPPORTED_CLASSES[class_name]} model, which dreamnb does not support yet; use a {_SUPPORTED} model such as {DEFAULT_MODEL}.")
    if class_name and not class_name.startswith("StableDiffusion"):
        raise ModelError(f"{where} is a {class_name}, not a {_SUPPORTED} model; use a model such as {DEFAULT_MODEL}.")
    return "sdxl" if class_name == _SDXL_CLASS else "sd"


def check_folder(path: Path) -> str:
    """'sdxl' or 'sd' for a usable diffusers folder; a ModelError saying what is wrong otherwise."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{path} is a folder but not a diffusers model (it has no model_index.json); give the folder that contains model_index.json, or a .safetensors file.")
    family = _check_pipeline_class(_class_name(index), str(path))
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2") if family == "sdxl" else ())
    missing = [part for part in parts if not (path / part).is_dir()]
    if missing:
        what = "Stable Diffusion XL" if family == "sdxl" else "Stable Diffusion"
        raise ModelError(f"{path} lacks the {', '.join(missing)} part(s) of a {what} model; download the whole model folder again.")
    return family


def _class_name(config_file: Path) -> str | None:
    """The `_class_name` a diffusers config (model_index.json, config.json) names; a ModelError when it is damaged."""
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise ModelError(f"{config_file} is damaged ({_short(err)}); download the model again.") from err
    return config.get("_class_name") if isinstance(config, dict) else None


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
    """'sd1', 'sd2' or 'sdxl' for a supported checkpoint; a ModelError naming what it is otherwise.

    SDXL files keep their text encoders under `conditioner.embedders`: the base has CLIP ViT-L
    (`0.transformer.`, Hugging Face names) and OpenCLIP bigG (`1.model.`); the refiner has only
    OpenCLIP bigG, as `0.model.`."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(("lora_down" in k or "lora_up" in k or "lora_A" in k or "lora_B" in k or k.startswith("lora_")) for k in keys):
        raise ModelError(f"{name} is a LoRA (small add-on weights), not a base model; choose a base model such as {DEFAULT_MODEL} and load the LoRA after training or sampling.")
    if has("conditioner.embedders.0.model."):
        raise _refiner_error(name)
    if has("model.diffusion_model.joint_blocks") or has("joint_blocks"):
        raise ModelError(f"{name} is a Stable Diffusion 3 checkpoint, which dreamnb does not support yet; use a {_SUPPORTED} checkpoint.")
    if has("double_blocks") or has("model.diffusion_model.double_blocks"):
        raise ModelError(f"{name} is a Flux checkpoint, which dreamnb does not support yet; use a {_SUPPORTED} checkpoint.")
    if not has("model.diffusion_model.input_blocks"):
        raise ModelError(f"{name} is not a Stable Diffusion checkpoint (no UNet weights in the original layout); give a {_SUPPORTED} .safetensors or .ckpt file.")
    in_shape = next(iter(shapes.values()), None)
    if in_shape is not None and len(in_shape) == 4 and in_shape[1] != 4:
        raise ModelError(f"{name} is an inpainting or other special model ({in_shape[1]} input channels); use a normal {_SUPPORTED} checkpoint.")
    if has("conditioner.embedders"):
        if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
            return "sdxl"
        raise ModelError(f"{name} is a Stable Diffusion XL checkpoint without both of its text encoders (CLIP ViT-L and OpenCLIP bigG), so it cannot be trained; use a full SDXL base checkpoint.")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ModelError(f"{name} has no text encoder weights, so it cannot be trained; use a full {_SUPPORTED} checkpoint.")


# --- loading ----------------------------------------------------------------------------------------

@dataclass
class _CheckedSource:
    """What `_check_source` found out before the slow load."""

    kind: str          # as source_kind
    path: Path         # the local folder or file (a URL's downloaded file)
    shown: str         # the source as shown and saved (a URL without any token in it)
    family: str        # "sdxl" or "sd" (1.x and 2.x are told apart once loaded, by describe_pipeline)
    v_prediction: bool = False  # a single file marked as v-prediction (a `v_pred` key)


def _check_source(source: str, *, token: str | None, local_files_only: bool | None) -> _CheckedSource:
    """Check a source before loading it and decide which pipeline loads it: the one place where SDXL vs SD 1.x/2.x is
    decided, from model_index.json's `_class_name` (a folder or Hub id) or from the checkpoint's keys (a single file)."""
    kind = source_kind(source)
    path, shown = Path(source).expanduser(), source
    if kind == "url":  # downloaded once into a cache, then checked and loaded as the single file it is
        from .download import download_model, shown_url

        path, shown = download_model(source), shown_url(source)  # what is shown and saved holds no token
    if kind == "folder":
        return _CheckedSource(kind, path, shown, check_folder(path))
    if kind in ("single_file", "url"):
        keys, shapes = read_checkpoint_keys(path)
        family = "sdxl" if classify_checkpoint(keys, shapes, path.name) == "sdxl" else "sd"
        return _CheckedSource(kind, path, shown, family, v_prediction="v_pred" in keys)
    return _CheckedSource(kind, path, shown, check_hub_model(source, token=token, local_files_only=local_files_only))


def detect_family(source: str | os.PathLike, *, local_files_only: bool | None = None) -> str:
    """'sdxl' or 'sd' (1.x/2.x) without loading the model: the check `load_base_model` starts with, so settings that
    depend on the family (`config.preset_values`) can be chosen before the slow load."""
    return _check_source(str(source), token=resolve_hf_token(), local_files_only=local_files_only).family


def load_base_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    config: str | os.PathLike | None = None,
    placement: Placement | None = None,
    prediction_type: str | None = None,
    local_files_only: bool | None = None,
    vae: str | os.PathLike | None = None,
) -> BaseModel:
    """Load a base model as a StableDiffusionPipeline (SDXL: a StableDiffusionXLPipeline) plus what it is (family,
    prediction, size), on `placement` (default: `default_placement()`, the GPU in fp16 when there is one).

    `config` is only for single files: a diffusers folder or Hub id whose configs describe the file
    (diffusers guesses one from the weights when it is None). `prediction_type` overrides what was
    detected (an SD 2.x file alone cannot say whether it is v-prediction). `vae` is another VAE to use instead of
    the model's own: a Hub id such as madebyollin/sdxl-vae-fp16-fix, a diffusers folder of one, or a single file.
    """
    token = resolve_hf_token()
    placement = placement or default_placement()
    checked = _check_source(str(source), token=token, local_files_only=local_files_only)
    checked_vae = _check_vae_source(str(vae), token=token, local_files_only=local_files_only) if vae else None
    xl = checked.family == "sdxl"
    pipeline_class = family_pipeline_class(checked.family)
    common: dict[str, Any] = dict(dtype=placement.dtype)
    if not xl:  # SDXL's pipeline has no safety checker
        common.update(safety_checker=None, requires_safety_checker=False)
    what = "a Stable Diffusion XL" if xl else "a Stable Diffusion 1.x or 2.x"
    source, path = checked.shown, checked.path
    if checked.kind == "folder":
        pipe = _load(lambda: pipeline_class.from_pretrained(str(path), **common), source, what)
    elif checked.kind in ("single_file", "url"):
        extra: dict[str, Any] = {}
        if config is not None:
            extra["config"] = str(config)
            if Path(str(config)).is_dir():
                extra["local_files_only"] = True
        yaml = path.with_suffix(".yaml")
        if yaml.is_file() and config is None:
            extra["original_config"] = str(yaml)
        if checked.v_prediction and prediction_type is None:
            prediction_type = "v_prediction"
        pipe = _load(lambda: pipeline_class.from_single_file(str(path), token=token, **common, **extra), source, what)
    else:
        pipe = _load(
            lambda: pipeline_class.from_pretrained(source, token=token, local_files_only=bool(local_files_only), **common),
            source, what,
        )
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    info = describe_pipeline(pipe, source, checked.kind)
    if checked_vae is not None:  # before `to`: the model's own VAE never reaches the GPU
        other = _load_vae(checked_vae, pipe.vae, placement.dtype, token=token, local_files_only=local_files_only)
        _check_vae_fits(other, pipe, info, checked_vae.shown)
        pipe.vae, info.vae = other, checked_vae.shown
    pipe.to(placement.device)
    if xl and placement.dtype == torch.float16 and pipe.vae.config.get("force_upcast", True):
        # SDXL's own VAE overflows in fp16 (NaN latents, black images); diffusers marks such a VAE `force_upcast`
        # and its pipeline upcasts it around each decode. Kept in fp32 here instead, so encoding photos for training
        # is safe too. A VAE fine-tuned to stay in fp16 range (madebyollin/sdxl-vae-fp16-fix) says force_upcast=False
        # and stays in fp16. Whoever decodes casts latents to `vae.dtype` (diffusers' SDXL pipeline does not, off MPS).
        pipe.vae.to(torch.float32)
    log.info("loaded %s on %s in %s (VAE in %s)", info.describe(), placement.device, placement.dtype, pipe.vae.dtype)
    return BaseModel(info=info, pipeline=pipe)


def family_pipeline_class(family: str):
    """The diffusers pipeline class of a model family ('sdxl', else SD 1.x/2.x): the one place it is chosen, for loading
    the base model and for every pipeline built around it later (attempts, previews, LoRA files, export)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def check_hub_model(repo_id: str, *, token: str | None, local_files_only: bool | None = None) -> str:
    """Fetch only model_index.json first: fails fast (offline, gated, wrong kind) before gigabytes move. 'sdxl' or 'sd'."""
    index = _hub_file(repo_id, "model_index.json", token=token, local_files_only=local_files_only,
                      missing=f"{repo_id} on the Hugging Face Hub is not a diffusers model (no model_index.json); give a diffusers model id, or download its .safetensors file and give that path.")
    return _check_pipeline_class(_class_name(index), repo_id)


def _hub_file(repo_id: str, filename: str, *, token: str | None, local_files_only: bool | None, missing: str) -> Path:
    """One small file of a Hub repository (downloaded, or from the cache), or a ModelError saying why not; `missing` is
    the sentence for a repository without that file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    try:
        return Path(hf_hub_download(repo_id, filename, token=token, local_files_only=bool(local_files_only)))
    except hf_errors.GatedRepoError as err:
        raise ModelError(f"{repo_id} is gated: accept its licence on its Hugging Face page, then set HF_TOKEN (or add it to Colab's secrets).") from err
    except hf_errors.RepositoryNotFoundError as err:
        raise ModelError(f"There is no model {repo_id!r} on the Hugging Face Hub, or it is private; check the spelling, or set HF_TOKEN if it is yours.") from err
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as err:  # before EntryNotFoundError: a subclass
        raise ModelError(f"Cannot download {repo_id} (no connection to the Hugging Face Hub) and it is not in the local cache; connect to the internet, or give a local diffusers folder or .safetensors file.") from err
    except hf_errors.EntryNotFoundError as err:
        raise ModelError(missing) from err
    except OSError as err:  # connection errors that huggingface_hub did not wrap
        raise ModelError(f"Cannot download {repo_id} ({_short(err)}); check the internet connection, or give a local diffusers folder or .safetensors file.") from err


# --- another VAE ------------------------------------------------------------------------------------

@dataclass
class _CheckedVae:
    """What `_check_vae_source` found out before the load."""

    kind: str   # "hub" | "folder" | "single_file" (a URL's too, once downloaded)
    where: str  # the Hub id, or the local folder or file
    shown: str  # the source as shown and saved (a URL without any token in it)


def _check_vae_source(source: str, *, token: str | None, local_files_only: bool | None) -> _CheckedVae:
    """Check another VAE before anything loads: a folder or Hub id must hold an AutoencoderKL's config.json, a single
    file (or a link to one) a VAE's weights."""
    kind = source_kind(source)
    path, shown = Path(source).expanduser(), source
    if kind == "url":
        from .download import download_model, shown_url

        kind, path, shown = "single_file", download_model(source), shown_url(source)
    if kind == "single_file":
        if not any("decoder." in key for key in read_checkpoint_keys(path)[0]):
            raise ModelError(f"{path.name} holds no VAE weights (no decoder); give a VAE's .safetensors file, its diffusers folder or a Hub id such as {SDXL_FP16_VAE}.")
        return _CheckedVae(kind, str(path), shown)
    if kind == "folder":
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path} is a folder but not a diffusers VAE (it has no config.json); give a VAE's own folder (a model's vae/ folder is one), or a .safetensors file.")
    else:
        config_file = _hub_file(source, "config.json", token=token, local_files_only=local_files_only,
                                missing=f"{source} on the Hugging Face Hub is not a diffusers VAE (no config.json); give a VAE's id such as {SDXL_FP16_VAE}, or download its .safetensors file and give that path.")
    class_name = _class_name(config_file)
    if class_name != "AutoencoderKL":
        raise ModelError(f"{shown} is {'a ' + class_name if class_name else 'not a diffusers model'}, not a VAE (AutoencoderKL); give a VAE such as {SDXL_FP16_VAE}.")
    return _CheckedVae(kind, str(path) if kind == "folder" else source, shown)


def _load_vae(checked: _CheckedVae, own, dtype: torch.dtype, *, token: str | None, local_files_only: bool | None):
    """Another VAE, in `dtype`. A single file says nothing about its settings, so it takes those of the model's `own` VAE:
    its scaling, and whether fp16 overflows it (the fp16-fix VAE given as a file is therefore kept in fp32 under SDXL;
    give it by Hub id or folder to keep it in fp16)."""
    from diffusers import AutoencoderKL

    if checked.kind == "single_file":
        with tempfile.TemporaryDirectory() as config_dir:
            own.save_config(config_dir)
            return _load(lambda: AutoencoderKL.from_single_file(checked.where, config=config_dir, dtype=dtype), checked.shown, "a VAE")
    hub = dict(token=token, local_files_only=bool(local_files_only)) if checked.kind == "hub" else {}
    return _load(lambda: AutoencoderKL.from_pretrained(checked.where, dtype=dtype, **hub), checked.shown, "a VAE")


def _check_vae_fits(vae, pipe, info: ModelInfo, shown: str) -> None:
    """Another VAE must make the latents the model's UNet was trained on, as the model's own VAE (still `pipe.vae`)
    does: as many channels, as many times smaller, at the same scale (SD 1.x's and SDXL's VAEs differ only in scale)."""
    new, own, channels = vae.config, pipe.vae.config, pipe.unet.config.in_channels
    advice = (f"give a VAE made for {FAMILY_NAMES[info.family]}" + (f" such as {SDXL_FP16_VAE}" if info.family == "sdxl" else "")
              + ", or none to keep the model's own")
    if new.latent_channels != channels:
        raise ModelError(f"The VAE {shown} makes latents of {new.latent_channels} channels but {info.source}'s UNet takes {channels}; {advice}.")
    if len(new.block_out_channels) != len(own.block_out_channels):
        raise ModelError(f"The VAE {shown} makes latents {2 ** (len(new.block_out_channels) - 1)}x smaller than the image but "
                         f"{info.source}'s own {2 ** (len(own.block_out_channels) - 1)}x; {advice}.")
    if not math.isclose(new.scaling_factor, own.scaling_factor, rel_tol=1e-3):
        raise ModelError(f"The VAE {shown} scales its latents by {new.scaling_factor} but {info.source}'s own by "
                         f"{own.scaling_factor}, so it was made for another kind of model; {advice}.")


def _load(load, source: str, what: str):
    try:
        return load()
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{source} could not be loaded as {what} model ({_short(err)}); check that it is complete and of a supported kind.") from err


def describe_pipeline(pipe, source: str, kind: str) -> ModelInfo:
    """What a loaded pipeline is. SDXL or not was decided before loading (the pipeline class); here its UNet is
    checked against that, and SD 1.x is told from 2.x."""
    te_config = pipe.text_encoder.config
    unet_config = pipe.unet.config
    xl = getattr(pipe, "text_encoder_2", None) is not None
    extra_conditioning = getattr(unet_config, "addition_embed_type", None)
    if xl and extra_conditioning != "text_time":
        raise ModelError(f"{source} is saved as an SDXL pipeline but its UNet lacks SDXL's size and crop conditioning; use an SDXL base model such as {SDXL_MODEL}.")
    if not xl and extra_conditioning:
        raise ModelError(f"{source} is not a {_SUPPORTED} model (its UNet takes extra conditioning, like SDXL, but it is saved as an SD 1.x/2.x pipeline).")
    sd2 = getattr(te_config, "hidden_act", "quick_gelu") == "gelu" or bool(unet_config.use_linear_projection)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return ModelInfo(
        source=source,
        source_kind=kind,
        family="sdxl" if xl else "sd2" if sd2 else "sd1",
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        resolution=int(unet_config.sample_size) * vae_scale,
    )


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
