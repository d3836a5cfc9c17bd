"""A procedural world of captioned pictures: shapes and simple creatures, coloured and patterned, on four
backgrounds, in three styles (and a fourth, pixel art, that pretraining never sees: the style benchmark's subject).
Rendered in batches with torch (on the GPU when there is one), seeded.

A scene's caption-level attributes (kind, colour, pattern, background, style) are integer indices into the
tuples below, so the same batch gives images, captions and labels. Geometry (position, size, angle, facing)
and texture phases are drawn per render: many pictures per caption, as with real photos.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

KINDS = ("circle", "square", "triangle", "star", "fish", "bird")
CREATURES = ("fish", "bird")
COLOURS = ("red", "orange", "yellow", "blue", "purple", "white")
RGB = {"red": (0.85, 0.12, 0.12), "orange": (0.98, 0.55, 0.08), "yellow": (0.97, 0.88, 0.15),
       "blue": (0.12, 0.25, 0.85), "purple": (0.55, 0.18, 0.72), "white": (0.97, 0.97, 0.95)}
PATTERNS = ("plain", "striped", "dotted", "checkered", "zigzag")
PRETRAIN_PATTERNS = ("plain", "striped", "dotted")  # checkered and zigzag exist only on the benchmark's subjects
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checks", "zigzag": "zigzags"}
BACKGROUNDS = ("sky", "grass", "water", "room")
BACKGROUND_PHRASES = {"sky": "in the sky", "grass": "on grass", "water": "on water", "room": "in a room"}
STYLES = ("photo", "painting", "sketch", "pixel")
PRETRAIN_STYLES = ("photo", "painting", "sketch")  # pixel art exists only in the style benchmark's photos
SLOTS = 2  # at most two things per picture


@dataclass(frozen=True)
class Thing:
    kind: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str = "white"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    style: str = "photo"


@dataclass
class SceneBatch:
    """Scenes as index tensors [B, SLOTS] (things) and [B] (background, style); `present` marks used slots."""

    kind: torch.Tensor
    colour: torch.Tensor
    pattern: torch.Tensor
    pattern_colour: torch.Tensor
    present: torch.Tensor
    background: torch.Tensor
    style: torch.Tensor

    def __len__(self) -> int:
        return self.background.shape[0]

    def to(self, device) -> "SceneBatch":
        return SceneBatch(**{k: v.to(device) for k, v in vars(self).items()})

    def index(self, rows: torch.Tensor) -> "SceneBatch":
        return SceneBatch(**{k: v[rows.to(v.device)] for k, v in vars(self).items()})


def batch_of(scenes: list[Scene]) -> SceneBatch:
    """Named scenes (subjects, prompts) as a SceneBatch."""
    def slot_values(attr: str, names: tuple[str, ...], fill: str) -> torch.Tensor:
        rows = [[names.index(getattr(t, attr)) for t in s.things] + [names.index(fill)] * (SLOTS - len(s.things)) for s in scenes]
        return torch.tensor(rows)

    for scene in scenes:
        if not 1 <= len(scene.things) <= SLOTS:
            raise ValueError(f"a scene holds 1 to {SLOTS} things, not {len(scene.things)}")
    return SceneBatch(
        kind=slot_values("kind", KINDS, KINDS[0]), colour=slot_values("colour", COLOURS, COLOURS[0]),
        pattern=slot_values("pattern", PATTERNS, "plain"), pattern_colour=slot_values("pattern_colour", COLOURS, COLOURS[0]),
        present=torch.tensor([[i < len(s.things) for i in range(SLOTS)] for s in scenes]),
        background=torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
        style=torch.tensor([STYLES.index(s.style) for s in scenes]),
    )


def scenes_of(batch: SceneBatch) -> list[Scene]:
    batch = batch.to("cpu")
    scenes = []
    for b in range(len(batch)):
        things = tuple(
            Thing(KINDS[batch.kind[b, i]], COLOURS[batch.colour[b, i]], PATTERNS[batch.pattern[b, i]], COLOURS[batch.pattern_colour[b, i]])
            for i in range(SLOTS) if batch.present[b, i]
        )
        scenes.append(Scene(things, BACKGROUNDS[batch.background[b]], STYLES[batch.style[b]]))
    return scenes


def sample_scenes(count: int, generator: torch.Generator, *, patterns: tuple[str, ...] = PRETRAIN_PATTERNS,
                  styles: tuple[str, ...] = PRETRAIN_STYLES, two_things: float = 0.2, photo: float = 0.5) -> SceneBatch:
    """Random scenes on the generator's device: half the things plain, the rest with one of `patterns`' others;
    a second thing `two_things` of the time; photos `photo` of the time, else one of `styles`' others."""
    device = generator.device

    def draw(high: int, shape) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=generator, device=device)

    def chance(p: float, shape) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device) < p

    shape = (count, SLOTS)
    allowed = torch.tensor([PATTERNS.index(p) for p in patterns], device=device)
    others = allowed[allowed != 0] if len(allowed) > 1 else allowed
    pattern = torch.where(chance(0.5, shape), others[draw(len(others), shape)], allowed[0])
    colour = draw(len(COLOURS), shape)
    pattern_colour = (colour + 1 + draw(len(COLOURS) - 1, shape)) % len(COLOURS)  # never the body's colour
    present = torch.stack([torch.ones(count, dtype=torch.bool, device=device), chance(two_things, (count,))], 1)
    drawn = torch.tensor([STYLES.index(s) for s in styles if s != "photo"], device=device)
    style = torch.where(chance(photo, (count,)), 0, drawn[draw(len(drawn), (count,))])
    return SceneBatch(kind=draw(len(KINDS), shape), colour=colour, pattern=pattern, pattern_colour=pattern_colour,
                      present=present, background=draw(len(BACKGROUNDS), (count,)), style=style)


