"""The training-quality harness: DreamBooth attempts on the world model, through dreamnb's own entry points, scored
by our evaluator.

    python -m benchmarks.quality.run [--out DIR] [--budget-seconds 540]   # on a GPU: the table in under 10 minutes
    python -m benchmarks.quality.run --tiny                                # on a CPU: every step, tiny and fast (CI)

Order of work: the world model (pretrained, or from the cache) → the evaluator (trained on the world's labels) →
the world model's own prompt following → per configuration × subject × seed: a session with the subject's photos
(`dreamnb.images.prepare_photos`), `dreamnb.train.train` with a `TrainConfig` from the configuration's preset, then
`attempt_pipeline` + `sample.generate` on the fixed prompts and seeds → metrics → markdown tables and
results.json. Configurations run in priority order; those that no longer fit the time budget are listed as skipped.
The style preset's configurations take the style benchmark's subject (works of a style pretraining never saw, with
captions) instead of the object subjects, and are measured and tabled on their own.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreamnb.world_model import CLASS_PROMPT, INSTANCE_PROMPT

from . import metrics, pretrain, world
from .evaluator import EvaluatorSettings, Judgement, ensure_evaluator, judge, label_accuracy
from .subjects import (PROMPTS, STYLE_SUBJECTS, SUBJECTS, StyleSubject, Subject, plain_prompts, prompt_text, render_photos,
                       render_scenes, save_photos, style_caption)

log = logging.getLogger(__name__)

TOKEN = "zwx"             # a rare token: unseen in pretraining, so its embedding carries no meaning yet
GENERIC_WORD = "striped"  # a word the world model knows well (a pattern that is not the subject's)


@dataclass(frozen=True)
class Configuration:
    experiment: str
    label: str
    overrides: dict = field(default_factory=dict)  # TrainConfig fields
    method: str = "full"
    token: str = TOKEN
    preset: str = "object"  # the dreamnb preset whose steps, rates and flips the attempt starts from

    @property
    def style(self) -> bool:
        return self.preset == "style"


REFERENCE = Configuration("1 optimizer", "fp32 AdamW (reference)", {"optimizer": "adamw"})
CONFIGURATIONS = (
    REFERENCE,
    Configuration("1 optimizer", "AdamWBF16: bf16 + stochastic rounding", {"optimizer": "adamw-bf16"}),
    Configuration("1 optimizer", "bf16 + Kahan summation", {"optimizer": "adamw-bf16-kahan"}),
    Configuration("1 optimizer", "bf16 + SR, fp32 second moment", {"optimizer": "adamw-bf16-v32"}),
    Configuration("2 prior", "no prior preservation", {"optimizer": "adamw", "with_prior_preservation": False}),
    Configuration("2 token", f"generic word '{GENERIC_WORD}'", {"optimizer": "adamw"}, token=GENERIC_WORD),
    Configuration("2 text encoder", "text encoder frozen", {"optimizer": "adamw", "text_encoder_steps": 0}),
    Configuration("2 method", "LoRA (rank 16, lr 1e-4)", {"optimizer": "adamw"}, method="lora"),
    Configuration("2 method", "LoRA (rank 16, lr 2e-5)", {"optimizer": "adamw", "unet_lr": 2e-5, "text_encoder_lr": 1e-5}, method="lora"),
    Configuration("2 rate", "5× rates (1e-5 / 5e-6)", {"optimizer": "adamw", "unet_lr": 1e-5, "text_encoder_lr": 5e-6}),
    Configuration("2 steps", "UNet 400 steps", {"optimizer": "adamw", "unet_steps": 400}),
    Configuration("2 steps", "UNet 1600 steps", {"optimizer": "adamw", "unet_steps": 1600}),
    Configuration("2 steps", "UNet 3200 steps", {"optimizer": "adamw", "unet_steps": 3200}),
    Configuration("2 preset", "face preset (1500 + 350 steps, no flips)", {"optimizer": "adamw"}, preset="face"),
    # the default optimizer over the face preset's longer schedule, where a bf16 v that only grew shrank the steps (#29)
    Configuration("2 preset", "face preset, AdamWBF16 (bf16 + stochastic rounding)", {"optimizer": "adamw-bf16"}, preset="face"),
    # the style preset (no class, no prior preservation) on the style benchmark's subject, and its steps and method
    Configuration("2 preset", "style preset (2000 + 250 steps)", {"optimizer": "adamw"}, preset="style"),
    Configuration("2 preset", "style preset as shipped (optimizer 'auto')", {}, preset="style"),
    Configuration("2 preset", "style preset at 800 + 100 steps", {"optimizer": "adamw", "unet_steps": 800, "text_encoder_steps": 100},
                  preset="style"),
    Configuration("2 preset", "style preset at 4000 + 500 steps", {"optimizer": "adamw", "unet_steps": 4000, "text_encoder_steps": 500},
                  preset="style"),
    Configuration("2 preset", "style preset, LoRA (rank 16, lr 1e-4)", {"optimizer": "adamw"}, method="lora", preset="style"),
    Configuration("2 preset", "style preset at 5× rates (1e-5 / 5e-6)", {"optimizer": "adamw", "unet_lr": 1e-5, "text_encoder_lr": 5e-6},
                  preset="style"),
)
STYLE_PRESET = next(c for c in CONFIGURATIONS if c.style)
# On a CPU the bf16 variants cannot train (they need bf16 math): the tiny run takes what a CPU can do.
TINY_CONFIGURATIONS = (REFERENCE, CONFIGURATIONS[4], STYLE_PRESET)


@dataclass(frozen=True)
class HarnessSettings:
    model: pretrain.WorldModelSettings = pretrain.WorldModelSettings(rounds=3, decoder_steps=600)  # the committed one (assets/world-model)
    evaluator: EvaluatorSettings = EvaluatorSettings()
    seeds: tuple[int, ...] = (0, 1)
    subjects: tuple[Subject, ...] = SUBJECTS
    styles: tuple[StyleSubject, ...] = STYLE_SUBJECTS  # what the style preset's configurations train on
    photos: int = 8                   # training photos per subject
    images_per_prompt: int = 4        # sampling seeds 0..n-1 per prompt
    class_images: int = 8             # class-prompt pictures per attempt, for PRES
    num_class_images: int = 100       # the preset's prior-preservation class images (made once per session)
    step_scale: float = 1.0           # × the preset's steps (the tiny run cuts them)
    lr_scale: float = 1.0             # × the preset's learning rates
    guidance_scale: float = 5.0
    num_inference_steps: int = 25
    caption_probes: int = 96          # random captions for the world model's own prompt following


TINY_HARNESS = HarnessSettings(model=dataclasses.replace(pretrain.TINY, decoder_steps=4),
                               evaluator=EvaluatorSettings(size=pretrain.TINY.size, steps=30, batch=16, width=8), seeds=(0,), subjects=SUBJECTS[:1], photos=4, images_per_prompt=2, class_images=2,
                               num_class_images=2, step_scale=0.02, num_inference_steps=4, caption_probes=8)

# Seconds each stage took on the H200 (results/h200-2026-11-29*.json: attempts trained in 7–8 s, 12.5 s in all), or is projected to take
# (README: "Time plan"); the harness prints this plan before it starts, then what each stage really took.
GPU_SECONDS = {"startup": 20, "optimizer speed": 8, "world model (cached)": 5, "evaluator (cached)": 2,
               "prompt following and base model": 15,
               "attempt: training (per 1000 steps)": 7.5, "attempt: sampling and measures": 5, "class images (first attempt per subject)": 7}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the whole pipeline, tiny, on the CPU (a few minutes)")
    parser.add_argument("--out", type=Path, default=None, help="where results.json, table.md and grids.png go")
    parser.add_argument("--cache", type=Path, default=pretrain.DEFAULT_CACHE,
                        help="the world model's and the evaluator's cache (a carried pack is read from CACHE/carry)")
    parser.add_argument("--pack-out", type=Path, default=None,
                        help="also write the world model (pack parts of ≤15 MiB) and the evaluator here, to bring them back")
    parser.add_argument("--budget-seconds", type=float, default=530.0, help="stop starting attempts past this")
    parser.add_argument("--workdir", type=Path, default=None, help="where the sessions go (default: CACHE/sessions)")
    parser.add_argument("--only", nargs="*", default=None, help="configuration labels (prefixes) to run")
    parser.add_argument("--plan", action="store_true", help="print the time plan and stop")
    parser.add_argument("--step-scale", type=float, default=None,
                        help="× the preset's training steps (longer attempts learn more of the subject; the plan scales)")
    parser.add_argument("--lr-scale", type=float, default=None, help="× the preset's learning rates, for every configuration")
    parser.add_argument("--world-rounds", type=int, default=None,
                        help="the world model after this many pretraining rounds (see pretrain.py --rounds)")
    parser.add_argument("--world-decoder-steps", type=int, default=None,
                        help="the world model with its decoder taught every style for this many steps (0: the decoder as pretrained)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds per configuration and subject (more seeds: a smaller spread, more attempts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("dreamnb", "diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = TINY_HARNESS if args.tiny else HarnessSettings()
    if args.step_scale is not None:
        settings = dataclasses.replace(settings, step_scale=args.step_scale)
    if args.lr_scale is not None:
        settings = dataclasses.replace(settings, lr_scale=args.lr_scale)
    if args.world_rounds is not None:
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, rounds=args.world_rounds))
    if args.world_decoder_steps is not None:
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, decoder_steps=args.world_decoder_steps))
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
    configurations = TINY_CONFIGURATIONS if args.tiny else CONFIGURATIONS
    if args.only:
        configurations = tuple(c for c in configurations if any(c.label.startswith(p) for p in args.only))
    if args.plan:
        print(format_plan(time_plan(settings, configurations, args.cache, args.budget_seconds)))
        return {}
    out = args.out or (pretrain.DEFAULT_CACHE / ("out-tiny" if args.tiny else "out"))
    workdir = args.workdir or (args.cache / ("sessions-tiny" if args.tiny else "sessions"))
    results = run_harness(settings, configurations, out, args.cache, time.time() + args.budget_seconds, workdir,
                          pack_out=args.pack_out, budget_seconds=args.budget_seconds)
    print(results["table"])
    return results


def time_plan(settings: HarnessSettings, configurations, cache: Path, budget_seconds: float) -> dict:
    """Expected seconds per stage on the GPU machine, and the attempts that fit the budget in the order they run."""
    world_cached = world_model_cached(settings.model, cache)
    evaluator_cached = (Path(cache) / f"evaluator-{settings.evaluator.key()}.pt").is_file() or (
        Path(cache) / "carry" / f"evaluator-{settings.evaluator.key()}.pt").is_file()
    stages = [("startup (imports, CUDA)", GPU_SECONDS["startup"]), ("optimizer speed (SD-1.5 size)", GPU_SECONDS["optimizer speed"])]
    stages += world_model_stages(settings.model, cache)
    if evaluator_cached:
        stages.append(("evaluator: from the cache", GPU_SECONDS["evaluator (cached)"]))
    else:
        e = settings.evaluator
        stages.append((f"evaluator: {e.steps} steps × {e.batch}", round(evaluator_seconds_projected(e))))
    stages.append(("prompt following, real photos, base model", GPU_SECONDS["prompt following and base model"]))
    used = sum(seconds for _, seconds in stages)
    attempts, costs, first_per_subject = [], [], set()
    for configuration, subject, seed in jobs(configurations, settings):
        cost = attempt_seconds(configuration, settings)
        if not configuration.style and subject.name not in first_per_subject:
            cost += GPU_SECONDS["class images (first attempt per subject)"]
        if used + cost > budget_seconds:
            break
        first_per_subject.add(subject.name)
        used += cost
        costs.append(cost)
        attempts.append(f"{configuration.label} / {subject.name} / seed {seed}")
    total = len(jobs(configurations, settings))
    each = f" (≈{min(costs):.0f}–{max(costs):.0f} s each)" if costs else ""
    stages.append((f"attempts: {len(attempts)} of {total}{each}", round(used - sum(seconds for _, seconds in stages))))
    return {"stages": stages, "total_s": round(used), "budget_s": budget_seconds, "attempts": attempts,
            "world_model_cached": world_cached, "evaluator_cached": evaluator_cached}


def attempt_seconds(configuration: Configuration, settings: HarnessSettings) -> float:
    """Training (in proportion to its steps) and sampling, on the GPU machine."""
    steps = sum(scaled_steps(configuration, settings).values())
    return GPU_SECONDS["attempt: training (per 1000 steps)"] * steps / 1000 + GPU_SECONDS["attempt: sampling and measures"]


def world_model_cached(m: pretrain.WorldModelSettings, cache: Path) -> bool:
    return (pretrain.model_folder(m, cache) / "model_index.json").is_file() or bool(pretrain.find_pack(m, cache))


def world_model_stages(m: pretrain.WorldModelSettings, cache: Path) -> list[tuple[str, float]]:
    """The world model's stages: from the cache; or its decoder's training, or a later round, on top of the stages
    of the model before it; or round 1."""
    if world_model_cached(m, cache):
        return [("world model: from the cache", GPU_SECONDS["world model (cached)"])]
    if m.decoder_steps:  # projected: a decoder step of 16 pictures at 64 px, a few times one of the VAE's 128
        return world_model_stages(dataclasses.replace(m, decoder_steps=0), cache) + [
            (f"world model: decoder on every style, {m.decoder_steps} steps", 8 + round(0.02 * m.decoder_steps))]
    if m.rounds > 1:
        return world_model_stages(dataclasses.replace(m, rounds=m.rounds - 1), cache) + [
            (f"world model: round {m.rounds}, render + encode {m.latent_pool} pictures, UNet phase (time limit)", 8 + m.max_seconds + 5)]
    # VAE: 800 steps took 32 s in the first run; pool: render + encode, projected; UNet: its time limit
    return [(f"world model: VAE {m.vae_steps} steps", round(32 * m.vae_steps / 800 * m.vae_batch / 128)),
            (f"world model: render + encode {m.latent_pool} pictures", 8),
            ("world model: UNet + text encoder (time limit)", m.max_seconds + 5)]


def evaluator_seconds_projected(e: EvaluatorSettings) -> float:
    """The first run's evaluator: 1500 steps × 256 at 64 px took 39 s, about 0.2 GFLOP a picture forward; this one
    costs evaluator_gflops() a picture. Projection: same achieved FLOP rate, plus rendering as before."""
    old_gflops = 0.2
    return 39 * (e.steps * e.batch) / (1500 * 256) * (0.5 + 0.5 * evaluator_gflops(e) / old_gflops)


def evaluator_gflops(e: EvaluatorSettings) -> float:
    """Forward GFLOP per picture (convolutions only; counted, not measured)."""
    w, h = e.width, e.size // 2
    flops = h * h * (3 + 6) * w * 9 * 2
    for cin, cout, stride in ((w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)):
        h //= stride
        flops += h * h * (cin * cout * 9 + cout * cout * 9) * 2
    return flops / 1e9


def format_plan(plan: dict) -> str:
    lines = [f"time plan (GPU, projected; budget {plan['budget_s']:.0f} s):"]
    lines += [f"  {seconds:6.0f} s  {stage}" for stage, seconds in plan["stages"]]
    lines.append(f"  {plan['total_s']:6.0f} s  in all")
    lines += ["  attempts in order:"] + [f"    {a}" for a in plan["attempts"]]
    return "\n".join(lines)


def run_harness(settings: HarnessSettings, configurations, out: Path, cache: Path, deadline: float, workdir: Path | None = None,
                pack_out: Path | None = None, budget_seconds: float | None = None) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and budget_seconds:
        print(format_plan(time_plan(settings, configurations, cache, budget_seconds)), flush=True)
    results: dict = {"machine": machine(), "settings": describe_settings(settings), "timings": {}}
    if device.type == "cuda":
        try:
            results["optimizer_speed"] = optimizer_speed(device)
        except Exception as err:  # a figure beside the table, not a reason to lose the table
            log.exception("optimizer speed failed")
            results["optimizer_speed"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
        results["timings"]["optimizer_speed_s"] = round(time.time() - started, 1)
    mark = time.time()
    folder = pretrain.ensure_world_model(settings.model, cache, device)
    results["world_model"] = json.loads((folder / "world.json").read_text())
    results["timings"]["world_model_s"] = stage_done("world model", mark)

    from dreamnb.models import load_base_model

    base = load_base_model(folder)
    size = settings.model.size
    if settings.evaluator.size != size:
        raise ValueError(f"the evaluator judges {size}-px pictures but is set to {settings.evaluator.size} px")
    mark = time.time()
    carried = Path(cache) / "carry" / f"evaluator-{settings.evaluator.key()}.pt"
    if carried.is_file() and not (Path(cache) / carried.name).is_file():
        shutil.copyfile(carried, Path(cache) / carried.name)
    evaluator, from_cache = ensure_evaluator(settings.evaluator, cache, device)
    results["evaluator"] = {"from_cache": from_cache, **evaluator_check(evaluator, settings)}
    results["timings"]["evaluator_s"] = stage_done("evaluator", mark)
    log.info("evaluator on fresh renders: %s", results["evaluator"])
    if pack_out is not None:
        pack_out.mkdir(parents=True, exist_ok=True)
        results["packed"] = [p.name for p in pretrain.pack_world_model(folder, settings.model, pack_out)]
        shutil.copyfile(Path(cache) / f"evaluator-{settings.evaluator.key()}.pt", pack_out / f"evaluator-{settings.evaluator.key()}.pt")
        results["packed"].append(f"evaluator-{settings.evaluator.key()}.pt")
    mark = time.time()
    results["prompt_following"] = prompt_following(base, evaluator, settings, out)
    results["timings"]["prompt_following_s"] = stage_done("prompt following", mark)

    mark = time.time()
    shutil.rmtree(workdir, ignore_errors=True)
    subjects = tuple({s.name: s for c in configurations for s in subjects_of(c, settings)}.values())
    sessions = {s.name: make_session(workdir, s, settings) for s in subjects}
    real = {s.name: judge(evaluator, render_photos(s, settings.photos, size, seed=1000)) for s in subjects if isinstance(s, Subject)}
    results.update(before_training(base, evaluator, subjects, real, settings))
    results["timings"]["base_model_s"] = stage_done("real photos and base model", mark)

    runs, skipped, failed, grids = [], [], [], {}
    mark = time.time()
    for configuration, subject, seed in jobs(configurations, settings):
        name = f"{configuration.label} / {subject.name} / seed {seed}"
        if time.time() + estimate(runs) > deadline:
            skipped.append(name)
            continue
        try:
            run = attempt(base, sessions[subject.name], configuration, subject, seed, evaluator, real.get(subject.name), settings)
        except Exception as err:  # one broken configuration must not cost the others' figures
            log.exception("%s failed", name)
            failed.append(f"{name}: {type(err).__name__}: {str(err)[:300]}")
            continue
        images = run.pop("images")
        if seed == settings.seeds[0]:
            grids.setdefault(subject.name, []).append((configuration.label, images))
        runs.append(run)
        log.info("%s", {k: v for k, v in run.items() if k != "per_prompt"})
        results["failed"] = failed
        write_results(out, results, runs, skipped, configurations)  # after each attempt: a killed run keeps its rows
    results["timings"]["attempts_s"] = stage_done(f"{len(runs)} attempts ({len(skipped)} skipped, {len(failed)} failed)", mark)
    results["failed"] = failed
    try:
        save_grids(out, grids, settings)
    except Exception:  # pictures are a convenience; the figures are already written
        log.exception("saving the grids failed")
    results = write_results(out, results, runs, skipped, configurations)
    results["timings"]["total_s"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def before_training(base, evaluator, subjects, real: dict[str, Judgement], settings: HarnessSettings) -> dict:
    """What the attempts are compared with. A subject's held-out photos against its training photos (`real`), and
    the untrained model's scores; a style's ceiling (renders, and their VAE round trips) and the untrained model's."""
    figures: dict[str, dict] = {}
    for s in subjects:
        if isinstance(s, StyleSubject):
            figures.setdefault("real_style", {})[s.name] = style_ceiling(base.pipeline.vae, evaluator, s, settings)
            figures.setdefault("base_model_style", {})[s.name] = without_images(score_style(base.pipeline, evaluator, s, TOKEN, settings))
            continue
        held_out = judge(evaluator, render_photos(s, settings.photos, settings.model.size, seed=2000))
        figures.setdefault("real_photos", {})[s.name] = {"subject_fidelity": metrics.cosine_to(held_out.embedding, real[s.name].embedding),
                                                         "subject_found": metrics.subject_rate(held_out, s)}
        figures.setdefault("base_model", {})[s.name] = without_images(score_pipeline(base.pipeline, evaluator, s, real[s.name], TOKEN, settings))
    return figures


