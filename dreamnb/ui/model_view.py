"""Base model: a Hugging Face id, a local diffusers folder or a single .safetensors/.ckpt file, plus a token.

The token box never shows, keeps or saves the token: its value is moved into this kernel's HF_TOKEN
(where `models.resolve_hf_token` and huggingface_hub look) and the box is emptied at once, so the
token is not in the notebook file or its saved widget state.

The "Start from" list offers the usual base models, each with a line on what it means for training; views of
later sections that depend on the model (the train form's defaults, image sizes) register with `on_load` and
follow the model each time one is loaded. Another VAE (above all SDXL's fp16-fix) can be given, except for SD 1.5:
a typed model may be SDXL.
"""
from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from ..config import SDXL_FP16_VAE, VAE_HELP
from ..errors import UserError
from ..families.flux import FLUX1_DEV
from ..models import DEFAULT_MODEL, SDXL_MODEL, BaseModel, ModelError, load_base_model, resolve_hf_token, source_kind
from .base import View, row

log = logging.getLogger(__name__)

OTHER = ""  # the "Start from" choice for a model typed in the box
# The base models offered by name: (label, what choosing it means), by source.
CHOICES = {
    DEFAULT_MODEL: ("Stable Diffusion 1.5", "512 px; trains fastest and fits a free Colab T4; most tutorials use it."),
    SDXL_MODEL: ("Stable Diffusion XL", "Better images at 1024 px; needs more GPU memory and time, so it trains a LoRA by "
                                        "default (whether it fits a free T4 is not measured yet)."),
    FLUX1_DEV: ("FLUX.1 [dev]", "The likeness people use today, at 512–1024 px; trains a LoRA on its transformer. Gated: "
                                "accept its licence on its Hugging Face page and set HF_TOKEN; its licence is non-commercial. "
                                "For now it needs a large GPU (an 80 GB A100/H100): the free T4's 4-bit plan is still to come."),
}

KIND_WORDS = {
    "hub": "a model on the Hugging Face Hub (downloaded once, then cached)",
    "folder": "a diffusers model folder on this machine",
    "single_file": "a single checkpoint file (.safetensors / .ckpt), as A1111 and civitai use",
    "url": "a link to a checkpoint file (civitai, Google Drive, Hugging Face, any https): downloaded once into a cache, then loaded as a single file",
}