# --- captions ----------------------------------------------------------------------------------------

def describe(thing: Thing, name: str | None = None, omit: frozenset[str] = frozenset()) -> str:
    """'a red star with white stripes'; `name` replaces 'a <colour> <kind>' (a DreamBooth subject: 'zwx star');
    `omit` leaves out the "colour" or the "pattern" ('a star with white stripes', 'a red star')."""
    colour = "" if "colour" in omit else f"{thing.colour} "
    text = name or f"{article(colour or thing.kind)} {colour}{thing.kind}"
    if thing.pattern != "plain" and name is None and "pattern" not in omit:
        text += f" with {thing.pattern_colour} {PATTERN_NOUNS[thing.pattern]}"
    return text


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


OMITTABLE = ("colour", "pattern", "background")  # what an incomplete caption may leave out, as people's captions do


def caption(scene: Scene, omit: frozenset[str] = frozenset()) -> str:
    things = " and ".join(describe(t, omit=omit) for t in scene.things)
    where = "" if "background" in omit else f" {BACKGROUND_PHRASES[scene.background]}"
    return f"a {scene.style} of {things}{where}"


def captions(batch: SceneBatch, omit: float = 0.0, generator: torch.Generator | None = None) -> list[str]:
    """Each scene's caption; with `omit`, each of OMITTABLE is left out of a caption with that chance (the class
    prompt 'a photo of a star' then means a star of any colour anywhere, as DreamBooth's prior needs)."""
    scenes = scenes_of(batch)
    if not omit:
        return [caption(s) for s in scenes]
    left_out = torch.rand(len(scenes), len(OMITTABLE), generator=generator) < omit
    return [caption(s, frozenset(a for a, out in zip(OMITTABLE, row) if out)) for s, row in zip(scenes, left_out.tolist())]