def stage_done(stage: str, mark: float) -> float:
    seconds = round(time.time() - mark, 1)
    print(f"stage done: {stage} in {seconds} s", flush=True)
    return seconds


def jobs(configurations, settings: HarnessSettings) -> list[tuple]:
    """Experiment 1 with every seed first (its question needs the spread); then prior preservation off with every
    seed (the first comparison of experiment 2, against the reference's rows); then the rest of experiment 2 with
    the first seed, then with the other seeds: what a time budget cuts is spread, late."""
    first = [c for c in configurations if c.experiment.startswith("1")]
    prior = [c for c in configurations if c.experiment == "2 prior"]
    rest = [c for c in configurations if c not in first and c not in prior]
    order = [(c, s, seed) for c in first + prior for s in subjects_of(c, settings) for seed in settings.seeds]
    order += [(c, s, settings.seeds[0]) for c in rest for s in subjects_of(c, settings)]
    order += [(c, s, seed) for seed in settings.seeds[1:] for c in rest for s in subjects_of(c, settings)]
    return order


def subjects_of(configuration: Configuration, settings: HarnessSettings) -> tuple:
    return settings.styles if configuration.style else settings.subjects


def without_images(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "images"}


def estimate(runs: list[dict]) -> float:
    """Seconds the next attempt will probably take (the slowest so far, with a margin)."""
    return 1.2 * max((r["seconds"] for r in runs), default=0.0)


