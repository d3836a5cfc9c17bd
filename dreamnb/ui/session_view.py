"""Session: start a new one, or resume one of the sessions in the root folder, with its attempts listed."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as W

from ..errors import UserError
from ..images import prepared_files
from ..session import Session, check_name, create_session, default_root, describe_attempt, list_sessions, open_or_create, open_session
from .base import HELP_STYLE, View, row

NEW, RESUME = "new", "resume"


def describe_attempts(session: Session) -> str:
    """'attempt-1 (finished, 1850 steps), attempt-2 (interrupted, 400 steps)' or 'no attempts yet'."""
    if not session.attempts:
        return "no attempts yet"
    return ", ".join(describe_attempt(a) for a in session.attempts)


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
                              self.open_button, self.status, self.error, self.out])

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
