"""The DreamBooth training loop: one attempt of a session, in two phases, that never loses work.

Read top to bottom: check settings → prepare caches → text-encoder phase → UNet phase → save.
As in TheLastBen's fast-DreamBooth the text encoder (which reads the prompt) is trained first
with the UNet (which paints) frozen, then the UNet with the text encoder frozen; that second phase
therefore needs no text encoder at all, only the cached prompt embeddings.

Every random number comes from one seeded generator on the training device, whose state is saved
in each checkpoint, so N steps + resume + M steps gives the same weights as N+M steps straight.
Checkpoints are whole folders written atomically; Ctrl-C / Stop saves one; a NaN loss or running
out of GPU memory ends the run with a plain-words message and the session left usable.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import errno
import io
import itertools
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import data, fileio
from .config import ConfigError, TrainConfig, validate
from .colab import gpu_has_bf16, gpu_memory_budget
from .fast import BF16_OPTIMIZERS, AdamWBF16, GraphedStep, LossScaler
from .families import Family, PromptEncoder
from .models import BaseModel, load_base_model
from .session import (CHECKPOINTS, FINAL, LORA_FILE, OPTIMIZER_FILE, Attempt, Session, add_attempt, attempt_weights_dir,
                      checkpoint_folders, describe_lock, drop_optimizer_state, open_session, reading, session_lock, split_ref,
                      update_attempt, update_session)

log = logging.getLogger(__name__)

TEXT_PHASE = "text_encoder"  # the first phase; the second trains the family's denoiser and is named after it ("unet")
LOG_FIELDS = ["step", "phase", "loss", "lr", "elapsed_s"]  # log.csv's columns


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can act on (NaN loss, out of memory)."""


@dataclass
class TrainEvent:
    """What the trainer reports as it goes; the CLI prints it, the notebook draws it."""

    kind: str  # start | step | phase | checkpoint | sample | done | stopped | error | info
    step: int = 0
    total_steps: int = 0
    phase: str = ""
    loss: float | None = None
    lr: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    message: str = ""
    path: str | None = None
    images: list[Any] = field(default_factory=list)


@dataclass
class TrainResult:
    attempt: str
    status: str  # finished | interrupted | failed
    steps_done: int
    total_steps: int
    final_dir: Path | None
    message: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# The loss

def diffusion_loss(denoiser, latents, embeds, generator, schedule, config: TrainConfig, n_instance: int,
                   world: int = 1, rank: int = 0, extra: dict | None = None, *, family: Family) -> torch.Tensor:
    """DreamBooth loss for one batch: rows [:n_instance] are the subject, the rest class images (prior).
    `schedule` is the family's noise schedule and target (`Family.noise_schedule`); `extra` the denoiser's extra
    inputs (`Family.denoiser_inputs`: SDXL's pooled prompts and size/crop numbers, row by row; None for SD 1.x/2.x).
    Data parallel: noise and timesteps are drawn for every process's rows (one seeded generator, the same on
    each) and each process keeps its own, so processes do not repeat each other's noise."""
    batch, device = latents.shape[0], latents.device
    mine = slice(rank * batch, (rank + 1) * batch)
    noise = torch.randn((world * batch, *latents.shape[1:]), generator=generator, device=device)[mine]
    if config.offset_noise:
        noise = noise + config.offset_noise * torch.randn((world * batch, latents.shape[1], 1, 1), generator=generator, device=device)[mine]
    timesteps = schedule.draw_timesteps(world * batch, generator, device)[mine]
    noisy, target = schedule.noisy_and_target(latents, noise, timesteps)
    pred = family.predict(denoiser, noisy, timesteps, embeds, extra)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    weights = schedule.loss_weights(timesteps, config.min_snr_gamma)
    if weights is not None:
        per_sample = per_sample * weights
    loss = per_sample[:n_instance].mean()
    if batch > n_instance:
        loss = loss + config.prior_loss_weight * per_sample[n_instance:].mean()
    return loss


# ---------------------------------------------------------------------------------------------------
# The stages of one run, in the order `train` calls them.

@dataclass
class TrainingData:
    """What every step draws from, on the training device: latent distributions of the photos (and class
    images), their prompts as token ids (`Family.tokenize`: a row per photo, one row for the class prompt) and, where
    the family has any, each image's own conditioning (`Family.image_conditioning`: SDXL's size and crop numbers)."""

    instance_mean: torch.Tensor
    instance_std: torch.Tensor
    instance_ids: torch.Tensor
    class_mean: torch.Tensor | None = None
    class_std: torch.Tensor | None = None
    class_ids: torch.Tensor | None = None
    instance_image_cond: torch.Tensor | None = None  # a row per photo (SDXL: [photos, 6]); None where the family has none
    class_image_cond: torch.Tensor | None = None     # a row per class image

    def image_rows(self, rows, class_rows) -> torch.Tensor | None:
        """A batch's rows of the images' own conditioning: its photos', then its class images'."""
        if self.instance_image_cond is None:
            return None
        cond = self.instance_image_cond[rows]
        return cond if class_rows is None else torch.cat([cond, self.class_image_cond[class_rows]])


@dataclass(frozen=True)
class Precision:
    """Number formats and optimizer, decided once per run from the config and the GPU (see `plan_precision`)."""

    compute: str     # what the math runs in: "bf16" or "fp16" (autocast) on a GPU, "no" (fp32) on a CPU
    optimizer: str   # "adamw", "adamw8bit", or a bf16-weight one: "adamw-bf16", "adamw-bf16-kahan", "adamw-bf16-v32"

    @property
    def bf16_weights(self) -> bool:
        """The optimizer keeps the weights it trains in bf16 (AdamWBF16 and its variants)."""
        return self.optimizer in BF16_OPTIMIZERS

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.compute, torch.float32)

    @property
    def scales_loss_itself(self) -> bool:
        """fp16 math over bf16 weights (a T4 with AdamWBF16): torch's loss scaler cannot unscale bf16 gradients
        ("not implemented for 'BFloat16'"), so the trainer scales the loss (fast.LossScaler) and accelerate is told "no"."""
        return self.compute == "fp16" and self.bf16_weights

    @property
    def accelerate(self) -> str:
        return "no" if self.scales_loss_itself else self.compute


def plan_precision(config: TrainConfig) -> Precision:
    compute = resolve_mixed_precision(config)
    return Precision(compute, resolve_optimizer(config, torch.cuda.is_available(), compute))


@dataclass
class TrainingModels:
    """The trainer's own copies of the parts it trains, and the formats and fast paths chosen for them (decided here
    once, from the config and the GPU). The caller's base model is never changed: its VAE and pipeline are only read."""

    family: Family
    denoiser: Any                 # the part that paints (SD's UNet)
    text_encoders: PromptEncoder  # the text encoder (SDXL: both)
    device: torch.device
    weights_dtype: torch.dtype   # the copies' weights
    precision: Precision
    use_graphs: bool

    @property
    def phases(self) -> tuple[str, str]:
        """The phases in training order: the text encoders', then the denoiser's (named as the part is)."""
        return TEXT_PHASE, self.family.denoiser

    def parts(self) -> dict[str, torch.nn.Module]:
        """The models a run may change, by the names their weights are saved under (the family's part names: unet,
        text_encoder, ...), as checkpoint key prefixes and as final/'s folders and LoRA key prefixes."""
        return {self.family.denoiser: self.denoiser, **self.text_encoders.parts()}

    def autocast(self):
        """The compute format for the forward passes (off on a CPU)."""
        dtype = self.precision.compute_dtype
        # no cache of cast weights, as in the CUDA graph: it would hold a second copy of the UNet (1.7 GB on a T4)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)


