"""Sample and compare: the same prompts and seeds through several attempts (and the untrained base), one grid.
Each column is an attempt at a step of its own, so a grid can show base, attempt-1@500 and attempt-1 side by side.

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
from ..session import Session
from .attempt_picker import BASE, AttemptPicker
from .base import Results, View, idle_session, model_guidance, resolve_session, row, using_model

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
    """Pick attempts (each at its final weights or a checkpoint), prompts and seeds; `.refs` are the picks as the
    core names them ('base', 'attempt-1', 'attempt-1@500'), `.comparison` the result, `.grid_path` its PNG."""

    def __init__(self, session: Any, model: Any, *, attempts: list[str] | None = None, prompts: list[str] | None = None,
                 seeds=(1, 2), num_inference_steps: int = 25, guidance_scale: float | None = None,
                 cell_size: int | None = None, save_dir: str | Path | None = None,
                 comparer: Callable[..., Comparison] = comparison_grid) -> None:
        super().__init__()
        self._session, self._model, self._compare = session, model, comparer
        self._chosen = list(attempts) if attempts else None  # None: base and the newest finished attempt
        self._made_from: list[str] = []  # the columns as they were made, until the user changes them
        self.pickers: list[AttemptPicker] = []
        self.cell_size, self.save_dir = cell_size, save_dir
        self.comparison: Comparison | None = None
        self.grid_path: Path | None = None
        self.columns = W.VBox()  # one row per picker: attempt, step, remove
        self.add_button = W.Button(description="Add", icon="plus", tooltip="Add a column: another attempt or checkpoint",
                                   layout=W.Layout(width="80px"))
        self.refresh_button = W.Button(description="", icon="refresh", tooltip="List the attempts again",
                                       layout=W.Layout(width="40px"))
        self.prompts = W.Textarea(value="\n".join(prompts or PROBE_PROMPTS), rows=6, layout=W.Layout(width="620px"))
        self.seeds = W.Text(value=", ".join(str(s) for s in seeds), layout=W.Layout(width="160px"))
        self.steps = W.BoundedIntText(value=num_inference_steps, min=1, max=150, layout=W.Layout(width="100px"))
        self.guidance = W.FloatText(value=model_guidance(model) if guidance_scale is None else guidance_scale, step=None,
                                    layout=W.Layout(width="100px"))
        self.compile_unet = W.Checkbox(value=False, indent=False, layout=W.Layout(width="100px"))
        self.compare_button = W.Button(description="Make the grid", button_style="primary", icon="th")
        self.results = Results("grid")  # the grid is shown under the widget, as a plain output of the cell
        self.add_button.on_click(lambda _: self._act(self.add))
        self.refresh_button.on_click(lambda _: self._act(self.refresh))
        self.compare_button.on_click(lambda _: self.compare())
        self.widget = W.VBox([
            row(W.VBox([self.columns, W.HBox([self.add_button, self.refresh_button])]),
                "One column each: 'base' is the untrained model; 'final' is the end of training, a step an "
                "earlier checkpoint.", "Attempts"),
            row(self.prompts, "One per line; {token} and {class} are filled in from the attempt.", "Prompts"),
            row(self.seeds, "The same seeds for every attempt, so only the training differs.", "Seeds"),
            row(self.steps, "Denoising steps per image (25 is plenty with DPM++).", "Steps"),
            row(self.guidance, "How closely images follow the prompt (7.5 is usual for Stable Diffusion, 3.5 for FLUX.1).", "Guidance"),
            row(self.compile_unet, COMPILE_UNET_HELP, "Compile"),
            self.compare_button, self.status, self.error, self.out,
        ])
        try:
            self.refresh()
        except UserError:  # the session is opened in an earlier cell later on; Compare refreshes then
            pass

    # --- what the user chose --------------------------------------------------------------------
    @property
    def refs(self) -> list[str]:
        """The columns' weights: 'base', 'attempt-1' or 'attempt-1@500'."""
        return [picker.ref for picker in self.pickers if picker.ref]

    # --- actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """List the attempts and their steps in every column. Until the user changes them, the columns are the
        attempts named in the cell, or base and the newest finished attempt (which a run since may have changed)."""
        session = resolve_session(self._session)
        wanted = self._chosen or default_attempts(session)
        if self.refs == self._made_from and wanted != self._made_from:
            self._make_columns(wanted)
        for picker in self.pickers:
            picker.refresh(session)

    def add(self) -> None:
        """One more column, at first the newest finished attempt."""
        self.refresh()
        self._add_picker(None).refresh(resolve_session(self._session))

    def compare(self, *, raise_errors: bool = False) -> Comparison | None:
        def compare() -> Comparison:
            self.refresh()
            session = idle_session(self._session, "making a grid")
            names = self.refs
            if not names:
                raise UserError("No attempt is picked; add 'base' and at least one attempt.")
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise UserError(f"{', '.join(twice)} is picked twice; pick each attempt or checkpoint once.")
            prompts, seeds = parse_prompts(self.prompts.value), parse_seeds(self.seeds.value)
            with using_model(self._model, "making a grid") as model:
                self.show_status(f"Generating {len(names) * len(prompts) * len(seeds)} images…")
                comparison = self._compare(session, model, names, prompts, seeds,
                                           num_inference_steps=self.steps.value, guidance_scale=self.guidance.value,
                                           cell_size=self.cell_size or readable_cell_size(model),
                                           compile_unet=self.compile_unet.value)
            self.comparison = comparison
            self.grid_path = self._save(session, comparison, names)
            self.results.show("grid", comparison.grid, f"comparison grid of {', '.join(names)}: {self.grid_path}")
            self.show_status(f"Saved the grid as {self.grid_path}.", ok=True)
            return comparison

        result = self._act(compare, raise_errors=raise_errors, busy=[self.compare_button])
        if result is None:
            self.show_status("")
        return result

    # --- internals -------------------------------------------------------------------------------
    def _make_columns(self, refs: list[str]) -> None:
        self.pickers, self.columns.children = [], []
        for ref in refs:
            self._add_picker(ref)
        self._made_from = list(refs)

    def _add_picker(self, ref: str | None) -> AttemptPicker:
        picker = AttemptPicker(ref, argument="attempts", act=self._act)
        remove = W.Button(description="", icon="times", tooltip="Remove this column", layout=W.Layout(width="40px"))
        line = W.HBox([picker.widget, remove])
        remove.on_click(lambda _: self._remove(picker, line))
        self.pickers.append(picker)
        self.columns.children = [*self.columns.children, line]
        return picker

    def _remove(self, picker: AttemptPicker, line: W.HBox) -> None:
        self.pickers.remove(picker)
        self.columns.children = [child for child in self.columns.children if child is not line]

    def _save(self, session: Session, comparison: Comparison, names: list[str]) -> Path:
        folder = Path(self.save_dir) if self.save_dir else session.path / "grids"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        label = "-vs-".join(names)
        label = label if len(label) <= 100 else f"{len(names)}-attempts"  # file names have a length limit
        path = folder / f"compare-{label}-{stamp}.png"
        fileio.save_with(path, lambda tmp: comparison.grid.save(tmp, format="PNG"))
        return path
