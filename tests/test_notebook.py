"""The notebook itself: its shape (parameters cell, badge, one library call per cell) and a headless run
on the CPU with a tiny model and generated photos, through every section, checked by what it left on disk
and by the outputs the saved notebook holds without its widgets."""
from __future__ import annotations

import ast
import base64
import io
import json
import re
from pathlib import Path

import nbformat
from PIL import Image

from conftest import subject_photo
from dreamnb.sample import read_png_settings

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "fast_dreambooth.ipynb"
COLAB_LINK = "https://colab.research.google.com/github/dreamnb/dreamnb/blob/main/notebooks/fast_dreambooth.ipynb"
REQUIRED_PARAMETERS = {"base_model", "session_root", "session_name", "instance_images", "token", "class_word",
                       "preset", "unet_steps", "text_encoder_steps", "resolution"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def parameters_cell(nb):
    return next(c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", []))


def test_first_code_cell_holds_the_parameters_and_the_badge_opens_it_in_colab():
    nb = read_notebook()
    nbformat.validate(nb)
    first = code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", [])
    assigned = {t.id for node in ast.parse(first.source).body for t in node.targets}
    assert REQUIRED_PARAMETERS <= assigned
    assert all(isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.List)) for node in ast.parse(first.source).body)
    assert nb.cells[0].cell_type == "markdown" and COLAB_LINK in nb.cells[0].source


def test_one_library_call_per_cell_and_only_the_install_cell_has_a_magic():
    cells = code_cells(read_notebook())
    magics = [c for c in cells if re.search(r"^\s*[%!]", c.source, re.M)]
    assert len(magics) == 1 and "%pip install" in magics[0].source and 'find_spec("dreamnb") is None' in magics[0].source
    sections = [c for c in cells if c is not magics[0] and "parameters" not in c.metadata.get("tags", [])]
    assert len(sections) == 9  # setup, model, session, photos, token, train, compare, playground, export
    for cell in sections:
        body = ast.parse(cell.source).body
        assert len(body) == 1 and isinstance(body[0], ast.Assign), cell.source
        call = body[0].value
        assert isinstance(call, ast.Call) and ast.unparse(call.func).startswith("dreamnb.ui."), cell.source


def image_outputs(cell) -> dict[str, Image.Image]:
    """The cell's plain image outputs (what GitHub or a reopened Colab notebook shows without widget state),
    by their text/plain line."""
    return {o.data.get("text/plain", ""): Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
            for o in cell.outputs if "image/png" in o.get("data", {})}


def inject_parameters(nb, values: dict) -> None:
    """papermill's way: the parameters cell keeps its defaults and the new values follow them."""
    cell = parameters_cell(nb)
    cell.source += "\n# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())


def run_headless(tmp_path, **parameters):
    """The notebook executed top to bottom with `auto_run`, as papermill would, on three subject photos; the sessions
    go to tmp_path/sessions. Returns the executed notebook (also saved as executed.ipynb, for a look when a test fails)."""
    from nbclient import NotebookClient

    photos = tmp_path / "my photos"
    photos.mkdir()
    for i in range(3):
        subject_photo(i, 96).save(photos / f"me-{i}.jpg", quality=95)
    nb = read_notebook()
    inject_parameters(nb, dict(session_root=str(tmp_path / "sessions"), instance_images=str(photos), token="zwx",
                               class_word="thing", preset="object", with_prior_preservation=False, resolution=64,
                               checkpoint_every=0, auto_run=True, **parameters))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "executed.ipynb")
    return nb


