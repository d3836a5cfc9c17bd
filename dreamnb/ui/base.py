"""What every notebook view shares: a `.widget`, an error line beside it, an Output for what the core prints,
and `Results`: what the view produced (grids, photos, the loss curve), kept as plain outputs of its cell.

A view is a thin window on core data (fastai's ImagesCleaner pattern): it shows, it collects what the
user chose as plain data, and its buttons call one core function each. Handlers run inside the view's
`Output` (ipywidgets' rule: otherwise JupyterLab drops their prints and errors). A mistake the user can
fix (`UserError`, or any `ValueError`: the project's rule for user errors) becomes one sentence beside the
widget, never a traceback; anything else is a bug, so its traceback goes into the Output under the sentence.
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import logging
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import ipywidgets as W

from ..errors import UserError

log = logging.getLogger(__name__)

HELP_STYLE = "color:#666;font-size:90%"
ERROR_STYLE = "color:#b00020;font-weight:600"
OK_STYLE = "color:#1b5e20"


class StepFailed(UserError):
    """A notebook step that failed while running without clicks (`auto=True`).

    IPython shows only its one sentence (`_render_traceback_`), so a headless run stops at the cell
    that went wrong with the same words the widget shows, and no wall of library frames.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class View:
    """Base for the notebook's views. Subclasses build `self.widget` and call `self._act(...)` in handlers."""

    widget: W.Widget

    def __init__(self) -> None:
        self.error = W.HTML()        # one sentence when something the user can fix went wrong
        self.status = W.HTML()       # what happened last, in words
        self.out = W.Output()        # prints, progress bars and tracebacks from the core
        self.results = Results()     # views that produce pictures or lists name their slots here

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
        self.results.display()

    # --- messages --------------------------------------------------------------------------------
    def show_error(self, message: str) -> None:
        self.error.value = f'<span style="{ERROR_STYLE}">⚠ {html.escape(message)}</span>' if message else ""

    @property
    def error_text(self) -> str:
        """The error sentence shown beside the widget, as plain text ('' when there is none)."""
        return _plain(self.error.value).removeprefix("⚠ ")

    def show_status(self, message: str, *, ok: bool = False) -> None:
        style = OK_STYLE if ok else ""
        self.status.value = f'<span style="{style}">{html.escape(message)}</span>' if message else ""

    @property
    def status_text(self) -> str:
        return _plain(self.status.value)

    # --- running an action -------------------------------------------------------------------------
    def _act(self, action: Callable[[], Any], *, raise_errors: bool = False, clear: bool = True,
             capture: bool = True, busy: Sequence[W.Button] = ()) -> Any:
        """Run `action` with its output in this view's Output; show a failure beside the widget.

        Returns what the action returned, or None when it failed. With `raise_errors` (headless runs)
        a failure is also raised as `StepFailed`, so the notebook stops at this cell. `capture=False`
        for actions run from another thread: capturing there would redirect whatever the kernel's
        current cell prints, since an Output captures by the kernel's current message. The `busy`
        buttons are off while the action runs: a second click would queue the same slow work again.
        """
        self.show_error("")
        if clear:
            self.out.outputs = ()  # not clear_output(): that one needs a kernel and a current cell
        failure: BaseException | None = None
        was_disabled = [button.disabled for button in busy]
        for button in busy:
            button.disabled = True
        # Results the action keeps are written out when the Output's capture has ended (see `Results`).
        with self.results.deferred(), self.out if capture else contextlib.nullcontext():
            try:
                return action()
            except ValueError as err:  # the project's user errors (UserError is one) are one-sentence ValueErrors
                failure = err
                self.show_error(str(err))
            except Exception as err:  # a bug, not the user's fault: keep the details
                failure = err
                log.exception("unexpected error in the notebook view")
                self.show_error(f"Something unexpected went wrong ({type(err).__name__}: {_first_line(err)}); the details are below.")
                self.out.append_stderr(traceback.format_exc())
            finally:
                for button, disabled in zip(busy, was_disabled):
                    button.disabled = disabled
        if failure is not None and raise_errors:
            raise StepFailed(str(failure) if isinstance(failure, ValueError) else self.error_text) from failure
        return None