# --- the pieces, in the order run_harness uses them -----------------------------------------------------

def machine() -> dict:
    import diffusers
    import transformers

    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_settings(settings: HarnessSettings) -> dict:
    values = dataclasses.asdict(settings)
    values["subjects"] = [s.name for s in settings.subjects]
    return values


@torch.no_grad()
def optimizer_speed(device: torch.device, parameters: int = 859_520_964, repeats: int = 10) -> dict:
    """Each optimizer's step time and memory for the SD-1.5 UNet's parameter count (one flat tensor, random
    gradients): the speed side of experiment 1."""
    from dreamnb.fast import BF16_OPTIMIZERS, AdamWBF16

    speeds = {}
    for name in ("adamw", *BF16_OPTIMIZERS):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        if name == "adamw":
            weight = torch.nn.Parameter(torch.zeros(parameters, device=device))
            weight.grad = torch.randn_like(weight)
            optimizer = torch.optim.AdamW([weight], lr=torch.tensor(2e-6, device=device), fused=True, capturable=True)
        else:
            weight = torch.nn.Parameter(torch.zeros(parameters, device=device, dtype=torch.bfloat16))
            optimizer = AdamWBF16([weight], lr=2e-6, **BF16_OPTIMIZERS[name])
            optimizer.flat_grad.normal_()
        optimizer.step()  # state allocated, kernel compiled
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) / repeats * 1000
        held = torch.cuda.memory_allocated(device) - before
        speeds[name] = {"step_ms": round(ms, 2), "bytes_per_weight": round(held / parameters, 2)}
        del weight, optimizer
    return speeds


