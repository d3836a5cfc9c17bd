"""The trainer on tiny models: it learns, phases do what they say, runs resume exactly, nothing is lost."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors.torch import load_file

from dreamnb import train as train_module
from dreamnb.attempts import attempt_pipeline, denoising_error
from dreamnb.config import ConfigError, TrainConfig
from dreamnb.data import cached_latents
from dreamnb.session import open_session
from dreamnb.train import latest_checkpoint, train


def quick_config(**changes) -> TrainConfig:
    base = TrainConfig.from_preset(
        "object", token="zwx", class_word="thing", resolution=64, seed=0, with_prior_preservation=False,
        unet_steps=40, unet_lr=1e-3, text_encoder_steps=0, text_encoder_lr=1e-4, checkpoint_every=0, log_every=5,
    )
    return dataclasses.replace(base, **changes)


def instance_latents(session, base):
    mean, _ = cached_latents(base.vae, sorted(session.instance_dir.glob("*.png")), 64, session.cache_dir, "eval")
    return mean * base.vae.config.scaling_factor


def test_training_learns_the_photos(photo_session, base_sd1):
    result = train(photo_session, quick_config(), base_sd1, progress=False)
    assert result.status == "finished" and result.steps_done == 40
    latents = instance_latents(photo_session, base_sd1)
    before = denoising_error(base_sd1.pipeline, latents, "photo of zwx thing")
    after = denoising_error(attempt_pipeline(base_sd1, photo_session, result.attempt), latents, "photo of zwx thing")
    assert after < 0.7 * before, (before, after)
    assert result.losses[-1][1] < result.losses[0][1]
    rows = (photo_session.attempt_dir(result.attempt) / "log.csv").read_text().splitlines()
    assert rows[0] == "step,phase,loss,lr,elapsed_s" and len(rows) == 1 + 40 // 5
    assert open_session(photo_session.path).attempt(result.attempt).status == "finished"


def test_base_model_in_memory_is_left_untouched(photo_session, base_sd1):
    before = {k: v.clone() for k, v in base_sd1.unet.state_dict().items()}
    train(photo_session, quick_config(unet_steps=3), base_sd1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in base_sd1.unet.state_dict().items())


def test_text_encoder_phase_changes_only_the_text_encoder_for_its_steps(photo_session, base_sd1):
    config = quick_config(text_encoder_steps=5, unet_steps=3, checkpoint_every=5, keep_checkpoints=5)
    result = train(photo_session, config, base_sd1, progress=False)
    folder = photo_session.attempt_dir(result.attempt)
    after_te_phase = load_file(str(folder / "checkpoints" / "step-000005" / "weights.safetensors"))
    assert after_te_phase and all(k.startswith("text_encoder.") for k in after_te_phase)
    base_te = base_sd1.text_encoder.state_dict()
    assert any(not torch.equal(v, base_te[k[len("text_encoder."):]]) for k, v in after_te_phase.items())
    saved = torch.load(folder / "checkpoints" / "step-000005" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {5}
    # the UNet phase that follows leaves the text encoder as the text-encoder phase left it
    from transformers import CLIPTextModel

    final_te = CLIPTextModel.from_pretrained(folder / "final" / "text_encoder").state_dict()
    assert all(torch.equal(final_te[k[len("text_encoder."):]], v) for k, v in after_te_phase.items())


def thing_photo(index: int):
    """The class: a blue disc on green at varying places and sizes (the subject is a yellow square on red)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (40, 150, 60))
    r, cx, cy = 10 + index % 4 * 2, 20 + (index * 7) % 24, 20 + (index * 11) % 24
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(40, 60, 200))
    return img


