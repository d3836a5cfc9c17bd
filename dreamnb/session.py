"""A session folder: the photos, the class images, caches and every training attempt.

    <root>/<session>/
      session.json     name, base model, created, attempts
      instance/        prepared photos (+ .txt captions)
      class/           generated class images, reused across attempts
      cache/           latents and text embeddings
      attempts/<name>/ config.json, log.csv, checkpoints/step-NNNNNN/, final/, samples/
      exports/

An attempt is named by the user as `NAME` (its final weights) or `NAME@STEP` (one of its checkpoints).

`session.json` is rewritten atomically, and its last good version is kept beside it (`session.json.bak`). A change
reads it again and applies just itself (`change_session`), so two Session objects of one folder lose no update.
Sessions written by older versions (no `format` key, or fewer keys) open fine: missing keys get defaults
and unknown keys are kept as they are; a damaged file is refused with one sentence that offers the backup.

Whatever writes to a session (preparing photos, training, exporting, deleting) holds its lock, `.lock`: host,
process, a random token and a heartbeat. A second writer (a Colab runtime still training after the browser lost it,
and a new one resuming; or the notebook's main thread while its training thread holds it) is refused; a lock whose
heartbeat stopped (a dead runtime) is taken over. Readers need no lock, but those that read what a training in this
process writes ask `refuse_while_busy` first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import fileio
from .errors import UserError

log = logging.getLogger(__name__)

SESSION_FILE = "session.json"
BACKUP_FILE = "session.json.bak"
LOCK_FILE = ".lock"
HEARTBEAT_S = 30      # how often a writer renews its lock
STALE_AFTER_S = 180   # a lock not renewed for this long belongs to a runtime that is gone
FORMAT_VERSION = 1
CHECKPOINTS, FINAL = "checkpoints", "final"         # an attempt's checkpoints/step-NNNNNN/ and final/
LORA_FILE = "pytorch_lora_weights.safetensors"     # final/ of a LoRA attempt
OPTIMIZER_FILE = "optimizer.pt"  # in a checkpoint: the optimizer's and LR schedule's state, only for resuming
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
    base_model: str | None = None  # what it was trained from, so a resume from another model is refused
    vae: str | None = None         # the VAE it was trained with, when not the model's own (refused likewise)
    parent: str | None = None      # the attempt it continues, as NAME@STEP; None: it started from the base model


def describe_attempt(attempt: Attempt) -> str:
    """'attempt-2 (finished, 200 steps) from attempt-1@1500': an attempt's name with its status and what it continued, for lists."""
    return f"{attempt.name} ({attempt.status}, {attempt.steps_done} steps)" + (f" from {attempt.parent}" if attempt.parent else "")


@dataclass
class Session:
    path: Path
    name: str
    base_model: str | None = None
    base_model_config: str | None = None  # for a single-file base model: the configs it was loaded with (--model-config)
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
        """The named attempt (`NAME` or `NAME@STEP`), or the latest one when name is None."""
        name = split_ref(name)[0]
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
            "base_model_config": self.base_model_config,
            "created": self.created,
            "attempts": [dataclasses.asdict(a) for a in self.attempts],
        }


def split_ref(ref: str | None) -> tuple[str | None, int | None]:
    """'attempt-1@500' → ('attempt-1', 500); 'attempt-1' → ('attempt-1', None)."""
    if ref is None or "@" not in ref:
        return ref, None
    name, _, step = ref.rpartition("@")
    if not step.isdigit():
        raise SessionError(f"{ref!r} is not NAME@STEP; a step is a number, as in attempt-1@500.")
    return name, int(step)


def checkpoint_folders(attempt_dir: Path, *, complete: bool = True) -> dict[int, Path]:
    """An attempt's checkpoints/step-N folders by step, oldest first; `complete`: only those with state.json (the
    last file a checkpoint gets; atomic_dir never leaves a partial one under its name)."""
    found = {int(p.name[5:]): p for p in (attempt_dir / CHECKPOINTS).glob("step-*")
             if p.name[5:].isdigit() and (not complete or (p / "state.json").is_file())}
    return dict(sorted(found.items()))


