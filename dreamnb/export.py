"""Take a trained attempt elsewhere: a diffusers folder, one A1111/ComfyUI file, a LoRA, or the Hub.

- "diffusers": a folder `StableDiffusionPipeline.from_pretrained` loads (safetensors weights, the
  base model's scheduler, tokenizer and VAE), in the weights' own precision so it loads back exactly;
- "safetensors": one file in the original Stable Diffusion key layout that AUTOMATIC1111 and
  ComfyUI read (fp16 by default), LoRA attempts fused into the weights first;
- "lora": a LoRA attempt's add-on weights as one file in the kohya layout
  (`lora_unet_*` / `lora_te_*`, SDXL: `lora_te1_*` and `lora_te2_*`, with `.lora_down`, `.lora_up`, `.alpha`): the
  layout A1111 and ComfyUI read, and one diffusers' `load_lora_weights` converts by itself;
- "lora-diffusers": the same add-on weights in diffusers' own names and metadata, as `save_lora_weights` writes them.

SD 1.x/2.x and SDXL export alike; what differs (the pipeline class, kohya's names, the single-file layout, the card's
tags) the base model's family answers (`dreamnb.families`).

Every export is written atomically and never replaces an existing one without `force`.
`push_to_hub` uploads an export with a model card; the token is only ever handed to
huggingface_hub, never logged, printed, written or put in an error message.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import __version__, fileio
from .attempts import attempt_config, attempt_pipeline
from .config import TrainConfig
from .errors import UserError
from . import families
from .models import BaseModel, ModelError, resolve_hf_token, source_kind
from .session import FINAL, LORA_FILE, Session, attempt_weights_dir, canonical_ref, session_lock
from .train import save_lora_file

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "safetensors", "lora", "lora-diffusers")
LORA_FORMATS = ("lora", "lora-diffusers")
SUFFIX = ".safetensors"
# The settings a reader of a model card needs to judge or repeat an attempt.
CARD_SETTINGS = (
    "preset", "method", "resolution", "unet_steps", "unet_lr", "text_encoder_steps", "text_encoder_lr",
    "lr_scheduler", "with_prior_preservation", "num_class_images", "prior_loss_weight", "train_batch_size",
    "gradient_accumulation_steps", "offset_noise", "min_snr_gamma", "lora_rank", "lora_alpha", "seed", "parent",
)
_LORA_KEY = re.compile(
    r"^(\w+?)\.(.+)\.(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)\.weight$"
)


class ExportError(UserError):
    """An export that cannot be written as asked; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------
# Export to files
# ---------------------------------------------------------------------------------------------

def export_attempt(
    session: Session,
    base: BaseModel,
    attempt: str | None,
    format: str,
    out: str | Path | None,
    *,
    force: bool = False,
    fp16: bool = True,
) -> Path:
    """Write the attempt (the latest when None) in `format` to `out` and return the path written.

    `out` may be an existing folder for the single-file formats (the file gets a name from the
    session and attempt), or None for the session's exports/ folder. `fp16` applies to the
    "safetensors" single file; the diffusers folder and the LoRA keep the trained precision.
    """
    with session_lock(session.path, "an export"):
        out = check_export(session, attempt, format, out, force=force)
        fileio.recover_leftovers(out.parent, recursive=False, name=out.name)  # of an export of it that was cut short
        name = canonical_ref(session, attempt)  # NAME, or NAME@STEP for a checkpoint
        weights_dir = attempt_weights_dir(session, name)
        config = attempt_config(session, name)
        is_lora = config.get("method") == "lora"

        origin = describe(session, name, config, base.info.source, family=base.info.family, vae=base.info.vae)
        if format in LORA_FORMATS:
            if format == "lora":
                state, metadata = kohya_lora(lora_weights_file(weights_dir), config, base, name, origin)
            else:
                state, metadata = diffusers_lora(weights_dir, config, base.family, origin)
            from safetensors.torch import save_file

            fileio.save_with(out, lambda tmp: save_file(state, str(tmp), metadata=metadata))
            log.info("wrote the LoRA of %s (%d tensors, %s) to %s", name, len(state), format, out)
            return out

        pipe = attempt_pipeline(base, session, name)
        if is_lora and weights_dir.name == FINAL:
            # attempt_pipeline fused the LoRA file into copies; drop the now empty adapter layers so only
            # plain weights are saved (the fused values stay in the layers they wrapped).
            pipe.unload_lora_weights()
        if format == "diffusers":
            with fileio.atomic_dir(out) as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
                _name_local_sources(tmp)
            log.info("wrote %s as a diffusers folder to %s", name, out)
            return out

        from .convert import save_state_file

        return save_state_file(base.family.single_file_state(pipe), out, dtype=torch.float16 if fp16 else torch.float32,
                               metadata={"format": "pt", **origin})


