"""Base model: a Hugging Face id, a local diffusers folder or a single .safetensors/.ckpt file, plus a token.

The token box never shows, keeps or saves the token: its value is moved into this kernel's HF_TOKEN
(where `models.resolve_hf_token` and huggingface_hub look) and the box is emptied at once, so the
token is not in the notebook file or its saved widget state.
"""
from __future__ import annotations

import html

import os
from pathlib import Path
from typing import Callable

import ipywidgets as W

from ..errors import UserError
from ..models import DEFAULT_MODEL, BaseModel, ModelError, load_base_model, resolve_hf_token, source_kind
from .base import View, row

KIND_WORDS = {
    "hub": "a model on the Hugging Face Hub (downloaded once, then cached)",
    "folder": "a diffusers model folder on this machine",
    "single_file": "a single checkpoint file (.safetensors / .ckpt), as A1111 and civitai use",
    "url": "a link to a checkpoint file (civitai, Google Drive, Hugging Face, any https): downloaded once into a cache, then loaded as a single file",
}


class ModelView(View):
    """Pick and load the base model; `.base_model` is the loaded `BaseModel`."""

    def __init__(self, default: str | Path = DEFAULT_MODEL, *, config: str | Path | None = None,
                 loader: Callable[..., BaseModel] = load_base_model) -> None:
        super().__init__()
        self._loader = loader
        self.loaded: BaseModel | None = None
        self._token_from_box = False  # the box applied a token since the last button press
        self.source_text = W.Text(value=str(default or DEFAULT_MODEL), layout=W.Layout(width="420px"))
        self.kind = W.HTML()
        self.config_text = W.Text(value=str(config or ""), placeholder="only for a single file; usually empty",
                                  layout=W.Layout(width="420px"))
        # continuous_update=False: the value arrives once, on Enter or leaving the box, not per keystroke
        self.token_box = W.Password(placeholder="hf_…", continuous_update=False, layout=W.Layout(width="300px"))
        self.token_button = W.Button(description="Use this token", icon="key")
        self.token_state = W.HTML()
        self.load_button = W.Button(description="Load model", button_style="primary", icon="download")
        self.source_text.observe(lambda _: self._show_kind(), names="value")
        self.token_box.observe(self._on_token_typed, names="value")
        self.token_button.on_click(lambda _: self._on_token_button())
        self.load_button.on_click(lambda _: self.load())
        self._show_kind()
        self._show_token_state()
        self.widget = W.VBox([
            row(self.source_text, "A Hub id like stable-diffusion-v1-5/stable-diffusion-v1-5, a folder, a .safetensors file, or a link to one (civitai download link, Google Drive share, https; a civitai key is read from the CIVITAI_TOKEN secret).", "Base model"),
            row(self.kind, "", " "),
            row(self.config_text, "For a single file: a diffusers folder or Hub id whose configs describe it (SD 2.x files need one).", "Config (optional)"),
            row(W.HBox([self.token_box, self.token_button]), "For gated or private models, and for pushing to the Hub (write access); kept in this runtime only, never saved.", "Hugging Face token"),
            row(self.token_state, "", " "),
            self.load_button, self.status, self.error, self.out,
        ])

    # --- what the user chose ------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self.source_text.value.strip()

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
            self.show_status(f"Loading {self.source}… (a first download of SD 1.5 takes a few minutes)")
            model = self._loader(self.source, config=self.config_text.value.strip() or None)
            self.loaded = model
            self.show_status(f"Loaded: {model.info.describe()}.", ok=True)
            return model

        result = self._act(load, raise_errors=raise_errors, busy=[self.load_button])
        if result is None:
            self.show_status("")
        return result

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
