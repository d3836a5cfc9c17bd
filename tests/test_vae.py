"""Another VAE instead of the model's own (issue 18: SDXL's fp16-fix VAE): it replaces the model's VAE in the placement's
dtype and the force_upcast rule still decides fp32 vs fp16, from every source kind; one that does not fit is one
sentence; the latent cache and the attempt record follow it; the CLI and the model section pass it on."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dreamnb.ui as ui
from dreamnb.config import ConfigError, TrainConfig
from dreamnb.convert import vae_to_ldm
from dreamnb.export import model_card
from dreamnb.models import DEFAULT_MODEL, SDXL_MODEL, ModelError, ModelInfo, Placement, load_base_model
from dreamnb.session import open_session
from dreamnb.train import continue_config, train
from conftest import other_vae
from test_cli import dreamnb
from test_models import _hub_cache, _run, _same_weights

FP16 = Placement(torch.device("cpu"), torch.float16)


@pytest.fixture(scope="module")
def fp16_fix(tiny_sdxl, tmp_path_factory):
    """The tiny SDXL's fp16-fix: its VAE's shape and scale, other weights, force_upcast=False."""
    return other_vae(tiny_sdxl.folder, tmp_path_factory.mktemp("vae") / "fp16-fix", force_upcast=False)


@pytest.fixture(scope="module")
def sd1_vae(tiny_sd1, tmp_path_factory):
    return other_vae(tiny_sd1.folder, tmp_path_factory.mktemp("vae") / "sd1-vae")


def plain(widget) -> str:
    return re.sub(r"<[^>]+>", "", widget.value)


# --- loading ---------------------------------------------------------------------------------------

def test_the_fp16_fix_vae_replaces_sdxls_own_and_stays_in_fp16(tiny_sdxl, fp16_fix):
    from diffusers import AutoencoderKL

    own = load_base_model(tiny_sdxl.folder, placement=FP16)
    fixed = load_base_model(tiny_sdxl.folder, placement=FP16, vae=fp16_fix)
    assert own.vae.dtype == torch.float32 and fixed.vae.dtype == torch.float16  # the force_upcast rule decides
    assert fixed.unet.dtype == torch.float16 and fixed.pipeline.vae is fixed.vae
    assert _same_weights(AutoencoderKL.from_pretrained(fp16_fix).half(), fixed.vae)
    assert not _same_weights(own.vae, fixed.vae)
    assert fixed.info.vae == str(fp16_fix) and own.info.vae is None
    assert f"VAE {fp16_fix}" in fixed.info.describe() and "VAE" not in own.info.describe()


def test_a_single_file_vae_loads_with_the_models_own_vae_settings(tiny_sdxl, fp16_fix, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(fp16_fix)
    file = tmp_path / "sdxl_vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}, str(file))  # A1111's layout
    model = load_base_model(tiny_sdxl.folder, placement=FP16, vae=file)
    assert _same_weights(vae.half(), model.vae) and model.info.vae == str(file)
    # a file cannot say it is fp16-safe, so it is kept in fp32 as SDXL's own VAE is
    assert model.vae.dtype == torch.float32 and model.vae.config.force_upcast


def test_a_hub_vae_loads_from_the_cache_offline(tiny_sdxl, fp16_fix, tmp_path):
    cache = _hub_cache(tmp_path / "hub", "dreamnb-test/tiny-vae-fp16-fix", fp16_fix)
    code = (f"import json; from dreamnb.models import load_base_model; "
            f"m = load_base_model({str(tiny_sdxl.folder)!r}, vae='dreamnb-test/tiny-vae-fp16-fix'); "
            "print(json.dumps([m.info.vae, m.vae.config.force_upcast]))")
    done = _run(code, {"HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["dreamnb-test/tiny-vae-fp16-fix", False]


def test_a_vae_that_does_not_fit_or_is_not_a_vae_is_one_sentence(tiny_sdxl, tmp_path):
    cases = {
        other_vae(tiny_sdxl.folder, tmp_path / "8ch", latent_channels=8): "makes latents of 8 channels but .* UNet takes 4",
        other_vae(tiny_sdxl.folder, tmp_path / "sd1-scale", scaling_factor=0.18215): "scales its latents by 0.18215",
        other_vae(tiny_sdxl.folder, tmp_path / "2x", block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2): "2x smaller than the image but .* own 8x",
        tiny_sdxl.folder: "not a diffusers VAE \\(it has no config.json\\)",
        tiny_sdxl.folder / "unet": "is a UNet2DConditionModel, not a VAE",
        tmp_path / "missing": "There is no file or folder at",
        "dreamnb-test/not-cached": "Cannot download dreamnb-test/not-cached .* not in the local cache",
    }
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "unet.safetensors"))
    cases[tmp_path / "unet.safetensors"] = "holds no VAE weights"
    for vae, message in cases.items():
        with pytest.raises(ModelError, match=message) as err:
            load_base_model(tiny_sdxl.folder, vae=vae, local_files_only=True)
        text = str(err.value)
        assert "\n" not in text and text.endswith("."), text
        if "latents" in message:  # what to give instead
            assert text.endswith("give a VAE made for Stable Diffusion XL such as madebyollin/sdxl-vae-fp16-fix, or none to keep the model's own."), text


# --- training --------------------------------------------------------------------------------------

def test_the_latent_cache_key_follows_the_vae_and_keeps_the_old_key_without_one():
    info = ModelInfo(source="m/x", source_kind="hub", family="sdxl", prediction_type="epsilon", resolution=1024)
    assert info.cache_key == "m/x|sdxl|epsilon"  # latents cached before a VAE could be chosen stay valid
    with_vae = ModelInfo(**{**info.__dict__, "vae": "madebyollin/sdxl-vae-fp16-fix"})
    assert with_vae.cache_key != info.cache_key and "madebyollin/sdxl-vae-fp16-fix" in with_vae.cache_key


def test_an_attempt_trains_on_its_vaes_latents_and_is_continued_only_with_it(photo_session, tiny_sd1, base_sd1, sd1_vae):
    from dreamnb import data

    config = TrainConfig.from_preset("object", token="zwx", class_word="thing", resolution=64, with_prior_preservation=False,
                                     unet_steps=2, text_encoder_steps=0, checkpoint_every=0, seed=0)
    assert train(photo_session, config, base_sd1, progress=False).status == "finished"
    with_vae = load_base_model(tiny_sd1.folder, vae=sd1_vae)
    assert train(photo_session, config, with_vae, progress=False).status == "finished"
    session = open_session(photo_session.path)
    assert [(a.base_model, a.vae) for a in session.attempts] == [(str(tiny_sd1.folder), None), (str(tiny_sd1.folder), str(sd1_vae))]

    cached = sorted(session.cache_dir.glob("latents-*.safetensors"))
    assert len(cached) == 2  # one per VAE: the second attempt did not reuse the first one's latents
    paths = [e.path for e in data.list_examples(session.instance_dir)]
    flip = config.random_flip
    mean, _ = data.cached_latents(with_vae.vae, paths, 64, session.cache_dir, with_vae.info.cache_key, flip=flip)
    own_mean, _ = data.cached_latents(base_sd1.vae, paths, 64, session.cache_dir, base_sd1.info.cache_key, flip=flip)
    assert len(list(session.cache_dir.glob("latents-*.safetensors"))) == 2 and not torch.allclose(mean, own_mean)

    more = continue_config(session, "attempt-2")
    with pytest.raises(ConfigError, match="was trained with the VAE .*sd1-vae, not the model's own VAE; continue it with that VAE"):
        train(session, more, base_sd1, progress=False)
    assert train(session, more, str(tiny_sd1.folder), vae=str(sd1_vae), progress=False).status == "finished"
    assert open_session(photo_session.path).attempts[-1].vae == str(sd1_vae)


# --- the front doors -------------------------------------------------------------------------------

def test_cli_vae_reaches_the_model_and_later_commands_use_the_attempts(tmp_path, photo_session, tiny_sd1, sd1_vae):
    session = photo_session.path
    done = dreamnb("train", "--session", session, "--model", tiny_sd1.folder, "--vae", sd1_vae, "--token", "zwx",
                   "--class-word", "thing", "--preset", "object", "--no-prior", "--unet-steps", "2", "--te-steps", "0",
                   "--resolution", "64", "--json")
    assert done.returncode == 0, done.stderr
    assert open_session(session).attempts[0].vae == str(sd1_vae)

    # sample: no --vae, so the attempt's own (the load is logged with -v)
    done = dreamnb("-v", "sample", "--session", session, "--prompt", "zwx", "--seed", "1", "--steps", "2", "--out", tmp_path / "s.png")
    assert done.returncode == 0, done.stderr
    assert f"VAE {sd1_vae})" in done.stderr

    # export: the file says which VAE the attempt was trained with, and so does a model card
    done = dreamnb("export", "--session", session, "--format", "safetensors", "--out", tmp_path / "me.safetensors")
    assert done.returncode == 0, done.stderr
    with safe_open(str(tmp_path / "me.safetensors"), "pt") as exported:
        assert exported.metadata()["vae"] == sd1_vae.name  # named, never by its local path
    config = json.loads((session / "attempts" / "attempt-1" / "config.json").read_text())
    card = model_card(open_session(session), "attempt-1", config, str(tiny_sd1.folder), vae=str(sd1_vae))
    assert f"- VAE: `{sd1_vae.name}`" in card and str(sd1_vae) not in card and "VAE" not in model_card(open_session(session), "attempt-1", config, str(tiny_sd1.folder))

    done = dreamnb("train", "--session", session, "--from", "attempt-1", "--vae", tiny_sd1.folder / "vae", "--unet-steps", "1")
    assert done.returncode == 2 and "was trained with the VAE" in done.stderr and "Traceback" not in done.stderr

    done = dreamnb("train", "--session", session, "--model", tiny_sd1.folder, "--vae", tiny_sd1.folder, "--token", "zwx")
    assert done.returncode == 2 and "not a diffusers VAE" in done.stderr and done.stderr.count("\n") == 1


def test_model_section_offers_a_vae_for_sdxl_and_passes_it_on(tiny_sdxl, fp16_fix):
    view = ui.ModelView(DEFAULT_MODEL)
    assert view.vae_row.layout.display == "none"  # SD 1.5: no VAE to choose
    view.vae_text.value = str(fp16_fix)
    assert view.vae is None  # not shown, not used
    view.choice.value = SDXL_MODEL
    assert view.vae_row.layout.display == "" and view.vae == str(fp16_fix)
    assert "fp16" in plain(view.vae_row.children[-1]) and "madebyollin/sdxl-vae-fp16-fix" in plain(view.vae_row.children[-1])

    view = ui.ModelView(str(tiny_sdxl.folder), vae=str(fp16_fix), loader=load_base_model)  # a typed model may be SDXL
    base = view.load(raise_errors=True)
    assert base.info.vae == str(fp16_fix) and "VAE" in view.status_text
    view.vae_text.value = " "
    assert view.load(raise_errors=True).info.vae is None