def check_export(session: Session, attempt: str | None, format: str, out: str | Path | None, *, force: bool = False) -> Path:
    """Every check export_attempt makes before the slow work, and the path it will write; the CLI
    can call it before loading the base model, so a mistake is reported in a second."""
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    name = canonical_ref(session, attempt)
    if format in LORA_FORMATS and attempt_config(session, name).get("method") != "lora":
        raise ExportError(
            f"Attempt {name!r} trained every weight, so there is no LoRA to export; export it as 'diffusers' "
            "or 'safetensors', or train a new attempt with the 'lora' method."
        )
    path = export_path(session, name, format, out)
    check_overwrite(path, format, force)
    return path


def lora_weights_file(weights_dir: Path) -> Path:
    """final/'s LoRA file (diffusers' names), or a checkpoint's weights (peft's): kohya_lora reads either."""
    return weights_dir / (LORA_FILE if weights_dir.name == FINAL else "weights.safetensors")


def default_file_name(session: Session, attempt: str, format: str) -> str:
    """`<session>-<attempt>[-stepN]` (plus `-lora` and `.safetensors` for the file formats), safe on any filesystem."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{session.name}-{attempt.replace('@', '-step')}").strip("-.") or "dreamnb"
    return {"diffusers": stem, "safetensors": stem + SUFFIX, "lora": f"{stem}-lora{SUFFIX}",
            "lora-diffusers": f"{stem}-lora-diffusers{SUFFIX}"}[format]


def export_path(session: Session, attempt: str, format: str, out: str | Path | None) -> Path:
    """Where an export goes: `out` itself, a default name inside an existing folder `out` (file
    formats), or the session's exports/ folder when `out` is None."""
    if out is None:
        return session.exports_dir / default_file_name(session, attempt, format)
    out = Path(out).expanduser()
    if format == "diffusers":
        if out.suffix == SUFFIX:
            raise ExportError(f"A diffusers export is a folder, but {out} names a {SUFFIX} file; give a folder path, or choose the 'safetensors' format.")
        return out
    if out.is_dir():
        return out / default_file_name(session, attempt, format)
    if out.suffix != SUFFIX:
        raise ExportError(f"A {format} export is one {SUFFIX} file, but {out} does not end in {SUFFIX}; add the suffix.")
    return out


def check_overwrite(out: Path, format: str, force: bool) -> None:
    """Refuse to replace an existing export without `force`, and with it anything that is not one."""
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out} exists; replace it (--force, or tick 'Replace an existing export'), or choose another path.")
    if format == "diffusers" and not (out.is_dir() and ((out / "model_index.json").is_file() or not any(out.iterdir()))):
        raise ExportError(f"{out} exists and is not a diffusers model folder, so it is never replaced; choose a new folder name.")
    if format != "diffusers" and not out.is_file():
        raise ExportError(f"{out} exists and is not a file, so it is not replaced; choose another path.")


def describe(session: Session, attempt: str, config: dict, base_source: str, *, family: str | None = None,
             vae: str | None = None) -> dict[str, str]:
    """What the exported weights are, as the string metadata a .safetensors file holds (`vae`: the VAE trained with,
    when not the base model's own). Local models are named, never given by their path."""
    return {
        **({"vae": base_model_name(vae)} if vae else {}),
        "dreamnb_version": __version__,
        "base_model": base_model_name(base_source),
        "base_model_family": families.get(family).label,
        "token": str(config.get("token", "")),
        "class_word": str(config.get("class_word", "")),
        "instance_prompt": instance_prompt(config),
        "session": session.name,
        "attempt": attempt,
        "training_settings": json.dumps({k: config[k] for k in CARD_SETTINGS if k in config}),
    }


def base_model_name(source: str) -> str:
    """A Hub id as it is; a local file or folder by its name only (its full path says nothing
    elsewhere and may hold the user's name). For another VAE too."""
    try:
        if source_kind(source) == "hub":
            return source
    except ModelError:
        pass
    return Path(str(source)).name or str(source)


def _name_local_sources(folder: Path) -> None:
    """diffusers and transformers write where each part was loaded from (`_name_or_path`) into its config file; a local
    path there would leave the machine with the export, so it becomes the folder's name (a Hub id stays as it is)."""
    for config_file in sorted(folder.rglob("*.json")):
        config = json.loads(config_file.read_text())
        keys = [k for k in ("_name_or_path", "name_or_path") if isinstance(config, dict) and isinstance(config.get(k), str)]
        if any(base_model_name(config[k]) != config[k] for k in keys):
            fileio.write_json(config_file, {**config, **{k: base_model_name(config[k]) for k in keys}})


