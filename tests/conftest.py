"""Shared fixtures: tiny models with the real SD architectures, built once per test run (seeded)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import dreamnb  # noqa: E402,F401  first: it makes MKL reproducible before torch runs anything (see dreamnb/__init__.py)

import numpy as np
import pytest
import torch
from PIL import Image

from dreamnb.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """A tiny SD 1.x model as a diffusers folder and as an original-layout single file."""
    return save_tiny_model(tmp_path_factory.mktemp("models"), "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A tiny SD 2.x v-prediction model as a diffusers folder and as a single file."""
    return save_tiny_model(tmp_path_factory.mktemp("models"), "sd2-v", seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny FLUX.1 model as a diffusers folder (dreamnb.tiny.tiny_flux_pipeline)."""
    return save_tiny_model(tmp_path_factory.mktemp("models"), "flux1", seed=0)


@pytest.fixture(scope="session")
def base_sd1(tiny_sd1):
    from dreamnb.models import load_base_model

    return load_base_model(tiny_sd1.folder)


def subject_photo(index: int, size: int = 64) -> Image.Image:
    """A simple 'subject': a yellow square on red, shifted a little per photo, so training has a pattern to learn."""
    array = np.zeros((size, size, 3), np.uint8)
    array[..., 0] = 190
    array[..., 2] = 40
    offset = size // 4 + (index % 3) * (size // 16)
    array[offset:offset + size // 2, size // 4:size // 4 + size // 2, :2] = 230
    return Image.fromarray(array)


def other_vae(model_folder, out_dir, seed=1, **changes):
    """A VAE shaped like the model's own (its config, with `changes`) but with other weights, saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in json.loads((model_folder / "vae" / "config.json").read_text()).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config({**config, **changes})
    vae.save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def photo_session(tmp_path):
    """A session with four prepared 64 px subject photos."""
    from dreamnb.session import create_session

    session = create_session(tmp_path / "session")
    for i in range(4):
        subject_photo(i).save(session.instance_dir / f"photo-{i}.png")
    return session


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL base model (two text encoders, "text_time" UNet) as a diffusers folder and as a single file."""
    return save_tiny_model(tmp_path_factory.mktemp("models"), "sdxl", seed=0)
