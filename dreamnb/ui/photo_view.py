"""Photos: upload or point at a folder/zip, prepare them into the session, look at the crops, edit captions.

The view only shows what `images.prepare_photos` decided (accepted crops, rejected files with the reason,
advice on the set) and edits the caption files beside the prepared copies; the user's own photos are
never touched. The crops and the report are plain outputs of the cell (see `base.Results`), so a saved
notebook still shows which photos went in and which were left out; the widget holds the caption editor.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from .. import fileio
from ..config import PRESETS
from ..crop import CROP_MODES
from ..errors import UserError
from ..grid import make_grid
from ..images import PrepareReport, caption_warnings, prepare_photos, prepared_files, remove_photo
from ..session import session_lock
from .base import HELP_STYLE, Results, View, current_text, follow_model, png_bytes, resolve_session, row, training_size

THUMBNAIL_PX = 128
SHEET_COLUMNS = 8
EDITOR_PX = 256


def split_paths(value: Any) -> list[str]:
    """Paths from the notebook parameter or the text box: one per line (or a list); blanks dropped."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
    return [str(item).strip() for item in items if str(item).strip()]


def contact_sheet(photos: list[Path], size: int = THUMBNAIL_PX, columns: int = SHEET_COLUMNS):
    """All prepared photos as one picture of thumbnails, rows of `columns`, titled with how many there are."""
    from PIL import Image

    thumbnails = []
    for photo in photos:
        with Image.open(photo) as opened:
            thumbnail = opened.convert("RGB")
        thumbnail.thumbnail((size, size))
        thumbnails.append(thumbnail)
    columns = min(columns, len(thumbnails))
    blank = Image.new("RGB", (size, size), "white")  # fills the last row
    thumbnails += [blank] * (-len(thumbnails) % columns)
    rows = [thumbnails[i:i + columns] for i in range(0, len(thumbnails), columns)]
    return make_grid(rows, [], [], title=f"{len(photos)} photos in the set", cell_size=size)


def report_markdown(report: PrepareReport) -> str:
    """What Prepare left out and why, its warnings and its advice on the set, as Markdown ('' when none)."""
    sections = [
        ("Not used", [f"`{r.source}`: {r.reason or 'rejected'}" for r in report.rejected]),
        ("Warnings", list(report.warnings)),
        ("Advice", list(report.advice)),
    ]
    return "\n\n".join(f"**{title}**\n\n" + "\n".join(f"- {item}" for item in items)
                        for title, items in sections if items)


