"""FLUX.1 through the family seam, on a tiny FLUX.1-shaped model (the real FluxTransformer2DModel, a 16-channel VAE with
FLUX.1's shift and scale, CLIP + T5 with a T5 tokenizer trained here, FLUX.1 [dev]'s flow-matching scheduler): it is
recognised and loaded, its LoRA run lowers the photos' flow-matching error, diffusers' own FluxPipeline loads the LoRA
file and reproduces the trained transformer, and a stopped run resumes exactly."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from dreamnb import families
from dreamnb.attempts import attempt_pipeline, denoising_error
from dreamnb.config import ConfigError, TrainConfig
from dreamnb.data import cached_latents
from dreamnb.families.flux import FLUX1
from dreamnb.session import LORA_FILE
from dreamnb.train import train

PROMPT = "photo of zwx thing"


@pytest.fixture(scope="module")
def base_flux(tiny_flux):
    from dreamnb.models import load_base_model

    return load_base_model(tiny_flux.folder)


def flux_config(**changes) -> TrainConfig:
    base = TrainConfig.from_preset("object", family="flux1", token="zwx", class_word="thing", resolution=64, seed=0,
                                   with_prior_preservation=False, unet_steps=40, unet_lr=1e-2, checkpoint_every=0,
                                   log_every=5, lora_rank=4, lora_alpha=4)
    return dataclasses.replace(base, **changes)


def photo_latents(session, base) -> torch.Tensor:
    mean, _ = cached_latents(base.vae, sorted(session.instance_dir.glob("*.png")), 64, session.cache_dir, "eval")
    return (mean - base.vae.config.shift_factor) * base.vae.config.scaling_factor


def test_a_flux_folder_is_recognised_and_loaded(base_flux, tiny_flux):
    info = base_flux.info
    assert (info.family, info.prediction_type, info.resolution) == ("flux1", "flow", 1024)
    assert base_flux.family is FLUX1 and type(base_flux.pipeline).__name__ == "FluxPipeline"
    assert list(base_flux.text_encoders) == ["text_encoder", "text_encoder_2"]
    assert type(base_flux.denoiser).__name__ == "FluxTransformer2DModel"
    assert "FLUX.1" in info.describe()
    for keys in (["double_blocks.0.img_attn.qkv.weight"], ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]):
        assert families.from_checkpoint(keys, {}, "flux1-dev.safetensors") is FLUX1


def test_the_presets_train_a_lora_on_the_transformer_only():
    config = TrainConfig.from_preset("face", family="flux1")
    assert (config.method, config.text_encoder_steps, config.unet_lr, config.resolution) == ("lora", 0, 1e-4, 512)
    assert "LoRA on the transformer only" in FLUX1.settings_note(config)


def test_packing_round_trips_in_training_and_for_the_vae(base_flux):
    """A transformer that hands back its packed input gives back the latents (non-square: rows and columns kept apart);
    a pipeline's packed output is the VAE's latents again at the image's size."""
    from types import SimpleNamespace

    from diffusers import FluxPipeline

    class Echo:
        config = SimpleNamespace(guidance_embeds=True)

        def __call__(self, hidden_states, **inputs):
            return (hidden_states,)

    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(FLUX1.predict(Echo(), latents, torch.rand(2), torch.zeros(2, 5, 32), {"pooled": None}), latents)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 8, 6)
    assert torch.equal(FLUX1.latents_for_vae(base_flux.pipeline, packed, 8 * 8, 6 * 8), latents)


def test_prompts_are_encoded_as_fluxs_pipeline_encodes_them(base_flux):
    ids = FLUX1.tokenize(base_flux.tokenizers, [PROMPT, "an oil painting of a dog"])
    assert ids.shape == (2, 77 + 512)
    with torch.no_grad():
        embeds, pooled = FLUX1.prompt_encoder(**base_flux.text_encoders)(ids)
        theirs, their_pooled, _ = base_flux.pipeline.encode_prompt([PROMPT, "an oil painting of a dog"], prompt_2=None)
    assert torch.allclose(embeds, theirs, atol=1e-6) and torch.allclose(pooled, their_pooled, atol=1e-6)


