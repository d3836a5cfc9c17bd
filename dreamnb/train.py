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

import copy
import csv
import io
import json
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import data, fileio
from .config import ConfigError, TrainConfig, validate
from .fast import AdamWBF16, GraphedStep
from .models import BaseModel, load_base_model
from .session import Session, add_attempt, open_session, save_session, update_attempt

log = logging.getLogger(__name__)

PHASES = ("text_encoder", "unet")  # in training order
CHECKPOINTS = "checkpoints"
FINAL = "final"
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
# Noise schedule helpers, on the device (diffusers' add_noise copies its tables to the device each call).

@dataclass
class NoiseSchedule:
    sqrt_alpha: torch.Tensor
    sqrt_one_minus_alpha: torch.Tensor
    snr: torch.Tensor
    prediction_type: str
    num_train_timesteps: int

    @classmethod
    def from_scheduler(cls, scheduler, device) -> "NoiseSchedule":
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(scheduler.config)
        alphas = ddpm.alphas_cumprod.to(device=device, dtype=torch.float32)
        return cls(
            sqrt_alpha=alphas.sqrt(),
            sqrt_one_minus_alpha=(1 - alphas).sqrt(),
            snr=alphas / (1 - alphas),
            prediction_type=ddpm.config.prediction_type,
            num_train_timesteps=ddpm.config.num_train_timesteps,
        )


def diffusion_loss(unet, latents, embeds, generator, schedule: NoiseSchedule, config: TrainConfig, n_instance: int,
                   world: int = 1, rank: int = 0) -> torch.Tensor:
    """DreamBooth loss for one batch: rows [:n_instance] are the subject, the rest class images (prior).
    Data parallel: noise and timesteps are drawn for every process's rows (one seeded generator, the same on
    each) and each process keeps its own, so processes do not repeat each other's noise."""
    batch, device = latents.shape[0], latents.device
    mine = slice(rank * batch, (rank + 1) * batch)
    noise = torch.randn((world * batch, *latents.shape[1:]), generator=generator, device=device)[mine]
    if config.offset_noise:
        noise = noise + config.offset_noise * torch.randn((world * batch, latents.shape[1], 1, 1), generator=generator, device=device)[mine]
    timesteps = torch.randint(0, schedule.num_train_timesteps, (world * batch,), generator=generator, device=device)[mine]
    a = schedule.sqrt_alpha[timesteps].view(-1, 1, 1, 1)
    s = schedule.sqrt_one_minus_alpha[timesteps].view(-1, 1, 1, 1)
    noisy = a * latents + s * noise
    target = a * noise - s * latents if schedule.prediction_type == "v_prediction" else noise
    pred = unet(noisy, timesteps, embeds).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.min_snr_gamma:
        snr = schedule.snr[timesteps]
        clipped = torch.clamp(snr, max=config.min_snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1) if schedule.prediction_type == "v_prediction" else clipped / snr)
    loss = per_sample[:n_instance].mean()
    if batch > n_instance:
        loss = loss + config.prior_loss_weight * per_sample[n_instance:].mean()
    return loss


