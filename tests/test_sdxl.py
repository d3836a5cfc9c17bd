"""SDXL's foundation: tiny SDXL models load from every source kind, the refiner, SD3 and single FLUX.1 files are refused,
training accepts SDXL (its own tests: test_sdxl_train.py, test_sdxl_export.py), and the token check reads both SDXL
tokenizers."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreamnb.config import TrainConfig
from dreamnb import families
from dreamnb.models import ModelError, Placement, describe_pipeline, load_base_model
from dreamnb.tiny import save_tiny_model
from dreamnb.tokens import check_token
from test_cli import dreamnb
from test_models import _hub_cache, _run, _same_weights

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
REFINER = "the SDXL refiner is not a base model for training"


@pytest.fixture(scope="module")
def base_sdxl(tiny_sdxl):
    return load_base_model(tiny_sdxl.folder)


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("refiner"), "sdxl-refiner", seed=0)


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# --- the tiny model itself -------------------------------------------------------------------------

def test_tiny_sdxl_has_sdxl_shape(base_sdxl):
    unet = base_sdxl.unet.config
    te1, te2 = base_sdxl.text_encoder.config, base_sdxl.pipeline.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert type(base_sdxl.pipeline.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(base_sdxl.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    # One vocabulary, two paddings: CLIP ViT-L pads with <|endoftext|>, OpenCLIP bigG with "!".
    assert base_sdxl.tokenizer.get_vocab() == base_sdxl.pipeline.tokenizer_2.get_vocab()
    assert (base_sdxl.tokenizer.pad_token, base_sdxl.pipeline.tokenizer_2.pad_token) == ("<|endoftext|>", "!")


def test_single_file_has_the_sdxl_key_layout(tiny_sdxl):
    keys = _keys(tiny_sdxl.single_file)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert "conditioner.embedders.1.model.text_projection" in keys
    # the key diffusers' from_single_file recognises an SDXL base file by
    assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the "text_time" embedding
    assert families.from_checkpoint(keys, {}, "tiny.safetensors").key == "sdxl"


# --- loading ---------------------------------------------------------------------------------------

def test_sdxl_folder_loads_as_sdxl(base_sdxl, base_sd1):
    info = base_sdxl.info
    assert (info.source_kind, info.family, info.prediction_type) == ("folder", "sdxl", "epsilon")
    assert info.resolution == 64  # 8x8 latents, as the real 128x128 give 1024 px (below)
    assert type(base_sdxl.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert "Stable Diffusion XL" in info.describe()
    assert list(base_sd1.text_encoders) == ["text_encoder"] and len(base_sd1.tokenizers) == 1
    assert list(base_sdxl.text_encoders) == ["text_encoder", "text_encoder_2"] and len(base_sdxl.tokenizers) == 2


def test_sdxl_single_file_loads_the_same_weights(tiny_sdxl, base_sdxl):
    from_file = load_base_model(tiny_sdxl.single_file, config=tiny_sdxl.folder)
    assert (from_file.info.source_kind, from_file.info.family) == ("single_file", "sdxl")
    for part in SDXL_PARTS:
        assert _same_weights(getattr(base_sdxl.pipeline, part), getattr(from_file.pipeline, part)), part


def test_sdxl_hub_id_loads_from_the_cache_offline(tiny_sdxl, tmp_path):
    cache = _hub_cache(tmp_path / "hub", "dreamnb-test/tiny-sdxl", tiny_sdxl.folder)
    code = ("import json; from dreamnb.models import load_base_model; "
            "m = load_base_model('dreamnb-test/tiny-sdxl'); "
            "print(json.dumps([m.info.source_kind, m.info.family, type(m.pipeline).__name__]))")
    done = _run(code, {"HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["hub", "sdxl", "StableDiffusionXLPipeline"]


def test_real_sdxl_config_is_described_as_1024_px():
    # stabilityai/stable-diffusion-xl-base-1.0's configs, as far as describe_pipeline reads them
    config = SimpleNamespace
    pipe = SimpleNamespace(
        text_encoder=SimpleNamespace(config=config(hidden_act="quick_gelu")),
        text_encoder_2=SimpleNamespace(config=config(hidden_act="gelu")),
        unet=SimpleNamespace(config=config(addition_embed_type="text_time", use_linear_projection=True, sample_size=128)),
        vae=SimpleNamespace(config=config(block_out_channels=[128, 256, 512, 512])),
        scheduler=SimpleNamespace(config={"prediction_type": "epsilon"}),
    )
    info = describe_pipeline(pipe, "stabilityai/stable-diffusion-xl-base-1.0", "hub", families.get("sdxl"))
    assert (info.family, info.resolution) == ("sdxl", 1024)


def test_sdxl_vae_stays_fp32_in_fp16_unless_it_is_the_fp16_fix(tiny_sdxl, tmp_path):
    fp16 = Placement(torch.device("cpu"), torch.float16)
    model = load_base_model(tiny_sdxl.folder, placement=fp16)
    assert (model.unet.dtype, model.pipeline.text_encoder_2.dtype, model.vae.dtype) == (torch.float16, torch.float16, torch.float32)
    fixed = shutil.copytree(tiny_sdxl.folder, tmp_path / "fp16-fix")
    config_path = fixed / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "force_upcast": False}))
    assert load_base_model(fixed, placement=fp16).vae.dtype == torch.float16


# --- refused ---------------------------------------------------------------------------------------

def test_refiner_folder_and_file_are_refused(tiny_refiner):
    for source in (tiny_refiner.folder, tiny_refiner.single_file):
        with pytest.raises(ModelError, match=REFINER) as err:
            load_base_model(source)
        assert "\n" not in str(err.value)
    assert any(k.startswith("conditioner.embedders.0.model.") for k in _keys(tiny_refiner.single_file))


def test_sdxl_folder_without_second_text_encoder_is_refused(tiny_sdxl, tmp_path):
    folder = shutil.copytree(tiny_sdxl.folder, tmp_path / "xl")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelError, match="lacks the text_encoder_2 part.* of a Stable Diffusion XL model"):
        load_base_model(folder)


UNET = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("keys, message", [
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_l.x"], "is a Stable Diffusion 3 checkpoint"),
    (["conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight", UNET], REFINER),
])
def test_sd3_and_refiner_keys_are_refused(tmp_path, keys, message):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(ModelError, match=message) as err:
        load_base_model(path)
    assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)


# --- training works (tests/test_sdxl_train.py); the front door takes an SDXL model given as a folder -------------

def test_train_accepts_sdxl_given_as_a_folder(photo_session, tiny_sdxl):
    from dreamnb.train import train

    config = TrainConfig.from_preset("face", family="sdxl", token="ohwx", class_word="person", resolution=64, unet_steps=1,
                                     with_prior_preservation=False)
    result = train(photo_session, config, tiny_sdxl.folder, progress=False)
    assert result.status == "finished", result.message
    assert (result.final_dir / "pytorch_lora_weights.safetensors").is_file()


# --- token check with both tokenizers ----------------------------------------------------------------

def test_token_check_reads_both_sdxl_tokenizers(base_sdxl):
    good = check_token("ohwx", base_sdxl.tokenizer, base_sdxl.text_encoder, tokenizer_2=base_sdxl.pipeline.tokenizer_2)
    assert good.verdict == "good" and any("share this vocabulary" in reason for reason in good.reasons)
    generic = check_token("Sid Shanker", base_sdxl.tokenizer, tokenizer_2=base_sdxl.pipeline.tokenizer_2)
    assert generic.verdict == "generic" and generic.suggestions


class _CharacterTokenizer:
    """A tokenizer with another vocabulary that splits every word into single characters (all common)."""

    def __init__(self, real):
        self.real = real
        self.all_special_ids = real.all_special_ids

    def get_vocab(self):
        return {**self.real.get_vocab(), "<|extra|>": 49408}

    def tokenize(self, text):
        return [c + "</w>" if i == len(word) - 1 else c for word in text.lower().split() for i, c in enumerate(word)]

    def convert_tokens_to_ids(self, tokens):
        return self.real.convert_tokens_to_ids(tokens)

    def convert_tokens_to_string(self, tokens):
        return self.real.convert_tokens_to_string(tokens)


def test_token_check_keeps_the_worse_verdict_when_vocabularies_differ(base_sdxl):
    other = _CharacterTokenizer(base_sdxl.tokenizer)
    report = check_token("ohwx", base_sdxl.tokenizer, tokenizer_2=other)
    assert report.verdict == "generic" and report.n_tokens == 4
    assert report.reasons[0].startswith("With SDXL's second tokenizer")
    assert report.suggestions == []  # every rare single token of the first is four characters to the second
    assert check_token("ohwx", base_sdxl.tokenizer).verdict == "good"


def test_cli_check_token_with_an_sdxl_model(tiny_sdxl):
    done = dreamnb("check-token", "ohwx", "--model", tiny_sdxl.folder, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verdict"] == "good"
