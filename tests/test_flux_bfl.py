"""A FLUX.1 transformer's weights written in Black Forest Labs' original single-file layout (the file ComfyUI loads as a
"diffusion model"): diffusers' own reader of that layout gives back exactly the state dict written, and
FluxTransformer2DModel.from_single_file of the file, offline with a local config, gives a model whose output is the
original's, for FLUX.1 [dev] (guidance embedding) and [schnell] (none), with and without the `model.diffusion_model.`
prefix. Tiny FluxTransformer2DModels are built from configs, every weight random (norm scales included, so two norms
traded would show).

diffusers' reader splits a single block's `linear1` at FLUX.1's real hidden size (`inner_dim = 3072` in its code), so the
tiny models (hidden size 32) are read by a copy of that same function with only that number changed; one test runs the
unchanged reader on a state dict of FLUX.1's real sizes (one block of each kind, uint8 weights to keep it light)."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

from dreamnb.errors import UserError
from dreamnb.families.flux_bfl import BFL_PATHS, transformer_to_bfl
from dreamnb.families.flux_kohya import DOUBLE_BLOCK_LAYERS, SINGLE_BLOCK_LAYERS, TOP_LAYERS

WIDTH = 32  # the tiny models' hidden size: 2 heads of 16
PREFIX = "model.diffusion_model."

BFL_KEY = re.compile(
    r"double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)\.(weight|bias)"
    r"|double_blocks\.\d+\.(img|txt)_attn\.norm\.(query|key)_norm\.scale"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin)\.(weight|bias)"
    r"|single_blocks\.\d+\.norm\.(query|key)_norm\.scale"
    r"|(img_in|txt_in|(time_in|vector_in|guidance_in)\.(in|out)_layer|final_layer\.linear|final_layer\.adaLN_modulation\.1)"
    r"\.(weight|bias)"
)

_models: dict[bool, torch.nn.Module] = {}


def tiny_flux(guidance: bool):
    """A tiny FLUX.1 [dev] (guidance embedding) or [schnell] (none) transformer, 2 blocks of each kind, every weight
    random; built once per kind."""
    if guidance not in _models:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
        ).eval()
        with torch.no_grad():
            for parameter in model.parameters():  # norm scales start at 1: make every weight distinct
                parameter.add_(torch.randn_like(parameter) * 0.1)
        _models[guidance] = model
    return _models[guidance]


def forward(model, guidance: bool) -> torch.Tensor:
    """The model's output for fixed inputs: a 2×2 latent of 64 channels, 3 text tokens."""
    generator = torch.Generator().manual_seed(0)
    img_ids = torch.tensor([[0.0, row, column] for row in range(2) for column in range(2)])
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 4, 64, generator=generator),
            encoder_hidden_states=torch.randn(1, 3, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator),
            timestep=torch.tensor([0.7]), img_ids=img_ids, txt_ids=torch.zeros(3, 3),
            guidance=torch.tensor([3.5]) if guidance else None,
        ).sample


def reader_for_width(width: int):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers, with FLUX.1's hidden size it assumes (3072) replaced
    by `width`: the same code otherwise, run in its module's namespace."""
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1  # diffusers changed its reader: look at it again
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {width}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def saved_bfl(model, path, prefix: str = "") -> None:
    from safetensors.torch import save_file

    save_file({prefix + key: value for key, value in transformer_to_bfl(model.state_dict()).items()}, str(path))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [key for key in want if got[key].dtype != want[key].dtype or not torch.equal(got[key], want[key])]
    assert different == []


# --------------------------------------------------------------------------- the layout

def test_bfl_spelling_is_kohyas_with_dots():
    kohya_names = set(DOUBLE_BLOCK_LAYERS) | set(SINGLE_BLOCK_LAYERS) | set(TOP_LAYERS.values())
    assert set(BFL_PATHS) == kohya_names
    assert [name for name, path in BFL_PATHS.items() if path.replace(".", "_") != name] == []


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_names_and_fused_layers_are_bfls(guidance):
    state = tiny_flux(guidance).state_dict()
    bfl = transformer_to_bfl(state)

    assert [key for key in bfl if not BFL_KEY.fullmatch(key)] == []
    # 10 layers outside the blocks (8 without guidance_in), a double block 10 and 4 norm scales, a single one 3 and 2
    assert len(bfl) == 2 * (10 if guidance else 8) + 2 * (2 * 10 + 4) + 2 * (2 * 3 + 2)
    assert any(key.startswith("guidance_in.") for key in bfl) == guidance
    assert all(value.is_contiguous() for value in bfl.values())

    double, single = "transformer_blocks.1.", "single_transformer_blocks.1."
    assert torch.equal(bfl["double_blocks.1.txt_attn.qkv.bias"],
                       torch.cat([state[f"{double}attn.add_{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(bfl["single_blocks.1.linear1.weight"],
                       torch.cat([state[f"{single}attn.to_{x}.weight"] for x in "qkv"] + [state[f"{single}proj_mlp.weight"]]))
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * WIDTH + 4 * WIDTH, WIDTH)
    assert torch.equal(bfl["single_blocks.1.norm.key_norm.scale"], state[f"{single}attn.norm_k.weight"])
    assert torch.equal(bfl["double_blocks.0.txt_attn.norm.query_norm.scale"], state["transformer_blocks.0.attn.norm_added_q.weight"])
    scale, shift = state["norm_out.linear.weight"].chunk(2)  # diffusers: (scale, shift); BFL: (shift, scale)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


# --------------------------------------------------------------------------- diffusers' reader and loader

@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_diffusers_reader_gives_back_the_state_dict(guidance, tmp_path):
    from safetensors.torch import load_file

    model = tiny_flux(guidance)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    path = tmp_path / "flux1-bfl.safetensors"
    saved_bfl(model, path)
    assert_same_state(model.state_dict(), state)  # the input is left as it was

    checkpoint = load_file(str(path))
    read = reader_for_width(WIDTH)(checkpoint)
    assert checkpoint == {}  # the reader pops each key it knows: none left over
    assert_same_state(read, state)


def test_unchanged_diffusers_reader_gives_back_a_state_dict_of_flux1s_sizes():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):  # FLUX.1 [dev]'s shapes (hidden size 3072), one block of each kind
        shapes = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randint(0, 256, value.shape, dtype=torch.uint8, generator=generator) for key, value in shapes.items()}
    assert state["single_transformer_blocks.0.proj_mlp.weight"].shape == (12288, 3072)

    checkpoint = {PREFIX + key: value for key, value in transformer_to_bfl(state).items()}
    read = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}
    assert_same_state(read, state)


