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