def instance_prompt(config: dict) -> str:
    try:
        return TrainConfig.from_dict(config).resolved_instance_prompt()
    except UserError:  # a config from another dreamnb version: build it the way this one would
        token, class_word = config.get("token", ""), config.get("class_word", "")
        text = config.get("instance_prompt") or "photo of {token} {class}"
        return " ".join(text.replace("{token}", token).replace("{class}", class_word).split())


# ---------------------------------------------------------------------------------------------
# LoRA in the kohya layout
# ---------------------------------------------------------------------------------------------

def kohya_lora(
    lora_file: Path, config: dict, base: BaseModel, attempt: str, origin: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The attempt's LoRA file (diffusers/peft names) renamed to the kohya layout by diffusers' own
    `convert_state_dict_to_kohya`.

    kohya names each adapted layer by its diffusers module path with '.' turned into '_'
    (`lora_unet_down_blocks_0_..._attn1_to_q`; a text encoder under `lora_te_text_model_...`, SDXL's two under
    `lora_te1_text_model_...` and `lora_te2_text_model_...`) and stores `lora_down` (A), `lora_up` (B) and `alpha`, so
    loaders scale B·A by alpha / rank exactly as peft did during training. Every name is checked against the base
    model's own layers. Returns the tensors and the file's metadata (kohya's `ss_*` keys plus `origin`).
    """
    alpha = float(config.get("lora_alpha") or config.get("lora_rank") or 0)
    if alpha <= 0:
        raise ExportError(f"Attempt {attempt!r} has no lora_alpha in its config.json, so the LoRA's strength is unknown; train it again with the 'lora' method.")
    adapters = read_adapters(lora_file)
    peft_state: dict[str, torch.Tensor] = {}
    for (part, module), weights in sorted(adapters.items()):
        module = _kohya_module_path(base, part, module, attempt)
        peft_state[f"{part}.{module}.lora_A.weight"] = weights["down"].contiguous()
        peft_state[f"{part}.{module}.lora_B.weight"] = weights["up"].contiguous()
    rank = next(iter(adapters.values()))["down"].shape[0]
    state, kohya_metadata = base.family.kohya_lora(peft_state, rank, alpha)
    metadata = {
        # kohya sd-scripts' own keys: A1111's and ComfyUI's LoRA browsers show them
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        **kohya_metadata,
        "ss_resolution": str(config.get("resolution", "")),
        "ss_output_name": attempt,
        **(origin or {}),
    }
    return state, metadata


def read_adapters(lora_file: Path) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """A LoRA file's weights (diffusers' or peft's names) as {(part, module path): {"down": A, "up": B}}, checked whole."""
    from safetensors.torch import load_file

    adapters: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(lora_file)).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ExportError(f"{lora_file} holds a weight dreamnb does not know ({key}); it was not written by dreamnb's trainer, so it cannot be converted.")
        part, module, kind = match.groups()
        adapters.setdefault((part, module), {})["down" if kind.endswith(("down", "_A")) else "up"] = value
    if not adapters:
        raise ExportError(f"{lora_file} holds no LoRA weights; train the attempt again.")
    for (_, module), weights in adapters.items():
        if set(weights) != {"down", "up"}:
            raise ExportError(f"{lora_file} is incomplete (layer {module} lacks its {'up' if 'down' in weights else 'down'} weight); train the attempt again.")
    return adapters


def _kohya_module_path(base: BaseModel, part: str, module: str, attempt: str) -> str:
    """The adapted layer's path as kohya names it, checked to be a Linear layer of the base model. A text encoder's
    path always starts `text_model.` there; transformers >= 5.6 drops that level from CLIPTextModel (not from SDXL's
    CLIPTextModelWithProjection), so it is taken off and put back."""
    model = getattr(base.pipeline, part, None)
    if model is None:
        raise ExportError(f"The LoRA of attempt {attempt!r} adapts a {part} that the base model does not have; export it with the base model it was trained on.")
    if part == base.family.denoiser:
        _check_linear(model, module, attempt)
        return module
    module = module.removeprefix("text_model.")
    _check_linear(getattr(model, "text_model", model), module, attempt, "text_model.")
    return "text_model." + module


def diffusers_lora(weights_dir: Path, config: dict, family: families.Family, origin: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The attempt's LoRA in diffusers' names, for `load_lora_weights` of the base model's pipeline class: final/'s file
    as it is, or a checkpoint's adapters (peft's names) written the way training writes final/. Its metadata keeps
    diffusers' own (the adapters' rank and alpha) and adds `origin`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    lora_file = weights_dir / LORA_FILE
    with tempfile.TemporaryDirectory(prefix="dreamnb-lora-") as tmp:
        if weights_dir.name != FINAL:
            lora_file = Path(tmp) / LORA_FILE
            _save_checkpoint_as_diffusers_lora(weights_dir / "weights.safetensors", config, family, lora_file.parent)
        with safe_open(str(lora_file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(lora_file)), {**metadata, **origin}


def _save_checkpoint_as_diffusers_lora(checkpoint_file: Path, config: dict, family: families.Family, folder: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint_file))
    adapters = {part: {k[len(part) + 1:]: v for k, v in weights.items() if k.startswith(part + ".")} for part in family.trained_parts}
    save_lora_file(folder, {part: state for part, state in adapters.items() if state}, config["lora_rank"], config["lora_alpha"], family)


