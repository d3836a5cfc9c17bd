"""SDXL attempts are sampled, compared and exported through the same functions as SD 1.x, and what is exported
loads in diffusers' own from_pretrained, from_single_file and load_lora_weights exactly as dreamnb samples it.

The attempts are built here in the layout training writes (config.json, final/, checkpoints/step-N/), from the tiny
SDXL model with random adapters or weights: these tests are about loading and exporting, not learning."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamnb.attempts import attempt_pipeline, comparison_grid, denoising_error
from dreamnb.families.sdxl import SDXL

TRAINED_PARTS = SDXL.trained_parts
lora_targets = SDXL.lora_targets
from dreamnb.config import TrainConfig
from dreamnb.export import export_attempt, model_card
from dreamnb.models import Placement, load_base_model
from dreamnb.sample import SampleSettings, generate
from dreamnb.session import FINAL, LORA_FILE, add_attempt, create_session, update_attempt
from dreamnb.train import add_lora

RANK, ALPHA = 4, 8  # alpha ≠ rank, so a loader that assumed alpha = rank would scale the LoRA wrongly
PROMPT = "photo of ohwx person"
STEP = 2  # the checkpoint of the LoRA attempt


@pytest.fixture(scope="module")
def base_sdxl(tiny_sdxl):
    return load_base_model(tiny_sdxl.folder)


# --- attempts in training's layout -------------------------------------------------------------------

def _config(method: str) -> dict:
    return TrainConfig.from_preset("face", method, token="ohwx", class_word="person", resolution=64, unet_steps=3,
                                   text_encoder_steps=1, lora_rank=RANK, lora_alpha=ALPHA).to_dict()


def _finish(session, name: str, config: dict, steps: int = 4) -> str:
    add_attempt(session, name)
    (session.attempt_dir(name) / "config.json").write_text(json.dumps(config))
    update_attempt(session, name, status="finished", steps_done=steps)
    return name


def _lora_parts(base, scale: float, seed: int) -> dict:
    """Copies of the UNet and both text encoders with peft adapters whose up (B) weights are random, not zero."""
    generator = torch.Generator().manual_seed(seed)
    parts = {}
    for part in TRAINED_PARTS:
        model = copy.deepcopy(getattr(base.pipeline, part))
        add_lora(model, RANK, ALPHA, lora_targets(part))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * scale
        parts[part] = model
    return parts


def _peft_state(model) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _save_lora_final(folder, parts) -> None:
    """As training's save_final: diffusers' names, with the adapters' rank and alpha in the metadata."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    StableDiffusionXLPipeline.save_lora_weights(
        folder, safe_serialization=True,
        **{f"{part}_lora_layers": convert_state_dict_to_diffusers(_peft_state(model)) for part, model in parts.items()},
        **{f"{part}_lora_adapter_metadata": LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=lora_targets(part)).to_dict()
           for part in parts},
    )


def _save_checkpoint(folder, parts) -> None:
    """As training's save_checkpoint: `unet.*`, `text_encoder.*`, `text_encoder_2.*` in peft's names."""
    folder.mkdir(parents=True)
    weights = {f"{part}.{k}": v.contiguous() for part, model in parts.items() for k, v in _peft_state(model).items()}
    save_file(weights, str(folder / "weights.safetensors"))
    (folder / "state.json").write_text(json.dumps({"phase": "unet", "phase_step": STEP, "global_step": STEP}))


@pytest.fixture(scope="module")
def sdxl_session(tmp_path_factory, base_sdxl):
    """A session with a LoRA attempt (final/ and a checkpoint) and a full fine-tune, both changing all three parts."""
    session = create_session(tmp_path_factory.mktemp("sdxl-export") / "session", base_model=base_sdxl.info.source)
    lora = _finish(session, "lora", _config("lora"))
    _save_lora_final(session.attempt_dir(lora) / FINAL, _lora_parts(base_sdxl, 0.05, seed=1))
    _save_checkpoint(session.attempt_dir(lora) / "checkpoints" / f"step-{STEP:06d}", _lora_parts(base_sdxl, 0.05, seed=2))

    full = _finish(session, "full", _config("full"))
    generator = torch.Generator().manual_seed(3)
    for part in TRAINED_PARTS:
        model = copy.deepcopy(getattr(base_sdxl.pipeline, part))
        for param in model.parameters():
            param.data += torch.randn(param.shape, generator=generator) * 1e-2
        model.save_pretrained(session.attempt_dir(full) / FINAL / part, safe_serialization=True)
    return session


