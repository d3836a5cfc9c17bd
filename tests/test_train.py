"""The trainer on tiny models: it learns, phases do what they say, runs resume exactly, nothing is lost."""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamnb import train as train_module
from dreamnb.attempts import attempt_pipeline, denoising_error
from dreamnb.config import ConfigError, TrainConfig
from dreamnb.data import cached_latents
from dreamnb.session import add_attempt, open_session
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


def test_class_images_are_made_once_by_the_base_model_and_reused(photo_session, base_sd1):
    """Prior preservation's class images come from the base model with the class prompt, seeded per index,
    and a later attempt with the same base, prompt and size reuses them instead of generating again."""
    import numpy as np
    from PIL import Image

    config = quick_config(with_prior_preservation=True, num_class_images=2, unet_steps=2)
    train(photo_session, config, base_sd1, progress=False, attempt="first")
    (folder,) = photo_session.class_dir.iterdir()
    made = sorted(folder.glob("*.png"))
    assert len(made) == 2
    expected = base_sd1.pipeline("photo of a thing", num_inference_steps=25, height=64, width=64,
                                 generator=torch.Generator().manual_seed(10_000 + 1)).images[0]
    assert np.abs(np.asarray(Image.open(made[1]), np.int16) - np.asarray(expected, np.int16)).max() <= 1
    stamps = {p.name: p.stat().st_mtime_ns for p in made}

    train(photo_session, dataclasses.replace(config, num_class_images=3), base_sd1, progress=False, attempt="second")
    assert {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))[:2]} == stamps  # reused, not redone
    assert len(list(folder.glob("*.png"))) == 3                                               # only the missing one made
    train(photo_session, dataclasses.replace(config, class_prompt="photo of a box"), base_sd1, progress=False, attempt="third")
    assert len(list(photo_session.class_dir.iterdir())) == 2  # another prompt gets its own set


def test_prior_preservation_trains_each_step_on_class_images_under_the_class_prompt(photo_session, base_sd1, monkeypatch):
    """Every UNet step sees the subject under the instance prompt and a class image under the class prompt,
    the class part weighted by prior_loss_weight."""
    from dreamnb.data import tokenize_all

    batches = []

    def recording_loss(unet, latents, embeds, generator, schedule, config, n_instance, *processes, **conditioning):
        batches.append((latents.detach().clone(), embeds.detach().clone(), n_instance))
        return real_loss(unet, latents, embeds, generator, schedule, config, n_instance, *processes, **conditioning)

    real_loss = train_module.diffusion_loss
    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    config = quick_config(with_prior_preservation=True, num_class_images=2, unet_steps=3)
    train(photo_session, config, base_sd1, progress=False)
    assert len(batches) == 3
    (folder,) = photo_session.class_dir.iterdir()
    class_latents = cached_latents(base_sd1.vae, sorted(folder.glob("*.png")), 64, photo_session.cache_dir, "eval")[0]
    subject_latents = instance_latents(photo_session, base_sd1)
    with torch.no_grad():
        prompts = base_sd1.family.prompt_encoder(text_encoder=base_sd1.text_encoder)(tokenize_all([base_sd1.tokenizer], ["photo of zwx thing", "photo of a thing"]))[0]
    scaled = class_latents * base_sd1.vae.config.scaling_factor

    def nearest(row, pool):
        return (pool.flatten(1) - row.flatten()).norm(dim=1).min()

    for latents, embeds, n_instance in batches:
        assert n_instance == 1 and latents.shape[0] == 2
        assert torch.allclose(embeds[0], prompts[0], atol=1e-5) and torch.allclose(embeds[1], prompts[1], atol=1e-5)
        assert nearest(latents[1], scaled) < nearest(latents[1], subject_latents)  # the second row is a class image
        assert nearest(latents[0], subject_latents) < nearest(latents[0], scaled)  # the first the subject

    # the class rows count with their weight: the loss is linear in prior_loss_weight with the class rows' loss as slope
    latents, embeds, _ = batches[0]
    schedule = base_sd1.family.noise_schedule(base_sd1.pipeline.scheduler, torch.device("cpu"))

    def loss(weight):
        with torch.no_grad():
            return real_loss(base_sd1.unet, latents, embeds, torch.Generator().manual_seed(1), schedule,
                             dataclasses.replace(config, prior_loss_weight=weight), 1, family=base_sd1.family).item()

    class_rows_loss = loss(1.0) - loss(0.0)
    assert class_rows_loss > 0
    assert loss(3.0) == pytest.approx(loss(0.0) + 3 * class_rows_loss, rel=1e-5)


