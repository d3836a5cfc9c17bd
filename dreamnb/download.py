"""Base models from a link: civitai download links, Google Drive shares, Hugging Face files, any https link.

The file is downloaded once into a cache folder (`DREAMNB_MODEL_CACHE`, else ~/.cache/dreamnb/models) and
later calls find it there without the network. Hugging Face links (`…/resolve/REV/FILE`, `…/blob/REV/FILE`) go to
`huggingface_hub.hf_hub_download`, which checks, continues and caches them itself (under the same folder).

Other links are fetched here. A cut download stays as `download.part` and is continued with an HTTP Range
request only when the server confirms it still has the same file: the first answer's ETag (or Last-Modified) is
kept beside the part and sent back as If-Range, so a file changed on the server comes whole (HTTP 200) and is
never spliced onto the old part. Without such a validator the download starts over.

What is checked: the file is at most `max_size` (40 GB unless DREAMNB_MAX_DOWNLOAD_GB or the caller says
otherwise) and fits on the disk with room to spare, before the first byte (when the server announces the size)
and as the bytes arrive; the server sent a file, not a web page (its Content-Type and first bytes); the size is
the one the server announced (Content-Length, or Content-Range's total when continuing, and X-Linked-Size); the
SHA-256 is the one the site publishes, when it does (civitai's model-version API, an X-Linked-Etag, or `sha256=`
from the caller). A file that fails is removed.

Tokens (CIVITAI_TOKEN for civitai, HF_TOKEN for Hugging Face) travel only in the Authorization header to
their own site (requests drops it on a redirect to another host): never in a URL, a log line, a message or
a file. A `token=` in a civitai link is moved into that header, and every link shown is `shown_url(link)`.
"""
from __future__ import annotations

import errno
import hashlib
import html
import itertools
import logging
import os
import re
import shutil
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import requests

from .fileio import atomic_path, describe_size, write_text
from .models import SINGLE_FILE_SUFFIXES, ModelError, resolve_hf_token

log = logging.getLogger(__name__)

CACHE_ENV = "DREAMNB_MODEL_CACHE"
PART = "download.part"
VALIDATOR = ".download.part.if-range"  # the first answer's ETag or Last-Modified, for continuing the part safely
MAX_SIZE_ENV = "DREAMNB_MAX_DOWNLOAD_GB"
DEFAULT_MAX_SIZE = 40 * 10**9  # above any model file (SDXL's is 7 GB); a link to anything bigger is a mistake
CIVITAI_HOSTS = ("civitai.com", "www.civitai.com")
CIVITAI_API = "https://civitai.com/api/v1"
HF_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # plain http is allowed only here (tests, a server of your own)
ARCHIVE_SUFFIXES = (".zip", ".rar", ".7z", ".tar", ".gz")
_SECRET_PARAM = re.compile(r"token|key|auth|sig|secret|pass|credential", re.IGNORECASE)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK = 1 << 16  # what a cut loses at most: the bytes of the chunk being read
_TIMEOUT = (20, 120)  # seconds to connect, and to wait for the next bytes
_SPARE = 10**9  # left free before a download starts, so the notebook, its checkpoints and the system go on working
_MIN_FREE = 200 * 10**6  # a download stops when the disk would keep less than this (others may write too)
_SPACE_CHECK_EVERY = 1 << 20  # bytes between two looks at the free space while downloading
_HUB_PATH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+(?:/[^/]+)?)/(?:resolve|blob)/([^/]+)/(.+)$")


def model_cache_dir(folder: str | os.PathLike | None = None) -> Path:
    """Where downloaded models go: `folder`, else $DREAMNB_MODEL_CACHE, else ~/.cache/dreamnb/models."""
    if folder is None:
        folder = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "dreamnb" / "models"
    return Path(folder).expanduser()


def resolve_civitai_token() -> str | None:
    """A civitai API key from CIVITAI_TOKEN / CIVITAI_API_TOKEN or Colab's secrets (CIVITAI_TOKEN); never shown."""
    from .colab import read_secret

    return read_secret("CIVITAI_TOKEN", "CIVITAI_TOKEN", "CIVITAI_API_TOKEN")