def evaluator_check(evaluator, settings: HarnessSettings) -> dict:
    """The evaluator on fresh renders it never saw (every pattern and style): its accuracy per head; and on the subjects:
    how close held-out photos of a subject are to its training photos, against the other subjects' photos and
    against other things of its class (what subject fidelity and PRES rely on), and how often it finds the subject."""
    size = settings.model.size
    generator = torch.Generator().manual_seed(12345)
    scenes = world.sample_scenes(512, generator, patterns=world.PATTERNS, styles=world.STYLES)
    images = world.render(scenes, size, generator)
    check = {k: round(v, 3) for k, v in label_accuracy(judge(evaluator, images), world.labels(scenes)).items()}
    check["subjects"] = {name: {k: round(v, 3) for k, v in values.items()}
                         for name, values in metrics.subject_separation(evaluator, SUBJECTS, size).items()}
    return check


def to_tensor(images) -> torch.Tensor:
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) for im in images])


def sample(pipe, prompts: list[str], seeds: list[int], settings: HarnessSettings):
    """One picture per (prompt, seed), through dreamnb's `generate`."""
    from dreamnb.sample import SampleSettings, generate

    wanted = [SampleSettings(prompt=p, seed=s, num_inference_steps=settings.num_inference_steps,
                             guidance_scale=settings.guidance_scale) for p in prompts for s in seeds]
    return [s.image for s in generate(pipe, wanted, batch_size=64, progress=False)]


