"""Helpers of the GPU acceptance suite: the user's CLI as a subprocess, weight comparisons, and a report of figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPORT = Path(os.environ.get("DREAMNB_GPU_REPORT", Path(__file__).with_name("report.jsonl")))


def record(name: str, **figures) -> None:
    """One line of the suite's summary (timings, peak memory), appended to DREAMNB_GPU_REPORT and printed."""
    line = json.dumps({"test": name, **figures}, default=str)
    print(line)
    with open(REPORT, "a") as f:
        f.write(line + "\n")


def dreamnb(*args, cwd: Path, prelude: str = "", timeout: int = 580) -> tuple[subprocess.CompletedProcess, float]:
    """`dreamnb ARGS` as a user runs it (the console script's own `main`), in a fresh process; exit status 0 asserted.
    `prelude` is Python run first in that process (the T4 stand-in's memory cap)."""
    code = f"{prelude}\nimport sys\nfrom dreamnb.cli import main\nsys.exit(main({[str(a) for a in args]!r}))"
    started = time.time()
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    seconds = time.time() - started
    assert done.returncode == 0, f"dreamnb {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done, seconds


def final_weights(session_dir: Path, attempt: str) -> dict[str, torch.Tensor]:
    """Every trained tensor of an attempt's final/ folder (UNet, text encoder or LoRA file), as fp32."""
    final = Path(session_dir) / "attempts" / attempt / "final"
    weights = {}
    for file in sorted(final.rglob("*.safetensors")):
        weights.update({f"{file.parent.name}/{k}": v.float() for k, v in load_file(str(file)).items()})
    return weights


def relative_difference(a: dict, b: dict, start: dict) -> float:
    """‖a − b‖ / ‖b − start‖ over all tensors: how far two runs ended apart, as a share of what training changed.
    A run that skipped k of N equal steps scores about k/N; one with a learning rate off by 2× about 0.5 or more."""
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    moved = sum(((b[k] - start[k]) ** 2).sum() for k in b).sqrt()
    assert moved > 0, "training changed nothing"
    return float(apart / moved)


def start_weights(base, parts=("unet", "text_encoder")) -> dict[str, torch.Tensor]:
    """The base model's weights under the keys `final_weights` gives a full fine-tune's."""
    return {f"{part}/{k}": v.float().cpu() for part in parts for k, v in getattr(base, part).state_dict().items()}


def folder_weights(model_folder: Path, parts=("unet", "text_encoder")) -> dict[str, torch.Tensor]:
    """A diffusers folder's weights of `parts`, raw (in the dtype saved), under the keys `final_weights` gives."""
    weights = {}
    for part in parts:
        for file in sorted((Path(model_folder) / part).glob("*.safetensors")):
            weights.update({f"{part}/{k}": v for k, v in load_file(str(file)).items()})
    return weights


ADAM_LARGEST_STEP = 0.1 / 0.001 ** 0.5  # the most one AdamW step moves a weight, in lr: (1 - β1) / √(1 - β2)


def assert_trained_as_configured(final_dir: Path, base_folder: Path, config: dict, loaded_as: torch.dtype | None = None) -> dict[str, float]:
    """Each phase's part moved from the base as the trainer starts it (rounded to `loaded_as`, the base's dtype where
    the user's model lives: fp16 on a GPU, then to the saved weights' dtype) by more than a quarter of a random walk of
    its steps at lr on average (noisy gradients make Adam's steps add up no slower than that; a run that skipped its
    steps, or most of them, fails) and by less than Adam's largest step times the phase's steps. Returns the mean
    change per part, in units of its learning rate."""
    final = folder_weights(final_dir)
    base = folder_weights(base_folder)
    moved = {}
    for part, steps, lr in (("unet", config["unet_steps"], config["unet_lr"]),
                            ("text_encoder", config["text_encoder_steps"], config["text_encoder_lr"])):
        # the token embedding table: only the prompts' few rows get a gradient; the rest would swamp the mean
        keys = [k for k in final if k.startswith(part + "/") and "token_embedding" not in k]
        assert keys and steps > 0, (part, steps)
        start = {k: base[k].to(loaded_as or base[k].dtype).to(final[k].dtype).float() for k in keys}
        change = torch.cat([(final[k].float() - start[k]).abs().flatten() for k in keys])
        moved[part] = change.mean().item() / lr
        assert 0.25 * steps ** 0.5 < moved[part] < ADAM_LARGEST_STEP * steps, (part, moved[part], steps)
    return moved


def assert_logged_lr_follows_the_schedule(rows: list[dict], config: dict) -> None:
    """log.csv's rates are the phases' own under a constant schedule (the presets' as shipped); each phase logged."""
    assert (config["lr_scheduler"], config["lr_warmup_steps"]) == ("constant", 0), config
    for phase, lr in (("text_encoder", config["text_encoder_lr"]), ("unet", config["unet_lr"])):
        logged = [float(r["lr"]) for r in rows if r["phase"] == phase]
        assert logged and all(abs(x - lr) <= 1e-6 * lr for x in logged), (phase, lr, logged[:5])
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] == config["text_encoder_steps"] + config["unet_steps"]
    assert max(int(r["step"]) for r in rows if r["phase"] == "text_encoder") <= config["text_encoder_steps"] < min(
        int(r["step"]) for r in rows if r["phase"] == "unet")


def assert_images_tell_seeds_and_weights_apart(image, again, other_seed, base) -> None:
    """Sampling images (arrays in [0, 1]): the same seed gives the same image, another seed another one, and the trained
    weights another image than the base's for the same seed (by far more than a repeat differs)."""
    import numpy as np

    image, again, other_seed, base = (np.asarray(x, np.float32) for x in (image, again, other_seed, base))
    assert image.shape[-1] == 3 and np.isfinite(image).all()
    repeat = np.abs(image - again).mean()
    assert repeat < 1e-3, repeat
    assert np.abs(image - other_seed).mean() > 0.01, "another seed gave the same image"
    assert np.abs(image - base).mean() > max(10 * repeat, 1e-4), "the trained weights paint what the base does"


def graphed_sampling_matches_eager(pipe) -> None:
    """The CUDA-graph sampling path paints what the eager one does (within a pixel level on average, 0-255), replays
    paint the same image bit for bit, and the three seeds paint three different images (by far more than that)."""
    from dreamnb.fast import FastUNetForward
    from dreamnb.sample import SampleSettings, generate

    settings = [SampleSettings(prompt="photo of zwx thing", seed=s, num_inference_steps=5) for s in (1, 2, 3)]
    eager = generate(pipe, settings, progress=False, cuda_graphs=False)
    graphed = generate(pipe, settings, progress=False, cuda_graphs=True)
    again = generate(pipe, settings, progress=False, cuda_graphs=True)  # replays, no new capture
    assert isinstance(pipe.unet.forward, FastUNetForward) and len(pipe.unet.forward.graphs) == 1
    pixels = [[torch.tensor(list(x.image.getdata()), dtype=torch.float32) for x in run] for run in (eager, graphed, again)]
    for a, b, c in zip(*pixels):
        assert (a - b).abs().mean() < 1.0 and torch.equal(b, c)
    eager_pixels = pixels[0]
    assert min((eager_pixels[i] - eager_pixels[j]).abs().mean() for i, j in ((0, 1), (0, 2), (1, 2))) > 5.0
