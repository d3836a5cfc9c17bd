"""The notebook widgets without a browser: build the views, set values, press buttons, check the core calls
made (fakes) and what is shown (labels, HTML, images, Output contents), errors included."""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import ipywidgets as W
import numpy as np
import pytest
import torch
from PIL import Image

import dreamnb.ui as ui
from dreamnb import colab
from dreamnb.attempts import Comparison, attempt_pipeline
from dreamnb.config import ConfigError, TrainConfig, help_for
from dreamnb.errors import UserError
from dreamnb.sample import SampleSettings, read_png_settings
from dreamnb.fileio import describe_size
from dreamnb.session import add_attempt, create_session, delete_attempt, disk_usage, open_session, update_attempt
from dreamnb.train import TrainEvent, TrainResult, append_log, continue_config, disk_estimate
from dreamnb.ui.base import StepFailed
from dreamnb.ui.config_form import ConfigForm
from dreamnb.ui.train_view import duration

from conftest import subject_photo


def text(widget: W.Widget) -> str:
    """What an HTML widget shows, as plain text."""
    return html.unescape(re.sub(r"<[^>]+>", " ", widget.value))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shown(view, slot: str) -> dict:
    """What the view keeps as a plain output of its cell in `slot` (a MIME bundle), failing when empty."""
    bundle = view.results.outputs[slot]
    assert bundle is not None, f"nothing in the {slot!r} output"
    return bundle


def shown_image(view, slot: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(shown(view, slot)["image/png"])))


def fake_model(source: str = "tiny/model"):
    """Stands in for a ModelView: what views need is `.base_model` (and `.source` for the session)."""
    return SimpleNamespace(base_model=SimpleNamespace(info=SimpleNamespace(source=source)), source=source)


def all_states(widget: W.Widget) -> str:
    """Every synced value of a widget tree, as text: what a notebook would save as widget state."""
    seen, parts, todo = set(), [], [widget]
    while todo:
        w = todo.pop()
        if id(w) in seen:
            continue
        seen.add(id(w))
        state = w.get_state()
        parts.append(repr({k: v for k, v in state.items() if not isinstance(v, (bytes, memoryview))}))
        for value in state.values():
            items = value if isinstance(value, (list, tuple)) else [value]
            todo += [i for i in items if isinstance(i, W.Widget)]
        todo += [c for c in getattr(w, "children", ()) if isinstance(c, W.Widget)]
    return "\n".join(parts)


# --- the settings form is generated from TrainConfig ---------------------------------------------------

def test_form_has_one_widget_per_setting_with_its_range_choices_and_help():
    form = ConfigForm(TrainConfig.from_preset("face", token="ohwx"))
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(form.widgets) == set(fields)
    assert isinstance(form.widgets["preset"], W.Dropdown) and form.widgets["preset"].options == ("face", "object", "style")
    assert isinstance(form.widgets["with_prior_preservation"], W.Checkbox)
    resolution = form.widgets["resolution"]
    meta = fields["resolution"].metadata
    assert (resolution.min, resolution.max, resolution.step) == (meta["min"], meta["max"], meta["step"])
    assert form.widgets["unet_steps"].max == fields["unet_steps"].metadata["max"]
    # the one-line help sits in the same row as the widget
    row_text = all_states(form.rows["unet_steps"])
    assert help_for("unet_steps")[:40] in row_text.replace("&#x27;", "'")
    assert form.config == TrainConfig.from_preset("face", token="ohwx")


def test_preset_change_refills_the_preset_values_but_keeps_the_token():
    form = ConfigForm(TrainConfig.from_preset("face", token="ohwx", unet_steps=99))
    form.widgets["preset"].value = "style"
    config = form.config
    assert config.unet_steps == 2000 and config.with_prior_preservation is False
    assert config.instance_prompt == "{token} style" and config.token == "ohwx"
    form.widgets["preset"].value = "face"
    assert form.values["instance_prompt"] == ""  # a value only the style preset sets goes back to the default
    assert form.rows["lora_rank"].layout.display == "none"
    form.widgets["method"].value = "lora"
    assert form.values["unet_lr"] == 1e-4 and form.rows["lora_rank"].layout.display == ""


def test_changes_are_validated_and_the_sentence_is_shown_beside_the_form():
    view = ui.TrainView(None, None, token="ohwx", preset="face")
    assert view.form.problem is None and not view.train_button.disabled
    view.form.widgets["token"].value = ""
    assert "The token is empty" in view.form.message.value
    assert view.train_button.disabled
    view.form.widgets["token"].value = "ohwx"
    view.form.widgets["class_word"].value = ""
    assert "Prior preservation needs a class word" in view.form.message.value
    view.form.widgets["with_prior_preservation"].value = False
    assert view.form.problem is None and "✓" in view.form.message.value and not view.train_button.disabled
    with pytest.raises(ConfigError):
        view.form.set_values({"unet_stepz": 3})


# --- base model -------------------------------------------------------------------------------------------

def test_model_view_loads_the_typed_source_and_reports_what_it_is(tmp_path):
    calls = []
    info = SimpleNamespace(describe=lambda: "Stable Diffusion 1.x, epsilon, 64 px")

    def loader(source, config=None, vae=None):
        calls.append((source, config, vae))
        return SimpleNamespace(info=info)

    view = ui.ModelView("some/model", loader=loader)
    with pytest.raises(UserError, match="press 'Load model'"):
        view.base_model
    assert "Hugging Face Hub" in view.kind.value
    view.source_text.value = str(tmp_path)
    assert "folder" in view.kind.value
    view.config_text.value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    view.load_button.click()
    assert calls == [(str(tmp_path), "stable-diffusion-v1-5/stable-diffusion-v1-5", None)]
    assert view.base_model.info is info and "Stable Diffusion 1.x" in view.status_text and view.error_text == ""


def test_model_view_shows_a_bad_source_as_one_sentence_beside_it(tmp_path):
    view = ui.ModelView(str(tmp_path / "missing.safetensors"))  # the real loader: fails before loading anything
    view.load_button.click()
    assert view.error_text.startswith("There is no file or folder at")
    assert view.out.outputs == ()  # no traceback for a user error
    assert view.loaded is None


