"""Export: save an attempt, or one of its checkpoints, for other tools (diffusers folder, one .safetensors for
A1111/ComfyUI, a LoRA in kohya's or diffusers' layout), or push it to the Hugging Face Hub. The view picks and names; `dreamnb.export` does the work."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from .. import export as core_export
from ..errors import UserError
from ..session import Session
from .attempt_picker import AttemptPicker
from .base import View, as_path, idle_session, resolve_session, row, using_model

# One line per format of `dreamnb.export.FORMATS` (which decides what there is; a format without a line here shows
# only its name).
FORMAT_WORDS = {
    "diffusers": "a diffusers folder: load it with DiffusionPipeline.from_pretrained, which picks the model's own pipeline class",
    "safetensors": "one .safetensors file for AUTOMATIC1111, ComfyUI or civitai (FLUX.1: its transformer, as ComfyUI loads it)",
    "lora": "small LoRA weights in the kohya layout, for AUTOMATIC1111, ComfyUI and civitai (an attempt trained with the 'lora' method)",
    "lora-diffusers": "the same LoRA weights in diffusers' own layout, for pipe.load_lora_weights (an attempt trained with the 'lora' method)",
}


def format_words(format: str) -> str:
    return FORMAT_WORDS.get(format, format)


class ExportView(View):
    """Export or push one attempt (its final weights or a checkpoint); `.path` is the last export, `.url` the last push."""

    def __init__(self, session: Any, model: Any, *, attempt: str | None = None, format: str = "diffusers",
                 out: str | Path | None = None, force: bool = False, fp16: bool = True,
                 repo_id: str = "", private: bool = True,
                 exporter: Callable[..., Any] = core_export.export_attempt, pusher: Callable[..., Any] = core_export.push_to_hub) -> None:
        super().__init__()
        if format not in core_export.FORMATS:
            raise UserError(f"Unknown export format {format!r}; choose one of {', '.join(core_export.FORMATS)}.")
        self._session, self._model = session, model
        self._export, self._push = exporter, pusher
        self.path: Path | None = None
        self.url: str | None = None
        # the attempt named in the cell, else the newest finished; no 'base': it has nothing trained to export
        self.picker = AttemptPicker(attempt, with_base=False, act=self._act)
        self.attempt, self.step = self.picker.attempt, self.picker.step
        self.refresh_button = W.Button(description="", icon="refresh", tooltip="List the attempts and checkpoints again",
                                       layout=W.Layout(width="40px"))
        self.format = W.Dropdown(options=list(core_export.FORMATS), value=format, layout=W.Layout(width="160px"))
        self.format_help = W.HTML()
        self.out_text = W.Text(value=str(out or ""), placeholder="empty: the session's exports/ folder",
                               layout=W.Layout(width="420px"))
        self.force = W.Checkbox(value=force, indent=False, description="Replace an existing export")
        self.fp16 = W.Checkbox(value=fp16, indent=False, description="Half precision (fp16): half the size")
        self.export_button = W.Button(description="Export", button_style="primary", icon="save")
        self.repo_id = W.Text(value=repo_id, placeholder="your-name/my-dreambooth-model", layout=W.Layout(width="320px"))
        self.private = W.Checkbox(value=private, indent=False, description="Private repository")
        self.push_button = W.Button(description="Push to the Hub", icon="cloud-upload")
        self.format.observe(lambda _: self._show_format(), names="value")
        self.refresh_button.on_click(lambda _: self._act(self.refresh))
        self.export_button.on_click(lambda _: self.export())
        self.push_button.on_click(lambda _: self.push())
        self._show_format()
        self.widget = W.VBox([
            row(W.HBox([self.picker.widget, self.refresh_button]),
                "Which trained attempt to export: 'final' is the end of training, a step an earlier checkpoint.", "Attempt"),
            row(self.format, "", "Format"), row(self.format_help, "", " "),
            row(self.out_text, "diffusers: a new folder; the others: a .safetensors file or an existing folder. Empty: the session's exports/ folder.", "Save to"),
            row(W.VBox([self.force, self.fp16]), "", " "),
            self.export_button,
            row(self.repo_id, "Needs a Hugging Face token with write access (see the base model section).", "Hub repository"),
            row(self.private, "Private: only you can see it; you can make it public later.", " "),
            self.push_button, self.status, self.error, self.out,
        ])
        try:
            self.refresh()
        except UserError:  # no session open yet; the buttons refresh
            pass

    # --- actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """List the attempts that have weights to export, and the picked attempt's steps."""
        self.picker.refresh(resolve_session(self._session))

    def export(self, *, raise_errors: bool = False) -> Path | None:
        def export() -> Path:
            session, name = self._chosen()
            out = as_path(self.out_text.value)  # None: the core names it in the session's exports/
            self.show_status(f"Exporting {name} as {self.format.value} to {out or 'the exports/ folder'}…")
            with using_model(self._model, "an export") as base:
                self.path = Path(self._export(session, base, name, self.format.value, out, force=self.force.value,
                                              fp16=self.fp16.value))
            self.show_status(f"Exported {name} to {self.path}.", ok=True)
            return self.path

        return self._act(export, raise_errors=raise_errors, busy=[self.export_button, self.push_button])

    def push(self, *, raise_errors: bool = False) -> str | None:
        def push() -> str:
            session, name = self._chosen()
            repo_id = self.repo_id.value.strip()
            if not repo_id or repo_id.count("/") != 1:
                raise UserError("Type the Hub repository as your-name/model-name.")
            self.show_status(f"Exporting {name} as {self.format.value} and uploading it to {repo_id}…")
            with using_model(self._model, "an upload") as base:
                url = self._push(session, base, name, repo_id, private=self.private.value, format=self.format.value)
            self.url = str(url)
            self.show_status(f"Pushed {name} to {self.url}.", ok=True)
            return self.url

        return self._act(push, raise_errors=raise_errors, busy=[self.export_button, self.push_button])

    # --- internals -------------------------------------------------------------------------------
    def _chosen(self) -> tuple[Session, str]:
        self.refresh()
        if self.picker.ref is None:
            raise UserError("There is no attempt to export yet; train one first.")
        return idle_session(self._session, "exporting"), self.picker.ref

    def _show_format(self) -> None:
        self.format_help.value = f"<i>{html.escape(format_words(self.format.value))}</i>"
        # fp16 only applies to the single file; the diffusers folder and the LoRA keep the trained precision
        self.fp16.layout.display = "" if self.format.value == "safetensors" else "none"