def checkpoint_steps(session: Session, name: str | None = None) -> list[int]:
    """The steps the attempt has a complete checkpoint of, oldest first."""
    return list(checkpoint_folders(session.attempt_dir(session.attempt(name).name)))


def attempt_weights_dir(session: Session, ref: str | None = None, checkpoint: int | None = None) -> Path:
    """Where the weights of `ref` are: final/ of the attempt (the latest when None), or checkpoints/step-N for
    NAME@STEP or `checkpoint` (the finished attempt's last step is its final/)."""
    name, step = split_ref(ref)
    attempt = session.attempt(name)
    step = checkpoint if step is None else step
    folder = session.attempt_dir(attempt.name)
    if step is not None and not (attempt.status == "finished" and step == attempt.steps_done):
        path = folder / CHECKPOINTS / f"step-{step:06d}"
        if not (path / "state.json").is_file():
            raise SessionError(f"Attempt {attempt.name!r} has no checkpoint at step {step}; it has: {checkpoint_steps(session, attempt.name) or 'none'}.")
        return path
    path = folder / FINAL
    if not path.is_dir():
        raise SessionError(f"Attempt {attempt.name!r} has not finished training ({attempt.status}, {attempt.steps_done} steps); resume it, or pick a checkpoint.")
    return path


def canonical_ref(session: Session, ref: str | None) -> str:
    """`ref` (None: the latest attempt) checked, as NAME or NAME@STEP; 'base' stays 'base'."""
    if ref == "base":
        return ref
    weights = attempt_weights_dir(session, ref)
    name = session.attempt(ref).name
    return name if weights.name == FINAL else f"{name}@{int(weights.name[5:])}"


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
        return session_from_dict(path, json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise SessionError(f"{file} is damaged ({_first_line(err)}); {_repair_hint(path)}") from err


def session_from_dict(path: Path, data: Any) -> Session:
    """The session a session.json describes; ValueError naming the first thing that is not as it should be."""
    if not isinstance(data, dict):
        raise ValueError(f"it holds a {type(data).__name__}, not a session")
    data = dict(data)
    data.pop("format", None)
    attempt_fields = {f.name for f in dataclasses.fields(Attempt)}
    attempts = []
    for entry in data.pop("attempts", []) or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"an attempt entry is {json.dumps(entry)[:60]}, not one with a name")
        attempts.append(Attempt(**{k: v for k, v in entry.items() if k in attempt_fields}))
    for key in ("name", "base_model", "base_model_config", "created"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ValueError(f"its {key} is {data[key]!r}, not text")
    return Session(path=path, name=data.pop("name", None) or path.name, base_model=data.pop("base_model", None),
                   base_model_config=data.pop("base_model_config", None), created=data.pop("created", None) or _now(), attempts=attempts, extra=data)


def _repair_hint(path: Path) -> str:
    backup = path / BACKUP_FILE
    what = f"its last good version, {BACKUP_FILE}" if backup.is_file() else "the attempts found in its folder"
    return f"run `dreamnb repair --session {path}` to rebuild it from {what} (nothing else is changed)."


def repair_session(path: str | Path) -> tuple[Session, str]:
    """Rebuild a damaged session.json: from session.json.bak when that is readable, else from the folders on disk
    (attempts/*/config.json; finished where final/ exists, interrupted at the newest checkpoint otherwise). The
    damaged file is kept as session.json.damaged. Returns the session and what was done."""
    path = Path(path)
    backup = path / BACKUP_FILE
    try:
        session = session_from_dict(path, json.loads(backup.read_text(encoding="utf-8")))
        how = f"restored from {BACKUP_FILE}"
    except (OSError, ValueError, TypeError, AttributeError):
        session = Session(path=path, name=path.name, attempts=[_attempt_on_disk(d) for d in sorted((path / "attempts").glob("*"))
                                                               if (d / "config.json").is_file()])
        how = f"rebuilt from the folders on disk ({len(session.attempts)} attempt(s))"
    current = path / SESSION_FILE
    if current.exists():
        os.replace(current, path / "session.json.damaged")
    save_session(session)
    return session, how


def _attempt_on_disk(folder: Path) -> Attempt:
    config = _config_on_disk(folder)
    parent = config.get("parent") or None
    if (folder / FINAL).is_dir():
        try:
            steps = int(config.get("text_encoder_steps", 0)) + int(config.get("unet_steps", 0))
        except (TypeError, ValueError):
            steps = 0
        return Attempt(name=folder.name, status="finished", steps_done=steps, parent=parent)
    steps = list(checkpoint_folders(folder, complete=False))
    return Attempt(name=folder.name, status="interrupted" if steps else "new", steps_done=steps[-1] if steps else 0, parent=parent)


def _config_on_disk(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def reading(path: Path, advice: str):
    """A damaged or missing file among an attempt's (a checkpoint cut short by a full Drive, a file edited by hand) is
    one sentence naming it, with `advice`, instead of a traceback from deep inside a loader."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, UnpicklingError, SafetensorError) as err:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or type(err).__name__ == "OutOfMemoryError":
            raise
        raise SessionError(f"{path} is damaged or missing ({_first_line(err)}); {advice}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


def open_or_create(path: str | Path, base_model: str | None = None) -> Session:
    path = Path(path)
    if (path / SESSION_FILE).exists():
        session = open_session(path)
        if base_model and not session.base_model:
            update_session(session, base_model=base_model)
        return session
    return create_session(path, base_model=base_model)


def is_main_process() -> bool:
    """False in every process but the first under `accelerate launch` (several GPUs): those neither write nor print."""
    return int(os.environ.get("RANK", "0")) == 0


_SAVING = threading.RLock()  # one read–modify–write of a session.json at a time in this process


def save_session(session: Session) -> None:
    """session.json, and the same good version as session.json.bak (what `repair_session` restores), written whole from
    `session`: for a new or repaired session. A change to an existing one goes through `change_session`."""
    if not is_main_process():
        return
    with _SAVING:
        for name in (SESSION_FILE, BACKUP_FILE):
            fileio.write_json(session.path / name, session.to_dict())


def change_session(session: Session, change: Callable[[Session], Any]) -> Any:
    """Apply `change` to the session as session.json holds it now, save that, bring `session` up to date, and return
    what `change` returned. Several
    Session objects of one folder (a view's and the trainer's) each write only their own change, so none undoes
    another's; writers in other processes are kept out by `session_lock`. Under `accelerate launch` the processes that
    do not write change only their own copy."""
    if not is_main_process():
        return change(session)
    with _SAVING:
        current = _as_saved(session)
        result = change(current)
        save_session(current)
        _adopt(session, current)
    return result


def update_session(session: Session, **changes: Any) -> None:
    """Set the session's own fields (base_model, base_model_config), keeping what other writers saved."""
    def update(current: Session) -> None:
        for key, value in changes.items():
            setattr(current, key, value)

    change_session(session, update)


def _as_saved(session: Session) -> Session:
    """The session as its session.json holds it now; this copy of it when that cannot be read (the change then writes a
    good file over a damaged one, as it always did)."""
    try:
        return open_session(session.path)
    except SessionError as err:
        log.warning("%s Writing this copy of the session instead.", err)
        return dataclasses.replace(session, attempts=[dataclasses.replace(a) for a in session.attempts], extra=dict(session.extra))


def _adopt(session: Session, current: Session) -> None:
    """Make `session` what `current` is; its Attempt objects that are still there stay the same objects, updated."""
    mine = {a.name: a for a in session.attempts}
    for attempt in current.attempts:
        if attempt.name in mine:
            vars(mine[attempt.name]).update(vars(attempt))
    session.attempts[:] = [mine.get(a.name, a) for a in current.attempts]
    session.base_model, session.base_model_config = current.base_model, current.base_model_config
    session.created, session.extra = current.created, current.extra


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
    with session_lock(path, "deleting the session"):
        shutil.rmtree(path)


def new_attempt_name(session: Session) -> str:
    taken = {a.name for a in session.attempts}
    n = len(session.attempts) + 1
    while f"attempt-{n}" in taken:
        n += 1
    return f"attempt-{n}"


def add_attempt(session: Session, name: str | None = None) -> Attempt:
    def add(current: Session) -> str:  # named against the attempts saved now, not this copy's
        new = check_name(name or new_attempt_name(current), "attempt")
        if any(a.name == new for a in current.attempts):
            raise SessionError(f"Session {current.name!r} already has an attempt {new!r}; pick another name or resume it.")
        current.attempts.append(Attempt(name=new))
        current.attempt_dir(new).mkdir(parents=True, exist_ok=True)
        return new

    return session.attempt(change_session(session, add))


def update_attempt(session: Session, name: str, **changes: Any) -> Attempt:
    def update(current: Session) -> None:
        attempt = current.attempt(name)
        for key, value in changes.items():
            setattr(attempt, key, value)

    change_session(session, update)
    return session.attempt(name)


def delete_attempt(session: Session, name: str) -> int:
    """Deletes the attempt and everything it wrote; bytes freed."""
    with session_lock(session.path, f"deleting {name}"):
        change_session(session, lambda current: current.attempts.remove(current.attempt(name)))
        freed = folder_size(session.attempt_dir(name))
        shutil.rmtree(session.attempt_dir(name), ignore_errors=True)
        return freed


# --- disk use and housekeeping (a free Google Drive has 15 GB) -------------------------------------------

@dataclass
class DiskUse:
    """Bytes an attempt takes on disk, by what they are for."""

    final: int = 0                                          # the trained weights
    checkpoints: dict[int, int] = field(default_factory=dict)  # step → its weights (and optimizer state, if kept)
    optimizer: int = 0                                      # of that, optimizer state: only resuming needs it
    other: int = 0                                          # previews, samples, log

    @property
    def total(self) -> int:
        return self.final + sum(self.checkpoints.values()) + self.other


def disk_usage(session: Session) -> dict[str, DiskUse]:
    """Each attempt's disk use, by name."""
    usage = {}
    for attempt in session.attempts:
        folder = session.attempt_dir(attempt.name)
        use = DiskUse(final=folder_size(folder / FINAL))
        for step, checkpoint in checkpoint_folders(folder, complete=False).items():
            use.checkpoints[step] = folder_size(checkpoint)
            use.optimizer += folder_size(checkpoint / OPTIMIZER_FILE)
        use.other = folder_size(folder) - use.final - sum(use.checkpoints.values())
        usage[attempt.name] = use
    return usage


def folder_size(path: Path) -> int:
    """Bytes in a file or folder (0 when it is not there)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def drop_optimizer_state(attempt_dir: Path, keep: Path | None = None) -> int:
    """Deletes the optimizer state (as large as the weights, or twice) of the attempt's checkpoints but `keep`'s:
    only resuming needs it, from the newest one; the weights stay for comparing, exporting and continuing. Bytes freed."""
    freed = 0
    for file in (attempt_dir / CHECKPOINTS).glob(f"step-*/{OPTIMIZER_FILE}"):
        if file.parent != keep:
            freed += file.stat().st_size
            file.unlink()
    return freed


def free_space(session: Session) -> int:
    """Drops the optimizer state of finished attempts (they are continued as new attempts, never resumed). Bytes freed."""
    with session_lock(session.path, "freeing space"):
        return sum(drop_optimizer_state(session.attempt_dir(a.name)) for a in session.attempts if a.status == "finished")


def delete_checkpoints(session: Session, name: str, steps: list[int] | None = None) -> int:
    """Deletes the attempt's checkpoints at `steps` (None: all). An interrupted attempt's newest one is what it resumes
    from, so it is kept unless named. Bytes freed."""
    with session_lock(session.path, f"deleting checkpoints of {name}"):
        attempt = session.attempt(name)
        found = checkpoint_folders(session.attempt_dir(attempt.name), complete=False)
        if steps is None:
            resumable = attempt.status in ("interrupted", "failed") and found
            chosen = list(found.values())[:-1] if resumable else list(found.values())
        else:
            chosen = [path for step, path in found.items() if step in steps]
        freed = 0
        for checkpoint in chosen:
            freed += folder_size(checkpoint)
            shutil.rmtree(checkpoint)
        return freed


# --- the writers' lock ------------------------------------------------------------------------------
#
# The lock file is created with O_EXCL, so of several creators one succeeds. A stale one (its writer is gone) must be
# removed first, and several contenders may judge it stale at the same moment: each then tries to create a claim named
# after that very lock file (its content's hash, unique by the random token in it), again with O_EXCL, and only the one
# that gets the claim removes it, after checking that the lock is still that one. Unlike flock on a guard file, this
# needs nothing from the filesystem but O_EXCL and unlink, which Drive's FUSE mount has (flock there may lock nothing).
# Within a process the lock belongs to one thread: the notebook trains in a thread while its views run in the main one.

class SessionLockedError(SessionError):
    """Another writer (another process, or another thread of this one) is writing to the session."""


@dataclass
class _Held:
    """A lock this process holds: by which thread, for what, with which token, and how deeply (a writer may call another)."""

    thread: int
    what: str
    token: str
    stop: threading.Event = field(default_factory=threading.Event)
    depth: int = 1


_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()
TAKEOVER_ABANDONED_S = 60  # a claim this old belongs to a contender that died in the middle of its takeover
TAKEOVER_WAIT_S = 5        # how long to wait for another contender's takeover before refusing


@contextlib.contextmanager
def session_lock(path: str | Path, what: str):
    """Hold the session's lock while writing (`what` says what for, for whoever is refused). Another live writer, in
    another process or another thread of this one: SessionLockedError. The thread that holds it may take it again. A lock
    whose heartbeat stopped over STALE_AFTER_S ago, or whose process on this host is gone, is taken over with a warning.
    Under `accelerate launch` only the first process takes it (the others do not write)."""
    path = Path(path).resolve()
    if not is_main_process():
        yield
        return
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None and held.thread != threading.get_ident():
            raise SessionLockedError(_busy_here(path, held.what, what))
        if held is not None:
            held.depth += 1
        else:
            held = _HELD[path] = _Held(threading.get_ident(), what, _acquire(path, what))
            threading.Thread(target=_heartbeat, args=(path / LOCK_FILE, held), daemon=True, name="dreamnb-lock").start()
    try:
        if held.depth == 1:
            _recover(path)
        yield
    finally:
        with _HELD_GUARD:
            held.depth -= 1
            if not held.depth:
                del _HELD[path]
                held.stop.set()
                _release(path / LOCK_FILE, held.token)


def busy_in_this_process(path: str | Path) -> str | None:
    """What another thread of this process holds the session's lock for ('training attempt-3': the notebook's training
    thread, seen from its views), or None."""
    with _HELD_GUARD:
        held = _HELD.get(Path(path).resolve())
        return held.what if held is not None and held.thread != threading.get_ident() else None


def refuse_while_busy(path: str | Path, what: str) -> None:
    """One sentence (SessionLockedError) when another thread of this process is writing to the session: views that read
    what training writes (compare, playground) use the lock's own answer instead of taking it."""
    busy = busy_in_this_process(path)
    if busy is not None:
        raise SessionLockedError(_busy_here(Path(path), busy, what))


def describe_lock(path: str | Path, what: str) -> None:
    """Say what this thread holds the session's lock for, once that is known (the trainer names its attempt after
    taking the lock), for whoever it refuses."""
    with _HELD_GUARD:
        held = _HELD.get(Path(path).resolve())
        if held is not None and held.thread == threading.get_ident():
            held.what = what


def _busy_here(path: Path, holder: str, what: str) -> str:
    return (f"{holder[:1].upper()}{holder[1:]} is under way in this notebook (session {path.name!r}); stop it or wait "
            f"until it ends before {what}.")


def _recover(path: Path) -> None:
    """What writers left half-done (no other writer is in the middle of one now; readers write only grids/)."""
    done = fileio.recover_leftovers(path, recursive=False)
    for sub in ("attempts", "instance", "class", "cache", "exports"):
        if (path / sub).is_dir():
            done += fileio.recover_leftovers(path / sub)
    for line in done:
        log.warning("Finishing an interrupted write: %s", line)


def _acquire(path: Path, what: str) -> str:
    """Create the lock file, taking over a stale one; the random token written in it, by which the holder knows its own."""
    lock = path / LOCK_FILE
    token = secrets.token_hex(16)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "since": _now(), "token": token}
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    while True:
        if _create(lock, mine):
            return token
        holder, seen, silent_for = _read_lock(lock)
        if seen is None:  # released since
            continue
        if not _stale(holder, silent_for):
            holder = holder or {}
            raise SessionLockedError(
                f"Session {path.name!r} is being changed by {holder.get('what', 'another writer')} on {holder.get('host', '?')} "
                f"(process {holder.get('pid', '?')}) since {holder.get('since', '?')}; wait until it ends or stop it "
                f"(a lock not renewed for {STALE_AFTER_S // 60} minutes is taken over).")
        if _take_over(lock, seen):
            log.warning("Taking over the lock of session %r from %s: its writer stopped renewing it.", path.name,
                        f"{holder.get('what')} on {holder.get('host')} (process {holder.get('pid')})" if holder else "a damaged lock file")
        elif time.monotonic() > deadline:
            raise SessionLockedError(f"Another writer is taking over the stale lock of session {path.name!r}; try again in a minute.")


