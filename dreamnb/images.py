"""Photo intake: read anything a phone or camera gives, square it, and copy it into the session.

The user's photos are only ever read. Each accepted photo becomes a square copy in the session's
`instance/` folder, named after the photo and a hash of its bytes, so adding the same photo again
is recognised instead of training on it twice. Every file gets its own verdict (accepted, or
rejected with a reason); one bad file never stops the batch. A short list of advice about the
whole set (too few photos, low resolution, near duplicates, no face, same framing) says what to do.

Prepared copies are plain PNGs without EXIF, so phone GPS tags never travel into a shared model folder.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import fileio
from .crop import CROP_MODES, FACE_DETECTOR_MISSING, Box, crop_square, face_detection_available, find_faces
from .errors import UserError

log = logging.getLogger(__name__)

PREPARED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
NEUTRAL_GREY = (128, 128, 128)
SKIPPED_FOLDERS = {".ipynb_checkpoints", "__MACOSX", "__pycache__"}
SKIPPED_FILES = {"thumbs.db", "desktop.ini"}

# Archives: a photo set is at most a few GB; anything bigger, or compressed suspiciously well, is refused.
MAX_ARCHIVE_BYTES = 4 * 1024**3
MAX_ARCHIVE_MEMBERS = 10_000
MAX_COMPRESSION_RATIO = 200  # JPEGs barely compress; a ratio like this on a big member means a zip bomb
RATIO_CHECK_FROM_BYTES = 1024**2

# Two prepared photos whose 128-bit difference hashes differ in at most this many bits look the same.
NEAR_DUPLICATE_BITS = 12
FEW_PHOTOS = 10
# Face widths (relative to the square) all within this factor of each other count as "the same framing".
SAME_FRAMING_RATIO = 1.35
MIN_FACES_FOR_FRAMING = 5


class PhotoError(UserError):
    """A file that cannot be used as a photo; the message says why."""


@dataclass
class Source:
    """One candidate photo: what the user calls it, and where its bytes are now."""

    name: str  # the path as given, "archive.zip/dir/x.jpg", or the upload's file name
    path: Path | None  # the original file, or its copy in the scratch folder (uploads, archives)
    caption_path: Path | None = None  # a same-name .txt beside it
    error: str | None = None  # why it cannot even be read (missing, unsafe archive entry)


@dataclass
class PhotoResult:
    """The verdict on one photo."""

    source: str
    status: str  # "accepted" or "rejected"
    reason: str | None = None  # why it was rejected
    output: str | None = None  # the prepared copy's file name in the instance folder
    original_size: tuple[int, int] | None = None  # (width, height) after applying EXIF orientation
    warnings: list[str] = field(default_factory=list)
    face_found: bool | None = None  # None when faces were not looked for
    face_box: tuple[float, float, float, float] | None = None  # the face in the prepared copy, as fractions
    caption: str | None = None  # the photo's own caption, copied beside its prepared copy
    duplicate_of: str | None = None  # the prepared copy this photo is the same as (or nearly)
    crop: str | None = None  # where the square was cut: "face", "detail", "centre", "square" or "none"
    scale: float | None = None  # prepared size / source pixels; above 1 the photo was enlarged

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for key in ("original_size", "face_box"):
            if values[key] is not None:
                values[key] = list(values[key])
        return values


@dataclass
class PrepareReport:
    """What `prepare_photos` did to each file, and advice about the photo set as a whole."""

    results: list[PhotoResult]
    advice: list[str]
    instance_dir: str
    photos_in_set: int  # prepared photos in the instance folder afterwards, earlier runs included

    @property
    def accepted(self) -> list[PhotoResult]:
        return [r for r in self.results if r.accepted]

    @property
    def rejected(self) -> list[PhotoResult]:
        return [r for r in self.results if not r.accepted]

    @property
    def warnings(self) -> list[str]:
        return [f"{r.source}: {w}" for r in self.results for w in r.warnings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_dir": self.instance_dir,
            "photos_in_set": self.photos_in_set,
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "results": [r.to_dict() for r in self.results],
            "advice": list(self.advice),
        }

    def to_table(self) -> str:
        """A plain-text table for the terminal: one line per file, then its warnings, then the advice."""
        width = min(48, max([len(r.source) for r in self.results] + [5]))
        lines = [f"{'STATUS':<9} {'PHOTO':<{width}} RESULT"]
        for r in self.results:
            name = r.source if len(r.source) <= width else "…" + r.source[-(width - 1):]
            outcome = f"{r.output} ({r.crop})" if r.accepted else r.reason
            lines.append(f"{r.status:<9} {name:<{width}} {outcome}")
            lines += [f"{'':<9} {'':<{width}} warning: {w}" for w in r.warnings]
        lines.append(
            f"{len(self.accepted)} added, {len(self.rejected)} rejected; "
            f"{self.photos_in_set} photos in {self.instance_dir}."
        )
        if self.advice:
            lines.append("Advice:")
            lines += [f"- {a}" for a in self.advice]
        return "\n".join(lines)


# --- collecting files -----------------------------------------------------------------------------

def collect_sources(sources: Iterable[Any] | str | Path, scratch_dir: str | Path, *,
                    exclude: Iterable[str | Path] = (), max_archive_bytes: int = MAX_ARCHIVE_BYTES) -> list[Source]:
    """Every candidate photo in `sources`: files, folders (recursively), .zip archives, FileUpload values.

    Archives and uploads are unpacked into `scratch_dir`, never anywhere else; entries that would land
    outside it (`../`, absolute paths, links) come back with an `error` instead of being extracted.
    Folders in `exclude` (the instance folder itself) and dreamnb session folders are not searched.
    """
    walk = _Walk(Path(scratch_dir), {Path(p).resolve() for p in exclude}, max_archive_bytes)
    found: list[Source] = []
    uploads = []
    for item in _flatten(sources):
        if isinstance(item, dict):
            uploads.append(item)
        else:
            found += walk.path(Path(item), str(item))
    if uploads:
        found += walk.uploads(uploads)
    return found


def _flatten(sources: Any) -> Iterator[Any]:
    """Paths and single uploads ({'name', 'content'}) out of lists, tuples and ipywidgets values (v7 and v8)."""
    if isinstance(sources, (str, os.PathLike)):
        yield sources
    elif isinstance(sources, (bytes, bytearray, memoryview)):
        raise UserError("Pass photos as file or folder paths or an upload's value, not raw bytes; load_photo reads bytes.")
    elif isinstance(sources, dict) and "content" in sources:  # one ipywidgets 8 upload
        yield sources
    elif isinstance(sources, dict):  # ipywidgets 7: {name: {'content': bytes, 'metadata': {...}}}
        for name, upload in sources.items():
            if isinstance(upload, dict) and "content" in upload:
                yield {"name": upload.get("metadata", {}).get("name", name), "content": upload["content"]}
            else:
                yield from _flatten(upload)
    elif isinstance(sources, Iterable):
        for item in sources:
            yield from _flatten(item)
    else:
        raise UserError(f"Cannot read photos from a {type(sources).__name__}; pass file or folder paths, or an upload's value.")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_FOLDERS or name.lower() in SKIPPED_FILES


@dataclass
class _Walk:
    """One collection pass: where to unpack, what not to enter, how much an archive may unpack to."""

    scratch_dir: Path
    exclude: set[Path]
    max_archive_bytes: int

    def path(self, path: Path, name: str, *, inside_archive: bool = False) -> list[Source]:
        if path.is_dir():
            if (path / "session.json").is_file():
                return [Source(name, None, error="a dreamnb session folder, not a folder of photos; pass the photos themselves")]
            return self.folder(path, name, inside_archive=inside_archive)
        if not path.is_file():
            return [Source(name, None, error="no such file or folder")]
        if path.suffix.lower() == ".zip":
            if inside_archive:
                return [Source(name, None, error="an archive inside an archive; unpack it first")]
            return self.archive(path, name)
        if path.suffix.lower() == ".txt":  # a caption; it travels with its photo
            return []
        return [Source(name, path, caption_path=_caption_beside(path))]

    def folder(self, folder: Path, name: str, *, inside_archive: bool) -> list[Source]:
        found = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not _hidden(d) and not self._skipped(Path(root) / d))
            for file in sorted(f for f in files if not _hidden(f)):
                path = Path(root) / file
                shown = str(Path(name) / path.relative_to(folder))
                found += self.path(path, shown, inside_archive=inside_archive)
        return found

    def _skipped(self, folder: Path) -> bool:
        """The instance folder (else its own copies come back as new photos) and other sessions' folders."""
        if folder.resolve() in self.exclude or (folder / "session.json").is_file():
            log.info("not searching %s: it belongs to a dreamnb session", folder)
            return True
        return False

    def uploads(self, uploads: list[dict]) -> list[Source]:
        """Write uploaded files into one scratch folder (so photo.txt lands beside photo.jpg) and collect it."""
        folder = Path(tempfile.mkdtemp(prefix="uploads-", dir=_ensure(self.scratch_dir)))
        for upload in uploads:
            name = PurePosixPath(str(upload.get("name") or "upload").replace("\\", "/")).name
            if _hidden(name):
                continue
            path = folder / (_safe_file_name(name) or "upload")
            stem, number = path.stem, 1
            while path.exists():  # two uploads with one name: keep both
                number += 1
                path = path.with_name(f"{stem} ({number}){path.suffix}")
            path.write_bytes(bytes(upload["content"]))
        return self.folder(folder, "", inside_archive=False)

    def archive(self, archive: Path, name: str) -> list[Source]:
        """Unpack the archive's safe entries into a new folder under the scratch folder and collect them."""
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as exc:
            return [Source(name, None, error=f"not a readable .zip archive ({exc})")]
        target = Path(tempfile.mkdtemp(prefix="archive-", dir=_ensure(self.scratch_dir))).resolve()
        problems: list[Source] = []
        budget = self.max_archive_bytes
        with zf:
            members = zf.infolist()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                return [Source(name, None, error=f"the archive holds {len(members)} entries, more than {MAX_ARCHIVE_MEMBERS}; unpack it yourself")]
            for member in members:
                shown = f"{name}/{member.filename}"
                relative = _safe_member_path(member.filename)
                raw_parts = member.filename.replace("\\", "/").split("/")
                if member.is_dir() or any(_hidden(part) for part in raw_parts if part not in ("", ".", "..")):
                    continue
                error = None
                if relative is None:
                    error = "unsafe path in the archive (it points outside the archive's folder); not extracted"
                elif stat.S_ISLNK(member.external_attr >> 16):
                    error = "a link inside the archive; not extracted"
                elif member.file_size > budget:
                    error = f"the archive unpacks to more than {self.max_archive_bytes / 1e6:g} MB; not extracted"
                elif member.file_size > RATIO_CHECK_FROM_BYTES and member.file_size > MAX_COMPRESSION_RATIO * max(1, member.compress_size):
                    error = "compressed suspiciously well (a zip bomb?); not extracted"
                elif not target.joinpath(*relative.parts).resolve().is_relative_to(target):
                    error = "unsafe path in the archive; not extracted"
                if error:
                    problems.append(Source(shown, None, error=error))
                    continue
                destination = target.joinpath(*relative.parts)
                try:
                    budget -= _extract_capped(zf, member, destination, limit=min(budget, member.file_size))
                except (RuntimeError, zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                    destination.unlink(missing_ok=True)
                    problems.append(Source(shown, None, error=f"could not be extracted ({exc})"))
        return problems + self.folder(target, name, inside_archive=True)


def _caption_beside(path: Path) -> Path | None:
    for suffix in (".txt", ".TXT"):
        caption = path.with_suffix(suffix)
        if caption.is_file():
            return caption
    return None


def _safe_member_path(filename: str) -> PurePosixPath | None:
    """The entry's path relative to the archive's folder, or None if it is absolute or climbs out."""
    posix = filename.replace("\\", "/")
    path = PurePosixPath(posix)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", posix) or any(part == ".." for part in path.parts):
        return None
    parts = [_safe_file_name(part) for part in path.parts if part not in ("", ".")]
    if not parts or any(not part for part in parts):
        return None
    return PurePosixPath(*parts)


def _extract_capped(zf: zipfile.ZipFile, member: zipfile.ZipInfo, destination: Path, limit: int) -> int:
    """Copy one entry, refusing to write more than `limit` bytes whatever its header claims."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(member) as src, open(destination, "xb") as dst:
        while chunk := src.read(1024 * 1024):
            written += len(chunk)
            if written > limit:
                raise ValueError("it is larger than its header says")
            dst.write(chunk)
    return written


def _safe_file_name(name: str) -> str:
    """A file name without separators, control characters or a leading dot."""
    name = "".join(ch for ch in unicodedata.normalize("NFC", name) if ch.isprintable() and ch not in '/\\:*?"<>|')
    return name.strip().lstrip(".")


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- decoding ---------------------------------------------------------------------------------------

@functools.cache
def _register_heif() -> bool:
    """Teach Pillow HEIC/HEIF (iPhone photos) on first use; False when pillow-heif is not installed."""
    try:
        import pillow_heif
    except ImportError:
        log.info("pillow-heif is not installed; HEIC photos cannot be read")
        return False
    pillow_heif.register_heif_opener()
    return True


def load_photo(photo: str | Path | bytes) -> Image.Image:
    """An RGB image the way the photo looks on a phone: EXIF rotation applied, transparency on grey.

    Raises `PhotoError` saying why when the file is not an image, is corrupt or truncated, or is
    implausibly large (a decompression bomb).
    """
    return _decode(photo)[0]


def _decode(photo: str | Path | bytes) -> tuple[Image.Image, list[str]]:
    """The RGB image and notes worth telling the user (e.g. that only an animation's first frame was used)."""
    data = bytes(photo) if isinstance(photo, (bytes, bytearray, memoryview)) else Path(photo).read_bytes()
    _register_heif()
    notes = []
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes the first frame; failures of truncated or corrupt files surface here
        if getattr(image, "n_frames", 1) > 1:
            notes.append("it has several frames (animated); the first one was used")
        image = _orient(image)
        image = _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise PhotoError(f"too large to be a photo ({_pixels_in(exc)}); Pillow refuses it as a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise PhotoError(_not_an_image_reason(data)) from None
    except Exception as exc:  # Pillow's plugins raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise PhotoError(f"corrupt or truncated image ({exc})") from None
    return image, notes


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as phones do when showing the photo."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception as exc:  # a broken EXIF block should not cost the photo
        log.warning("ignoring an unreadable EXIF orientation: %s", exc)
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit sRGB: 16-bit scaled (not clipped), alpha composited on neutral grey, CMYK/grey/palette converted."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    icc = image.info.get("icc_profile")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, NEUTRAL_GREY + (255,))
        background.alpha_composite(rgba)
        image = background.convert("RGB")
    if icc and image.mode in ("RGB", "CMYK", "L"):
        converted = _icc_to_srgb(image, icc)
        if converted is not None:
            return converted
    return image.convert("RGB")


@functools.cache
def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _icc_to_srgb(image: Image.Image, icc: bytes) -> Image.Image | None:
    """Convert from the photo's embedded colour profile (Display P3, a CMYK press profile) to sRGB."""
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGB")
    except Exception as exc:  # an odd or mismatched profile: the plain conversion is close enough
        log.debug("colour profile not applied: %s", exc)
        return None


def _pixels_in(exc: Exception) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(match.group(1)):,} pixels" if match else "too many pixels"


def _not_an_image_reason(data: bytes) -> str:
    head = data[:64]
    if not data:
        return "not an image (the file is empty)"
    if head.startswith(b"%PDF"):
        return "not an image (it is a PDF)"
    if head[4:8] == b"ftyp":
        if head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"heim", b"heis") and not _register_heif():
            return "a HEIC photo, but pillow-heif is not installed to read it; run pip install pillow-heif"
        if head[8:12] in (b"qt  ", b"isom", b"mp41", b"mp42", b"M4V ", b"3gp4", b"3gp5"):
            return "not an image (it is a video)"
    try:
        data[:4096].decode("utf-8")
        return "not an image (it is a text file)"
    except UnicodeDecodeError:
        pass
    return "not an image, or in a format Pillow cannot read"


# --- similarity ---------------------------------------------------------------------------------------

def perceptual_hash(image: Image.Image) -> int:
    """A 128-bit difference hash (horizontal and vertical gradients of a 9×9 thumbnail).

    It survives resizing and recompression, so a re-saved copy of a photo lands a few bits away.
    """
    small = np.asarray(image.convert("L").resize((9, 9), Image.LANCZOS), dtype=np.int16)
    bits = np.concatenate([(small[:, 1:] > small[:, :-1])[:8].ravel(), (small[1:, :] > small[:-1, :])[:, :8].ravel()])
    return int("".join("1" if b else "0" for b in bits), 2)


def hash_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# --- preparing ---------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    """A photo already in the instance folder: its name, the content hash in its name, its perceptual hash."""

    name: str
    digest: str | None
    phash: int


def prepare_photos(
    sources: Iterable[Any] | str | Path,
    instance_dir: str | Path,
    *,
    size: int = 512,
    crop: str = "smart",
    preset: str | None = None,
    min_side: int | None = None,
    progress: bool | Callable[[int, int], None] | None = None,
    scratch_dir: str | Path | None = None,
) -> PrepareReport:
    """Check, square and copy photos into `instance_dir`, adding to what is there; originals are only read.

    `min_side`: shorter sides below it are rejected (default: half of `size`, beyond which enlarging
    looks soft). `progress`: a callable `(done, total)`, or True for a tqdm bar. Archives and uploads
    are unpacked in `scratch_dir` (default: a temporary folder beside `instance_dir`, removed after).
    """
    _check_prepare_inputs(size, crop, preset, min_side)
    min_side = size // 2 if min_side is None else min_side
    instance_dir = Path(instance_dir)
    instance_dir.mkdir(parents=True, exist_ok=True)
    existing = _scan_prepared(instance_dir)

    with _ScratchFolder(scratch_dir, instance_dir) as scratch:
        candidates = collect_sources(sources, scratch, exclude=[instance_dir, scratch])
        results = []
        with _Progress(progress, len(candidates)) as step:
            for source in candidates:
                try:
                    result = _prepare_one(source, instance_dir, existing, size=size, crop=crop, preset=preset, min_side=min_side)
                except Exception as exc:  # one bad file never stops the batch
                    log.exception("unexpected failure preparing %s", source.name)
                    result = PhotoResult(source.name, "rejected", reason=f"unexpected error ({type(exc).__name__}: {exc})")
                results.append(result)
                step()

    added = {r.output for r in results if r.accepted}
    earlier = [_describe_prepared(instance_dir / p.name, preset) for p in existing if p.name not in added]
    photo_set = earlier + [r for r in results if r.accepted]
    advice = advise(photo_set, preset)
    if (crop == "smart" or preset == "face") and not face_detection_available():
        advice.insert(0, FACE_DETECTOR_MISSING)
    return PrepareReport(results=results, advice=advice, instance_dir=str(instance_dir),
                         photos_in_set=len(prepared_files(instance_dir)))


def _check_prepare_inputs(size: int, crop: str, preset: str | None, min_side: int | None) -> None:
    if not isinstance(size, int) or not 64 <= size <= 2048 or size % 8:
        raise UserError(f"The training size must be a multiple of 8 between 64 and 2048 (512 for SD 1.x, 768 or 1024 for larger models), not {size!r}.")
    if crop not in CROP_MODES:
        raise UserError(f"Unknown crop mode {crop!r}; choose one of {', '.join(CROP_MODES)}.")
    if preset not in (None, "face", "object", "style"):
        raise UserError(f"Unknown preset {preset!r}; choose face, object or style.")
    if min_side is not None and (not isinstance(min_side, int) or min_side < 1):
        raise UserError(f"min_side must be a positive number of pixels, not {min_side!r}.")


def _prepare_one(source: Source, instance_dir: Path, existing: list[_Prepared], *, size: int, crop: str,
                 preset: str | None, min_side: int) -> PhotoResult:
    if source.error or source.path is None:
        return PhotoResult(source.name, "rejected", reason=source.error or "could not be read")
    try:
        data = source.path.read_bytes()
    except OSError as exc:
        return PhotoResult(source.name, "rejected", reason=f"could not be read ({exc.strerror or exc})")
    digest = hashlib.sha256(data).hexdigest()[:12]
    same = next((p for p in existing if p.digest == digest), None)
    if same is not None:
        return PhotoResult(source.name, "rejected", reason=f"already in the set as {same.name} (remove that copy first to prepare it again)",
                           duplicate_of=same.name)
    try:
        image, notes = _decode(data)
    except PhotoError as exc:
        return PhotoResult(source.name, "rejected", reason=str(exc))
    width, height = image.size
    if min(width, height) < min_side:
        return PhotoResult(source.name, "rejected", original_size=(width, height),
                           reason=f"too small: {width}×{height} px; the shorter side must be at least {min_side} px for training at {size} px")

    prepared, info = crop_square(image, size, crop)
    result = PhotoResult(source.name, "accepted", original_size=(width, height), warnings=notes, crop=info.reason,
                         scale=round(info.scale, 4))
    if info.upscaled:
        result.warnings.append(f"enlarged {info.scale:.1f}× from {width}×{height} px, so it will look soft; a larger original would be sharper")
    if crop == "none" and prepared.width != prepared.height:
        result.warnings.append("not square; training will cut a centred square from it")

    faces = info.faces
    if faces is None and preset == "face":
        faces = find_faces(image)
    if faces is not None:
        result.face_found = bool(faces)
        result.face_box = _relative_box(faces[0], info.box) if faces else None
        if not faces and preset == "face":
            result.warnings.append("no face found; use photos where the face is clearly visible")

    phash = perceptual_hash(prepared)
    near = min(existing, key=lambda p: hash_distance(p.phash, phash), default=None)
    if near is not None and hash_distance(near.phash, phash) <= NEAR_DUPLICATE_BITS:
        result.duplicate_of = near.name
        result.warnings.append(f"looks almost the same as {near.name}; keep one unless they differ in a way that matters")

    name = f"{_slug(source.name)}-{digest}.png"
    fileio.save_with(instance_dir / name, lambda tmp: prepared.save(tmp, format="PNG"))
    result.output = name
    existing.append(_Prepared(name, digest, phash))
    if source.caption_path is not None:
        _copy_caption(source.caption_path, instance_dir / name, result)
    return result


def _copy_caption(caption_path: Path, prepared: Path, result: PhotoResult) -> None:
    try:
        caption = caption_path.read_text(encoding="utf-8-sig").strip()
    except (UnicodeDecodeError, OSError):
        result.warnings.append(f"its caption {caption_path.name} is not readable UTF-8 text and was not copied")
        return
    if caption:
        fileio.write_text(prepared.with_suffix(".txt"), caption + "\n")
        result.caption = caption


def _relative_box(face: Box, crop_box: Box) -> tuple[float, float, float, float] | None:
    """The face as fractions of the crop (clipped to it), or None when the crop left it out."""
    left, top, right, bottom = crop_box
    w, h = right - left, bottom - top
    x0, y0 = max(face[0], left), max(face[1], top)
    x1, y1 = min(face[2], right), min(face[3], bottom)
    if x1 <= x0 or y1 <= y0:
        return None
    return (round((x0 - left) / w, 4), round((y0 - top) / h, 4), round((x1 - left) / w, 4), round((y1 - top) / h, 4))


def _slug(name: str) -> str:
    """A readable, safe stem from the photo's name (letters of any script kept)."""
    stem = unicodedata.normalize("NFC", PurePosixPath(name.replace("\\", "/")).stem)
    stem = re.sub(r"[^\w]+", "-", stem).strip("-_")[:40].strip("-_")
    return stem or "photo"


_DIGEST_IN_NAME = re.compile(r"-([0-9a-f]{12})$")


def prepared_files(instance_dir: Path) -> list[Path]:
    """The prepared photos in an instance folder, by name (captions and hidden files left out)."""
    return sorted(p for p in instance_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in PREPARED_SUFFIXES and not p.name.startswith("."))


def _scan_prepared(instance_dir: Path) -> list[_Prepared]:
    """The photos already prepared (or put there by hand), so duplicates of them are recognised."""
    prepared = []
    for path in prepared_files(instance_dir):
        match = _DIGEST_IN_NAME.search(path.stem)
        try:
            with Image.open(path) as image:
                phash = perceptual_hash(image)
        except Exception as exc:
            log.warning("cannot read %s in the instance folder: %s", path, exc)
            continue
        prepared.append(_Prepared(path.name, match.group(1) if match else None, phash))
    return prepared


def _describe_prepared(path: Path, preset: str | None) -> PhotoResult:
    """A photo from an earlier run, described well enough for `advise`."""
    result = PhotoResult(path.name, "accepted", output=path.name)
    if preset == "face":
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as exc:  # changed by hand since it was scanned; it just goes unchecked
            log.warning("cannot read %s in the instance folder: %s", path, exc)
            return result
        faces = find_faces(image)
        if faces is not None:
            result.face_found = bool(faces)
            result.face_box = _relative_box(faces[0], (0, 0, image.width, image.height)) if faces else None
    return result


class _ScratchFolder:
    """The caller's scratch folder, or a temporary one beside the instance folder that is removed after."""

    def __init__(self, scratch_dir: str | Path | None, instance_dir: Path):
        self.given = Path(scratch_dir) if scratch_dir is not None else None
        self.instance_dir = instance_dir
        self.made: Path | None = None

    def __enter__(self) -> Path:
        if self.given is not None:
            return _ensure(self.given)
        self.made = Path(tempfile.mkdtemp(prefix=".prepare-", dir=self.instance_dir.parent))
        return self.made

    def __exit__(self, *exc) -> None:
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)


