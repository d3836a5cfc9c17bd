"""Atomic writes: a Colab disconnect or Ctrl-C never leaves a half-written file behind.

Everything dreamnb writes goes to a temporary name in the same folder first and is then
renamed over the target (`os.replace` is atomic on one filesystem, Drive's FUSE mount included).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_full_as_oserror(path):
            yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)  # the rename itself survives a power cut only once its folder is on disk
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_with(path: str | Path, save: Callable[[Path], None]) -> None:
    """Call `save(tmp_path)` (e.g. `image.save`, `safetensors.torch.save_file`) and rename atomically."""
    with atomic_path(path) as tmp:
        save(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path` (replacing an old one).

    The old folder is moved aside before the rename and deleted only after the new one is in
    place, so at every moment either the old or the new complete folder exists under some name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with disk_full_as_oserror(path):
            yield tmp
        for file in tmp.rglob("*"):  # everything on disk before the folder takes the final name
            _fsync(file)
        _fsync(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def disk_full_as_oserror(path: Path):
    """A full disk as what it is, OSError(ENOSPC), whichever writer met it: safetensors (SafetensorError "No space left
    on device") and torch.save ("file write failed") report it in their own words, which callers would not recognise."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        if "No space left on device" in str(err) or "os error 28" in str(err) or _free_bytes(path.parent) < 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def _free_bytes(folder: Path) -> int:
    try:
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize
    except (OSError, AttributeError):  # no statvfs (Windows): unknown, so not full
        return 1 << 62


def recover_leftovers(root: str | Path, *, recursive: bool = True, name: str = "*") -> list[str]:
    """Finish what interrupted atomic writes in `root` left (a kill or a full disk mid-write): temporary
    `.NAME.*.tmp` files and folders are removed (never complete), and a `.NAME.old` folder is put back where
    its replacement never arrived (else removed). `name` limits it to one target's leftovers (a folder that is not
    the session's). Only for a writer holding the session's lock. Returns what it did."""
    done = []
    find = Path(root).rglob if recursive else Path(root).glob
    for tmp in sorted(find(f".{name}.*.tmp"), reverse=True):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        done.append(f"removed {tmp}")
    for old in sorted(find(f".{name}.old")):
        target = old.with_name(old.name[1:-len(".old")])
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old}")
        else:
            os.replace(old, target)
            done.append(f"restored {target}")
    return done


def describe_size(n: int) -> str:
    """1234567 → '1.2 MB' (decimal units, as disks and downloads are sold)."""
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to the disk; where a filesystem cannot (some FUSE mounts), nothing."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
