"""The user's own path on the GPU, entered where users enter: the README's shell commands as written (the console
script's `main` in a fresh process), with the presets as shipped (prior preservation on, class images made on the GPU),
on the tiny model and on the full SD-1.5 architecture with random weights (`-m full`). Figures go to the report."""
from __future__ import annotations

import csv
import io
import json
import time

import pytest
import torch
from PIL import Image

from .gpu_util import (ADAM_LARGEST_STEP, assert_images_tell_seeds_and_weights_apart, assert_logged_lr_follows_the_schedule,
                       assert_trained_as_configured, dreamnb, graphed_sampling_matches_eager, record)

TOKEN = "squidarth"


def readme_flow(model, photos, work, *train_args, export_format="safetensors", prepare_args=()):
    """check-token → prepare → train → compare base attempt-1 → export, as the README writes them."""
    session = work / "sessions" / "me"
    dreamnb("check-token", TOKEN, cwd=work)
    dreamnb("prepare", photos, "--session", session, *prepare_args, cwd=work)
    trained, train_s = dreamnb("train", "--session", session, "--model", model, "--token", TOKEN, "--class-word", "person",
                               *train_args, cwd=work)
    _, compare_s = dreamnb("compare", "--session", session, "--attempts", "base", "attempt-1", "--out", work / "grid.png", cwd=work)
    out = work / ("me.safetensors" if export_format == "safetensors" else "me-lora.safetensors")
    _, export_s = dreamnb("export", "--session", session, "--format", export_format, "--out", out, cwd=work)
    state = json.loads((session / "session.json").read_text())
    assert [(a["name"], a["status"]) for a in state["attempts"]] == [("attempt-1", "finished")]
    with Image.open(work / "grid.png") as grid:
        assert grid.width > 4 * 64 and grid.height > 5 * 64  # 5 probe prompts × (base, attempt-1) × 2 seeds
    return session, out, trained.stderr, dict(train_s=round(train_s, 1), compare_s=round(compare_s, 1), export_s=round(export_s, 1))


def sample_with_diffusers(model_folder, exported, kind, xl=False, flux=False):
    """What a user does with the export: diffusers loads it (single file, or the LoRA onto the base) and samples."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class, extra = ((FluxPipeline, {}) if flux else (StableDiffusionXLPipeline, {}) if xl
                             else (StableDiffusionPipeline, dict(safety_checker=None)))
    dtype = torch.bfloat16 if flux else torch.float16  # as FLUX.1's model card loads it
    if kind == "safetensors":
        pipe = pipeline_class.from_single_file(str(exported), config=str(model_folder), local_files_only=True,
                                               torch_dtype=dtype, **extra)
    else:
        pipe = pipeline_class.from_pretrained(model_folder, torch_dtype=dtype, **extra)
        pipe.load_lora_weights(str(exported))
    base = pipeline_class.from_pretrained(model_folder, torch_dtype=dtype, **extra).to("cuda")
    pipe.to("cuda")

    def image(p, seed):
        return p(f"photo of {TOKEN} person", num_inference_steps=5, generator=torch.Generator("cuda").manual_seed(seed),
                 output_type="np").images[0]

    assert_images_tell_seeds_and_weights_apart(image(pipe, 0), image(pipe, 0), image(pipe, 1), image(base, 0))


@pytest.mark.parametrize("preset, lora", [("face", False), ("face", True), ("style", False)])
def test_the_readme_flow_on_the_tiny_model(tiny_sd1, photos_512, tmp_path, preset, lora):
    train_args = ["--preset", preset] + (["--lora"] if lora else [])
    fmt = "lora" if lora else "safetensors"
    session, exported, log, seconds = readme_flow(tiny_sd1.folder, photos_512, tmp_path, *train_args, export_format=fmt)
    if preset == "face":  # prior preservation on: class images made by the base model on the GPU
        assert "class images" in log and "on cuda" in log, log
        (folder,) = (session / "class").iterdir()
        assert len(list(folder.glob("*.png"))) == 100
    assert "Optimizer" in log and ("bf16 mixed precision" in log), log
    sample_with_diffusers(tiny_sd1.folder, exported, fmt)
    record(f"readme flow, tiny model, --preset {preset}{' --lora' if lora else ''}", **seconds)


def test_the_readme_flow_with_sdxl_on_the_tiny_model(tiny_sdxl, photos_512, tmp_path):
    """SDXL through the same commands: the face preset's SDXL values (LoRA, 1024 px, the UNet only), class images made
    by the SDXL pipeline on the GPU (its VAE in fp32 beside an fp16 UNet), compare, and the kohya-format LoRA, which
    diffusers' SDXL pipeline loads and samples with."""
    session, exported, log, seconds = readme_flow(tiny_sdxl.folder, photos_512, tmp_path, "--preset", "face",
                                                  export_format="lora", prepare_args=("--size", "1024"))
    assert "class images" in log and "on cuda" in log and "bf16 mixed precision" in log, log
    config = json.loads((session / "attempts" / "attempt-1" / "config.json").read_text())
    assert (config["method"], config["resolution"], config["text_encoder_steps"]) == ("lora", 1024, 0)
    sample_with_diffusers(tiny_sdxl.folder, exported, "lora", xl=True)
    optimizer_line = next(line for line in log.splitlines() if "Optimizer" in line)
    record("readme flow, tiny SDXL, --preset face (LoRA, 1024 px)", **seconds, trainer=optimizer_line.strip())