class _Progress:
    """`step()` after each photo: calls `progress(done, total)`, or moves a tqdm bar when progress is True."""

    def __init__(self, progress: bool | Callable[[int, int], None] | None, total: int):
        self.progress, self.total, self.done, self.bar = progress, total, 0, None

    def __enter__(self) -> Callable[[], None]:
        if self.progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="photos", unit="photo")
        return self.step

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif callable(self.progress):
            self.progress(self.done, self.total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# --- advice, removal, captions, prompt ----------------------------------------------------------------

def advise(results: Iterable[PhotoResult], preset: str | None = None) -> list[str]:
    """Plain sentences about the photo set as a whole, each saying what to do; empty when it looks fine."""
    photos = [r for r in results if r.accepted]
    advice = []
    if not photos:
        return ["No photos are prepared yet; add 10–20 photos (more is better) with different angles, expressions and backgrounds."]
    if len(photos) < FEW_PHOTOS:
        what = "works of the style, with different subjects" if preset == "style" else "photos with different angles, expressions, lighting and backgrounds"
        advice.append(f"You have {len(photos)} photo{'s' if len(photos) != 1 else ''}; add more (10–20 or more {what}), "
                      "because with few photos the model copies them instead of learning the subject.")
    enlarged = [r for r in photos if r.scale is not None and r.scale > 1.0 + 1e-6]
    if enlarged:
        advice.append(f"{_count(enlarged, 'photo was', 'photos were')} smaller than the training size and enlarged, so they look soft; "
                      "use the original full-resolution files rather than screenshots or copies from chat apps.")
    near = [r for r in photos if r.duplicate_of]
    if near:
        advice.append(f"{_count(near, 'photo looks', 'photos look')} almost the same as another one; remove the extra copies "
                      "(remove_photo) or swap them for photos from other angles, or those shots will dominate training.")
    if preset == "face":
        checked = [r for r in photos if r.face_found is not None]
        faceless = [r for r in checked if not r.face_found]
        if checked and len(faceless) == len(checked):
            advice.append("No face was found in any photo; for the 'face' preset use photos where the face is clearly visible and "
                          "facing the camera in most of them, or choose the 'object' preset.")
        elif faceless:
            advice.append(f"{len(faceless)} of {len(checked)} photos show no face the detector can find (see the report); "
                          "check that they show the face clearly, or replace them.")
    widths = [r.face_box[2] - r.face_box[0] for r in photos if r.face_box]
    if len(widths) >= MIN_FACES_FOR_FRAMING and max(widths) <= SAME_FRAMING_RATIO * min(widths):
        advice.append("All the photos frame the face at about the same size; add some from further away (head and shoulders, "
                      "half body) and some close-ups, so the model learns the face at every distance.")
    return advice


def _count(items: list, one: str, many: str) -> str:
    return f"1 {one}" if len(items) == 1 else f"{len(items)} {many}"


def remove_photo(instance_dir: str | Path, name: str) -> None:
    """Delete one prepared copy (and its caption) from the instance folder; the original photo is untouched."""
    instance_dir = Path(instance_dir)
    if not name or name != PurePosixPath(name).name or "\\" in name or name in (".", ".."):
        raise UserError(f"{name!r} is not the name of a prepared photo; give a file name from the report, such as 'me-1a2b3c4d5e6f.png'.")
    path = instance_dir / name
    if not (path.is_file() and path.suffix.lower() in PREPARED_SUFFIXES):
        matches = [p for p in prepared_files(instance_dir) if p.stem == name] if instance_dir.is_dir() else []
        if len(matches) != 1:
            raise UserError(f"There is no prepared photo named {name!r} in {instance_dir}; the names are listed in the prepare report.")
        path = matches[0]
    path.unlink()
    path.with_suffix(".txt").unlink(missing_ok=True)
    log.info("removed %s", path)


def caption_warnings(instance_dir: str | Path, token: str) -> list[str]:
    """A warning for each caption that never mentions the token: those photos would not teach it."""
    token = (token or "").strip()
    if not token:
        raise UserError("The token is empty; choose a rare word for your subject, such as 'squidarth'.")
    mention = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", re.IGNORECASE)
    found = []
    for photo in prepared_files(Path(instance_dir)):
        caption_path = photo.with_suffix(".txt")
        if not caption_path.is_file():
            continue
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            found.append(f"The caption of {photo.name} is empty; write one that mentions '{token}', or delete it to use the instance prompt.")
        elif not mention.search(caption):
            found.append(f"The caption of {photo.name} does not mention '{token}'; add it, or this photo will not teach the token.")
    return found


def instance_prompt(token: str, class_word: str = "", preset: str | None = None) -> str:
    """The caption for photos without their own: "photo of squidarth person"; a style: "squidarth style"."""
    token, class_word = (token or "").strip(), (class_word or "").strip()
    if not token:
        raise UserError("The token is empty; choose a rare word for your subject, such as 'squidarth'.")
    if preset == "style" and not class_word:
        return f"{token} style"
    return " ".join(p for p in ("photo of", token, class_word) if p)
