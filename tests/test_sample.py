"""Sampling: seeded images that do not depend on their batch, and settings that travel in the PNG."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from PIL import Image

from dreamnb.sample import (
    PROBE_PROMPTS,
    SCHEDULERS,
    Sample,
    SampleSettings,
    a1111_parameters,
    expand_prompt,
    generate,
    parse_parameters,
    read_png_settings,
    save_png,
    set_scheduler,
)
from dreamnb.tiny import tiny_pipeline

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def settings(prompt="a photo of sks dog", seed=0, **kwargs) -> SampleSettings:
    return SampleSettings(prompt=prompt, seed=seed, num_inference_steps=STEPS, **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_settings_give_the_same_image_and_another_seed_another(pipe):
    first, again, other_seed = generate(pipe, [settings(seed=1), settings(seed=1), settings(seed=2)], progress=False)
    assert first.image.size == (64, 64)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert np.abs(pixels(first.image) - pixels(other_seed.image)).mean() > 1


def test_image_does_not_depend_on_the_batch_it_ran_in(pipe):
    alone = generate(pipe, [settings(seed=7)], progress=False)[0]
    batch = [settings(seed=3), settings(prompt="a red car", seed=5), settings(seed=7), settings(seed=9)]
    in_batch = generate(pipe, batch, batch_size=4, progress=False)
    assert [s.settings.seed for s in in_batch] == [3, 5, 7, 9]  # results keep the input order
    assert np.abs(pixels(alone.image) - pixels(in_batch[2].image)).max() <= 1
    # and separate calls with other batch sizes agree too
    one_by_one = generate(pipe, batch, batch_size=1, progress=False)
    for a, b in zip(in_batch, one_by_one):
        assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1


def test_generate_groups_mixed_settings_and_leaves_the_pipeline_as_it_was(pipe):
    scheduler_before = pipe.scheduler
    mixed = [settings(seed=1), settings(seed=1, scheduler="euler"), settings(seed=1, guidance_scale=3.0), settings(seed=1)]
    samples = generate(pipe, mixed, batch_size=2, progress=False)
    assert [s.settings.scheduler for s in samples] == ["dpm++", "euler", "dpm++", "dpm++"]
    assert np.array_equal(pixels(samples[0].image), pixels(samples[3].image))
    assert not np.array_equal(pixels(samples[0].image), pixels(samples[1].image))  # the scheduler mattered
    assert not np.array_equal(pixels(samples[0].image), pixels(samples[2].image))  # so did guidance
    assert samples[0].settings.width == 64 and samples[0].settings.height == 64  # size filled in for the PNG
    assert pipe.scheduler is scheduler_before


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_generates(pipe, name):
    sample = generate(pipe, [settings(seed=4, scheduler=name)], progress=False)[0]
    assert sample.image.size == (64, 64)
    assert pixels(sample.image).std() > 0
    again = generate(pipe, [settings(seed=4, scheduler=name)], progress=False)[0]
    assert np.array_equal(pixels(sample.image), pixels(again.image))


def test_set_scheduler_keeps_the_noise_schedule_and_drops_old_tweaks():
    pipe = type("P", (), {})()
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction")
    set_scheduler(pipe, "dpm++-karras")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_karras_sigmas is True
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    set_scheduler(pipe, "dpm++")
    assert pipe.scheduler.config.use_karras_sigmas is False
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # an SD 2 model stays v-prediction
    assert pipe.scheduler.config.beta_end == 0.012


def test_unknown_scheduler_is_a_clear_error_listing_the_valid_ones(pipe):
    with pytest.raises(ValueError, match="Unknown scheduler 'plms'.*dpm\\+\\+.*euler.*ddim"):
        set_scheduler(pipe, "plms")
    with pytest.raises(ValueError, match="Unknown scheduler"):  # checked before any image is made
        generate(pipe, [settings(), settings(scheduler="plms")], progress=False)


@pytest.mark.parametrize(
    "change, message",
    [({"seed": -1}, "seed"), ({"width": 60}, "multiple of 8"), ({"prompt": "  "}, "prompt is empty"),
     ({"num_inference_steps": 0}, "num_inference_steps")],
)
def test_bad_settings_are_refused(pipe, change, message):
    with pytest.raises(ValueError, match=message):
        generate(pipe, [dataclasses.replace(settings(), **change)], progress=False)


def test_expand_prompt():
    assert expand_prompt("a photo of {token} {class}", "sks", "dog") == "a photo of sks dog"
    assert expand_prompt("{class} and {class}", "sks", "dog") == "dog and dog"
    assert expand_prompt("no placeholders", "sks", "dog") == "no placeholders"
    with pytest.raises(ValueError, match=r"unknown placeholder \{name\}.*\{token\} and \{class\}"):
        expand_prompt("a photo of {name}", "sks", "dog")
    with pytest.raises(ValueError, match=r"uses \{token\}"):
        expand_prompt("a photo of {token}", "", "dog")


def test_probe_prompts_expand_and_cover_the_overfitting_cases():
    expanded = [expand_prompt(p, "zwx", "woman") for p in PROBE_PROMPTS]
    assert not any("{" in p or "}" in p for p in expanded)
    with_token = [p for p in expanded if "zwx" in p]
    assert any("paint" in p for p in with_token)                      # the subject in a painting style
    assert any(p.count("woman") >= 2 for p in with_token)             # the subject with another person
    assert "a photo of a woman" in expanded                           # the class word alone: prior drift
    assert any("zwx" not in p and "woman" not in p for p in expanded)  # no token at all


def test_png_metadata_round_trips(tmp_path):
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    original = SampleSettings(
        prompt="an oil painting of sks dog, by Van Gogh", negative_prompt="blurry, lowres", seed=1234,
        num_inference_steps=30, guidance_scale=6.5, scheduler="euler-a", width=64, height=64,
        attempt="unet-1500", base_model="runwayml/stable-diffusion-v1-5",
    )
    path = save_png(Sample(image, original), tmp_path / "out" / "a.png")
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    assert read_png_settings(path) == original
    with Image.open(path) as saved:
        text = saved.text["parameters"]
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    lines = text.split("\n")
    assert lines[0] == original.prompt
    assert lines[1] == "Negative prompt: blurry, lowres"
    assert lines[2].startswith("Steps: 30, Sampler: Euler a, CFG scale: 6.5, Seed: 1234, Size: 64x64, ")
    assert "Model: runwayml/stable-diffusion-v1-5" in lines[2] and "dreamnb attempt: unet-1500" in lines[2]


def test_metadata_with_awkward_values_round_trips(tmp_path):
    original = SampleSettings(prompt="café au lait,\nsecond line: ☕", seed=2**32 - 1, scheduler="dpm++-karras",
                              attempt="lr 2e-6, 800 steps", base_model="C:\\models\\v1-5.safetensors")
    path = save_png(Sample(Image.new("RGB", (8, 8)), original), tmp_path / "b.png")
    assert read_png_settings(path) == original
    assert parse_parameters(a1111_parameters(original)) == original


def test_parses_real_a1111_parameters():
    text = (
        "photo of zwx man, (portrait:1.2), 85mm, sharp focus\n"
        "Negative prompt: cartoon, 3d, (disfigured:1.3)\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3141592653, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        'Lora hashes: "zwx: 5a4e2b1c", Version: v1.9.4'
    )
    parsed = parse_parameters(text)
    assert parsed == SampleSettings(
        prompt="photo of zwx man, (portrait:1.2), 85mm, sharp focus",
        negative_prompt="cartoon, 3d, (disfigured:1.3)", seed=3141592653, num_inference_steps=28,
        guidance_scale=7.0, scheduler="dpm++-karras", width=512, height=768, base_model="v1-5-pruned-emaonly",
    )
    older = parse_parameters("a cat\nSteps: 20, Sampler: Euler, CFG scale: 5.5, Seed: 9, Size: 512x512")
    assert (older.scheduler, older.negative_prompt, older.guidance_scale) == ("euler", "", 5.5)


def test_unusable_parameters_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="sampler 'DPM\\+\\+ SDE' is not one dreamnb can use.*DPM\\+\\+ 2M"):
        parse_parameters("a cat\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1")
    with pytest.raises(ValueError, match="Steps value 'many'"):
        parse_parameters("a cat\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="no 'parameters' text"):
        read_png_settings(plain)
    with pytest.raises(ValueError, match=re.escape(".png")):
        save_png(Sample(Image.new("RGB", (8, 8)), settings()), tmp_path / "a.jpg")


def test_compiled_sampling_matches_and_every_attempt_reuses_the_compiled_code(monkeypatch, caplog):
    """The wiring of `compile_unet` on the CPU, with a light torch.compile backend (inductor's own numbers are
    the benchmark's, on the GPU): same images, one compiled graph for the base and a trained attempt alike,
    and a backend that fails falls back to the plain forward with a warning."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    from dreamnb import fast

    pipe = tiny_pipeline("sd1", seed=0)  # its own: compile state must not leak into the module's fixture
    batch = [settings(seed=1), settings(prompt="a red car", seed=2)]
    plain = generate(pipe, batch, progress=False)
    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(pipe, batch, progress=False, compile_unet=True)
    for a, b in zip(plain, compiled):
        assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1
    trained = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})  # as a LoRA attempt is made
    assert not isinstance(trained.unet.forward, fast.FastUNetForward)  # a copy starts plain (graphs stay with the original)
    with torch.no_grad():
        for p in trained.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed = generate(trained, batch, progress=False, compile_unet=True)
    eager_changed = generate(trained, batch, progress=False, compile_unet=False, cuda_graphs=False)
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, for both models: weights are inputs
    for a, b, c in zip(compiled, changed, eager_changed):
        assert np.abs(pixels(a.image) - pixels(b.image)).mean() > 1  # the attempt's own weights were used
        assert np.abs(pixels(b.image) - pixels(c.image)).max() <= 1

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fast, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    other = tiny_pipeline("sd1", seed=0)
    with caplog.at_level("WARNING", logger="dreamnb.fast"):
        fallback = generate(other, batch, progress=False, compile_unet=True)
    assert "Compiling the UNet failed" in caplog.text and "sampling without it" in caplog.text
    for a, b in zip(plain, fallback):
        assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1