def test_data_parallel_processes_draw_their_own_noise_and_timesteps(base_sd1):
    """Each process takes its rows of one draw for all processes: together they equal one process with
    every row, and no two processes repeat each other's noise."""
    schedule = base_sd1.family.noise_schedule(base_sd1.pipeline.scheduler, torch.device("cpu"))
    config = quick_config(offset_noise=0.1)
    latents = torch.randn(2, 4, 8, 8)
    embeds = torch.zeros(2, 77, 32)

    def unet_inputs(rows, world, rank):
        seen = []

        def unet(noisy, timesteps, embeds, added_cond_kwargs=None):
            seen.append((noisy, timesteps))
            return dataclasses.make_dataclass("Out", ["sample"])(torch.zeros_like(noisy))

        train_module.diffusion_loss(unet, rows, embeds[: len(rows)], torch.Generator().manual_seed(3), schedule, config, len(rows), world, rank, family=base_sd1.family)
        return seen[0]

    rank0, rank1 = unet_inputs(latents, 2, 0), unet_inputs(latents, 2, 1)
    assert not torch.equal(rank0[0], rank1[0])  # same photos, same generator state: different noise
    alone = unet_inputs(torch.cat([latents, latents]), 1, 0)
    assert torch.equal(torch.cat([rank0[0], rank1[0]]), alone[0]) and torch.equal(torch.cat([rank0[1], rank1[1]]), alone[1])


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


def test_the_loss_scale_resumes_where_it_stopped(photo_session, base_sd1, monkeypatch):
    """Where the trainer scales the loss itself (fp16 math over bf16 weights: a T4), the scale and the clean updates
    counted towards its next doubling are in the checkpoint, so a resumed run scales as a straight one does. On the
    CPU (fp32) the scaling changes no weight, so the scalers themselves are compared; they double every 2 steps here."""
    from dreamnb import fast

    scalers = []

    class RecordedScaler(fast.LossScaler):
        def __init__(self):
            super().__init__(growth_interval=2)
            scalers.append(self)

    monkeypatch.setattr(train_module, "LossScaler", RecordedScaler)
    monkeypatch.setattr(train_module.Precision, "scales_loss_itself", property(lambda self: True))
    config = quick_config(text_encoder_steps=0, unet_steps=7, log_every=1)
    train(photo_session, config, base_sd1, progress=False, attempt="straight")
    assert scalers[-1].state_dict() == {"value": 2.0 ** 16 * 8, "clean_steps": 7}
    stop = threading.Event()
    train(photo_session, config, base_sd1, progress=False, attempt="resumed", stop=stop,
          callback=lambda e: stop.set() if e.kind == "step" and e.step == 5 else None)
    assert scalers[-1].state_dict() == {"value": 2.0 ** 16 * 4, "clean_steps": 5}
    assert train(photo_session, TrainConfig(), base_sd1, progress=False, attempt="resumed", resume=True).status == "finished"
    assert scalers[-1].state_dict() == {"value": 2.0 ** 16 * 8, "clean_steps": 7}


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


def test_the_trainers_copies_are_freed_before_the_base_model_comes_back(photo_session, base_sd1, monkeypatch):
    """On a GPU the base waits on the CPU while training; had the run's copies (and its CUDA graph's memory) still been
    alive when it came back, the end of an SDXL run would have needed 21.4 GB against training's 16.1."""
    copies, freed_in_time = [], []
    copy_to, parked = train_module.copy_to, base_sd1.parked

    def recording_copy(*args, **kwargs):
        copies.append(weakref.ref(copy := copy_to(*args, **kwargs)))
        return copy

    @contextlib.contextmanager
    def checked_parked():
        with parked() as moved:
            yield moved
            freed_in_time.append([ref() is None for ref in copies])

    monkeypatch.setattr(train_module, "copy_to", recording_copy)
    monkeypatch.setattr(base_sd1, "parked", checked_parked)
    assert train(photo_session, quick_config(unet_steps=3, text_encoder_steps=2), base_sd1, progress=False).status == "finished"
    assert freed_in_time == [[True, True]]


def test_a_later_attempt_in_the_same_kernel_can_use_another_precision(photo_session, base_sd1, monkeypatch):
    """accelerate keeps the first Accelerator's precision for the whole process; a notebook trains many attempts."""
    assert train(photo_session, quick_config(unet_steps=2), base_sd1, progress=False).status == "finished"  # fp32
    monkeypatch.setattr(train_module, "resolve_mixed_precision", lambda config: "bf16")  # what a GPU gets
    messages = []
    result = train(photo_session, quick_config(unet_steps=2, optimizer="adamw-bf16"), base_sd1, progress=False,
                   callback=lambda event: messages.append(event.message))
    assert result.status == "finished", result.message
    assert any("bf16 mixed precision" in m and "weights in bfloat16" in m for m in messages), messages