def prompt_following(base, evaluator, settings: HarnessSettings, out: Path) -> dict:
    """The world model on random captions of its own world, beside the evaluator on renders of the same captions;
    the first eight of each kept as world-samples.png."""
    from dreamnb.grid import make_grid
    from PIL import Image

    from .subjects import to_uint8

    generator = torch.Generator().manual_seed(777)
    scenes = world.sample_scenes(settings.caption_probes, generator, two_things=0.0)
    texts = world.captions(scenes)
    pictures = sample(base.pipeline, texts, [0], settings)
    generated = to_tensor(pictures)
    rendered = world.render(scenes, settings.model.size, generator)
    shown = min(8, len(texts))
    make_grid([pictures[:shown], [Image.fromarray(to_uint8(r)) for r in rendered[:shown]]], ["world model", "renders"],
              [t.replace(" of ", " of\n", 1) for t in texts[:shown]], cell_size=96).save(out / "world-samples.png")
    return {"world_model": round_all(metrics.caption_fidelity(judge(evaluator, generated), scenes)),
            "renders": round_all(metrics.caption_fidelity(judge(evaluator, rendered), scenes))}


def round_all(values: dict) -> dict:
    return {k: round(v, 3) for k, v in values.items()}


def make_session(root: Path, subject: Subject | StyleSubject, settings: HarnessSettings):
    """A session holding the subject's photos (a style's works, each with its caption in a .txt beside it), taken in
    as a user's photos are (`dreamnb.images.prepare_photos`)."""
    from dreamnb.images import prepare_photos
    from dreamnb.session import create_session

    session = create_session(root / subject.name)
    style = isinstance(subject, StyleSubject)
    if style:
        images = render_scenes(subject.works, settings.model.size, seed=1000)
        captions = [style_caption(scene, TOKEN) for scene in subject.works]
    else:
        images, captions = render_photos(subject, settings.photos, settings.model.size, seed=1000), []
    small = settings.model.size < 64  # below what `prepare` takes: written as prepared photos, as it writes them
    photos = save_photos(images, session.instance_dir if small else root / f"{subject.name}-photos", "photo")
    for path, text in zip(photos, captions):
        path.with_suffix(".txt").write_text(text + "\n")
    if small:
        return session
    report = prepare_photos(photos, session.instance_dir, size=settings.model.size, crop="center", preset="style" if style else "object")
    if report.photos_in_set != len(photos):
        raise RuntimeError(f"prepare_photos kept {report.photos_in_set} of {len(photos)} photos of {subject.name}: "
                           f"{[(r.name, r.status, r.reason) for r in report.results if not r.accepted]}")
    return session


