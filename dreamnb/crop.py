"""Smart square crop: centre on the face, else on the most detailed region, else the centre.

Stable Diffusion trains on squares, and a plain centre crop of a portrait-format phone photo often
cuts off the top of the head or keeps mostly wall. Faces are found with OpenCV's Haar cascade (fast,
no download, ships in `opencv-python-headless<5`); the face is placed in the upper-middle of the
square so there is headroom above it, as a photographer would frame it. Where OpenCV has no face
detector (OpenCV 5 ships no Haar cascades), faces are not looked for and crops follow the detail.

Boxes are PIL-style `(left, top, right, bottom)` in pixels of the (orientation-corrected) photo.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import UserError

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
CROP_MODES = ("smart", "center", "none")

# Where the face centre sits in the square, as a fraction of its height from the top.
FACE_CENTRE_FROM_TOP = 0.4
# Face detection runs on a copy whose longer side is at most this (Haar cost grows with pixels).
DETECTION_MAX_SIDE = 480
# A region must be this much more detailed than the centre to move the crop there.
DETAIL_MARGIN = 1.10


@dataclass
class CropInfo:
    """How a photo was cut: the box taken, why there, the faces seen, and how much it was scaled."""

    box: Box
    reason: str  # "face", "detail", "centre", "square" or "none" (not cropped)
    faces: list[Box] | None  # faces found in the photo, largest first; None when not looked for
    scale: float  # output size / box size: above 1 the photo was enlarged

    @property
    def upscaled(self) -> bool:
        return self.scale > 1.0 + 1e-6


FACE_DETECTOR_MISSING = (
    "Face-aware cropping is off: this OpenCV has no face detector (OpenCV 5 ships none), so photos were cropped around "
    "their most detailed region and faces were not checked; to turn it on, run pip install 'opencv-python-headless<5' "
    "and prepare the photos again.")


@functools.cache
def _face_cascade():
    """OpenCV's frontal-face detector, or None where this OpenCV has none."""
    try:
        import cv2

        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        cascade = cv2.CascadeClassifier(path)
    except (ImportError, AttributeError) as err:
        log.warning("no face detector (%s): %s", type(err).__name__, err)
        return None
    if cascade.empty():
        log.warning("OpenCV could not load its face detector from %s", path)
        return None
    return cascade


def face_detection_available() -> bool:
    return _face_cascade() is not None


def find_faces(image: Image.Image) -> list[Box] | None:
    """Frontal faces in `image`, largest first, as boxes in the image's own pixels; None when there is no detector."""
    cascade = _face_cascade()
    if cascade is None:
        return None
    import cv2

    gray = image.convert("L")
    factor = min(1.0, DETECTION_MAX_SIDE / max(gray.size))
    if factor < 1.0:
        gray = gray.resize((max(1, round(gray.width * factor)), max(1, round(gray.height * factor))), Image.BILINEAR)
    pixels = cv2.equalizeHist(np.asarray(gray, dtype=np.uint8))
    # A face smaller than ~1/12 of the short side is too small to teach anything; ignoring them also
    # keeps the detector fast and cuts false positives in busy backgrounds.
    min_side = max(20, min(gray.size) // 12)
    found, votes = cascade.detectMultiScale2(pixels, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    if len(found) == 0:
        return []
    # A real face gathers many overlapping detections (votes); a face-like pattern in a shirt or a
    # background gathers few. Keep those with at least a third of the best one's votes.
    enough = max(votes) / 3
    boxes = [
        (round(x / factor), round(y / factor), round((x + w) / factor), round((y + h) / factor))
        for (x, y, w, h), n in zip(found, votes) if n >= enough
    ]
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def centre_box(width: int, height: int) -> Box:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def face_box(width: int, height: int, face: Box) -> Box:
    """The largest square holding `face`, with the face centred across and in the upper-middle down."""
    side = min(width, height)
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    left = _clamp(round(cx - side / 2), 0, width - side)
    top = _clamp(round(cy - FACE_CENTRE_FROM_TOP * side), 0, height - side)
    return (left, top, left + side, top + side)


def detail_box(image: Image.Image) -> Box | None:
    """The square along the long side with the most edges, or None when no place stands out from the centre."""
    width, height = image.size
    side = min(width, height)
    if width == height:
        return None
    factor = min(1.0, 256 / max(width, height))
    small = image.convert("L").resize((max(2, round(width * factor)), max(2, round(height * factor))), Image.BILINEAR)
    gray = np.asarray(small, dtype=np.float32)
    edges = np.zeros_like(gray)
    edges[:, 1:] += np.abs(np.diff(gray, axis=1))
    edges[1:, :] += np.abs(np.diff(gray, axis=0))
    along_long_side = edges.sum(axis=0) if width > height else edges.sum(axis=1)
    window = max(1, min(len(along_long_side), round(side * factor)))
    sums = np.convolve(along_long_side, np.ones(window, dtype=np.float32), mode="valid")
    best = int(np.argmax(sums))
    centre = (len(sums) - 1) // 2
    if sums[best] <= DETAIL_MARGIN * sums[centre] or sums[best] <= 0:
        return None
    offset = _clamp(round(best / factor), 0, max(width, height) - side)
    if width > height:
        return (offset, 0, offset + side, side)
    return (0, offset, side, offset + side)


def smart_crop_box(image: Image.Image, mode: str = "smart", faces: list[Box] | None = None) -> tuple[Box, str]:
    """Where to cut the square from, and why: "face", "detail", "centre" or "square".

    `faces` may be passed when already known (largest first); in "smart" mode they are looked for otherwise.
    """
    _check_mode(mode)
    width, height = image.size
    if width == height:
        return (0, 0, width, height), "square"
    if mode == "smart":
        faces = find_faces(image) if faces is None else faces
        if faces:
            return face_box(width, height, faces[0]), "face"
        box = detail_box(image)
        if box is not None:
            return box, "detail"
    return centre_box(width, height), "centre"


def crop_square(image: Image.Image, size: int, mode: str = "smart") -> tuple[Image.Image, CropInfo]:
    """Cut and resize `image` to `size`×`size` (LANCZOS); with mode "none", only scale the short side to `size`."""
    _check_mode(mode)
    width, height = image.size
    if mode == "none":
        scale = size / min(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = image if new_size == image.size else image.resize(new_size, Image.LANCZOS, reducing_gap=3.0)
        return out, CropInfo(box=(0, 0, width, height), reason="none", faces=None, scale=scale)
    faces = find_faces(image) if mode == "smart" else None
    box, reason = smart_crop_box(image, mode, faces=faces)
    side = box[2] - box[0]
    if side == size and box == (0, 0, width, height):
        out = image.copy()
    else:
        # `box` makes Pillow resample straight from the region; `reducing_gap` keeps huge photos fast.
        out = image.resize((size, size), Image.LANCZOS, box=box, reducing_gap=3.0)
    return out, CropInfo(box=box, reason=reason, faces=faces, scale=size / side)


def _check_mode(mode: str) -> None:
    if mode not in CROP_MODES:
        raise UserError(f"Unknown crop mode {mode!r}; choose one of {', '.join(CROP_MODES)}.")


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))