def test_settings_and_data_that_cannot_work_are_refused_before_training(photo_session, base_sd1, tmp_path):
    from dreamnb.session import create_session

    with pytest.raises(ConfigError, match="no prepared photos"):
        train(create_session(tmp_path / "empty"), quick_config(), base_sd1, progress=False)
    (photo_session.instance_dir / "photo-0.txt").write_text("a photo of a thing on a table")
    with pytest.raises(ConfigError, match="caption of photo-0.png does not contain the token 'zwx'"):
        train(photo_session, quick_config(), base_sd1, progress=False)
    assert open_session(photo_session.path).attempts == []  # nothing half-created


def test_previews_show_the_model_as_it_trains_and_leave_training_untouched(photo_session, base_sd1):
    import numpy as np

    from dreamnb.sample import SampleSettings, generate

    config = quick_config(text_encoder_steps=2, unet_steps=4, sample_every=2)
    events = []
    train(photo_session, config, base_sd1, progress=False, attempt="previews", callback=events.append)
    previews = [e for e in events if e.kind == "sample"]
    assert [(e.step, e.phase) for e in previews] == [(2, "text_encoder"), (4, "unet"), (6, "unet")]
    assert all(len(e.images) == 2 and os.path.isfile(e.path) for e in previews)
    assert sorted(p.name for p in (photo_session.attempt_dir("previews") / "samples").iterdir()) == [
        "step-000002.png", "step-000004.png", "step-000006.png"]
    assert not np.array_equal(np.asarray(previews[0].images[0]), np.asarray(previews[-1].images[0]))  # the model changed

    # the last preview is what the finished attempt makes with the same prompt and seed
    made = generate(attempt_pipeline(base_sd1, photo_session, "previews"),
                    [SampleSettings(prompt=config.resolved_sample_prompts()[1], seed=config.seed, width=64, height=64)],
                    progress=False)[0].image
    assert np.abs(np.asarray(made, np.int16) - np.asarray(previews[-1].images[1], np.int16)).max() <= 2

    # and making previews does not change what is trained
    train(photo_session, dataclasses.replace(config, sample_every=0), base_sd1, progress=False, attempt="plain")
    with_previews, without = _weights(photo_session, "previews"), _weights(photo_session, "plain")
    assert all(torch.equal(with_previews[0][k], without[0][k]) for k in without[0])


CAPTIONS = {0: "zwx thing, view 0", 1: "a zwx thing on a table", 2: "close-up of zwx thing"}  # photo-3: none


