"""Find and load a Stable Diffusion base model: a Hub id, a local diffusers folder, or a single file.

What each source is gets checked before the (slow) load, so a wrong one fails at once with one
sentence saying what is wrong and what to do: the SDXL refiner, SD3, Flux, a LoRA given as a base
model, a damaged download, a folder that is not a diffusers model, a Hub id while offline.

Which model family a source is (`dreamnb.families`: SD 1.x/2.x, SDXL) is decided once, before loading, by
`_check_source` (from model_index.json's `_class_name` or the checkpoint's keys); the family picks the pipeline class,
and the loaded model carries it on as `ModelInfo.family` (its key; `BaseModel.family` is the family itself).

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

from . import families
from .config import SDXL_FP16_VAE
from .errors import UserError
from .hub import hub_file
from .hub import short as _short
from .families import SUPPORTED, Family, ModelError
from .families.sd import SD15_MODEL as DEFAULT_MODEL
from .families.sdxl import SDXL_MODEL

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelInfo:
    source: str            # what the user gave
    source_kind: str       # "hub" | "folder" | "single_file" | "url"
    family: str            # the family's key (`dreamnb.families`): "sd1" | "sd2" | "sdxl"
    prediction_type: str   # "epsilon" | "v_prediction"
    resolution: int        # native image size: 512 or 768 for SD 1.x/2.x, 1024 for SDXL
    vae: str | None = None  # another VAE used instead of the model's own, as given; None: its own

    def describe(self) -> str:
        family = families.get(self.family).label
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


def default_placement(family: Family | None = None) -> Placement:
    """The GPU when there is one, in fp16 (what sampling uses; a full fine-tune copies its weights from it: fp16 has
    more significant bits than bf16 training weights, though magnitudes under 6e-5 keep fewer), or in bf16 for a family
    made in bf16 whose activations outgrow fp16 (FLUX.1) where the GPU has it; else the CPU in fp32.
    Under `accelerate launch` each process takes its own GPU (LOCAL_RANK)."""
    if torch.cuda.is_available():
        from .colab import gpu_has_bf16

        dtype = torch.bfloat16 if family is not None and family.prefers_bf16 and gpu_has_bf16() else torch.float16
        return Placement(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), dtype)
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
    pipeline: Any  # a diffusers pipeline of the family's class, on `placement`
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
    def family(self) -> Family:
        return families.get(self.info.family)

    @property
    def placement(self) -> Placement:
        return Placement(self.denoiser.device, self.denoiser.dtype)

    @property
    def denoiser(self):
        """The part that paints (SD's UNet)."""
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def unet(self):
        """SD's and SDXL's denoiser by its own name."""
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
    def text_encoders(self) -> dict[str, Any]:
        """The text encoders by their pipeline names, in the family's prompt order (SDXL: `text_encoder_2` too)."""
        return {name: part for name in self.family.text_encoders if (part := getattr(self.pipeline, name, None)) is not None}

    @property
    def tokenizers(self) -> list:
        """The tokenizer of each text encoder, in the same order."""
        return self.family.tokenizer_list(self.pipeline)

    @contextlib.contextmanager
    def parked(self):
        """On a GPU, the denoiser (UNet) and text encoder(s) wait on the CPU for the duration, then go back; yields whether they
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

            parts = [self.denoiser, *self.text_encoders.values()]
            drop_sampling_graphs(self.denoiser)
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

def check_folder(path: Path) -> Family:
    """The family of a usable diffusers folder; a ModelError saying what is wrong otherwise."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{path} is a folder but not a diffusers model (it has no model_index.json); give the folder that contains model_index.json, or a .safetensors file.")
    family = families.from_class_name(_class_name(index), str(path))
    missing = [part for part in family.folder_parts if not (path / part).is_dir()]
    if missing:
        raise ModelError(f"{path} lacks the {', '.join(missing)} part(s) of a {family.label} model; download the whole model folder again.")
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
        raise ModelError(f"{path.name} does not contain model weights; give a {SUPPORTED} checkpoint.")
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    shapes = {k: tuple(state[k].shape) for k in keys if k.endswith("input_blocks.0.0.weight")}
    return keys, shapes


# --- loading ----------------------------------------------------------------------------------------

@dataclass
class _CheckedSource:
    """What `_check_source` found out before the slow load."""

    kind: str          # as source_kind
    path: Path         # the local folder or file (a URL's downloaded file)
    shown: str         # the source as shown and saved (a URL without any token in it)
    family: Family     # which loads it (SD 1.x and 2.x load alike and are told apart once loaded, by describe_pipeline)
    v_prediction: bool = False  # a single file marked as v-prediction (a `v_pred` key)


def _check_source(source: str, *, token: str | None, local_files_only: bool | None) -> _CheckedSource:
    """Check a source before loading it and decide which family loads it: the one place where that is decided, from
    model_index.json's `_class_name` (a folder or Hub id) or from the checkpoint's keys (a single file)."""
    kind = source_kind(source)
    path, shown = Path(source).expanduser(), source
    if kind == "url":  # downloaded once into a cache, then checked and loaded as the single file it is
        from .download import download_model, shown_url

        path, shown = download_model(source), shown_url(source)  # what is shown and saved holds no token
    if kind == "folder":
        return _CheckedSource(kind, path, shown, check_folder(path))
    if kind in ("single_file", "url"):
        keys, shapes = read_checkpoint_keys(path)
        return _CheckedSource(kind, path, shown, families.from_checkpoint(keys, shapes, path.name), v_prediction="v_pred" in keys)
    return _CheckedSource(kind, path, shown, check_hub_model(source, token=token, local_files_only=local_files_only))