def shown_url(url: str) -> str:
    """`url` as it may be shown, logged or saved: no user:password, no query parameter that looks like a secret."""
    parts = urlsplit(url.strip())
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _SECRET_PARAM.search(k)]
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=urlencode(kept)))


def drive_file_id(url: str) -> str | None:
    """The file id in a Google Drive link (…/file/d/ID/view, open?id=ID, uc?id=ID), or None."""
    parts = urlsplit(url)
    if (parts.hostname or "") not in DRIVE_HOSTS:
        return None
    match = re.search(r"/file/d/([\w-]+)", parts.path)
    return match.group(1) if match else dict(parse_qsl(parts.query)).get("id")


def direct_url(url: str) -> str:
    """The direct download form of a link: Drive share links, Hugging Face `blob` pages, civitai pages naming a version."""
    url = url.strip()
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    file_id = drive_file_id(url)
    if file_id:  # confirm=t: skip the "cannot scan this file for viruses" page of files over 100 MB
        extra = f"&resourcekey={query['resourcekey']}" if "resourcekey" in query else ""
        return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t{extra}"
    if _site(url) == "huggingface" and "/blob/" in parts.path:
        return urlunsplit(parts._replace(path=parts.path.replace("/blob/", "/resolve/", 1)))
    if _site(url) == "civitai" and parts.path.startswith("/models/") and query.get("modelVersionId", "").isdigit():
        return f"https://civitai.com/api/download/models/{query['modelVersionId']}"
    return url


def drive_confirm_url(page: str) -> str | None:
    """The link behind the "Download anyway" button of Drive's virus-scan warning page, or None."""
    for tag in re.findall(r"<form\b[^>]*>", page):
        form = _attributes(tag)
        if form.get("id") == "download-form" and form.get("action", "").startswith("https://"):
            inputs = [_attributes(tag) for tag in re.findall(r"<input\b[^>]*>", page)]
            fields = [(i["name"], i.get("value", "")) for i in inputs if i.get("type") == "hidden" and i.get("name")]
            return f"{form['action']}?{urlencode(fields)}"
    link = re.search(r'href="(/uc\?export=download[^"]*confirm=[^"]*)"', page)
    return "https://drive.google.com" + html.unescape(link.group(1)) if link else None


def download_model(url: str, *, cache_dir: str | os.PathLike | None = None, sha256: str | None = None,
                   max_size: int | None = None, retries: int = 2, progress: bool = True) -> Path:
    """The model file behind `url`, downloaded into the cache the first time (later calls find it there).

    `sha256`: the file's hash when you know it (checked like the one the site gives). `max_size`: the largest file
    accepted, in bytes (default: $DREAMNB_MAX_DOWNLOAD_GB gigabytes, else 40 GB). A cut download is continued up
    to `retries` times here, and by the next call after that, when the server confirms it is the same file.
    """
    url, token = _take_token(direct_url(url))
    shown = shown_url(url)
    _check_url(url, shown)
    max_size = max_download_size(max_size)
    hub = hub_file(url)
    if hub is not None:
        return _hub_download(hub, shown, model_cache_dir(cache_dir) / "huggingface", sha256=sha256, max_size=max_size)
    folder = model_cache_dir(cache_dir) / hashlib.sha256(shown.encode()).hexdigest()[:16]
    done = _finished_file(folder)
    if done is not None:
        log.info("using %s, downloaded before from %s", done, shown)
        return done
    headers = _headers(url, token)
    for attempt in itertools.count():
        try:
            return _fetch(url, shown, folder, headers, sha256=sha256, max_size=max_size, progress=progress)
        except _Cut as cut:
            resumable = _keep_if_resumable(folder / PART)
            if attempt >= retries:
                then = "continue where it stopped" if resumable else "download it anew (this server cannot continue it)"
                raise ModelError(f"The download of {shown} was cut off after {cut}; run the same command again to {then}.") from None
            log.warning("the download of %s was cut off after %s; %s", shown, cut, "continuing" if resumable else "starting again")