@torch.no_grad()
def unet_output(pipe) -> torch.Tensor:
    """One UNet prediction on fixed latents under PROMPT: the text encoders (through the pooled embedding and the
    hidden states) and the UNet at work."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, extra = SDXL.text_inputs(pipe, PROMPT, latents)
    return pipe.unet(latents, torch.tensor([500]), embeds, added_cond_kwargs=extra).sample


def fresh_pipeline(base):
    """A StableDiffusionXLPipeline as a diffusers user builds it, with its own copies of the parts a LoRA changes."""
    from diffusers import StableDiffusionXLPipeline

    components = dict(base.pipeline.components)
    for part in TRAINED_PARTS:
        components[part] = copy.deepcopy(components[part])
    return StableDiffusionXLPipeline(**components)


def settings(seed: int = 1, **changes) -> SampleSettings:
    return SampleSettings(prompt=PROMPT, seed=seed, num_inference_steps=2, **changes)


def pixels(samples) -> list[torch.Tensor]:
    import numpy as np

    return [torch.from_numpy(np.asarray(s.image, dtype=np.float32)) for s in samples]


# --- sampling and comparing --------------------------------------------------------------------------

def test_lora_attempt_samples_differently_from_the_base_and_the_same_twice(sdxl_session, base_sdxl):
    pipe = attempt_pipeline(base_sdxl, sdxl_session, "lora")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet is not base_sdxl.unet and pipe.text_encoder_2 is not base_sdxl.pipeline.text_encoder_2
    assert pipe.vae is base_sdxl.vae  # what the attempt did not change is shared
    first, again = (pixels(generate(pipe, [settings(1), settings(2)], progress=False)) for _ in range(2))
    alone = pixels(generate(pipe, [settings(2)], progress=False))
    base = pixels(generate(base_sdxl.pipeline, [settings(1)], progress=False))
    assert first[0].shape == (64, 64, 3)  # the model's native size (the real SDXL's: 1024)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert (alone[0] - first[1]).abs().max() <= 1  # alone or in a batch: the same image (up to the CPU's rounding)
    assert (first[0] - base[0]).abs().max() > 10  # 0-255 pixels
    assert (first[0] - first[1]).abs().max() > 10  # another seed, another image
    # the base model's own objects are untouched by loading the attempt
    assert torch.equal(unet_output(base_sdxl.pipeline), unet_output(fresh_pipeline(base_sdxl)))


def test_compiled_sdxl_sampling_feeds_the_added_conditioning_through(base_sdxl, monkeypatch):
    """SDXL's pooled prompt and size/crop numbers go through the fast path's own forward (compiled here with a light
    backend; on a GPU the same inputs are the CUDA graph's), not the plain fallback: same images, one compiled graph."""
    from torch._dynamo.utils import counters

    from dreamnb import fast

    pipe = fresh_pipeline(base_sdxl)
    batch = [settings(seed=1), settings(seed=2, negative_prompt="blurry")]
    plain = pixels(generate(pipe, batch, progress=False))
    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = pixels(generate(pipe, batch, progress=False, compile_unet=True))
    assert isinstance(pipe.unet.forward, fast.FastUNetForward) and not pipe.unet.forward.compile_failed
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(plain, compiled):
        assert (a - b).abs().max() <= 1


def test_negative_prompt_changes_an_sdxl_image(base_sdxl):
    plain, negative = generate(base_sdxl.pipeline, [settings(1), settings(1, negative_prompt="blurry")], progress=False)
    assert negative.settings.negative_prompt == "blurry"
    assert (pixels([plain])[0] - pixels([negative])[0]).abs().max() > 0


@pytest.mark.parametrize("scheduler", ["dpm++-karras", "euler-a"])
def test_sdxl_samples_with_other_schedulers(base_sdxl, scheduler):
    [sample] = generate(base_sdxl.pipeline, [settings(1, scheduler=scheduler)], progress=False)
    assert sample.image.size == (64, 64) and sample.settings.scheduler == scheduler


def test_fp16_sdxl_decodes_with_its_fp32_vae(tiny_sdxl):
    """The VAE stays fp32 under an fp16 UNet; diffusers' SDXL pipeline would hand it fp16 latents (off Apple's MPS)."""
    model = load_base_model(tiny_sdxl.folder, placement=Placement(torch.device("cpu"), torch.float16))
    assert (model.unet.dtype, model.vae.dtype) == (torch.float16, torch.float32)
    [sample] = generate(model.pipeline, [settings(1)], progress=False)
    assert pixels([sample])[0].std() > 0


def test_comparison_grid_of_base_attempt_and_checkpoint(sdxl_session, base_sdxl):
    names = ["base", "lora", f"lora@{STEP}"]
    result = comparison_grid(sdxl_session, base_sdxl, names, prompts=["a photo of {token} {class}"], seeds=[1],
                             num_inference_steps=2)
    images = {name: pixels(result.samples[name])[0] for name in names}
    assert result.prompts == ["a photo of ohwx person"] and result.grid.size[0] > 3 * 64
    assert (images["lora"] - images["base"]).abs().max() > 10
    assert (images[f"lora@{STEP}"] - images["base"]).abs().max() > 10
    assert (images[f"lora@{STEP}"] - images["lora"]).abs().max() > 10  # the checkpoint's own adapters


def test_denoising_error_measures_sdxl_attempts(sdxl_session, base_sdxl):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    base_error = denoising_error(base_sdxl.pipeline, latents, PROMPT)
    lora_error = denoising_error(attempt_pipeline(base_sdxl, sdxl_session, "lora"), latents, PROMPT)
    assert base_error == denoising_error(base_sdxl.pipeline, latents, PROMPT)
    assert torch.isfinite(torch.tensor([base_error, lora_error])).all() and base_error != lora_error


# --- LoRA exports ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["lora", f"lora@{STEP}"])
def test_diffusers_lora_loads_in_a_fresh_sdxl_pipeline_as_dreamnb_samples_it(sdxl_session, base_sdxl, tmp_path, ref):
    out = export_attempt(sdxl_session, base_sdxl, ref, "lora-diffusers", tmp_path / "lora.safetensors")
    with safe_open(str(out), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert {k.split(".")[0] for k in keys} == set(TRAINED_PARTS)
    assert metadata["attempt"] == ref and metadata["base_model_family"] == "Stable Diffusion XL"
    adapters = json.loads(metadata["lora_adapter_metadata"])  # diffusers' own, kept: loaders scale by alpha / rank
    assert {adapters[f"{part}.lora_alpha"] for part in TRAINED_PARTS} == {ALPHA}
    if ref == "lora":  # final/'s file as it is
        assert all(torch.equal(v, load_file(str(out))[k]) for k, v in load_file(str(sdxl_session.attempt_dir("lora") / FINAL / LORA_FILE)).items())

    fresh = fresh_pipeline(base_sdxl)
    fresh.load_lora_weights(str(out))
    fresh.fuse_lora()
    expected = unet_output(attempt_pipeline(base_sdxl, sdxl_session, ref))
    assert (expected - unet_output(base_sdxl.pipeline)).abs().max() > 1e-2  # the LoRA changes the output...
    torch.testing.assert_close(unet_output(fresh), expected, rtol=0, atol=1e-5)  # ...and the export the same way


def test_kohya_lora_names_alphas_and_diffusers_kohya_loader(sdxl_session, base_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    out = export_attempt(sdxl_session, base_sdxl, "lora", "lora", tmp_path / "kohya.safetensors")
    weights = load_file(str(out))
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in weights)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in weights)
    names = {k.split(".")[0] for k in weights}
    # the names A1111 and ComfyUI match: the text encoders' always with `text_model`
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_9_self_attn_out_proj",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"} <= names
    assert {weights[f"{n}.alpha"].item() for n in names} == {float(ALPHA)}
    assert len(names) == len(load_file(str(sdxl_session.attempt_dir("lora") / FINAL / LORA_FILE))) // 2
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"

    # diffusers' kohya loader turns every name back into a Linear layer of the model...
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(out))
    assert len(state) == len(weights) - len(names) and set(alphas.values()) == {float(ALPHA)}
    for part in TRAINED_PARTS:
        to_peft = convert_unet_state_dict_to_peft if part == "unet" else convert_state_dict_to_peft
        adapters = to_peft({k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")})
        model = getattr(base_sdxl.pipeline, part)
        modules = {key.rsplit(".lora_", 1)[0] for key in adapters}
        assert len(modules) == len([n for n in names if n.startswith({"unet": "lora_unet_", "text_encoder": "lora_te1_"}.get(part, "lora_te2_"))])
        for module in modules:  # transformers >= 5.6's CLIPTextModel has no `text_model` level
            module = module if hasattr(model, "text_model") else module.removeprefix("text_model.")
            assert isinstance(model.get_submodule(module), torch.nn.Linear), (part, module)
    # ...and loading it reproduces the attempt, alpha included
    fresh = fresh_pipeline(base_sdxl)
    fresh.load_lora_weights(str(out))
    torch.testing.assert_close(unet_output(fresh), unet_output(attempt_pipeline(base_sdxl, sdxl_session, "lora")), rtol=0, atol=1e-5)


# --- full fine-tune exports --------------------------------------------------------------------------

def test_single_file_of_a_full_fine_tune_loads_with_from_single_file(sdxl_session, base_sdxl, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = export_attempt(sdxl_session, base_sdxl, "full", "safetensors", tmp_path / "full.safetensors", fp16=False)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert "conditioner.embedders.1.model.text_projection" in keys and "model.diffusion_model.label_emb.0.0.weight" in keys
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl.folder), local_files_only=True)
    expected = attempt_pipeline(base_sdxl, sdxl_session, "full")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(expected, part).state_dict(), getattr(loaded, part).state_dict()
        assert theirs.keys() == ours.keys(), part
        assert all(torch.equal(theirs[k], v) for k, v in ours.items()), part
    assert not torch.equal(loaded.text_encoder_2.text_projection.weight, base_sdxl.pipeline.text_encoder_2.text_projection.weight)


def test_diffusers_folder_of_a_full_fine_tune_loads_with_from_pretrained(sdxl_session, base_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = export_attempt(sdxl_session, base_sdxl, "full", "diffusers", tmp_path / "model")
    loaded = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    expected = attempt_pipeline(base_sdxl, sdxl_session, "full")
    for part in TRAINED_PARTS:
        assert all(torch.equal(loaded.__getattribute__(part).state_dict()[k], v) for k, v in getattr(expected, part).state_dict().items()), part
    torch.testing.assert_close(unet_output(loaded), unet_output(expected), rtol=0, atol=0)


def test_model_card_of_an_sdxl_lora_uses_the_sdxl_pipeline(sdxl_session):
    card = model_card(sdxl_session, "lora", _config("lora"), "stabilityai/stable-diffusion-xl-base-1.0",
                      format="lora", weights_file="me-lora.safetensors", family="sdxl")
    assert "StableDiffusionXLPipeline.from_pretrained(\"stabilityai/stable-diffusion-xl-base-1.0\"" in card
    assert "Stable Diffusion XL taught" in card and "stable-diffusion-xl" in card and "StableDiffusionPipeline" not in card
