"""A session folder: the photos, the class images, caches and every training attempt.

    <root>/<session>/
      session.json     name, base model, created, attempts
      instance/        prepared photos (+ .txt captions)
      class/           generated class images, reused across attempts
      cache/           latents and text embeddings
      attempts/<name>/ config.json, log.csv, checkpoints/, final/, samples/
      exports/

`session.json` is rewritten atomically. Sessions written by older versions (no `format` key, or
fewer keys) open fine: missing keys get defaults and unknown keys are kept as they are.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fileio
from .errors import UserError

log = logging.getLogger(__name__)

SESSION_FILE = "session.json"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,63}$")


class SessionError(UserError):
    """A session that cannot be opened or changed; the message says what to do."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Attempt:
    name: str
    created: str = field(default_factory=_now)
    status: str = "new"  # new | training | interrupted | failed | finished
    steps_done: int = 0
    message: str = ""


def describe_attempt(attempt: Attempt) -> str:
    """'attempt-1 (finished, 1850 steps)': an attempt's name with its status, for lists."""
    return f"{attempt.name} ({attempt.status}, {attempt.steps_done} steps)"


@dataclass
class Session:
    path: Path
    name: str
    base_model: str | None = None
    created: str = field(default_factory=_now)
    attempts: list[Attempt] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # keys from newer versions, kept untouched

    @property
    def instance_dir(self) -> Path:
        return self.path / "instance"

    @property
    def class_dir(self) -> Path:
        return self.path / "class"

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    @property
    def exports_dir(self) -> Path:
        return self.path / "exports"

    def attempt_dir(self, name: str) -> Path:
        return self.path / "attempts" / name

    def attempt(self, name: str | None = None) -> Attempt:
        """The named attempt, or the latest one when name is None."""
        if not self.attempts:
            raise SessionError(f"Session {self.name!r} has no attempts yet; train one first.")
        if name is None:
            return self.attempts[-1]
        for attempt in self.attempts:
            if attempt.name == name:
                return attempt
        names = ", ".join(a.name for a in self.attempts)
        raise SessionError(f"Session {self.name!r} has no attempt {name!r}; its attempts are: {names}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "format": FORMAT_VERSION,
            "name": self.name,
            "base_model": self.base_model,
            "created": self.created,
            "attempts": [dataclasses.asdict(a) for a in self.attempts],
        }


def default_root() -> Path:
    """Google Drive when it is mounted in Colab (survives a disconnect), else ./dreamnb-sessions."""
    drive = Path("/content/drive/MyDrive")
    if drive.is_dir():
        return drive / "dreamnb"
    return Path("dreamnb-sessions")


def check_name(name: str, what: str = "session") -> str:
    if not _NAME_RE.match(name or ""):
        raise SessionError(f"{what.capitalize()} name {name!r} is not usable; use letters, digits, '-', '_', '.' or spaces (up to 64), starting with a letter or digit.")
    return name


def create_session(path: str | Path, base_model: str | None = None) -> Session:
    """Create a new session folder at `path` (its last part is the session's name)."""
    path = Path(path)
    if (path / SESSION_FILE).exists():
        raise SessionError(f"A session already exists at {path}; open it instead, or pick another name.")
    if path.exists() and any(path.iterdir()):
        raise SessionError(f"{path} exists and is not an empty folder; pick a new session name.")
    session = Session(path=path, name=check_name(path.name), base_model=base_model)
    for sub in (session.instance_dir, session.class_dir, session.cache_dir, session.exports_dir, path / "attempts"):
        sub.mkdir(parents=True, exist_ok=True)
    save_session(session)
    log.info("created session %s", path)
    return session


def open_session(path: str | Path) -> Session:
    path = Path(path)
    file = path / SESSION_FILE
    if not file.exists():
        raise SessionError(f"{path} is not a dreamnb session (no {SESSION_FILE}); create one with `dreamnb prepare ... --session {path}`.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SessionError(f"{file} cannot be read ({err}); restore it from a backup or start a new session.") from err
    data = dict(data)
    data.pop("format", None)
    attempt_fields = {f.name for f in dataclasses.fields(Attempt)}
    attempts = [Attempt(**{k: v for k, v in a.items() if k in attempt_fields}) for a in data.pop("attempts", [])]
    session = Session(
        path=path,
        name=data.pop("name", path.name),
        base_model=data.pop("base_model", None),
        created=data.pop("created", _now()),
        attempts=attempts,
        extra=data,
    )
    return session


def open_or_create(path: str | Path, base_model: str | None = None) -> Session:
    path = Path(path)
    if (path / SESSION_FILE).exists():
        session = open_session(path)
        if base_model and not session.base_model:
            session.base_model = base_model
            save_session(session)
        return session
    return create_session(path, base_model=base_model)


def is_main_process() -> bool:
    """False in every process but the first under `accelerate launch` (several GPUs): those neither write nor print."""
    return int(os.environ.get("RANK", "0")) == 0


def save_session(session: Session) -> None:
    if not is_main_process():
        return
    fileio.write_json(session.path / SESSION_FILE, session.to_dict())


def list_sessions(root: str | Path) -> list[Session]:
    root = Path(root)
    if not root.is_dir():
        return []
    sessions = []
    for child in sorted(root.iterdir()):
        if (child / SESSION_FILE).exists():
            try:
                sessions.append(open_session(child))
            except SessionError as err:
                log.warning("skipping %s: %s", child, err)
    return sessions


def delete_session(path: str | Path) -> None:
    """Delete a session folder (prepared copies and attempts; the user's original photos live elsewhere)."""
    path = Path(path)
    if not (path / SESSION_FILE).exists():
        raise SessionError(f"{path} is not a dreamnb session; nothing was deleted.")
    shutil.rmtree(path)


def new_attempt_name(session: Session) -> str:
    taken = {a.name for a in session.attempts}
    n = len(session.attempts) + 1
    while f"attempt-{n}" in taken:
        n += 1
    return f"attempt-{n}"


def add_attempt(session: Session, name: str | None = None) -> Attempt:
    name = check_name(name or new_attempt_name(session), "attempt")
    if any(a.name == name for a in session.attempts):
        raise SessionError(f"Session {session.name!r} already has an attempt {name!r}; pick another name or resume it.")
    attempt = Attempt(name=name)
    session.attempts.append(attempt)
    session.attempt_dir(name).mkdir(parents=True, exist_ok=True)
    save_session(session)
    return attempt


def update_attempt(session: Session, name: str, **changes: Any) -> Attempt:
    attempt = session.attempt(name)
    for key, value in changes.items():
        setattr(attempt, key, value)
    save_session(session)
    return attempt


def delete_attempt(session: Session, name: str) -> None:
    attempt = session.attempt(name)
    session.attempts.remove(attempt)
    save_session(session)
    shutil.rmtree(session.attempt_dir(name), ignore_errors=True)