def detect_family(source: str | os.PathLike, *, local_files_only: bool | None = None) -> str:
    """The family's key without loading the model (SD 2.x shows as SD 1.x until loaded; their presets are the same):
    the check `load_base_model` starts with, so settings that depend on the family (`config.preset_values`) can be
    chosen before the slow load."""
    return _check_source(str(source), token=resolve_hf_token(), local_files_only=local_files_only).family.key


def load_base_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    config: str | os.PathLike | None = None,
    placement: Placement | None = None,
    prediction_type: str | None = None,
    local_files_only: bool | None = None,
    vae: str | os.PathLike | None = None,
) -> BaseModel:
    """Load a base model as its family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline) plus what it is
    (family, prediction, size), on `placement` (default: `default_placement`, the GPU in fp16 when there is one).

    `config` is only for single files: a diffusers folder or Hub id whose configs describe the file
    (diffusers guesses one from the weights when it is None). `prediction_type` overrides what was
    detected (an SD 2.x file alone cannot say whether it is v-prediction). `vae` is another VAE to use instead of
    the model's own: a Hub id such as madebyollin/sdxl-vae-fp16-fix, a diffusers folder of one, or a single file.
    """
    token = resolve_hf_token()
    checked = _check_source(str(source), token=token, local_files_only=local_files_only)
    checked_vae = _check_vae_source(str(vae), token=token, local_files_only=local_files_only) if vae else None
    family = checked.family
    placement = placement or default_placement(family)
    pipeline_class = family.pipeline_class()
    common: dict[str, Any] = dict(dtype=placement.dtype, **family.load_options())
    what = f"a {family.label}"
    source, path = checked.shown, checked.path
    if checked.kind == "folder":
        pipe = _load(lambda: pipeline_class.from_pretrained(str(path), **common), source, what)
    elif checked.kind in ("single_file", "url"):
        extra: dict[str, Any] = {}
        if config is not None and Path(str(config)).is_dir():
            extra["local_files_only"] = True
        yaml = path.with_suffix(".yaml")
        if yaml.is_file() and config is None:
            extra["original_config"] = str(yaml)
        if checked.v_prediction and prediction_type is None:
            prediction_type = "v_prediction"
        pipe = _load(lambda: family.load_single_file(path, config=config, token=token, **common, **extra), source, what)
    else:
        pipe = _load(
            lambda: pipeline_class.from_pretrained(source, token=token, local_files_only=bool(local_files_only), **common),
            source, what,
        )
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    info = describe_pipeline(pipe, source, checked.kind, family)
    if checked_vae is not None:  # before `to`: the model's own VAE never reaches the GPU
        other = _load_vae(checked_vae, pipe.vae, placement.dtype, token=token, local_files_only=local_files_only)
        _check_vae_fits(other, pipe, info, checked_vae.shown)
        pipe.vae, info.vae = other, checked_vae.shown
    pipe.to(placement.device)
    if families.get(info.family).keep_vae_fp32_when_forced and placement.dtype == torch.float16 and pipe.vae.config.get("force_upcast", True):
        # SDXL's own VAE overflows in fp16 (NaN latents, black images); diffusers marks such a VAE `force_upcast`
        # and its pipeline upcasts it around each decode. Kept in fp32 here instead, so encoding photos for training
        # is safe too. A VAE fine-tuned to stay in fp16 range (madebyollin/sdxl-vae-fp16-fix) says force_upcast=False
        # and stays in fp16. Whoever decodes casts latents to `vae.dtype` (diffusers' SDXL pipeline does not, off MPS).
        pipe.vae.to(torch.float32)
    log.info("loaded %s on %s in %s (VAE in %s)", info.describe(), placement.device, placement.dtype, pipe.vae.dtype)
    return BaseModel(info=info, pipeline=pipe)


def check_hub_model(repo_id: str, *, token: str | None, local_files_only: bool | None = None) -> Family:
    """Fetch only model_index.json first: fails fast (offline, gated, wrong kind) before gigabytes move. Its family."""
    index = _hub_file(repo_id, "model_index.json", token=token, local_files_only=local_files_only,
                      missing=f"{repo_id} on the Hugging Face Hub is not a diffusers model (no model_index.json); give a diffusers model id, or download its .safetensors file and give that path.")
    return families.from_class_name(_class_name(index), repo_id)


def _hub_file(repo_id: str, filename: str, *, token: str | None, local_files_only: bool | None, missing: str) -> Path:
    """One small file of a Hub repository, or a ModelError saying why not (hub.hub_file's sentences)."""
    return hub_file(repo_id, filename, token=token, local_files_only=local_files_only, missing=missing,
                    instead="give a local diffusers folder or .safetensors file", error=ModelError)


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
    new, own, channels = vae.config, pipe.vae.config, families.get(info.family).latent_channels(pipe)
    family = families.get(info.family)
    advice = (f"give a VAE made for {family.label}" + (f" such as {family.fp16_vae}" if family.fp16_vae else "")
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


def describe_pipeline(pipe, source: str, kind: str, family: Family) -> ModelInfo:
    """What a loaded pipeline of `family`'s class is: the family checks it against what it claimed to be (and tells
    SD 1.x from 2.x), with its prediction type and native size."""
    family = family.check_pipeline(pipe, source)
    return ModelInfo(source=source, source_kind=kind, family=family.key, prediction_type=family.prediction(pipe),
                     resolution=family.native_resolution(pipe))
