"""The single-file export is checked as a real client reads it: diffusers' own `from_single_file`
must rebuild every weight exactly, and on the real SD 1.5 / 2.1 shapes (built on the meta device,
no weights) the keys must be the well-known original names that A1111/ComfyUI expect."""
from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from dreamnb.convert import (
    ConversionError,
    save_single_file,
    text_encoder_layout,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from dreamnb.tiny import tiny_pipeline

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module", params=["sd1", "sd2-v"])
def tiny(request, tmp_path_factory):
    """(kind, pipeline, diffusers folder with the same pipeline), built once per kind."""
    kind = request.param
    pipe = tiny_pipeline(kind, seed=0)
    folder = tmp_path_factory.mktemp(kind) / "diffusers"
    pipe.save_pretrained(folder, safe_serialization=True)
    return kind, pipe, folder


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diffusers_from_single_file_rebuilds_every_weight(tiny, tmp_path, dtype):
    kind, pipe, folder = tiny
    path = save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "model.safetensors", dtype=dtype)

    # diffusers' logger does not propagate, so listen on it directly: an unused or missing weight
    # is only a warning there, and must not pass silently here.
    # (conftest sets DIFFUSERS_VERBOSITY=error, so lower the level for this call.)
    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")
    old_level = diffusers_logger.level
    diffusers_logger.addHandler(records)
    diffusers_logger.setLevel(logging.WARNING)
    try:
        with torch.no_grad():
            loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    finally:
        diffusers_logger.setLevel(old_level)
        diffusers_logger.removeHandler(records)
    assert not [m for m in records.messages if "not used" in m or "missing" in m.lower()], records.messages

    for name in COMPONENTS:
        original = getattr(pipe, name).state_dict()
        rebuilt = getattr(loaded, name).state_dict()
        assert list(rebuilt) == list(original), f"{kind} {name}: keys differ: {set(rebuilt) ^ set(original)}"
        for key, value in original.items():
            expected = value.to(dtype).float()  # fp16 file: the fp16-rounded original
            assert rebuilt[key].device.type == "cpu", f"{kind} {name}.{key} was never loaded"
            assert torch.equal(rebuilt[key].float(), expected), f"{kind} {name}.{key} differs"


def test_file_layout_matches_what_loaders_detect(tiny, tmp_path):
    kind, pipe, _ = tiny
    path = tmp_path / "m.safetensors"
    save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, path, metadata={"dreamnb": kind})
    state = load_file(path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["dreamnb"] == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp file left behind
    assert all(t.dtype == torch.float16 for t in state.values())
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}

    layers = pipe.text_encoder.config.num_hidden_layers
    hidden = pipe.text_encoder.config.hidden_size
    te_keys = len(pipe.text_encoder.state_dict())
    if kind == "sd2-v":
        assert text_encoder_layout(pipe.text_encoder) == "open_clip"
        assert "cond_stage_model.model.token_embedding.weight" in state  # diffusers' OpenCLIP detection key
        fused = state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert fused.shape == (3 * hidden, hidden)
        assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
        te_keys -= 4 * layers  # q/k/v weights and biases (6 keys) fused into 2 per layer
    else:
        assert text_encoder_layout(pipe.text_encoder) == "clip"
        assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    # Every model weight is in the file once, and nothing else is (diffusers drops unknown
    # text-encoder keys without a warning, so the round-trip test alone would not notice them).
    assert len(state) == len(pipe.unet.state_dict()) + len(pipe.vae.state_dict()) + te_keys


# --- real SD shapes, on the meta device (no memory, no weights) --------------------------------

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("config, model_type", [(SD15_UNET, "v1"), (SD21_UNET, "v2")])
def test_real_unet_keys(config, model_type):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    p = "model.diffusion_model."
    assert len(ldm) == 686  # the SD 1.x/2.x release checkpoints hold 686 UNet tensors
    for key in [
        "time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.3.0.op.weight", "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
        "output_blocks.11.0.skip_connection.weight", "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
    ]:
        assert p + key in ldm, key
    # SD 1.x projections are 1x1 convs, SD 2.x ones linear, in both layouts alike.
    assert ldm[p + "input_blocks.1.1.proj_in.weight"].ndim == (2 if model_type == "v2" else 4)
    # diffusers recognises the version from these keys and maps them back to exactly the model's weights.
    assert infer_diffusers_model_type(ldm) == model_type
    assert _shapes(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == _shapes(unet.state_dict())


def test_real_vae_keys():
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    ldm = vae_to_ldm(vae.state_dict(), vae.config)
    p = "first_stage_model."
    assert len(ldm) == 248
    assert ldm[p + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm[p + "decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert ldm[p + "decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)  # up.0 is the top level
    assert p + "decoder.up.3.upsample.conv.weight" in ldm and p + "decoder.up.0.upsample.conv.weight" not in ldm
    assert p + "encoder.down.2.downsample.conv.weight" in ldm and p + "encoder.norm_out.weight" in ldm
    assert _shapes(convert_ldm_vae_checkpoint(ldm, dict(vae.config))) == _shapes(vae.state_dict())


@pytest.mark.parametrize(
    "kind, hidden, layers, act, count",
    [
        ("clip", 768, 12, "quick_gelu", 196),  # SD 1.x ViT-L/14 (the release also stores position_ids)
        ("open_clip", 1024, 23, "gelu", 23 * 12 + 4),  # SD 2.x ViT-H/14 as diffusers holds it (24th layer unused)
    ],
)
def test_real_text_encoder_keys(kind, hidden, layers, act, count):
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                            num_hidden_layers=layers, hidden_act=act)
    with torch.device("meta"):
        te = CLIPTextModel(config)
    assert text_encoder_layout(te) == kind
    ldm = text_encoder_to_ldm(te.state_dict(), te.config, kind)
    assert len(ldm) == count
    if kind == "clip":
        assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in ldm
    else:
        block = "cond_stage_model.model.transformer.resblocks.22."
        assert ldm[block + "attn.in_proj_weight"].shape == (3 * hidden, hidden)
        assert ldm[block + "mlp.c_fc.weight"].shape == (4 * hidden, hidden)
        assert ldm["cond_stage_model.model.positional_embedding"].shape == (77, hidden)


# --- errors ------------------------------------------------------------------------------------

def test_unknown_unet_weights_are_an_error_not_dropped():
    state = {"conv_in.weight": torch.zeros(1), "lora_adapter.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="lora_adapter.weight"):
        unet_to_ldm(state, {"layers_per_block": 2})


def test_uneven_layers_per_block_is_refused():
    with pytest.raises(ValueError, match="layers_per_block"):
        unet_to_ldm({}, {"layers_per_block": (1, 2, 2, 2)})


def test_bad_arguments(tiny, tmp_path):
    _, pipe, _ = tiny
    with pytest.raises(ValueError, match="layout"):
        text_encoder_to_ldm(pipe.text_encoder.state_dict(), pipe.text_encoder.config, "t5")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "model.ckpt")
    assert not list(tmp_path.iterdir())