def token_ids(tokenizer, texts: list[str], cache: dict[str, list[int]] | None = None) -> torch.Tensor:
    """CLIP token ids padded to 77, word by word from a cache: CLIP's tokenizer splits on spaces before its BPE,
    so a caption's ids are its words' ids in order (tests check this against the tokenizer itself)."""
    cache = {} if cache is None else cache
    length = tokenizer.model_max_length
    rows = []
    for text in texts:
        ids = [tokenizer.bos_token_id]
        for word in text.split():
            if word not in cache:
                cache[word] = tokenizer(word, add_special_tokens=False).input_ids
            ids += cache[word]
        ids = ids[:length - 1] + [tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return torch.tensor(rows)


# --- labels ------------------------------------------------------------------------------------------

def labels(batch: SceneBatch) -> dict[str, torch.Tensor]:
    """What the evaluator learns: which kinds, body colours, patterns and pattern colours are present
    (multi-hot), and the background and style (one class each)."""
    def present(values: torch.Tensor, classes: int, mask: torch.Tensor) -> torch.Tensor:
        hot = F.one_hot(values, classes).float() * mask[..., None].float()
        return hot.amax(dim=1)

    plain = batch.pattern == PATTERNS.index("plain")
    return {
        "kind": present(batch.kind, len(KINDS), batch.present),
        "colour": present(batch.colour, len(COLOURS), batch.present),
        "pattern": present(batch.pattern, len(PATTERNS), batch.present),
        "pattern_colour": present(batch.pattern_colour, len(COLOURS), batch.present & ~plain),
        "background": batch.background,
        "style": batch.style,
    }


# --- rendering ---------------------------------------------------------------------------------------

def render(batch: SceneBatch, size: int, generator: torch.Generator, device=None, *, with_mask: bool = False):
    """Pictures [B, 3, size, size] in [0, 1] on `device` (default: the batch's). Geometry and textures come
    from `generator`: a CPU one gives the same pictures on any device; one on the GPU is faster there.
    `with_mask`: also each thing's visible coverage [B, SLOTS, size, size] in [0, 1] (a later thing hides an
    earlier one): what the evaluator learns to attend to, pixel by pixel. The pictures are the same either way."""
    device = torch.device(device or batch.background.device)
    batch = batch.to(device)
    n = len(batch)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return (low + (high - low) * torch.rand((n, *shape), generator=generator, device=generator.device)).to(device)

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size, device=device), torch.linspace(-1, 1, size, device=device), indexing="ij")
    grid = (xs[None], ys[None])
    image = backgrounds(batch.background, grid, uniform)
    two = batch.present[:, 1]
    # one thing: near the centre; two: one left, one right, smaller
    centre_x = torch.where(two[:, None], torch.stack([uniform(-0.5, -0.35), uniform(0.35, 0.5)], 1), uniform(-0.2, 0.2, SLOTS))
    centre_y = uniform(-0.15, 0.2, SLOTS)
    radius = torch.where(two[:, None], uniform(0.26, 0.34, SLOTS), uniform(0.36, 0.55, SLOTS))
    creature = torch.isin(batch.kind, torch.tensor([KINDS.index(k) for k in CREATURES], device=device))
    angle = torch.where(creature, uniform(-0.35, 0.35, SLOTS), uniform(0, 2 * math.pi, SLOTS))
    facing = torch.where(uniform(0, 1, SLOTS) < 0.5, -1.0, 1.0)
    palette = torch.tensor([RGB[c] for c in COLOURS], device=device)
    coverage = []
    for slot in range(SLOTS):
        u, v = local_coords(grid, centre_x[:, slot], centre_y[:, slot], radius[:, slot], angle[:, slot], facing[:, slot])
        alpha = shape_alpha(batch.kind[:, slot], u, v, pixel=2 / size / radius[:, slot, None, None]) * batch.present[:, slot, None, None]
        marked = pattern_mask(batch.pattern[:, slot], u, v)
        body, mark = palette[batch.colour[:, slot]], palette[batch.pattern_colour[:, slot]]
        colour = torch.where(marked[:, None] > 0.5, mark[:, :, None, None], body[:, :, None, None])
        shade = (1.05 - 0.18 * (u + v).clamp(-1.5, 1.5) / 1.5)[:, None]  # light from the top left
        colour = colour * shade
        eye = creature_eye(batch.kind[:, slot], u, v)
        colour = colour * (1 - eye[:, None])
        image = image * (1 - alpha[:, None]) + colour * alpha[:, None]
        coverage = [c * (1 - alpha) for c in coverage] + [alpha]
    pictures = apply_style(image.clamp(0, 1), batch.style, generator).clamp(0, 1)
    return (pictures, torch.stack(coverage, 1)) if with_mask else pictures


