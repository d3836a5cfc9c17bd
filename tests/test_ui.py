"""The notebook widgets without a browser: build the views, set values, press buttons, check the core calls
made (fakes) and what is shown (labels, HTML, images, Output contents), errors included."""
from __future__ import annotations

import dataclasses
import html
import io
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import ipywidgets as W
import pytest
from PIL import Image

import dreamnb.ui as ui
from dreamnb import colab
from dreamnb.attempts import Comparison
from dreamnb.config import ConfigError, TrainConfig, help_for
from dreamnb.errors import UserError
from dreamnb.session import add_attempt, create_session, open_session, update_attempt
from dreamnb.train import TrainEvent, TrainResult
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

    def loader(source, config=None):
        calls.append((source, config))
        return SimpleNamespace(info=info)

    view = ui.ModelView("some/model", loader=loader)
    with pytest.raises(UserError, match="press 'Load model'"):
        view.base_model
    assert "Hugging Face Hub" in view.kind.value
    view.source_text.value = str(tmp_path)
    assert "folder" in view.kind.value
    view.config_text.value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    view.load_button.click()
    assert calls == [(str(tmp_path), "stable-diffusion-v1-5/stable-diffusion-v1-5")]
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
    assert "notes.png" in text(view.rejected) and view.report.rejected[0].reason in text(view.rejected)
    assert "add more" in text(view.advice)  # 3 photos: too few
    assert "3 added, 1 rejected" in view.status_text
    assert len(view.gallery.children) == 3 == len(view.photos)
    thumb = Image.open(io.BytesIO(view.gallery.children[0].children[0].value))
    assert thumb.size == (64, 64)
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
    # remove the second photo from the set; the original stays
    view.gallery.children[1].children[2].click()  # its "caption" button selects it
    second = view.caption_photo.value
    view.caption_remove.click()
    assert second not in [p.name for p in view.photos] and len(list(folder.glob("*.png"))) == 3


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
        emit(TrainEvent("start", step=0, total_steps=10, message="Training attempt-1 on cpu"))
        emit(TrainEvent("phase", step=0, total_steps=10, phase="unet", message="unet phase: 10 steps at lr 0.001"))
        step = 0
        while step < 10 or self.until_stopped:
            step += 1
            emit(TrainEvent("step", step=min(step, 10), total_steps=10, phase="unet", loss=1.0 / step, lr=1e-3,
                            elapsed_s=step * 6.0, eta_s=(10 - min(step, 10)) * 6.0))
            self.started.set()
            if stop is not None and stop.is_set():
                emit(TrainEvent("stopped", step=step, total_steps=10, message=f"Stopped at step {step} of 10; saved step-{step}."))
                return TrainResult("attempt-1", "interrupted", step, 10, None, f"Stopped at step {step} of 10; saved step-{step}.")
            if self.until_stopped:
                time.sleep(0.01)
            if step == 5:
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
    chart = Image.open(io.BytesIO(live.chart.value))
    assert chart.width > 300 and live.chart.layout.display == ""
    assert len([c for c in live.samples.children if isinstance(c, W.Image)]) == 2
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
                        checkpoint_every=0, log_every=3)
    view.train_button.click()
    result = view.wait(600)  # seconds on an idle machine; generous for a loaded CI runner
    assert result is not None, "training did not finish within 600 s"
    assert result.status == "finished", view.error_text
    assert (photo_session.attempt_dir(result.attempt) / "final" / "unet").is_dir()
    assert [s for s, _, _ in view.live.losses] == [3, 6, 9, 12] and view.live.bar.value == 12
    assert open_session(photo_session.path).attempt(result.attempt).status == "finished"


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
    assert [v for _, v in view.attempts.options] == ["base", "a1", "a2"]
    assert view.attempts.value == ("base", "a2")  # the newest finished attempt against the base model
    assert "{token}" in view.prompts.value  # the probe prompts
    view.attempts.value = ("a1", "a2")
    view.prompts.value = "photo of {token} {class}\n\npainting of {token}"
    view.seeds.value = "3, 4"
    view.compile_unet.value = True
    view.compare_button.click()
    names, prompts, seeds, kwargs = calls[0]
    assert names == ["a1", "a2"] and prompts == ["photo of {token} {class}", "painting of {token}"] and seeds == [3, 4]
    assert kwargs["num_inference_steps"] == 7 and kwargs["compile_unet"] is True
    assert Image.open(io.BytesIO(view.grid.value)).size == (320, 160)
    assert view.grid_path.parent == session.path / "grids" and Image.open(view.grid_path).size == (320, 160)
    view.seeds.value = "1, x"
    view.compare_button.click()
    assert "Seeds must be whole numbers" in view.error_text and len(calls) == 1


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