def _take_over(lock: Path, stale: str) -> bool:
    """Remove the stale lock whose content hashes to `stale`, if this contender is the one that claims it; whether it did
    (False: another contender is on it, or did it already). The claim is checked against the lock again, since it may
    come after another contender's whole takeover, and then the lock is a live one. A claim whose contender died in the
    middle is passed over once it is TAKEOVER_ABANDONED_S old."""
    for n in itertools.count(1):
        claim = lock.with_name(f"{LOCK_FILE}.takeover-{stale}-{n}")
        if _create(claim, {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}):
            break
        if not _abandoned(claim):
            time.sleep(0.01)
            return False
    try:
        if _read_lock(lock)[1] != stale:
            return False
        lock.unlink()
        for leftover in lock.parent.glob(f"{LOCK_FILE}.takeover-{stale}-*"):  # abandoned claims: that lock is gone now
            leftover.unlink(missing_ok=True)
        return True
    finally:
        claim.unlink(missing_ok=True)


def _abandoned(claim: Path) -> bool:
    try:
        return time.time() - claim.stat().st_mtime > TAKEOVER_ABANDONED_S
    except FileNotFoundError:
        return False  # its contender is done: look at the lock again


def _create(path: Path, content: dict) -> bool:
    """Create `path` holding `content`, unless it exists (O_EXCL: of several creators exactly one succeeds)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read_lock(lock: Path) -> tuple[dict | None, str | None, float]:
    """The lock's holder (None: unreadable), the hash of its content (None: no lock) and how long since it was renewed,
    all of one and the same file."""
    try:
        with open(lock, "rb") as f:
            silent_for = time.time() - os.fstat(f.fileno()).st_mtime
            data = f.read()
    except FileNotFoundError:
        return None, None, 0.0
    seen = hashlib.sha256(data).hexdigest()[:24]
    try:
        holder = json.loads(data)
    except ValueError:
        return None, seen, silent_for
    return (holder if isinstance(holder, dict) else None), seen, silent_for


def _stale(holder: dict | None, silent_for: float) -> bool:
    if silent_for > STALE_AFTER_S or (holder is None and silent_for > 10):  # unreadable, and not being written now
        return True
    if holder is not None and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if holder["pid"] == os.getpid():
            return True  # this process's, left by a writer that did not end normally (no thread of it holds it now)
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True  # its process on this machine is gone
        except PermissionError:
            return False
    return False


def _release(lock: Path, token: str) -> None:
    """Remove the lock if it is still this holder's: one taken over (this runtime was frozen past STALE_AFTER_S) is
    another writer's now."""
    holder = _read_lock(lock)[0]
    if holder is not None and holder.get("token") == token:
        lock.unlink(missing_ok=True)
    else:
        log.warning("The lock of session %r was taken over by another writer while this one held it.", lock.parent.name)


def _heartbeat(lock: Path, held: _Held) -> None:
    """Renew the lock every HEARTBEAT_S while it is this holder's."""
    while not held.stop.wait(HEARTBEAT_S):
        holder = _read_lock(lock)[0]
        if holder is None or holder.get("token") != held.token:
            return
        with contextlib.suppress(OSError):
            os.utime(lock)