def scaled_steps(configuration: Configuration, settings: HarnessSettings) -> dict[str, int]:
    """The configuration's UNet and text-encoder steps (its own, else its preset's), × the run's step scale."""
    from dreamnb.config import preset_values

    preset = preset_values(configuration.preset, configuration.method)
    steps = {}
    for name in ("unet_steps", "text_encoder_steps"):
        wanted = configuration.overrides.get(name, preset[name])
        steps[name] = max(1, round(wanted * settings.step_scale)) if wanted else 0
    return steps


def train_config(configuration: Configuration, subject: Subject | StyleSubject, seed: int, settings: HarnessSettings):
    """A style's works carry their own captions, so only the object subjects need the world's prompts."""
    from dreamnb.config import TrainConfig, preset_values

    preset = preset_values(configuration.preset, configuration.method)
    values = dict(token=configuration.token, class_word=subject.class_word, resolution=settings.model.size, seed=seed,
                  checkpoint_every=0, log_every=50, num_class_images=settings.num_class_images)
    if not configuration.style:
        values.update(instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT)
    values.update(configuration.overrides)
    values.update(scaled_steps(configuration, settings))
    for lr in ("unet_lr", "text_encoder_lr"):
        values[lr] = values.get(lr, preset[lr]) * settings.lr_scale
    return TrainConfig.from_preset(configuration.preset, method=configuration.method, **values)


