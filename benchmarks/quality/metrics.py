"""The DreamBooth paper's measures, on our evaluator's judgements of generated and real pictures.

- subject fidelity: mean cosine similarity of generated pictures' embeddings to the real photos' (DINO score);
  and the share of generated pictures in which the evaluator finds the subject itself (its kind, colour, pattern
  and pattern colour all present);
- prompt fidelity: the share of what a prompt asks for (background, style, a new colour, another thing) that the
  evaluator finds (CLIP-T's role);
- prior preservation (PRES): the share of class-prompt pictures ("photo of a star") that show the subject;
  lower is better;
- diversity (DIV): mean pairwise embedding distance (1 - cosine) of pictures from one prompt;
- for a style (`style_scores`): how often pictures asked for in it are in it, whether they show what was asked, and
  how often the style leaks into pictures asked for in other styles (lower is better).
"""
from __future__ import annotations

import statistics

import torch

from . import world
from .evaluator import Judgement
from .subjects import Prompt, Subject


def cosine_to(embedding: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of every row of `embedding` to every row of `reference` (both unit length)."""
    return (embedding @ reference.T).mean().item()


def diversity(embedding: torch.Tensor) -> float:
    """Mean 1 - cosine over distinct pairs; 0 for identical pictures."""
    n = embedding.shape[0]
    if n < 2:
        return 0.0
    similarity = embedding @ embedding.T
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return (1 - off_diagonal / (n * (n - 1))).item()


def shows(judgement: Judgement, thing: world.Thing, colour: str | None = None) -> torch.Tensor:
    """[N] bool: the evaluator finds this thing (in `colour` instead of its own, when given)."""
    checks = [("kind", world.KINDS.index(thing.kind)), ("colour", world.COLOURS.index(colour or thing.colour))]
    if thing.pattern != "plain":
        checks += [("pattern", world.PATTERNS.index(thing.pattern)), ("pattern_colour", world.COLOURS.index(thing.pattern_colour))]
    return torch.stack([judgement.present[head][:, index] > 0.5 for head, index in checks]).all(0)


def subject_rate(judgement: Judgement, subject: Subject) -> float:
    return shows(judgement, subject.thing).float().mean().item()


def prompt_fidelity(judgement: Judgement, prompt: Prompt) -> float:
    """Share of the prompt's asks met, averaged over pictures: background and style always; the new colour
    (a property change); the other thing's kind and colour."""
    checks = [judgement.chosen["background"] == world.BACKGROUNDS.index(prompt.background),
              judgement.chosen["style"] == world.STYLES.index(prompt.style)]
    if prompt.colour is not None:
        checks.append(judgement.present["colour"][:, world.COLOURS.index(prompt.colour)] > 0.5)
    if prompt.other is not None:
        checks.append(judgement.present["kind"][:, world.KINDS.index(prompt.other.kind)] > 0.5)
        checks.append(judgement.present["colour"][:, world.COLOURS.index(prompt.other.colour)] > 0.5)
    return torch.stack(checks).float().mean().item()


def caption_fidelity(judgement: Judgement, scenes: world.SceneBatch) -> dict[str, float]:
    """How often the evaluator finds each part of the captions that made the pictures: the world model's own
    prompt following (and, on renders of the same captions, the evaluator's ceiling)."""
    targets = world.labels(scenes.to("cpu"))
    scores = {}
    for head in ("kind", "colour"):
        wanted = targets[head] > 0
        found = judgement.present[head] > 0.5
        scores[head] = (found & wanted).sum().item() / max(wanted.sum().item(), 1)
    for head in ("background", "style"):
        scores[head] = (judgement.chosen[head] == targets[head]).float().mean().item()
    scores["mean"] = statistics.fmean(scores.values())
    return scores


def style_scores(in_style: Judgement, in_style_scenes: world.SceneBatch, plain: Judgement, plain_scenes: world.SceneBatch,
                 style: str) -> dict[str, float]:
    """`style_found`: the share of pictures asked for in `style` that the evaluator calls so; `content_fidelity`: the
    share of their kinds, colours and backgrounds found; `style_leak`: the share of pictures asked for in another
    style that come out in `style` (lower is better); `plain_prompt_fidelity`: how well those follow their captions."""
    asked = caption_fidelity(in_style, in_style_scenes)
    return {"style_found": asked["style"],
            "content_fidelity": statistics.fmean(asked[k] for k in ("kind", "colour", "background")),
            "style_leak": (plain.chosen["style"] == world.STYLES.index(style)).float().mean().item(),
            "plain_prompt_fidelity": caption_fidelity(plain, plain_scenes)["mean"]}


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def class_scenes(subject: Subject, count: int, generator: torch.Generator) -> world.SceneBatch:
    """Other things of the subject's class, as its class prompt asks for them ("a photo of a star"): its kind, any
    colour, a pretraining pattern, on any background; photos."""
    scenes = world.sample_scenes(count, generator, two_things=0.0, photo=1.0)
    scenes.kind[:] = world.KINDS.index(subject.thing.kind)
    return scenes


def subject_separation(evaluator, subjects, size: int, count: int = 16, seed: int = 4321) -> dict[str, dict[str, float]]:
    """Per subject, on renders: how close held-out photos are to its training photos (`own`), against the other
    subjects' photos (`other_subjects`) and other things of its class (`class`); how often the evaluator finds the
    subject in its own held-out photos (`found_own`) and in pictures of its class (`found_in_class`, a false alarm:
    what PRES would count); and `own_other_styles`: the subject as a painting or a sketch against its photos (the
    prompt set's style changes), beside `other_subjects_other_styles`."""
    from .evaluator import judge
    from .subjects import render_photos

    generator = torch.Generator().manual_seed(seed)
    photos = {s.name: judge(evaluator, render_photos(s, count, size, seed=1000)) for s in subjects}
    held_out = {s.name: judge(evaluator, render_photos(s, count, size, seed=2000)) for s in subjects}
    figures = {}
    for s in subjects:
        kin = judge(evaluator, world.render(class_scenes(s, count, generator), size, generator))
        others = [cosine_to(held_out[o.name].embedding, photos[s.name].embedding) for o in subjects if o.name != s.name]
        styled = {o.name: judge(evaluator, world.render(world.batch_of(
            [world.Scene((o.thing,), world.BACKGROUNDS[i % 4], ("painting", "sketch")[i % 2]) for i in range(count)]), size, generator))
            for o in subjects}
        others_styled = [cosine_to(styled[o.name].embedding, photos[s.name].embedding) for o in subjects if o.name != s.name]
        figures[s.name] = {"own": cosine_to(held_out[s.name].embedding, photos[s.name].embedding),
                           "other_subjects": statistics.fmean(others) if others else float("nan"),
                           "class": cosine_to(kin.embedding, photos[s.name].embedding),
                           "found_own": subject_rate(held_out[s.name], s), "found_in_class": subject_rate(kin, s),
                           "own_other_styles": cosine_to(styled[s.name].embedding, photos[s.name].embedding),
                           "other_subjects_other_styles": statistics.fmean(others_styled) if others_styled else float("nan")}
    return figures