@dataclass
class Run:
    """What the phases of one run share: settings, models, data, the random generator and the progress so far."""

    config: TrainConfig
    accelerator: Any
    attempt_dir: Path
    base_model: BaseModel
    models: TrainingModels
    data: TrainingData
    schedule: Any  # the family's noise schedule and target (`Family.noise_schedule`)
    generator: torch.Generator
    checkpoint: Path | None
    emit: Callable[[TrainEvent], None]
    stop: threading.Event
    bar: Any
    state: dict
    started: float
    first_step: int  # where this process started (a resume: the checkpoint's step), for the time left
    losses: list[tuple[int, float]] = field(default_factory=list)
    optimizer: Any = None
    lr_scheduler: Any = None
    loss_scaler: LossScaler | None = None  # the phase's own loss scaling (fp16 math over bf16 weights), else None


def train(
    session: Session,
    config: TrainConfig,
    base_model: BaseModel | str | Path,
    *,
    attempt: str | None = None,
    resume: bool = False,
    callback: Callable[[TrainEvent], None] | None = None,
    stop: threading.Event | None = None,
    progress: bool = True,
    config_source: str | None = None,
    vae: str | None = None,
) -> TrainResult:
    """Train one attempt. `base_model` is a loaded BaseModel (left untouched: trainable parts are
    copied) or a source string, loaded with `config_source` and `vae` (see `load_base_model`). With `resume`,
    continue the named (or latest) attempt from its newest checkpoint. `stop` (e.g. the notebook's Stop button)
    ends the run with a checkpoint."""
    emit, stop = callback or (lambda event: None), stop or threading.Event()
    with session_lock(session.path, "training"), interrupts_as_stop(stop, emit):
        return _train(session, config, base_model, attempt, resume, emit, stop, progress, config_source, vae)


@contextlib.contextmanager
def interrupts_as_stop(stop: threading.Event, emit: Callable[[TrainEvent], None]):
    """Ctrl-C (SIGINT: the terminal's, or a notebook's interrupt) sets `stop`, which the loop checks between steps, so the
    checkpoint it saves always holds one whole step; a second Ctrl-C interrupts at once. Only in the main thread
    (the only one that receives signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        emit(TrainEvent("info", message="Stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)."))

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _train(session: Session, config: TrainConfig, base_model: BaseModel | str | Path, attempt: str | None, resume: bool,
           emit: Callable[[TrainEvent], None], stop: threading.Event, progress: bool, config_source: str | None,
           vae: str | None) -> TrainResult:
    if resume:  # an attempt always continues with the settings it started with, from the same base model and VAE
        attempt = session.attempt(attempt).name
        config = read_attempt_config(session.attempt_dir(attempt))
        check_resumable(session, attempt, base_model, vae)
    elif config.parent:  # it starts from an attempt's weights, which were trained from one base model and VAE
        check_same_base(session.attempt(config.parent), base_model, "continue it", vae)
    validate(config)
    examples, held_out = held_out_split(session, config, data.list_examples(session.instance_dir), attempt if resume else None)
    check_training_data(config, examples)
    if isinstance(base_model, (str, Path)):  # loaded before anything is written: a model that cannot be used changes nothing
        base_model = load_base_model(base_model, config=config_source, vae=vae)
    if config.method not in base_model.family.methods:
        raise ConfigError(f"{base_model.family.label} can be trained with the {' or '.join(base_model.family.methods)} method "
                          f"here, not {config.method!r}; choose that method (or leave it to the preset).")

    precision = plan_precision(config)
    accelerator = make_accelerator(config, precision, base_model.family)
    session, name = (session, attempt) if resume else new_attempt(session, attempt, accelerator)
    describe_lock(session.path, f"training {name}")  # whoever is refused meanwhile is told which attempt
    attempt_dir = session.attempt_dir(name)
    if accelerator.is_main_process:
        fileio.write_json(attempt_dir / "config.json", config.to_dict())
        fileio.write_json(attempt_dir / data.HELD_OUT_FILE, held_out)
    if held_out and not resume:
        emit(TrainEvent("info", message=f"{len(held_out)} photos are kept out of training for the scores ({', '.join(held_out)}); "
                                        f"set held_out_photos to 0 to train on all of them."))
    checkpoint = latest_checkpoint(attempt_dir) if resume else None

    if session.base_model is None:
        update_session(session, base_model=base_model.info.source, base_model_config=str(config_source) if config_source else None)
    if base_model.info.resolution != config.resolution:
        emit(TrainEvent("info", message=f"Training at {config.resolution} px; this base model was made for {base_model.info.resolution} px."))
    smallest = data.smallest_side(examples)
    if smallest < config.resolution:  # e.g. photos prepared at 512 px for an SDXL run at 1024
        emit(TrainEvent("info", message=f"Some photos are {smallest} px, below the training size ({config.resolution} px), so they are "
                                        f"enlarged and soften the result; prepare them again with --size {config.resolution}."))

    # the base model is this thread's from here on (a notebook's views in another thread are refused meanwhile): it
    # makes class images and latents, then waits on the CPU while training
    with base_model.in_use(f"training {name}"):
        training_data = prepare_data(session, config, examples, base_model, accelerator, emit, progress)
        with base_model.parked() as parked:
            if parked:
                emit(TrainEvent("info", message="The base model waits on the CPU while training, leaving the GPU's memory to training."))
            run = start_run(session, name, config, base_model, accelerator, precision, training_data, checkpoint, emit, stop, progress)
            status, message, final_dir = run_training(run)
            steps_done, losses, elapsed = run.state["global_step"], run.losses, time.time() - run.started
            # the trainer's copies, its CUDA graph's memory pool (and after an OOM the failed step's tensors) go before
            # the base model comes back: beside them, the end of an SDXL run needed 21.4 GB against training's 16.1
            run = None
            accelerator.free_memory()
    update_attempt(session, name, status=status, steps_done=steps_done, message=message)
    emit(TrainEvent("done" if status == "finished" else ("stopped" if status == "interrupted" else "error"),
                    step=steps_done, total_steps=config.total_steps, message=message,
                    path=str(final_dir) if final_dir else None, elapsed_s=elapsed))
    return TrainResult(attempt=name, status=status, steps_done=steps_done, total_steps=config.total_steps,
                       final_dir=final_dir, message=message, losses=losses)


def start_run(session: Session, name: str, config: TrainConfig, base_model: BaseModel, accelerator, precision: Precision,
              training_data: TrainingData, checkpoint: Path | None, emit, stop: threading.Event, progress: bool) -> Run:
    """The trainer's copies of the models, the random generator, and the weights and step to start from: a checkpoint
    (resume), a parent attempt's weights (continue), or the base model's."""
    models = place_models(base_model, config, accelerator, precision)
    emit(TrainEvent("info", message=f"Optimizer {precision.optimizer}, {precision.compute} mixed precision, "
                                    f"CUDA graphs {'on' if models.use_graphs else 'off'}, weights in {str(models.weights_dtype)[6:]}."))
    # CUDA graphs replay random ops only from the device's default generator, so that one is used there.
    device = models.device
    generator = torch.cuda.default_generators[device.index or 0] if models.use_graphs else torch.Generator(device=device)
    generator.manual_seed(config.seed)
    state = {"phase": TEXT_PHASE, "phase_step": 0, "global_step": 0}
    attempt_dir = session.attempt_dir(name)
    if checkpoint is not None:  # a checkpoint holds every weight that differs from the base, the parent's included
        with reading(checkpoint, RESUME_ADVICE):
            state = load_checkpoint_weights(checkpoint, models, generator, config)
        truncate_log(attempt_dir, state["global_step"])
        emit(TrainEvent("info", message=f"Resuming {name} from step {state['global_step']}."))
    elif config.parent:
        parent_weights = attempt_weights_dir(session, config.parent)
        with reading(parent_weights, "continue from another checkpoint of that attempt"):
            load_parent_weights(parent_weights, models, config)
        emit(TrainEvent("info", message=f"Continuing from {config.parent}."))
    update_attempt(session, name, status="training", message="", base_model=base_model.info.source, vae=base_model.info.vae,
                   parent=config.parent or None)
    run = Run(config=config, accelerator=accelerator, attempt_dir=attempt_dir, base_model=base_model, models=models,
              data=training_data, schedule=base_model.family.noise_schedule(base_model.pipeline.scheduler, device),
              generator=generator, checkpoint=checkpoint, emit=emit, stop=stop, state=state, started=time.time(),
              bar=_progress_bar(progress and accelerator.is_main_process, config.total_steps, state["global_step"]),
              first_step=state["global_step"])
    emit(TrainEvent("start", step=run.first_step, total_steps=config.total_steps, message=f"Training {name} on {device}"))
    return run


def run_training(run: Run) -> tuple[str, str, Path | None]:
    """Every phase, then the final weights; or a checkpoint at Stop. Returns the status, its message and the final
    weights' folder."""
    config, accelerator, models = run.config, run.accelerator, run.models
    try:
        for phase in models.phases:
            run_phase(run, phase)
        if accelerator.num_processes > 1:
            run.emit(TrainEvent("info", message=ranks_agree_message(accelerator, *models.parts().values())))
        final_dir = save_final(accelerator, run.attempt_dir, models, config)
        return "finished", f"Finished {config.total_steps} steps; the trained model is in {final_dir}.", final_dir
    except KeyboardInterrupt:
        path = save_checkpoint(accelerator, run.attempt_dir, run.state, models, run.optimizer,
                               run.lr_scheduler, run.generator, config, run.loss_scaler)
        return ("interrupted", f"Stopped at step {run.state['global_step']} of {config.total_steps}; saved {path.name}. "
                               "Resume with --resume (or the Resume button).", None)
    except torch.cuda.OutOfMemoryError:
        return "failed", oom_message(config), None
    except TrainingError as err:
        return "failed", str(err), None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        return "failed", disk_full_message(run.attempt_dir), None
    finally:
        run.bar.close()