def max_download_size(max_size: int | None = None) -> int:
    """The largest file `download_model` accepts, in bytes: `max_size`, else $DREAMNB_MAX_DOWNLOAD_GB gigabytes, else 40 GB."""
    if max_size is not None:
        return int(max_size)
    value = os.environ.get(MAX_SIZE_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_SIZE
    try:
        gigabytes = float(value)
        if gigabytes > 0:
            return int(gigabytes * 10**9)
    except (ValueError, OverflowError):
        pass
    raise ModelError(f"{MAX_SIZE_ENV}={value!r} is not a number of gigabytes; set it like {MAX_SIZE_ENV}=60.")


def civitai_sha256(url: str, file_name: str, headers: dict) -> str | None:
    """The SHA-256 civitai publishes for `file_name` of the model version a download link names; None if it cannot say."""
    match = re.match(r"/api/download/models/(\d+)", urlsplit(url).path)
    files = []
    if match:
        try:
            response = requests.get(f"{CIVITAI_API}/model-versions/{match.group(1)}", headers=headers, timeout=_TIMEOUT)
            files = response.json().get("files", []) if response.ok else []
        except (requests.RequestException, ValueError, AttributeError):
            files = []
    for file in files:
        if isinstance(file, dict) and file.get("name") == file_name:
            value = str((file.get("hashes") or {}).get("SHA256", ""))
            if _SHA256.match(value):
                return value.lower()
    log.info("civitai gave no SHA-256 for %s; only its size is checked", file_name)
    return None


# --- a Hugging Face file ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face repository, as a `…/resolve/REV/FILE` or `…/blob/REV/FILE` link names it."""

    repo_id: str
    filename: str
    revision: str
    repo_type: str | None = None  # None: a model; "dataset" or "space"


def hub_file(url: str) -> HubFile | None:
    """The Hub file a link names, or None for any other link (a model's page, another site)."""
    if _site(url) != "huggingface":
        return None
    match = _HUB_PATH.match(urlsplit(url).path)
    if not match:
        return None
    kind, repo_id, revision, filename = match.groups()
    return HubFile(repo_id, unquote(filename), unquote(revision), {"datasets": "dataset", "spaces": "space"}.get(kind or ""))


def _hub_download(file: HubFile, shown: str, folder: Path, *, sha256: str | None, max_size: int) -> Path:
    """The file from `huggingface_hub`, which continues a cut download, checks its size and caches it in `folder`;
    its size is checked against `max_size` and the free space first (a dry run asks the Hub without downloading)."""
    import huggingface_hub

    folder.mkdir(parents=True, exist_ok=True)
    where = dict(revision=file.revision, repo_type=file.repo_type, cache_dir=folder, token=resolve_hf_token())
    try:
        plan = huggingface_hub.hf_hub_download(file.repo_id, file.filename, dry_run=True, **where)
        if plan.will_download:
            _check_room(folder, plan.file_size, 0, max_size, shown)
        path = Path(huggingface_hub.hf_hub_download(file.repo_id, file.filename, **where))
    except ModelError:
        raise
    except Exception as err:
        problem = _hub_problem(err, file, shown)
        if problem is None:
            raise
        log.debug("download of %s failed: %s", shown, type(err).__name__)
        raise ModelError(problem) from None  # the Hub's own message is not needed, and is never checked for secrets
    _check_hub_hash(path, sha256 or (_blob_sha256(path) if plan.will_download else None), shown)
    return path


def _check_hub_hash(path: Path, expected: str | None, shown: str) -> None:
    """huggingface_hub checks the size only: the SHA-256 (the caller's, or the one the Hub names an LFS blob by) is
    checked here, once, after the download; a damaged file leaves the cache."""
    if expected is None or _sha256_of(path).hexdigest() == expected.lower():
        return
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    raise ModelError(f"The download of {shown} was damaged (its SHA-256 is not the one the site gives) and was removed; run it again to download it anew.")


def _blob_sha256(path: Path) -> str | None:
    """The Hub's cache keeps a file as a link to `blobs/ETAG`, and an LFS file's ETag is its SHA-256."""
    name = path.resolve().name
    return name.lower() if _SHA256.match(name) else None


def _hub_problem(err: Exception, file: HubFile, shown: str) -> str | None:
    """The sentence for a failed Hub download, or None for an error that is not about the Hub or the network."""
    from huggingface_hub import errors as hf

    if isinstance(err, hf.GatedRepoError):
        return f"{file.repo_id} is gated: accept its licence on its Hugging Face page, then set HF_TOKEN (or add it to Colab's secrets)."
    if isinstance(err, hf.RepositoryNotFoundError):
        return f"There is no repository {file.repo_id!r} on the Hugging Face Hub, or it is private; check the link, or set HF_TOKEN if it is yours."
    if isinstance(err, hf.RevisionNotFoundError):
        return f"{file.repo_id} has no revision {file.revision!r}; check the link (…/resolve/main/… for the newest)."
    if isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):  # before EntryNotFoundError: a subclass
        return f"Cannot connect to the Hugging Face Hub to download {shown}, and it is not in the cache; check the internet connection and try again."
    if isinstance(err, hf.EntryNotFoundError):
        return f"There is no file at {shown}; check the link."
    if isinstance(err, hf.HfHubHTTPError):
        status = err.response.status_code if getattr(err, "response", None) is not None else "error"
        return f"The Hugging Face Hub answered HTTP {status} for {shown}; try again later, or use another link."
    if isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests"):
        return f"Cannot connect to the Hugging Face Hub to download {shown}; check the internet connection and try again."
    return None