def test_the_loss_is_flow_matchings_velocity_error(base_flux):
    """x_σ = (1 − σ)·z + σ·ε and the target ε − z: a denoiser that returns exactly ε − z has zero loss."""
    schedule = FLUX1.noise_schedule(base_flux.pipeline.scheduler, "cpu")
    sigmas = schedule.draw_timesteps(4096, torch.Generator().manual_seed(0), "cpu")
    assert 0 < sigmas.min() < 0.01 and 0.99 < sigmas.max() <= 1 and abs(sigmas.mean().item() - 0.5) < 0.02
    z, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    noisy, target = schedule.noisy_and_target(z, eps, torch.tensor([0.25, 1.0]))
    assert torch.allclose(noisy[0], 0.75 * z[0] + 0.25 * eps[0]) and torch.allclose(noisy[1], eps[1])
    assert torch.equal(target, eps - z)


def test_a_flux_lora_learns_the_photos_and_diffusers_loads_it(photo_session, base_flux):
    result = train(photo_session, flux_config(), base_flux, progress=False)
    assert result.status == "finished" and result.steps_done == 40, result.message
    saved = load_file(str(result.final_dir / LORA_FILE))
    assert {k.split(".")[0] for k in saved} == {"transformer"}
    assert any(".single_transformer_blocks.0.attn.to_q." in k for k in saved)

    latents = photo_latents(photo_session, base_flux)
    with torch.no_grad():
        before = denoising_error(base_flux.pipeline, latents, PROMPT, timesteps=(250, 500, 750))
        ours = attempt_pipeline(base_flux, photo_session, result.attempt)
        after = denoising_error(ours, latents, PROMPT, timesteps=(250, 500, 750))
    assert after < 0.9 * before, (before, after)  # measured 2.51 -> 2.03: LoRA rank 4 on one double and one single block

    from diffusers import FluxPipeline

    theirs = FluxPipeline.from_pretrained(base_flux.info.source)
    theirs.load_lora_weights(str(result.final_dir), weight_name=LORA_FILE)
    with torch.no_grad():
        assert denoising_error(theirs, latents, PROMPT, timesteps=(250, 500, 750)) == pytest.approx(after, rel=1e-4)


def test_a_full_fine_tune_of_flux_is_refused_in_one_sentence(photo_session, base_flux):
    with pytest.raises(ConfigError, match="FLUX.1 can be trained with the lora method here, not 'full'"):
        train(photo_session, flux_config(method="full"), base_flux, progress=False)