def test_prior_preservation_keeps_what_the_class_word_means(tmp_path, base_sd1, photo_session):
    """A random tiny model knows no class, so first teach it one ("photo of a thing" = blue discs); then
    train the subject hard with and without prior preservation and measure, on held-out discs, how well
    each model still denoises the class under the class prompt."""
    from dreamnb.models import load_base_model
    from dreamnb.session import create_session

    pre = create_session(tmp_path / "pretrain")
    for i in range(12):
        thing_photo(i).save(pre.instance_dir / f"thing-{i}.png")
    taught = train(pre, quick_config(token="thing", class_word="", instance_prompt="photo of a thing", unet_steps=150), base_sd1, progress=False)
    attempt_pipeline(base_sd1, pre, taught.attempt).save_pretrained(tmp_path / "thing-model")
    base = load_base_model(tmp_path / "thing-model")

    held_out = tmp_path / "held-out"
    held_out.mkdir()
    for i in range(12, 20):
        thing_photo(i).save(held_out / f"thing-{i}.png")
    mean, _ = cached_latents(base.vae, sorted(held_out.glob("*.png")), 64, tmp_path, "eval")
    class_latents = mean * base.vae.config.scaling_factor

    config = quick_config(class_word="thing", num_class_images=8, unet_steps=150, unet_lr=3e-3)
    train(photo_session, config, base, progress=False, attempt="plain")
    train(photo_session, dataclasses.replace(config, with_prior_preservation=True), base, progress=False, attempt="prior")

    def class_error(pipe):
        return denoising_error(pipe, class_latents, "photo of a thing")

    base_error = class_error(base.pipeline)
    plain_error = class_error(attempt_pipeline(base, photo_session, "plain"))
    prior_error = class_error(attempt_pipeline(base, photo_session, "prior"))
    assert plain_error > 1.1 * base_error, (base_error, plain_error)  # training the subject alone erodes the class
    assert prior_error < base_error, (base_error, prior_error)        # prior preservation keeps it


def _weights(session, name):
    folder = session.attempt_dir(name) / "final"
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    te = load_file(str(folder / "text_encoder" / "model.safetensors"))
    return unet, te


