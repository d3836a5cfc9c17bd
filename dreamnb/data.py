"""Training data: the prepared photos and captions, class images, and the caches that make steps cheap.

The VAE encode of a 512 px photo costs more than a UNet forward pass, so each photo is encoded
once and its latent distribution (mean, std) is cached on disk, keyed by the photo's bytes, the
resolution and the base model; a training step then only draws `mean + std * noise`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import fileio
from .config import ConfigError
from .sample import decode_latents

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Example:
    path: Path
    caption: str | None  # the photo's own .txt caption, or None for the instance prompt


def list_examples(folder: Path) -> list[Example]:
    """The images in a folder (sorted, so their order is stable) with their same-name .txt captions."""
    examples = []
    for path in sorted(Path(folder).glob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
            examples.append(Example(path=path, caption=caption or None))
    return examples


HELD_OUT_FILE = "held_out.json"  # in an attempt's folder: the photos it never trained on, by name


def choose_held_out(examples: list[Example], requested: int) -> list[str]:
    """The names of the photos to keep out of training: `requested` of them (-1: 3 of 15 or more, else none), spread
    evenly over the sorted photos, so a burst of near-identical shots is not held out whole."""
    count = (3 if len(examples) >= 15 else 0) if requested < 0 else requested
    if count and len(examples) - count < 5:
        raise ConfigError(f"held_out_photos is {count} but the session has {len(examples)} photos, which would leave fewer than 5 "
                        f"to learn from; hold out fewer (0 for none) or add photos.")
    return [examples[int((i + 0.5) * len(examples) / count)].path.name for i in range(count)]


def split_held_out(examples: list[Example], names: list[str]) -> tuple[list[Example], list[Example]]:
    """(training photos, held-out photos): a held-out name no longer among the photos is left out of both."""
    held = set(names)
    return [e for e in examples if e.path.name not in held], [e for e in examples if e.path.name in held]


def smallest_side(examples: list[Example]) -> int:
    """The shortest side among the training images (header reads only)."""
    sides = []
    for example in examples:
        with Image.open(example.path) as img:
            sides.append(min(img.size))
    return min(sides)


def centre_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the centred square that training cuts from a non-square image."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def load_image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """An RGB image as a [3, H, W] tensor in [-1, 1], resized to a square of `resolution` if needed."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (resolution, resolution):
            left, top, side = centre_square(*img.size)
            img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def images_per_batch(resolution: int) -> int:
    """How many images the VAE encodes, or class images are made, at once: 4 at 512 px, 1 at 1024 (SDXL's VAE runs in
    fp32 there, 2 GB a layer for 4 images: too much beside the model on a 15 GB T4)."""
    return max(1, 4 * 512**2 // resolution**2)


@torch.no_grad()
def cached_latents(
    vae,
    paths: list[Path],
    resolution: int,
    cache_dir: Path,
    model_key: str,
    *,
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for each image, [N, 4, h, w] on the CPU in fp32.

    With `flip`, the mirrored images follow the originals (2N rows). Cached under `cache_dir` by content.
    """
    from safetensors.torch import load_file, save_file

    key_text = "|".join([model_key, str(resolution), str(flip)] + [_file_digest(p) for p in paths])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"latents-{key}.safetensors"
    if cache_file.is_file():
        cached = load_file(str(cache_file))
        return cached["mean"], cached["std"]
    device, dtype = vae.device, vae.dtype
    images = [load_image_tensor(p, resolution) for p in paths]
    if flip:
        images += [img.flip(-1) for img in images]
    means, stds = [], []
    batch_size = images_per_batch(resolution)
    for start in range(0, len(images), batch_size):
        batch = torch.stack(images[start : start + batch_size]).to(device, dtype)
        dist = vae.encode(batch).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    # contiguous, like the tensors read back from the cache: a different memory layout would pick
    # different kernels and make a fresh run differ (slightly) from a resumed one
    mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
    fileio.save_with(cache_file, lambda tmp: save_file({"mean": mean, "std": std}, str(tmp)))
    return mean, std


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def tokenize_all(tokenizers: list, prompts: list[str]) -> torch.Tensor:
    """Token ids of each prompt for every tokenizer of the model (one for SD 1.x/2.x, two for SDXL): [N, tokenizers, 77],
    so a batch's rows are picked the same way whatever the model."""
    return torch.stack([tokenize(tokenizer, prompts) for tokenizer in tokenizers], dim=1)


def class_images_dir(class_root: Path, model_key: str, class_prompt: str, resolution: int) -> Path:
    """Class images are reusable by every attempt with the same base model, prompt and size."""
    digest = hashlib.sha256(f"{model_key}|{class_prompt}|{resolution}".encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() else "-" for c in class_prompt.lower()).strip("-")[:40]
    return Path(class_root) / f"{slug}-{resolution}-{digest}"


@torch.no_grad()
def ensure_class_images(
    pipe,
    folder: Path,
    class_prompt: str,
    count: int,
    resolution: int,
    *,
    num_inference_steps: int = 25,
    progress: bool = False,
) -> list[Path]:
    """Generate the missing class images with `pipe` where it lives (seeded by index, so a resumed generation
    matches) and list them. `progress` shows a progress bar."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    wanted = [folder / f"class-{i:04d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(wanted) if not p.exists()]
    pipe.set_progress_bar_config(disable=True)
    batch_size = images_per_batch(resolution)
    with tqdm(total=len(missing), disable=not (progress and missing), desc="class images", unit="image") as bar:
        for start in range(0, len(missing), batch_size):
            indices = missing[start : start + batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(10_000 + i) for i in indices]
            latents = pipe(
                [class_prompt] * len(indices),
                num_inference_steps=num_inference_steps,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="latent",
            ).images
            images = decode_latents(pipe, latents, resolution, resolution)
            for i, image in zip(indices, images):
                fileio.save_with(wanted[i], lambda tmp, image=image: image.save(tmp, format="PNG"))
            bar.update(len(indices))
    return wanted