def read_attempt_config(attempt_dir: Path) -> TrainConfig:
    path = attempt_dir / "config.json"
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{path} is damaged or missing ({str(err).splitlines()[0][:120]}); this attempt cannot be resumed, "
                          "so start a new one (its checkpoints stay where they are).") from err


def check_resumable(session: Session, name: str, base_model: BaseModel | str | Path, vae: str | None = None) -> None:
    """There must be a checkpoint to resume, and the base model and VAE must be those the attempt started from."""
    attempt = session.attempt(name)
    if attempt.status == "finished":
        raise ConfigError(f"Attempt {name!r} has finished ({attempt.steps_done} steps); there is nothing to resume.")
    if latest_checkpoint(session.attempt_dir(name)) is None:
        raise ConfigError(f"Attempt {name!r} has no checkpoint to resume from (it stopped before its first one); start a new attempt.")
    check_same_base(attempt, base_model, "resume it", vae)


def check_same_base(attempt: Attempt, base_model: BaseModel | str | Path, what: str, vae: str | None = None) -> None:
    """`base_model` must be the model the attempt was trained from, with the same VAE (its latents are what the attempt
    learned on). `vae`: the VAE a source string will be loaded with; a loaded BaseModel says its own."""
    source, vae = (base_model.info.source, base_model.info.vae) if isinstance(base_model, BaseModel) else (str(base_model), vae)
    if not attempt.base_model:  # not recorded (it never started, or an old session)
        return
    if not _same_source(attempt.base_model, source):
        raise ConfigError(f"Attempt {attempt.name!r} was trained from {attempt.base_model}, not {source}; {what} with that "
                          "model (--model), or start a new attempt.")
    if not (attempt.vae == vae or (attempt.vae and vae and _same_source(attempt.vae, vae))):  # None: the model's own
        raise ConfigError(f"Attempt {attempt.name!r} was trained with {_vae_words(attempt.vae)}, not {_vae_words(vae)}; "
                          f"{what} with that VAE (--vae), or start a new attempt.")


def continue_config(session: Session, parent: str, **overrides: Any) -> TrainConfig:
    """The settings of a new attempt that continues `parent` (NAME: its final weights, or NAME@STEP: a checkpoint):
    the parent's, with `overrides` (None: not given). Its steps are steps more; the text encoder's are 0 unless given
    (it carries on as the parent left it). What the saved weights are shaped by (method, LoRA size) cannot change."""
    weights = attempt_weights_dir(session, parent)  # a clear error when there is no such attempt or checkpoint
    attempt = session.attempt(parent)
    step = split_ref(parent)[1]
    step = attempt.steps_done if weights.name == FINAL else step
    parent_config = read_attempt_config(session.attempt_dir(attempt.name))
    given = {k: v for k, v in overrides.items() if v is not None}
    fixed = [k for k in ("method", "lora_rank", "lora_alpha") if k in given and given[k] != getattr(parent_config, k)]
    if fixed:
        raise ConfigError(f"A continued attempt keeps {attempt.name}'s {', '.join(fixed)} (its weights are shaped by them); "
                          "start a new attempt from the base model to change them.")
    values = parent_config.to_dict() | {"text_encoder_steps": 0} | given
    values.update(parent=f"{attempt.name}@{step}", parent_trained_text_encoder=parent_config.changes_text_encoder)
    return TrainConfig.from_dict(values)


