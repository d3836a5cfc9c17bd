"""Session: start a new one, or resume one of the sessions in the root folder, with its attempts listed.

Once a session is open, its housekeeping: the attempts with where each started from and the disk each takes
(final weights, every checkpoint, optimizer state), deleting an attempt or some of its checkpoints (only after
a second button that says what goes and how much it frees), and dropping the optimizer state of finished
attempts, which a free 15 GB Google Drive soon needs.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from ..errors import UserError
from ..fileio import describe_size
from ..images import prepared_files
from ..session import (DiskUse, Session, check_name, create_session, default_root, delete_attempt, delete_checkpoints,
                       describe_attempt, disk_usage, free_space, list_sessions, open_or_create, open_session,
                       refuse_while_busy)
from .base import ERROR_STYLE, HELP_STYLE, Results, View, resolve_session, row

NEW, RESUME = "new", "resume"


def describe_attempts(session: Session) -> str:
    """'attempt-1 (finished, 1850 steps), attempt-2 (interrupted, 400 steps)' or 'no attempts yet'."""
    if not session.attempts:
        return "no attempts yet"
    return ", ".join(describe_attempt(a) for a in session.attempts)


def disk_table(session: Session, usage: dict[str, DiskUse]) -> str:
    """The attempts, what each started from and the disk each takes, as a Markdown table with the totals under it."""
    if not session.attempts:
        return ""
    lines = ["| Attempt | Started from | Final weights | Checkpoints | Optimizer state | Other | Total |",
             "|---|---|---|---|---|---|---|"]
    for attempt in session.attempts:
        use = usage[attempt.name]
        checkpoints = "<br>".join(f"step {step}: {describe_size(size)}" for step, size in use.checkpoints.items()) or "—"
        cells = [describe_attempt(attempt), attempt.parent or "base model",
                 describe_size(use.final), checkpoints, describe_size(use.optimizer), describe_size(use.other),
                 f"**{describe_size(use.total)}**"]
        lines.append("| " + " | ".join(cells) + " |")
    total, optimizer = sum(u.total for u in usage.values()), sum(u.optimizer for u in usage.values())
    lines += ["", f"**{describe_size(total)}** in attempts, of which {describe_size(optimizer)} is optimizer state "
                  "(in checkpoints; only resuming a stopped attempt needs it)."]
    return "\n".join(lines)


class HousekeepingView(View):
    """An open session's attempts and disk use (`.usage`, from `disk_usage`), and what frees space. Deleting asks
    first: the first button says what will go and how much that frees, and only "Yes, delete" does it."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self._session = session
        self._pending: Callable[[], str] | None = None  # the deletion waiting for "Yes, delete"
        self.usage: dict[str, DiskUse] = {}
        self.results = Results("attempts")  # the table, as a plain output of the cell
        self.attempt = W.Dropdown(options=[], layout=W.Layout(width="320px"))
        self.checkpoints = W.SelectMultiple(options=[], rows=3, layout=W.Layout(width="320px"))
        self.refresh_button = W.Button(description="", icon="refresh", tooltip="Measure the attempts again",
                                       layout=W.Layout(width="40px"))
        self.delete_attempt_button = W.Button(description="Delete attempt…", icon="trash", layout=W.Layout(width="180px"))
        self.delete_checkpoints_button = W.Button(description="Delete checkpoints…", icon="trash", layout=W.Layout(width="180px"))
        self.free_button = W.Button(description="Free space", icon="compress", layout=W.Layout(width="180px"))
        self.confirm_text = W.HTML()
        self.confirm_button = W.Button(description="Yes, delete", button_style="danger", icon="check")
        self.cancel_button = W.Button(description="Cancel")
        self.confirm_box = W.VBox([self.confirm_text, W.HBox([self.confirm_button, self.cancel_button])],
                                  layout=W.Layout(display="none"))
        self.attempt.observe(lambda _: self._attempt_picked(), names="value")
        self.checkpoints.observe(lambda _: self.cancel(), names="value")  # a new pick needs a new question
        self.refresh_button.on_click(lambda _: self._act(self.refresh))
        self.delete_attempt_button.on_click(lambda _: self._act(self.ask_delete_attempt))
        self.delete_checkpoints_button.on_click(lambda _: self._act(self.ask_delete_checkpoints))
        self.confirm_button.on_click(lambda _: self.confirm())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.free_button.on_click(lambda _: self.free())
        self.widget = W.VBox([
            W.HTML("<b>Attempts and disk space</b> (the table is under this cell)"),
            row(W.HBox([self.attempt, self.refresh_button]), "The attempt to clean up.", "Attempt"),
            row(self.checkpoints, "Ctrl/Cmd-click to pick several; a checkpoint can be compared, exported or continued from.",
                "Checkpoints"),
            row(self.delete_attempt_button, "Deletes the attempt: its final weights, checkpoints, samples and log."),
            row(self.delete_checkpoints_button, "Deletes the picked checkpoints; the attempt's final weights stay."),
            self.confirm_box,
            row(self.free_button, "Drops the optimizer state of finished attempts: only resuming needs it, and a finished "
                                  "attempt is continued, never resumed. Weights stay."),
            self.status, self.error, self.out,
        ])

    # --- what the user chose ------------------------------------------------------------------
    @property
    def picked(self) -> tuple[Session, str, list[int]]:
        """The session, the picked attempt and the picked checkpoints' steps."""
        if not self.attempt.value:
            raise UserError("This session has no attempts yet; there is nothing to delete.")
        return resolve_session(self._session), self.attempt.value, list(self.checkpoints.value)

    # --- actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Measure every attempt again; list them, and the picked one's checkpoints with their sizes."""
        session = resolve_session(self._session)
        self.usage = disk_usage(session)
        kept = self.attempt.value
        self.attempt.options = [(describe_attempt(a), a.name) for a in session.attempts]
        self.attempt.value = kept if kept in self.usage else (session.attempts[-1].name if session.attempts else None)
        self._attempt_picked()
        self.results.show("attempts", disk_table(session, self.usage) or "No attempts yet.")

    def ask_delete_attempt(self) -> None:
        session, name, _ = self.picked
        refuse_while_busy(session.path, f"deleting {name}")  # asked again when confirmed: the lock decides then
        use = disk_usage(session)[name]
        self._ask(f"Delete {name} with its final weights, {len(use.checkpoints)} checkpoint(s), samples and log? "
                  f"This frees {describe_size(use.total)} and cannot be undone.",
                  lambda: self._delete_attempt(session, name))

    def ask_delete_checkpoints(self) -> None:
        session, name, steps = self.picked
        if not steps:
            raise UserError(f"Pick the checkpoints of {name} to delete first (Ctrl/Cmd-click picks several).")
        refuse_while_busy(session.path, f"deleting checkpoints of {name}")
        sizes = disk_usage(session)[name].checkpoints
        size = sum(sizes.get(step, 0) for step in steps)
        listed = ", ".join(f"step {step}" for step in steps)
        self._ask(f"Delete the checkpoint(s) of {name} at {listed}{self._resume_warning(session, name, steps, sizes)}? "
                  f"This frees {describe_size(size)} and cannot be undone.",
                  lambda: self._delete_checkpoints(session, name, steps))

    def confirm(self) -> str | None:
        """Do the deletion the last question asked about."""
        pending, self._pending = self._pending, None
        self.confirm_box.layout.display = "none"
        if pending is None:
            self.show_status("Nothing is waiting to be deleted.")
            return None
        return self._act(lambda: self._done(pending()))

    def cancel(self) -> None:
        if self._pending is not None:
            self.show_status("Nothing was deleted.")
        self._pending = None
        self.confirm_box.layout.display = "none"

    def free(self, *, raise_errors: bool = False) -> int | None:
        """Drop the optimizer state of finished attempts; say how much that freed."""
        def free_it() -> int:
            self.cancel()
            freed = free_space(resolve_session(self._session))
            self._done(f"Freed {describe_size(freed)} of optimizer state from finished attempts." if freed
                       else "Nothing to free: finished attempts keep no optimizer state.")
            return freed

        return self._act(free_it, raise_errors=raise_errors)

    # --- internals -------------------------------------------------------------------------------
    def _ask(self, question: str, action: Callable[[], str]) -> None:
        """Show the question and "Yes, delete"; `action` runs only when that is pressed."""
        self._pending = action
        self.confirm_text.value = f'<span style="{ERROR_STYLE}">{html.escape(question)}</span>'
        self.confirm_box.layout.display = ""
        self.show_status("")

    def _resume_warning(self, session: Session, name: str, steps: list[int], sizes: dict[int, int]) -> str:
        """A stopped attempt resumes from its newest checkpoint: say so when that one would go."""
        newest = max(sizes, default=None)
        if session.attempt(name).status in ("interrupted", "failed") and newest in steps:
            return f" ({name} then cannot be resumed from step {newest})"
        return ""

    def _delete_attempt(self, session: Session, name: str) -> str:
        return f"Deleted {name}; freed {describe_size(delete_attempt(session, name))}."

    def _delete_checkpoints(self, session: Session, name: str, steps: list[int]) -> str:
        freed = delete_checkpoints(session, name, steps)
        return f"Deleted {len(steps)} checkpoint(s) of {name}; freed {describe_size(freed)}."

    def _done(self, message: str) -> str:
        self.refresh()
        self.show_status(message, ok=True)
        return message

    def _attempt_picked(self) -> None:
        """The picked attempt's checkpoints, newest first, each with its size; a pending question is dropped."""
        self.cancel()
        sizes = self.usage.get(self.attempt.value, DiskUse()).checkpoints
        self.checkpoints.options = [(f"step {step} ({describe_size(size)})", step) for step, size in reversed(sizes.items())]