def test_the_readme_flow_with_flux_on_the_tiny_model(tiny_flux, photos_512, tmp_path):
    """FLUX.1 through the same commands: the face preset's FLUX.1 values (a LoRA of the transformer, 512 px, no
    text-encoder phase), class images made by FluxPipeline on the GPU, bf16 training that moves the LoRA as far as
    its steps should, compare, and the kohya-layout LoRA, which diffusers' FluxPipeline loads and samples with."""
    from safetensors.torch import load_file

    session, exported, log, seconds = readme_flow(tiny_flux.folder, photos_512, tmp_path, "--preset", "face",
                                                  export_format="lora")
    assert "class images" in log and "on cuda" in log and "bf16" in log, log
    config = json.loads((session / "attempts" / "attempt-1" / "config.json").read_text())
    assert (config["method"], config["resolution"], config["text_encoder_steps"], config["with_prior_preservation"]) == (
        "lora", 512, 0, True)
    (folder,) = (session / "class").iterdir()
    assert len(list(folder.glob("*.png"))) == config["num_class_images"]
    lora = {k: v.float() for k, v in load_file(str(session / "attempts/attempt-1/final/pytorch_lora_weights.safetensors")).items()}
    ups = [v for k, v in lora.items() if k.endswith("lora_B.weight")]
    assert ups and all(torch.isfinite(v).all() for v in lora.values())
    # LoRA's B starts at zero: its mean size after N steps at lr is more than a quarter of a random walk's and less
    # than Adam's largest steps (a run that trained no step, or one in ten, fails the first)
    moved = torch.cat([v.abs().flatten() for v in ups]).mean().item() / config["unet_lr"]
    steps = config["unet_steps"]
    assert 0.25 * steps ** 0.5 < moved < ADAM_LARGEST_STEP * steps, (moved, steps)
    sample_with_diffusers(tiny_flux.folder, exported, "lora", flux=True)
    record("readme flow, tiny FLUX.1, --preset face (LoRA, 512 px)", **seconds, lora_up_moved_in_lr=round(moved, 1))