def _vae_words(vae: str | None) -> str:
    return f"the VAE {vae}" if vae else "the model's own VAE"


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def disk_estimate(config: TrainConfig, base_model: BaseModel) -> tuple[int, int]:
    """Bytes a run takes on disk: (at most; once "free space" dropped its optimizer state). The weights it changes are
    saved in final/ and in up to `keep_checkpoints` checkpoints; the newest checkpoint also holds the optimizer state."""
    precision, family = plan_precision(config), base_model.family
    parts = [(base_model.denoiser, family.lora_targets(family.denoiser))]
    if config.changes_text_encoder:
        parts += [(encoder, family.lora_targets(name)) for name, encoder in base_model.text_encoders.items()]
    if config.method == "lora":  # fp32 adapters, fp32 AdamW moments
        count = sum(config.lora_rank * (m.in_features + m.out_features) for model, targets in parts
                    for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(tuple(targets)))
        weight_bytes, optimizer_bytes = 4, 8
    else:
        count = sum(p.numel() for model, _ in parts for p in model.parameters())
        weight_bytes = 2 if precision.bf16_weights else 4
        optimizer_bytes = {"adamw8bit": 2, "adamw": 8}.get(precision.optimizer, 2 * weight_bytes)
    checkpoints = min(config.keep_checkpoints, (config.total_steps - 1) // config.checkpoint_every) if config.checkpoint_every else 0
    finished = count * weight_bytes * (1 + checkpoints)
    return finished + count * optimizer_bytes + (count * weight_bytes if checkpoints == 0 else 0), finished


def make_accelerator(config: TrainConfig, precision: Precision, family: Family):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # A notebook trains attempt after attempt in one kernel, and accelerate keeps the first one's precision
    # ("restart your runtime") unless its state is cleared; the process group of `accelerate launch` stays.
    AcceleratorState._reset_state()
    # Weights that get no gradient (SDXL's first text encoder's last layer) DDP would wait for; only told when that
    # phase runs, since finding unused weights costs time.
    unused = DistributedDataParallelKwargs(find_unused_parameters=family.text_training_leaves_weights_unused() and config.text_encoder_steps > 0)
    return Accelerator(mixed_precision=precision.accelerate, gradient_accumulation_steps=config.gradient_accumulation_steps,
                       kwargs_handlers=[unused])


def new_attempt(session: Session, attempt: str | None, accelerator) -> tuple[Session, str]:
    """One process names the attempt; the others read the session again (they may have read it at another moment)."""
    from accelerate.utils import broadcast_object_list

    name = broadcast_object_list([add_attempt(session, attempt).name if accelerator.is_main_process else None])[0]
    return (session if accelerator.is_main_process else open_session(session.path)), name


def prepare_data(session: Session, config: TrainConfig, examples: list[data.Example], base_model: BaseModel,
                 accelerator, emit, progress: bool) -> TrainingData:
    """Latents of the photos and class images, cached on disk; class images are made by the base model where it lives
    (the GPU when there is one), before the trainer's copies take their memory."""
    info, device = base_model.info, accelerator.device
    model_key = info.cache_key
    vae, tokenizers, family = base_model.vae, base_model.tokenizers, base_model.family
    scaling, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0  # as the VAE's pipeline scales them
    paths = [e.path for e in examples]
    mean, std = data.cached_latents(vae, paths, config.resolution, session.cache_dir, model_key, flip=config.random_flip)
    captions = [e.caption or config.resolved_instance_prompt() for e in examples]
    if config.random_flip:  # the mirrored rows follow the originals (a mirrored centred crop is the same crop)
        captions, paths = captions + captions, paths + paths
    result = TrainingData(((mean - shift) * scaling).to(device), (std * scaling).to(device), family.tokenize(tokenizers, captions).to(device))
    result.instance_image_cond = image_conditioning(family, paths, config.resolution, device)
    if config.with_prior_preservation:
        class_prompt = config.resolved_class_prompt()
        folder = data.class_images_dir(session.class_dir, model_key, class_prompt, config.resolution)
        emit(TrainEvent("info", message=f"Preparing {config.num_class_images} class images for {class_prompt!r} on "
                                        f"{base_model.placement.device} (made once, reused)."))
        with accelerator.main_process_first():
            paths = data.ensure_class_images(base_model.pipeline, folder, class_prompt, config.num_class_images, config.resolution,
                                             progress=progress and accelerator.is_main_process)
        class_mean, class_std = data.cached_latents(vae, paths, config.resolution, session.cache_dir, model_key)
        result.class_mean, result.class_std = ((class_mean - shift) * scaling).to(device), (class_std * scaling).to(device)
        result.class_ids = family.tokenize(tokenizers, [class_prompt]).to(device)
        result.class_image_cond = image_conditioning(family, paths, config.resolution, device)
    return result


def image_conditioning(family: Family, paths: list[Path], resolution: int, device) -> torch.Tensor | None:
    cond = family.image_conditioning(paths, resolution)
    return None if cond is None else cond.to(device)


def place_models(base_model: BaseModel, config: TrainConfig, accelerator, precision: Precision) -> TrainingModels:
    """Copies of the UNet and text encoder(s) on the training device, in the formats the optimizer needs, with LoRA
    adapters (seeded) when asked; every weight frozen until its phase makes it trainable."""
    device = accelerator.device
    use_graphs = resolve_cuda_graphs(config, accelerator, precision)
    # AdamWBF16 keeps bf16 weights (also on a T4, whose math then runs in fp16); LoRA's frozen base needs only the
    # compute format; fp32 AdamW needs fp32 weights.
    if precision.bf16_weights:
        weights_dtype = torch.bfloat16
    elif config.method == "lora":
        weights_dtype = precision.compute_dtype
    else:
        weights_dtype = torch.float32
    family = base_model.family
    encoders = {name: copy_to(encoder, device, weights_dtype) for name, encoder in base_model.text_encoders.items()}
    text_encoders = family.prompt_encoder(**encoders).requires_grad_(False)
    denoiser = copy_to(base_model.denoiser, device, weights_dtype).requires_grad_(False)
    if device.type == "cuda":
        denoiser.to(memory_format=torch.channels_last)  # faster convolutions; before the optimizer sees the weights
    if config.method == "lora":
        add_lora_adapters(family, denoiser, text_encoders, config)
        denoiser.requires_grad_(False)  # each phase unfreezes only its own adapters
        text_encoders.requires_grad_(False)
    if resolve_gradient_checkpointing(config, device):
        denoiser.enable_gradient_checkpointing()
        for encoder in text_encoders.parts().values():
            encoder.gradient_checkpointing_enable()
    return TrainingModels(family, denoiser, text_encoders, device, weights_dtype, precision, use_graphs)


def run_phase(run: Run, phase: str) -> None:
    """One phase (text encoder, then UNet), from where the run stands, with checkpoints, previews and Stop."""
    config, accelerator, models = run.config, run.accelerator, run.models
    phase_steps = config.text_encoder_steps if phase == TEXT_PHASE else config.unet_steps
    if models.phases.index(phase) < models.phases.index(run.state["phase"]) or phase_steps == 0:
        return
    start_step = run.state["phase_step"] if phase == run.state["phase"] else 0
    if start_step >= phase_steps:
        return
    trainable = models.text_encoders if phase == TEXT_PHASE else models.denoiser
    params = set_trainable(trainable, config)
    if models.use_graphs and accelerator.num_processes > 1:
        broadcast_weights(params)
    lr = config.text_encoder_lr if phase == TEXT_PHASE else config.unet_lr
    run.optimizer = make_optimizer(params, lr, models.precision.optimizer, models.device, run.generator, weight_decay=config.weight_decay)
    run.lr_scheduler = make_lr_scheduler(run.optimizer, config, phase_steps)
    run.loss_scaler = LossScaler() if models.precision.scales_loss_itself else None
    if start_step:
        with reading(run.checkpoint, RESUME_ADVICE):
            load_checkpoint_optimizer(run.checkpoint, run.optimizer, run.lr_scheduler, run.loss_scaler)
    step_fn = make_step(run, phase, trainable, params)
    run.emit(TrainEvent("phase", step=run.state["global_step"], total_steps=config.total_steps, phase=phase,
                        message=f"{phase.replace('_', ' ')} phase: {phase_steps} steps at lr {lr:g}"))
    running_loss, steps_since_log = torch.zeros((), device=models.device), 0
    for phase_step in range(start_step, phase_steps):
        running_loss += step_fn()
        run.lr_scheduler.step()
        run.state = {"phase": phase, "phase_step": phase_step + 1, "global_step": run.state["global_step"] + 1}
        step = run.state["global_step"]
        steps_since_log += 1
        run.bar.update(1)
        checkpoint_due = config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.total_steps
        # Reading the loss syncs with the GPU, so it happens only when logging or before a checkpoint
        # (which must never hold weights from after a NaN). Averaged over processes: every one of them
        # shows the same loss and stops on the same NaN (one stopping alone would leave the others waiting).
        if step % config.log_every == 0 or phase_step + 1 == phase_steps or checkpoint_due:
            log_loss(run, phase, (accelerator.reduce(running_loss, "mean") / steps_since_log).item())
            running_loss.zero_()
            steps_since_log = 0
        if checkpoint_due:
            path = save_checkpoint(accelerator, run.attempt_dir, run.state, models, run.optimizer,
                                   run.lr_scheduler, run.generator, config, run.loss_scaler)
            run.emit(TrainEvent("checkpoint", step=step, total_steps=config.total_steps, path=str(path)))
        if config.sample_every and step % config.sample_every == 0:
            if accelerator.is_main_process:
                with models.autocast():
                    images, path = make_previews(config, step, models.denoiser, models.text_encoders, run.base_model, run.attempt_dir, models.device)
                run.emit(TrainEvent("sample", step=step, total_steps=config.total_steps, phase=phase, images=images, path=str(path)))
            accelerator.wait_for_everyone()
        if run.stop.is_set():
            raise KeyboardInterrupt
    run.state = {"phase": phase, "phase_step": phase_steps, "global_step": run.state["global_step"]}
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds it on the eager path
    if isinstance(optimizer, AdamWBF16):
        optimizer.unflatten()  # weights in their own memory again; its buffers and the gradients freed
    trainable.requires_grad_(False)  # frozen from here on, LoRA adapters included
    # this phase's optimizer state would hold GPU memory through the next phase (accelerate keeps what it prepared)
    run.optimizer = run.lr_scheduler = None
    accelerator.free_memory()


def make_step(run: Run, phase: str, trainable, params) -> Callable[[], torch.Tensor]:
    """One optimizer step as a function returning its loss: replayed from a CUDA graph, or eager through accelerate
    (loss scaling, gradient accumulation, DDP). In the UNet phase the text encoders are frozen, so every prompt is
    embedded once and the text encoders leave the GPU."""
    config, accelerator, models, batches = run.config, run.accelerator, run.models, run.data
    if phase != TEXT_PHASE:
        with torch.no_grad(), models.autocast():
            instance_prompts = encode_for_denoiser(models, batches.instance_ids)
            class_prompts = None if batches.class_ids is None else encode_for_denoiser(models, batches.class_ids)
        models.text_encoders.to("cpu")  # frees GPU memory for the UNet phase
    model, optimizer = trainable, run.optimizer
    if not models.use_graphs:  # both are on the device already: no placement (it would copy the optimizer's state there and back)
        model, optimizer = accelerator.prepare(trainable, run.optimizer, device_placement=[False, False])
        run.optimizer = optimizer

    def loss_for_batch() -> torch.Tensor:
        latents, rows, class_rows = draw_batch(run.generator, batches.instance_mean, batches.instance_std, batches.class_mean,
                                               batches.class_std, config, accelerator)
        if phase != TEXT_PHASE:
            embeds, pooled = cached_batch_prompts(instance_prompts, class_prompts, rows, class_rows)
        else:
            embeds, pooled = model(with_class_rows(batches.instance_ids[rows], batches.class_ids, class_rows))
        extra = models.family.denoiser_inputs(pooled, batches.image_rows(rows, class_rows))
        return diffusion_loss(models.denoiser if phase == TEXT_PHASE else model, latents, embeds, run.generator, run.schedule, config,
                              len(rows), accelerator.num_processes, accelerator.process_index, extra=extra, family=models.family)

    if models.use_graphs:
        def graph_body() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_for_batch()
            loss.backward()
            if accelerator.num_processes > 1:
                average_gradients(optimizer, params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            return loss

        compute = models.precision.compute_dtype
        return GraphedStep(graph_body, optimizer, autocast_dtype=compute if compute != torch.float32 else None)

    scaler = run.loss_scaler

    def eager_step() -> torch.Tensor:
        total = torch.zeros((), device=models.device)
        for _ in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(model), models.autocast():
                loss = loss_for_batch()
                accelerator.backward(loss if scaler is None else scaler.scale(loss))
                if accelerator.sync_gradients:
                    # an overflow in fp16 skips the update (and lowers the scale), as torch's GradScaler does
                    if scaler is None or scaler.unscale_(params):
                        accelerator.clip_grad_norm_(params, 1.0)
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / config.gradient_accumulation_steps
        return total

    return eager_step


def encode_for_denoiser(models: TrainingModels, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds, pooled) of prompts, in the training weights' format, computed once for the denoiser's phase."""
    embeds, pooled = models.text_encoders(ids)
    return embeds.to(models.weights_dtype), None if pooled is None else pooled.to(models.weights_dtype)


def cached_batch_prompts(prompts, class_prompts, rows, class_rows) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's (embeds, pooled) from `encode_for_denoiser`'s: each drawn photo's, then the class prompt's per class image."""
    (embeds, pooled), (class_embeds, class_pooled) = prompts, class_prompts or (None, None)
    embeds = with_class_rows(embeds[rows], class_embeds, class_rows)
    return embeds, None if pooled is None else with_class_rows(pooled[rows], class_pooled, class_rows)


def with_class_rows(instance_rows: torch.Tensor, shared: torch.Tensor | None, class_rows) -> torch.Tensor:
    """A batch's rows of something per photo, then `shared` (the class prompt's one row) again for each class image."""
    if class_rows is None:
        return instance_rows
    return torch.cat([instance_rows, shared.expand(len(class_rows), *shared.shape[1:])])


def log_loss(run: Run, phase: str, mean_loss: float) -> None:
    """Stop on a NaN; else record the loss in log.csv, the progress bar and a step event."""
    if not math.isfinite(mean_loss):
        raise TrainingError(nan_message(run.config, run.models.precision.compute))
    step, total = run.state["global_step"], run.config.total_steps
    run.losses.append((step, mean_loss))
    elapsed = time.time() - run.started
    current_lr = float(run.lr_scheduler.get_last_lr()[0])
    if run.accelerator.is_main_process:
        append_log(run.attempt_dir, step, phase, mean_loss, current_lr, elapsed)
    eta = elapsed / max(step - run.first_step, 1) * (total - step)
    run.bar.set_postfix(loss=f"{mean_loss:.4f}")
    run.emit(TrainEvent("step", step=step, total_steps=total, phase=phase, loss=mean_loss, lr=current_lr, elapsed_s=elapsed, eta_s=eta))


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop

@torch.no_grad()
def make_previews(config: TrainConfig, step: int, denoiser, text_encoders: PromptEncoder, base_model: BaseModel, attempt_dir: Path,
                  device) -> tuple[list[Any], Path]:
    """Preview images of the model as it is at `step`, saved as samples/step-N.png. The prompts and seed are
    the same every time, so previews side by side show what training changed. Uses no training randomness
    (resume stays exact), the text encoders where they currently are (the CPU during the UNet phase) and the base
    model's VAE where it lives, in its own format."""
    from .grid import make_grid
    from .sample import decode_latents, set_scheduler

    prompts = config.resolved_sample_prompts()
    family = base_model.family
    embeds, pooled = text_encoders(family.tokenize(base_model.tokenizers, prompts + [""]))
    embeds, pooled = embeds.to(device, denoiser.dtype), None if pooled is None else pooled.to(device, denoiser.dtype)
    # the base model's pipeline around the training denoiser, with no text encoder (prompts come embedded)
    pipe = family.assemble(base_model.pipeline, **{family.denoiser: denoiser}, **dict.fromkeys(family.text_encoders))
    set_scheduler(pipe, family.samplers[0])
    pipe.set_progress_bar_config(disable=True)
    was_training = denoiser.training
    denoiser.eval()
    try:
        latents = torch.cat([
            pipe(**family.pipeline_prompt_kwargs(pipe, embeds, pooled, i), num_inference_steps=25, guidance_scale=family.sampling_guidance,
                 height=config.resolution, width=config.resolution, generator=torch.Generator().manual_seed(config.seed),
                 output_type="latent").images
            for i in range(len(prompts))
        ])
    finally:
        denoiser.train(was_training)
    images = decode_latents(pipe, latents, config.resolution, config.resolution)
    grid = make_grid([[image] for image in images], prompts, [f"step {step}"])
    path = attempt_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    fileio.save_with(path, lambda tmp: grid.save(tmp, format="PNG"))
    return images, path


def copy_to(model, device, dtype):
    """A copy of `model` on `device`, its floating-point tensors in `dtype`, made tensor by tensor: the model is never
    copied whole where it is (the base waits on the CPU while training, and RAM is short on Colab)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        moved = tensor.detach().to(device, dtype if tensor.is_floating_point() else None, copy=True)
        memo[id(tensor)] = torch.nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else moved
    return copy.deepcopy(model, memo)


def held_out_split(session: Session, config: TrainConfig, examples: list[data.Example], resumed: str | None) -> tuple[list[data.Example], list[str]]:
    """The photos to train on, and the names of those kept out for the scores: a resumed attempt keeps its own, one
    continued from another attempt its parent's (the parent saw the rest), a new one chooses (`data.choose_held_out`)."""
    source = resumed or split_ref(config.parent)[0]
    names = (read_held_out(session.attempt_dir(session.attempt(source).name)) if source
             else data.choose_held_out(examples, config.held_out_photos))
    training, held = data.split_held_out(examples, names)
    return training, [e.path.name for e in held]


def read_held_out(attempt_dir: Path) -> list[str]:
    """The photo names an attempt kept out of training (none for an attempt from before held-out photos)."""
    path = attempt_dir / data.HELD_OUT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def check_training_data(config: TrainConfig, examples: list[data.Example]) -> None:
    if not examples:
        raise ConfigError("The session has no prepared photos; add some first with `dreamnb prepare PHOTOS --session DIR`.")
    for example in examples:
        if example.caption is not None and config.token not in example.caption:
            raise ConfigError(f"The caption of {example.path.name} does not contain the token {config.token!r}; add it to {example.path.with_suffix('.txt').name} or delete that file.")


def resolve_mixed_precision(config: TrainConfig) -> str:
    if config.mixed_precision != "auto":
        if config.mixed_precision != "no" and not torch.cuda.is_available():
            raise ConfigError(f"mixed_precision={config.mixed_precision} needs a GPU and none is available; use 'auto' or 'no'.")
        return config.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if gpu_has_bf16() else "fp16"


def resolve_gradient_checkpointing(config: TrainConfig, device: torch.device) -> bool:
    """'auto': on when the GPU memory this process may use is below what a full fine-tune needs without it
    (≈18 GB at 512 px)."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing == "on"
    if device.type != "cuda":
        return False
    needed_gb = (18 if config.method == "full" else 8) * (config.resolution / 512) ** 2 * config.train_batch_size
    return gpu_memory_budget(device) / 2**30 < needed_gb * 1.2


def add_lora_adapters(family: Family, denoiser, text_encoders: PromptEncoder, config: TrainConfig) -> None:
    """Adapters drawn from the run's seed (peft draws them from the global generator): the same seed, the same LoRA.
    Each text encoder (SDXL: both, with the same targets) gets its own, saved under its own name.
    The global generators are left as they were."""
    devices = [denoiser.device] if denoiser.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        add_lora(denoiser, config.lora_rank, config.lora_alpha, family.lora_targets(family.denoiser))
        if config.changes_text_encoder:
            for name, encoder in text_encoders.parts().items():
                add_lora(encoder, config.lora_rank, config.lora_alpha, family.lora_targets(name))
    for model in (denoiser, text_encoders):  # adapters are trained and kept in fp32, also over a bf16 base
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()


def add_lora(model, rank: int, alpha: int, targets: list[str]) -> None:
    """peft's own injection (what diffusers' loader uses too); works for the UNet and the CLIP text encoder alike."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets), model)


def set_trainable(model, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Full: every weight of `model`; LoRA: only its adapter weights."""
    params = []
    for name, param in model.named_parameters():
        train_it = config.method == "full" or "lora_" in name
        param.requires_grad_(train_it)
        if train_it:
            params.append(param)
    return params


def resolve_optimizer(config: TrainConfig, cuda: bool, compute: str) -> str:
    """'auto' for a full fine-tune on a GPU: bf16 weights with AdamWBF16 (half the memory, capturable in a CUDA graph),
    also on GPUs without bf16 math such as Colab's T4, where training computes in fp16 but the weights are stored in
    bf16 (its fp16 + fp32 AdamW plan does not fit in 15 GB), unless bitsandbytes is installed there: then 8-bit AdamW
    over fp32 weights. On a CPU, and for LoRA (few weights): plain AdamW."""
    choice = config.optimizer
    if choice == "auto":
        if not cuda or config.method == "lora":
            return "adamw"
        if compute == "fp16" and _have_bitsandbytes():
            return "adamw8bit"
        return "adamw-bf16"
    if choice == "adamw8bit" and not (cuda and _have_bitsandbytes()):
        raise ConfigError("optimizer='adamw8bit' needs a GPU and bitsandbytes (pip install bitsandbytes); use 'auto' or 'adamw'.")
    if choice.startswith("adamw-bf16") and config.method == "lora":
        raise ConfigError(f"optimizer={choice!r} is for full fine-tuning (LoRA trains its few weights in fp32); use 'auto' or 'adamw'.")
    if choice in ("adamw-bf16-kahan", "adamw-bf16-v32") and (not cuda or compute != "bf16"):
        # the quality harness's variants; only 'adamw-bf16' has been run on a T4's fp16 math (the T4 stand-in)
        raise ConfigError(f"optimizer={choice!r} needs a GPU with bf16 math (not a CPU or a T4); use 'auto', 'adamw' or 'adamw-bf16'.")
    return choice


def _have_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_cuda_graphs(config: TrainConfig, accelerator, precision: Precision) -> bool:
    """Graphs need a GPU, one micro-batch per step, no fp16 loss scaling and a capturable optimizer.
    With several GPUs (data parallel) only when asked for ('on'): the gradient all-reduce is then
    captured too, in place of DDP's."""
    possible = (accelerator.device.type == "cuda" and config.gradient_accumulation_steps == 1
                and precision.compute != "fp16" and precision.optimizer != "adamw8bit")
    if config.cuda_graphs == "on" and not possible:
        raise ConfigError("cuda_graphs='on' needs a GPU, gradient_accumulation_steps=1, bf16 or fp32 and an optimizer other than adamw8bit; use 'auto'.")
    if accelerator.num_processes > 1:
        return possible and config.cuda_graphs == "on"
    return possible and config.cuda_graphs != "off"


def broadcast_weights(params) -> None:
    """Every process starts from the first one's weights (LoRA adapters start random), as DDP does when it wraps a model."""
    import torch.distributed as dist

    for param in params:
        dist.broadcast(param.data, src=0)


def average_gradients(optimizer, params) -> None:
    """Data parallel without DDP (the CUDA-graph path): one all-reduce over every gradient, then ÷ processes,
    so that the whole step, communication included, is replayed from the graph."""
    import torch.distributed as dist

    flat_already = isinstance(optimizer, AdamWBF16)  # its gradients are views of one flat buffer
    grads = [p.grad for p in params if p.grad is not None]
    flat = optimizer.flat_grad if flat_already else torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    if not flat_already:
        torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


def make_optimizer(params, lr: float, name: str, device: torch.device, generator=None, *,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name in BF16_OPTIMIZERS:  # re-homes the weights as bf16, whatever format they came in
        return AdamWBF16(params, lr=lr, weight_decay=weight_decay, generator=generator, **BF16_OPTIMIZERS[name])
    # torch's AdamW multiplies the weights by 1 - lr·weight_decay: at a full fine-tune's 2e-6 with 1e-2 that factor is
    # exactly 1 in fp32, so there the decay does nothing (AdamWBF16 applies it as a term of the update instead); at
    # LoRA's 1e-4 it acts.
    if device.type == "cuda":  # fused, and capturable with a tensor LR so a CUDA graph can replay it
        return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), weight_decay=weight_decay, fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_lr_scheduler(optimizer, config: TrainConfig, steps: int):
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.lr_scheduler, config.lr_scheduler)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=steps)


