"""Photo intake on a corpus of good and bad photos built in code (no binaries in the repository)."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dreamnb.errors import UserError
from dreamnb.images import (
    PhotoError,
    PhotoResult,
    advise,
    caption_warnings,
    collect_sources,
    instance_prompt,
    load_photo,
    prepare_photos,
    remove_photo,
)

SIZE = 64  # training size for the tests; the default minimum side is then 32 px
RED, GREEN, BLUE = (220, 20, 20), (20, 200, 40), (20, 40, 220)


# --- building the corpus ------------------------------------------------------------------------------

def texture(seed: int, width: int = 80, height: int = 80) -> Image.Image:
    """A smooth random picture: different seeds look different to a perceptual hash."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def with_patch(seed: int, colour, width: int = 80, height: int = 80) -> Image.Image:
    """A texture with a solid patch in the middle, whose colour survives decoding and cropping."""
    image = texture(seed, width, height)
    image.paste(colour, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge picture: a decompression bomb in a hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def sixteen_bit_grey() -> bytes:
    values = (np.asarray(texture(3).convert("L"), dtype=np.uint16) * 257)
    values[20:60, 20:60] = 40000  # 40000 / 65535 of full scale is 156 in 8 bits
    return encode(Image.fromarray(values), "PNG")


def sixteen_bit_rgb() -> bytes:
    values = np.asarray(texture(4), dtype=np.uint16) * 257
    values[20:60, 20:60] = (60000, 10000, 30000)  # RGB; 8-bit: 233, 39, 117
    ok, data = cv2.imencode(".png", values[..., ::-1].copy())  # OpenCV writes BGR
    assert ok
    return data.tobytes()


def animated_gif() -> bytes:
    frames = [with_patch(5, RED).convert("P"), with_patch(6, BLUE).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def rgba_png() -> bytes:
    image = texture(7).convert("RGBA")
    image.paste((255, 0, 0, 0), (20, 20, 60, 60))  # a transparent hole: must become neutral grey
    return encode(image, "PNG")


def heic() -> bytes:
    import pillow_heif

    pillow_heif.register_heif_opener()
    return encode(with_patch(8, GREEN), "HEIF", quality=90)


def cmyk_jpeg() -> bytes:
    image = texture(9).convert("CMYK")
    image.paste((0, 255, 255, 0), (20, 20, 60, 60))  # cyan 0, magenta and yellow full: red
    return encode(image, "JPEG", quality=95)


def zip_with_traps(tmp_path: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("inside/zip_ok.png", encode(with_patch(10, BLUE), "PNG"))
        zf.writestr("inside/zip_ok.txt", "photo of squidarth person on a boat")
        zf.writestr(zipfile.ZipInfo("../evil.jpg"), encode(texture(11), "JPEG"))
        zf.writestr(zipfile.ZipInfo(str(tmp_path / "abs_evil.jpg")), encode(texture(12), "JPEG"))
        zf.writestr(".hidden.jpg", encode(texture(13), "JPEG"))
        zf.writestr("__MACOSX/inside/._zip_ok.png", b"\0\5\26\7 resource fork")
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = 0o120777 << 16  # a symbolic link
        zf.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.jpg", bytes(20 * 1024**2))
    return buffer.getvalue()


def build_corpus(folder: Path, tmp_path: Path) -> dict[str, tuple]:
    """Write every case into `folder`; returns name -> expected (status, colour at the centre or reason words)."""
    jpeg_near_source = texture(20)
    files: dict[str, bytes] = {
        "bmp.bmp": encode(with_patch(21, RED), "BMP"),
        "bmp.txt": "photo of squidarth person, smiling".encode(),
        "copy_of_bmp.bmp": encode(with_patch(21, RED), "BMP"),  # the same bytes under another name
        "tiff.tif": encode(with_patch(22, GREEN), "TIFF"),
        "webp.webp": encode(with_patch(23, BLUE), "WEBP", quality=95),
        "palette.png": encode(with_patch(24, GREEN).convert("P", palette=Image.ADAPTIVE, colors=64), "PNG"),
        "rgba.png": rgba_png(),
        "grey16.png": sixteen_bit_grey(),
        "rgb16.png": sixteen_bit_rgb(),
        "animated.gif": animated_gif(),
        "cmyk.jpg": cmyk_jpeg(),
        "grey.jpg": encode(with_patch(25, (200, 200, 200)).convert("L"), "JPEG", quality=95),
        "iphone.heic": heic(),
        "фото-été-😀.png": encode(with_patch(26, BLUE), "PNG"),
        "jpeg.jpg": encode(jpeg_near_source, "JPEG", quality=95),
        "zz_near_duplicate.jpg": encode(jpeg_near_source.resize((72, 72), Image.LANCZOS), "JPEG", quality=70),
        "text.jpg": b"this is a shopping list, not a photo\n",
        "truncated.jpg": encode(texture(27, 200, 200), "JPEG", quality=95)[:1500],
        "tiny.png": encode(texture(28, 20, 20), "PNG"),
        "bomb.png": png_declaring(100_000, 100_000),
        "bundle.zip": zip_with_traps(tmp_path),
        "bomb.zip": zip_bomb(),
        ".hidden.jpg": encode(texture(29), "JPEG"),
        ".ipynb_checkpoints/bmp-checkpoint.bmp": encode(texture(30), "BMP"),
        "sub/folder/nested.png": encode(with_patch(31, RED), "PNG"),
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return {
        "bmp.bmp": ("accepted", RED), "tiff.tif": ("accepted", GREEN), "webp.webp": ("accepted", BLUE),
        "palette.png": ("accepted", GREEN), "rgba.png": ("accepted", (128, 128, 128)),
        "grey16.png": ("accepted", (156, 156, 156)), "rgb16.png": ("accepted", (233, 39, 117)),
        "animated.gif": ("accepted", RED), "cmyk.jpg": ("accepted", (255, 0, 0)),  # not inverted (cyan)
        "grey.jpg": ("accepted", (200, 200, 200)), "iphone.heic": ("accepted", GREEN),
        "фото-été-😀.png": ("accepted", BLUE), "sub/folder/nested.png": ("accepted", RED),
        "bundle.zip/inside/zip_ok.png": ("accepted", BLUE),
        "jpeg.jpg": ("accepted", None), "zz_near_duplicate.jpg": ("accepted", None),
        "copy_of_bmp.bmp": ("rejected", "already in the set"),
        "text.jpg": ("rejected", "not an image (it is a text file)"),
        "truncated.jpg": ("rejected", "corrupt or truncated"),
        "tiny.png": ("rejected", "too small: 20×20 px; the shorter side must be at least 32 px"),
        "bomb.png": ("rejected", "too large to be a photo"),
        "bundle.zip/../evil.jpg": ("rejected", "unsafe path"),
        f"bundle.zip/{tmp_path / 'abs_evil.jpg'}": ("rejected", "unsafe path"),
        "bundle.zip/link.jpg": ("rejected", "a link inside the archive"),
        "bomb.zip/zeros.jpg": ("rejected", "zip bomb"),
    }


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with the hash of its bytes (folders: 'dir')."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# --- the corpus ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("corpus")
    photos = tmp_path / "photos"
    photos.mkdir()
    expected = build_corpus(photos, tmp_path)
    before = tree(tmp_path)
    instance = tmp_path / "session" / "instance"
    calls = []
    report = prepare_photos([photos, tmp_path / "missing.jpg"], instance, size=SIZE,
                            progress=lambda done, total: calls.append((done, total)))
    return dict(tmp_path=tmp_path, photos=photos, instance=instance, report=report, expected=expected,
                before=before, after=tree(tmp_path), calls=calls)


def results_by_name(report, photos: Path) -> dict[str, PhotoResult]:
    return {r.source.removeprefix(f"{photos}/"): r for r in report.results}


def test_every_file_gets_the_expected_verdict(corpus_run):
    results = results_by_name(corpus_run["report"], corpus_run["photos"])
    for name, (status, detail) in corpus_run["expected"].items():
        result = results[name]
        assert result.status == status, (name, result)
        if status == "rejected":
            assert detail in result.reason, (name, result.reason)
            assert result.output is None
    assert results[str(corpus_run["tmp_path"] / "missing.jpg")].reason == "no such file or folder"
    # hidden files, notebook checkpoints, macOS resource forks and captions are not candidates
    assert not any(".hidden" in n or "checkpoint" in n or "__MACOSX" in n or n.endswith(".txt") for n in results)
    assert set(results) == set(corpus_run["expected"]) | {str(corpus_run["tmp_path"] / "missing.jpg")}


def test_good_photos_are_prepared_square_in_true_colour(corpus_run):
    results = results_by_name(corpus_run["report"], corpus_run["photos"])
    for name, (status, colour) in corpus_run["expected"].items():
        if status != "accepted":
            continue
        result = results[name]
        with Image.open(corpus_run["instance"] / result.output) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB", name
            centre = np.asarray(image)[SIZE // 2 - 4:SIZE // 2 + 4, SIZE // 2 - 4:SIZE // 2 + 4].reshape(-1, 3).mean(axis=0)
        if colour is not None:
            assert np.abs(centre - np.array(colour)).max() < 30, (name, centre, colour)
    assert any("first one was used" in w for w in results["animated.gif"].warnings)
    assert results["bmp.bmp"].original_size == (80, 80)


def test_duplicates_are_flagged_not_silently_dropped(corpus_run):
    results = results_by_name(corpus_run["report"], corpus_run["photos"])
    assert results["copy_of_bmp.bmp"].duplicate_of == results["bmp.bmp"].output
    near = results["zz_near_duplicate.jpg"]
    assert near.status == "accepted" and near.duplicate_of == results["jpeg.jpg"].output
    assert any("almost the same" in w for w in near.warnings)
    # distinct photos are not confused with each other
    flagged = {n for n, r in results.items() if r.accepted and r.duplicate_of}
    assert flagged == {"zz_near_duplicate.jpg"}
    assert any("almost the same as another" in a for a in corpus_run["report"].advice)


def test_originals_untouched_and_nothing_written_outside_the_session(corpus_run):
    before, after = corpus_run["before"], corpus_run["after"]
    assert {k: v for k, v in after.items() if k in before} == before  # every original byte-identical
    new = set(after) - set(before)
    assert new, "nothing was prepared"
    assert all(n == "session" or n.startswith("session/instance") for n in new), sorted(new)
    assert not any("evil" in n for n in after)
    accepted = corpus_run["report"].accepted
    files_in_instance = {n.removeprefix("session/instance/") for n in new if n.startswith("session/instance/")}
    images = {r.output for r in accepted}
    assert {f for f in files_in_instance if not f.endswith(".txt")} == images  # no temp or scratch leftovers
    assert corpus_run["report"].photos_in_set == len(images)


def test_captions_travel_with_their_photos(corpus_run):
    results = results_by_name(corpus_run["report"], corpus_run["photos"])
    instance = corpus_run["instance"]
    for name, text in (("bmp.bmp", "photo of squidarth person, smiling"),
                       ("bundle.zip/inside/zip_ok.png", "photo of squidarth person on a boat")):
        caption = instance / Path(results[name].output).with_suffix(".txt")
        assert caption.read_text(encoding="utf-8").strip() == text
        assert results[name].caption == text
    assert not (instance / Path(results["tiff.tif"].output).with_suffix(".txt")).exists()


def test_unicode_names_stay_readable(corpus_run):
    result = results_by_name(corpus_run["report"], corpus_run["photos"])["фото-été-😀.png"]
    assert result.output.startswith("фото-été-") and (corpus_run["instance"] / result.output).is_file()


def test_report_is_json_and_a_table_and_progress_is_reported(corpus_run):
    report = corpus_run["report"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["accepted"] == len(report.accepted) and data["rejected"] == len(report.rejected)
    assert len(data["results"]) == len(report.results)
    table = report.to_table()
    assert "too small: 20×20 px" in table and "rejected" in table
    total = len(report.results)
    assert corpus_run["calls"][-1] == (total, total) and len(corpus_run["calls"]) == total


# --- orientation --------------------------------------------------------------------------------------

# What Pillow's exif_transpose does for each orientation, inverted, to write the "raw" sensor image.
_UNDO = {1: None, 2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
         5: Image.TRANSPOSE, 6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = Image.new("RGB", (96, 64), (90, 90, 90))
    upright.paste(RED, (0, 0, 24, 24))  # a marker in the top-left corner of the upright photo
    raw = upright if _UNDO[orientation] is None else upright.transpose(_UNDO[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = tmp_path / f"orientation-{orientation}.jpg"
    photo.write_bytes(encode(raw, "JPEG", quality=95, exif=exif.tobytes()))

    report = prepare_photos([photo], tmp_path / "instance", size=SIZE, crop="none")
    (result,) = report.results
    assert result.status == "accepted" and result.original_size == (96, 64)
    with Image.open(tmp_path / "instance" / result.output) as image:
        assert image.size == (96, 64)
        pixels = np.asarray(image).astype(int)
    corners = {"top-left": pixels[4, 4], "top-right": pixels[4, -5], "bottom-left": pixels[-5, 4], "bottom-right": pixels[-5, -5]}
    red = {k for k, (r, g, b) in corners.items() if r > 180 and g < 80}
    assert red == {"top-left"}, corners


# --- re-running, removing, uploads ---------------------------------------------------------------------

def test_rerun_adds_new_photos_and_remove_is_explicit(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.png").write_bytes(encode(texture(40 + i), "PNG"))
    (photos / "p0.txt").write_text("squidarth at the beach")
    instance = tmp_path / "session" / "instance"
    first = prepare_photos([photos], instance, size=SIZE)
    assert len(first.accepted) == 3 and first.photos_in_set == 3

    (photos / "p3.png").write_bytes(encode(texture(43), "PNG"))
    second = prepare_photos([photos], instance, size=SIZE)
    assert [Path(r.source).name for r in second.accepted] == ["p3.png"]
    assert all("already in the set" in r.reason for r in second.rejected) and len(second.rejected) == 3
    assert second.photos_in_set == 4

    p0 = next(r.output for r in first.results if r.source.endswith("p0.png"))
    original = (photos / "p0.png").read_bytes()
    remove_photo(instance, p0)
    assert not (instance / p0).exists() and not (instance / p0).with_suffix(".txt").exists()
    assert (photos / "p0.png").read_bytes() == original and (photos / "p0.txt").exists()
    third = prepare_photos([photos / "p0.png"], instance, size=SIZE)  # after removing, it can come back
    assert third.accepted[0].output == p0

    with pytest.raises(UserError):
        remove_photo(instance, "../photos/p1.png")
    with pytest.raises(UserError):
        remove_photo(instance, "no-such-photo.png")


def test_instance_folder_inside_a_source_folder_is_not_read_back(tmp_path):
    (tmp_path / "me.png").write_bytes(encode(texture(50), "PNG"))
    prepare_photos([tmp_path], tmp_path / "prepared", size=SIZE)
    again = prepare_photos([tmp_path], tmp_path / "prepared", size=SIZE)
    assert [Path(r.source).name for r in again.results] == ["me.png"] and again.photos_in_set == 1


def test_file_upload_values_v8_and_v7(tmp_path):
    v8 = (
        {"name": "a.png", "type": "image/png", "size": 1, "content": memoryview(encode(texture(60), "PNG")), "last_modified": 0},
        {"name": "a.txt", "type": "text/plain", "size": 1, "content": memoryview(b"squidarth in a hat")},
        {"name": "pics.zip", "type": "application/zip", "size": 1, "content": memoryview(zip_with_traps(tmp_path))},
    )
    v7 = {"b.jpg": {"metadata": {"name": "b.jpg", "type": "image/jpeg"}, "content": encode(texture(61), "JPEG")}}
    report = prepare_photos([v8, v7], tmp_path / "session" / "instance", size=SIZE)
    by_name = {r.source: r for r in report.results}
    assert by_name["a.png"].accepted and by_name["a.png"].caption == "squidarth in a hat"
    assert by_name["b.jpg"].accepted
    assert by_name["pics.zip/inside/zip_ok.png"].accepted
    assert "unsafe path" in by_name["pics.zip/../evil.jpg"].reason
    assert not any("evil" in str(p) for p in tmp_path.rglob("*"))


def test_collect_sources_bounds_what_an_archive_may_unpack(tmp_path):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # stored, not compressed: only the size limit can stop it
        zf.writestr("a.jpg", bytes(600_000))
        zf.writestr("b.jpg", bytes(600_000))
    sources = collect_sources([archive], tmp_path / "scratch", max_archive_bytes=1_000_000)
    errors = {Path(s.name).name: s.error for s in sources}
    assert errors["a.jpg"] is None and "unpacks to more than" in errors["b.jpg"]
    assert all(p.is_relative_to(tmp_path / "scratch") for p in (s.path for s in sources) if p is not None)


# --- decoding directly ---------------------------------------------------------------------------------

def test_load_photo_reads_bytes_and_paths_and_explains_failures(tmp_path):
    image = load_photo(heic())
    assert image.mode == "RGB" and image.size == (80, 80)
    path = tmp_path / "x.webp"
    path.write_bytes(encode(texture(70), "WEBP"))
    assert load_photo(path).size == (80, 80)
    with pytest.raises(PhotoError, match="too large to be a photo"):
        load_photo(png_declaring(100_000, 100_000))
    with pytest.raises(PhotoError, match="it is a PDF"):
        load_photo(b"%PDF-1.7 ...")
    with pytest.raises(PhotoError, match="corrupt or truncated"):
        load_photo(encode(texture(71, 300, 300), "PNG")[:2000])


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="multiple of 8"):
        prepare_photos([], tmp_path / "i", size=500)
    with pytest.raises(UserError, match="crop mode"):
        prepare_photos([], tmp_path / "i", crop="square")


# --- advice, captions, prompts -------------------------------------------------------------------------

def photo(name: str, **fields) -> PhotoResult:
    return PhotoResult(name, "accepted", output=f"{name}.png", **fields)


def test_advice_names_each_problem_of_the_set():
    varied = [photo(f"p{i}", face_found=True, face_box=(0.3, 0.2, 0.3 + w, 0.2 + w), scale=0.5)
              for i, w in enumerate(np.linspace(0.15, 0.6, 12))]
    assert advise(varied, "face") == []

    few = advise(varied[:4], "face")
    assert len(few) == 1 and "You have 4 photos" in few[0]

    same_framing = [photo(f"s{i}", face_found=True, face_box=(0.3, 0.2, 0.7, 0.6), scale=0.5) for i in range(12)]
    assert any("same size" in a for a in advise(same_framing, "face"))

    faceless = [photo(f"f{i}", face_found=False, scale=0.5) for i in range(12)]
    assert any("No face was found" in a for a in advise(faceless, "face"))
    assert advise(faceless, "object") == []  # no face is fine for an object
    some = varied[:10] + faceless[:2]
    assert any("2 of 12 photos show no face" in a for a in advise(some, "face"))

    blurry = varied[:11] + [photo("small", face_found=True, face_box=(0.2, 0.2, 0.5, 0.5), scale=2.0)]
    assert any("1 photo was smaller than the training size" in a for a in advise(blurry, "face"))
    dupes = varied[:11] + [photo("dupe", face_found=True, face_box=(0.2, 0.2, 0.5, 0.5), duplicate_of="p0.png", scale=0.5)]
    assert any("almost the same" in a for a in advise(dupes, "face"))
    assert "No photos" in advise([], "face")[0]


def test_caption_warnings_and_instance_prompt(tmp_path):
    for name, caption in (("a", "photo of Squidarth smiling"), ("b", "a man on a bike"), ("c", None), ("d", "squidarthx")):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        if caption is not None:
            (tmp_path / f"{name}.txt").write_text(caption)
    warnings = caption_warnings(tmp_path, "squidarth")
    assert len(warnings) == 2 and "b.png" in warnings[0] and "d.png" in warnings[1]
    assert instance_prompt("squidarth", "person") == "photo of squidarth person"
    assert instance_prompt("squidarth", "") == "photo of squidarth"
    assert instance_prompt("squidarth", "", preset="style") == "squidarth style"
    with pytest.raises(UserError):
        instance_prompt("  ", "person")


def test_without_a_face_detector_photos_are_prepared_with_detail_crops_and_one_message(tmp_path, monkeypatch, request):
    """OpenCV 5 ships no Haar cascades (no cv2.CascadeClassifier, no cv2.data): every photo is still prepared, cropped
    around its detail, with no per-photo 'no face' warning, and the report says once that face cropping is off."""
    import sys
    import types

    from dreamnb import crop

    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # a cv2 with none of the cascade API
    crop._face_cascade.cache_clear()
    request.addfinalizer(crop._face_cascade.cache_clear)  # later tests find the real detector again
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        texture(i, 120, 80).save(photos / f"wide-{i}.png")
    expected_crops = {"smart": {"detail", "centre"}, "center": {"centre"}}
    for mode, preset in (("smart", "face"), ("center", "face"), ("smart", "object")):
        report = prepare_photos([photos], tmp_path / f"instance-{mode}-{preset}", size=64, crop=mode, preset=preset)
        assert len(report.accepted) == 3 and not report.rejected
        assert {r.crop for r in report.results} <= expected_crops[mode]
        assert all(r.face_found is None and not any("face" in w for w in r.warnings) for r in report.results)
        assert [a for a in report.advice if "Face-aware cropping is off" in a] == [crop.FACE_DETECTOR_MISSING]
