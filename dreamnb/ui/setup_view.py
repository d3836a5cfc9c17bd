"""Setup: what this runtime has (GPU, Colab) and where sessions are kept (Drive on Colab)."""
from __future__ import annotations

import html
import platform
from pathlib import Path

import ipywidgets as W

from .. import __version__, colab
from ..session import default_root
from .base import HELP_STYLE, View, as_path, row


class SetupView(View):
    """Shows the GPU and the runtime; `.root` is the folder chosen for sessions."""

    def __init__(self, session_root: str | Path | None = None, *, gpu: colab.GpuSummary | None = None,
                 in_colab: bool | None = None) -> None:
        super().__init__()
        self.gpu = gpu if gpu is not None else colab.gpu_summary()
        self.in_colab = colab.in_colab() if in_colab is None else in_colab
        self.root_text = W.Text(value=str(session_root or default_root()), layout=W.Layout(width="420px"))
        self.drive_button = W.Button(description="Keep sessions on Google Drive", icon="hdd",
                                     layout=W.Layout(width="260px", display="" if self.in_colab else "none"))
        self.drive_button.on_click(lambda _: self.use_drive())
        self.info = W.HTML(self._describe())
        where = ("On Colab, keep sessions on Google Drive: the runtime forgets everything when it disconnects."
                 if self.in_colab else "Each session is a folder here: photos, attempts, checkpoints.")
        self.widget = W.VBox([
            self.info,
            row(self.root_text, where, "Session folder"),
            self.drive_button, self.status, self.error, self.out,
        ])

    def _describe(self) -> str:
        import torch

        gpu = self.gpu.describe()
        advice = self.gpu.advice()
        lines = [
            f"<b>GPU:</b> {html.escape(gpu)}",
            f'<span style="{HELP_STYLE}">{html.escape(advice)}</span>' if advice else "",
            f'<span style="{HELP_STYLE}">dreamnb {__version__} · Python {platform.python_version()} · torch {torch.__version__}'
            f'{" · Google Colab" if self.in_colab else ""}</span>',
        ]
        return "<br>".join(line for line in lines if line)

    @property
    def root(self) -> Path:
        """The folder that holds the sessions (created when the first session is)."""
        return as_path(self.root_text.value) or default_root()

    def use_drive(self, *, raise_errors: bool = False) -> Path | None:
        """Mount Google Drive (Colab asks for permission) and keep sessions there."""
        def mount() -> Path:
            self.show_status("Mounting Google Drive…")
            root = colab.mount_drive()
            self.root_text.value = str(root)
            self.show_status(f"Sessions are kept in {root}.", ok=True)
            return root

        return self._act(mount, raise_errors=raise_errors)
