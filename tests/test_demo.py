"""The README's main job: `python -m dreamnb demo` on a CPU, with no weights and no network."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from dreamnb.attempts import comparison_grid
from dreamnb.demo import DEMO_INFERENCE_STEPS, DEMO_PROMPTS, DEMO_SEEDS
from dreamnb.models import load_base_model
from dreamnb.session import open_session


def test_demo_trains_a_tiny_model_and_writes_a_before_after_grid(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dreamnb", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    grid_path = out / "demo-grid.png"
    assert f"Comparison grid: {grid_path}" in done.stdout
    result = json.loads((out / "demo-result.json").read_text())
    assert result["error_after"] < 0.5 * result["error_before"]  # it learned the photos

    grid = Image.open(grid_path)
    columns, rows = 2 * len(DEMO_SEEDS), len(DEMO_PROMPTS)
    assert grid.width > columns * 128 and grid.height > rows * 128

    # the same seeds through the base and the trained attempt: training changed what the model draws
    session = open_session(out / "session")
    base = load_base_model(out / "model")
    comparison = comparison_grid(session, base, ["base", result["attempt"]], DEMO_PROMPTS, DEMO_SEEDS,
                                 num_inference_steps=DEMO_INFERENCE_STEPS)
    before = np.stack([np.asarray(s.image, np.float32) for s in comparison.samples["base"]])
    after = np.stack([np.asarray(s.image, np.float32) for s in comparison.samples[result["attempt"]]])
    assert np.abs(before - after).mean() > 10  # out of 255