def test_each_photo_trains_under_its_own_caption(photo_session, base_sd1, monkeypatch):
    """Every row of every batch pairs a photo's latents (or its mirror's) with its own .txt caption's embedding, in the
    text-encoder phase and the UNet phase; a photo without a caption gets the instance prompt. The photo is told by its
    latents, not by the trainer's row index, so a caption paired with the wrong photo fails too."""
    from PIL import ImageOps
    from transformers import CLIPTextModel

    from conftest import subject_photo
    from dreamnb.data import tokenize_all

    ImageOps.invert(subject_photo(3)).save(photo_session.instance_dir / "photo-3.png")  # the fixture's photo-3 repeats photo-0
    for i, caption in CAPTIONS.items():
        (photo_session.instance_dir / f"photo-{i}.txt").write_text(caption)
    batches = []

    def recording_loss(unet, latents, embeds, *args, **kwargs):
        batches.append((latents.detach().clone(), embeds.detach().clone()))
        return real_loss(unet, latents, embeds, *args, **kwargs)

    def narrow_draws(*args, **kwargs):  # the tiny VAE's posteriors are wider than the photos are apart: narrowed, a
        data = real_prepare(*args, **kwargs)  # drawn latent shows which photo it is (the pairing is what is tested)
        data.instance_std = data.instance_std * 1e-3
        return data

    real_loss, real_prepare = train_module.diffusion_loss, train_module.prepare_data
    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    monkeypatch.setattr(train_module, "prepare_data", narrow_draws)
    config = quick_config(text_encoder_steps=1, unet_steps=3, train_batch_size=4)
    assert config.random_flip  # the object preset's: mirrored rows carry the caption of the photo they mirror
    result = train(photo_session, config, base_sd1, progress=False, attempt="captions")

    paths = sorted(photo_session.instance_dir.glob("*.png"))
    mean, _ = cached_latents(base_sd1.vae, paths, 64, photo_session.cache_dir, "eval", flip=True)
    pool = (mean * base_sd1.vae.config.scaling_factor).flatten(1)  # photos 0-3, then their mirrors
    prompts = [CAPTIONS.get(i, config.resolved_instance_prompt()) for i in range(4)]
    ids = tokenize_all([base_sd1.tokenizer], prompts)
    trained_te = CLIPTextModel.from_pretrained(result.final_dir / "text_encoder")
    with torch.no_grad():
        encode = base_sd1.family.prompt_encoder
        expected = {"base": encode(text_encoder=base_sd1.text_encoder)(ids)[0], "trained": encode(text_encoder=trained_te)(ids)[0]}
    assert not torch.allclose(expected["base"], expected["trained"], atol=1e-4)  # the phases can be told apart

    assert len(batches) == 4
    seen = set()
    for step, (latents, embeds) in enumerate(batches):
        encoder = "base" if step == 0 else "trained"  # the one text-encoder step runs the untouched encoder; the UNet phase the final one
        for row in range(latents.shape[0]):
            distances = (pool - latents[row].flatten()).norm(dim=1)
            photo = int(distances.argmin()) % 4
            others = distances[[i for i in range(8) if i % 4 != photo]]
            assert distances.min() < 0.1 * others.min(), (step, row, distances)  # the photo is told without doubt
            seen.add(photo)
            assert torch.allclose(embeds[row], expected[encoder][photo], atol=1e-5), (step, row, photo)
    assert seen == {0, 1, 2, 3}

    # another caption for one photo trains other weights (a run with the same settings trains the same weights bit for
    # bit: the previews and resume tests show it; so an ignored caption fails here)
    monkeypatch.setattr(train_module, "diffusion_loss", real_loss)
    (photo_session.instance_dir / "photo-1.txt").write_text("a zwx thing in the snow")
    train(photo_session, config, base_sd1, progress=False, attempt="other")
    first, other = _weights(photo_session, "captions"), _weights(photo_session, "other")
    for part in range(2):  # the UNet, the text encoder
        assert any(not torch.equal(first[part][k], other[part][k]) for k in first[part])


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


def test_data_parallel_under_accelerate_launch_on_cpu_ends_identical_and_resumes_on_one_process(photo_session, tiny_sd1, tmp_path, monkeypatch):
    """Two processes (gloo) on the GPU's default path: bf16 weights with AdamWBF16, whose flat buffers DDP
    must average in place. Stopped at step 4 (the Colab stop button on both ranks), the checkpoint they
    wrote resumes in one process."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import hashlib, os, threading, time
        from dreamnb import train as t
        from dreamnb.config import TrainConfig
        from dreamnb.session import open_session
        t.resolve_mixed_precision = lambda config: "bf16"  # what a GPU gets; the CPU refuses it as a setting
        real = t.save_checkpoint
        def spy(accelerator, attempt_dir, state, models, *rest):
            model = models.denoiser
            digest = hashlib.sha256(b"".join(p.detach().float().numpy().tobytes() for p in model.parameters())).hexdigest()
            open(os.path.join({str(tmp_path)!r}, f"rank{{accelerator.process_index}}.txt"), "w").write(
                f"{{accelerator.num_processes}} {{state['global_step']}} {{next(model.parameters()).dtype}} {{digest}} {{losses}}")
            return real(accelerator, attempt_dir, state, models, *rest)
        t.save_checkpoint = spy
        stop = threading.Event()
        losses = []  # each process's view of the loss: the mean over both, so the same on each
        def on_event(event):
            if event.kind == "step":
                losses.append(round(event.loss, 6))
                if event.step == 4:
                    stop.set()
        config = TrainConfig.from_preset("object", token="zwx", class_word="thing", resolution=64, optimizer="adamw-bf16",
            with_prior_preservation=False, unet_steps=4, unet_lr=1e-3, text_encoder_steps=2, checkpoint_every=0, log_every=1)
        if os.environ["RANK"] == "1":  # reads session.json late, as a slower process does: the attempt name must still agree
            time.sleep(3)
        result = t.train(open_session({str(photo_session.path)!r}), config, {str(tiny_sd1.folder)!r}, progress=False,
                         callback=on_event, stop=stop)
        assert result.status == "interrupted" and result.steps_done == 4, result.message
    """))
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(reports) == 1 and reports.pop().startswith("2 4 torch.bfloat16 ")  # two processes, identical bf16 weights
    assert [a.name for a in open_session(photo_session.path).attempts] == ["attempt-1"]
    assert [p.name for p in (photo_session.path / "attempts").iterdir()] == ["attempt-1"]

    monkeypatch.setattr(train_module, "resolve_mixed_precision", lambda config: "bf16")
    messages = []
    result = train(open_session(photo_session.path), None, tiny_sd1.folder, resume=True, progress=False,
                   callback=lambda e: messages.append(e.message))
    assert result.status == "finished" and result.steps_done == 6, result.message
    assert "Resuming attempt-1 from step 4." in messages
    assert (photo_session.attempt_dir("attempt-1") / "final" / "unet").is_dir()