# --- one download ----------------------------------------------------------------------------------

class _Cut(Exception):
    """The connection broke before the whole file arrived; what arrived is in the .part file."""

    def __init__(self, done: int, total: int | None) -> None:
        super().__init__(f"{_size(done)} of {_size(total)}" if total else _size(done))


class _DiskFilling(Exception):
    """Less room is left on the disk than the rest of the download needs."""

    def __init__(self, free: int, done: int) -> None:
        super().__init__()
        self.free, self.done = free, done


class _TooBig(Exception):
    """More bytes arrived than `max_size` allows (the server did not say the size beforehand)."""


def _fetch(url: str, shown: str, folder: Path, headers: dict, *, sha256: str | None, max_size: int, progress: bool) -> Path:
    """One try: the file into `folder`/download.part (continuing it if the server confirms the same file), checked, renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / PART
    response, offset = _start(url, shown, part, headers)
    with response:
        total = _total_size(response)
        chunks = response.iter_content(_CHUNK)
        try:
            first = next(chunks, b"")
        except requests.RequestException:
            raise _Cut(offset, total) from None
        if not offset and _looks_like_html(first):
            raise ModelError(_page_message(url, shown))
        name = _file_name(response, url, first)
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            raise ModelError(f"{shown} is an archive ({name}), not a model file; unpack it and give the .safetensors or .ckpt file inside.")
        _check_room(folder, total, offset, max_size, shown)
        if not offset:
            _save_validator(part, response)
        expected = sha256 or _linked_sha256(response) or (civitai_sha256(url, name, headers) if _site(url) == "civitai" else None)
        log.info("downloading %s to %s", shown, folder / name)
        try:
            done, digest = _receive(part, itertools.chain([first], chunks), offset, total, max_size, name, progress)
        except _DiskFilling as full:
            raise ModelError(_disk_filling_message(shown, folder, full, total, kept=_keep_if_resumable(part))) from None
        except _TooBig:
            _remove_part(part)
            raise ModelError(_too_big_message(shown, None, max_size)) from None
    if total is not None and done < total:
        raise _Cut(done, total)
    _verify(part, done, total, _linked_size(response), expected, digest.hexdigest(), shown)
    return _finish(part, folder / name, done)


def _start(url: str, shown: str, part: Path, headers: dict) -> tuple[requests.Response, int]:
    """The answer to start with, and the offset it starts at: past the part when the server confirms (206 to the
    If-Range of the saved validator) that its file is still the one the part began, else from the first byte."""
    validator = _saved_validator(part)
    if part.exists() and validator is None:
        log.info("%s cannot tell whether the file changed since the last try; downloading it from the start", shown)
        _remove_part(part)  # without a validator, continuing could splice two versions of the file
    offset = part.stat().st_size if part.exists() else 0
    if not offset:
        return _get(url, shown, headers), 0
    response = _get(url, shown, {**headers, "Range": f"bytes={offset}-", "If-Range": validator})
    if response.status_code == 206 and _range_start(response) == offset:
        return response, offset
    _remove_part(part)
    if response.status_code == 200:  # the file changed on the server, or it does not continue downloads: this is all of it
        log.info("the server of %s sent the whole file again (it changed, or downloads are not continued there)", shown)
        return response, 0
    response.close()  # 416 or a range that is not the one asked: the part is no beginning of this file
    return _get(url, shown, headers), 0


def _receive(part: Path, chunks, offset: int, total: int | None, max_size: int, name: str, progress: bool):
    """Append `chunks` to `part` and hash the whole; stop before the disk fills up or the file grows past `max_size`.
    Returns the size reached and the SHA-256 object."""
    from tqdm.auto import tqdm

    digest = _sha256_of(part) if offset else hashlib.sha256()
    done = checked = offset
    try:
        with (
            open(part, "ab" if offset else "wb") as file,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress) as bar,
        ):
            for chunk in chunks:
                if done + len(chunk) > max_size:
                    raise _TooBig()
                if done - checked >= _SPACE_CHECK_EVERY:
                    _check_still_room(part.parent, done, total)
                    checked = done
                file.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    except requests.RequestException:
        raise _Cut(done, total) from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise _DiskFilling(shutil.disk_usage(part.parent).free, done) from None
    return done, digest


def _finish(part: Path, target: Path, size: int) -> Path:
    with atomic_path(target) as tmp:  # fsync of the file and of its folder around the rename
        os.replace(part, tmp)
    part.with_name(VALIDATOR).unlink(missing_ok=True)
    log.info("downloaded %s (%s)", target, _size(size))
    return target


# --- room, size and resuming -----------------------------------------------------------------------

def _check_room(folder: Path, total: int | None, offset: int, max_size: int, shown: str) -> None:
    """Before the first byte: a file over `max_size` is refused, and the rest of it must fit with `_SPARE` left over."""
    if total is not None and total > max_size:
        raise ModelError(_too_big_message(shown, total, max_size))
    needed = (total or 0) - offset + _SPARE
    free = shutil.disk_usage(folder).free
    if free < needed:
        what = f"the file and {_size(_SPARE)} to spare" if total is not None else f"{_size(_SPARE)} to spare; its size is not known"
        raise ModelError(f"{shown} needs {_size(needed)} of free space ({what}) but only {_size(free)} is free in {folder}; free some space, or set {CACHE_ENV} to a folder on a bigger disk.")


def _check_still_room(folder: Path, done: int, total: int | None) -> None:
    """While downloading: the disk must still hold the rest of the file (when known) and `_MIN_FREE` besides."""
    free = shutil.disk_usage(folder).free
    if free < max((total or 0) - done, 0) + _MIN_FREE:
        raise _DiskFilling(free, done)


def _too_big_message(shown: str, size: int | None, max_size: int) -> str:
    what = f"is {_size(size)}, more than" if size is not None else "was stopped and removed after"
    return (f"{shown} {what} {_size(max_size)}, the largest model file accepted; if it really is the model you want, "
            f"set {MAX_SIZE_ENV} to its size in GB (or pass max_size= to download_model) and run it again.")


def _disk_filling_message(shown: str, folder: Path, full: _DiskFilling, total: int | None, *, kept: bool) -> str:
    need = f"at least {_size(total - full.done + _SPARE)}" if total is not None else "some space"
    if kept:
        return (f"The disk of {folder} is almost full ({_size(full.free)} free) after {_size(full.done)} of {shown}, so the download "
                f"stopped and what arrived is kept; free {need} and run the same command again to continue it.")
    return (f"The disk of {folder} is almost full ({_size(full.free)} free) after {_size(full.done)} of {shown}, so the download "
            f"stopped and was removed (this server cannot continue it); free {need}, or set {CACHE_ENV} to a folder on a bigger disk, and run it again.")


def _validator(response: requests.Response) -> str | None:
    """What If-Range may send back to ask for the same file: a strong ETag (a weak one is not allowed), else Last-Modified."""
    etag = response.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified", "").strip() or None


def _save_validator(part: Path, response: requests.Response) -> None:
    validator = _validator(response)
    if validator and "\n" not in validator:
        write_text(part.with_name(VALIDATOR), validator)
    else:
        part.with_name(VALIDATOR).unlink(missing_ok=True)


def _saved_validator(part: Path) -> str | None:
    try:
        return part.with_name(VALIDATOR).read_text().strip() or None
    except OSError:
        return None


def _keep_if_resumable(part: Path) -> bool:
    """Keep the part of a stopped download when a later call can continue it safely (a validator was saved), else remove it."""
    if part.exists() and part.stat().st_size and _saved_validator(part):
        return True
    _remove_part(part)
    return False


def _remove_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    part.with_name(VALIDATOR).unlink(missing_ok=True)


# --- the server's answers --------------------------------------------------------------------------

def _get(url: str, shown: str, headers: dict) -> requests.Response:
    """The response for `url`, past Drive's virus-scan page; a ModelError for refusals and web pages."""
    response = _request(url, shown, headers)
    if _site(url) == "drive" and _is_html(response):
        confirm = drive_confirm_url(response.text)
        response.close()
        if confirm is None or urlsplit(confirm).hostname not in DRIVE_HOSTS:
            raise ModelError(f"Google Drive did not give the file at {shown}; share it as 'Anyone with the link', or if many people downloaded it today, try again tomorrow.")
        response = _request(confirm, shown, headers)
    _refuse_status(response, url, shown, headers)
    if _is_html(response):
        response.close()
        raise ModelError(_page_message(url, shown))
    return response


