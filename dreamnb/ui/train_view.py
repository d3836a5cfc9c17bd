"""Train: the settings form, Train / Stop / Resume, and a live view drawn from the trainer's events.

Pressing Train runs `dreamnb.train.train` in a background thread, so the kernel keeps handling widget
events and Stop works (it sets the `threading.Event` the trainer checks after every step; the trainer
then saves a checkpoint). The live view is redrawn from `TrainEvent`s only: the view never trains.
Headless runs (`auto=True`) train in the foreground instead, so the next cell sees the finished attempt.
When a run ends, its loss curve (from log.csv) and newest previews move from the live view to plain outputs
of the cell (`base.Results`), where a saved or reopened notebook still shows them.
"Start from" an attempt (or one of its checkpoints) fills the form with its settings (`continue_config`) and
trains more steps on top of its weights, as a new attempt that records where it came from.
The form's defaults follow the base model's family (`config.preset_values`: SDXL trains at 1024 px with LoRA), also
when the model is loaded after this cell ran: the base model section tells the view (`ModelView.on_load`).
"""
from __future__ import annotations

import html
import io
import logging
import threading
import time
import traceback
from typing import Any, Callable

import ipywidgets as W

from .. import colab
from ..config import TrainConfig
from ..errors import UserError
from ..fileio import describe_size
from ..session import Session, split_ref
from ..train import TrainEvent, TrainResult, continue_config, disk_estimate, read_log, train
from .attempt_picker import BASE, AttemptPicker
from .base import (HELP_STYLE, Results, StepFailed, View, current_text, follow_model, loaded_model, model_family,
                   png_bytes, resolve_model, resolve_session, row)
from .config_form import ConfigForm, family_keys

log = logging.getLogger(__name__)

CHART_REDRAW_S = 1.0  # drawing the loss curve costs ~50 ms; at most once a second keeps training fast
SAMPLE_PX = 192
PREVIEWS_MAX_PX = 1024  # the trainer's preview grid is one 512 px image per prompt, stacked: shrink it for the notebook
PHASE_NAMES = {"text_encoder": "text encoder", "unet": "UNet"}
KEPT_WHEN_CONTINUING = ("method", "lora_rank", "lora_alpha")  # the parent's weights are shaped by them