@pytest.mark.parametrize(
    "guidance, prefix, config_at",
    [(True, "", "root"), (True, PREFIX, "root"), (False, "", "root"), (False, PREFIX, "subfolder"), (True, "", "subfolder")],
    ids=["dev", "dev-prefixed", "schnell", "schnell-prefixed-subfolder", "dev-subfolder"],
)
def test_from_single_file_loads_a_model_with_the_originals_output(guidance, prefix, config_at, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    monkeypatch.setitem(SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"], "checkpoint_mapping_fn", reader_for_width(WIDTH))
    model = tiny_flux(guidance)
    path = tmp_path / "flux1-bfl.safetensors"
    saved_bfl(model, path, prefix)
    # config.json only (no weights beside it): at the folder's root, or in transformer/ as in a diffusers model folder
    if config_at == "root":
        model.save_config(tmp_path / "config")
        options = dict(config=str(tmp_path / "config"))
    else:
        model.save_config(tmp_path / "base" / "transformer")
        options = dict(config=str(tmp_path / "base"), subfolder="transformer")

    loaded = FluxTransformer2DModel.from_single_file(str(path), local_files_only=True, **options).eval()

    assert loaded.config.guidance_embeds == guidance
    assert_same_state(loaded.state_dict(), model.state_dict())
    want = forward(model, guidance)
    assert want.abs().max() > 0 and torch.isfinite(want).all()
    assert torch.equal(forward(loaded, guidance), want)


# --------------------------------------------------------------------------- what it refuses

def test_input_it_cannot_convert_is_refused_in_one_sentence():
    state = tiny_flux(True).state_dict()
    cases = [
        ("The weight transformer_blocks.0.attn.to_q.base_layer.weight is not one of a FLUX.1 transformer's",
         {**state, "transformer_blocks.0.attn.to_q.base_layer.weight": state["transformer_blocks.0.attn.to_q.weight"]}),
        ("The weight pos_embed.freqs is not one", {**state, "pos_embed.freqs": torch.zeros(3)}),
        ("The weight transformer.time_text_embed.timestep_embedder.linear_1.weight is not one", {f"transformer.{key}": value for key, value in state.items()}),
        ("The weight transformer_blocks.0.attn.norm_q.bias is not one", {**state, "transformer_blocks.0.attn.norm_q.bias": torch.zeros(16)}),
        ("lack single_transformer_blocks.1.proj_mlp.bias,",
         {key: value for key, value in state.items() if key != "single_transformer_blocks.1.proj_mlp.bias"}),
        ("lack transformer_blocks.1.attn.add_k_proj.bias and 31 other weights",  # block 1 of 0..2 missing: its 32
         {**{key: value for key, value in state.items() if not key.startswith("transformer_blocks.1.")},
          **{key.replace(".0.", ".2.", 1): value for key, value in state.items() if key.startswith("transformer_blocks.0.")}}),
        ("lack time_text_embed.guidance_embedder.linear_1.bias,",
         {key: value for key, value in state.items() if key != "time_text_embed.guidance_embedder.linear_1.bias"}),
        ("fused into single_blocks.0.linear1.weight do not fit together",
         {**state, "single_transformer_blocks.0.attn.to_k.weight": torch.zeros(WIDTH, WIDTH + 1)}),
        ("fused into double_blocks.1.img_attn.qkv.weight do not fit together",
         {**state, "transformer_blocks.1.attn.to_v.weight": state["transformer_blocks.1.attn.to_v.weight"].half()}),
        ("state dict is empty", {}),
    ]
    for words, bad in cases:
        with pytest.raises(UserError, match=re.escape(words)) as error:
            transformer_to_bfl(bad)
        message = str(error.value)
        assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