def local_coords(grid, cx, cy, radius, angle, facing):
    """Pixel coordinates in the thing's own frame: unit radius, rotated, mirrored when facing left."""
    xs, ys = grid
    dx = (xs - cx[:, None, None]) / radius[:, None, None]
    dy = (ys - cy[:, None, None]) / radius[:, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u = (cos * dx + sin * dy) * facing[:, None, None]
    v = -sin * dx + cos * dy
    return u, v


def shape_alpha(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """Coverage of each kind's shape (a signed distance, softened over about a pixel), picked per picture."""
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u)
    star_radius = 0.5 + 0.45 * torch.cos(5 * theta - math.pi / 2).clamp(min=0) ** 2
    triangle = torch.maximum(torch.maximum(v * 1.0, -0.866 * u - 0.5 * v), 0.866 * u - 0.5 * v) - 0.45
    fish_body = torch.sqrt(((u - 0.15) / 0.8) ** 2 + (v / 0.5) ** 2) - 1
    fish_tail = torch.maximum(u + 0.6, (v.abs() - (-0.6 - u) * 0.9)).clamp(min=-1) * 1.0
    fish_tail = torch.maximum(fish_tail, -u - 1.05)
    bird_body = torch.sqrt(((u + 0.1) / 0.75) ** 2 + ((v - 0.1) / 0.55) ** 2) - 1
    bird_head = torch.sqrt((u - 0.55) ** 2 + (v + 0.35) ** 2) - 0.32
    beak = torch.maximum(torch.maximum(0.8 - u, u - 1.15), (v + 0.35).abs() - (1.15 - u) * 0.4)
    distances = torch.stack([
        r - 0.9,                                                   # circle
        torch.maximum(u.abs(), v.abs()) - 0.72,                    # square
        triangle * 1.6,                                            # triangle
        r - star_radius,                                           # star
        torch.minimum(fish_body * 0.6, fish_tail),                 # fish
        torch.minimum(torch.minimum(bird_body * 0.6, bird_head), beak),  # bird
    ], 1)
    chosen = distances.gather(1, kind[:, None, None, None].expand(-1, 1, *u.shape[1:]))[:, 0]
    return (0.5 - chosen / pixel).clamp(0, 1)


def pattern_mask(pattern: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """1 where the second colour goes: stripes, dots, checks or a zigzag band, in the thing's frame."""
    plain = torch.zeros_like(u)
    stripes = (torch.sin(v * 9.0) > 0.25).float()
    dots = ((torch.remainder(u * 2.6, 1) - 0.5) ** 2 + (torch.remainder(v * 2.6, 1) - 0.5) ** 2 < 0.06).float()
    checks = ((torch.floor(u * 2.2) + torch.floor(v * 2.2)) % 2 == 0).float()
    zigzag = ((v - 0.25 * (2 * (torch.remainder(u * 2.5, 1) - 0.5).abs() * 2 - 1)).abs() < 0.17).float()
    masks = torch.stack([plain, stripes, dots, checks, zigzag], 1)
    return masks.gather(1, pattern[:, None, None, None].expand(-1, 1, *u.shape[1:]))[:, 0]


def creature_eye(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    fish_eye = ((u - 0.6) ** 2 + (v + 0.12) ** 2 < 0.012).float()
    bird_eye = ((u - 0.62) ** 2 + (v + 0.42) ** 2 < 0.01).float()
    is_fish = (kind == KINDS.index("fish")).float()[:, None, None]
    is_bird = (kind == KINDS.index("bird")).float()[:, None, None]
    return fish_eye * is_fish + bird_eye * is_bird


def backgrounds(background: torch.Tensor, grid, uniform) -> torch.Tensor:
    """Sky (gradient and clouds), grass (sky above a textured field), water (waves), room (wall and floor)."""
    xs, ys = grid
    n = background.shape[0]
    device = xs.device

    def colour(*rgb: float) -> torch.Tensor:
        return torch.tensor(rgb, device=device)[None, :, None, None]

    def band(value: torch.Tensor) -> torch.Tensor:
        return value[:, None, None]

    t = (ys + 1) / 2
    sky = colour(0.35, 0.6, 0.95) * (1 - t[:, None]) + colour(0.7, 0.85, 1.0) * t[:, None]
    sky = sky.expand(n, -1, -1, -1)
    cloud = torch.zeros(n, *xs.shape[1:], device=device)
    for _ in range(2):
        cx, cy, w = band(uniform(-0.9, 0.9)), band(uniform(-0.9, -0.4)), band(uniform(0.25, 0.45))
        cloud = torch.maximum(cloud, (1 - ((xs - cx) ** 2 / w ** 2 + (ys - cy) ** 2 / (w * 0.35) ** 2)).clamp(0, 1))
    sky = sky * (1 - cloud[:, None]) + colour(0.98, 0.98, 1.0) * cloud[:, None]
    horizon = band(uniform(-0.55, -0.3))
    blades = 0.82 + 0.18 * torch.sin(xs * 40 + 3 * torch.sin(ys * 9 + band(uniform(0, 6.3))))
    field = colour(0.22, 0.58, 0.18) * blades[:, None] * (0.8 + 0.3 * t[:, None])
    grass = torch.where((ys > horizon)[:, None], field, sky)
    waves = torch.sin(ys * 22 + 2.5 * torch.sin(xs * 5 + band(uniform(0, 6.3))))
    water = colour(0.05, 0.38, 0.55) * (0.85 + 0.25 * t[:, None]) + 0.25 * (waves > 0.8).float()[:, None]
    floor_line = band(uniform(0.25, 0.45))
    planks = 1 - 0.25 * (torch.remainder(xs * 3 + band(uniform(0, 1)), 1) < 0.06).float()
    wall = colour(0.86, 0.78, 0.64) * (0.95 + 0.05 * torch.sin(xs * 3))[:, None]
    room = torch.where((ys > floor_line)[:, None], colour(0.5, 0.31, 0.17) * planks[:, None], wall)
    options = torch.stack([sky, grass, water, room.expand(n, -1, -1, -1)], 1)
    return options[torch.arange(n, device=device), background]


def apply_style(image: torch.Tensor, style: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """photo: as rendered plus grain; painting: soft, few colours, brush texture; sketch: dark lines on paper over a
    light wash of the colours; pixel art: blocks of a sixteenth of the picture (the world VAE's latent cells) in a
    palette of five levels a channel. Every style's randomness is drawn for every picture, so adding a style does not
    change the pictures the others make from a seed."""
    n, _, h, w = image.shape
    device = image.device
    grain = torch.randn((n, 1, h, w), generator=generator, device=generator.device).to(device)
    photo = image + 0.025 * grain
    soft = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    strokes = torch.randn((n, 1, h // 4, w // 4), generator=generator, device=generator.device).to(device)
    strokes = F.interpolate(strokes, size=(h, w), mode="bilinear")
    painting = torch.round((soft + 0.06 * strokes) * 5) / 5
    grey = image.mean(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=device)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, sobel[None, None]), F.conv2d(padded, sobel.t()[None, None])
    lines = ((torch.sqrt(gx ** 2 + gy ** 2) - 0.2) * 3).clamp(0, 1)
    paper = torch.tensor([0.96, 0.94, 0.88], device=device)[None, :, None, None]
    sketch = (0.55 * paper + 0.45 * image) * (1 - 0.85 * lines)
    block = max(1, h // 16)
    pixel = torch.round(F.interpolate(F.avg_pool2d(image, block), scale_factor=block, mode="nearest") * 4) / 4
    chosen = torch.stack([photo, painting, sketch, pixel], 1)
    return chosen[torch.arange(n, device=device), style.to(device)]


def with_style(scene: Scene, style: str) -> Scene:
    return replace(scene, style=style)