def test_the_notebook_headless_with_flux_on_the_tiny_model(tiny_flux, photos_512, tmp_path):
    """Every section of the notebook with `auto_run` on the GPU for FLUX.1: the face preset (prior preservation, class
    images on the GPU) with fewer steps and previews; the LoRA it exports loads in diffusers' FluxPipeline and samples."""
    from nbclient import NotebookClient
    from test_notebook import code_cells, inject_parameters, read_notebook

    root = tmp_path / "sessions"
    nb = read_notebook()
    inject_parameters(nb, dict(base_model=str(tiny_flux.folder), session_root=str(root), session_name="nb", token=TOKEN,
                               instance_images=str(photos_512), preset="face", unet_steps=200, sample_every=100,
                               export_format="lora", auto_run=True))
    started = time.time()
    NotebookClient(nb, timeout=580, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.time() - started
    errors = [o for cell in code_cells(nb) for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    state = json.loads((root / "nb" / "session.json").read_text())
    assert [(a["name"], a["status"], a["steps_done"]) for a in state["attempts"]] == [("attempt-1", "finished", 200)]
    assert len(list((root / "nb" / "attempts" / "attempt-1" / "samples").glob("*.png"))) >= 2  # the previews
    (exported,) = (root / "nb" / "exports").glob("*.safetensors")
    sample_with_diffusers(tiny_flux.folder, exported, "lora", flux=True)
    record("notebook headless (auto_run), tiny FLUX.1, face preset 200 steps", notebook_s=round(seconds, 1))


def test_sdxl_with_an_fp16_vae_through_the_cli(tiny_sdxl, photos_512, tmp_path):
    """The README's `--vae madebyollin/sdxl-vae-fp16-fix` line on the GPU (a tiny stand-in that says force_upcast=False):
    that VAE runs in fp16 beside the fp16 UNet, for the class images, the photos' latents, compare and sample, and
    what it paints are pictures (an fp16 overflow paints NaN, which PIL shows as black)."""
    import numpy as np

    from dreamnb.session import open_session
    from conftest import other_vae

    vae = other_vae(tiny_sdxl.folder, tmp_path / "fp16-fix", force_upcast=False)
    session = tmp_path / "sessions" / "xl"
    dreamnb("prepare", photos_512, "--session", session, "--size", "1024", cwd=tmp_path)
    trained, train_s = dreamnb("-v", "train", "--session", session, "--model", tiny_sdxl.folder, "--vae", vae, "--token", TOKEN,
                               "--class-word", "person", "--preset", "face", "--unet-steps", "30", "--set", "num_class_images=4",
                               cwd=tmp_path)
    assert f"VAE {vae}) on cuda" in trained.stderr and "(VAE in torch.float16)" in trained.stderr, trained.stderr[-3000:]
    assert open_session(session).attempts[0].vae == str(vae)
    dreamnb("compare", "--session", session, "--attempts", "base", "attempt-1", "--out", tmp_path / "grid.png", cwd=tmp_path)
    sampled, _ = dreamnb("-v", "sample", "--session", session, "--prompt", f"photo of {TOKEN} person", "--seed", "1", "--steps", "5",
                         "--out", tmp_path / "s.png", cwd=tmp_path)
    assert "(VAE in torch.float16)" in sampled.stderr
    pictures = [np.asarray(Image.open(path).convert("RGB"), np.float32) for path in
                [tmp_path / "s.png", *sorted(session.glob("class/**/*.png"))]]
    assert len(pictures) == 5 and all(p.std() > 1 and p.mean() > 1 for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 5  # five seeds, five pictures (not one the VAE paints whatever it gets)
    record("tiny SDXL with an fp16 VAE (--vae) through the CLI", train_s=round(train_s, 1))


def test_after_a_bf16_run_the_base_model_samples_the_same_images(photo_session, gpu_base):
    """The base waits on the CPU during the run and comes back; its sampling graphs, recorded before on memory it
    left, are recorded again."""
    from dreamnb.sample import SampleSettings, generate
    from dreamnb.train import train
    from test_train import quick_config

    settings = [SampleSettings(prompt="photo of a thing", seed=s, num_inference_steps=5) for s in (1, 2)]
    before = [s.image for s in generate(gpu_base.pipeline, settings, progress=False)]
    dtypes = {part: getattr(gpu_base, part).dtype for part in ("unet", "vae", "text_encoder")}
    result = train(photo_session, quick_config(text_encoder_steps=4, unet_steps=8, with_prior_preservation=True, num_class_images=2),
                   gpu_base, progress=False)
    assert result.status == "finished"
    assert {part: getattr(gpu_base, part).dtype for part in dtypes} == dtypes == {p: torch.float16 for p in dtypes}
    assert {getattr(gpu_base, part).device.type for part in dtypes} == {"cuda"}
    after = [s.image for s in generate(gpu_base.pipeline, settings, progress=False)]
    assert all(list(a.getdata()) == list(b.getdata()) for a, b in zip(before, after))


@pytest.fixture(scope="module")
def face_run_full(full_model, photos_512, tmp_path_factory):
    """The headline: the face preset's default run (100 class images, 350 + 1500 steps) through the CLI, on the full
    architecture, and what it leaves (the session, the export, the trainer's messages, timings)."""
    work = tmp_path_factory.mktemp("face-full")
    return readme_flow(full_model, photos_512, work, "--preset", "face")


@pytest.mark.full
def test_the_face_preset_as_shipped_on_the_full_architecture(full_model, face_run_full):
    session, exported, log, seconds = face_run_full
    assert "on cuda" in log and "adamw-bf16" in log and "CUDA graphs on" in log, log
    sample_with_diffusers(full_model, exported, "safetensors")
    attempt = session / "attempts" / "attempt-1"
    config = json.loads((attempt / "config.json").read_text())
    assert (config["preset"], config["with_prior_preservation"], config["text_encoder_steps"], config["unet_steps"]) == ("face", True, 350, 1500)
    assert "class images" in log and len(list(next((session / "class").iterdir()).glob("*.png"))) == config["num_class_images"] == 100
    rows = list(csv.DictReader(io.StringIO((attempt / "log.csv").read_text())))
    assert_logged_lr_follows_the_schedule(rows, config)
    moved = assert_trained_as_configured(attempt / "final", full_model, config, loaded_as=torch.float16)
    record("face preset as shipped, full SD-1.5 architecture, CLI", **seconds, final_loss=float(rows[-1]["loss"]),
           mean_change_in_lr=moved, gpu=torch.cuda.get_device_name())


T4_PRELUDE = """
import atexit, json, torch
torch.cuda.set_per_process_memory_fraction(15 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
atexit.register(lambda: print("PEAK " + json.dumps([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30])))
"""


@pytest.mark.full
def test_the_t4_stand_in_fits_the_face_preset(full_model, photos_512, tmp_path):
    """Colab's T4 stood in for: fp16 math, a 15 GB cap, no bitsandbytes; the face preset's defaults (100 class images
    made under the cap) except the step counts (memory does not grow with steps; the time per step is what the report
    projects from). The base model waits on the CPU while training and samples on the GPU again after it (compare)."""
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here; the T4 plan is the one without it")
    except ImportError:
        pass
    session = tmp_path / "sessions" / "me"
    dreamnb("prepare", photos_512, "--session", session, cwd=tmp_path)
    done, seconds = dreamnb("train", "--session", session, "--model", full_model, "--token", TOKEN, "--class-word", "person",
                            "--preset", "face", "--te-steps", "40", "--unet-steps", "120",
                            "--set", "mixed_precision=fp16", "--set", "log_every=20", cwd=tmp_path, prelude=T4_PRELUDE)
    log = done.stderr
    assert "fp16 mixed precision" in log and "adamw-bf16" in log and "waits on the CPU" in log, log
    assert len(list(next((session / "class").iterdir()).glob("*.png"))) == 100
    allocated, reserved = json.loads(done.stdout.split("PEAK ")[-1])
    assert reserved < 15
    rows = [r.split(",") for r in (session / "attempts" / "attempt-1" / "log.csv").read_text().splitlines()[1:]]
    unet_rows = [r for r in rows if r[1] == "unet"]
    s_per_step = (float(unet_rows[-1][4]) - float(unet_rows[0][4])) / (int(unet_rows[-1][0]) - int(unet_rows[0][0]))
    assert rows[-1][0] == "160"
    record("T4 stand-in (fp16, 15 GB cap, no bitsandbytes), face preset with its 100 class images, full architecture",
           train_s=round(seconds, 1), peak_allocated_gb=round(allocated, 2), peak_reserved_gb=round(reserved, 2),
           unet_s_per_step_h200=round(s_per_step, 4))


@pytest.mark.full
def test_sampling_through_the_users_functions_is_on_the_gpu(full_model):
    """load_base_model places the model; generate samples where it is (the benchmark's (f) now uses the same calls)."""
    from dreamnb.models import load_base_model
    from dreamnb.sample import SampleSettings, generate

    base = load_base_model(full_model)
    assert base.placement.device.type == "cuda" and base.placement.dtype == torch.float16
    graphed_sampling_matches_eager(base.pipeline)  # the full architecture's graphed images are the eager ones
    settings = [SampleSettings(prompt="a photo of a person", seed=1)]
    for _ in range(2):  # warm: graphs recorded
        generate(base.pipeline, settings, progress=False)
    torch.cuda.synchronize()
    started = time.time()
    for _ in range(3):
        generate(base.pipeline, settings, progress=False)
    torch.cuda.synchronize()
    record("sampling 1 image, 25 steps, 512 px, through load_base_model + generate", seconds=round((time.time() - started) / 3, 3))


@pytest.mark.full
@pytest.mark.parametrize("preset, lora", [("face", True), ("style", False)])
def test_the_readme_flow_on_the_full_architecture(full_model, photos_512, tmp_path, preset, lora):
    """`--lora` and `--preset style` as shipped (the face preset's full run is the headline above)."""
    train_args = ["--preset", preset] + (["--lora"] if lora else [])
    fmt = "lora" if lora else "safetensors"
    session, exported, log, seconds = readme_flow(full_model, photos_512, tmp_path, *train_args, export_format=fmt)
    assert "CUDA graphs on" in log and ("on cuda" in log) == (preset == "face"), log  # class images: face only
    sample_with_diffusers(full_model, exported, fmt)
    record(f"readme flow, full SD-1.5 architecture, --preset {preset}{' --lora' if lora else ''}", **seconds)


@pytest.mark.full
def test_the_notebook_headless_on_the_full_architecture(full_model, photos_512, tmp_path):
    """Every section of the notebook with `auto_run`, on the GPU, the face preset (prior preservation, class images
    on the GPU) with fewer steps; the export it writes loads in diffusers and samples."""
    from nbclient import NotebookClient
    from test_notebook import code_cells, inject_parameters, read_notebook

    root = tmp_path / "sessions"
    nb = read_notebook()
    inject_parameters(nb, dict(base_model=str(full_model), session_root=str(root), session_name="nb", token=TOKEN,
                               instance_images=str(photos_512), preset="face", unet_steps=300, text_encoder_steps=50,
                               sample_every=100, auto_run=True))
    started = time.time()
    NotebookClient(nb, timeout=580, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.time() - started
    errors = [o for cell in code_cells(nb) for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    state = json.loads((root / "nb" / "session.json").read_text())
    assert [(a["name"], a["status"], a["steps_done"]) for a in state["attempts"]] == [("attempt-1", "finished", 350)]
    assert len(list((root / "nb" / "class").glob("*/*.png"))) == 100
    (exported,) = (root / "nb" / "exports").glob("*.safetensors")
    sample_with_diffusers(full_model, exported, "safetensors")
    record("notebook headless (auto_run), full SD-1.5 architecture, face preset 50 + 300 steps", notebook_s=round(seconds, 1))


def test_continuing_a_checkpoint_through_the_cli(tiny_sd1, photos_512, tmp_path):
    """The loop users work in, on the GPU (bf16 weights, CUDA graphs): train, continue from a checkpoint as a new
    attempt, compare the checkpoint with both, export the checkpoint. The child starts where the checkpoint is: after
    10 more steps it is nearer to it than the parent's 30 further steps took the parent, and at least half as far as the
    parent's own next 10 steps went (its fresh AdamW steps are no smaller than the parent's warm ones): a child that
    trained no step, or started elsewhere, fails."""
    from safetensors.torch import load_file

    session = tmp_path / "sessions" / "me"
    dreamnb("prepare", photos_512, "--session", session, cwd=tmp_path)
    common = ["--session", session, "--model", tiny_sd1.folder]
    dreamnb("train", *common, "--token", TOKEN, "--class-word", "person", "--te-steps", "10", "--unet-steps", "50",
            "--checkpoint-every", "10", "--set", "keep_checkpoints=3", cwd=tmp_path)  # kept: 30, 40, 50
    done, seconds = dreamnb("train", *common, "--from", "attempt-1@30", "--unet-steps", "10", cwd=tmp_path)
    assert "Continuing from attempt-1@30" in done.stderr and "CUDA graphs on" in done.stderr, done.stderr
    state = json.loads((session / "session.json").read_text())
    assert [(a["name"], a["parent"], a["steps_done"]) for a in state["attempts"]] == [("attempt-1", None, 60), ("attempt-2", "attempt-1@30", 10)]
    dreamnb("compare", "--session", session, "--attempts", "attempt-1@30", "attempt-1", "attempt-2", "--out", tmp_path / "grid.png", cwd=tmp_path)
    dreamnb("export", "--session", session, "--attempt", "attempt-1@30", "--format", "safetensors", cwd=tmp_path)
    assert (session / "exports" / "me-attempt-1-step30.safetensors").is_file()

    def checkpoint(step):
        return {k[len("unet."):]: v.float() for k, v in load_file(str(session / f"attempts/attempt-1/checkpoints/step-{step:06d}/weights.safetensors")).items()}
    at_30 = checkpoint(30)
    def unet(attempt):
        return {k: v.float() for k, v in load_file(str(session / f"attempts/{attempt}/final/unet/diffusion_pytorch_model.safetensors")).items()}
    def distance(a, b):
        return float(sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt())
    child, parent, parent_10 = distance(unet("attempt-2"), at_30), distance(unet("attempt-1"), at_30), distance(checkpoint(40), at_30)
    assert 0.5 * parent_10 < child < 0.8 * parent, (child, parent_10, parent)
    record("continue attempt-1@30 for 10 steps through the CLI, tiny model", train_s=round(seconds, 1), child_distance=child,
           parent_distance=parent, parent_10_steps_distance=parent_10)


def test_the_demo_on_the_gpu(tmp_path):
    """The README's first command, `python -m dreamnb demo`, on a GPU machine: it trains there, the photos' denoising
    error falls and the grid is written."""
    out = tmp_path / "demo"
    done, seconds = dreamnb("demo", "--out", out, cwd=tmp_path)
    assert "on cuda" in done.stderr
    result = json.loads((out / "demo-result.json").read_text())
    assert result["error_after"] < 0.85 * result["error_before"]
    with Image.open(out / "demo-grid.png") as grid:
        assert grid.width > 4 * 128 and grid.height > 3 * 128
    record("the demo through the CLI", seconds=round(seconds, 1), error_before=round(result["error_before"], 4),
           error_after=round(result["error_after"], 4))