def test_processes_that_ended_with_different_weights_are_reported(base_sd1):
    class TwoProcesses:  # what accelerate's gather returns when the other process's weights differ slightly
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, other_offset):
            self.other_offset = other_offset

        def gather(self, checksum):
            return torch.cat([checksum, checksum + self.other_offset])

    unet = base_sd1.unet
    assert "same weights" in train_module.ranks_agree_message(TwoProcesses(0.0), unet)
    assert "different weights" in train_module.ranks_agree_message(TwoProcesses(1e-9), unet)


def test_cuda_graphs_under_data_parallel_only_when_asked_for():
    """'auto' keeps DDP with several GPUs (the captured all-reduce has run on one kind of machine only); 'on' asks for it."""
    from types import SimpleNamespace

    from dreamnb.train import resolve_cuda_graphs

    def graphs(processes: int, setting: str, precision: str = "bf16") -> bool:
        accelerator = SimpleNamespace(device=torch.device("cuda"), num_processes=processes)
        return resolve_cuda_graphs(TrainConfig(cuda_graphs=setting), accelerator, train_module.Precision(precision, "adamw-bf16"))

    assert graphs(1, "auto") and graphs(1, "on") and not graphs(1, "off")
    assert not graphs(2, "auto") and graphs(2, "on") and not graphs(2, "off")
    with pytest.raises(ConfigError, match="bf16 or fp32"):
        graphs(2, "on", precision="fp16")


def _model_snapshot(base):
    return {f"{part}.{k}": (v.clone(), v.dtype, v.device)
            for part in ("unet", "vae", "text_encoder") for k, v in getattr(base, part).state_dict().items()}


@pytest.mark.parametrize("precision", ["no", "bf16"])  # bf16: what a GPU run gets, which once cast the caller's VAE
def test_the_callers_model_is_unchanged_by_a_run_with_class_images_and_previews(photo_session, base_sd1, monkeypatch, precision):
    """Training works on its own copies: the base model's parameters, formats and devices are as before."""
    monkeypatch.setattr(train_module, "resolve_mixed_precision", lambda config: precision)
    before = _model_snapshot(base_sd1)
    config = quick_config(with_prior_preservation=True, num_class_images=2, text_encoder_steps=2, unet_steps=2, sample_every=2,
                          optimizer="adamw-bf16" if precision == "bf16" else "auto")
    assert train(photo_session, config, base_sd1, progress=False).status == "finished"
    after = _model_snapshot(base_sd1)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k][0], after[k][0]) and before[k][1:] == after[k][1:] for k in before)


def _lora_config(**changes):
    return quick_config(method="lora", lora_rank=4, lora_alpha=4, unet_lr=1e-3, text_encoder_steps=2, unet_steps=2, **changes)


def test_lora_adapters_start_from_the_runs_seed_and_leave_the_global_generator_alone(photo_session, base_sd1):
    from dreamnb.train import LORA_FILE

    torch.manual_seed(1)
    first = train(photo_session, _lora_config(), base_sd1, progress=False, attempt="first")
    state = torch.random.get_rng_state()
    torch.manual_seed(2)  # another global state: the same seed must still give the same file
    second = train(photo_session, _lora_config(), base_sd1, progress=False, attempt="second")
    third = train(photo_session, _lora_config(seed=1), base_sd1, progress=False, attempt="other-seed")
    a, b, c = (load_file(str(r.final_dir / LORA_FILE)) for r in (first, second, third))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(1)
    train(photo_session, _lora_config(), base_sd1, progress=False, attempt="fourth")
    assert torch.equal(torch.random.get_rng_state(), state)  # the run drew nothing from the global generator