# ---------------------------------------------------------------------------------------------------

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
) -> TrainResult:
    """Train one attempt. `base_model` is a loaded BaseModel (left untouched: trainable parts are
    copied) or a source string. With `resume`, continue the named (or latest) attempt from its
    newest checkpoint. `stop` (e.g. the notebook's Stop button) ends the run with a checkpoint."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list

    emit = callback or (lambda event: None)
    if resume:  # an attempt always continues with the settings it started with
        name = session.attempt(attempt).name
        config = TrainConfig.from_dict(json.loads((session.attempt_dir(name) / "config.json").read_text()))
    validate(config)
    examples = data.list_examples(session.instance_dir)
    check_training_data(config, examples)

    # A notebook trains attempt after attempt in one kernel, and accelerate keeps the first one's precision
    # ("restart your runtime") unless its state is cleared; the process group of `accelerate launch` stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config), gradient_accumulation_steps=config.gradient_accumulation_steps)

    # --- the attempt folder: new, or the one to resume ------------------------------------------
    if not resume:  # one process names the attempt (the others may have read session.json at another moment)
        name = broadcast_object_list([add_attempt(session, attempt).name if accelerator.is_main_process else None])[0]
        if not accelerator.is_main_process:
            session = open_session(session.path)
    attempt_dir = session.attempt_dir(name)
    if accelerator.is_main_process:
        fileio.write_json(attempt_dir / "config.json", config.to_dict())
    checkpoint = latest_checkpoint(attempt_dir) if resume else None

    # --- devices and precision ------------------------------------------------------------------
    device = accelerator.device
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if isinstance(base_model, (str, Path)):
        base_model = load_base_model(base_model, config=config_source)
    info = base_model.info
    model_key = f"{info.source}|{info.family}|{info.prediction_type}"
    if session.base_model is None:
        session.base_model = info.source
        save_session(session)
    if info.resolution != config.resolution:
        emit(TrainEvent("info", message=f"Training at {config.resolution} px; this base model was made for {info.resolution} px."))

    vae = base_model.vae.requires_grad_(False)
    if vae.device != device or vae.dtype != frozen_dtype:
        cast(vae, device, frozen_dtype)
    tokenizer = base_model.tokenizer
    optimizer_name = resolve_optimizer(config, accelerator)
    use_graphs = resolve_cuda_graphs(config, accelerator, optimizer_name)
    # Weights that are not updated by fp32 AdamW can live in the compute precision: half the memory.
    weights_dtype = torch.bfloat16 if optimizer_name == "adamw-bf16" or (config.method == "lora" and frozen_dtype == torch.bfloat16) else torch.float32
    text_encoder = copy.deepcopy(base_model.text_encoder).to(device, weights_dtype).requires_grad_(False)
    unet = cast(copy.deepcopy(base_model.unet), device, weights_dtype).requires_grad_(False)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)  # faster convolutions; before the optimizer sees the weights
    if config.method == "lora":
        add_lora_adapters(unet, text_encoder, config)
    if resolve_gradient_checkpointing(config, device):
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    schedule = NoiseSchedule.from_scheduler(base_model.pipeline.scheduler, device)
    emit(TrainEvent("info", message=f"Optimizer {optimizer_name}, {accelerator.mixed_precision} mixed precision, "
                                    f"CUDA graphs {'on' if use_graphs else 'off'}, weights in {str(weights_dtype)[6:]}."))

    # --- caches: latents of photos and class images ---------------------------------------------
    instance_mean, instance_std = data.cached_latents(
        vae, [e.path for e in examples], config.resolution, session.cache_dir, model_key, flip=config.random_flip
    )
    captions = [e.caption or config.resolved_instance_prompt() for e in examples]
    if config.random_flip:
        captions = captions + captions
    instance_ids = data.tokenize(tokenizer, captions).to(device)
    class_mean = class_std = class_ids = None
    if config.with_prior_preservation:
        class_prompt = config.resolved_class_prompt()
        folder = data.class_images_dir(session.class_dir, model_key, class_prompt, config.resolution)
        emit(TrainEvent("info", message=f"Preparing {config.num_class_images} class images for {class_prompt!r} (made once, reused)."))
        with accelerator.main_process_first():
            paths = data.ensure_class_images(base_model.pipeline, folder, class_prompt, config.num_class_images, config.resolution)
        class_mean, class_std = data.cached_latents(vae, paths, config.resolution, session.cache_dir, model_key)
        class_ids = data.tokenize(tokenizer, [class_prompt]).to(device)
    scaling = vae.config.scaling_factor
    instance_mean, instance_std = (instance_mean * scaling).to(device), (instance_std * scaling).to(device)
    if class_mean is not None:
        class_mean, class_std = (class_mean * scaling).to(device), (class_std * scaling).to(device)
    if device.type == "cuda":
        vae.to("cpu")  # latents are cached: the VAE is not needed on the GPU while training


    # --- state that a checkpoint restores -------------------------------------------------------
    # CUDA graphs replay random ops only from the device's default generator, so that one is used there.
    generator = torch.cuda.default_generators[device.index or 0] if use_graphs else torch.Generator(device=device)
    generator.manual_seed(config.seed)
    state = {"phase": PHASES[0], "phase_step": 0, "global_step": 0}
    if checkpoint is not None:
        state = load_checkpoint_weights(checkpoint, unet, text_encoder, generator, config)
        truncate_log(attempt_dir, state["global_step"])
        emit(TrainEvent("info", message=f"Resuming {name} from step {state['global_step']}."))
    update_attempt(session, name, status="training", message="")

    total_steps = config.total_steps
    first_step = state["global_step"]
    started = time.time()
    losses: list[tuple[int, float]] = []
    bar = _progress_bar(progress and accelerator.is_main_process, total_steps, state["global_step"])
    emit(TrainEvent("start", step=state["global_step"], total_steps=total_steps, message=f"Training {name} on {device}"))
    status, message = "finished", ""
    optimizer = lr_scheduler = None
    try:
        for phase in PHASES:
            phase_steps = config.text_encoder_steps if phase == "text_encoder" else config.unet_steps
            if PHASES.index(phase) < PHASES.index(state["phase"]) or phase_steps == 0:
                continue
            start_step = state["phase_step"] if phase == state["phase"] else 0
            if start_step >= phase_steps:
                continue
            trainable = text_encoder if phase == "text_encoder" else unet
            params = set_trainable(trainable, config)
            if use_graphs and accelerator.num_processes > 1:
                broadcast_weights(params)
            lr = config.text_encoder_lr if phase == "text_encoder" else config.unet_lr
            optimizer = make_optimizer(params, lr, optimizer_name, device, generator)
            lr_scheduler = make_lr_scheduler(optimizer, config, phase_steps)
            if start_step:
                load_checkpoint_optimizer(checkpoint, optimizer, lr_scheduler)
            if phase == "unet":  # the text encoder is frozen from here on: embed every prompt once
                with torch.no_grad(), accelerator.autocast():
                    instance_embeds = data.encode_prompts(text_encoder, instance_ids).to(weights_dtype)
                    class_embeds = data.encode_prompts(text_encoder, class_ids).to(weights_dtype) if class_ids is not None else None
                text_encoder.to("cpu")  # frees GPU memory for the UNet phase
            model = trainable
            if not use_graphs:
                model, optimizer = accelerator.prepare(trainable, optimizer)

            def loss_for_batch() -> torch.Tensor:
                latents, rows, class_rows = draw_batch(generator, instance_mean, instance_std, class_mean, class_std, config, accelerator)
                if phase == "unet":
                    embeds = instance_embeds[rows]
                    if class_rows is not None:
                        embeds = torch.cat([embeds, class_embeds.expand(len(class_rows), -1, -1)])
                else:
                    ids = instance_ids[rows]
                    if class_rows is not None:
                        ids = torch.cat([ids, class_ids.expand(len(class_rows), -1)])
                    embeds = model(ids)[0]
                return diffusion_loss(unet if phase == "text_encoder" else model, latents, embeds, generator, schedule, config, len(rows),
                                      accelerator.num_processes, accelerator.process_index)

            if use_graphs:
                def graph_body() -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_for_batch()
                    loss.backward()
                    if accelerator.num_processes > 1:
                        average_gradients(optimizer, params)
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    return loss

                run_step = GraphedStep(graph_body, optimizer, autocast_dtype=frozen_dtype if frozen_dtype != torch.float32 else None)
            else:
                def run_step() -> torch.Tensor:
                    total = torch.zeros((), device=device)
                    for _ in range(config.gradient_accumulation_steps):
                        with accelerator.accumulate(model), accelerator.autocast():
                            loss = loss_for_batch()
                            accelerator.backward(loss)
                            if accelerator.sync_gradients:
                                accelerator.clip_grad_norm_(params, 1.0)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        total += loss.detach() / config.gradient_accumulation_steps
                    return total

            emit(TrainEvent("phase", step=state["global_step"], total_steps=total_steps, phase=phase, message=f"{phase.replace('_', ' ')} phase: {phase_steps} steps at lr {lr:g}"))
            running_loss, steps_since_log = torch.zeros((), device=device), 0
            for phase_step in range(start_step, phase_steps):
                running_loss += run_step()
                lr_scheduler.step()
                state = {"phase": phase, "phase_step": phase_step + 1, "global_step": state["global_step"] + 1}
                step = state["global_step"]
                steps_since_log += 1
                bar.update(1)
                checkpoint_due = config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps
                # Reading the loss syncs with the GPU, so it happens only when logging or before a checkpoint
                # (which must never hold weights from after a NaN). Averaged over processes: every one of them
                # shows the same loss and stops on the same NaN (one stopping alone would leave the others waiting).
                if step % config.log_every == 0 or phase_step + 1 == phase_steps or checkpoint_due:
                    mean_loss = (accelerator.reduce(running_loss, "mean") / steps_since_log).item()
                    running_loss.zero_()
                    steps_since_log = 0
                    if not math.isfinite(mean_loss):
                        raise TrainingError(nan_message(config, accelerator.mixed_precision))
                    losses.append((step, mean_loss))
                    elapsed = time.time() - started
                    current_lr = float(lr_scheduler.get_last_lr()[0])
                    if accelerator.is_main_process:
                        append_log(attempt_dir, step, phase, mean_loss, current_lr, elapsed)
                    eta = elapsed / max(step - first_step, 1) * (total_steps - step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    emit(TrainEvent("step", step=step, total_steps=total_steps, phase=phase, loss=mean_loss, lr=current_lr, elapsed_s=elapsed, eta_s=eta))
                if checkpoint_due:
                    path = save_checkpoint(accelerator, attempt_dir, state, unet, text_encoder, optimizer, lr_scheduler, generator, config)
                    emit(TrainEvent("checkpoint", step=step, total_steps=total_steps, path=str(path)))
                if config.sample_every and step % config.sample_every == 0:
                    if accelerator.is_main_process:
                        with accelerator.autocast():
                            images, path = make_previews(config, step, unet, text_encoder, base_model, vae, attempt_dir, device)
                        emit(TrainEvent("sample", step=step, total_steps=total_steps, phase=phase, images=images, path=str(path)))
                    accelerator.wait_for_everyone()
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
            state = {"phase": phase, "phase_step": phase_steps, "global_step": state["global_step"]}
            if isinstance(optimizer, AdamWBF16):
                optimizer.unflatten()
        if accelerator.num_processes > 1:
            emit(TrainEvent("info", message=ranks_agree_message(accelerator, unet, text_encoder)))
        final_dir = save_final(accelerator, attempt_dir, unet, text_encoder, config)
        message = f"Finished {total_steps} steps; the trained model is in {final_dir}."
    except KeyboardInterrupt:
        status = "interrupted"
        path = save_checkpoint(accelerator, attempt_dir, state, unet, text_encoder, optimizer, lr_scheduler, generator, config)
        message = f"Stopped at step {state['global_step']} of {total_steps}; saved {path.name}. Resume with --resume (or the Resume button)."
        final_dir = None
    except torch.cuda.OutOfMemoryError:
        status, final_dir = "failed", None
        optimizer = lr_scheduler = None
        unet = text_encoder = None
        _free_gpu_memory()
        message = oom_message(config)
    except TrainingError as err:
        status, final_dir, message = "failed", None, str(err)
    finally:
        bar.close()
    update_attempt(session, name, status=status, steps_done=state["global_step"], message=message)
    emit(TrainEvent("done" if status == "finished" else ("stopped" if status == "interrupted" else "error"),
                    step=state["global_step"], total_steps=total_steps, message=message,
                    path=str(final_dir) if final_dir else None, elapsed_s=time.time() - started))
    return TrainResult(attempt=name, status=status, steps_done=state["global_step"], total_steps=total_steps,
                       final_dir=final_dir, message=message, losses=losses)


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop

@torch.no_grad()
def make_previews(config: TrainConfig, step: int, unet, text_encoder, base_model: BaseModel, vae, attempt_dir: Path, device) -> tuple[list[Any], Path]:
    """Preview images of the model as it is at `step`, saved as samples/step-N.png. The prompts and seed are
    the same every time, so previews side by side show what training changed. Uses no training randomness
    (resume stays exact), and the text encoder where it currently is (the CPU during the UNet phase)."""
    from diffusers import StableDiffusionPipeline

    from .grid import make_grid
    from .sample import set_scheduler

    prompts = config.resolved_sample_prompts()
    embeds = data.encode_prompts(text_encoder, data.tokenize(base_model.tokenizer, prompts + [""])).to(device, unet.dtype)
    vae_device = vae.device
    vae.to(device)  # on a GPU the VAE waits on the CPU while training; decoding needs it back briefly
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=base_model.tokenizer, unet=unet, scheduler=base_model.pipeline.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    set_scheduler(pipe, "dpm++")
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    try:
        images = [
            pipe(prompt_embeds=embeds[i:i + 1], negative_prompt_embeds=embeds[-1:], num_inference_steps=25, guidance_scale=7.5,
                 height=config.resolution, width=config.resolution, generator=torch.Generator().manual_seed(config.seed)).images[0]
            for i in range(len(prompts))
        ]
    finally:
        unet.train(was_training)
        vae.to(vae_device)
    grid = make_grid([[image] for image in images], prompts, [f"step {step}"])
    path = attempt_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    fileio.save_with(path, lambda tmp: grid.save(tmp, format="PNG"))
    return images, path


def cast(model, device, dtype):
    """`torch.nn.Module.to`: diffusers' own `to` warns about float32-only modules even when a model
    has none (SD's UNet and VAE have none), which users would read as a problem."""
    return torch.nn.Module.to(model, device, dtype)


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
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_gradient_checkpointing(config: TrainConfig, device: torch.device) -> bool:
    """'auto': on when free GPU memory is below what a full fine-tune needs without it (≈18 GB at 512 px)."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing == "on"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    needed_gb = (18 if config.method == "full" else 8) * (config.resolution / 512) ** 2 * config.train_batch_size
    return free / 2**30 < needed_gb * 1.2


def add_lora_adapters(unet, text_encoder, config: TrainConfig) -> None:
    add_lora(unet, config.lora_rank, config.lora_alpha, UNET_LORA_TARGETS)
    if config.text_encoder_steps:
        add_lora(text_encoder, config.lora_rank, config.lora_alpha, TEXT_LORA_TARGETS)


def add_lora(model, rank: int, alpha: int, targets: list[str]) -> None:
    """peft's own injection (what diffusers' loader uses too); works for the UNet and the CLIP text encoder alike."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets), model)