def draw_batch(generator, mean, std, class_mean, class_std, config: TrainConfig, accelerator):
    """Latents for one batch: random photos (and class images), drawn identically on every process,
    each process keeping its own slice so data-parallel ranks see different photos."""
    world, rank, batch = accelerator.num_processes, accelerator.process_index, config.train_batch_size
    device = mean.device

    def draw(m, s):
        rows = torch.randint(0, m.shape[0], (world * batch,), generator=generator, device=device)
        eps = torch.randn((world * batch, *m.shape[1:]), generator=generator, device=device)
        mine = slice(rank * batch, (rank + 1) * batch)
        return rows[mine], (m[rows] + s[rows] * eps)[mine]

    rows, latents = draw(mean, std)
    class_rows = None
    if class_mean is not None:
        class_rows, class_latents = draw(class_mean, class_std)
        latents = torch.cat([latents, class_latents])
    return latents, rows, class_rows


def ranks_agree_message(accelerator, *models) -> str:
    """Data-parallel processes must end with the same weights (one copy is saved): compare a checksum of
    every process's weights, position-weighted so that swapped tensors differ too."""
    sums = torch.stack([p.detach().double().sum().cpu() for model in models for p in model.parameters()])
    checksum = torch.stack([sums.sum(), (sums * torch.arange(1, len(sums) + 1, dtype=torch.float64)).sum()])
    every = accelerator.gather(checksum.to(accelerator.device)).view(-1, 2)
    if bool((every == every[0]).all()):
        return f"All {accelerator.num_processes} processes ended with the same weights."
    return (f"The {accelerator.num_processes} processes ended with different weights (a data-parallel bug); "
            "the saved model is the first process's.")