def test_notebook_runs_headless_from_top_to_bottom(tmp_path, tiny_sd1):
    root = tmp_path / "sessions"
    nb = run_headless(tmp_path, base_model=str(tiny_sd1.folder), session_name="nb-test", unet_steps=16, unet_lr=1e-3,
                      text_encoder_steps=4, text_encoder_lr=1e-4, compare_seeds=[1], sample_steps=3, export_format="safetensors",
                      compare_prompts=["photo of {token} {class}", "photo of a {class}"])

    # every section showed its widgets, and none failed
    for cell in code_cells(nb):
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
        if cell.source.lstrip().startswith(("env", "model", "session", "photos", "trigger", "training", "grid", "playground", "exported")):
            assert any(WIDGET_VIEW in o.get("data", {}) for o in cell.outputs), cell.source

    # the results are also plain image outputs of their cells: photos, loss curve, comparison grid, playground images
    images = {cell.source.split("=")[0].strip(): image_outputs(cell) for cell in code_cells(nb)}
    (photos_sheet,) = [image for label, image in images["photos"].items() if "3 prepared photos" in label]
    (loss_curve,) = [image for label, image in images["training"].items() if label == "loss curve of attempt-1"]
    (grid_image,) = [image for label, image in images["grid"].items() if "comparison grid of base, attempt-1" in label]
    (played,) = [image for label, image in images["playground"].items() if "4 image(s) of attempt-1" in label]
    assert photos_sheet.width == 3 * 128 and loss_curve.width > 300
    assert grid_image.width > 2 * 64 and played.width > 4 * 64

    session_dir = root / "nb-test"
    state = json.loads((session_dir / "session.json").read_text())
    assert state["base_model"] == str(tiny_sd1.folder)
    assert [(a["name"], a["status"], a["steps_done"]) for a in state["attempts"]] == [("attempt-1", "finished", 20)]
    final = session_dir / "attempts" / "attempt-1" / "final"
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (final / "text_encoder").is_dir()
    assert len(list((session_dir / "instance").glob("me-*.png"))) == 3

    grids = list((session_dir / "grids").glob("compare-base-vs-attempt-1-*.png"))
    assert len(grids) == 1
    with Image.open(grids[0]) as grid:
        assert grid.width > 2 * 64 and grid.height > 2 * 64  # 2 prompts x (base, attempt-1), with labels

    saved = sorted((session_dir / "attempts" / "attempt-1" / "samples").glob("playground-*.png"))
    assert len(saved) == 4
    settings = read_png_settings(saved[0])
    assert (settings.prompt, settings.num_inference_steps, settings.attempt) == ("a photo of zwx thing as an astronaut", 3, "attempt-1")

    (export,) = (session_dir / "exports").glob("*.safetensors")  # named by the core: session and attempt
    assert "attempt-1" in export.name
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as f:
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())


def test_the_notebook_trains_and_exports_flux_headless(tmp_path, tiny_flux):
    """FLUX.1 through every section: the form takes FLUX.1's preset values (a LoRA of the transformer, no text-encoder
    phase), the grid and playground sample with its own sampler, and the LoRA is exported in kohya's FLUX.1 layout."""
    root = tmp_path / "sessions"
    nb = run_headless(tmp_path, base_model=str(tiny_flux.folder), session_name="flux", unet_steps=4, unet_lr=1e-3,
                      compare_seeds=[1], sample_steps=2, export_format="lora", compare_prompts=["photo of {token} {class}"])
    for cell in code_cells(nb):
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    images = {cell.source.split("=")[0].strip(): image_outputs(cell) for cell in code_cells(nb)}
    assert [label for label in images["grid"] if "comparison grid of base, attempt-1" in label]

    session_dir = root / "flux"
    state = json.loads((session_dir / "session.json").read_text())
    assert [(a["name"], a["status"], a["steps_done"]) for a in state["attempts"]] == [("attempt-1", "finished", 4)]
    config = json.loads((session_dir / "attempts" / "attempt-1" / "config.json").read_text())
    assert (config["method"], config["text_encoder_steps"]) == ("lora", 0)
    saved = sorted((session_dir / "attempts" / "attempt-1" / "samples").glob("playground-*.png"))
    assert saved and read_png_settings(saved[0]).scheduler == "flow-euler"
    (export,) = (session_dir / "exports").glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as f:
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in f.keys())
        assert f.metadata()["ss_base_model_version"] == "flux1"
