"""Labelled image grids: prompts x seeds for one attempt, attempts x prompts to compare attempts.

A grid is only useful if you can tell at a glance which cell is which, so labels use a real
TrueType font (DejaVu Sans, which matplotlib ships) sized to the cells, and long labels wrap.
Cells sit edge to edge with labels only above and to the left, so cell (r, c) starts at
(left_margin + c * cell_width, top_margin + r * cell_height).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)


def make_grid(
    images: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str | None = None,
    cell_size: int | tuple[int, int] | None = None,
) -> Image.Image:
    """Lay out `images[row][col]` with a label to the left of each row and above each column.

    `cell_size` (an int for square cells, or (width, height)) defaults to the first image's
    size; images of another size are scaled to fit their cell, centred. Empty label lists
    (or all-empty labels) leave out that margin.
    """
    if not images or not images[0]:
        raise ValueError("The grid has no images; pass at least one row with one image.")
    rows, cols = len(images), len(images[0])
    if any(len(row) != cols for row in images):
        raise ValueError(f"Every grid row must have the same number of images; got {[len(r) for r in images]}.")
    row_labels = list(row_labels) or [""] * rows
    col_labels = list(col_labels) or [""] * cols
    if len(row_labels) != rows:
        raise ValueError(f"The grid has {rows} row(s) but {len(row_labels)} row label(s); give one per row.")
    if len(col_labels) != cols:
        raise ValueError(f"The grid has {cols} column(s) but {len(col_labels)} column label(s); give one per column.")
    if cell_size is None:
        cell_w, cell_h = images[0][0].size
    elif isinstance(cell_size, int):
        cell_w = cell_h = cell_size
    else:
        cell_w, cell_h = cell_size

    # Labels stay readable on small cells and do not dominate large ones.
    font_size = max(12, min(32, round(cell_w / 18)))
    font = _font(font_size)
    title_font = _font(round(font_size * 1.3), bold=True)
    pad = max(4, font_size // 3)
    line_height = _line_height(font)

    # A row label may grow wider, never taller than its row; a column label never wider than its column.
    row_lines = max(1, cell_h // line_height)
    row_wrapped = [_wrap_within(label, font, max(cell_w, 10 * font_size), 30 * font_size, row_lines)
                   for label in row_labels]
    col_wrapped = [_wrap(label, font, cell_w - 4) for label in col_labels]
    widest_row_line = max((font.getlength(line) for lines in row_wrapped for line in lines), default=0)
    # Rewrap at the margin's final width, so a short label does not wrap beside a wide one.
    row_wrapped = [_wrap_within(label, font, widest_row_line, widest_row_line, row_lines) for label in row_labels]
    left = math.ceil(widest_row_line) + 2 * pad if widest_row_line else 0
    header_lines = max(len(lines) for lines in col_wrapped)
    header = header_lines * line_height + 2 * pad if header_lines else 0
    total_w = left + cols * cell_w
    title_lines = _wrap(title or "", title_font, total_w - 2 * pad)
    title_h = len(title_lines) * _line_height(title_font) + 2 * pad if title_lines else 0
    top = title_h + header

    grid = Image.new("RGB", (total_w, top + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        width = title_font.getlength(line)
        draw.text(((total_w - width) / 2, pad + i * _line_height(title_font)), line, font=title_font, fill=TEXT_COLOR)
    for c, lines in enumerate(col_wrapped):
        # Bottom-aligned, so labels of one and two lines all sit right above their column.
        y0 = title_h + header - pad - len(lines) * line_height
        for i, line in enumerate(lines):
            x = left + c * cell_w + (cell_w - font.getlength(line)) / 2
            draw.text((x, y0 + i * line_height), line, font=font, fill=TEXT_COLOR)
    for r, lines in enumerate(row_wrapped):
        y0 = top + r * cell_h + (cell_h - len(lines) * line_height) / 2
        for i, line in enumerate(lines):
            draw.text((pad, y0 + i * line_height), line, font=font, fill=TEXT_COLOR)
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            cell = _fit(image.convert("RGB"), cell_w, cell_h)
            x = left + c * cell_w + (cell_w - cell.width) // 2
            y = top + r * cell_h + (cell_h - cell.height) // 2
            grid.paste(cell, (x, y))
    return grid


def differing_settings(configs: dict[str, dict]) -> dict[str, str]:
    """Attempt name -> a short label of only the settings that differ between the attempts.

    E.g. {"a1": "unet 1500 steps · unet lr 2e-6", "a2": "unet 3000 steps · unet lr 1e-6"}: a
    column header says what makes that attempt different, not all thirty settings. Nested
    dicts are compared key by key; a setting missing from one attempt counts as differing.
    """
    flat = {name: _flatten(config) for name, config in configs.items()}
    keys: list[str] = []
    for config in flat.values():
        keys.extend(key for key in config if key not in keys and key not in _NOT_SETTINGS)
    differing = [key for key in keys if len({repr(config.get(key, _MISSING)) for config in flat.values()}) > 1]
    return {
        name: " · ".join(_describe(key, config[key]) for key in differing if config.get(key, "") != "")
        for name, config in flat.items()
    }


def show(image: Image.Image) -> None:
    """Show the image inline in a notebook; outside IPython do nothing."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is None:
        log.debug("not in IPython; not showing the image")
        return
    display(image)


