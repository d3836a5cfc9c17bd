"""The notebook in a real browser: JupyterLab on localhost, headless Chromium driven by Playwright.

Runs `run_in_browser.py` (the world model, the demo's fish photos, every section with auto_run), which checks
in the page that the widgets and the results kept as plain outputs rendered, and saves screenshots of the
photos, the training view, the comparison grid and the playground. Skipped, with what is missing, when chromium, JupyterLab or playwright-core is not installed:
    apt-get install chromium ; pip install jupyterlab ; npm install -g playwright-core
(JUPYTER_LAB=/path/to/jupyter-lab and CHROMIUM=/path/to/chromium point at non-default installs.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_in_browser  # noqa: E402

import os  # noqa: E402

MISSING = run_in_browser.missing_requirements()
if not os.environ.get("DREAMNB_BROWSER_TEST"):  # minutes long: run it on purpose, not with every test run
    MISSING = ["DREAMNB_BROWSER_TEST=1"] + MISSING
pytestmark = pytest.mark.skipif(bool(MISSING), reason="the browser test needs " + "; ".join(MISSING))


def test_notebook_widgets_render_in_jupyterlab_and_screenshots_are_taken(tmp_path):
    out = tmp_path / "screenshots"
    run = subprocess.run(
        [sys.executable, str(HERE / "run_in_browser.py"), "--out", str(out), "--work", str(tmp_path / "work"),
         "--unet-steps", "40", "--timeout", "900"],
        capture_output=True, text=True, timeout=1100,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    check = json.loads(run.stdout.strip().splitlines()[-1])
    assert check["widget_views"] >= 9
    assert {"Prepare photos", "Train", "Stop", "Make the grid", "Generate", "Export"} <= set(check["buttons"])
    assert any(width >= 8 * 128 for width, _ in check["photo_images"])  # one picture of the 8 fish photos
    assert len(check["training_images"]) >= 2 and check["compare_images"] and check["playground_images"]  # curve + previews
    assert check["playground_outputs_after_click"] == 1  # a later press replaced the cell's image output in place
    assert all(bar == "100%" for bar in check["progress"][-1:])  # the training bar ended full
    for name in ("photos.png", "training.png", "compare.png", "playground.png"):
        with Image.open(out / name) as shot:
            assert shot.width >= 600 and shot.height >= 150, (name, shot.size)