def duration(seconds: float | None) -> str:
    """'45 s', '3 min', '1 h 05 min'."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def loss_chart_png(losses: list[tuple[int, float, str]], width_in: float = 6.5, height_in: float = 2.6) -> bytes:
    """The loss curve (one colour per phase) as PNG bytes. Uses matplotlib's object API: no pyplot state,
    safe from the training thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for phase, color in (("text_encoder", "#8e24aa"), ("unet", "#1565c0")):
        points = [(s, l) for s, l, p in losses if p == phase]
        if points:
            axes.plot(*zip(*points), marker=".", color=color, label=PHASE_NAMES[phase])
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if losses:
        axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class LiveView:
    """Progress bar, a line with step / loss / time left, the loss curve and sample images, from TrainEvents."""

    def __init__(self, *, redraw_s: float = CHART_REDRAW_S) -> None:
        self.redraw_s = redraw_s
        self.bar = W.IntProgress(value=0, min=0, max=1, bar_style="info", layout=W.Layout(width="420px"))
        self.line = W.HTML()
        self.messages = W.HTML()
        self.chart = W.Image(format="png", layout=W.Layout(width="650px", display="none"))
        self.samples = W.HBox()
        self.losses: list[tuple[int, float, str]] = []
        self.sample_images: list[Any] = []
        self._notes: list[str] = []
        self._drawn_at = 0.0
        self.widget = W.VBox([W.HBox([self.bar, self.line]), self.chart, self.samples, self.messages])

    def reset(self) -> None:
        self.losses, self.sample_images, self._notes = [], [], []
        self.bar.value, self.bar.max, self.bar.bar_style = 0, 1, "info"
        self.line.value = self.messages.value = ""
        self.chart.value, self.chart.layout.display = b"", "none"
        self.samples.children = ()
        self._drawn_at = 0.0

    def handle(self, event: TrainEvent) -> None:
        if event.total_steps:
            self.bar.max = event.total_steps
            self.bar.value = min(event.step, event.total_steps)
        if event.kind == "step" and event.loss is not None:
            self.losses.append((event.step, event.loss, event.phase))
            phase = PHASE_NAMES.get(event.phase, event.phase)
            self.line.value = (f"step {event.step} / {event.total_steps} · {phase} · loss {event.loss:.4f} · "
                               f"{duration(event.elapsed_s)} so far · about {duration(event.eta_s)} left")
            self.draw_chart()
        elif event.kind in ("info", "phase", "checkpoint", "start"):
            self.note(event.message or (f"Saved a checkpoint: {event.path}" if event.path else ""))
        if event.images:
            self.show_samples(event.images, event.step)
        if event.kind in ("done", "stopped", "error"):
            self.bar.bar_style = {"done": "success", "stopped": "warning", "error": "danger"}[event.kind]
            self.line.value = html.escape(event.message)
            self.draw_chart(force=True)

    def note(self, message: str) -> None:
        if message:
            self._notes = (self._notes + [message])[-4:]
            self.messages.value = "".join(f'<div style="{HELP_STYLE}">{html.escape(n)}</div>' for n in self._notes)

    def draw_chart(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.losses or (not force and now - self._drawn_at < self.redraw_s):
            return
        self._drawn_at = now
        self.chart.value = loss_chart_png(self.losses)
        self.chart.layout.display = ""

    def show_samples(self, images: list[Any], step: int) -> None:
        self.sample_images = list(images)
        tiles = [W.Image(value=png_bytes(image, SAMPLE_PX), format="png", layout=W.Layout(width=f"{SAMPLE_PX}px"))
                 for image in images]
        self.samples.children = [W.HTML(f"<b>Samples at step {step}</b>"), *tiles]


def model_note(family: str, preset: str = "face") -> str:
    """One line on why the defaults differ for this model family (`Family.settings_note`); '' where they don't."""
    from .. import families

    return families.get(family).settings_note(TrainConfig.from_preset(preset, family=family))


class TrainView(View):
    """What to start from + settings form + Train / Stop / Resume + live view. `.config` is the form's TrainConfig,
    `.result` the last run. `start_from`: None or 'base' for the base model, or 'attempt-1' / 'attempt-1@500' to train
    more on top of that attempt (its settings, with `settings` on top)."""

    def __init__(self, session: Any, model: Any, *, token: Any = None, attempt: str | None = None,
                 preset: str = "face", method: str | None = None, start_from: str | None = None,
                 trainer: Callable[..., TrainResult] = train, in_colab: bool | None = None, **settings: Any) -> None:
        super().__init__()
        self._session, self._model, self._trainer = session, model, trainer
        token_text = current_text(token).strip()
        family = model_family(model)
        self.form = ConfigForm(TrainConfig.from_preset(preset, method, family=family, token=token_text or None, **settings),
                               family=family)
        self._method = method  # the cell's own method; None: the model family's default
        self._settings = {name: value for name, value in settings.items() if value is not None}  # the cell's own
        self.model_note = W.HTML()  # why the defaults are what they are for this base model (SDXL)
        self._build_start_from(start_from)
        self.disk_line = W.HTML()  # the disk a run takes, under the form
        self._build_disconnect(colab.in_colab() if in_colab is None else in_colab)
        if hasattr(token, "text") and isinstance(getattr(token, "text"), W.Text):  # follow the token check box
            token.text.observe(lambda change: setattr(self.form.widgets["token"], "value", change["new"].strip()), names="value")
        self.attempt_text = W.Text(value=attempt or "", placeholder="empty: attempt-1, attempt-2, …",
                                   layout=W.Layout(width="260px"))
        self.train_button = W.Button(description="Train", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.resume_button = W.Button(description="Resume", icon="step-forward",
                                      tooltip="Continue the attempt named above (or the latest) from its last checkpoint")
        self.train_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.resume_button.on_click(lambda _: self.start(resume=True))
        self.live = LiveView()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: TrainResult | None = None
        self.events: list[TrainEvent] = []
        self.form.on_check(lambda problem: setattr(self.train_button, "disabled", problem is not None or self.running))
        self.form.on_check(lambda _: self._show_disk())
        self.form.check()
        self._show_model_note()
        follow_model(model, self._model_loaded)  # the base model section: follow the model it loads later
        self.results = Results("loss curve", "previews")  # of the last run, once it has ended
        self.widget = W.VBox([
            row(W.HBox([self.start_from.widget, self.start_from_refresh]), "The untrained base model, or a trained "
                "attempt ('final') or one of its checkpoints, to train more on top of it.", "Start from"),
            self.start_note,
            self.model_note,
            self.form.widget,
            self.disk_line,
            row(self.attempt_text, "A name for this try, so you can compare attempts later.", "Attempt name"),
            self.disconnect_row,
            W.HBox([self.train_button, self.stop_button, self.resume_button]),
            self.status, self.error, self.live.widget, self.out,
        ])
        self._list_start_points()

    # --- what the user chose --------------------------------------------------------------------
    @property
    def config(self) -> TrainConfig:
        return self.form.config

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def attempt(self) -> str | None:
        """The attempt the last run trained (None before the first run)."""
        return self.result.attempt if self.result else None

    # --- actions ----------------------------------------------------------------------------------
    def start(self, *, resume: bool = False, background: bool = True, raise_errors: bool = False) -> TrainResult | None:
        """Train a new attempt (or resume one). In the background the call returns at once; `wait()` joins."""
        if self.running:
            self.show_error("Training is already running; press Stop first, or wait for it to finish.")
            return None

        def begin():
            session = resolve_session(self._session)
            name = self.attempt_text.value.strip() or None
            if resume:
                name = self._attempt_to_resume(session, name)
                config = TrainConfig()  # the trainer reads the attempt's own saved settings
            else:
                config = self._config_to_train(session)
            model = resolve_model(self._model)
            return session, config, model, name

        prepared = self._act(begin, raise_errors=raise_errors)
        if prepared is None:
            return None
        self.stop_event.clear()
        self.live.reset()
        self.results.show("loss curve", None)
        self.results.show("previews", None)
        self.events = []
        self.result = None
        self._set_running(True)
        verb = "Resuming" if resume else "Starting"
        self.show_status(f"{verb} training… (Stop saves a checkpoint you can resume)")
        if background:
            self.thread = threading.Thread(target=self._run, args=(*prepared, resume), name="dreamnb-train", daemon=True)
            self.thread.start()
            return None
        failure = self._run(*prepared, resume)
        if raise_errors and failure:
            raise StepFailed(failure)
        return self.result

    def stop(self) -> None:
        """Ask the trainer to stop after the current step; it saves a checkpoint first."""
        if not self.running:
            self.show_status("Nothing is training.")
            return
        self.stop_event.set()
        self.stop_button.disabled = True
        self.show_status("Stopping after this step and saving a checkpoint…")

    def wait(self, timeout: float | None = None) -> TrainResult | None:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.result

    # --- what training starts from -----------------------------------------------------------------
    def _build_start_from(self, start_from: str | None) -> None:
        """The 'Start from' picker (the base model unless the cell names an attempt) and its line of explanation."""
        self._base_values = self.form.values  # the form as it was for the base model, restored when it is picked again
        self._parent_values: dict[str, Any] = {}  # the settings of the attempt picked to start from, as filled in
        self._filled_from = BASE  # what the form's settings are those of
        self.start_from = AttemptPicker(start_from, base_label="the base model", pick_newest=False,
                                        argument="start_from", act=self._act)
        self.start_from.on_change(self._start_from_picked)
        self.start_from_refresh = W.Button(description="", icon="refresh", tooltip="List the attempts and checkpoints again",
                                           layout=W.Layout(width="40px"))
        self.start_from_refresh.on_click(lambda _: self._act(lambda: self.start_from.refresh(resolve_session(self._session))))
        self.start_note = W.HTML()

    def _build_disconnect(self, in_colab: bool) -> None:
        """Colab only: the opt-in checkbox that ends the runtime when a run ends."""
        self.in_colab = in_colab
        self.disconnect = W.Checkbox(value=False, indent=False,
                                     description="Disconnect the runtime when training ends (saves compute units)",
                                     layout=W.Layout(width="480px"))
        self.disconnect_row = row(self.disconnect, "Ends this Colab runtime once the attempt and its results are saved, "
                                                   "so an idle GPU stops costing compute units.")
        self.disconnect_row.layout.display = "" if in_colab else "none"

    def _list_start_points(self) -> None:
        """List the attempts to start from, when the session is open (else Train lists them)."""
        try:
            session = resolve_session(self._session)
        except UserError:  # the session is opened in an earlier cell later on
            return
        self._act(lambda: self.start_from.refresh(session))

    def _start_from_picked(self) -> None:
        """Fill the form for what training starts from: the picked attempt's settings (with the cell's own on top),
        or, for the base model, the settings the form had before an attempt was picked."""
        ref = self.start_from.ref
        if ref == self._filled_from:
            return
        if ref == BASE:
            self._parent_values = {}
            self.form.set_values(self._base_values)
        else:
            session = resolve_session(self._session)
            parent, filled = continue_config(session, ref), continue_config(session, ref, **self._settings)
            if self._filled_from == BASE:
                self._base_values = self.form.values
            self._parent_values = parent.to_dict()
            self.form.set_values(filled.to_dict())
        self._filled_from = ref
        self._show_start_from()

    def _show_start_from(self) -> None:
        """One line on what continuing means; the settings the parent's weights are shaped by cannot change."""
        continuing = self._filled_from != BASE
        for name in KEPT_WHEN_CONTINUING:
            self.form.widgets[name].disabled = continuing
        parent, name = self.form.values["parent"], split_ref(self._filled_from)[0]
        note = (f"Continues {parent} with its settings: the step counts are steps more, and the text encoder stays "
                f"as {name} left it unless you give it steps.")
        self.start_note.value = f'<span style="{HELP_STYLE}">{html.escape(note)}</span>' if continuing else ""

    def _config_to_train(self, session: Session) -> TrainConfig:
        """The form's settings; when starting from an attempt, its settings with what the form changed."""
        picked = self.start_from.ref
        self.start_from.refresh(session)
        if picked != BASE and self.start_from.ref != picked:
            raise UserError(f"{picked} is no longer in this session (deleted?); pick what to start from again.")
        if self.start_from.ref != self._filled_from:  # picked before its settings could be filled in
            self._start_from_picked()
        if self._filled_from == BASE:
            return self.form.config
        changed = {name: value for name, value in self.form.values.items() if value != self._parent_values[name]}
        return continue_config(session, self._filled_from, **changed)

    def use_family(self, family: str) -> None:
        """Refill the settings presets set for a base model of `family` (its key), keeping the cell's own
        values and the user's token and class word; the base model section calls it when a model is loaded."""
        if family == self.form.family:
            return
        fresh = TrainConfig.from_preset(self.form.values["preset"], self._method, family=family, **self._settings)
        values = {name: getattr(fresh, name) for name in family_keys() | {"method"} if name not in self.form.kept()}
        self.form.family = family
        if self._filled_from == BASE:
            self.form.set_values(values)
        else:  # the form shows an attempt's settings: the new defaults wait until the base model is picked again
            self._base_values.update(values)
        self._show_model_note()

    def _model_loaded(self, base: Any) -> None:
        self.use_family(model_family(base))
        self.form.check()  # the disk estimate needs the loaded model

    def _show_model_note(self) -> None:
        note = model_note(self.form.family, self.form.values["preset"])
        self.model_note.value = f'<span style="{HELP_STYLE}">{html.escape(note)}</span>' if note else ""

    def _show_disk(self) -> None:
        """The disk the run will take with the settings as they are now (once the base model is loaded)."""
        base = loaded_model(self._model)
        try:
            if base is None:
                text = "Disk: load the base model above to see how much space a run takes."
            elif self.form.problem is not None:
                text = ""
            else:
                during, after = disk_estimate(self.form.config, base)
                text = (f"Disk: up to {describe_size(during)}; {describe_size(after)} once finished and its optimizer state "
                        "freed (session section, Free space).")
        except Exception:  # an estimate must never break the form
            log.warning("could not estimate the disk use of a run", exc_info=True)
            text = ""
        self.disk_line.value = f'<span style="{HELP_STYLE}">{html.escape(text)}</span>' if text else ""

    # --- internals -------------------------------------------------------------------------------
    def _attempt_to_resume(self, session: Session, name: str | None) -> str:
        attempt = session.attempt(name)  # SessionError (one sentence) when there is none
        if attempt.status == "finished":
            raise UserError(f"Attempt {attempt.name!r} has already finished; press Train to start a new attempt.")
        return attempt.name

    def _run(self, session: Session, config: TrainConfig, model: Any, name: str | None, resume: bool) -> str | None:
        """Train; show the outcome. Returns the failure sentence, or None. Runs in the training thread."""
        failure = None
        try:
            result = self._trainer(session, config, model, attempt=name, resume=resume,
                                   callback=self._on_event, stop=self.stop_event, progress=False)
            self.result = result
            if result.status == "failed":
                failure = result.message
                self.show_error(result.message)
            else:
                self.show_status(result.message, ok=result.status == "finished")
        except ValueError as err:  # UserError and the core's other one-sentence errors
            failure = str(err)
            self.show_error(failure)
            self.show_status("")
        except Exception as err:  # a bug: keep the details under the view
            failure = f"Training failed unexpectedly ({type(err).__name__}: {err}); the details are below."
            self.show_error(failure)
            self.show_status("")
            self.out.append_stderr(traceback.format_exc())
        finally:
            self._set_running(False)
        self._keep_results(session)
        self._relist_start_points(session)
        if self.disconnect.value:  # finished, stopped or failed: the attempt and its results are saved by now
            colab.disconnect_runtime()
        return failure

    def _keep_results(self, session: Session) -> None:
        """The attempt's loss curve, read from its log.csv (a resumed run's earlier steps included), and its
        newest previews (samples/step-N.png, labelled by the trainer), as plain outputs of the cell."""
        if self.result is None:
            return
        name = self.result.attempt
        folder = session.attempt_dir(name)
        try:  # what moves to the plain outputs leaves the live view, so it is not shown twice
            losses = [(int(r["step"]), float(r["loss"]), r["phase"]) for r in read_log(folder)]
            if losses:
                self.results.show("loss curve", loss_chart_png(losses), f"loss curve of {name}")
                self.live.chart.layout.display = "none"
            previews = sorted((folder / "samples").glob("step-*.png"))
            if previews:
                self.results.show("previews", png_bytes(previews[-1], PREVIEWS_MAX_PX), f"previews of {name}: {previews[-1]}")
                self.live.samples.children = ()
        except Exception:  # the run itself went fine; a drawing problem must not turn it into a failure
            log.warning("could not keep the loss curve and previews of %s", name, exc_info=True)

    def _relist_start_points(self, session: Session) -> None:
        """The attempt just trained can be started from next. Runs in the training thread, so outside `_act`."""
        try:
            self.start_from.refresh(session)
        except ValueError as err:  # the list stays as it was; Train lists it again
            log.warning("could not list the attempts to start from: %s", err)

    def _on_event(self, event: TrainEvent) -> None:
        self.events.append(event)
        try:
            self.live.handle(event)
        except Exception:  # runs inside the trainer: a drawing problem must never end a long run
            log.warning("could not show a training event", exc_info=True)

    def _set_running(self, running: bool) -> None:
        self.train_button.disabled = running or self.form.problem is not None
        self.resume_button.disabled = running
        self.stop_button.disabled = not running
