"""Smart crop keeps the face (a real photo: scikit-image's astronaut), else the detail, else the centre."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from dreamnb.crop import crop_square, find_faces, smart_crop_box
from dreamnb.errors import UserError
from dreamnb.images import prepare_photos


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())  # 512×512, Eileen Collins' face near the top, left of centre


def inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def test_the_detector_finds_the_astronauts_face(astronaut):
    faces = find_faces(astronaut)
    assert len(faces) == 1
    left, top, right, bottom = faces[0]
    # her face sits at about x 175–270, y 65–160 in the 512 px picture
    assert 150 < (left + right) / 2 < 300 and 80 < (top + bottom) / 2 < 150
    assert find_faces(Image.new("RGB", (300, 200), (128, 128, 128))) == []


@pytest.mark.parametrize("box", [(100, 0, 400, 512), (120, 0, 512, 260)], ids=["portrait", "landscape-face-at-left"])
def test_smart_crop_keeps_the_face_where_a_centre_crop_cuts_it(astronaut, box):
    photo = astronaut.crop(box)
    (face,) = find_faces(photo)
    crop_box, reason = smart_crop_box(photo)
    assert reason == "face" and inside(face, crop_box)
    centre_box, _ = smart_crop_box(photo, "center")
    assert not inside(face, centre_box)  # the test photo is one where the choice matters

    prepared, info = crop_square(photo, 128, "smart")
    assert prepared.size == (128, 128) and info.box == crop_box and not info.upscaled
    assert find_faces(prepared), "the prepared square no longer shows a face"


def test_face_has_headroom_in_a_tall_photo():
    # a tall photo with the astronaut's head well below the top: the crop should not start at the top
    astronaut = Image.fromarray(data.astronaut())
    tall = Image.new("RGB", (300, 700), (60, 60, 60))
    tall.paste(astronaut.crop((100, 0, 400, 400)), (0, 250))
    (face,) = find_faces(tall)
    box, reason = smart_crop_box(tall)
    assert reason == "face" and inside(face, box) and box[1] > 0
    face_centre = ((face[1] + face[3]) / 2 - box[1]) / (box[3] - box[1])
    assert 0.3 < face_centre < 0.5  # the upper-middle of the square, with room above the head


def test_without_a_face_the_most_detailed_region_wins_else_the_centre():
    rng = np.random.default_rng(0)
    busy = np.full((100, 300, 3), 128, dtype=np.uint8)
    busy[:, 200:] = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)  # all the detail at the right
    box, reason = smart_crop_box(Image.fromarray(busy))
    assert reason == "detail" and box == (200, 0, 300, 100)

    flat = Image.new("RGB", (300, 100), (128, 128, 128))
    assert smart_crop_box(flat) == ((100, 0, 200, 100), "centre")
    assert smart_crop_box(Image.new("RGB", (90, 90)))[1] == "square"


def test_resizing_reports_enlargement_and_none_keeps_the_shape():
    small = Image.new("RGB", (40, 40), (10, 200, 30))
    out, info = crop_square(small, 64, "center")
    assert out.size == (64, 64) and info.upscaled and info.scale == pytest.approx(1.6)
    wide = Image.new("RGB", (300, 150))
    out, info = crop_square(wide, 64, "none")
    assert out.size == (128, 64) and info.reason == "none" and not info.upscaled
    with pytest.raises(UserError, match="crop mode"):
        crop_square(wide, 64, "square")


def test_prepare_reports_the_face_and_warns_when_enlarging(tmp_path, astronaut):
    astronaut.crop((100, 0, 400, 512)).save(tmp_path / "astronaut.jpg", quality=90)
    Image.new("RGB", (300, 200), (128, 128, 128)).save(tmp_path / "wall.png")
    report = prepare_photos([tmp_path / "astronaut.jpg", tmp_path / "wall.png"], tmp_path / "session" / "instance",
                            size=512, min_side=128, preset="face")
    astro, wall = report.results
    assert astro.crop == "face" and astro.face_found and astro.face_box is not None
    assert any("enlarged 1.7×" in w for w in astro.warnings)  # 300 px wide square made 512
    assert wall.face_found is False and any("no face found" in w for w in wall.warnings)
    assert any("1 of 2 photos show no face" in a for a in report.advice)