@pytest.mark.parametrize("stop_at", [2, 6])  # inside the text-encoder phase, and inside the UNet phase
def test_stop_and_resume_gives_the_same_weights_as_a_straight_run(photo_session, base_sd1, stop_at):
    config = quick_config(text_encoder_steps=4, unet_steps=6, log_every=1, lr_warmup_steps=2, lr_scheduler="linear")
    train(photo_session, config, base_sd1, progress=False, attempt="straight")

    stop = threading.Event()
    first = train(photo_session, config, base_sd1, progress=False, attempt="resumed", stop=stop,
                  callback=lambda e: stop.set() if e.kind == "step" and e.step == stop_at else None)
    assert first.status == "interrupted" and first.steps_done == stop_at and "Resume" in first.message
    assert open_session(photo_session.path).attempt("resumed").status == "interrupted"
    second = train(photo_session, TrainConfig(), base_sd1, progress=False, attempt="resumed", resume=True)
    assert second.status == "finished" and second.steps_done == 10

    for a, b in zip(_weights(photo_session, "straight"), _weights(photo_session, "resumed")):
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    log_steps = [int(line.split(",")[0]) for line in (photo_session.attempt_dir("resumed") / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == list(range(1, 11))


def test_checkpoint_write_killed_midway_leaves_the_previous_one_intact(photo_session, tiny_sd1):
    script = textwrap.dedent(f"""
        import os, torch
        from dreamnb import train as t
        from dreamnb.config import TrainConfig
        from dreamnb.session import open_session
        calls = []
        real_save = torch.save
        def dying_save(obj, path, *a, **k):
            calls.append(path)
            if len(calls) == 2:  # the second checkpoint: write half a file, then the machine "dies"
                open(path, "wb").write(b"half")
                os._exit(9)
            return real_save(obj, path, *a, **k)
        t.torch.save = dying_save
        config = TrainConfig.from_preset("object", token="zwx", class_word="thing", resolution=64,
            with_prior_preservation=False, unet_steps=6, unet_lr=1e-3, text_encoder_steps=0, checkpoint_every=2,
            keep_checkpoints=3)
        t.train(open_session({str(photo_session.path)!r}), config, {str(tiny_sd1.folder)!r}, progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr
    folder = photo_session.attempt_dir("attempt-1")
    checkpoint = latest_checkpoint(folder)
    assert checkpoint.name == "step-000002"
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["lr_scheduler"]
    assert json.loads((checkpoint / "state.json").read_text())["global_step"] == 2
    resumed = train(open_session(photo_session.path), TrainConfig(), tiny_sd1.folder.as_posix(), resume=True, progress=False)
    assert resumed.status == "finished" and resumed.steps_done == 6


def test_nan_loss_stops_with_a_plain_message_and_keeps_the_last_good_checkpoint(photo_session, base_sd1, monkeypatch):
    real_loss = train_module.diffusion_loss
    calls = []

    def exploding_loss(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) > 6 else loss

    monkeypatch.setattr(train_module, "diffusion_loss", exploding_loss)
    result = train(photo_session, quick_config(unet_steps=20, checkpoint_every=5, log_every=10), base_sd1, progress=False)
    assert result.status == "failed" and "NaN" in result.message and "learning rate" in result.message
    checkpoint = latest_checkpoint(photo_session.attempt_dir(result.attempt))
    assert checkpoint.name == "step-000005"
    assert all(torch.isfinite(v).all() for v in load_file(str(checkpoint / "weights.safetensors")).values())
    assert open_session(photo_session.path).attempt(result.attempt).status == "failed"
    monkeypatch.setattr(train_module, "diffusion_loss", real_loss)
    assert train(photo_session, quick_config(unet_steps=2), base_sd1, progress=False).status == "finished"


def test_out_of_memory_says_what_to_change_and_the_session_stays_usable(photo_session, base_sd1, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "diffusion_loss", oom)
    result = train(photo_session, quick_config(resolution=64), base_sd1, progress=False)
    assert result.status == "failed"
    assert "ran out of memory" in result.message and "gradient_checkpointing='on'" in result.message and "method='lora'" in result.message
    monkeypatch.undo()
    assert train(photo_session, quick_config(unet_steps=2), base_sd1, progress=False).status == "finished"


def test_settings_and_data_that_cannot_work_are_refused_before_training(photo_session, base_sd1, tmp_path):
    from dreamnb.session import create_session

    with pytest.raises(ConfigError, match="no prepared photos"):
        train(create_session(tmp_path / "empty"), quick_config(), base_sd1, progress=False)
    (photo_session.instance_dir / "photo-0.txt").write_text("a photo of a thing on a table")
    with pytest.raises(ConfigError, match="caption of photo-0.png does not contain the token 'zwx'"):
        train(photo_session, quick_config(), base_sd1, progress=False)
    assert open_session(photo_session.path).attempts == []  # nothing half-created


def test_captions_are_used_for_their_photos(photo_session, base_sd1):
    for i in range(4):
        (photo_session.instance_dir / f"photo-{i}.txt").write_text(f"zwx thing, view {i}")
    result = train(photo_session, quick_config(unet_steps=2), base_sd1, progress=False)
    assert result.status == "finished"


def test_lora_attempt_is_a_file_diffusers_loads(photo_session, base_sd1):
    from diffusers import StableDiffusionPipeline

    config = quick_config(method="lora", lora_rank=4, lora_alpha=8, unet_lr=1e-2, text_encoder_steps=3, unet_steps=10)
    result = train(photo_session, config, base_sd1, progress=False)
    lora_file = result.final_dir / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file() and lora_file.stat().st_size < 2_000_000
    pipe = StableDiffusionPipeline(**base_sd1.pipeline.components)
    pipe.unet = type(base_sd1.unet).from_config(base_sd1.unet.config)
    pipe.unet.load_state_dict(base_sd1.unet.state_dict())
    pipe.text_encoder = type(base_sd1.text_encoder)(base_sd1.text_encoder.config)
    pipe.text_encoder.load_state_dict(base_sd1.text_encoder.state_dict())
    pipe.load_lora_weights(str(result.final_dir))

    def image(p):
        return p("photo of zwx thing", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    ours = attempt_pipeline(base_sd1, photo_session, result.attempt)
    theirs = image(pipe)
    assert torch.allclose(torch.from_numpy(theirs), torch.from_numpy(image(ours)), atol=1e-4)
    assert not torch.allclose(torch.from_numpy(theirs), torch.from_numpy(image(base_sd1.pipeline)), atol=1e-3)


def test_data_parallel_under_accelerate_launch_on_cpu(photo_session, tiny_sd1, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import hashlib, os, torch
        from dreamnb import train as t
        from dreamnb.config import TrainConfig
        from dreamnb.session import open_session
        seen = {{}}
        real = t.save_final
        def spy(accelerator, attempt_dir, unet, text_encoder, config):
            model = accelerator.unwrap_model(unet)
            digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
            open(os.path.join({str(tmp_path)!r}, f"rank{{accelerator.process_index}}.txt"), "w").write(f"{{accelerator.num_processes}} {{digest}}")
            return real(accelerator, attempt_dir, unet, text_encoder, config)
        t.save_final = spy
        config = TrainConfig.from_preset("object", token="zwx", class_word="thing", resolution=64,
            with_prior_preservation=False, unet_steps=4, unet_lr=1e-3, text_encoder_steps=2, checkpoint_every=0)
        result = t.train(open_session({str(photo_session.path)!r}), config, {str(tiny_sd1.folder)!r}, progress=False)
        assert result.status == "finished", result.message
    """))
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(reports) == 1 and reports.pop().startswith("2 ")  # two processes, identical weights
    assert (photo_session.attempt_dir("attempt-1") / "final" / "unet").is_dir()