def nan_message(config: TrainConfig, precision: str) -> str:
    hint = " in fp16 (try bf16 or fp32)" if precision == "fp16" else ""
    return (f"The loss became NaN (not a number): training diverged, usually because the learning rate is too high{hint}; "
            f"lower unet_lr/text_encoder_lr (now {config.unet_lr:g}/{config.text_encoder_lr:g}) and start a new attempt — "
            "the last checkpoint before it is kept.")


def disk_full_message(attempt_dir: Path) -> str:
    checkpoint = latest_checkpoint(attempt_dir)
    kept = f"the last checkpoint ({checkpoint.name}) is intact, so resume once there is room" if checkpoint else "no checkpoint was written yet"
    return (f"The disk is full (where {attempt_dir.parent.parent} lives): free some space, e.g. delete attempts or checkpoints you "
            f"no longer need; {kept}.")


def oom_message(config: TrainConfig) -> str:
    tips = []
    if config.gradient_checkpointing != "on":
        tips.append("gradient_checkpointing='on'")
    if config.optimizer != "adamw8bit":
        tips.append("optimizer='adamw8bit' (pip install bitsandbytes)")
    if config.method != "lora":
        tips.append("method='lora'")
    if config.resolution > 512:
        tips.append("resolution=512")
    if config.train_batch_size > 1:
        tips.append("train_batch_size=1")
    return "The GPU ran out of memory. Try " + ", ".join(tips or ["a smaller resolution"]) + "; the session is unchanged and you can start again."


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step")


