"""Playground: prompt a trained attempt, any of its checkpoints, or the untrained base model, and look.

Every image is saved as a PNG whose "parameters" text (AUTOMATIC1111's format: A1111, ComfyUI and civitai
read it) holds the settings that make it again, in the attempt's samples/ folder (the session's for the base
model). The images of the last press are a plain output of the cell (`base.Results`), so they stay in the
notebook. The base model is the one the base model section loaded; an attempt's pipeline is built from it
once and kept while the same attempt and step stay picked, so pressing Generate again costs only the images.
"""
from __future__ import annotations

import datetime as _dt
import html
import secrets
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from ..attempts import attempt_config, attempt_pipeline
from ..config import COMPILE_UNET_HELP
from ..errors import UserError
from ..grid import make_grid
from ..models import BaseModel
from ..sample import SCHEDULERS, Sample, SampleSettings, expand_prompt, generate, save_png
from ..session import Session, attempt_weights_dir
from .attempt_picker import BASE, FINAL, AttemptPicker, ref_of
from .base import HELP_STYLE, Results, View, follow_model, idle_session, loaded_model, model_guidance, resolve_session, row, using_model
from .compare_view import readable_cell_size

RANDOM = "random"
DEFAULT_PROMPT = "a photo of {token} {class}"
SEED_RANGE = 2**32  # A1111's seeds: 0 … 4294967295


def parse_seed(text: Any) -> int | None:
    """'42' → 42; 'random' (or empty) → None: a new seed for every press."""
    text = str(text).strip().lower()
    if text in ("", RANDOM):
        return None
    if not text.isdigit():
        raise UserError(f"The seed must be a whole number, or 'random', not {text!r}.")
    return int(text)


def native_size(model: Any) -> int:
    """The loaded base model's own image size, or 512 while it is not loaded yet."""
    return getattr(getattr(loaded_model(model), "info", None), "resolution", None) or 512


def prompt_words(session: Session, name: str) -> tuple[str, str]:
    """The token and class word {token} and {class} stand for: the attempt's own; for the base model, those
    of the newest attempt, so the same prompt shows what the untrained model makes of the token."""
    names = [name] if name != BASE else [a.name for a in reversed(session.attempts)]
    for attempt in names:
        try:
            config = attempt_config(session, attempt)
        except FileNotFoundError:  # an attempt that never started training has no config yet
            continue
        return config.get("token", ""), config.get("class_word", "")
    return "", ""


