"""SDXL through the same trainer as SD 1.x, on the tiny SDXL model (CPU): it learns, its conditioning (two text
encoders, pooled prompt, size/crop time ids) reaches the UNet, both text encoders train, runs resume and continue
exactly, class images come from the SDXL pipeline, and diffusers loads the LoRA file it writes."""
import copy
import dataclasses
import threading

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import subject_photo
from dreamnb import data
from dreamnb import train as train_module
from dreamnb.attempts import denoising_error
from dreamnb.config import TrainConfig, preset_values
from dreamnb.models import load_base_model
from dreamnb.session import LORA_FILE, open_session
from dreamnb.train import continue_config, train

PROMPT = "photo of zwx thing"


@pytest.fixture(scope="module")
def base_sdxl(tiny_sdxl):
    return load_base_model(tiny_sdxl.folder)


def sdxl_config(**changes) -> TrainConfig:
    base = TrainConfig.from_preset("object", family="sdxl", token="zwx", class_word="thing", resolution=64, seed=0,
                                   with_prior_preservation=False, unet_steps=30, unet_lr=1e-2, text_encoder_lr=1e-3,
                                   checkpoint_every=0, log_every=5, lora_rank=4, lora_alpha=4)
    return dataclasses.replace(base, **changes)


def capture_models(monkeypatch) -> list:
    """The trainer's own models of each run (trained in place), as `place_models` made them."""
    placed = []
    real = train_module.place_models
    monkeypatch.setattr(train_module, "place_models", lambda *a, **k: placed.append(real(*a, **k)) or placed[-1])
    return placed


def photo_latents(session, base) -> torch.Tensor:
    mean, _ = data.cached_latents(base.vae, sorted(session.instance_dir.glob("*.png")), 64, session.cache_dir, "eval")
    return mean * base.vae.config.scaling_factor


def diffusers_pipeline_with(base, lora_dir):
    """A fresh tiny SDXL pipeline (copies of the base parts) with the LoRA file loaded and fused by diffusers itself."""
    from diffusers import StableDiffusionXLPipeline

    parts = {k: copy.deepcopy(v) if k in ("unet", "text_encoder", "text_encoder_2") else v for k, v in base.pipeline.components.items()}
    pipe = StableDiffusionXLPipeline(**parts)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    return pipe


# --- learning, and the file diffusers loads -------------------------------------------------------------

