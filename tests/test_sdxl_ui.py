"""The notebook's sections with an SDXL base model (issue 18): the model section offers SDXL, the train form's
defaults follow the loaded model's family (and say why), image sizes follow the model, and the export section
lists every format the core exports. Widgets are driven headlessly, by `.value`, with the tiny models."""
from __future__ import annotations

import re

import ipywidgets as W
import pytest

import dreamnb.ui as ui
from dreamnb import export as core_export
from dreamnb.config import TrainConfig
from dreamnb.models import DEFAULT_MODEL, SDXL_MODEL, load_base_model


def plain(widget: W.HTML) -> str:
    return re.sub(r"<[^>]+>", "", widget.value)


@pytest.fixture
def model_view(tiny_sdxl):
    return ui.ModelView(str(tiny_sdxl.folder), loader=load_base_model)


def test_model_section_offers_sdxl_beside_sd15_with_what_it_means():
    view = ui.ModelView()
    assert [value for _, value in view.choice.options][:2] == [DEFAULT_MODEL, SDXL_MODEL]
    assert view.choice.value == DEFAULT_MODEL and "512 px" in plain(view.choice_help)
    view.choice.value = SDXL_MODEL
    assert view.source_text.value == SDXL_MODEL
    help_text = plain(view.choice_help)
    assert "1024 px" in help_text and "memory" in help_text and "LoRA" in help_text
    view.source_text.value = "some/other-model"  # typing a source picks "another model"
    assert view.choice.value == "" and view.source_text.value == "some/other-model"
    view.choice.value = DEFAULT_MODEL
    assert view.source_text.value == DEFAULT_MODEL


def test_train_form_switches_to_sdxl_defaults_when_the_model_loads_and_back_for_sd1(model_view, tiny_sd1):
    # run top to bottom before any button: the train cell is built before the model is loaded
    training = ui.TrainView(None, model_view, token="ohwx", preset="face", class_word="person")
    photos = ui.PhotosView(None, model=model_view)
    playground = ui.PlaygroundView(None, model_view)
    sd1 = TrainConfig.from_preset("face")
    assert (training.config.resolution, training.config.method) == (sd1.resolution, "full") == (512, "full")
    assert plain(training.model_note) == "" and photos.size.value == 512 and playground.width.value == 512

    base = model_view.load(raise_errors=True)
    assert base.info.family == "sdxl"
    sdxl = TrainConfig.from_preset("face", family="sdxl")  # the presets' SDXL values, from config.py
    config = training.config
    assert (config.resolution, config.method) == (sdxl.resolution, sdxl.method) == (1024, "lora")
    assert (config.text_encoder_steps, config.unet_lr) == (sdxl.text_encoder_steps, sdxl.unet_lr)
    assert config.token == "ohwx" and config.class_word == "person"  # the user's own stay
    note = plain(training.model_note)
    assert note.startswith("Stable Diffusion XL") and "1024 px" in note and "LoRA" in note and "memory" in note
    assert "Disk: up to" in plain(training.disk_line)  # the estimate, now that a model is loaded
    assert training.form.rows["lora_rank"].layout.display == ""  # LoRA's own settings are shown
    assert photos.size.value == 1024  # photos are prepared at the training size
    assert playground.width.value == playground.height.value == base.info.resolution  # the model's own size

    # a preset change under SDXL keeps SDXL's values
    training.form.widgets["preset"].value = "object"
    assert (training.config.resolution, training.config.method) == (1024, "lora")

    model_view.source_text.value = str(tiny_sd1.folder)
    model_view.load(raise_errors=True)
    sd1_object = TrainConfig.from_preset("object", class_word="person")
    config = training.config
    assert (config.resolution, config.method, config.text_encoder_steps, config.unet_lr) == (
        sd1_object.resolution, "full", sd1_object.text_encoder_steps, sd1_object.unet_lr)
    assert plain(training.model_note) == "" and training.form.rows["lora_rank"].layout.display == "none"
    assert photos.size.value == 512 and playground.width.value == 64  # the tiny SD 1.x model's own size


def test_the_cells_own_settings_and_the_users_choices_survive_a_model_change(model_view):
    training = ui.TrainView(None, model_view, token="ohwx", method="full", resolution=64)
    photos = ui.PhotosView(None, size=128, model=model_view)
    playground = ui.PlaygroundView(None, model_view)
    playground.width.value = 320  # typed by the user
    model_view.load(raise_errors=True)
    assert (training.config.resolution, training.config.method) == (64, "full")  # the cell asked for them
    assert training.config.text_encoder_steps == 0  # what the cell left open takes SDXL's value
    assert "Stable Diffusion XL" in plain(training.model_note)
    assert photos.size.value == 128 and playground.width.value == 320


def test_a_view_built_after_the_load_starts_from_sdxl_defaults(model_view):
    base = model_view.load(raise_errors=True)
    for model in (model_view, base):
        training = ui.TrainView(None, model, token="ohwx")
        assert (training.config.resolution, training.config.method) == (1024, "lora")
        assert "1024 px" in plain(training.model_note)


def test_a_view_that_cannot_follow_the_model_never_fails_the_load(tiny_sdxl):
    from types import SimpleNamespace

    loaded = SimpleNamespace(info=SimpleNamespace(family="sdxl", describe=lambda: "Stable Diffusion XL"))
    view = ui.ModelView("some/model", loader=lambda *a, **k: loaded)
    seen = []
    view.on_load(lambda base: 1 / 0)
    view.on_load(seen.append)
    assert view.load() is loaded and view.error_text == "" and seen == [loaded]


def test_export_section_lists_every_core_format_with_a_line_each():
    view = ui.ExportView(None, None)
    assert list(view.format.options) == list(core_export.FORMATS)
    assert "lora-diffusers" in view.format.options and "lora" in view.format.options
    lines = {}
    for format in core_export.FORMATS:
        view.format.value = format
        lines[format] = plain(view.format_help)
        assert lines[format] and lines[format] != format  # every format has its own line
    assert "kohya" in lines["lora"] and "load_lora_weights" in lines["lora-diffusers"]
    assert view.fp16.layout.display == "none"  # fp16 is only for the single file
    export_view = ui.ExportView(None, None, format="lora-diffusers")
    assert export_view.format.value == "lora-diffusers"


def test_notebook_runs_headless_with_a_tiny_sdxl_model(tmp_path, tiny_sdxl):
    """The notebook as shipped, top to bottom with `auto_run`, on the tiny SDXL model: the train form takes SDXL's
    defaults (LoRA, UNet only) where the parameters leave them open, and the LoRA is exported in diffusers' layout."""
    import json

    from test_notebook import code_cells, run_headless

    nb = run_headless(tmp_path, base_model=str(tiny_sdxl.folder), session_name="xl", unet_steps=8, unet_lr=1e-3, sample_every=0,
                      compare_prompts=["photo of {token} {class}"], compare_seeds=[1], sample_steps=2,
                      export_format="lora-diffusers")
    for cell in code_cells(nb):
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    session_dir = tmp_path / "sessions" / "xl"
    state = json.loads((session_dir / "session.json").read_text())
    assert [(a["name"], a["status"]) for a in state["attempts"]] == [("attempt-1", "finished")]
    config = json.loads((session_dir / "attempts" / "attempt-1" / "config.json").read_text())
    assert (config["method"], config["resolution"], config["text_encoder_steps"]) == ("lora", 64, 0)
    (export,) = (session_dir / "exports").glob("*lora-diffusers*.safetensors")
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as f:
        assert any(k.startswith("unet.") for k in f.keys())
