"""The whole dreamnb flow on a CPU in under two minutes: small model → photos → train → compare.

No weights can be downloaded everywhere, so the demo starts from the world model (`dreamnb.world_model`): a small
Stable Diffusion with the real architecture, pretrained on a world of shapes and creatures, that draws "a photo of
a red star on grass". It teaches it a fish it has never seen (purple with yellow zigzags, assets/world-photos) and
writes a grid of the same prompts and seeds before and after training.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import fileio
from .config import TrainConfig, preset_values
from .errors import UserError
from .session import SESSION_FILE, create_session, delete_session

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WORLD_MODEL = ASSETS / "world-model"
DEMO_PHOTOS = ASSETS / "world-photos"
DEMO_TOKEN = "zwx"
DEMO_CLASS = "fish"
# The world's grammar: the world model learnt captions like "a photo of a red star on grass"
DEMO_PROMPTS = ["a photo of {token} {class} on grass", "a painting of {token} {class} in the sky", "a photo of a {class} in a room"]
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


def run_demo(out_dir: str | Path = "demo-output", *, unet_steps: int | None = None, photos: Path = DEMO_PHOTOS,
             world_model: Path = WORLD_MODEL, log: Callable[[str], None] = log.info) -> DemoResult:
    from .attempts import attempt_pipeline, comparison_grid, denoising_error
    from .data import cached_latents
    from .images import prepare_photos
    from .models import load_base_model
    from .train import train
    from .world_model import CLASS_PROMPT, INSTANCE_PROMPT, pack_parts, unpack_to

    started = time.time()
    out = Path(out_dir)

    parts = pack_parts(world_model)
    if not parts:
        raise UserError(f"The demo's world model is not in {world_model}; run the demo from a clone of the dreamnb "
                        "repository (`pip install -e .` there), whose assets/world-model folder holds it.")
    log(f"1/5 unpacking the world model into {out / 'model'} (a small Stable Diffusion pretrained on shapes and creatures, 64 px)")
    unpack_to(parts, out / "model")

    log("2/5 preparing the sample photos in a new session")
    session_path = out / "session"
    if (session_path / SESSION_FILE).exists():
        delete_session(session_path)
    session = create_session(session_path, base_model=str(out / "model"))
    report = prepare_photos([photos], session.instance_dir, size=64, crop="center", preset="object", progress=False)
    log(f"    {len(report.accepted)} photos accepted, {len(report.rejected)} rejected")

    base = load_base_model(out / "model")
    log(f"3/5 training (text encoder, then UNet) with prior preservation, on {base.placement.device.type}")
    rates = preset_values("object")  # the object preset, shortened to fit two minutes on two cores: 10× its rates
    config = TrainConfig.from_preset(
        "object", token=DEMO_TOKEN, class_word=DEMO_CLASS, instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT, resolution=64, seed=0, unet_steps=unet_steps or 200, unet_lr=10 * rates["unet_lr"],
        text_encoder_steps=40, text_encoder_lr=10 * rates["text_encoder_lr"], num_class_images=6, checkpoint_every=100, log_every=20,
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