class PlaygroundView(View):
    """Prompt → images from one attempt (or checkpoint, or the base model). `.samples` are the last images,
    `.paths` where they were saved, `.seeds` the seeds they used (the drawn ones when the seed is 'random')."""

    def __init__(self, session: Any, model: Any, *, attempt: str | None = None, prompt: str = DEFAULT_PROMPT,
                 negative_prompt: str = "", size: int | None = None, num_inference_steps: int = 25,
                 guidance_scale: float | None = None, scheduler: str = "dpm++", seed: int | str = RANDOM,
                 batch_size: int = 4, pipeline_for: Callable[..., Any] = attempt_pipeline) -> None:
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise UserError(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
        self._session, self._model, self._pipeline_for = session, model, pipeline_for
        self._cached: tuple[BaseModel, tuple, Any] | None = None  # (base, which weights, pipeline)
        self.samples: list[Sample] = []
        self.paths: list[Path] = []
        self.seeds: list[int] = []
        self._auto_size = None if size else native_size(model)  # the size the model gave, while the cell gave none
        size = size or self._auto_size
        self.picker = AttemptPicker(attempt, act=self._act)  # the attempt named in the cell, else the newest finished
        self.attempt, self.step = self.picker.attempt, self.picker.step
        self.refresh_button = W.Button(description="", icon="refresh", tooltip="List the attempts and checkpoints again",
                                       layout=W.Layout(width="40px"))
        self.prompt = W.Textarea(value=prompt, rows=2, layout=W.Layout(width="520px"))
        self.filled = W.HTML()
        self.negative = W.Textarea(value=negative_prompt, rows=1, placeholder="e.g. blurry, deformed, extra fingers",
                                   layout=W.Layout(width="520px"))
        self.width = W.BoundedIntText(value=size, min=64, max=2048, step=64, layout=W.Layout(width="90px"))
        self.height = W.BoundedIntText(value=size, min=64, max=2048, step=64, layout=W.Layout(width="90px"))
        self.steps = W.BoundedIntText(value=num_inference_steps, min=1, max=150, layout=W.Layout(width="90px"))
        self.guidance = W.FloatText(value=model_guidance(model) if guidance_scale is None else guidance_scale, step=None,
                                    layout=W.Layout(width="90px"))
        self.scheduler = W.Dropdown(options=[(f"{key} ({choice.a1111_name})", key) for key, choice in SCHEDULERS.items()],
                                    value=scheduler, layout=W.Layout(width="200px"))
        self.seed = W.Text(value=str(seed), layout=W.Layout(width="120px"))
        self.batch = W.BoundedIntText(value=batch_size, min=1, max=16, layout=W.Layout(width="90px"))
        self.compile_unet = W.Checkbox(value=False, indent=False, layout=W.Layout(width="90px"))
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="paint-brush")
        self.results = Results("images")  # the last press's images, under the widget
        self.picker.on_change(self._show_filled)
        self.prompt.observe(lambda _: self._show_filled(), names="value")
        self.refresh_button.on_click(lambda _: self._act(self.refresh))
        self.generate_button.on_click(lambda _: self.generate())
        self.widget = W.VBox([
            row(W.HBox([self.picker.widget, self.refresh_button]),
                "'base' is the untrained model; 'final' is the end of training, a step is an earlier checkpoint.", "Model"),
            row(self.prompt, "What to draw; {token} and {class} are filled in from the attempt.", "Prompt"),
            row(self.filled, "", " "),
            row(self.negative, "What to keep out of the images (optional).", "Negative prompt"),
            row(W.HBox([self.width, W.HTML("×"), self.height]), "Width × height in pixels, multiples of 8; the model's own size looks best.", "Size"),
            row(self.steps, "Denoising steps per image (25 is plenty with DPM++; more is slower, rarely better).", "Steps"),
            row(self.guidance, "How closely images follow the prompt (7.5 is usual for Stable Diffusion, 3.5 for FLUX.1; higher: stricter, harsher).", "Guidance"),
            row(self.scheduler, "The sampler; AUTOMATIC1111's name in brackets. DPM++ is fast and good.", "Scheduler"),
            row(self.seed, "The same seed and settings give the same image; 'random' draws a new one each time.", "Seed"),
            row(self.batch, "Images per press, made together (seeds seed, seed+1, …); more needs more GPU memory.", "Images"),
            row(self.compile_unet, COMPILE_UNET_HELP, "Compile"),
            self.generate_button, self.status, self.error, self.out,
        ])
        follow_model(model, self._model_loaded)
        try:
            self.refresh()
        except UserError:  # the session is opened in an earlier cell later on; Generate refreshes then
            pass

    # --- what the user chose --------------------------------------------------------------------
    @property
    def choice(self) -> tuple[str, int | str]:
        """(attempt name or 'base', 'final' or a checkpoint step)."""
        return self.picker.choice

    # --- actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """List the attempts that have weights to draw with, and the picked attempt's steps."""
        self.picker.refresh(resolve_session(self._session))
        self._show_filled()

    def generate(self, *, raise_errors: bool = False) -> list[Sample] | None:
        """Make the images with the picked model and settings, save them with their settings, show them."""
        def make() -> list[Sample]:
            self.refresh()
            session = idle_session(self._session, "generating images")
            with using_model(self._model, "generating images") as base:
                return draw(session, base)

        def draw(session: Session, base: BaseModel) -> list[Sample]:
            name, step = self.choice
            seed = parse_seed(self.seed.value)
            first = secrets.randbelow(SEED_RANGE - self.batch.value) if seed is None else seed
            settings = self._settings(session, base, name, step, first)
            self.show_status(f"Generating {len(settings)} image(s)…")
            pipe = self._pipeline(base, session, name, step)
            samples = generate(pipe, settings, batch_size=len(settings), progress=False, compile_unet=self.compile_unet.value)
            self.samples, self.seeds = samples, [s.settings.seed for s in samples]
            self.paths = self._save(session, name, step, samples)
            self._show(samples, base, self.paths[0].parent, drawn=seed is None)
            return samples

        result = self._act(make, raise_errors=raise_errors, busy=[self.generate_button])
        if result is None:
            self.show_status("")
        return result

    # --- internals -------------------------------------------------------------------------------
    def _model_loaded(self, base: BaseModel) -> None:
        """A newly loaded base model brings its own size, unless the cell or the user chose one."""
        if self._auto_size is not None and self.width.value == self.height.value == self._auto_size:
            self._auto_size = native_size(base)
            self.width.value = self.height.value = self._auto_size

    def _show_filled(self) -> None:
        """The prompt as the model will read it, under the box."""
        try:
            text = f"→ {html.escape(self._prompt(resolve_session(self._session), self.attempt.value))}"
        except ValueError as err:  # no session yet, or a placeholder that cannot be filled in (one sentence each)
            text = html.escape(str(err))
        self.filled.value = f'<span style="{HELP_STYLE}">{text}</span>'

    def _prompt(self, session: Session, name: str) -> str:
        return expand_prompt(self.prompt.value.strip(), *prompt_words(session, name))

    def _settings(self, session: Session, base: BaseModel, name: str, step: int | str, first_seed: int) -> list[SampleSettings]:
        """One image's settings per image of the batch, seeds counting up from `first_seed` (as A1111 does)."""
        common = dict(prompt=self._prompt(session, name), negative_prompt=self.negative.value.strip(),
                      num_inference_steps=self.steps.value, guidance_scale=self.guidance.value, scheduler=self.scheduler.value,
                      width=self.width.value, height=self.height.value, attempt=ref_of(name, step),
                      base_model=base.info.source)
        return [SampleSettings(seed=first_seed + i, **common) for i in range(self.batch.value)]

    def _pipeline(self, base: BaseModel, session: Session, name: str, step: int | str):
        """The base model's own pipeline, or the attempt's, built once per attempt, step and base model."""
        if name == BASE:
            return base.pipeline
        checkpoint = None if step == FINAL else step
        weights = attempt_weights_dir(session, name, checkpoint)
        key = (name, step, weights.stat().st_mtime_ns)  # a retrained attempt of the same name has new weights
        if self._cached is None or self._cached[0] is not base or self._cached[1] != key:
            self._cached = None  # let the previous attempt's weights go before loading the next ones
            self._cached = (base, key, self._pipeline_for(base, session, name, checkpoint=checkpoint))
        return self._cached[2]

    def _save(self, session: Session, name: str, step: int | str, samples: list[Sample]) -> list[Path]:
        """PNGs with their settings in the attempt's samples/ folder (the session's for the base model)."""
        folder = (session.path if name == BASE else session.attempt_dir(name)) / "samples"
        stem = f"playground-{_stamp()}-{ref_of(name, step).replace('@', '-step')}"
        return [save_png(s, free_path(folder, f"{stem}-seed{s.settings.seed}")) for s in samples]

    def _show(self, samples: list[Sample], base: BaseModel, folder: Path, *, drawn: bool) -> None:
        label, seeds = samples[0].settings.attempt, self.seeds
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}"
        self.results.show("images", contact_row(samples, label, readable_cell_size(base)),
                          f"{len(samples)} image(s) of {label}, {seed_text}: saved in {folder}")
        self.show_status(f"Saved {len(samples)} image(s) in {folder} ({seed_text}{', drawn at random' if drawn else ''}).", ok=True)


def contact_row(samples: list[Sample], label: str, cell_size: int | None = None):
    """One press's images in a row, titled with the prompt, each labelled with its seed."""
    images = [[s.image for s in samples]]
    seeds = [f"seed {s.settings.seed}" for s in samples]
    return make_grid(images, [label], seeds, title=samples[0].settings.prompt, cell_size=cell_size)


def free_path(folder: Path, stem: str) -> Path:
    """folder/stem.png, or stem-2.png, stem-3.png … when taken (two presses within a second)."""
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