def test_lora_adapters_of_the_part_not_being_trained_stay_frozen(photo_session, base_sd1, monkeypatch):
    """The UNet's adapters gather no gradients in the text-encoder phase (which the first UNet step would apply)."""
    placed = []
    real_place = train_module.place_models
    monkeypatch.setattr(train_module, "place_models", lambda *a, **k: placed.append(real_place(*a, **k)) or placed[-1])
    seen = {}

    def on_event(event):
        if event.kind == "phase":
            unet_lora = [p for n, p in placed[0].denoiser.named_parameters() if "lora_" in n]
            seen[event.phase] = (any(p.requires_grad for p in unet_lora), [p.grad for p in unet_lora])

    assert train(photo_session, _lora_config(), base_sd1, progress=False, callback=on_event).status == "finished"
    trainable_in_te_phase, _ = seen["text_encoder"]
    trainable_in_unet_phase, grads_at_unet_start = seen["unet"]
    assert not trainable_in_te_phase and trainable_in_unet_phase
    assert all(g is None for g in grads_at_unet_start)


def test_a_learning_rate_tensor_stays_the_same_tensor_through_a_resume(tmp_path):
    """Fused AdamW in a CUDA graph reads its learning rate from one tensor; loading a checkpoint must fill that
    tensor, not replace it (the graph would keep the old rate while the schedule moved another one)."""
    from dreamnb.train import load_checkpoint_optimizer, make_lr_scheduler

    config = quick_config(lr_scheduler="linear", lr_warmup_steps=0)

    def optimizer_and_schedule():
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([param], lr=torch.tensor(1e-2))
        return param, optimizer, make_lr_scheduler(optimizer, config, 10)

    param, optimizer, schedule = optimizer_and_schedule()
    for _ in range(4):
        param.grad = torch.ones(3)
        optimizer.step()
        schedule.step()
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict()}, tmp_path / "optimizer.pt")
    _, resumed, resumed_schedule = optimizer_and_schedule()
    lr = resumed.param_groups[0]["lr"]
    load_checkpoint_optimizer(tmp_path, resumed, resumed_schedule)
    assert resumed.param_groups[0]["lr"] is lr and torch.allclose(lr, torch.tensor(1e-2 * 6 / 10))
    resumed_schedule.step()
    assert torch.allclose(lr, torch.tensor(1e-2 * 5 / 10))


@pytest.mark.parametrize("precision, bitsandbytes, method, expected", [
    ("bf16", False, "full", "adamw-bf16"),
    ("fp16", False, "full", "adamw-bf16"),  # a T4 without bitsandbytes: bf16 weights, fp16 math, fits in 15 GB
    ("fp16", True, "full", "adamw8bit"),
    ("bf16", True, "lora", "adamw"),
    ("no", False, "full", "adamw"),  # a CPU
])
def test_the_automatic_optimizer_fits_the_gpu(monkeypatch, precision, bitsandbytes, method, expected):
    monkeypatch.setattr(train_module, "_have_bitsandbytes", lambda: bitsandbytes)
    assert train_module.resolve_optimizer(quick_config(method=method), precision != "no", precision) == expected


def test_gradient_checkpointing_turns_on_under_a_per_process_memory_cap(monkeypatch):
    """The T4 stand-in caps an H200 at 15 GB: free memory alone (130 GB) would leave checkpointing off and run out."""
    GB = 2**30
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (130 * GB, 140 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 2 * GB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)
    cuda = torch.device("cuda")
    assert not train_module.resolve_gradient_checkpointing(quick_config(resolution=512), cuda)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 15 / 140)
    assert train_module.gpu_memory_budget(cuda) == 13 * GB
    assert train_module.resolve_gradient_checkpointing(quick_config(resolution=512), cuda)


