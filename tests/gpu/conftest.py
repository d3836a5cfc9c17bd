"""Fixtures of the GPU acceptance suite. Every test here needs a CUDA GPU (CI has none and skips them)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the GPU acceptance suite: benchmarks/README.md)")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture
def gpu_base(tiny_sd1):
    """The tiny model loaded as a user's is: on the GPU, in fp16."""
    from dreamnb.models import load_base_model

    base = load_base_model(tiny_sd1.folder)
    assert base.placement.device.type == "cuda" and base.placement.dtype == torch.float16
    return base


@pytest.fixture(scope="session")
def full_model(tmp_path_factory) -> Path:
    """The full SD-1.5 architecture with random weights (benchmarks/bench.py builds it), as a diffusers folder."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    folder = tmp_path_factory.mktemp("sd15") / "model"
    bench.sd15_pipeline(tiny=False).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def photos_512(tmp_path_factory) -> Path:
    """20 varied synthetic 512 px 'photos' (the benchmark's)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    folder = tmp_path_factory.mktemp("photos") / "my photos"
    bench.make_photos(folder, 20, 512)
    return folder

