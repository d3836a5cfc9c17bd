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


def test_the_demo_teaches_the_world_model_the_fish_and_writes_a_before_after_grid(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dreamnb", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    grid_path = out / "demo-grid.png"
    assert f"Comparison grid: {grid_path}" in done.stdout
    result = json.loads((out / "demo-result.json").read_text())
    assert result["error_after"] < 0.85 * result["error_before"]  # it learned the photos (0.75× here; untrained: 1×)

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


def test_the_committed_world_model_unpacks_with_a_point_posterior():
    """The demo's world model (assets/world-model): the pack's architecture, and a VAE whose encoder gives one latent
    per picture (std ≈ 0), as its UNet was pretrained on; with its old, wide posterior, fine-tuning made the demo's
    photos harder to denoise (error 0.075 → 0.133), not easier."""
    import torch

    from dreamnb.demo import WORLD_MODEL
    from dreamnb.world_model import pack_parts, read_pack

    pipe, meta = read_pack(pack_parts(WORLD_MODEL))
    assert pipe.unet.config.block_out_channels == (64, 128, 192) and pipe.vae.config.sample_size == 64
    photos = torch.rand(2, 3, 64, 64) * 2 - 1
    posterior = pipe.vae.encode(photos).latent_dist
    assert posterior.std.max() < 1e-5 and posterior.mean.std() > 0.1


def test_without_its_world_model_the_demo_says_where_to_run_it(tmp_path):
    """Installed from a wheel, the repository's assets/ are not there: one sentence, nothing written."""
    import pytest

    from dreamnb.demo import run_demo
    from dreamnb.errors import UserError

    with pytest.raises(UserError, match="run the demo from a clone of the dreamnb repository"):
        run_demo(tmp_path / "out", world_model=tmp_path / "missing")
    assert not (tmp_path / "out").exists()