def test_stop_and_resume_with_class_images_and_previews_gives_the_same_weights(photo_session, base_flux):
    """Prior preservation (class images made by FLUX.1's own pipeline), previews and a checkpoint at Stop: the resumed
    run ends with the straight run's LoRA, tensor for tensor."""
    import threading

    config = flux_config(unet_steps=6, log_every=1, lr_scheduler="linear", lr_warmup_steps=1, with_prior_preservation=True,
                         num_class_images=2, sample_every=3, sample_prompts="photo of zwx thing")
    events = []
    straight = train(photo_session, config, base_flux, progress=False, attempt="straight", callback=events.append)
    assert straight.status == "finished", straight.message
    (class_folder,) = photo_session.class_dir.iterdir()
    assert len(list(class_folder.glob("*.png"))) == 2
    previews = [e for e in events if e.kind == "sample"]
    assert [e.step for e in previews] == [3, 6] and previews[0].images[0].size == (64, 64)
    assert previews[0].images[0].tobytes() != previews[1].images[0].tobytes()  # the LoRA moved in between

    stop = threading.Event()
    first = train(photo_session, config, base_flux, progress=False, attempt="resumed", stop=stop,
                  callback=lambda e: stop.set() if e.kind == "step" and e.step == 2 else None)
    assert first.status == "interrupted" and first.steps_done == 2
    second = train(photo_session, None, base_flux, progress=False, attempt="resumed", resume=True)
    assert second.status == "finished" and second.steps_done == 6
    a, b = load_file(str(straight.final_dir / LORA_FILE)), load_file(str(second.final_dir / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)


def test_sampling_a_flux_attempt_uses_its_own_sampler(photo_session, base_flux):
    from dreamnb.sample import SampleSettings, generate

    result = train(photo_session, flux_config(unet_steps=2), base_flux, progress=False)
    pipe = attempt_pipeline(base_flux, photo_session, result.attempt)
    settings = [SampleSettings(PROMPT, seed=s, num_inference_steps=3, width=64, height=64) for s in (1, 1, 2)]
    samples = generate(pipe, settings, progress=False)
    assert [s.settings.scheduler for s in samples] == ["flow-euler"] * 3  # asked for dpm++ (the default), which FLUX.1 lacks
    assert [s.settings.guidance_scale for s in samples] == [3.5] * 3     # the model's own guidance, as its PNGs say
    assert samples[0].image.size == (64, 64)
    assert samples[0].image.tobytes() == samples[1].image.tobytes() != samples[2].image.tobytes()


def test_a_flux_attempt_exported_as_one_file_loads_back_as_the_base_with_its_lora(photo_session, base_flux, tiny_flux, monkeypatch):
    """'safetensors' for FLUX.1 is its transformer in Black Forest Labs' layout (ComfyUI's diffusion model): dreamnb
    loads that file as a base model, with the rest from the tiny model's folder (--model-config), and its transformer
    is the attempt's, the LoRA fused in. diffusers' reader splits single blocks at FLUX.1's real width only, so the tiny
    width's copy of it is put in its place (tests/test_flux_bfl.py)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from dreamnb.export import export_attempt, model_card
    from dreamnb.models import load_base_model
    from test_flux_bfl import reader_for_width

    result = train(photo_session, flux_config(unet_steps=4), base_flux, progress=False)
    out = export_attempt(photo_session, base_flux, result.attempt, "safetensors", photo_session.path / "flux.safetensors", fp16=False)
    monkeypatch.setitem(SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"], "checkpoint_mapping_fn", reader_for_width(32))
    loaded = load_base_model(out, config=tiny_flux.folder)
    assert (loaded.info.family, loaded.info.source_kind) == ("flux1", "single_file")
    attempt = attempt_pipeline(base_flux, photo_session, result.attempt)
    attempt.unload_lora_weights()  # the fused LoRA stays in the weights; its empty adapter layers go, as export does
    theirs, ours = loaded.denoiser.state_dict(), attempt.transformer.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    base_q = base_flux.denoiser.transformer_blocks[0].attn.to_q.weight
    assert not torch.equal(theirs["transformer_blocks.0.attn.to_q.weight"], base_q)  # the LoRA is in there

    card = model_card(photo_session, result.attempt, json.loads((photo_session.attempt_dir(result.attempt) / "config.json").read_text()),
                      "black-forest-labs/FLUX.1-dev", format="safetensors", repo_id="me/flux", weights_file="flux.safetensors",
                      family="flux1")
    assert "FluxTransformer2DModel.from_single_file(path, config=\"black-forest-labs/FLUX.1-dev\"" in card
    assert "guidance_scale=3.5" in card and "torch.bfloat16" in card and "models/diffusion_models/" in card


def test_flux_schnell_without_a_guidance_input_trains_and_diffusers_loads_its_lora(photo_session, tmp_path):
    """FLUX.1 [schnell]'s shape: no guidance embedding (the trainer passes none) and a fixed-shift scheduler."""
    from diffusers import FluxPipeline

    from dreamnb.models import load_base_model
    from dreamnb.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "models", "flux1-schnell").folder
    base = load_base_model(folder)
    assert base.family is FLUX1 and not base.denoiser.config.guidance_embeds
    result = train(photo_session, flux_config(unet_steps=20), base, progress=False)
    assert result.status == "finished", result.message
    latents = photo_latents(photo_session, base)
    with torch.no_grad():
        before = denoising_error(base.pipeline, latents, PROMPT, timesteps=(250, 500, 750))
        after = denoising_error(attempt_pipeline(base, photo_session, result.attempt), latents, PROMPT, timesteps=(250, 500, 750))
        theirs = FluxPipeline.from_pretrained(folder)
        theirs.load_lora_weights(str(result.final_dir), weight_name=LORA_FILE)
        assert denoising_error(theirs, latents, PROMPT, timesteps=(250, 500, 750)) == pytest.approx(after, rel=1e-4)
    assert after < before, (before, after)
