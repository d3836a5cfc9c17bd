"""Where the notebook runs: Colab or not, Google Drive for sessions, which GPU.

A Colab runtime forgets everything on disconnect, so sessions belong on Drive there; anywhere
else they go in ./dreamnb-sessions. Nothing here needs widgets, so the CLI can use it too.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .session import default_root

log = logging.getLogger(__name__)

DRIVE_MOUNT_POINT = Path("/content/drive")  # where Colab mounts Drive; session.default_root looks in MyDrive under it


def in_colab() -> bool:
    """True inside a Google Colab runtime (its `google.colab` package is only installed there)."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # a `google` namespace without colab
        return False


def mount_drive() -> Path:
    """Mount Google Drive on Colab (Colab asks for permission) and return the session root it chose.

    Outside Colab nothing is mounted and the root is ./dreamnb-sessions, so the same notebook cell
    works everywhere. Sessions on Drive survive a Colab disconnect; the rest of the runtime does not.
    """
    if not in_colab():
        root = default_root()
        log.info("not in Colab: sessions go to %s", root)
        return root
    if not (DRIVE_MOUNT_POINT / "MyDrive").is_dir():
        from google.colab import drive  # type: ignore[import-not-found]

        try:
            drive.mount(str(DRIVE_MOUNT_POINT))
        except Exception as err:  # refused permission, timeout, Drive quota
            raise UserError(f"Google Drive could not be mounted ({err}); allow access when Colab asks, "
                            "or type a session folder on this runtime (it is lost when the runtime disconnects).") from err
    root = default_root()  # MyDrive/dreamnb now that Drive is mounted
    root.mkdir(parents=True, exist_ok=True)
    return root


def read_secret(colab_name: str, *env_names: str) -> str | None:
    """A token or API key from the environment (the first of `env_names` set) or Colab's secrets (`colab_name`);
    None when there is none. Callers pass it only to the site it is for: it is never logged, printed or saved."""
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    try:
        from google.colab import userdata  # type: ignore[import-not-found]

        return userdata.get(colab_name)
    except Exception:  # not in Colab, no such secret, or access not granted
        return None


def disconnect_runtime() -> None:
    """On Colab, give the runtime back now (an idle GPU runtime keeps using compute units); elsewhere nothing.
    What is on Drive stays; the runtime's own disk is lost, as on any disconnect."""
    if not in_colab():
        return
    try:
        from google.colab import runtime  # type: ignore[import-not-found]

        log.info("disconnecting the Colab runtime")
        runtime.unassign()
    except Exception:  # an older Colab without runtime.unassign: the runtime just stays until it idles out
        log.warning("could not disconnect the Colab runtime", exc_info=True)


@dataclass
class GpuSummary:
    """The accelerator training will use, in words a user can act on."""

    name: str              # "NVIDIA A100-SXM4-40GB", or "no GPU"
    memory_gb: float       # total memory; 0 without a GPU
    free_gb: float         # free now; 0 without a GPU
    count: int = 0         # how many GPUs torch sees
    bf16: bool = False     # bfloat16 support (Ampere and newer): faster, half-memory training

    @property
    def available(self) -> bool:
        return self.count > 0

    def describe(self) -> str:
        if not self.available:
            return "no GPU"
        extra = f" (x{self.count})" if self.count > 1 else ""
        return f"{self.name}{extra}, {self.memory_gb:.1f} GB ({self.free_gb:.1f} GB free)"

    def advice(self) -> str:
        """One sentence on what this GPU means for training; empty when there is nothing to say."""
        if not self.available:
            where = "in Colab choose Runtime → Change runtime type → T4 GPU" if in_colab() else "use a machine with an NVIDIA GPU"
            return f"There is no GPU, so only tiny test models train in reasonable time; {where}."
        if self.memory_gb < 10:
            return f"{self.memory_gb:.0f} GB of GPU memory is tight for a full fine-tune; choose the 'lora' method."
        if not self.bf16:
            return "This GPU has no bfloat16 math, so training computes in fp16 and keeps the weights in bf16 (half the memory) to fit."
        return ""


def gpu_summary() -> GpuSummary:
    """Name and memory of the first CUDA GPU, or 'no GPU'."""
    import torch

    if not torch.cuda.is_available():
        return GpuSummary(name="no GPU", memory_gb=0.0, free_gb=0.0)
    free, total = torch.cuda.mem_get_info(0)
    return GpuSummary(
        name=torch.cuda.get_device_name(0),
        memory_gb=total / 2**30,
        free_gb=free / 2**30,
        count=torch.cuda.device_count(),
        bf16=gpu_has_bf16(),
    )


def gpu_has_bf16() -> bool:
    """Whether the GPU computes in bfloat16 (Ampere and newer). torch's own check also says yes where bf16 is only
    emulated (a T4), which would make training there many times slower."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3
        return torch.cuda.is_bf16_supported()


def gpu_memory_budget(device) -> int:
    """Bytes of GPU memory this process may still use: what is free, within any per-process cap
    (`torch.cuda.set_per_process_memory_fraction`, as the T4 stand-in sets)."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)
    return int(min(free, fraction * total - torch.cuda.memory_reserved(index)))