def _request(url: str, shown: str, headers: dict) -> requests.Response:
    host = urlsplit(url).hostname
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=_TIMEOUT)
    except requests.exceptions.SSLError:  # the exception's text holds the URL: never shown
        raise ModelError(f"The secure connection to {host} failed; check the computer's clock and network, and try again.") from None
    except requests.RequestException as err:
        log.debug("download of %s failed: %s", shown, type(err).__name__)
        raise ModelError(f"Cannot connect to {host} to download {shown}; check the internet connection and try again.") from None
    final = urlsplit(response.url)
    if final.scheme != "https" and final.hostname not in LOCAL_HOSTS:
        response.close()
        raise ModelError(f"{shown} sends the download over plain http, which anyone on the way could change; use another link.")
    return response


def _refuse_status(response: requests.Response, url: str, shown: str, headers: dict) -> None:
    status = response.status_code
    if status < 400 or (status == 416 and "Range" in headers):  # 416: the .part is not this file; `_start` starts again
        return
    response.close()
    site, sent = _site(url), "Authorization" in headers
    if status in (401, 403) and site == "civitai" and sent:
        message = f"civitai refused {shown} with your CIVITAI_TOKEN (HTTP {status}); check that the key is still valid at civitai.com/user/account and that the model is not in early access."
    elif status in (401, 403) and site == "civitai":
        message = f"civitai needs an API key to download {shown} (HTTP {status}); create one at civitai.com/user/account and set it as CIVITAI_TOKEN (an environment variable, or a Colab secret)."
    elif status in (401, 403) and site == "huggingface":
        message = f"Hugging Face refused {shown} (HTTP {status}): the model is gated or private; accept its licence on its page and set HF_TOKEN (an environment variable, or a Colab secret)."
    elif status in (401, 403) and site == "drive":
        message = f"Google Drive refused {shown} (HTTP {status}); share the file as 'Anyone with the link' and give that link."
    elif status in (401, 403):
        message = f"The server refused {shown} (HTTP {status}): the link needs a login or has expired; give a public download link."
    elif status in (404, 410):
        message = f"There is no file at {shown} (HTTP {status}); check the link."
    elif status == 429:
        message = f"The server of {shown} says too many downloads were asked for (HTTP 429); wait a few minutes and try again."
    else:
        message = f"The server answered HTTP {status} for {shown}; try again later, or use another link."
    raise ModelError(message)