def _check_linear(model: torch.nn.Module, module: str, attempt: str, shown_prefix: str = "") -> None:
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        layer = None
    if not isinstance(layer, torch.nn.Linear):
        raise ExportError(f"The LoRA of attempt {attempt!r} adapts a layer {shown_prefix}{module} that the base model does not have; export it with the base model it was trained on.")


# ---------------------------------------------------------------------------------------------
# Model card and the Hugging Face Hub
# ---------------------------------------------------------------------------------------------

def model_card(
    session: Session,
    attempt_name: str,
    config: dict,
    base_source: str,
    grid_file: str | None = None,
    *,
    format: str = "diffusers",
    repo_id: str | None = None,
    weights_file: str | None = None,
    family: str | None = None,
    vae: str | None = None,
) -> str:
    """README.md text for the Hub: YAML front matter, what the token means, the settings that
    matter, how to load the model (with the pipeline class of the base's `family`), and the sample grid
    (`grid_file`, relative to the README)."""
    from huggingface_hub import ModelCardData

    token, class_word = str(config.get("token", "")), str(config.get("class_word", ""))
    prompt = instance_prompt(config)
    base_name = base_model_name(base_source)
    base_is_hub = base_name == base_source and "/" in base_name
    kind = families.get(family)
    tags = (["dreambooth", *kind.hub_tags] + ["dreamnb", "text-to-image", "diffusers"] + (["lora"] if format in LORA_FORMATS else []))
    data = ModelCardData(
        base_model=base_source if base_is_hub else None,  # the Hub only accepts a Hub id here
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        instance_prompt=prompt,
    )
    title = " ".join(p for p in (token, class_word) if p) or attempt_name
    settings = "\n".join(f"| {key} | {config[key]} |" for key in CARD_SETTINGS if key in config and _matters(key, config))
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title} (DreamBooth, attempt {attempt_name})", "",
        (f"{kind.label} taught a new subject with DreamBooth by dreamnb {__version__}. "
         f"Write **`{token}`** in a prompt to get it, e.g. `{prompt}`."), "",
        f"- Base model: `{base_name}`",
        *([f"- VAE: `{base_model_name(vae)}`, trained with and used instead of the base model's own"] if vae else []),
        f"- Token: `{token}`",
        f"- Class word: `{class_word}`" if class_word else "- Class word: none (a style)",
        f"- Instance prompt: `{prompt}`",
        f"- Session: `{session.name}`, attempt `{attempt_name}`", "",
        "The base model's license applies to this model.", "",
        "## Training settings", "",
        "| setting | value |", "|---|---|", settings, "",
        "## Use it", "",
        *_usage(format, repo_id or "path/to/this/model", weights_file, base_name if base_is_hub else "path/to/the/base/model", prompt,
                kind),
    ]
    if grid_file:
        lines += ["", "## Samples", "", f"![Sample grid: prompts down, seeds across]({grid_file})"]
    return "\n".join(lines).rstrip() + "\n"


def _matters(key: str, config: dict) -> bool:
    if key in ("lora_rank", "lora_alpha"):
        return config.get("method") == "lora"
    if key in ("num_class_images", "prior_loss_weight"):
        return bool(config.get("with_prior_preservation"))
    if key == "text_encoder_lr":
        return bool(config.get("text_encoder_steps"))
    return True


