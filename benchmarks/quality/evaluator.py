"""Our own stand-ins for DINO and CLIP: a small residual CNN trained on the world's labels.

Two outputs matter:
- an **object embedding** (the DINO role: subject fidelity, diversity): features pooled under a learnt mask of
  the things (trained on the renderer's own coverage), projected and L2-normalised, and trained with a
  supervised-contrastive loss on the thing's identity (kind × colour × pattern × pattern colour) between two
  views of the same thing on different backgrounds, in different styles, poses, positions and sizes. Background,
  style and pose become invariances, so the embedding tells subjects apart, not scenes;
- **heads** (the CLIP-T role: prompt fidelity, and "is this the subject?"): which kinds, colours, patterns and
  pattern colours are present (multi-hot, from the object-pooled features) and which background and style a
  picture has (from the whole picture's features).

It is trained on every pattern and style, the subjects' too: like DINO, it has seen more of the world than the
generator, so it can tell a subject from other things of its class, and pixel art from the styles the world model
knows. The first GPU run's evaluator (one global pool, heads only) read background and style perfectly but kinds at
chance, and its embedding was mostly background and style.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import world

log = logging.getLogger(__name__)

MULTI_HOT = {"kind": len(world.KINDS), "colour": len(world.COLOURS), "pattern": len(world.PATTERNS),
             "pattern_colour": len(world.COLOURS)}
ONE_OF = {"background": len(world.BACKGROUNDS), "style": len(world.STYLES)}
VERSION = 3  # part of the cache key: bump when the architecture or the training changes (3: pixel art, a fourth style)


@dataclass(frozen=True)
class EvaluatorSettings:
    size: int = 64
    steps: int = 1500
    batch: int = 256          # half of it: pairs of views of single things (the contrastive part); half: any scenes
    width: int = 32
    embed_dim: int = 128
    lr: float = 2e-3
    temperature: float = 0.1
    pool: int = 0             # >0: render this many batches once and cycle through them (a CPU's rendering is slow)
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "version": VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        groups = 8 if cout % 8 == 0 else 1
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + self.skip(x))


class Evaluator(nn.Module):
    """A stride-2 stem and two residual stages (1/4, 1/8 of the picture). Its input is the picture plus how close
    each pixel is to each of the world's colours: colour is what a small CNN learns last otherwise, and the
    subjects differ from their class first by colour and marking."""

    def __init__(self, width: int = 32, embed_dim: int = 128):
        super().__init__()
        w = width
        self.register_buffer("palette", torch.tensor([world.RGB[c] for c in world.COLOURS]), persistent=False)
        self.features = nn.Sequential(
            nn.Conv2d(3 + len(world.COLOURS), w, 3, 2, 1), nn.GroupNorm(8 if w % 8 == 0 else 1, w), nn.SiLU(),  # 1/2
            ResBlock(w, 2 * w, 2), ResBlock(2 * w, 2 * w),           # 1/4
            ResBlock(2 * w, 4 * w, 2), ResBlock(4 * w, 4 * w))       # 1/8
        d = 4 * w
        self.mask = nn.Conv2d(d, 1, 1)                               # where the things are
        self.heads = nn.ModuleDict({name: nn.Linear(2 * d, n) for name, n in MULTI_HOT.items()})
        self.heads.update({name: nn.Linear(d, n) for name, n in ONE_OF.items()})
        self.project = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, embed_dim))
        # training only: the thing under each cell, cell by cell (every cell of a thing is a label: far more signal
        # than one label a picture, so kinds and markings are learnt in a fraction of the steps)
        self.dense = nn.Conv2d(d, sum(MULTI_HOT.values()), 1)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        distance = ((images[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)  # [B, colours, H, W]
        closeness = torch.exp(-distance / 0.05)
        return torch.cat([images * 2 - 1, closeness * 2 - 1], 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pictures in [0, 1] → 'embedding' (not yet normalised), 'mask' logits [B, h, w] and logits per head."""
        # channels-last: oneDNN's convolutions on a CPU are ~10x faster so (and tensor cores like it on a GPU)
        fmap = self.features(self.inputs(images).contiguous(memory_format=torch.channels_last))
        mask_logits = self.mask(fmap)[:, 0]
        weight = mask_logits.sigmoid()[:, None]
        pooled = (fmap * weight).sum((2, 3)) / weight.sum((2, 3)).clamp(min=1e-3)
        peak = (fmap * weight).amax((2, 3))
        thing = torch.cat([pooled, peak], 1)
        scene = fmap.mean((2, 3))
        out = {name: self.heads[name](thing) for name in MULTI_HOT}
        out.update({name: self.heads[name](scene) for name in ONE_OF})
        out["embedding"] = self.project(thing)
        out["mask"] = mask_logits
        if self.training:
            out["dense"] = self.dense(fmap)
        return out