def _verify(part: Path, size: int, total: int | None, linked_size: int | None, expected: str | None, actual: str, shown: str) -> None:
    """Remove the download and say so when its size or hash is not what the server announced."""
    if size == 0:
        problem = "the server sent an empty file"
    elif total is not None and size != total:
        problem = f"{size} bytes instead of {total}"
    elif linked_size is not None and size != linked_size:
        problem = f"{size} bytes instead of the {linked_size} the site lists"
    elif expected and actual != expected.lower():
        problem = "its SHA-256 is not the one the site gives"
    else:
        return
    _remove_part(part)
    raise ModelError(f"The download of {shown} was damaged ({problem}) and was removed; run it again to download it anew.")


# --- small helpers ---------------------------------------------------------------------------------

def _site(url: str) -> str | None:
    host = (urlsplit(url).hostname or "").lower()
    if host in CIVITAI_HOSTS:
        return "civitai"
    if host in HF_HOSTS:
        return "huggingface"
    if host in DRIVE_HOSTS:
        return "drive"
    return None


def _take_token(url: str) -> tuple[str, str | None]:
    """A civitai link without its `token=` (which goes in the Authorization header instead), and the token."""
    if _site(url) != "civitai":
        return url, None
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    token = next((v for k, v in query if k.lower() == "token"), None)
    kept = [(k, v) for k, v in query if k.lower() != "token"]
    return urlunsplit(parts._replace(query=urlencode(kept))), token