def test_token_login_moves_the_token_into_the_kernel_and_keeps_it_nowhere(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("dreamnb.ui.model_view._stored_login", lambda: False)
    view = ui.ModelView("some/model", loader=lambda *a, **k: None)
    assert "No token" in view.token_state.value
    view.token_box.value = "hf_secretvalue123"  # pasted: applied when the box commits, no button needed
    assert os.environ["HF_TOKEN"] == "hf_secretvalue123"
    assert view.token_box.value == "" and "hf_secretvalue123" not in all_states(view.widget)
    assert "available" in view.token_state.value
    view.token_button.click()  # the click that took the focus from the box: nothing more to do, no error
    assert view.error_text == ""
    view.token_button.click()  # nothing typed
    assert "token box is empty" in view.error_text


# --- session ------------------------------------------------------------------------------------------------

def test_session_view_creates_a_new_session_and_lists_existing_ones_with_attempts(tmp_path):
    old = create_session(tmp_path / "cat", base_model="x")
    add_attempt(old, "first")
    view = ui.SessionView(tmp_path, "me", model=fake_model("my/model"))
    assert view.mode.value == "new" and view.existing_names == ["cat"]
    view.open_button.click()
    assert view.session.path == tmp_path / "me" and open_session(tmp_path / "me").base_model == "my/model"
    # the same name again is refused beside the widget
    again = ui.SessionView(tmp_path, "")
    again.name_text.value = "me"
    again.open_button.click()
    assert "already exists" in again.error_text
    # resume: the dropdown shows the attempts
    again.mode.value = "resume"
    again.existing.value = "cat"
    assert "first (new, 0 steps)" in text(again.details) and again.open_button.description == "Open session"
    again.open_button.click()
    assert again.session.name == "cat" and again.error_text == ""


def test_session_view_takes_its_root_from_the_setup_view(tmp_path):
    env = ui.SetupView(tmp_path / "root", gpu=colab.GpuSummary("no GPU", 0, 0), in_colab=False)
    assert env.drive_button.layout.display == "none"
    view = ui.choose_session(env, "s1", auto=True)
    assert view.session.path == tmp_path / "root" / "s1"
    assert ui.choose_session(env, "s1", auto=True).session.path == view.session.path  # resumes, not an error


# --- photos ----------------------------------------------------------------------------------------------------

@pytest.fixture
def session(tmp_path):
    return create_session(tmp_path / "session")


def attempt_on_disk(session, name, files: dict[str, int], *, status="finished", steps=10, parent=None):
    """An attempt whose folder holds files of known sizes ({path in the attempt folder: bytes})."""
    add_attempt(session, name)
    update_attempt(session, name, status=status, steps_done=steps, parent=parent)
    for relative, size in files.items():
        path = session.attempt_dir(name) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def checkpoint_files(step: int, weights: int, optimizer: int = 0) -> dict[str, int]:
    folder = f"checkpoints/step-{step:06d}"
    return {f"{folder}/state.json": 2, f"{folder}/unet.safetensors": weights,
            **({f"{folder}/optimizer.pt": optimizer} if optimizer else {})}


@pytest.fixture
def untidy(session):
    """a1: finished, final weights and two checkpoints (one still with optimizer state); a2: continued from a1@4;
    a3: stopped at step 2, resumable from its checkpoint."""
    attempt_on_disk(session, "a1", {"final/unet.safetensors": 1000, "log.csv": 40, **checkpoint_files(4, 300, 500),
                                    **checkpoint_files(8, 300)})
    attempt_on_disk(session, "a2", {"final/unet.safetensors": 200}, parent="a1@4")
    attempt_on_disk(session, "a3", checkpoint_files(2, 300, 100), status="interrupted", steps=2)
    return session


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def inside(files: set[Path], folder: Path) -> set[Path]:
    return {f for f in files if folder in f.parents}


def test_session_view_shows_each_attempts_lineage_and_disk_use(untidy, tmp_path):
    view = ui.choose_session(tmp_path, "session", auto=True)
    disk = view.housekeeping
    usage = disk_usage(untidy)
    assert disk.usage == usage and usage["a1"].checkpoints == {4: 802, 8: 302} and usage["a1"].optimizer == 500
    table = shown(view, "attempts")["text/markdown"].splitlines()  # a plain output of the cell
    rows = {line.split(" | ")[0].lstrip("| ").split(" (")[0]: line for line in table if line.startswith("| a")}
    assert rows["a1"].split(" | ")[1:] == ["base model", "1.0 KB", "step 4: 802 bytes<br>step 8: 302 bytes",
                                           "500 bytes", "40 bytes", f"**{describe_size(usage['a1'].total)}** |"]
    assert " | a1@4 | 200 bytes | — | 0 bytes |" in rows["a2"]
    total = sum(u.total for u in usage.values())
    assert table[-1] == (f"**{describe_size(total)}** in attempts, of which 600 bytes is optimizer state "
                         "(in checkpoints; only resuming a stopped attempt needs it).")
    assert [label for label, _ in disk.attempt.options][1] == "a2 (finished, 10 steps) from a1@4"
    assert disk.attempt.value == "a3" and [v for _, v in disk.checkpoints.options] == [2]
    disk.attempt.value = "a1"
    assert disk.checkpoints.options == (("step 8 (302 bytes)", 8), ("step 4 (802 bytes)", 4))
    # resuming the session from the list shows the lineage too
    again = ui.SessionView(tmp_path, "session")
    assert "a2 (finished, 10 steps) from a1@4" in text(again.details)


def test_deleting_checkpoints_asks_first_then_removes_exactly_what_it_said(untidy, tmp_path):
    disk = ui.choose_session(tmp_path, "session", auto=True).housekeeping
    before = files_under(untidy.path)
    disk.attempt.value = "a1"
    disk.delete_checkpoints_button.click()
    assert "Pick the checkpoints of a1" in disk.error_text
    disk.checkpoints.value = (4,)
    disk.delete_checkpoints_button.click()
    assert files_under(untidy.path) == before and disk.confirm_box.layout.display == ""  # only asked
    assert text(disk.confirm_text).strip() == "Delete the checkpoint(s) of a1 at step 4? This frees 802 bytes and cannot be undone."
    disk.checkpoints.value = (8,)  # another pick: the question is gone, and confirming does nothing
    assert disk.confirm_box.layout.display == "none" and disk.confirm() is None and files_under(untidy.path) == before
    disk.checkpoints.value = (4,)
    disk.delete_checkpoints_button.click()
    disk.confirm_button.click()
    step_4 = untidy.attempt_dir("a1") / "checkpoints" / "step-000004"
    assert before - files_under(untidy.path) == inside(before, step_4) and not step_4.exists()
    assert disk.status_text == "Deleted 1 checkpoint(s) of a1; freed 802 bytes." and disk.confirm_box.layout.display == "none"
    assert disk.usage == disk_usage(untidy) and 4 not in disk.usage["a1"].checkpoints
    assert "step 4:" not in shown(disk, "attempts")["text/markdown"]
    # the newest checkpoint of a stopped attempt is what it resumes from: the question says so
    disk.attempt.value = "a3"
    disk.checkpoints.value = (2,)
    disk.delete_checkpoints_button.click()
    assert "(a3 then cannot be resumed from step 2)" in text(disk.confirm_text)
    disk.cancel_button.click()
    assert disk.status_text == "Nothing was deleted." and (untidy.attempt_dir("a3") / "checkpoints" / "step-000002").is_dir()


def test_deleting_an_attempt_asks_first_and_frees_what_it_said(untidy, tmp_path):
    disk = ui.choose_session(tmp_path, "session", auto=True).housekeeping
    size = disk_usage(untidy)["a2"].total
    disk.attempt.value = "a2"
    disk.delete_attempt_button.click()
    assert untidy.attempt_dir("a2").is_dir() and [a.name for a in open_session(untidy.path).attempts] == ["a1", "a2", "a3"]
    assert text(disk.confirm_text).strip() == ("Delete a2 with its final weights, 0 checkpoint(s), samples and log? "
                                               f"This frees {describe_size(size)} and cannot be undone.")
    disk.confirm_button.click()
    assert not untidy.attempt_dir("a2").exists() and [a.name for a in open_session(untidy.path).attempts] == ["a1", "a3"]
    assert disk.status_text == f"Deleted a2; freed {describe_size(size)}." and set(disk.usage) == {"a1", "a3"}
    assert untidy.attempt_dir("a1").is_dir() and "| a2 " not in shown(disk, "attempts")["text/markdown"]


def test_free_space_drops_the_optimizer_state_of_finished_attempts_and_says_how_much(untidy, tmp_path):
    disk = ui.choose_session(tmp_path, "session", auto=True).housekeeping
    disk.free_button.click()
    assert disk.status_text == "Freed 500 bytes of optimizer state from finished attempts."
    assert not (untidy.attempt_dir("a1") / "checkpoints" / "step-000004" / "optimizer.pt").exists()
    assert (untidy.attempt_dir("a1") / "checkpoints" / "step-000004" / "unet.safetensors").is_file()
    assert (untidy.attempt_dir("a3") / "checkpoints" / "step-000002" / "optimizer.pt").is_file()  # a3 may be resumed
    assert disk.usage["a1"].optimizer == 0 and "of which 100 bytes is optimizer state" in shown(disk, "attempts")["text/markdown"]
    disk.free_button.click()
    assert disk.status_text == "Nothing to free: finished attempts keep no optimizer state."


def test_photos_view_prepares_uploads_and_shows_crops_rejections_and_advice(session):
    files = [(f"me-{i}.png", png(subject_photo(i, 96))) for i in range(3)] + [("notes.png", b"hello")]
    view = ui.PhotosView(session, size=64, crop="center", preset="object")
    # what the browser sends when files are picked (ipywidgets' own upload tests do the same)
    view.upload.set_state({"value": [{"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                                      "last_modified": 1_700_000_000_000} for name, data in files]})
    assert len(view.sources) == 4
    view.prepare_button.click()
    assert view.error_text == ""
    assert len(view.report.accepted) == 3 and [r.source for r in view.report.rejected] == ["notes.png"]
    # the report and the crops are plain outputs of the cell, not widgets: they stay in a saved notebook
    report = shown(view, "report")["text/markdown"]
    assert "`notes.png`" in report and view.report.rejected[0].reason in report
    assert "add more" in report  # 3 photos: too few
    assert "3 added, 1 rejected" in view.status_text
    sheet = shown_image(view, "photos")
    assert len(view.photos) == 3 and sheet.width == 3 * 128 and sheet.height > 128  # three thumbnails and a title
    assert "3 prepared photos" in shown(view, "photos")["text/plain"]
    assert view.upload.value == ()  # pressing again must not add the same files twice


def test_photos_view_without_photos_or_with_a_wrong_path_says_so(session, tmp_path):
    view = ui.PhotosView(session, size=64)
    view.prepare_button.click()
    assert "no photos to prepare" in view.error_text
    view.paths_text.value = str(tmp_path / "nope")
    view.prepare_button.click()
    assert view.error_text.startswith("There is no file or folder at")
    with pytest.raises(StepFailed, match="no photos"):
        ui.photos(session, None, size=64, auto=True)


def test_caption_editor_saves_and_clears_captions_and_warns_without_the_token(session, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        subject_photo(i, 96).save(folder / f"p{i}.png")
    view = ui.photos(session, str(folder), size=64, crop="center", preset="object", token="ohwx", auto=True)
    first = view.photos[0]
    assert view.caption_photo.value == first.name and view.caption_image.value
    view.caption_text.value = "photo of ohwx thing on a beach"
    view.caption_save.click()
    assert first.with_suffix(".txt").read_text().strip() == "photo of ohwx thing on a beach"
    assert view.caption_notes.value == ""
    view.caption_text.value = "a thing on a beach"
    view.caption_save.click()
    assert "does not mention 'ohwx'" in text(view.caption_notes)
    view.caption_text.value = ""
    view.caption_save.click()
    assert not first.with_suffix(".txt").exists() and "instance prompt" in view.status_text
    # remove the second photo from the set; the original stays, and the photos shown are the two left
    second = view.caption_photo.value = view.photos[1].name
    view.caption_remove.click()
    assert second not in [p.name for p in view.photos] and len(list(folder.glob("*.png"))) == 3
    assert shown_image(view, "photos").width == 2 * 128


# --- token check ---------------------------------------------------------------------------------------------------

def test_token_check_shows_the_verdict_as_you_type_and_suggestions_replace_the_word():
    view = ui.TokenView(None, "ohwx", delay=0)
    assert view.report.verdict == "good" and "GOOD" in view.verdict.value and view.suggestions.children == ()
    view.text.value = "Sid Shanker"
    assert view.report.verdict == "generic" and "TOO COMMON" in view.verdict.value
    buttons = [c for c in view.suggestions.children if isinstance(c, W.Button)]
    assert buttons
    buttons[0].click()
    assert view.value == buttons[0].description and view.report.text == buttons[0].description
    assert view.report.verdict == "good"


def test_token_check_waits_for_a_pause_in_typing():
    calls = []

    def checker(text, tokenizer, text_encoder=None):
        calls.append(text)
        return SimpleNamespace(text=text, verdict="good", pieces=[], reasons=[], suggestions=[])

    view = ui.TokenView(None, "", delay=0.15, checker=checker)
    for partial in ("o", "oh", "ohw", "ohwx"):
        view.text.value = partial
    time.sleep(0.5)
    assert calls == ["ohwx"]


# --- training ----------------------------------------------------------------------------------------------------------

class FakeTrainer:
    """Emits the events a real run emits; optionally loops until Stop."""

    def __init__(self, until_stopped: bool = False, raises: Exception | None = None):
        self.calls, self.until_stopped, self.raises = [], until_stopped, raises
        self.started = threading.Event()

    def __call__(self, session, config, model, *, attempt=None, resume=False, callback=None, stop=None, progress=True):
        self.calls.append(dict(session=session, config=config, model=model, attempt=attempt, resume=resume, stop=stop, progress=progress))
        if self.raises:
            raise self.raises
        emit = callback
        folder = session.attempt_dir("attempt-1")  # log.csv and previews, as the trainer writes them
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        emit(TrainEvent("start", step=0, total_steps=10, message="Training attempt-1 on cpu"))
        emit(TrainEvent("phase", step=0, total_steps=10, phase="unet", message="unet phase: 10 steps at lr 0.001"))
        step = 0
        while step < 10 or self.until_stopped:
            step += 1
            emit(TrainEvent("step", step=min(step, 10), total_steps=10, phase="unet", loss=1.0 / step, lr=1e-3,
                            elapsed_s=step * 6.0, eta_s=(10 - min(step, 10)) * 6.0))
            append_log(folder, step, "unet", 1.0 / step, 1e-3, step * 6.0)
            self.started.set()
            if stop is not None and stop.is_set():
                emit(TrainEvent("stopped", step=step, total_steps=10, message=f"Stopped at step {step} of 10; saved step-{step}."))
                return TrainResult("attempt-1", "interrupted", step, 10, None, f"Stopped at step {step} of 10; saved step-{step}.")
            if self.until_stopped:
                time.sleep(0.01)
            if step == 5:
                subject_photo(5, 96).save(folder / "samples" / "step-000005.png")
                emit(TrainEvent("sample", step=5, total_steps=10, images=[subject_photo(0), subject_photo(1)]))
        emit(TrainEvent("done", step=10, total_steps=10, message="Finished 10 steps."))
        return TrainResult("attempt-1", "finished", 10, 10, Path("final"), "Finished 10 steps.", [(10, 0.1)])


def test_train_button_runs_the_trainer_with_the_form_and_draws_its_events(session):
    trainer = FakeTrainer()
    model = fake_model()
    token = ui.TokenView(None, "ohwx", delay=0)
    view = ui.TrainView(session, model, token=token, preset="object", class_word="thing", trainer=trainer)
    token.text.value = "zwxq"  # the form follows the token check box
    view.form.widgets["unet_steps"].value = 10
    view.train_button.click()
    view.wait(10)
    call = trainer.calls[0]
    assert call["config"].token == "zwxq" and call["config"].unet_steps == 10 and call["config"].class_word == "thing"
    assert call["session"] is session and call["model"] is model.base_model
    assert call["stop"] is view.stop_event and call["progress"] is False and call["resume"] is False
    assert view.result.status == "finished" and view.attempt == "attempt-1"
    live = view.live
    assert (live.bar.value, live.bar.max, live.bar.bar_style) == (10, 10, "success")
    assert [s for s, _, _ in live.losses] == list(range(1, 11))
    assert Image.open(io.BytesIO(live.chart.value)).width > 300 and len(live.sample_images) == 2  # drawn while it ran
    # once the run is over, its loss curve (read back from log.csv) and newest previews are plain outputs of the
    # cell, and the live view no longer shows them too
    assert shown_image(view, "loss curve").width > 300 and "loss curve of attempt-1" in shown(view, "loss curve")["text/plain"]
    assert shown_image(view, "previews").size == (96, 96)
    assert live.chart.layout.display == "none" and live.samples.children == ()
    assert "Finished 10 steps." in view.status_text and view.error_text == ""
    assert "unet phase" in live.messages.value
    assert not view.train_button.disabled and view.stop_button.disabled


def test_live_line_says_step_loss_and_time_left():
    live = ui.LiveView(redraw_s=100)
    live.handle(TrainEvent("step", step=30, total_steps=100, phase="text_encoder", loss=0.25, elapsed_s=90, eta_s=210))
    assert live.line.value == "step 30 / 100 · text encoder · loss 0.2500 · 2 min so far · about 4 min left"
    assert duration(4000) == "1 h 06 min" and duration(12) == "12 s"


def test_stop_sets_the_event_and_the_run_ends_interrupted(session):
    trainer = FakeTrainer(until_stopped=True)
    view = ui.TrainView(session, fake_model(), token="ohwx", preset="object", class_word="thing", trainer=trainer)
    view.train_button.click()
    assert trainer.started.wait(10) and view.running and not view.stop_button.disabled and view.train_button.disabled
    view.stop_button.click()
    assert view.stop_event.is_set()
    view.wait(10)
    assert not view.running and view.result.status == "interrupted"
    assert view.live.bar.bar_style == "warning" and "Stopped at step" in view.status_text


def test_resume_continues_the_stopped_attempt_and_refuses_a_finished_one(session):
    add_attempt(session, "attempt-1")
    update_attempt(session, "attempt-1", status="interrupted", steps_done=4)
    trainer = FakeTrainer()
    view = ui.TrainView(session, fake_model(), token="ohwx", trainer=trainer)
    view.resume_button.click()
    view.wait(10)
    assert trainer.calls[0]["resume"] is True and trainer.calls[0]["attempt"] == "attempt-1"
    update_attempt(session, "attempt-1", status="finished")
    view.resume_button.click()
    assert "has already finished" in view.error_text and len(trainer.calls) == 1


def test_training_errors_show_as_a_sentence_and_bugs_keep_their_traceback(session):
    view = ui.TrainView(session, fake_model(), token="ohwx", trainer=FakeTrainer(raises=ConfigError("The session has no prepared photos; add some first.")))
    view.train_button.click()
    view.wait(10)
    assert view.error_text == "The session has no prepared photos; add some first." and view.out.outputs == ()
    view = ui.TrainView(session, fake_model(), token="ohwx", trainer=FakeTrainer(raises=RuntimeError("boom")))
    view.start(background=False)
    assert "unexpectedly (RuntimeError: boom)" in view.error_text
    assert "Traceback" in view.out.outputs[0]["text"]
    with pytest.raises(StepFailed, match="boom"):
        view.start(background=False, raise_errors=True)


def test_train_needs_an_open_session_and_a_loaded_model():
    sessions = ui.SessionView("/nonexistent-root", "x")
    view = ui.TrainView(sessions, ui.ModelView("a/b", loader=lambda *a, **k: None), token="ohwx", trainer=FakeTrainer())
    view.train_button.click()
    assert "No session is open yet" in view.error_text and view.thread is None


def test_a_real_tiny_training_run_from_the_view(photo_session, base_sd1):
    view = ui.TrainView(photo_session, base_sd1, token="zwx", preset="object", class_word="thing", resolution=64, seed=0,
                        with_prior_preservation=False, unet_steps=12, unet_lr=1e-3, text_encoder_steps=0,
                        checkpoint_every=0, log_every=3, sample_every=12)
    view.train_button.click()
    result = view.wait(600)  # seconds on an idle machine; generous for a loaded CI runner
    assert result is not None, "training did not finish within 600 s"
    assert result.status == "finished", view.error_text
    assert (photo_session.attempt_dir(result.attempt) / "final" / "unet").is_dir()
    assert [s for s, _, _ in view.live.losses] == [3, 6, 9, 12] and view.live.bar.value == 12
    assert open_session(photo_session.path).attempt(result.attempt).status == "finished"
    assert shown_image(view, "loss curve").width > 300
    with Image.open(photo_session.attempt_dir(result.attempt) / "samples" / "step-000012.png") as previews:
        assert shown_image(view, "previews").size == previews.size  # the trainer's own labelled preview grid


def finished_with_config(session, name, config: TrainConfig, steps: int = 10, checkpoints=()):
    """A finished attempt as continue_config reads it: config.json, final/ and complete checkpoints."""
    attempt_on_disk(session, name, {"final/unet.safetensors": 1, "config.json": 0,
                                    **{k: v for step in checkpoints for k, v in checkpoint_files(step, 1).items()}},
                    steps=steps)
    (session.attempt_dir(name) / "config.json").write_text(json.dumps(config.to_dict()))


def test_start_from_an_attempt_fills_its_settings_and_trains_with_what_the_form_changed(session, monkeypatch):
    parent = TrainConfig.from_preset("object", token="zwx", class_word="thing", unet_steps=800, unet_lr=3e-6)
    finished_with_config(session, "attempt-1", parent, steps=1000, checkpoints=[500])
    trainer = FakeTrainer()
    view = ui.TrainView(session, fake_model(), token="ohwx", preset="face", class_word="person", unet_steps=1234, trainer=trainer)
    assert view.start_from.ref == "base" and view.start_note.value == "" and view.start_from.step.disabled
    assert [v for _, v in view.start_from.attempt.options] == ["base", "attempt-1"]
    assert "load the base model" in text(view.disk_line)
    view.form.widgets["unet_steps"].value = 99  # typed for a run from the base model: kept for when it is picked again
    view.start_from.attempt.value = "attempt-1"
    assert [v for _, v in view.start_from.step.options] == ["final", 500]
    view.start_from.step.value = 500
    values = view.form.values
    assert (values["parent"], values["token"], values["unet_lr"], values["preset"]) == ("attempt-1@500", "zwx", 3e-6, "object")
    assert values["unet_steps"] == 1234 and values["text_encoder_steps"] == 0 and values["parent_trained_text_encoder"]
    assert values["class_word"] == "person"  # the cell's own settings go on top of the attempt's
    assert "Continues attempt-1@500 with its settings: the step counts are steps more" in text(view.start_note)
    assert view.form.widgets["method"].disabled and view.form.widgets["lora_rank"].disabled
    view.form.widgets["unet_steps"].value = 200
    view.form.widgets["with_prior_preservation"].value = False
    view.start(background=False)
    config = trainer.calls[0]["config"]
    assert config == continue_config(session, "attempt-1@500", unet_steps=200, with_prior_preservation=False, class_word="person")
    assert config.text_encoder_steps == 0 and config.parent == "attempt-1@500" and view.error_text == ""
    view.start_from.attempt.value = "base"  # back to the base model: the form as it was, free to change again
    assert view.form.values["unet_steps"] == 99 and view.form.values["parent"] == "" and not view.form.widgets["method"].disabled
    assert view.start_note.value == ""


def test_start_from_in_the_cell_and_its_mistakes(session):
    parent = TrainConfig.from_preset("object", token="zwx", class_word="thing", method="lora")
    finished_with_config(session, "attempt-1", parent)
    trainer = FakeTrainer()
    view = ui.TrainView(session, fake_model(), start_from="attempt-1", unet_steps=50, trainer=trainer)
    assert view.start_from.ref == "attempt-1" and view.form.values["parent"] == "attempt-1@10"
    assert view.form.values["method"] == "lora" and view.form.widgets["method"].disabled
    view.start(background=False, raise_errors=True)
    assert trainer.calls[0]["config"] == continue_config(session, "attempt-1", unet_steps=50)
    wrong = ui.TrainView(session, fake_model(), start_from="attempt-1@300", trainer=trainer)
    assert wrong.error_text == "Attempt 'attempt-1' has no checkpoint at step 300 (it has: none); fix start_from= in this cell."
    with pytest.raises(StepFailed, match="no checkpoint at step 300"):
        wrong.start(background=False, raise_errors=True)
    refused = ui.TrainView(session, fake_model(), start_from="attempt-1", lora_rank=4, trainer=trainer)
    assert "keeps attempt-1's lora_rank" in refused.error_text and len(trainer.calls) == 1
    delete_attempt(session, "attempt-1")  # e.g. in the session section, after it was picked here
    view.train_button.click()
    assert view.error_text == "attempt-1 is no longer in this session (deleted?); pick what to start from again."
    assert len(trainer.calls) == 1 and view.start_from.ref == "base"


def test_on_colab_the_runtime_can_disconnect_once_training_ends_and_its_results_are_kept(session, monkeypatch):
    kept_when_disconnected = []
    monkeypatch.setattr(colab, "disconnect_runtime", lambda: kept_when_disconnected.append(view.results.outputs["loss curve"]))
    view = ui.TrainView(session, fake_model(), token="ohwx", preset="object", class_word="thing", trainer=FakeTrainer(), in_colab=True)
    assert view.disconnect_row.layout.display == "" and not view.disconnect.value  # opt-in
    view.start(background=False)
    assert kept_when_disconnected == []
    view.disconnect.value = True
    view.start(background=False)
    assert len(kept_when_disconnected) == 1 and kept_when_disconnected[0] is not None  # after the loss curve was kept
    failing = ui.TrainView(session, fake_model(), token="ohwx", trainer=FakeTrainer(raises=ConfigError("No photos.")), in_colab=True)
    failing.disconnect.value = True
    failing.start(background=False)
    assert failing.error_text == "No photos." and len(kept_when_disconnected) == 2  # a failed run ends too
    assert ui.TrainView(session, fake_model(), token="ohwx", in_colab=False).disconnect_row.layout.display == "none"


def test_disconnect_runtime_unassigns_only_on_colab(monkeypatch):
    colab.disconnect_runtime()  # outside Colab: nothing happens, nothing fails
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", SimpleNamespace(runtime=SimpleNamespace(unassign=lambda: calls.append(1))))
    colab.disconnect_runtime()
    assert calls == [1]
    monkeypatch.setitem(sys.modules, "google.colab", SimpleNamespace(runtime=SimpleNamespace(unassign=lambda: 1 / 0)))
    colab.disconnect_runtime()  # a Colab that cannot: logged, never raised after a finished run


@pytest.fixture
def trained_copy(trained, tmp_path):
    """A copy of the `trained` session, for tests that add attempts to it."""
    return open_session(shutil.copytree(trained.path, tmp_path / "copy"))


def test_continuing_a_checkpoint_from_the_train_view_trains_more_steps_and_records_the_parent(trained_copy, base_sd1):
    view = ui.TrainView(trained_copy, base_sd1, token="zwx")
    view.start_from.attempt.value = "attempt-1"
    view.start_from.step.value = 4
    during, after = disk_estimate(view.form.config, base_sd1)
    assert text(view.disk_line).strip() == (f"Disk: up to {describe_size(during)}; {describe_size(after)} once finished and its "
                                            "optimizer state freed (session section, Free space).")
    view.form.widgets["text_encoder_steps"].value = 2  # the disk line follows the settings: now the text encoder is saved too
    assert disk_estimate(view.form.config, base_sd1)[1] > after and describe_size(disk_estimate(view.form.config, base_sd1)[1]) in text(view.disk_line)
    view.form.widgets["text_encoder_steps"].value = 0
    view.form.widgets["unet_steps"].value = 3
    result = view.start(background=False, raise_errors=True)
    assert (result.status, result.attempt, result.steps_done) == ("finished", "attempt-2", 3)
    session = open_session(trained_copy.path)
    assert session.attempt("attempt-2").parent == "attempt-1@4"
    saved = json.loads((session.attempt_dir("attempt-2") / "config.json").read_text())
    assert (saved["parent"], saved["unet_steps"], saved["unet_lr"], saved["token"]) == ("attempt-1@4", 3, 1e-3, "zwx")
    # listed at once, to be continued in turn
    assert "attempt-2 (finished, 3 steps) from attempt-1@4" in [label for label, _ in view.start_from.attempt.options]


# --- compare and export -------------------------------------------------------------------------------------------------

def finished_session(session, *names):
    for name in names:
        add_attempt(session, name)
        update_attempt(session, name, status="finished", steps_done=10)
    return session


def test_compare_view_calls_the_grid_with_the_picked_attempts_prompts_and_seeds(session):
    finished_session(session, "a1", "a2")
    calls = []

    def comparer(session_, model, names, prompts, seeds, **kwargs):
        calls.append((names, prompts, seeds, kwargs))
        return Comparison(grid=Image.new("RGB", (320, 160), "white"), prompts=prompts, samples={})

    view = ui.CompareView(session, fake_model(), comparer=comparer, num_inference_steps=7)
    assert view.refs == ["base", "a2"]  # the newest finished attempt against the base model, one column each
    assert [v for _, v in view.pickers[0].attempt.options] == ["base", "a1", "a2"]
    assert "{token}" in view.prompts.value  # the probe prompts
    view.pickers[0].attempt.value = "a1"
    view.prompts.value = "photo of {token} {class}\n\npainting of {token}"
    view.seeds.value = "3, 4"
    view.compile_unet.value = True
    view.compare_button.click()
    names, prompts, seeds, kwargs = calls[0]
    assert names == ["a1", "a2"] and prompts == ["photo of {token} {class}", "painting of {token}"] and seeds == [3, 4]
    assert kwargs["num_inference_steps"] == 7 and kwargs["compile_unet"] is True
    assert shown_image(view, "grid").size == (320, 160) and "a1, a2" in shown(view, "grid")["text/plain"]
    assert view.grid_path.parent == session.path / "grids" and Image.open(view.grid_path).size == (320, 160)
    view.seeds.value = "1, x"
    view.compare_button.click()
    assert "Seeds must be whole numbers" in view.error_text and len(calls) == 1


def test_compare_columns_follow_the_newest_attempt_until_changed_and_each_is_picked_once(session):
    names = []
    view = ui.CompareView(session, fake_model(), comparer=lambda s, m, n, *a, **k: names.append(n) or
                          Comparison(Image.new("RGB", (8, 8)), [], {}))
    assert view.refs == ["base"]  # nothing trained yet
    finished_session(session, "a1")
    view.compare_button.click()
    assert names == [["base", "a1"]]  # the run since is in the grid without a click on refresh
    view.add_button.click()
    assert view.refs == ["base", "a1", "a1"]
    view.compare_button.click()
    assert view.error_text == "a1 is picked twice; pick each attempt or checkpoint once." and len(names) == 1
    view.columns.children[0].children[1].click()  # remove the base model's column
    view.compare_button.click()
    assert view.refs == ["a1", "a1"] and len(names) == 1
    view.pickers[1].attempt.value = "base"
    finished_session(session, "a2")
    view.compare_button.click()
    assert names[-1] == ["a1", "base"]  # changed by the user: a newer attempt does not replace the columns


class CapturingOutput:
    """Stands in for a view's Output: says whether a handler's output is being captured right now."""

    def __init__(self):
        self.capturing, self.outputs = False, ()

    def __enter__(self):
        self.capturing = True

    def __exit__(self, *exc):
        self.capturing = False

    def append_stderr(self, text):
        self.outputs += ({"text": text},)


def test_results_are_cell_outputs_kept_under_the_widget_and_replaced_in_place(session, monkeypatch):
    """What a notebook sees: the view's widget, then one output per result slot (empty at first, with a display id),
    then, when a result arrives, an update of that same output, sent once the Output's capture is over (a
    capturing Output would take it into the widget's state, which saved notebooks lose)."""
    sent = []
    monkeypatch.setattr("dreamnb.ui.base._in_ipython", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: sent.append(("display", obj, kw, None)))
    monkeypatch.setattr("IPython.display.update_display",
                        lambda obj, **kw: sent.append(("update", obj, kw, view.out.capturing)))
    finished_session(session, "a1")
    view = ui.CompareView(session, fake_model(), comparer=lambda *a, **k: Comparison(Image.new("RGB", (40, 20)), [], {}))
    view.out = CapturingOutput()
    view._ipython_display_()
    (_, widget, _, _), (_, empty, slot, _) = sent
    assert widget is view.widget and empty == {"text/plain": ""} and slot["raw"] and slot["display_id"]
    view.compare_button.click()
    view.compare_button.click()
    updates = sent[2:]
    assert [(kind, kw["display_id"], capturing) for kind, _, kw, capturing in updates] == [("update", slot["display_id"], False)] * 2
    assert Image.open(io.BytesIO(base64.b64decode(updates[-1][1]["image/png"]))).size == (40, 20)


# --- playground -----------------------------------------------------------------------------------------------------------

def test_playground_lists_attempts_with_weights_and_their_checkpoints(session):
    finished_session(session, "a1")
    add_attempt(session, "a2")
    update_attempt(session, "a2", status="interrupted", steps_done=50)
    add_attempt(session, "a3")  # never trained: nothing to draw with
    for name, step in (("a1", 100), ("a1", 200), ("a2", 50)):
        checkpoint = session.attempt_dir(name) / "checkpoints" / f"step-{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_text("{}")
    (session.attempt_dir("a1") / "checkpoints" / "step-000300").mkdir()  # cut short: no state.json
    view = ui.PlaygroundView(session, fake_model())
    assert [v for _, v in view.attempt.options] == ["base", "a1", "a2"]
    assert view.choice == ("a1", "final") and [v for _, v in view.step.options] == ["final", 200, 100]
    view.attempt.value = "a2"
    assert view.choice == ("a2", 50) and not view.step.disabled
    view.attempt.value = "base"
    assert view.step.disabled and view.error_text == ""
    assert ui.PlaygroundView(session, fake_model(), attempt="a1@100").choice == ("a1", 100)
    view = ui.PlaygroundView(session, fake_model(), attempt="a3")
    view.generate_button.click()
    assert "no attempt 'a3' with weights" in view.error_text and "a1, a2" in view.error_text


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_sd1):
    """A session with one finished tiny attempt (token zwx, class thing) that kept its checkpoint at step 4."""
    from dreamnb.train import train

    session = create_session(tmp_path_factory.mktemp("playground") / "session")
    for i in range(4):
        subject_photo(i).save(session.instance_dir / f"photo-{i}.png")
    config = TrainConfig.from_preset("object", token="zwx", class_word="thing", resolution=64, seed=0, unet_steps=8,
                                     unet_lr=1e-3, text_encoder_steps=0, with_prior_preservation=False,
                                     checkpoint_every=4, log_every=4)
    assert train(session, config, base_sd1, progress=False).status == "finished"
    return open_session(session.path)


def pixels(samples) -> list[np.ndarray]:
    return [np.asarray(s.image) for s in samples]


def test_playground_saves_pngs_whose_parameters_are_the_settings_used(trained, base_sd1):
    view = ui.PlaygroundView(trained, base_sd1, size=64, num_inference_steps=3, batch_size=2, seed=7)
    assert view.choice == ("attempt-1", "final") and [v for _, v in view.step.options] == ["final", 4]
    view.prompt.value = "a photo of {token} {class}, smiling"
    assert "→ a photo of zwx thing, smiling" in text(view.filled)  # the prompt as the model will read it
    view.negative.value = "blurry"
    view.scheduler.value = "euler"
    view.guidance.value = 5.0
    view.generate_button.click()
    assert view.error_text == ""
    samples = trained.attempt_dir("attempt-1") / "samples"
    assert len(view.paths) == 2 and all(p.parent == samples for p in view.paths) and str(samples) in view.status_text
    assert [read_png_settings(p) for p in view.paths] == [
        SampleSettings(prompt="a photo of zwx thing, smiling", negative_prompt="blurry", seed=seed, num_inference_steps=3,
                       guidance_scale=5.0, scheduler="euler", width=64, height=64, attempt="attempt-1",
                       base_model=base_sd1.info.source)
        for seed in (7, 8)]
    with Image.open(view.paths[1]) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), pixels(view.samples)[1])
    # the images are a plain output of the cell: one row, a seed over each
    assert shown_image(view, "images").width > 2 * 192 and "seeds 7–8" in shown(view, "images")["text/plain"]


def test_a_checkpoint_draws_other_images_than_the_final_weights_and_each_pipeline_is_built_once(trained, base_sd1):
    built = []

    def pipeline_for(base, session, name, checkpoint=None):
        built.append((name, checkpoint))
        return attempt_pipeline(base, session, name, checkpoint=checkpoint)

    view = ui.PlaygroundView(trained, base_sd1, size=64, num_inference_steps=3, batch_size=1, seed=3, pipeline_for=pipeline_for)
    final = pixels(view.generate())
    again = pixels(view.generate())
    view.step.value = 4
    step_4 = pixels(view.generate())
    assert read_png_settings(view.paths[0]).attempt == "attempt-1@4" and "attempt-1-step4" in view.paths[0].name
    view.attempt.value = "base"
    untrained = pixels(view.generate())
    assert view.paths[0].parent == trained.path / "samples" and read_png_settings(view.paths[0]).attempt == "base"
    assert built == [("attempt-1", None), ("attempt-1", 4)]  # the base model's own pipeline for 'base'
    assert np.array_equal(final[0], again[0])
    assert not np.array_equal(final[0], step_4[0]) and not np.array_equal(final[0], untrained[0])
    assert not np.array_equal(step_4[0], untrained[0])


def test_a_random_seed_is_recorded_and_makes_the_same_images_again(trained, base_sd1):
    view = ui.PlaygroundView(trained, base_sd1, size=64, num_inference_steps=3, batch_size=2)
    assert view.seed.value == "random"
    first = pixels(view.generate())
    seeds = view.seeds
    assert seeds[1] == seeds[0] + 1 and [read_png_settings(p).seed for p in view.paths] == seeds
    assert f"seeds {seeds[0]}–{seeds[1]}, drawn at random" in view.status_text and view.seed.value == "random"
    view.seed.value = str(seeds[0])
    assert all(np.array_equal(a, b) for a, b in zip(first, pixels(view.generate())))


def test_playground_mistakes_are_one_sentence_and_auto_generates_at_once(trained, base_sd1):
    view = ui.playground(trained, base_sd1, attempt="attempt-1@4", size=64, num_inference_steps=2, batch_size=1, seed=5, auto=True)
    assert view.choice == ("attempt-1", 4) and read_png_settings(view.paths[0]).seed == 5
    view.seed.value = "lucky"
    view.generate_button.click()
    assert view.error_text == "The seed must be a whole number, or 'random', not 'lucky'."
    view.seed.value = "1"
    view.prompt.value = "a photo of {name}"
    assert "unknown placeholder {name}" in text(view.filled)
    view.generate_button.click()
    assert "unknown placeholder {name}" in view.error_text and view.out.outputs == ()
    with pytest.raises(StepFailed, match="no checkpoint at step 99"):
        ui.playground(trained, base_sd1, attempt="attempt-1@99", auto=True)


def test_export_view_exports_and_pushes_the_chosen_attempt(session):
    finished_session(session, "a1", "a2")
    exported, pushed = [], []

    def exporter(session_, base, attempt, format, out, *, force, fp16):
        assert view.export_button.disabled and view.push_button.disabled  # no second click meanwhile
        exported.append((attempt, format, out, force, fp16))
        return out or session_.exports_dir / f"{attempt}.safetensors"

    def pusher(session_, base, attempt, repo_id, *, private, format):
        pushed.append((attempt, repo_id, private, format))
        return f"https://huggingface.co/{repo_id}"

    model = fake_model()
    view = ui.ExportView(session, model, format="safetensors", exporter=exporter, pusher=pusher)
    assert view.attempt.value == "a2"
    view.attempt.value = "a1"
    view.export_button.click()
    assert exported == [("a1", "safetensors", None, False, True)] and not view.export_button.disabled
    assert view.path == session.exports_dir / "a1.safetensors" and "Exported a1" in view.status_text
    view.repo_id.value = "not a repo"
    view.push_button.click()
    assert "your-name/model-name" in view.error_text and pushed == []
    view.repo_id.value = "me/my-model"
    view.push_button.click()
    assert pushed == [("a1", "me/my-model", True, "safetensors")] and view.url == "https://huggingface.co/me/my-model"

    # an attempt named in the cell is picked first; after that the dropdown decides, and a wrong name is reported
    view = ui.ExportView(session, model, attempt="a1", exporter=exporter, pusher=pusher)
    assert view.attempt.value == "a1"
    view.attempt.value = "a2"
    view.export_button.click()
    assert exported[-1][0] == "a2"
    view = ui.ExportView(session, model, attempt="a3", exporter=exporter, pusher=pusher)
    view.export_button.click()
    assert "no attempt 'a3'" in view.error_text and "a1, a2" in view.error_text and exported[-1][0] == "a2"


def test_compare_a_checkpoint_against_the_final_weights_and_the_base_model(trained, base_sd1, tmp_path):
    view = ui.CompareView(trained, base_sd1, prompts=["photo of {token} {class}"], seeds=[3], num_inference_steps=2,
                          save_dir=tmp_path)
    assert view.refs == ["base", "attempt-1"]
    view.add_button.click()
    assert [v for _, v in view.pickers[2].step.options] == ["final", 4]
    view.pickers[2].step.value = 4
    comparison = view.compare()
    assert view.error_text == "" and list(comparison.samples) == ["base", "attempt-1", "attempt-1@4"]
    assert [s.settings.attempt for s in comparison.samples["attempt-1@4"]] == ["attempt-1@4"]
    final, step_4, untrained = (pixels(comparison.samples[name])[0] for name in ("attempt-1", "attempt-1@4", "base"))
    assert not np.array_equal(final, step_4) and not np.array_equal(step_4, untrained)
    assert "attempt-1@4" in view.grid_path.name and "attempt-1@4" in shown(view, "grid")["text/plain"]
    # named in the cell
    assert ui.CompareView(trained, base_sd1, attempts=["attempt-1@4", "attempt-1"]).refs == ["attempt-1@4", "attempt-1"]


def test_export_view_exports_a_checkpoint(trained, base_sd1, tmp_path):
    from diffusers import UNet2DConditionModel

    view = ui.ExportView(trained, base_sd1, format="diffusers", out=tmp_path / "final")
    assert view.picker.ref == "attempt-1" and [v for _, v in view.step.options] == ["final", 4]
    assert [v for _, v in view.attempt.options] == ["attempt-1"]  # no 'base': there is nothing trained to export
    view.export_button.click()
    view.step.value = 4
    view.out_text.value = str(tmp_path / "step-4")
    view.export_button.click()
    assert view.error_text == "" and view.path == tmp_path / "step-4" and view.status_text == f"Exported attempt-1@4 to {view.path}."
    expected = attempt_pipeline(base_sd1, trained, "attempt-1", checkpoint=4).unet.state_dict()
    exported = UNet2DConditionModel.from_pretrained(view.path / "unet").state_dict()
    final = UNet2DConditionModel.from_pretrained(tmp_path / "final" / "unet").state_dict()
    assert all(torch.equal(exported[k], expected[k].to(exported[k].dtype)) for k in expected)
    assert not all(torch.equal(exported[k], final[k]) for k in expected)
    assert ui.ExportView(trained, base_sd1, attempt="attempt-1@4").picker.choice == ("attempt-1", 4)


def test_export_without_attempts_says_to_train_first(session):
    view = ui.ExportView(session, fake_model(), exporter=lambda *a, **k: None)
    view.export_button.click()
    assert view.error_text == "There is no attempt to export yet; train one first."


# --- environment --------------------------------------------------------------------------------------------------------

def test_environment_outside_colab():
    assert colab.in_colab() is False
    assert colab.mount_drive() == Path("dreamnb-sessions")
    gpu = colab.GpuSummary("no GPU", 0.0, 0.0)
    assert gpu.describe() == "no GPU" and "no GPU" in gpu.advice()
    assert "lora" in colab.GpuSummary("Tesla P4", 7.5, 7.0, count=1).advice()
    assert colab.GpuSummary("NVIDIA H100", 80.0, 79.0, count=1, bf16=True).advice() == ""
    view = ui.SetupView(None, gpu=gpu, in_colab=False)
    assert "no GPU" in view.info.value and view.root == Path("dreamnb-sessions")


def test_step_failed_renders_as_one_line():
    err = StepFailed("The session has no photos; set instance_images.")
    assert err._render_traceback_() == ["StepFailed: The session has no photos; set instance_images."]


def test_a_second_runtime_training_the_same_session_is_refused_in_the_view(photo_session, base_sd1):
    """Colab's lost-then-reopened runtime: another process is training this session; the view says so in one sentence,
    and nothing is written (no new attempt, no files)."""
    from test_session import _hold_lock_in_another_process

    before = sorted(p.relative_to(photo_session.path) for p in photo_session.path.rglob("*"))
    holder = _hold_lock_in_another_process(photo_session.path)
    try:
        view = ui.TrainView(photo_session, base_sd1, token="zwx", preset="object", class_word="thing", resolution=64,
                            with_prior_preservation=False, unet_steps=4, text_encoder_steps=0, checkpoint_every=0)
        view.train_button.click()
        result = view.wait(120)
        assert result is None or result.status != "finished"
        assert f"(process {holder.pid})" in view.error_text and "being changed by training" in view.error_text
        assert "Traceback" not in view.error_text
        after = sorted(p.relative_to(photo_session.path) for p in photo_session.path.rglob("*") if p.name != ".lock")
        assert after == [p for p in before if p.name != ".lock"] and open_session(photo_session.path).attempts == []
    finally:
        holder.kill()
        holder.wait()


def test_while_the_notebook_trains_the_views_that_touch_its_files_or_model_refuse_with_a_sentence(photo_session, base_sd1, tmp_path):
    """A real tiny training in the train view's thread, held at its first step: the session view deletes nothing, compare
    and playground refuse (another session's grid too: the base model is training's), each in one sentence; once it
    ends, they all work."""
    from dreamnb.session import busy_in_this_process

    training = ui.TrainView(photo_session, base_sd1, token="zwx", preset="object", class_word="thing", resolution=64, seed=0,
                            with_prior_preservation=False, unet_steps=2, text_encoder_steps=0, checkpoint_every=0,
                            log_every=1, sample_every=0)
    inside, release, draw = threading.Event(), threading.Event(), training._on_event

    def held_at_first_step(event):
        draw(event)
        if event.kind == "step" and not inside.is_set():
            inside.set()
            release.wait(120)

    training._on_event = held_at_first_step
    training.train_button.click()
    try:
        assert inside.wait(300), training.error_text
        assert busy_in_this_process(photo_session.path) == "training attempt-1"
        before = files_under(photo_session.path)
        disk = ui.choose_session(photo_session.path.parent, photo_session.name, auto=True).housekeeping
        disk.attempt.value = "attempt-1"
        disk.delete_attempt_button.click()
        assert disk.error_text == ("Training attempt-1 is under way in this notebook (session 'session'); stop it or wait "
                                   "until it ends before deleting attempt-1.") and disk.confirm_box.layout.display == "none"
        disk.free_button.click()
        assert "Training attempt-1 is under way" in disk.error_text and "before freeing space" in disk.error_text
        grid = ui.CompareView(photo_session, base_sd1, prompts=["a photo of {token}"], seeds=[1], num_inference_steps=2)
        assert grid.compare() is None and "Training attempt-1 is under way" in grid.error_text
        assert "before making a grid" in grid.error_text
        images = ui.PlaygroundView(photo_session, base_sd1, attempt="base", num_inference_steps=2, batch_size=1)
        assert images.generate() is None and "before generating images" in images.error_text
        other = ui.CompareView(create_session(tmp_path / "other"), base_sd1, attempts=["base"], prompts=["a photo"],
                               seeds=[1], num_inference_steps=2)
        assert other.compare() is None and other.error_text.startswith("The base model is in use by training attempt-1 in this notebook")
        assert files_under(photo_session.path) == before and not (tmp_path / "other" / "grids").exists()
    finally:
        release.set()
    result = training.wait(600)
    assert result is not None and result.status == "finished", training.error_text
    assert busy_in_this_process(photo_session.path) is None
    assert other.compare() is not None and other.error_text == ""
    assert grid.compare() is not None and grid.refs == ["base", "attempt-1"], grid.error_text
    assert images.generate() is not None, images.error_text
    disk.refresh()
    disk.attempt.value = "attempt-1"
    disk.delete_attempt_button.click()
    disk.confirm_button.click()
    assert disk.error_text == "" and not photo_session.attempt_dir("attempt-1").exists()