class Results:
    """A view's results as ordinary outputs of its cell, below the widget: slots named when the view is
    built ("grid", "loss curve"), each holding one picture or one piece of Markdown.

    Why: widget state is not kept with a notebook. A notebook run headless (papermill, nbclient), shown on
    GitHub, or reopened in Colab after a disconnect shows empty boxes where widgets were; ordinary outputs
    stay. So each slot is displayed, empty or not, with a display id when the view is displayed, and is
    replaced in place (`update_display`) whenever its result changes: during the cell's own run (`auto=True`)
    or after a button click long after. The Jupyter protocol applies such an update to the output holding
    the id, whichever message it answers, and the notebook is saved with the new content (tested here with
    nbclient, and in JupyterLab by tests/browser; Colab implements display updates too).

    Shown once: a result lives only here, not also in the widget, so what a user sees after a click is the
    form, the status line, and the result under it, exactly as a reopened or exported notebook shows it. The
    widget keeps what is for acting or live (progress, the loss curve while training, the caption editor).

    While a handler runs inside the view's Output (`View._act`), updates wait until the capture ends: a
    capturing Output would take the update into the widget's state instead of the cell's outputs.
    """

    def __init__(self, *names: str) -> None:
        self.outputs: dict[str, dict[str, str] | None] = {name: None for name in names}  # MIME bundles
        self._ids = {name: f"dreamnb-{uuid.uuid4().hex}" for name in names}
        self._displayed = False
        self._waiting: set[str] | None = None

    def show(self, name: str, value: Any, text: str = "") -> None:
        """Put a result in its slot: a PIL image, PNG bytes or an image file as a picture, a str as Markdown;
        None or '' empties the slot. `text` says what a picture is, for text-only viewers (and for tests)."""
        self.outputs[name] = mime_bundle(value, text) if value is not None and value != "" else None
        self._publish(name)

    def display(self) -> None:
        """Show every slot under the widget (called when the view is displayed)."""
        if not _in_ipython():
            return
        from IPython.display import display

        for name, bundle in self.outputs.items():
            display(bundle or EMPTY_OUTPUT, raw=True, display_id=self._ids[name])
        self._displayed = True

    @contextlib.contextmanager
    def deferred(self):
        """Hold updates back until the block ends, then write out the slots that changed."""
        outer, self._waiting = self._waiting, set()
        try:
            yield
        finally:
            waiting, self._waiting = self._waiting, outer
            for name in waiting:
                self._publish(name)

    def _publish(self, name: str) -> None:
        if self._waiting is not None:
            self._waiting.add(name)
        elif self._displayed:
            from IPython.display import update_display

            update_display(self.outputs[name] or EMPTY_OUTPUT, raw=True, display_id=self._ids[name])


EMPTY_OUTPUT = {"text/plain": ""}  # an empty slot: nothing visible until a result arrives


def mime_bundle(value: Any, text: str = "") -> dict[str, str]:
    """A picture (PIL image, PNG bytes, image file) as image/png, or Markdown text, each with a plain-text line."""
    if isinstance(value, str):
        return {"text/markdown": value, "text/plain": text or value}
    data = value if isinstance(value, bytes) else png_bytes(value)
    return {"image/png": base64.b64encode(data).decode("ascii"), "text/plain": text or "(a picture)"}


def row(widget: W.Widget, help_text: str = "", label: str = "", label_width: str = "190px") -> W.HBox:
    """One form line: a label, the widget, and its one-line explanation beside it."""
    parts: list[W.Widget] = []
    if label:
        parts.append(W.HTML(f"<b>{html.escape(label)}</b>", layout=W.Layout(width=label_width, flex="0 0 auto")))
    parts.append(widget)
    if help_text:
        parts.append(W.HTML(f'<span style="{HELP_STYLE}">{html.escape(help_text)}</span>',
                            layout=W.Layout(flex="1 1 auto", margin="0 0 0 10px")))
    return W.HBox(parts, layout=W.Layout(align_items="center"))