@dataclass
class Judgement:
    """What the evaluator sees in a set of pictures."""

    embedding: torch.Tensor            # [N, D], unit length: the object embedding
    present: dict[str, torch.Tensor]   # multi-hot heads: probabilities [N, classes]
    chosen: dict[str, torch.Tensor]    # background, style: the class index [N]


# --- training ---------------------------------------------------------------------------------------------

def identity(batch: world.SceneBatch) -> torch.Tensor:
    """One integer per scene for its first thing's identity: kind × colour × pattern × pattern colour (the pattern
    colour of a plain thing does not count)."""
    plain = batch.pattern[:, 0] == world.PATTERNS.index("plain")
    pattern_colour = torch.where(plain, 0, batch.pattern_colour[:, 0] + 1)
    ident = batch.kind[:, 0]
    for value, count in ((batch.colour[:, 0], len(world.COLOURS)), (batch.pattern[:, 0], len(world.PATTERNS)),
                         (pattern_colour, len(world.COLOURS) + 1)):
        ident = ident * count + value
    return ident


def training_batch(count: int, generator: torch.Generator, size: int, device) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """`count` pictures: the first half pairs of views of one thing (same identity; background, style, pose,
    position and size drawn anew), the second half any scenes (one or two things). Returns the pictures, the
    things' coverage, the labels and, for the pairs, the identities."""
    pairs = count // 4
    everything = dict(patterns=world.PATTERNS, styles=world.STYLES, photo=0.4)
    single = world.sample_scenes(pairs, generator, two_things=0.0, **everything)
    other_view = world.sample_scenes(pairs, generator, two_things=0.0, **everything)
    second = dataclasses.replace(single, background=other_view.background, style=other_view.style)
    mixed = world.sample_scenes(count - 2 * pairs, generator, two_things=0.3, **everything)
    scenes = concat([single, second, mixed])
    images, coverage = world.render(scenes, size, generator, device, with_mask=True)
    ident = identity(single)
    targets = {k: v.to(device) for k, v in world.labels(scenes).items()}
    targets.update({f"slot_{k}": getattr(scenes, k).to(device) for k in MULTI_HOT})
    return augment(images, generator), coverage, targets, torch.cat([ident, ident]).to(device)


def concat(batches: list[world.SceneBatch]) -> world.SceneBatch:
    return world.SceneBatch(**{k: torch.cat([getattr(b, k) for b in batches]) for k in vars(batches[0])})


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Generated pictures are softer and noisier than renders, and a little off in brightness: a random blur
    (none, 3×3 or 5×5), grain and a brightness change, per picture."""
    n = images.shape[0]

    def rand(*shape):
        return torch.rand((n, *shape), generator=generator, device=generator.device).to(images.device)

    soft3 = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    soft5 = F.avg_pool2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    pick = rand(1, 1, 1)
    out = torch.where(pick < 0.4, images, torch.where(pick < 0.8, soft3, soft5))
    grain = torch.randn(images.shape, generator=generator, device=generator.device).to(images.device)
    out = out * (0.9 + 0.2 * rand(1, 1, 1)) + grain * 0.04 * rand(1, 1, 1)
    return out.clamp(0, 1)


def supervised_contrastive(embedding: torch.Tensor, ident: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al. 2020): every other picture of the same identity is a positive."""
    z = F.normalize(embedding.float(), dim=1)
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, -1e9)
    positive = (ident[:, None] == ident[None, :]) & ~eye
    log_prob = logits - logits.logsumexp(1, keepdim=True)
    return -(log_prob * positive).sum(1).div(positive.sum(1).clamp(min=1)).mean()