def set_trainable(model, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Full: every weight of `model`; LoRA: only its adapter weights, kept in fp32 over a bf16 base."""
    params = []
    for name, param in model.named_parameters():
        train_it = config.method == "full" or "lora_" in name
        param.requires_grad_(train_it)
        if train_it:
            if config.method == "lora" and param.dtype != torch.float32:
                param.data = param.data.float()
            params.append(param)
    return params


def resolve_optimizer(config: TrainConfig, accelerator) -> str:
    """'auto': bf16 weights with AdamWBF16 on GPUs with bf16 (half the memory, capturable in a CUDA graph);
    else 8-bit AdamW when bitsandbytes is installed; else AdamW. LoRA trains few weights: plain AdamW."""
    cuda = accelerator.device.type == "cuda"
    choice = config.optimizer
    if choice == "auto":
        if not cuda or config.method == "lora":
            return "adamw"
        if accelerator.mixed_precision == "bf16":
            return "adamw-bf16"
        return "adamw8bit" if _have_bitsandbytes() else "adamw"
    if choice == "adamw8bit" and not (cuda and _have_bitsandbytes()):
        raise ConfigError("optimizer='adamw8bit' needs a GPU and bitsandbytes (pip install bitsandbytes); use 'auto' or 'adamw'.")
    if choice == "adamw-bf16" and (config.method == "lora" or accelerator.mixed_precision != "bf16"):
        raise ConfigError("optimizer='adamw-bf16' is for full fine-tuning on a GPU with bf16 (mixed_precision 'auto' or 'bf16'); use 'auto' or 'adamw'.")
    return choice


def _have_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_cuda_graphs(config: TrainConfig, accelerator, optimizer_name: str) -> bool:
    """Graphs need a GPU, one micro-batch per step, no fp16 loss scaling and a capturable optimizer.
    With several GPUs (data parallel) only when asked for ('on'): the gradient all-reduce is then
    captured too, in place of DDP's."""
    possible = (accelerator.device.type == "cuda" and config.gradient_accumulation_steps == 1
                and accelerator.mixed_precision != "fp16" and optimizer_name != "adamw8bit")
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


def make_optimizer(params, lr: float, name: str, device: torch.device, generator=None) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=1e-2)
    if name == "adamw-bf16":
        return AdamWBF16(params, lr=lr, weight_decay=1e-2, generator=generator)
    if device.type == "cuda":  # fused, and capturable with a tensor LR so a CUDA graph can replay it
        return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), weight_decay=1e-2, fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


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


