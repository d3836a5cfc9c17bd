"""The benchmark's subjects (never seen in pretraining: their patterns exist only here), their "photos",
and the fixed prompt set, after the DreamBooth paper's (scene change, style, property change, another object); and
the style benchmark's subject, a drawing style pretraining never saw, with its works and prompts."""
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
    return render_scenes(photo_scenes(subject, count), size, seed)


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


# --- the style benchmark --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StyleSubject:
    """A drawing style the world model never saw, taught as the style preset teaches one: works of the style showing
    different things, each captioned with the token in the style's place ("a zwx of a red circle on grass")."""
    name: str
    style: str                   # the world's style the works are drawn in
    works: tuple[Scene, ...]     # what the works show
    prompts: tuple[Scene, ...]   # what the benchmark asks for in the style: things no work shows

    class_word = ""              # a style has no class (the style preset's class word is empty)


def _scenes(rows: str, style: str) -> tuple[Scene, ...]:
    """'red circle grass, orange square sky' → single-thing scenes in `style`."""
    return tuple(Scene((Thing(kind, colour),), background, style)
                 for colour, kind, background in (row.split() for row in rows.split(", ")))


STYLE_SUBJECTS = (
    StyleSubject(
        "pixel-art", "pixel",
        works=_scenes("red circle grass, orange square sky, yellow triangle room, blue star water, purple fish room, "
                      "white bird grass, blue bird sky, red square water, orange fish sky, yellow star grass, "
                      "purple circle room, white triangle water", "pixel"),
        prompts=_scenes("blue circle sky, yellow bird water, white square room, red fish grass, purple triangle water, "
                        "orange star room, white fish sky, yellow circle grass", "pixel"),
    ),
)


def style_caption(scene: Scene, token: str) -> str:
    """The world's caption with the token in the style's place: 'a zwx of a red circle on grass'."""
    return world.caption(world.with_style(scene, "photo")).replace("a photo of", f"a {token} of", 1)


def plain_prompts(subject: StyleSubject) -> tuple[Scene, ...]:
    """The style prompts' scenes as photos, paintings and sketches in turn: what must not turn into the new style."""
    return tuple(world.with_style(s, world.PRETRAIN_STYLES[i % len(world.PRETRAIN_STYLES)]) for i, s in enumerate(subject.prompts))


def render_scenes(scenes: tuple[Scene, ...] | list[Scene], size: int, seed: int) -> torch.Tensor:
    return world.render(world.batch_of(list(scenes)), size, torch.Generator().manual_seed(seed))
