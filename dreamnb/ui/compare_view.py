"""Sample and compare: the same prompts and seeds through several attempts (and the untrained base), one grid.

The default prompts are the probe prompts, chosen to show overfitting (the subject pasted into a painting,
two people with one face) and a weak token, so every grid answers "which attempt is best?" at a glance.
"""
from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from .. import fileio
from ..attempts import Comparison, comparison_grid
from ..config import COMPILE_UNET_HELP
from ..errors import UserError
from ..sample import PROBE_PROMPTS
from ..session import Session, describe_attempt
from .base import View, png_bytes, resolve_model, resolve_session, row

BASE = "base"
MIN_CELL_PX = 192


def parse_seeds(text: str) -> list[int]:
    """'1, 2 7' → [1, 2, 7]; one sentence saying what is wrong otherwise."""
    parts = [p for p in re.split(r"[\s,;]+", str(text).strip()) if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise UserError(f"Seeds must be whole numbers separated by commas, like '1, 2', not {text!r}.")
    return [int(p) for p in parts]


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not prompts:
        raise UserError("There are no prompts; write one per line ({token} and {class} are filled in).")
    return prompts


def default_attempts(session: Session) -> list[str]:
    """The base model and the newest finished attempt: 'did training help?'"""
    finished = [a.name for a in session.attempts if a.status == "finished"]
    return [BASE] + finished[-1:]


def readable_cell_size(model: Any) -> int | None:
    """Small test models make 64 px images: enlarge their cells so the labelled grid stays readable."""
    resolution = getattr(getattr(model, "info", None), "resolution", None)
    return MIN_CELL_PX if isinstance(resolution, int) and resolution < MIN_CELL_PX else None


class CompareView(View):
    """Pick attempts, prompts and seeds; `.comparison` is the result, `.grid_path` where its PNG was saved."""

    def __init__(self, session: Any, model: Any, *, attempts: list[str] | None = None, prompts: list[str] | None = None,
                 seeds=(1, 2), num_inference_steps: int = 25, guidance_scale: float = 7.5,
                 cell_size: int | None = None, save_dir: str | Path | None = None,
                 comparer: Callable[..., Comparison] = comparison_grid) -> None:
        super().__init__()
        self._session, self._model, self._compare = session, model, comparer
        self._chosen = list(attempts) if attempts else None  # None: the default pick
        self.cell_size, self.save_dir = cell_size, save_dir
        self.comparison: Comparison | None = None
        self.grid_path: Path | None = None
        self.attempts = W.SelectMultiple(options=[BASE], value=[BASE], rows=4, layout=W.Layout(width="420px"))
        self.refresh_button = W.Button(description="", icon="refresh", tooltip="List the attempts again",
                                       layout=W.Layout(width="40px"))
        self.prompts = W.Textarea(value="\n".join(prompts or PROBE_PROMPTS), rows=6, layout=W.Layout(width="620px"))
        self.seeds = W.Text(value=", ".join(str(s) for s in seeds), layout=W.Layout(width="160px"))
        self.steps = W.BoundedIntText(value=num_inference_steps, min=1, max=150, layout=W.Layout(width="100px"))
        self.guidance = W.FloatText(value=guidance_scale, step=None, layout=W.Layout(width="100px"))
        self.compile_unet = W.Checkbox(value=False, indent=False, layout=W.Layout(width="100px"))
        self.compare_button = W.Button(description="Make the grid", button_style="primary", icon="th")
        self.grid = W.Image(format="png", layout=W.Layout(max_width="100%", display="none"))
        self._filling = False
        self.attempts.observe(self._picked, names="value")
        self.refresh_button.on_click(lambda _: self._act(self.refresh))
        self.compare_button.on_click(lambda _: self.compare())
        self.widget = W.VBox([
            row(W.HBox([self.attempts, self.refresh_button]), "Ctrl/Cmd-click to pick several; 'base' is the untrained model.", "Attempts"),
            row(self.prompts, "One per line; {token} and {class} are filled in from the attempt.", "Prompts"),
            row(self.seeds, "The same seeds for every attempt, so only the training differs.", "Seeds"),
            row(self.steps, "Denoising steps per image (25 is plenty with DPM++).", "Steps"),
            row(self.guidance, "How closely images follow the prompt (7.5 is usual).", "Guidance"),
            row(self.compile_unet, COMPILE_UNET_HELP, "Compile"),
            self.compare_button, self.status, self.error, self.grid, self.out,
        ])
        try:
            self.refresh()
        except UserError:  # the session is opened in an earlier cell later on; Compare refreshes then
            pass

    # --- actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        session = resolve_session(self._session)
        options = [(BASE, BASE)] + [(describe_attempt(a), a.name) for a in session.attempts]
        names = [value for _, value in options]
        chosen = [n for n in (self._chosen or default_attempts(session)) if n in names] or [BASE]
        self._filling = True
        try:
            self.attempts.options = options
            self.attempts.value = tuple(chosen)
        finally:
            self._filling = False

    def compare(self, *, raise_errors: bool = False) -> Comparison | None:
        def compare() -> Comparison:
            self.refresh()
            session = resolve_session(self._session)
            names = list(self.attempts.value)
            if not names:
                raise UserError("No attempt is picked; pick 'base' and at least one attempt.")
            prompts, seeds = parse_prompts(self.prompts.value), parse_seeds(self.seeds.value)
            model = resolve_model(self._model)
            self.show_status(f"Generating {len(names) * len(prompts) * len(seeds)} images…")
            comparison = self._compare(session, model, names, prompts, seeds,
                                       num_inference_steps=self.steps.value, guidance_scale=self.guidance.value,
                                       cell_size=self.cell_size or readable_cell_size(model),
                                       compile_unet=self.compile_unet.value)
            self.comparison = comparison
            self.grid.value = png_bytes(comparison.grid)
            self.grid.layout.display = ""
            self.grid_path = self._save(session, comparison, names)
            self.show_status(f"Saved the grid as {self.grid_path}.", ok=True)
            return comparison

        result = self._act(compare, raise_errors=raise_errors, busy=[self.compare_button])
        if result is None:
            self.show_status("")
        return result

    # --- internals -------------------------------------------------------------------------------
    def _picked(self, change) -> None:
        if not self._filling:
            self._chosen = list(change["new"])

    def _save(self, session: Session, comparison: Comparison, names: list[str]) -> Path:
        folder = Path(self.save_dir) if self.save_dir else session.path / "grids"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        label = "-vs-".join(names)
        label = label if len(label) <= 100 else f"{len(names)}-attempts"  # file names have a length limit
        path = folder / f"compare-{label}-{stamp}.png"
        fileio.save_with(path, lambda tmp: comparison.grid.save(tmp, format="PNG"))
        return path