class PhotosView(View):
    """Prepare photos into the session; `.report` is the last `PrepareReport`, `.photos` the prepared set."""

    def __init__(self, session: Any, instance_images: Any = None, *, size: int | None = None, crop: str = "smart",
                 preset: str = "face", token: Any = None, model: Any = None,
                 preparer: Callable[..., PrepareReport] = prepare_photos) -> None:
        super().__init__()
        self._session = session
        self._token = token
        self._prepare = preparer
        self.report: PrepareReport | None = None
        self.upload = W.FileUpload(accept="image/*,.heic,.heif,.zip,.txt", multiple=True, description="Upload photos")
        self.paths_text = W.Textarea(value="\n".join(split_paths(instance_images)), rows=2,
                                     placeholder="/content/drive/MyDrive/photos  (a folder or .zip; one per line)",
                                     layout=W.Layout(width="420px"))
        self.crop = W.Dropdown(options=list(CROP_MODES), value=crop, layout=W.Layout(width="120px"))
        self._auto_size = None if size else training_size(model, preset)  # the model's, while the cell gave none
        self.size = W.BoundedIntText(value=size or self._auto_size, min=64, max=2048, step=64, layout=W.Layout(width="120px"))
        follow_model(model, self._model_loaded)
        self.preset = W.Dropdown(options=list(PRESETS), value=preset, layout=W.Layout(width="120px"))
        self.prepare_button = W.Button(description="Prepare photos", button_style="primary", icon="images")
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="300px", visibility="hidden"))
        self.results = Results("photos", "report")  # the crops, and what was left out and why
        # caption editor: one photo, its caption, save
        self.caption_photo = W.Dropdown(options=[], description="Photo", layout=W.Layout(width="420px"))
        self.caption_image = W.Image(format="png", layout=W.Layout(width=f"{EDITOR_PX}px"))
        self.caption_text = W.Textarea(rows=3, layout=W.Layout(width="420px"),
                                       placeholder="empty: the instance prompt, e.g. 'photo of ohwx person'")
        self.caption_save = W.Button(description="Save caption", icon="save")
        self.caption_remove = W.Button(description="Remove from the set", icon="trash", button_style="warning")
        self.caption_notes = W.HTML()
        self.caption_photo.observe(lambda _: self._show_caption(), names="value")
        self.caption_save.on_click(lambda _: self.save_caption())
        self.caption_remove.on_click(lambda _: self.remove_selected())
        self.prepare_button.on_click(lambda _: self.prepare())
        editor = W.VBox([
            W.HTML(f'<b>Captions</b> <span style="{HELP_STYLE}">Optional: describe what differs in a photo '
                   '(clothes, place, light) and keep the token in it; photos without one use the instance prompt.</span>'),
            self.caption_photo,
            W.HBox([self.caption_image, W.VBox([self.caption_text, W.HBox([self.caption_save, self.caption_remove]),
                                                self.caption_notes])]),
        ])
        self.widget = W.VBox([
            row(self.upload, "Photos from this computer: JPEG, PNG, HEIC, or one .zip.", "Upload"),
            row(self.paths_text, "Or folders / .zip files already here (e.g. on Drive).", "Folder or zip"),
            row(self.size, "Square size of the prepared copies: the training resolution.", "Size"),
            row(self.crop, "smart: around the face or subject; center: the middle; none: pad to a square.", "Crop"),
            row(self.preset, "What the photos show; decides which checks run (faces for 'face').", "Subject"),
            W.HBox([self.prepare_button, self.progress]), self.status, self.error, editor, self.out,
        ])
        try:
            self.refresh()
        except UserError:  # the session is chosen in the cell above but not opened yet: nothing to show
            pass

    # --- what the user chose ------------------------------------------------------------------
    @property
    def instance_dir(self) -> Path:
        return resolve_session(self._session).instance_dir

    @property
    def photos(self) -> list[Path]:
        """The prepared photos in the session (earlier runs included)."""
        folder = self.instance_dir
        return prepared_files(folder) if folder.is_dir() else []

    @property
    def sources(self) -> list[Any]:
        """What Prepare will read: the uploads, then the typed paths."""
        return list(self.upload.value) + split_paths(self.paths_text.value)

    # --- actions ----------------------------------------------------------------------------------
    def prepare(self, *, raise_errors: bool = False) -> PrepareReport | None:
        def prepare() -> PrepareReport:
            sources = self.sources
            if not sources:
                raise UserError("There are no photos to prepare; upload some, or type the folder or .zip that holds them.")
            missing = [p for p in split_paths(self.paths_text.value) if not Path(p).expanduser().exists()]
            if missing:
                raise UserError(f"There is no file or folder at {missing[0]}; check the path (on Colab, is Drive mounted?).")
            self.progress.layout.visibility = "visible"
            try:
                with session_lock(resolve_session(self._session).path, "preparing photos"):
                    report = self._prepare(sources, self.instance_dir, size=self.size.value, crop=self.crop.value,
                                           preset=self.preset.value, progress=self._on_progress)
            finally:
                self.progress.layout.visibility = "hidden"
            self.report = report
            self.upload.value = ()  # prepared: pressing again must not add the same files twice
            self.show_status(f"{len(report.accepted)} added, {len(report.rejected)} rejected; "
                             f"{report.photos_in_set} photos in the set.", ok=bool(report.accepted))
            self.results.show("report", report_markdown(report))
            self.refresh()
            return report

        return self._act(prepare, raise_errors=raise_errors, busy=[self.prepare_button])

    def refresh(self) -> None:
        """Show the prepared photos as thumbnails and fill the caption editor's list."""
        photos = self.photos
        self.results.show("photos", contact_sheet(photos) if photos else None,
                          f"{len(photos)} prepared photos in {self.instance_dir}")
        names = [p.name for p in photos]
        selected = self.caption_photo.value if self.caption_photo.value in names else (names[0] if names else None)
        self.caption_photo.options = names
        self.caption_photo.value = selected
        self._show_caption()

    def save_caption(self, name: str | None = None, text: str | None = None) -> None:
        """Write the caption beside the prepared photo (empty: delete it, so the instance prompt is used)."""
        def save() -> None:
            photo = self._selected(name)
            caption = (self.caption_text.value if text is None else text).strip()
            caption_path = photo.with_suffix(".txt")
            if caption:
                fileio.write_text(caption_path, caption + "\n")
                self.show_status(f"Saved the caption of {photo.name}.", ok=True)
            else:
                caption_path.unlink(missing_ok=True)
                self.show_status(f"{photo.name} has no caption now; it uses the instance prompt.", ok=True)
            self._show_caption_notes()

        self._act(save)

    def remove_selected(self) -> None:
        """Take the selected prepared copy out of the set (the original photo stays where it was)."""
        def remove() -> None:
            photo = self._selected(None)
            remove_photo(self.instance_dir, photo.name)
            self.show_status(f"Removed {photo.name} from the set; your original photo is untouched.", ok=True)
            self.refresh()

        self._act(remove)

    # --- display ---------------------------------------------------------------------------------
    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done

    def _selected(self, name: str | None) -> Path:
        name = name or self.caption_photo.value
        if not name:
            raise UserError("No photo is selected; prepare some photos first, then pick one.")
        photo = self.instance_dir / name
        if not photo.is_file():
            raise UserError(f"{name} is no longer in the session; press Prepare again or pick another photo.")
        return photo

    def _model_loaded(self, base: Any) -> None:
        """A newly loaded base model brings its own training size (SDXL: 1024), unless the cell or the user chose one."""
        if self._auto_size is not None and self.size.value == self._auto_size:
            self._auto_size = training_size(base, self.preset.value)
            self.size.value = self._auto_size

    def _show_caption(self) -> None:
        name = self.caption_photo.value
        if not name:
            self.caption_image.value, self.caption_text.value = b"", ""
            return
        photo = self.instance_dir / name
        self.caption_image.value = png_bytes(photo, EDITOR_PX)
        caption_path = photo.with_suffix(".txt")
        self.caption_text.value = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
        self._show_caption_notes()

    def _show_caption_notes(self) -> None:
        token = current_text(self._token).strip()
        notes = caption_warnings(self.instance_dir, token) if token else []
        self.caption_notes.value = "<br>".join(f'<span style="color:#b26a00">{html.escape(n)}</span>' for n in notes)