def test_fp16_math_over_bf16_weights_trains_with_the_trainers_own_loss_scaling(photo_session, base_sd1, monkeypatch):
    """A T4's plan (no bf16 math, no bitsandbytes): AdamWBF16's bf16 weights, fp16 autocast, and loss scaling by the
    trainer, since torch's GradScaler has no kernel for bf16 gradients. On the CPU the math runs in bf16 (CPU autocast
    does not mix fp16 math with bf16 weights as CUDA's does; the GPU suite's T4 stand-in runs the real thing)."""
    monkeypatch.setattr(train_module, "resolve_mixed_precision", lambda config: "fp16")
    monkeypatch.setattr(train_module.TrainingModels, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    scalers = []
    real_scaler = train_module.LossScaler
    monkeypatch.setattr(train_module, "LossScaler", lambda: scalers.append(real_scaler()) or scalers[-1])
    messages = []
    config = quick_config(optimizer="adamw-bf16", text_encoder_steps=2, unet_steps=6, unet_lr=1e-2)
    result = train(photo_session, config, base_sd1, progress=False, callback=lambda e: messages.append(e.message))
    assert result.status == "finished", result.message
    assert any("fp16 mixed precision" in m and "adamw-bf16" in m and "weights in bfloat16" in m for m in messages), messages
    assert len(scalers) == 2 and all(s.clean_steps > 0 for s in scalers)  # one per phase, and it let the updates through
    trained = _weights(photo_session, result.attempt)[0]
    base = base_sd1.unet.state_dict()
    assert sum(not torch.equal(v.float(), base[k].float()) for k, v in trained.items()) > len(trained) // 2


def test_the_loss_scaler_skips_an_overflowing_update_and_unscales_exactly():
    from dreamnb.fast import LossScaler

    scaler = LossScaler(scale=1024.0, growth_interval=2)
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)) for _ in range(2)]
    params[0].grad = torch.tensor([1024.0, -2048.0, 512.0], dtype=torch.bfloat16)
    params[1].grad = torch.tensor([float("inf"), 0.0, 1.0], dtype=torch.bfloat16)
    assert not scaler.unscale_(params) and scaler.value == 512.0
    assert params[0].grad.tolist() == [1024.0, -2048.0, 512.0]  # left as they were: the update is skipped
    params[1].grad = torch.tensor([512.0, 0.0, 256.0], dtype=torch.bfloat16)
    assert scaler.unscale_(params) and params[0].grad.tolist() == [2.0, -4.0, 1.0] and params[1].grad.tolist() == [1.0, 0.0, 0.5]
    assert scaler.unscale_(params) and scaler.value == 1024.0  # two clean updates: the scale grows again
    assert train_module.Precision("fp16", "adamw-bf16").accelerate == "no"  # accelerate's GradScaler stays out of it
    assert train_module.Precision("fp16", "adamw8bit").accelerate == "fp16"


def test_resume_says_when_there_is_nothing_to_resume_and_refuses_another_base_model(photo_session, base_sd1, tiny_sd2):
    stopped = threading.Event()
    stopped.set()  # Stop at the first step: a checkpoint at step 1
    assert train(photo_session, quick_config(unet_steps=4), base_sd1, progress=False, attempt="stopped", stop=stopped).status == "interrupted"
    with pytest.raises(ConfigError, match=r"was trained from .*, not .*; resume it with that model"):
        train(photo_session, None, str(tiny_sd2.folder), attempt="stopped", resume=True, progress=False)
    assert train(photo_session, None, base_sd1, attempt="stopped", resume=True, progress=False).status == "finished"
    with pytest.raises(ConfigError, match="has finished .*nothing to resume"):
        train(photo_session, None, base_sd1, attempt="stopped", resume=True, progress=False)

    add_attempt(photo_session, "never-checkpointed")
    folder = photo_session.attempt_dir("never-checkpointed")
    (folder / "config.json").write_text(json.dumps(quick_config().to_dict()))
    (folder / "log.csv").write_text("step,phase,loss,lr,elapsed_s\n1,unet,0.5,0.001,1.0\n")
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        train(photo_session, None, base_sd1, attempt="never-checkpointed", resume=True, progress=False)
    assert (folder / "log.csv").read_text().count("\n") == 2  # not restarted, nothing appended