class ModelView(View):
    """Pick and load the base model; `.base_model` is the loaded `BaseModel`."""

    def __init__(self, default: str | Path = DEFAULT_MODEL, *, config: str | Path | None = None, vae: str | Path | None = None,
                 loader: Callable[..., BaseModel] = load_base_model) -> None:
        super().__init__()
        self._loader = loader
        self.loaded: BaseModel | None = None
        self._token_from_box = False  # the box applied a token since the last button press
        self._listeners: list[Callable[[BaseModel], Any]] = []  # views of later sections that follow the model
        self.source_text = W.Text(value=str(default or DEFAULT_MODEL), placeholder="a Hub id, a folder, a .safetensors file or a link",
                                  layout=W.Layout(width="420px"))
        self.choice = W.Dropdown(options=[(label, source) for source, (label, _) in CHOICES.items()] + [("Another model (type it below)", OTHER)],
                                 value=self._choice_for(self.source_text.value), layout=W.Layout(width="260px"))
        self.choice_help = W.HTML()
        self.kind = W.HTML()
        self.config_text = W.Text(value=str(config or ""), placeholder="only for a single file; usually empty",
                                  layout=W.Layout(width="420px"))
        self.vae_text = W.Text(value=str(vae or ""), placeholder=f"usually empty; {SDXL_FP16_VAE} for SDXL",
                               layout=W.Layout(width="420px"))
        self.vae_row = row(self.vae_text, VAE_HELP, "VAE (optional)")
        # continuous_update=False: the value arrives once, on Enter or leaving the box, not per keystroke
        self.token_box = W.Password(placeholder="hf_…", continuous_update=False, layout=W.Layout(width="300px"))
        self.token_button = W.Button(description="Use this token", icon="key")
        self.token_state = W.HTML()
        self.load_button = W.Button(description="Load model", button_style="primary", icon="download")
        self.source_text.observe(lambda _: self._source_typed(), names="value")
        self.choice.observe(lambda _: self._choice_picked(), names="value")
        self.token_box.observe(self._on_token_typed, names="value")
        self.token_button.on_click(lambda _: self._on_token_button())
        self.load_button.on_click(lambda _: self.load())
        self._show_kind()
        self._show_choice()
        self._show_token_state()
        self.widget = W.VBox([
            row(self.choice, "A well-known base model to start from, or another one typed below.", "Start from"),
            row(self.choice_help, "", " "),
            row(self.source_text, "A Hub id like stable-diffusion-v1-5/stable-diffusion-v1-5, a folder, a .safetensors file, or a link to one (civitai download link, Google Drive share, https; a civitai key is read from the CIVITAI_TOKEN secret).", "Base model"),
            row(self.kind, "", " "),
            row(self.config_text, "For a single file: a diffusers folder or Hub id whose configs describe it (SD 2.x files need one).", "Config (optional)"),
            self.vae_row,
            row(W.HBox([self.token_box, self.token_button]), "For gated or private models, and for pushing to the Hub (write access); kept in this runtime only, never saved.", "Hugging Face token"),
            row(self.token_state, "", " "),
            self.load_button, self.status, self.error, self.out,
        ])

    # --- what the user chose ------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self.source_text.value.strip()

    @property
    def vae(self) -> str | None:
        """The VAE typed in its box while the box is shown; None: the model's own."""
        return (self.vae_text.value.strip() or None) if self.vae_row.layout.display != "none" else None

    @property
    def base_model(self) -> BaseModel:
        if self.loaded is None:
            raise UserError("No base model is loaded yet; press 'Load model' in the base model section.")
        return self.loaded

    # --- actions ----------------------------------------------------------------------------------
    def load(self, *, raise_errors: bool = False) -> BaseModel | None:
        def load() -> BaseModel:
            if not self.source:
                raise ModelError(f"The base model is empty; type a Hub id such as {DEFAULT_MODEL}, a folder or a .safetensors file.")
            self.show_status(f"Loading {self.source}… (a first download takes a few minutes: about 4 GB for SD 1.5, "
                             "7 GB for SDXL)")
            model = self._loader(self.source, config=self.config_text.value.strip() or None, vae=self.vae)
            self.loaded = model
            self.show_status(f"Loaded: {model.info.describe()}.", ok=True)
            self._tell_listeners(model)
            return model

        result = self._act(load, raise_errors=raise_errors, busy=[self.load_button])
        if result is None:
            self.show_status("")
        return result

    def on_load(self, listener: Callable[[BaseModel], Any]) -> None:
        """Call `listener(base_model)` after each successful load; a listener that fails is logged, never turned into
        a failed load."""
        self._listeners.append(listener)

    def use_token(self) -> None:
        token = self.token_box.value.strip()
        self.token_box.value = ""  # out of the widget (and the notebook's saved state) at once

        def apply() -> None:
            if not token:
                raise UserError("The token box is empty; paste a token from huggingface.co/settings/tokens.")
            if any(c.isspace() for c in token):
                raise UserError("That token has spaces in it; copy it again from huggingface.co/settings/tokens.")
            os.environ["HF_TOKEN"] = token  # this kernel only; huggingface_hub and dreamnb read it from here
            self._show_token_state()

        self._act(apply)

    def _on_token_typed(self, change: dict) -> None:
        if change["new"]:  # not the "" that use_token itself puts back
            self._token_from_box = True
            self.use_token()

    def _on_token_button(self) -> None:
        # Pressing the button takes the focus from the box, so the box commits (and applies) the
        # token just before this click arrives; that click then has nothing left to do.
        already_applied, self._token_from_box = self._token_from_box, False
        if already_applied and not self.token_box.value:
            return
        self.use_token()

    def _tell_listeners(self, model: BaseModel) -> None:
        for listener in self._listeners:
            try:
                listener(model)
            except Exception:  # a later section's view must not make the load look failed
                log.warning("a view could not follow the newly loaded base model", exc_info=True)

    # --- "Start from" and the box follow each other ------------------------------------------------
    @staticmethod
    def _choice_for(source: str) -> str:
        return source.strip() if source.strip() in CHOICES else OTHER

    def _choice_picked(self) -> None:
        # "Another model" empties the box for typing; a typed source is already "another model", so it is never lost
        if self._choice_for(self.source_text.value) != self.choice.value:
            self.source_text.value = self.choice.value
        self._show_choice()

    def _source_typed(self) -> None:
        self._show_kind()
        self.choice.value = self._choice_for(self.source_text.value)
        self._show_choice()

    def _show_choice(self) -> None:
        words = CHOICES[self.choice.value][1] if self.choice.value in CHOICES else "Any Stable Diffusion 1.x, 2.x or XL model: type it below."
        self.choice_help.value = f"<i>{html.escape(words)}</i>"
        self.vae_row.layout.display = "none" if self.choice.value == DEFAULT_MODEL else ""

    # --- display ---------------------------------------------------------------------------------
    def _show_kind(self) -> None:
        text = self.source
        if not text:
            self.kind.value = ""
            return
        try:
            self.kind.value = f"<i>{KIND_WORDS[source_kind(text)]}</i>"
        except ModelError as err:  # a hint while typing, not an error yet
            self.kind.value = f"<i>{html.escape(str(err))}</i>"

    def _show_token_state(self) -> None:
        available = bool(resolve_hf_token() or _stored_login())
        self.token_state.value = ("<i>A Hugging Face token is available for downloads.</i>" if available
                                  else "<i>No token: fine for public models such as SD 1.5.</i>")


def _stored_login() -> bool:
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:
        return False