def _usage(format: str, where: str, weights_file: str | None, base: str, prompt: str, family: families.Family) -> list[str]:
    fence, pipeline = "```", family.pipeline_class_name
    dtype = "torch.bfloat16" if family.prefers_bf16 else "torch.float16"
    generate = f'image = pipe("{prompt}", num_inference_steps=25, guidance_scale={family.sampling_guidance:g}).images[0]'
    if format == "diffusers":
        return ["With 🧨 diffusers:", "", fence + "python", "import torch", f"from diffusers import {pipeline}", "",
                f'pipe = {pipeline}.from_pretrained("{where}", torch_dtype={dtype}).to("cuda")',
                generate, fence]
    file = weights_file or "model.safetensors"
    if format == "safetensors":
        elsewhere, imports, load = family.single_file_usage(base, dtype)
        return [f"{elsewhere} With 🧨 diffusers:", "", fence + "python", "import torch", *imports,
                "from huggingface_hub import hf_hub_download", "",
                f'path = hf_hub_download("{where}", "{file}")', *load, generate, fence]
    where_else = (f"In AUTOMATIC1111 put the file in `models/Lora/` and add `<lora:{Path(file).stem}:1>` to the prompt; "
                  "in ComfyUI put it in `models/loras/`. ") if format == "lora" else ""
    return [where_else + "With 🧨 diffusers:", "", fence + "python", "import torch",
            f"from diffusers import {pipeline}", "",
            f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype={dtype}).to("cuda")',
            f'pipe.load_lora_weights("{where}", weight_name="{file}")', generate, fence]


def push_to_hub(
    session: Session,
    base: BaseModel,
    attempt: str | None,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    format: str = "diffusers",
    grid: Any = None,
    endpoint: str | None = None,
) -> str:
    """Upload an export of the attempt with a model card (and `grid`, a PIL image or PNG path) to a
    Hub repository, created private unless `private=False`; return the repository's URL.

    The token comes from the argument, HF_TOKEN / Colab's secrets, or a stored `huggingface_hub`
    login (the notebook's login widget). `endpoint` points at another Hub (tests use a local one).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ExportError(f"{repo_id!r} is not a usable Hub repository name; use 'your-username/model-name' (letters, digits, '-', '_', '.').") from None
    token = token or resolve_hf_token() or get_token()
    if not token:
        raise ExportError("No Hugging Face token found; set HF_TOKEN, add HF_TOKEN to Colab's secrets, or paste a token in the notebook's base model section.")
    name = canonical_ref(session, attempt)
    config = attempt_config(session, name)

    with tempfile.TemporaryDirectory(prefix="dreamnb-push-") as tmp:
        folder = Path(tmp) / "repo"
        weights_file = None if format == "diffusers" else default_file_name(session, name, format)
        export_attempt(session, base, name, format, folder if weights_file is None else folder / weights_file)
        grid_file = None
        if grid is not None:
            grid_file = "grid.png"
            _save_grid(grid, folder / grid_file)
        card = model_card(session, name, config, base.info.source, grid_file,
                          format=format, repo_id=repo_id, weights_file=weights_file, family=base.info.family, vae=base.info.vae)
        fileio.write_text(folder / "README.md", card)

        api = HfApi(endpoint=endpoint, token=token)
        where = endpoint or "the Hugging Face Hub"
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if private and not api.repo_info(url.repo_id).private:  # exist_ok keeps an existing repo as it is
                raise ExportError(f"{repo_id} already exists and is public; make it private on the Hub first, or choose a new name.")
            log.info("uploading attempt %s (%s) to %s", name, format, url)
            api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=f"dreamnb: attempt {name} ({format})")
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status in (401, 403):
                raise ExportError(
                    f"{where} refused the token (HTTP {status}); create a token with write access at "
                    "https://huggingface.co/settings/tokens and set it as HF_TOKEN."
                ) from None
            raise ExportError(f"{where} answered HTTP {status} while uploading to {repo_id}; check the repository name and try again later.") from None
        except Exception as err:
            if not _is_network_error(err):
                raise
            raise ExportError(f"Cannot reach {where} ({type(err).__name__}); check the internet connection and try again.") from None
    log.info("uploaded attempt %s to %s", name, url)
    return str(url)


def _is_network_error(err: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: an OSError, or the HTTP client's transport error
    (huggingface_hub 2.x raises httpx2's, 1.x httpx's or requests'; they share these class names)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout"})


def _save_grid(grid: Any, path: Path) -> None:
    from PIL import Image

    if isinstance(grid, (str, Path)):
        try:
            grid = Image.open(grid)
            grid.load()
        except OSError as err:
            raise ExportError(f"The sample grid {grid} cannot be read as an image ({err}); give a PNG file or a PIL image.") from err
    fileio.save_with(path, lambda tmp: grid.save(tmp, format="PNG"))
