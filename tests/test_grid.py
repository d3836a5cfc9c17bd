"""Grids: cells hold exactly the input images, labels are drawn, headers name what differs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamnb.grid import differing_settings, make_grid, show

CELL = 64


def noise_images(rows: int, cols: int, size=(CELL, CELL)) -> list[list[Image.Image]]:
    rng = np.random.default_rng(0)
    return [[Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(cols)]
            for _ in range(rows)]


def margins(grid: Image.Image, rows: int, cols: int, cell=(CELL, CELL)) -> tuple[int, int]:
    """Labels sit only above and left of the cells, so the margins are what the cells leave over."""
    return grid.width - cols * cell[0], grid.height - rows * cell[1]


def test_cells_are_the_input_images_and_labels_are_drawn():
    images = noise_images(2, 3)
    grid = make_grid(images, ["a photo of zwx man", "zwx man as an oil painting by Van Gogh"],
                     ["base", "attempt-1", "attempt-2"], title="zwx man: 3 attempts")
    left, top = margins(grid, 2, 3)
    assert left > 0 and top > 0
    pixels = np.asarray(grid)
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            cell = pixels[top + r * CELL: top + (r + 1) * CELL, left + c * CELL: left + (c + 1) * CELL]
            assert np.array_equal(cell, np.asarray(image)), (r, c)
    header = pixels[:top, left:]
    row_strip = pixels[top:, :left]
    for strip in (header, row_strip):
        dark = (strip.mean(axis=2) < 128).mean()
        assert 0.005 < dark < 0.5  # text, not an empty or a filled strip


def test_each_column_label_is_drawn_above_its_own_column():
    grid = make_grid(noise_images(1, 3), ["row"], ["first", "", "third"])
    left, top = margins(grid, 1, 3)
    header = np.asarray(grid)[:top].mean(axis=2) < 128
    ink_per_column = [header[:, left + c * CELL: left + (c + 1) * CELL].sum() for c in range(3)]
    assert ink_per_column[0] > 0 and ink_per_column[2] > 0 and ink_per_column[1] == 0


def test_long_labels_wrap_instead_of_widening_cells():
    long = "a photo of zwx man standing next to another man on a beach at sunset, 85mm"
    grid = make_grid(noise_images(1, 2), ["r"], [long, "short"])
    left, top = margins(grid, 1, 2)
    one_line = make_grid(noise_images(1, 2), ["r"], ["x", "short"])
    assert margins(one_line, 1, 2)[0] == left  # the cells kept their width
    assert top > 2 * margins(one_line, 1, 2)[1]  # the long label took several lines


def test_a_long_row_label_stays_within_its_row():
    long = "a very long prompt about many things that will never fit beside a tiny thirty-two pixel row"
    grid = make_grid(noise_images(2, 2, size=(32, 32)), [long, "short"], ["a", "b"], cell_size=32)
    left, top = margins(grid, 2, 2, cell=(32, 32))
    ink = np.asarray(grid).mean(axis=2) < 128
    assert not ink[:top, :left].any()  # nothing spilled up into the corner above the row labels
    assert ink[top:top + 32, :left].any() and ink[top + 32:, :left].any()
    assert left < 40 * 14  # cut short rather than a label strip as wide as the whole prompt


def test_no_labels_means_no_margins_and_cell_size_scales():
    images = noise_images(2, 2)
    assert margins(make_grid(images, [], []), 2, 2) == (0, 0)
    big = make_grid(images, [], [], cell_size=128)
    assert big.size == (256, 256)
    wide = make_grid(noise_images(1, 1, size=(64, 32)), [], [], cell_size=64)
    assert wide.size == (64, 64)
    assert np.asarray(wide)[:16].min() == 255  # letterboxed, centred, not stretched


def test_mismatched_labels_are_clear_errors():
    with pytest.raises(ValueError, match="2 row\\(s\\) but 1 row label"):
        make_grid(noise_images(2, 2), ["one"], ["a", "b"])
    with pytest.raises(ValueError, match="same number of images"):
        make_grid([noise_images(1, 2)[0], noise_images(1, 1)[0]], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="no images"):
        make_grid([], [], [])


def test_differing_settings_names_only_what_differs():
    configs = {
        "first": {"name": "first", "preset": "face", "unet_steps": 1500, "unet_lr": 2e-6, "resolution": 512,
                  "with_prior_preservation": True, "extra": {"seed": 1}},
        "second": {"name": "second", "preset": "face", "unet_steps": 3000, "unet_lr": 1e-6, "resolution": 512,
                   "with_prior_preservation": False, "extra": {"seed": 1}},
    }
    labels = differing_settings(configs)
    assert labels == {"first": "unet 1500 steps · unet lr 2e-6 · prior",
                      "second": "unet 3000 steps · unet lr 1e-6 · no prior"}
    assert differing_settings({"only": configs["first"]}) == {"only": ""}
    third = {**configs["first"], "extra": {"seed": 2, "new_knob": 0.5}}
    labels = differing_settings({"first": configs["first"], "third": third})
    assert labels == {"first": "seed 1", "third": "seed 2 · new knob 0.5"}


def test_show_displays_in_a_notebook_and_does_nothing_outside(monkeypatch, capsys):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    image = Image.new("RGB", (4, 4))
    show(image)  # no IPython kernel in pytest
    assert shown == [] and capsys.readouterr().out == ""
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    show(image)
    assert shown == [image]