def test_lora_learns_the_photos_and_diffusers_loads_the_same_model(photo_session, base_sdxl, monkeypatch):
    placed = capture_models(monkeypatch)
    config = sdxl_config(text_encoder_steps=4, unet_steps=80, lora_rank=8, lora_alpha=8)
    result = train(photo_session, config, base_sdxl, progress=False)
    assert result.status == "finished" and result.steps_done == 84, result.message
    saved = load_file(str(result.final_dir / LORA_FILE))
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}

    pipe = diffusers_pipeline_with(base_sdxl, result.final_dir)
    tokenizers = base_sdxl.tokenizers
    latents = photo_latents(photo_session, base_sdxl)
    with torch.no_grad():
        before, after = denoising_error(base_sdxl.pipeline, latents, PROMPT), denoising_error(pipe, latents, PROMPT)
    assert after < 0.92 * before, (before, after)  # measured 1.15 -> 1.00: LoRA on the tiny UNet's few attention layers

    # diffusers' fused model is the trainer's own, to float precision: text encoders and UNet alike
    ours = placed[0]
    ids = data.tokenize_all(tokenizers, [PROMPT, "an oil painting of zwx thing"])
    with torch.no_grad():
        our_embeds, our_pooled = ours.text_encoders.to("cpu")(ids)
        their_embeds, their_pooled = base_sdxl.family.prompt_encoder(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)(ids)
        assert torch.allclose(our_embeds, their_embeds, atol=1e-5) and torch.allclose(our_pooled, their_pooled, atol=1e-5)
        noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 600])
        added = {"text_embeds": our_pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
        our_pred = ours.denoiser(noisy, t, our_embeds, added_cond_kwargs=added).sample
        their_pred = pipe.unet(noisy, t, our_embeds, added_cond_kwargs=added).sample
        base_pred = base_sdxl.unet(noisy, t, our_embeds, added_cond_kwargs=added).sample
    assert torch.allclose(our_pred, their_pred, atol=1e-4), (our_pred - their_pred).abs().max()
    assert not torch.allclose(our_pred, base_pred, atol=1e-3)


# --- conditioning ------------------------------------------------------------------------------------------

def test_time_ids_are_made_per_photo_and_follow_flipped_rows(photo_session, base_sdxl):
    Image.fromarray(torch.zeros(64, 96, 3, dtype=torch.uint8).numpy()).save(photo_session.instance_dir / "wide.png")  # 96×64
    subject_photo(9, size=32).save(photo_session.instance_dir / "small.png")                                          # 32×32
    config = sdxl_config(random_flip=True, with_prior_preservation=True, num_class_images=1)
    precision = train_module.plan_precision(config)
    accelerator = train_module.make_accelerator(config, precision, base_sdxl.family)
    examples = data.list_examples(photo_session.instance_dir)
    batches = train_module.prepare_data(photo_session, config, examples, base_sdxl, accelerator, lambda e: None, False)

    by_name = {"wide.png": [64, 96, 0, 16, 64, 64], "small.png": [32, 32, 0, 0, 64, 64]}  # (orig h, w, crop top, left, target)
    expected = [by_name.get(e.path.name, [64, 64, 0, 0, 64, 64]) for e in examples]
    assert batches.instance_image_cond.tolist() == expected + expected  # the mirrored rows follow the originals
    assert batches.instance_mean.shape[0] == batches.instance_ids.shape[0] == 2 * len(examples)
    assert batches.instance_ids.shape[1:] == (2, 77)  # one row per tokenizer
    assert batches.instance_ids[0, 1, -1] == 0 and batches.instance_ids[0, 0, -1] == 49407  # tokenizer_2 pads with "!"
    assert batches.class_image_cond.tolist() == [[64, 64, 0, 0, 64, 64]]

    added = base_sdxl.family.denoiser_inputs(torch.ones(3, 48), batches.image_rows(torch.tensor([1, 0]), torch.tensor([0])))
    assert added["time_ids"].tolist() == [expected[1], expected[0], [64, 64, 0, 0, 64, 64]]


def test_the_unet_gets_both_encoders_and_the_pooled_prompt(photo_session, base_sdxl, monkeypatch):
    seen = []
    real = train_module.diffusion_loss

    def recording(unet, latents, embeds, *rest, extra=None, **kwargs):
        seen.append((embeds.shape, {k: v.detach().clone() for k, v in extra.items()}))
        return real(unet, latents, embeds, *rest, extra=extra, **kwargs)

    monkeypatch.setattr(train_module, "diffusion_loss", recording)
    config = sdxl_config(text_encoder_steps=1, unet_steps=1, with_prior_preservation=True, num_class_images=1)
    assert train(photo_session, config, base_sdxl, progress=False).status == "finished"
    with torch.no_grad():
        embeds, pooled = base_sdxl.family.prompt_encoder(**base_sdxl.text_encoders)(
            data.tokenize_all(base_sdxl.tokenizers, [PROMPT, "photo of a thing"]))
    assert embeds.shape == (2, 77, 32 + 48)  # penultimate layers of both encoders side by side
    for shape, added in seen:  # a photo, then a class image
        assert shape == (2, 77, 80) and added["time_ids"].shape == (2, 6) and added["text_embeds"].shape == (2, 48)
    # the first step's pooled prompts (a photo's, then the class prompt's) are the second encoder's projection (its LoRA
    # starts at zero, so as the base model's)
    assert torch.allclose(seen[0][1]["text_embeds"], pooled, atol=1e-5)


def test_noise_schedule_builds_from_sdxls_euler_scheduler(base_sdxl):
    from diffusers import DDPMScheduler

    schedule = base_sdxl.family.noise_schedule(base_sdxl.pipeline.scheduler, torch.device("cpu"))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(schedule.sqrt_alpha ** 2, torch.cumprod(1 - betas, 0), atol=1e-6)
    assert schedule.prediction_type == "epsilon" and schedule.num_train_timesteps == 1000
    assert type(base_sdxl.pipeline.scheduler) is not DDPMScheduler


# --- text encoders ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "full"])
def test_text_encoder_phase_trains_both_encoders(photo_session, base_sdxl, method):
    config = sdxl_config(method=method, text_encoder_steps=3, unet_steps=2, checkpoint_every=3, keep_checkpoints=3,
                         sample_every=5 if method == "lora" else 0)
    result = train(photo_session, config, base_sdxl, progress=False)
    assert result.status == "finished", result.message
    folder = photo_session.attempt_dir(result.attempt)
    after_te = load_file(str(folder / "checkpoints" / "step-000003" / "weights.safetensors"))
    assert {k.split(".")[0] for k in after_te} == {"text_encoder", "text_encoder_2"}
    for name in ("text_encoder", "text_encoder_2"):
        mine = {k[len(name) + 1:]: v for k, v in after_te.items() if k.startswith(name + ".")}
        if method == "lora":  # B starts at zero: moved means trained
            assert any("lora_B" in k and v.abs().sum() > 0 for k, v in mine.items()), name
        else:
            base = base_sdxl.text_encoders[name].state_dict()
            assert any(not torch.equal(v, base[k]) for k, v in mine.items()), name
    if method == "full":
        from transformers import CLIPTextModelWithProjection

        assert sorted(p.name for p in (folder / "final").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
        final_te2 = CLIPTextModelWithProjection.from_pretrained(folder / "final" / "text_encoder_2").state_dict()
        assert all(torch.equal(final_te2[k[len("text_encoder_2."):]], v) for k, v in after_te.items() if k.startswith("text_encoder_2."))
    else:
        assert (folder / "samples" / "step-000005.png").is_file()  # previews through the SDXL pipeline


# --- never lose a run ------------------------------------------------------------------------------------------

def test_stop_and_resume_gives_the_same_weights_as_a_straight_run(photo_session, base_sdxl):
    config = sdxl_config(text_encoder_steps=3, unet_steps=4, log_every=1, lr_scheduler="linear", lr_warmup_steps=1)
    straight = train(photo_session, config, base_sdxl, progress=False, attempt="straight")
    stop = threading.Event()
    first = train(photo_session, config, base_sdxl, progress=False, attempt="resumed", stop=stop,
                  callback=lambda e: stop.set() if e.kind == "step" and e.step == 2 else None)  # inside the text-encoder phase
    assert first.status == "interrupted" and first.steps_done == 2
    checkpoint = load_file(str(photo_session.attempt_dir("resumed") / "checkpoints" / "step-000002" / "weights.safetensors"))
    assert any(k.startswith("text_encoder_2.") for k in checkpoint)
    second = train(photo_session, None, base_sdxl, progress=False, attempt="resumed", resume=True)
    assert second.status == "finished" and second.steps_done == 7
    a, b = load_file(str(straight.final_dir / LORA_FILE)), load_file(str(second.final_dir / LORA_FILE))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_a_continued_attempt_starts_from_the_parents_weights(photo_session, base_sdxl, monkeypatch):
    placed = capture_models(monkeypatch)
    parent = train(photo_session, sdxl_config(text_encoder_steps=2, unet_steps=3), base_sdxl, progress=False)
    starts = {}

    def on_event(event):
        if event.kind == "phase":
            starts.update({n: p.detach().clone() for n, p in placed[1].text_encoders.named_parameters() if "lora_" in n})
            starts.update({n: p.detach().clone() for n, p in placed[1].denoiser.named_parameters() if "lora_" in n})

    child_config = continue_config(open_session(photo_session.path), parent.attempt, unet_steps=2)
    assert child_config.text_encoder_steps == 0 and child_config.changes_text_encoder
    child = train(open_session(photo_session.path), child_config, base_sdxl, progress=False, callback=on_event)
    assert child.status == "finished", child.message
    trained = {n: p for model in (placed[0].text_encoders, placed[0].denoiser) for n, p in model.named_parameters() if "lora_" in n}
    assert starts.keys() == trained.keys() and any(n.startswith("text_encoder_2.") for n in starts)
    assert all(torch.allclose(starts[n], trained[n].detach(), atol=1e-6) for n in trained)
    saved = load_file(str(child.final_dir / LORA_FILE))
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}  # the parent's encoders carried on


# --- prior preservation, presets, the CLI ------------------------------------------------------------------------

def test_class_images_come_from_the_sdxl_pipeline(photo_session, base_sdxl):
    import numpy as np

    config = sdxl_config(with_prior_preservation=True, num_class_images=2, unet_steps=2)
    assert train(photo_session, config, base_sdxl, progress=False).status == "finished"
    (folder,) = photo_session.class_dir.iterdir()
    made = sorted(folder.glob("*.png"))
    assert len(made) == 2 and Image.open(made[1]).size == (64, 64)
    expected = base_sdxl.pipeline("photo of a thing", num_inference_steps=25, height=64, width=64,
                                  generator=torch.Generator().manual_seed(10_000 + 1)).images[0]
    assert np.abs(np.asarray(Image.open(made[1]), np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_sdxl_presets_are_lora_at_1024_px_with_the_text_encoders_frozen():
    sdxl, sd = preset_values("face", family="sdxl"), preset_values("face")
    assert (sdxl["method"], sdxl["resolution"], sdxl["text_encoder_steps"], sdxl["unet_lr"]) == ("lora", 1024, 0, 1e-4)
    assert sd["method"] == "full" and "resolution" not in sd
    full = TrainConfig.from_preset("face", "full", family="sdxl", resolution=768)
    assert (full.method, full.resolution, full.unet_lr) == ("full", 768, 2e-6)


def test_the_cli_applies_sdxl_defaults_and_trains(photo_session, tiny_sdxl):
    import json

    from dreamnb.cli import main

    code = main(["train", "--session", str(photo_session.path), "--model", str(tiny_sdxl.folder), "--token", "zwx",
                 "--class-word", "thing", "--resolution", "64", "--unet-steps", "2", "--no-prior", "--json"])
    assert code == 0
    config = json.loads((photo_session.attempt_dir("attempt-1") / "config.json").read_text())
    assert (config["method"], config["unet_lr"], config["text_encoder_steps"], config["resolution"]) == ("lora", 1e-4, 0, 64)
    assert (photo_session.attempt_dir("attempt-1") / "final" / LORA_FILE).is_file()


def test_photos_smaller_than_the_training_size_are_named(photo_session, base_sdxl):
    """Photos prepared at SD 1.5's 512 px for an SDXL run at 1024 are enlarged; the run says so and how to fix it."""
    said = []
    config = sdxl_config(resolution=128, unet_steps=1)  # the photos are 64 px
    train(photo_session, config, base_sdxl, progress=False, callback=lambda e: said.append(e.message or ""))
    assert any("Some photos are 64 px, below the training size (128 px)" in m and "--size 128" in m for m in said)
    said.clear()
    train(photo_session, sdxl_config(unet_steps=1), base_sdxl, progress=False, callback=lambda e: said.append(e.message or ""))
    assert not any("below the training size" in m for m in said)