class SessionView(View):
    """Choose the session; `.session` is the opened `Session`."""

    def __init__(self, root: Any = None, name: str = "", *, model: Any = None) -> None:
        super().__init__()
        self._root = root
        self._model = model
        self._session: Session | None = None
        self.mode = W.ToggleButtons(options=[("New session", NEW), ("Resume a session", RESUME)], value=NEW)
        self.name_text = W.Text(value=name or "", placeholder="e.g. me-2024", layout=W.Layout(width="300px"))
        self.existing = W.Dropdown(options=[], layout=W.Layout(width="420px"))
        self.details = W.HTML()
        self.refresh_button = W.Button(description="", icon="refresh", tooltip="List the sessions again",
                                       layout=W.Layout(width="40px"))
        self.open_button = W.Button(description="Create session", button_style="primary", icon="folder-open")
        self.housekeeping = HousekeepingView(self)  # shown once a session is open
        self.housekeeping.widget.layout.display = "none"
        self.results = self.housekeeping.results
        self.new_row = row(self.name_text, "Letters, digits, '-', '_' or spaces; a new folder in the session root.", "Name")
        self.resume_row = row(W.HBox([self.existing, self.refresh_button]), "", "Session")
        self.mode.observe(lambda _: self._show_mode(), names="value")
        self.existing.observe(lambda _: self._show_details(), names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.open_button.on_click(lambda _: self.open())
        self.refresh()
        if name and name in self.existing_names:
            self.mode.value, self.existing.value = RESUME, name
        self._show_mode()
        self.widget = W.VBox([self.mode, self.new_row, self.resume_row, self.details,
                              self.open_button, self.status, self.error, self.out, self.housekeeping.widget])

    # --- what the user chose ------------------------------------------------------------------
    @property
    def root(self) -> Path:
        root = self._root
        if root is not None and not isinstance(root, (str, Path)):  # the setup view: its current choice
            root = root.root
        return Path(root).expanduser() if root not in (None, "") else default_root()

    @property
    def session(self) -> Session:
        if self._session is None:
            raise UserError("No session is open yet; press 'Create session' or 'Open session' in the session section.")
        return self._session

    @property
    def existing_names(self) -> list[str]:
        return [value for _, value in self.existing.options]

    # --- actions ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """List the sessions in the root folder again (e.g. after mounting Drive)."""
        sessions = list_sessions(self.root)
        self._sessions = {s.name: s for s in sessions}
        self.existing.options = [(f"{s.name} — {len(s.attempts)} attempt(s)", s.name) for s in sessions]
        self._show_details()

    def open(self, *, raise_errors: bool = False, create_if_missing: bool = False) -> Session | None:
        """Create the new session or open the chosen one. `create_if_missing`: open the named session, or create it."""
        def open_it() -> Session:
            base = _model_source(self._model)
            if create_if_missing:
                session = open_or_create(self.root / check_name(self.name_text.value.strip()), base_model=base)
            elif self.mode.value == NEW:
                session = create_session(self.root / check_name(self.name_text.value.strip()), base_model=base)
            else:
                if not self.existing.value:
                    raise UserError(f"There are no sessions in {self.root} to resume; choose 'New session'.")
                session = open_session(self.root / self.existing.value)
            self._session = session
            self.show_status(f"Session {session.name!r} in {session.path}: {describe_attempts(session)}.", ok=True)
            self.housekeeping.refresh()
            self.housekeeping.widget.layout.display = ""
            return session

        return self._act(open_it, raise_errors=raise_errors)

    # --- display ---------------------------------------------------------------------------------
    def _show_mode(self) -> None:
        new = self.mode.value == NEW
        self.new_row.layout.display = "" if new else "none"
        self.resume_row.layout.display = "none" if new else ""
        self.open_button.description = "Create session" if new else "Open session"
        self._show_details()

    def _show_details(self) -> None:
        if self.mode.value == NEW:
            self.details.value = f'<span style="{HELP_STYLE}">Sessions are kept in {html.escape(str(self.root))}.</span>'
            return
        session = self._sessions.get(self.existing.value) if self.existing.value else None
        if session is None:
            self.details.value = f'<span style="{HELP_STYLE}">No sessions in {html.escape(str(self.root))} yet.</span>'
            return
        photos = len(prepared_files(session.instance_dir)) if session.instance_dir.is_dir() else 0
        self.details.value = (f"<b>{html.escape(session.name)}</b>: {photos} photo(s), base model "
                              f"{html.escape(session.base_model or 'not chosen yet')}<br>"
                              f"Attempts: {html.escape(describe_attempts(session))}")


def _model_source(model: Any) -> str | None:
    if model is None:
        return None
    if isinstance(model, (str, Path)):
        return str(model)
    info = getattr(model, "info", None) or getattr(getattr(model, "loaded", None), "info", None)
    if info is not None:
        return info.source
    return getattr(model, "source", None) or None