def attempt(base, session, configuration: Configuration, subject: Subject | StyleSubject, seed: int, evaluator,
            real: Judgement | None, settings: HarnessSettings) -> dict:
    """Train one attempt with dreamnb and score it (`real`: the subject's photos as the evaluator sees them; none for a
    style)."""
    from dreamnb.attempts import attempt_pipeline
    from dreamnb.train import train

    config = train_config(configuration, subject, seed, settings)
    started = time.time()
    result = train(session, config, base, progress=False)
    if result.status != "finished":
        raise RuntimeError(f"{configuration.label} / {subject.name} / seed {seed}: {result.message}")
    trained_s = time.time() - started
    pipe = attempt_pipeline(base, session, result.attempt)
    if configuration.style:
        scores = score_style(pipe, evaluator, subject, configuration.token, settings)
    else:
        scores = score_pipeline(pipe, evaluator, subject, real, configuration.token, settings)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"experiment": configuration.experiment, "label": configuration.label, "subject": subject.name, "seed": seed,
            "optimizer": config.optimizer, "final_loss": result.losses[-1][1] if result.losses else None,
            "train_seconds": round(trained_s, 1), "seconds": round(time.time() - started, 1), **scores}


def score_pipeline(pipe, evaluator, subject: Subject, real: Judgement, token: str, settings: HarnessSettings) -> dict:
    """Generate the prompt set (and class-prompt pictures: CLASS_PROMPT, which the attempts' prior preservation uses
    too) and measure them."""
    seeds = list(range(settings.images_per_prompt))
    texts = [prompt_text(p, token, subject.class_word) for p in PROMPTS]
    class_prompt = CLASS_PROMPT.replace("{class}", subject.class_word)
    images = sample(pipe, texts, seeds, settings)
    class_images = sample(pipe, [class_prompt], list(range(100, 100 + settings.class_images)), settings)
    judged = judge(evaluator, to_tensor(images))
    per_prompt = []
    k = len(seeds)
    for i, prompt in enumerate(PROMPTS):
        part = Judgement(judged.embedding[i * k:(i + 1) * k], {h: v[i * k:(i + 1) * k] for h, v in judged.present.items()},
                         {h: v[i * k:(i + 1) * k] for h, v in judged.chosen.items()})
        per_prompt.append({"prompt": prompt.text, "change": prompt.change, "prompt_fidelity": metrics.prompt_fidelity(part, prompt),
                           "diversity": metrics.diversity(part.embedding),
                           "subject_found": metrics.shows(part, subject.thing, prompt.colour).float().mean().item()})
    class_judged = judge(evaluator, to_tensor(class_images))
    return {
        "subject_fidelity": metrics.cosine_to(judged.embedding, real.embedding),
        "subject_found": statistics.fmean(p["subject_found"] for p in per_prompt),
        "prompt_fidelity": statistics.fmean(p["prompt_fidelity"] for p in per_prompt),
        "prior_subject_rate": metrics.subject_rate(class_judged, subject),
        "prior_similarity": metrics.cosine_to(class_judged.embedding, real.embedding),
        "diversity": statistics.fmean(p["diversity"] for p in per_prompt),
        "per_prompt": per_prompt,
        "images": [images[i * k] for i in range(len(PROMPTS))] + class_images[:1],
    }


def score_style(pipe, evaluator, subject: StyleSubject, token: str, settings: HarnessSettings) -> dict:
    """Generate the style's prompts with the token in the style's place, and the same scenes as photos, paintings and
    sketches (which must keep their own styles), and measure them."""
    seeds = list(range(settings.images_per_prompt))
    plain = plain_prompts(subject)
    images = sample(pipe, [style_caption(s, token) for s in subject.prompts], seeds, settings)
    plain_images = sample(pipe, [world.caption(s) for s in plain], seeds, settings)
    judged = judge(evaluator, to_tensor(images))
    k = len(seeds)
    scores = metrics.style_scores(judged, repeated(subject.prompts, k), judge(evaluator, to_tensor(plain_images)),
                                  repeated(plain, k), subject.style)
    scores["diversity"] = statistics.fmean(metrics.diversity(judged.embedding[i * k:(i + 1) * k]) for i in range(len(subject.prompts)))
    scores["images"] = [images[i * k] for i in range(len(subject.prompts))] + plain_images[:1]
    return scores


def repeated(scenes, times: int) -> world.SceneBatch:
    return world.batch_of([scene for scene in scenes for _ in range(times)])