def append_log(attempt_dir: Path, step: int, phase: str, loss: float, lr: float, elapsed: float) -> None:
    """log.csv: one row per logged step. Appends are line-sized; resume rewrites it up to the checkpoint."""
    path = attempt_dir / "log.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LOG_FIELDS)
        writer.writerow([step, phase, f"{loss:.6f}", f"{lr:.3g}", f"{elapsed:.1f}"])


def truncate_log(attempt_dir: Path, step: int) -> None:
    """Drop rows logged after `step` (work lost to an interruption), and rows a crash cut short, so a resumed log reads straight."""
    if (attempt_dir / "log.csv").exists():
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=LOG_FIELDS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for r in read_log(attempt_dir) if int(r["step"]) <= step)
        fileio.write_text(attempt_dir / "log.csv", out.getvalue())


def read_log(attempt_dir: Path) -> list[dict[str, str]]:
    """The rows of log.csv that are whole (a line cut short by a crash, or edited by hand, is left out)."""
    path = Path(attempt_dir) / "log.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [row for row in csv.DictReader(f) if _whole_row(row)]


def _whole_row(row: dict) -> bool:
    try:
        int(row["step"]), float(row["loss"]), float(row["lr"]), float(row["elapsed_s"])
    except (KeyError, TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step-NNNNNN/ holds the changed weights, optimizer, LR schedule, RNG and step.

def trainable_state(model, config: TrainConfig) -> dict[str, torch.Tensor]:
    if config.method == "lora":
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def save_checkpoint(accelerator, attempt_dir: Path, state: dict, models: TrainingModels, optimizer, lr_scheduler, generator,
                    config: TrainConfig, loss_scaler: LossScaler | None = None) -> Path:
    from safetensors.torch import save_file

    path = attempt_dir / CHECKPOINTS / f"step-{state['global_step']:06d}"
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return path
    with fileio.atomic_dir(path) as tmp:
        weights: dict[str, torch.Tensor] = {}  # every weight that differs from the base model's
        inherited, denoiser_phase = bool(config.parent), state["phase"] != TEXT_PHASE
        denoiser_changed = denoiser_phase or inherited
        text_changed = config.changes_text_encoder and (denoiser_phase or state["phase_step"] > 0 or inherited)
        for name, model in models.parts().items():
            if denoiser_changed if name == models.family.denoiser else text_changed:
                weights.update({f"{name}.{k}": v for k, v in trainable_state(model, config).items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if optimizer is not None:
            resume_state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
            if loss_scaler is not None:
                resume_state["loss_scaler"] = loss_scaler.state_dict()
            torch.save(resume_state, tmp / OPTIMIZER_FILE)
        save_file({"generator": generator.get_state()}, str(tmp / "rng.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / "state.json").write_text(json.dumps(state))
    prune_checkpoints(attempt_dir / CHECKPOINTS, config.keep_checkpoints)
    drop_optimizer_state(attempt_dir, keep=path)
    return path


def prune_checkpoints(folder: Path, keep: int) -> None:
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(attempt_dir: Path) -> Path | None:
    """The newest complete checkpoint."""
    complete = list(checkpoint_folders(attempt_dir).values())
    return complete[-1] if complete else None


RESUME_ADVICE = ("so the attempt cannot be resumed from it; continue it as a new attempt from an earlier checkpoint "
                 "(--from NAME@STEP) or start a new one")


def load_checkpoint_weights(checkpoint: Path, models: TrainingModels, generator, config: TrainConfig) -> dict:
    """Weights, random generator and step of a checkpoint; its optimizer file is opened (not read) to check it is whole."""
    from safetensors.torch import load_file

    load_weights(load_file(str(checkpoint / "weights.safetensors")), models, config)
    generator.set_state(load_file(str(checkpoint / "rng.safetensors"))["generator"])
    state = json.loads((checkpoint / "state.json").read_text())
    if state["phase"] not in models.phases or not all(isinstance(state[k], int) for k in ("phase_step", "global_step")):
        raise ValueError(f"state.json holds {state}")
    if state["phase_step"] > 0:
        torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True, mmap=True)
    return state


def load_weights(weights: dict[str, torch.Tensor], models: TrainingModels, config: TrainConfig) -> None:
    """`unet.*`, `text_encoder.*` (each part's name, then its own) weights (whole models, or LoRA adapters in peft's
    names) into the models."""
    for name, model in models.parts().items():
        part = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        if not part:
            continue
        if config.method == "lora":
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(model, part)
        else:
            model.load_state_dict(part)


def load_parent_weights(weights_dir: Path, models: TrainingModels, config: TrainConfig) -> None:
    """The weights of the attempt being continued: a checkpoint's, or its final/ (diffusers folders, or a LoRA file in
    diffusers' names, turned back into peft's)."""
    from safetensors.torch import load_file

    if weights_dir.name != FINAL:
        weights = load_file(str(weights_dir / "weights.safetensors"))
    elif config.method == "lora":
        from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

        saved = load_file(str(weights_dir / LORA_FILE))
        weights = {}
        for name in models.parts():
            to_peft = convert_unet_state_dict_to_peft if name == models.family.denoiser else convert_state_dict_to_peft
            part = to_peft({k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")})
            weights.update({f"{name}.{k}": v for k, v in part.items()})
    else:
        weights = {f"{name}.{k}": v for name in models.parts()
                   for file in sorted((weights_dir / name).glob("*.safetensors")) for k, v in load_file(str(file)).items()}
    load_weights(weights, models, config)


def load_checkpoint_optimizer(checkpoint: Path, optimizer, lr_scheduler, loss_scaler: LossScaler | None = None) -> None:
    """The optimizer's and schedule's state, and the loss scale where the trainer scales the loss. A learning rate that is a tensor on the GPU (fused AdamW's and AdamWBF16's,
    read by a replayed CUDA graph) stays that same tensor, given the saved value: loading would otherwise put a CPU
    tensor in its place, which the graph never reads, and the schedule would change nothing."""
    saved = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    lr_tensors = [group["lr"] if isinstance(group["lr"], torch.Tensor) else None for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    for group, tensor in zip(optimizer.param_groups, lr_tensors):
        if tensor is not None and group["lr"] is not tensor:
            tensor.copy_(torch.as_tensor(group["lr"]))
            group["lr"] = tensor
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if loss_scaler is not None and "loss_scaler" in saved:  # older checkpoints have none: the scale starts afresh
        loss_scaler.load_state_dict(saved["loss_scaler"])


def save_final(accelerator, attempt_dir: Path, models: TrainingModels, config: TrainConfig) -> Path:
    """final/: unet/ (and text_encoder/, SDXL: text_encoder_2/, when trained: each part under its name) as diffusers
    folders, or one LoRA file."""
    path = attempt_dir / FINAL
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return path
    trained = {name: model for name, model in models.parts().items() if name == models.family.denoiser or config.changes_text_encoder}
    with fileio.atomic_dir(path) as tmp:
        if config.method == "lora":
            adapters = {name: trainable_state(model, config) for name, model in trained.items()}
            save_lora_file(tmp, adapters, config.lora_rank, config.lora_alpha, models.family)
        else:
            for name, model in trained.items():
                model.save_pretrained(tmp / name, safe_serialization=True)
    return path


def save_lora_file(folder: Path, adapters: dict[str, dict[str, torch.Tensor]], rank: int, alpha: int, family: Family) -> None:
    """LORA_FILE from each part's adapters (peft's names), through diffusers' own writer (the family's pipeline): keys
    unet.*, text_encoder.* (text_encoder_2.*) in diffusers' names, each part's LoRA settings stored beside them so
    loaders apply alpha/rank, not alpha = rank. Training's final/ and export's checkpoint files are written here."""
    from diffusers.utils import convert_state_dict_to_diffusers

    from peft import LoraConfig

    layers = {}
    for name, state in adapters.items():
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
        layers[f"{name}_lora_adapter_metadata"] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=family.lora_targets(name)).to_dict()
    family.pipeline_class().save_lora_weights(folder, safe_serialization=True, **layers)
