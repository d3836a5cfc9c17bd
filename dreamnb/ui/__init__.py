"""The notebook's widgets: one short call per notebook section, each returning the view it shows.

    env      = dreamnb.ui.setup(session_root)
    model    = dreamnb.ui.choose_model(base_model)
    session  = dreamnb.ui.choose_session(env, session_name, model=model)
    photos   = dreamnb.ui.photos(session, instance_images, model=model)
    token    = dreamnb.ui.token_check(model, token)
    training = dreamnb.ui.train(session, model, token=token, class_word=class_word, preset=preset)
    grid     = dreamnb.ui.compare(session, model)
    images   = dreamnb.ui.playground(session, model)
    exported = dreamnb.ui.export(session, model)

A view is passed on to the next cells, which read what it holds (`.base_model`, `.session`, `.value`)
only when their own button is pressed, so cells can be run top to bottom before any button is.
With `auto=True` every call does its work at once with the values given (papermill, "Run all"),
training in the foreground, and a failure stops the notebook at that cell with one sentence.
What a view produces (photos, the loss curve, grids, images) is also a plain output of its cell
(`base.Results`), so a saved, reopened or headless-run notebook still shows it.
Widgets live only in this package; every button calls one function of the core library.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from ..models import DEFAULT_MODEL
from .base import Results, StepFailed, View, show
from .compare_view import CompareView
from .config_form import ConfigForm
from .export_view import ExportView
from .model_view import ModelView
from .photo_view import PhotosView
from .playground_view import DEFAULT_PROMPT, RANDOM, PlaygroundView
from .session_view import SessionView
from .setup_view import SetupView
from .token_view import TokenView
from .train_view import LiveView, TrainView


def _enable_colab_widgets() -> None:
    """Colab draws ipywidgets 8 only through its custom widget manager; switch it on once, on import."""
    from ..colab import in_colab

    if in_colab():
        try:
            from google.colab import output  # type: ignore[import-not-found]

            output.enable_custom_widget_manager()
        except Exception:  # an older Colab: widgets may still work with its built-in manager
            logging.getLogger(__name__).warning("could not enable Colab's custom widget manager", exc_info=True)


_enable_colab_widgets()

__all__ = [
    "setup", "choose_model", "choose_session", "photos", "token_check", "train", "compare", "playground", "export",
    "SetupView", "ModelView", "SessionView", "PhotosView", "TokenView", "TrainView", "LiveView", "ConfigForm",
    "CompareView", "PlaygroundView", "ExportView", "View", "Results", "StepFailed",
]


def setup(session_root: str | Path | None = None, *, auto: bool = False) -> SetupView:
    """GPU and runtime; the session folder (Google Drive on Colab). With `auto` on Colab, mount Drive
    when no session root was given."""
    view = show(SetupView(session_root or None))
    if auto and view.in_colab and not session_root:
        view.use_drive(raise_errors=True)
    return view


def choose_model(default: str | Path = DEFAULT_MODEL, *, config: str | Path | None = None, vae: str | Path | None = None,
                 auto: bool = False) -> ModelView:
    """The base model form (`vae`: another VAE, see `load_base_model`); `auto` loads `default` at once."""
    view = show(ModelView(default, config=config, vae=vae))
    if auto:
        view.load(raise_errors=True)
    return view


def choose_session(root: Any = None, name: str = "", *, model: Any = None, auto: bool = False) -> SessionView:
    """New session or resume one in `root` (a path, or the setup view); `auto` opens `name`, creating it if new."""
    view = show(SessionView(root, name, model=model))
    if auto:
        view.open(raise_errors=True, create_if_missing=True)
    return view


def photos(session: Any, instance_images: str | Path | Sequence[str | Path] | None = None, *, size: int | None = None,
           crop: str = "smart", preset: str = "face", token: Any = None, model: Any = None, auto: bool = False) -> PhotosView:
    """Upload or point at photos, prepare them, see crops, rejections and advice, edit captions. `size` None: the
    training size of `model`'s family (SDXL 1024, else 512), following the model the base model section loads.
    `auto` prepares `instance_images` at once (and fails when the session then has no photos)."""
    view = show(PhotosView(session, instance_images, size=size, crop=crop, preset=preset, token=token, model=model))
    if auto:
        if view.sources:
            view.prepare(raise_errors=True)
        if not view.photos:
            raise StepFailed("The session has no photos; set instance_images to a folder or .zip of your photos.")
    return view


def token_check(model: Any = None, default: str = "", *, delay: float = 0.4) -> TokenView:
    """Live verdict on the trigger word as you type, with rare alternatives to click."""
    return show(TokenView(model, default, delay=delay))


def train(session: Any, model: Any, *, token: Any = None, preset: str = "face", method: str | None = None,
          attempt: str | None = None, start_from: str | None = None, auto: bool = False, **settings: Any) -> TrainView:
    """The settings form (from TrainConfig), Train / Stop / Resume and the live view. `settings` are
    TrainConfig fields the form starts from (None keeps the preset's value for the base model's family, e.g. SDXL's
    1024 px; `method` None: 'lora' for SDXL, else 'full'). `start_from` ('attempt-1' or a
    checkpoint 'attempt-1@500') trains more on top of that attempt: its settings, with `settings` on top, and
    steps that are steps more. `auto` trains at once."""
    view = show(TrainView(session, model, token=token, preset=preset, method=method, attempt=attempt,
                          start_from=start_from, **settings))
    if auto:
        view.start(background=False, raise_errors=True)
    return view


def compare(session: Any, model: Any, *, attempts: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
            seeds: Sequence[int] = (1, 2), num_inference_steps: int = 25, guidance_scale: float | None = None,
            cell_size: int | None = None, auto: bool = False) -> CompareView:
    """One grid of the same prompts and seeds through several attempts, each at its final weights or a checkpoint
    ('attempt-1@500'); `auto` makes it at once (the base model against the newest finished attempt unless
    `attempts` says otherwise)."""
    view = show(CompareView(session, model, attempts=list(attempts) if attempts else None,
                            prompts=list(prompts) if prompts else None, seeds=seeds,
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, cell_size=cell_size))
    if auto:
        view.compare(raise_errors=True)
    return view


def playground(session: Any, model: Any, *, attempt: str | None = None, prompt: str = DEFAULT_PROMPT,
               negative_prompt: str = "", size: int | None = None, num_inference_steps: int = 25,
               guidance_scale: float | None = None, scheduler: str = "dpm++", seed: int | str = RANDOM, batch_size: int = 4,
               auto: bool = False) -> PlaygroundView:
    """Prompt an attempt (`attempt-1`, a checkpoint `attempt-1@500`, or `base`) and see the images, saved with
    their settings; `auto` generates at once (with the newest finished attempt unless `attempt` says otherwise)."""
    view = show(PlaygroundView(session, model, attempt=attempt, prompt=prompt, negative_prompt=negative_prompt, size=size,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               scheduler=scheduler, seed=seed, batch_size=batch_size))
    if auto:
        view.generate(raise_errors=True)
    return view


def export(session: Any, model: Any, *, attempt: str | None = None, format: str = "diffusers", out: str | Path | None = None,
           force: bool = False, fp16: bool = True, repo_id: str = "", private: bool = True, auto: bool = False) -> ExportView:
    """Export an attempt or one of its checkpoints ('attempt-1@500') as a diffusers folder, a single .safetensors
    or a LoRA (kohya's layout 'lora', or diffusers' 'lora-diffusers'), or push it to the Hub; `auto` exports at once, and pushes too when `repo_id` is given."""
    view = show(ExportView(session, model, attempt=attempt, format=format, out=out or None, force=force, fp16=fp16,
                           repo_id=repo_id, private=private))
    if auto:
        view.export(raise_errors=True)
        if repo_id:
            view.push(raise_errors=True)
    return view