def _free_gpu_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
            writer.writerow(["step", "phase", "loss", "lr", "elapsed_s"])
        writer.writerow([step, phase, f"{loss:.6f}", f"{lr:.3g}", f"{elapsed:.1f}"])


def truncate_log(attempt_dir: Path, step: int) -> None:
    """Drop rows logged after `step` (work lost to an interruption), so a resumed log reads straight."""
    rows = read_log(attempt_dir)
    if rows:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= step)
        fileio.write_text(attempt_dir / "log.csv", out.getvalue())


def read_log(attempt_dir: Path) -> list[dict[str, str]]:
    path = Path(attempt_dir) / "log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step-NNNNNN/ holds the changed weights, optimizer, LR schedule, RNG and step.

def trainable_state(model, config: TrainConfig) -> dict[str, torch.Tensor]:
    if config.method == "lora":
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def save_checkpoint(accelerator, attempt_dir: Path, state: dict, unet, text_encoder, optimizer, lr_scheduler, generator, config: TrainConfig) -> Path:
    from safetensors.torch import save_file

    path = attempt_dir / CHECKPOINTS / f"step-{state['global_step']:06d}"
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return path
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    with fileio.atomic_dir(path) as tmp:
        weights: dict[str, torch.Tensor] = {}
        if state["phase"] == "unet":
            weights.update({f"unet.{k}": v for k, v in trainable_state(unet, config).items()})
        if config.text_encoder_steps and (state["phase"] == "unet" or state["phase_step"] > 0):
            weights.update({f"text_encoder.{k}": v for k, v in trainable_state(text_encoder, config).items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}, tmp / "optimizer.pt")
        save_file({"generator": generator.get_state()}, str(tmp / "rng.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / "state.json").write_text(json.dumps(state))
    prune_checkpoints(attempt_dir / CHECKPOINTS, config.keep_checkpoints)
    return path


def prune_checkpoints(folder: Path, keep: int) -> None:
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(attempt_dir: Path) -> Path | None:
    """The newest complete checkpoint (a folder with state.json; atomic_dir never leaves a partial one)."""
    complete = sorted(p for p in (attempt_dir / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def load_checkpoint_weights(checkpoint: Path, unet, text_encoder, generator, config: TrainConfig) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "weights.safetensors"))
    for prefix, model in (("unet.", unet), ("text_encoder.", text_encoder)):
        part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not part:
            continue
        if config.method == "lora":
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(model, part)
        else:
            model.load_state_dict(part)
    generator.set_state(load_file(str(checkpoint / "rng.safetensors"))["generator"])
    return json.loads((checkpoint / "state.json").read_text())


def load_checkpoint_optimizer(checkpoint: Path, optimizer, lr_scheduler) -> None:
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])


def save_final(accelerator, attempt_dir: Path, unet, text_encoder, config: TrainConfig) -> Path:
    """final/: unet/ (and text_encoder/ when trained) as diffusers folders, or one LoRA file."""
    path = attempt_dir / FINAL
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return path
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    with fileio.atomic_dir(path) as tmp:
        if config.method == "lora":
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers

            from peft import LoraConfig

            def metadata(targets):  # stored in the file so loaders apply alpha/rank, not alpha = rank
                return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets).to_dict()

            te_layers = convert_state_dict_to_diffusers(trainable_state(text_encoder, config)) if config.text_encoder_steps else None
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=convert_state_dict_to_diffusers(trainable_state(unet, config)),
                text_encoder_lora_layers=te_layers, safe_serialization=True,
                unet_lora_adapter_metadata=metadata(UNET_LORA_TARGETS),
                text_encoder_lora_adapter_metadata=metadata(TEXT_LORA_TARGETS) if te_layers else None,
            )
        else:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            if config.text_encoder_steps:
                text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    return path