def evaluator_loss(out: dict, targets: dict, coverage: torch.Tensor, ident: torch.Tensor, temperature: float) -> torch.Tensor:
    """Heads (multi-hot BCE, one-of CE) + the things' mask + cell-by-cell attributes of the thing under each cell +
    supervised-contrastive identity on the pairs of views."""
    loss = sum(F.binary_cross_entropy_with_logits(out[k].float(), targets[k]) for k in MULTI_HOT)
    loss = loss + sum(F.cross_entropy(out[k].float(), targets[k]) for k in ONE_OF)
    h = out["mask"].shape[-1]
    cells = F.adaptive_avg_pool2d(coverage, h)                        # [B, SLOTS, h, w]
    covered = cells.sum(1).clamp(max=1)
    loss = loss + F.binary_cross_entropy_with_logits(out["mask"].float(), covered)
    if "dense" in out:
        weight, owner = cells.max(1)                                  # the thing that covers most of each cell
        weight = weight * (weight > 0.3)
        dense = out["dense"].float().split(list(MULTI_HOT.values()), 1)
        for logits, name in zip(dense, MULTI_HOT):
            target = targets[f"slot_{name}"].gather(1, owner.flatten(1)).view_as(owner)
            per_cell = F.cross_entropy(logits, target, reduction="none")
            if name == "pattern_colour":  # a plain thing has none
                weight_here = weight * (targets["slot_pattern"].gather(1, owner.flatten(1)).view_as(owner) != 0)
            else:
                weight_here = weight
            loss = loss + (per_cell * weight_here).sum() / weight_here.sum().clamp(min=1)
    return loss + 0.5 * supervised_contrastive(out["embedding"][:len(ident)], ident, temperature)


def train_evaluator(settings: EvaluatorSettings, device) -> Evaluator:
    """Fit on fresh random scenes each step (every pattern)."""
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    model = Evaluator(settings.width, settings.embed_dim).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1)
    model.train()
    pool = [training_batch(settings.batch, generator, settings.size, device) for _ in range(settings.pool)]
    for step in range(settings.steps):
        if pool:
            images, covered, targets, ident = pool[step % len(pool)]
        else:
            images, covered, targets, ident = training_batch(settings.batch, generator, settings.size, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(images)
        loss = evaluator_loss(out, targets, covered, ident, settings.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == settings.steps - 1:
            log.info("evaluator step %d/%d loss %.4f", step + 1, settings.steps, loss.item())
    return model.eval().requires_grad_(False)


def ensure_evaluator(settings: EvaluatorSettings, cache: Path | None, device) -> tuple[Evaluator, bool]:
    """The cached evaluator (cache/evaluator-<key>.pt) or a new one, trained and cached; and whether it came
    from the cache."""
    path = Path(cache) / f"evaluator-{settings.key()}.pt" if cache else None
    if path is not None and path.is_file():
        model = Evaluator(settings.width, settings.embed_dim)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("evaluator from the cache: %s", path)
        return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False), True
    model = train_evaluator(settings, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(path)
    return model, False


# --- judging ----------------------------------------------------------------------------------------------

@torch.no_grad()
def judge(model: Evaluator, images: torch.Tensor, batch_size: int = 256) -> Judgement:
    device = next(model.parameters()).device
    features, present, chosen = [], {k: [] for k in MULTI_HOT}, {k: [] for k in ONE_OF}
    for start in range(0, len(images), batch_size):
        out = model(images[start:start + batch_size].to(device).float())
        features.append(F.normalize(out["embedding"].float(), dim=1).cpu())
        for k in MULTI_HOT:
            present[k].append(out[k].float().sigmoid().cpu())
        for k in ONE_OF:
            chosen[k].append(out[k].argmax(1).cpu())
    return Judgement(torch.cat(features), {k: torch.cat(v) for k, v in present.items()}, {k: torch.cat(v) for k, v in chosen.items()})


def label_accuracy(judgement: Judgement, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per head: exact multi-hot match (threshold 0.5) or the right class."""
    scores = {k: ((judgement.present[k] > 0.5).float() == targets[k].cpu()).all(1).float().mean().item() for k in MULTI_HOT}
    scores.update({k: (judgement.chosen[k] == targets[k].cpu()).float().mean().item() for k in ONE_OF})
    return scores