def _headers(url: str, token: str | None) -> dict:
    site = _site(url)
    if site == "civitai":
        token = token or resolve_civitai_token()
    elif site == "huggingface":
        token = resolve_hf_token() or _stored_hf_token()
    else:
        token = None
    headers = {"Accept-Encoding": "identity"}  # byte counts and Range offsets are of the file itself
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _stored_hf_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _check_url(url: str, shown: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(f"{shown} is not a web link; give an https link to a .safetensors or .ckpt file.")
    if parts.scheme == "http" and parts.hostname not in LOCAL_HOSTS:
        raise ModelError(f"{shown} is a plain http link, which anyone on the way could change; give its https link.")
    if _site(url) == "civitai" and not parts.path.startswith("/api/download/"):
        raise ModelError(f"{shown} is a civitai page, not a download link; on that page copy the link of the Download button (https://civitai.com/api/download/models/…) and give that.")
    if _site(url) == "drive" and "/folders/" in parts.path:
        raise ModelError(f"{shown} is a Google Drive folder; give the share link of the model file itself.")


def _finished_file(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_file() and p.name != PART and not p.name.startswith("."))
    return done[0] if done else None


def _is_html(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml")


def _looks_like_html(first: bytes) -> bool:
    return first.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html", b"<head"))


def _page_message(url: str, shown: str) -> str:
    if _site(url) == "drive":
        return f"Google Drive sent a web page instead of the file at {shown}; share it as 'Anyone with the link', or if many people downloaded it today, try again tomorrow."
    return f"{shown} is a web page, not a model file; give the file's download link (on civitai, the link of the Download button: https://civitai.com/api/download/models/…)."


def _file_name(response: requests.Response, url: str, first: bytes) -> str:
    """From Content-Disposition, else the link; with a model file suffix (guessed from the first bytes if need be)."""
    message = Message()
    message["content-disposition"] = response.headers.get("Content-Disposition", "")
    candidates = [message.get_filename() or ""] + [unquote(urlsplit(u).path.rstrip("/").rpartition("/")[2]) for u in (url, response.url)]
    names = [Path(n.replace("\\", "/")).name.strip() for n in candidates]
    names = [n for n in names if n and not n.startswith(".") and n != PART]
    name = next((n for n in names if n.lower().endswith(SINGLE_FILE_SUFFIXES)), names[0] if names else "model")
    if not name.lower().endswith(SINGLE_FILE_SUFFIXES + ARCHIVE_SUFFIXES):
        name += ".safetensors" if first[8:9] == b"{" else ".ckpt"  # a safetensors file starts with 8 bytes then its JSON header
    return name


def _total_size(response: requests.Response) -> int | None:
    if response.status_code == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
    else:
        total = response.headers.get("Content-Length", "")
    return int(total) if total.isdigit() else None


def _range_start(response: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _linked_sha256(response: requests.Response) -> str | None:
    """Hugging Face's SHA-256 of an LFS file, from the X-Linked-Etag of the first answer (before the CDN redirect)."""
    for answer in (*response.history, response):
        value = answer.headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"')
        if _SHA256.match(value):
            return value.lower()
    return None


def _linked_size(response: requests.Response) -> int | None:
    for answer in (*response.history, response):
        value = answer.headers.get("X-Linked-Size", "").strip()
        if value.isdigit():
            return int(value)
    return None


def _sha256_of(path: Path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_CHUNK), b""):
            digest.update(block)
    return digest


def _attributes(tag: str) -> dict[str, str]:
    return {k.lower(): html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}


def _size(n: int | None) -> str:
    return "an unknown size" if n is None else describe_size(n)
