"""The whole dreamnb flow on a CPU in under two minutes: tiny model → photos → train → compare.

No weights can be downloaded everywhere, so the demo builds a tiny Stable Diffusion with the real
architecture, fits its VAE to the sample photos (so images are more than noise), teaches it the cat
in assets/photos, and writes a grid of the same prompts and seeds before and after training.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from . import fileio
from .config import TrainConfig
from .session import SESSION_FILE, create_session, delete_session

log = logging.getLogger(__name__)

ASSET_PHOTOS = Path(__file__).resolve().parent.parent / "assets" / "photos"
DEMO_TOKEN = "zwx"
DEMO_PROMPTS = ["photo of {token} {class}", "painting of {token} {class}", "photo of a {class}"]
DEMO_SEEDS = (1, 2)
DEMO_INFERENCE_STEPS = 20


@dataclass
class DemoResult:
    grid_path: Path
    session_path: Path
    attempt: str
    error_before: float  # how badly the base model denoises the photos under the instance prompt
    error_after: float   # the same for the trained attempt: lower means it learned the photos
    seconds: float


def run_demo(out_dir: str | Path = "demo-output", *, unet_steps: int | None = None, photos: Path = ASSET_PHOTOS,
             log: Callable[[str], None] = log.info) -> DemoResult:
    import torch

    from .attempts import attempt_pipeline, comparison_grid, denoising_error
    from .data import cached_latents
    from .images import prepare_photos
    from .models import load_base_model
    from .tiny import fit_vae, tiny_pipeline
    from .train import train

    started = time.time()
    out = Path(out_dir)
    photo_files = sorted(p for p in Path(photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    log(f"1/5 building a tiny Stable Diffusion model in {out / 'model'} (real architecture, random weights)")
    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1", seed=0)
    with torch.enable_grad():
        fit_vae(pipe.vae, [Image.open(p) for p in photo_files], steps=160)  # crude but real; keeps the demo under 2 minutes
    with fileio.atomic_dir(out / "model") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)

    log("2/5 preparing the sample photos in a new session")
    session_path = out / "session"
    if (session_path / SESSION_FILE).exists():
        delete_session(session_path)
    session = create_session(session_path, base_model=str(out / "model"))
    report = prepare_photos([photos], session.instance_dir, size=64, crop="center", preset="object", progress=False)
    log(f"    {len(report.accepted)} photos accepted, {len(report.rejected)} rejected")

    log("3/5 training (text encoder, then UNet) with prior preservation")
    base = load_base_model(out / "model")
    config = TrainConfig.from_preset(
        "object", token=DEMO_TOKEN, class_word="cat", resolution=64, seed=0,
        unet_steps=unet_steps or 200, unet_lr=1e-3, text_encoder_steps=40, text_encoder_lr=1e-4,
        num_class_images=6, checkpoint_every=100, log_every=20,
    )
    result = train(session, config, base, progress=True)
    if result.status != "finished":
        raise RuntimeError(result.message)

    log("4/5 measuring: how well each model denoises the photos under the instance prompt")
    mean, _ = cached_latents(base.vae, sorted(session.instance_dir.glob("*.png")), 64, session.cache_dir, "demo-eval")
    latents = mean * base.vae.config.scaling_factor
    prompt = config.resolved_instance_prompt()
    error_before = denoising_error(base.pipeline, latents, prompt)
    error_after = denoising_error(attempt_pipeline(base, session, result.attempt), latents, prompt)
    log(f"    denoising error on the photos: base {error_before:.4f} → trained {error_after:.4f}")

    log("5/5 sampling the same prompts and seeds before and after training")
    comparison = comparison_grid(session, base, ["base", result.attempt], DEMO_PROMPTS, DEMO_SEEDS,
                                 num_inference_steps=DEMO_INFERENCE_STEPS, cell_size=128)
    grid_path = out / "demo-grid.png"
    fileio.save_with(grid_path, lambda tmp: comparison.grid.save(tmp, format="PNG"))
    demo = DemoResult(grid_path=grid_path, session_path=session_path, attempt=result.attempt,
                      error_before=error_before, error_after=error_after, seconds=time.time() - started)
    fileio.write_json(out / "demo-result.json", dataclasses.asdict(demo))
    return demo