def style_ceiling(vae, evaluator, subject: StyleSubject, settings: HarnessSettings) -> dict:
    """The style measures on renders of its prompts and of their plain versions (what a perfect model would draw),
    and on the renders' VAE round trips (the best this model's VAE can give back)."""
    k = settings.images_per_prompt
    scenes, plain = repeated(subject.prompts, k), repeated(plain_prompts(subject), k)
    rendered = (world.render(scenes, settings.model.size, torch.Generator().manual_seed(2000)),
                world.render(plain, settings.model.size, torch.Generator().manual_seed(2001)))
    ceiling = {}
    for name, (asked, other) in (("renders", rendered), ("vae_round_trip", [vae_round_trip(vae, r) for r in rendered])):
        ceiling[name] = round_all(metrics.style_scores(judge(evaluator, asked), scenes, judge(evaluator, other), plain, subject.style))
    return ceiling


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """Pictures in [0, 1] through the VAE (its posterior mean) and back."""
    out = []
    for chunk in images.split(64):
        latents = vae.encode(chunk.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
        out.append(((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


# --- the table ------------------------------------------------------------------------------------------

COLUMNS = (("subject_fidelity", "subject fidelity ↑"), ("subject_found", "subject found ↑"),
           ("prompt_fidelity", "prompt fidelity ↑"), ("prior_subject_rate", "PRES: class → subject ↓"),
           ("prior_similarity", "class ~ subject ↓"), ("diversity", "DIV ↑"))
STYLE_COLUMNS = (("style_found", "style found ↑"), ("content_fidelity", "content fidelity ↑"),
                 ("style_leak", "leak into other styles ↓"), ("plain_prompt_fidelity", "other styles' prompt fidelity ↑"),
                 ("diversity", "DIV ↑"))


def summarise(runs: list[dict], configurations, columns=COLUMNS) -> list[dict]:
    """Per configuration: each measure's mean over subjects and seeds, and its spread over seeds (the standard
    deviation across seeds within a subject, pooled over subjects)."""
    rows = []
    for configuration in configurations:
        mine = [r for r in runs if r["label"] == configuration.label]
        if not mine:
            continue
        row = {"experiment": configuration.experiment, "label": configuration.label, "runs": len(mine),
               "train_seconds": round(statistics.fmean(r["train_seconds"] for r in mine), 1)}
        for key, _ in columns:
            row[key] = statistics.fmean(r[key] for r in mine)
            row[key + "_spread"] = pooled_seed_spread(mine, key)
        rows.append(row)
    return rows


def pooled_seed_spread(runs: list[dict], key: str) -> float:
    variances = []
    for subject in {r["subject"] for r in runs}:
        values = [r[key] for r in runs if r["subject"] == subject]
        if len(values) > 1:
            variances.append(statistics.variance(values))
    return math.sqrt(statistics.fmean(variances)) if variances else float("nan")


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    head = "| experiment | configuration | runs | " + " | ".join(title for _, title in columns) + " | train s |"
    lines = [head, "|" + "---|" * (4 + len(columns))]
    for row in rows:
        cells = [f"{row[k]:.3f} ± {row[k + '_spread']:.3f}" if not math.isnan(row[k + "_spread"]) else f"{row[k]:.3f}" for k, _ in columns]
        lines.append(f"| {row['experiment']} | {row['label']} | {row['runs']} | " + " | ".join(cells) + f" | {row['train_seconds']} |")
    return "\n".join(lines)


def write_results(out: Path, results: dict, runs: list[dict], skipped: list[str], configurations) -> dict:
    """The object subjects' table, then the style's (its own measures), each with the rows that ran."""
    rows = summarise(runs, [c for c in configurations if not c.style])
    style_rows = summarise(runs, [c for c in configurations if c.style], STYLE_COLUMNS)
    tables = ([markdown_table(rows)] if rows else []) + ([markdown_table(style_rows, STYLE_COLUMNS)] if style_rows else [])
    results.update(runs=runs, skipped=skipped, summary=rows + style_rows, table="\n\n".join(tables))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(results["table"] + "\n")
    return results


def save_grids(out: Path, grids: dict, settings: HarnessSettings) -> None:
    """One picture per prompt (first sampling seed) for each attempt, attempts down: the object subjects one after the
    other in grids.png (the device machine brings back at most 8 files), each style in grids-<style>.png."""
    from dreamnb.grid import make_grid

    def save(file: str, rows: list[tuple[str, list]], labels: list[str]) -> None:
        if rows:
            make_grid([images for _, images in rows], [label for label, _ in rows], labels, cell_size=96).save(out / file)

    styles = {s.name for s in settings.styles}
    save("grids.png", [(f"{subject}: {label}", images) for subject, attempts in grids.items() if subject not in styles
                       for label, images in attempts], [p.change for p in PROMPTS] + ["class prompt"])
    for style in settings.styles:
        prompts = [style_caption(p, "…").removeprefix("a … of ") for p in style.prompts] + [world.caption(plain_prompts(style)[0])]
        save(f"grids-{style.name}.png", grids.get(style.name, []), prompts)


if __name__ == "__main__":
    main()