def test_ctrl_c_between_the_update_and_the_step_count_still_saves_a_consistent_checkpoint(photo_session, base_sd1, monkeypatch):
    """SIGINT lands at any line. Here it lands in the learning-rate schedule's step, after the optimizer's update and
    before the step is counted: it must not save step 3's weights as step 2 (they would resume to other weights)."""
    import signal

    config = quick_config(text_encoder_steps=2, unet_steps=4, log_every=1, lr_scheduler="linear")
    train(photo_session, config, base_sd1, progress=False, attempt="straight")
    scheduler_class = type(train_module.make_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), config, 4))
    real_step, steps = scheduler_class.step, []

    def interrupted_step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 6:  # the UNet phase's second step (each schedule takes a first step when it is made)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(scheduler_class, "step", interrupted_step)
    messages = []
    first = train(photo_session, config, base_sd1, progress=False, attempt="resumed", callback=lambda e: messages.append(e.message))
    assert first.status == "interrupted" and first.steps_done == 4 and any("Ctrl-C again" in m for m in messages)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.setattr(scheduler_class, "step", real_step)
    assert train(photo_session, None, base_sd1, progress=False, attempt="resumed", resume=True).status == "finished"
    for a, b in zip(_weights(photo_session, "straight"), _weights(photo_session, "resumed")):
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_a_full_disk_during_a_checkpoint_and_an_export_says_so_and_keeps_the_last_checkpoint(photo_session, tiny_sd1, base_sd1, monkeypatch, capsys):
    import errno

    import safetensors.torch

    from dreamnb.cli import main

    real_save, calls = safetensors.torch.save_file, []

    def disk_fills_up(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len([c for c in calls if "step-" in str(c)]) > 2:  # the first checkpoint (weights, random state) fits; the next does not
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)
    result = train(photo_session, quick_config(unet_steps=6, checkpoint_every=2), base_sd1, progress=False)
    assert result.status == "failed" and "disk is full" in result.message and "step-000002) is intact" in result.message
    folder = photo_session.attempt_dir(result.attempt)
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-000002"]  # no half-written leftovers
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert train(photo_session, None, base_sd1, progress=False, attempt=result.attempt, resume=True).status == "finished"

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = photo_session.path.parent / "me.safetensors"
    assert main(["export", "--session", str(photo_session.path), "--format", "safetensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert err.startswith("dreamnb export: The disk is full where ") and not out.exists()


def test_a_log_cut_short_by_a_crash_resumes_and_reads_straight(photo_session, base_sd1):
    stop = threading.Event()
    config = quick_config(unet_steps=4, log_every=1)
    train(photo_session, config, base_sd1, progress=False, attempt="cut", stop=stop,
          callback=lambda e: stop.set() if e.kind == "step" and e.step == 2 else None)
    log = photo_session.attempt_dir("cut") / "log.csv"
    with open(log, "a") as f:
        # rows of their own that the resume keeps by their step: one edited by hand, one cut mid-write
        f.write("1,unet,not a loss,0.001,0.5\n2,unet,0.41")
    assert train(photo_session, None, base_sd1, progress=False, attempt="cut", resume=True).status == "finished"
    assert [int(r["step"]) for r in train_module.read_log(photo_session.attempt_dir("cut"))] == [1, 2, 3, 4]


def test_held_out_photos_never_reach_training_and_stay_the_same_through_resume_and_continue(photo_session, base_sd1, monkeypatch):
    """The photos kept out for the scores are recorded with the attempt and never encoded for training; a resumed
    attempt and one continued from it keep the same ones even after more photos arrive."""
    from dreamnb import data
    from conftest import subject_photo

    for i in range(4, 8):
        subject_photo(i).save(photo_session.instance_dir / f"photo-{i}.png")
    encoded = []
    real = data.cached_latents
    monkeypatch.setattr(data, "cached_latents", lambda vae, paths, *a, **k: (encoded.append([p.name for p in paths]), real(vae, paths, *a, **k))[1])
    config = quick_config(unet_steps=6, checkpoint_every=2, log_every=1, held_out_photos=2)
    stop = threading.Event()
    result = train(photo_session, config, base_sd1, progress=False, stop=stop,
                   callback=lambda e: stop.set() if e.kind == "step" and e.step == 3 else None)
    held = json.loads((photo_session.attempt_dir(result.attempt) / "held_out.json").read_text())
    assert result.status == "interrupted" and held == ["photo-2.png", "photo-6.png"]  # spread over the 8
    assert encoded[-1] == [f"photo-{i}.png" for i in (0, 1, 3, 4, 5, 7)]
    subject_photo(9).save(photo_session.instance_dir / "photo-9.png")  # a new photo: the choice would differ now
    train(photo_session, config, base_sd1, attempt=result.attempt, resume=True, progress=False)
    assert encoded[-1] == [f"photo-{i}.png" for i in (0, 1, 3, 4, 5, 7, 9)]
    child = train(photo_session, dataclasses.replace(config, parent=result.attempt), base_sd1, progress=False)
    assert json.loads((photo_session.attempt_dir(child.attempt) / "held_out.json").read_text()) == held
    assert "photo-2.png" not in encoded[-1] and "photo-6.png" not in encoded[-1]


def test_held_out_photos_default_to_three_of_fifteen_and_refuse_too_few_left():
    from dreamnb.data import Example, choose_held_out

    def photos(n):
        return [Example(path=Path(f"p{i:02d}.png"), caption=None) for i in range(n)]
    assert choose_held_out(photos(14), -1) == []
    assert choose_held_out(photos(15), -1) == ["p02.png", "p07.png", "p12.png"]
    assert choose_held_out(photos(6), 0) == []
    with pytest.raises(ConfigError, match="fewer than 5 to learn from"):
        choose_held_out(photos(6), 2)