def png_bytes(image, max_side: int | None = None) -> bytes:
    """A PIL image (or an image file) as PNG bytes for an `ipywidgets.Image`, shrunk to `max_side`."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def show(view: Any) -> Any:
    """Display the view when running under IPython (a notebook), and return it for the next cell."""
    if _in_ipython():
        from IPython.display import display

        display(view)
    return view


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def as_path(value: Any) -> Path | None:
    text = str(value).strip() if value is not None else ""
    return Path(text).expanduser() if text else None


def _plain(markup: str) -> str:
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", markup or "")).strip()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


# --- what a view was given: the core object, or the view of an earlier cell that will hold it -----------

def resolve_model(model: Any):
    """A loaded BaseModel from a BaseModel, a ModelView (once its Load was pressed) or a model source."""
    from ..models import BaseModel, load_base_model

    if isinstance(model, BaseModel):
        return model
    if hasattr(model, "base_model"):
        return model.base_model
    if isinstance(model, (str, Path)):
        return load_base_model(model)
    raise UserError(f"Cannot use a {type(model).__name__} as the base model; pass the view from the base model section.")


@contextlib.contextmanager
def using_model(model: Any, what: str):
    """The loaded BaseModel (as `resolve_model` gives it), in use by this thread for the duration: the one place views
    take the base model for work. While the notebook's training thread uses it (and parks it on the CPU), one sentence
    instead of sampling on a half-moved model (`BaseModel.in_use`)."""
    base = resolve_model(model)
    in_use = getattr(base, "in_use", None)  # a stand-in without one (a test's fake model) has nothing to guard
    with (in_use(what) if callable(in_use) else contextlib.nullcontext(base)):
        yield base


def loaded_model(model: Any):
    """The BaseModel if it is already loaded, else None (never loads: used for cheap previews)."""
    from ..models import BaseModel

    if isinstance(model, BaseModel):
        return model
    return getattr(model, "loaded", None)


def model_family(model: Any) -> str:
    """The loaded base model's family key (`ModelInfo.family`); the default model's while none is loaded yet."""
    from ..families import DEFAULT

    return getattr(getattr(loaded_model(model), "info", None), "family", None) or DEFAULT


def model_guidance(model: Any) -> float:
    """The guidance strength the loaded base model's family samples with (the default model's while none is loaded)."""
    from ..families import get

    return get(model_family(model)).sampling_guidance


def training_size(model: Any, preset: str = "face") -> int:
    """The training resolution the presets give the loaded base model's family (512 until a model is loaded)."""
    from ..config import TrainConfig

    return TrainConfig.from_preset(preset, family=model_family(model)).resolution


def follow_model(model: Any, listener: Callable[[Any], Any]) -> None:
    """Call `listener(base_model)` whenever the base model section (a ModelView) loads a model; nothing for a
    model given directly."""
    if callable(getattr(model, "on_load", None)):
        model.on_load(listener)


def resolve_session(session: Any):
    """A Session from a Session, a SessionView (once opened) or a session folder."""
    from ..session import Session, open_session

    if isinstance(session, Session):
        return session
    if hasattr(session, "session"):
        return session.session
    if isinstance(session, (str, Path)):
        return open_session(session)
    raise UserError(f"Cannot use a {type(session).__name__} as the session; pass the view from the session section.")


def idle_session(session: Any, what: str):
    """The session (as `resolve_session` gives it), refused in one sentence while another thread of this notebook writes
    to it (its training): for views that read what training writes and replaces, or run the model it has parked."""
    from ..session import refuse_while_busy

    found = resolve_session(session)
    refuse_while_busy(found.path, what)
    return found


def current_text(value: Any) -> str:
    """A string setting given directly, or read now from a view that has `.value` (e.g. the token check)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if hasattr(value, "value"):
        return str(value.value)
    return str(value)
