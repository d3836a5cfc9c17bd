"""The benchmark's subjects (never seen in pretraining: their patterns exist only here), their "photos",
and the fixed prompt set, after the DreamBooth paper's (scene change, style, property change, another object)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import world
from .world import Scene, Thing


@dataclass(frozen=True)
class Subject:
    name: str
    thing: Thing

    @property
    def class_word(self) -> str:
        return self.thing.kind


SUBJECTS = (
    Subject("checkered-star", Thing("star", "orange", "checkered", "blue")),     # a new pattern on a known shape
    Subject("zigzag-fish", Thing("fish", "purple", "zigzag", "yellow")),         # a creature with a distinctive marking
)


@dataclass(frozen=True)
class Prompt:
    text: str                  # {subject} becomes "<token> <class>"
    change: str                # scene | style | property | another object
    background: str
    style: str = "photo"
    colour: str | None = None  # a property change: the subject in this colour
    other: Thing | None = None  # another thing that must appear beside the subject


PROMPTS = (
    Prompt("a photo of {subject} on grass", "scene", "grass"),
    Prompt("a photo of {subject} on water", "scene", "water"),
    Prompt("a photo of {subject} in a room", "scene", "room"),
    Prompt("a photo of {subject} in the sky", "scene", "sky"),
    Prompt("a painting of {subject} on grass", "style", "grass", style="painting"),
    Prompt("a sketch of {subject} in a room", "style", "room", style="sketch"),
    Prompt("a photo of red {subject} on water", "property", "water", colour="red"),
    Prompt("a photo of {subject} and a blue circle on grass", "another object", "grass", other=Thing("circle", "blue")),
)


def prompt_text(prompt: Prompt, token: str, class_word: str) -> str:
    return prompt.text.replace("{subject}", f"{token} {class_word}".strip())


def photo_scenes(subject: Subject, count: int) -> list[Scene]:
    """The subject alone, as photos, on every background in turn (the pose varies with the render's seed)."""
    return [Scene((subject.thing,), world.BACKGROUNDS[i % len(world.BACKGROUNDS)], "photo") for i in range(count)]


def render_photos(subject: Subject, count: int, size: int, seed: int) -> torch.Tensor:
    return world.render(world.batch_of(photo_scenes(subject, count)), size, torch.Generator().manual_seed(seed))


def save_photos(images: torch.Tensor, folder: Path, stem: str) -> list[Path]:
    """PNG files, as a user's photos would be (then `dreamnb.images.prepare_photos` takes them in)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}-{i:02d}.png"
        Image.fromarray(to_uint8(image)).save(path)
        paths.append(path)
    return paths


def to_uint8(image: torch.Tensor):
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