# --- labels ------------------------------------------------------------------------------------

_MISSING = object()

# Keys that name or date an attempt rather than configure it: the same between two attempts
# is meaningless and different is a given.
_NOT_SETTINGS = {"name", "attempt", "created", "output_dir", "session", "version", "dreamnb_version", "parent_trained_text_encoder"}

# Short forms of the settings people change between attempts ({} is the value).
_SHORT_LABELS = {
    "parent": "from {}",
    "unet_steps": "unet {} steps",
    "max_train_steps": "{} steps",
    "unet_lr": "unet lr {}",
    "learning_rate": "lr {}",
    "te_steps": "te {} steps",
    "text_encoder_steps": "te {} steps",
    "te_lr": "te lr {}",
    "text_encoder_lr": "te lr {}",
    "resolution": "{}px",
    "preset": "{} preset",
    "lora_rank": "LoRA rank {}",
    "prior_loss_weight": "prior weight {}",
    "num_class_images": "{} class images",
    "train_batch_size": "batch {}",
    "batch_size": "batch {}",
}
_SHORT_FLAGS = {  # booleans read better as words
    "with_prior_preservation": ("prior", "no prior"),
    "prior": ("prior", "no prior"),
    "prior_preservation": ("prior", "no prior"),
    "lora": ("LoRA", "full fine-tune"),
    "train_text_encoder": ("te trained", "te frozen"),
    "gradient_checkpointing": ("grad ckpt", "no grad ckpt"),
}


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _describe(key: str, value: Any) -> str:
    short = key.rsplit(".", 1)[-1]
    if isinstance(value, bool) and short in _SHORT_FLAGS:
        return _SHORT_FLAGS[short][0 if value else 1]
    text = _format_value(value)
    if short in _SHORT_LABELS:
        return _SHORT_LABELS[short].format(text)
    return f"{short.replace('_', ' ')} {text}"


def _format_value(value: Any) -> str:
    """Numbers as people write them: 2e-6 rather than 2e-06 or 0.000002, 1500 rather than 1500.0."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        text = f"{value:.3g}"
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(_format_value(v) for v in value)
    return str(value)


# --- drawing -----------------------------------------------------------------------------------

def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's own data folder; Pillow's built-in font if that is missing."""
    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
    except (ImportError, OSError):
        log.warning("DejaVu Sans not found (is matplotlib installed?); grid labels use Pillow's default font")
        try:
            return ImageFont.load_default(size)
        except TypeError:  # Pillow < 10.1 has only the small bitmap font
            return ImageFont.load_default()


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _wrap(text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap by measured pixel width; a word too long for a line is cut by letters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for letter in word:
                if line and font.getlength(line + letter) > max_width:
                    lines.append(line)
                    line = ""
                line += letter
        if line:
            lines.append(line)
    return lines


def _wrap_within(text: str, font, min_width: float, max_width: float, max_lines: int) -> list[str]:
    """Wrap to the narrowest width (from min_width up) that fits max_lines; cut with "…" past max_width."""
    width = min_width
    while True:
        lines = _wrap(text, font, width)
        if len(lines) <= max_lines:
            return lines
        if width >= max_width:
            break
        width = min(max_width, width * 1.25)
    kept = lines[:max_lines]
    last = kept[-1]
    while last and font.getlength(last + "…") > max_width:
        last = last[:-1]
    kept[-1] = last.rstrip() + "…"
    return kept


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale an image to fit inside width x height, keeping its aspect ratio (unchanged if it fits exactly)."""
    if image.size == (width, height):
        return image
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)
