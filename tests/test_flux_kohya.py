"""A FLUX.1 LoRA trained with peft (diffusers' names) written in kohya's layout: the names and shapes BFL's model has,
the deltas ComfyUI adds to BFL's fused layers, and a round trip through diffusers' own kohya reader and loader that
gives the peft model's output. Tiny FluxTransformer2DModels are built from configs."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from dreamnb.errors import UserError
from dreamnb.families.flux_kohya import flux_lora_to_kohya

RANK, ALPHA = 4, 8.0  # alpha != rank, so a lost or doubled alpha shows

# diffusers' train_dreambooth_lora_flux.py without --lora_layers
DEFAULT_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
# every layer kohya's Flux layout holds ("proj_out" is also the model's last layer)
ALL_TARGETS = DEFAULT_TARGETS + [
    "proj_mlp", "proj_out", "norm.linear", "norm1.linear", "norm1_context.linear", "norm_out.linear",
    "x_embedder", "context_embedder", "linear_1", "linear_2",  # linear_1/2: time, text and guidance embedders
]

KOHYA_KEY = re.compile(
    r"lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)|single_blocks_\d+_(linear1|linear2|modulation_lin)"
    r"|img_in|txt_in|(time_in|vector_in|guidance_in)_(in|out)_layer|final_layer_linear|final_layer_adaLN_modulation_1)"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)"
)

SMALL = dict(num_layers=2, num_single_layers=2, num_attention_heads=2)  # hidden size 32
DOUBLE = dict(num_layers=2, num_single_layers=0, num_attention_heads=2)
# diffusers' reader splits single_blocks_N_linear1 at FLUX.1's real sizes (3072 ×3, 12288), so hidden size 3072
SINGLE = dict(num_layers=0, num_single_layers=1, num_attention_heads=192)


def tiny_flux(num_layers, num_single_layers, num_attention_heads, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=num_attention_heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6), guidance_embeds=True,
    ).eval()


def add_lora(model, targets, seed=1) -> dict[str, torch.Tensor]:
    """Adapts `model` in place as diffusers' training script does, with random nonzero A and B; its LoRA in the names
    FluxPipeline.save_lora_weights writes (`transformer.<layer>.lora_A.weight`)."""
    from peft import LoraConfig, get_peft_model_state_dict

    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=generator) * 0.2)
    return {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


PROBES = 16  # more than the rank of the difference of two rank-4 (or 4-block) deltas


def probe(inputs: int) -> torch.Tensor:
    """Random inputs for a layer with `inputs` inputs, the same for every layer of that width: two deltas of rank below
    PROBES that agree on them are equal."""
    return torch.randn(inputs, PROBES, generator=torch.Generator().manual_seed(inputs), dtype=torch.float64)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · up @ down, applied to the probes (the full matrix at FLUX.1's sizes would take seconds to compare)."""
    return scale * (up.double() @ (down.double() @ probe(down.shape[1])))


def deltas(lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """{diffusers layer: scale · B @ A, probed} of a LoRA in diffusers' names."""
    out = {}
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            layer = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[layer] = lora_delta(a, lora[key.replace(".lora_A.", ".lora_B.")], scale)
    return out


def forward(model, seed=2):
    generator = torch.Generator().manual_seed(seed)
    image_tokens, text_tokens = 6, 3
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, image_tokens, 16, generator=generator),
            encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator),
            timestep=torch.tensor([0.6]),
            guidance=torch.tensor([3.5]),
            img_ids=torch.randint(0, 4, (image_tokens, 3), generator=generator).float(),
            txt_ids=torch.zeros(text_tokens, 3),
            return_dict=False,
        )[0]


def bfl_layers(model) -> dict[str, tuple[int, int]]:
    """BFL's FLUX.1 linear layers for this model's block counts and sizes: {kohya name: (out, in)}, written out here as
    BFL's flux/model.py builds them, independently of the module under test."""
    c = model.config
    h, mlp = c.num_attention_heads * c.attention_head_dim, 4 * c.num_attention_heads * c.attention_head_dim
    layers = {
        "img_in": (h, c.in_channels), "txt_in": (h, c.joint_attention_dim),
        "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
        "vector_in.in_layer": (h, c.pooled_projection_dim), "vector_in.out_layer": (h, h),
        "guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h),
        "final_layer.linear": (c.in_channels, h), "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    for i in range(c.num_layers):
        for stream in ("img", "txt"):
            layers.update({
                f"double_blocks.{i}.{stream}_attn.qkv": (3 * h, h), f"double_blocks.{i}.{stream}_attn.proj": (h, h),
                f"double_blocks.{i}.{stream}_mlp.0": (mlp, h), f"double_blocks.{i}.{stream}_mlp.2": (h, mlp),
                f"double_blocks.{i}.{stream}_mod.lin": (6 * h, h),
            })
    for i in range(c.num_single_layers):
        layers.update({
            f"single_blocks.{i}.linear1": (3 * h + mlp, h), f"single_blocks.{i}.linear2": (h, h + mlp),
            f"single_blocks.{i}.modulation.lin": (3 * h, h),
        })
    return {"lora_unet_" + path.replace(".", "_"): shape for path, shape in layers.items()}


def bfl_deltas(diffusers_deltas: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The change to each BFL layer's weight (probed) that the diffusers layers' deltas make, by BFL's fusing (q|k|v, q|k|v|mlp,
    the final adaLN's halves swapped); an untrained member of a fused layer changes nothing."""
    c = model.config
    h = c.num_attention_heads * c.attention_head_dim

    def part(layer, rows):
        return diffusers_deltas.get(layer, torch.zeros(rows, PROBES, dtype=torch.float64))

    out = {}
    for layer, delta in diffusers_deltas.items():
        match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", layer)
        if match is None:
            name = {
                "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
                "norm_out.linear": "final_layer.adaLN_modulation.1",
                "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            }[layer]
            if layer == "norm_out.linear":  # diffusers: (scale, shift); BFL: (shift, scale)
                delta = torch.cat(delta.chunk(2)[::-1])
            out[name] = delta
            continue
        blocks, i, member = match.groups()
        prefix = f"transformer_blocks.{i}." if blocks == "transformer_blocks" else f"single_transformer_blocks.{i}."
        if blocks == "transformer_blocks":
            name = {
                "attn.to_out.0": "img_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "norm1.linear": "img_mod.lin", "attn.to_add_out": "txt_attn.proj", "ff_context.net.0.proj": "txt_mlp.0",
                "ff_context.net.2": "txt_mlp.2", "norm1_context.linear": "txt_mod.lin",
                "attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
                "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv", "attn.add_v_proj": "txt_attn.qkv",
            }[member]
            members = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                       "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}.get(name)
            name = f"double_blocks.{i}.{name}"
        else:
            name = {"proj_out": "linear2", "norm.linear": "modulation.lin"}.get(member, "linear1")
            members = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp") if name == "linear1" else None
            name = f"single_blocks.{i}.{name}"
        if members:
            delta = torch.cat([part(prefix + m, 4 * h if m == "proj_mlp" else h) for m in members])
        out[name] = delta
    return {"lora_unet_" + k.replace(".", "_"): v for k, v in out.items()}


@pytest.fixture(scope="module")
def base_models():
    cache = {}

    def get(config):
        key = tuple(sorted(config.items()))
        if key not in cache:
            cache[key] = tiny_flux(**config)
        return cache[key]

    return get


# --------------------------------------------------------------------------- names, shapes, ComfyUI's deltas

@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ALL_TARGETS], ids=["default-targets", "all-layers"])
def test_names_shapes_and_deltas_are_bfls(targets, base_models):
    model = copy.deepcopy(base_models(SMALL))
    lora = add_lora(model, targets)
    kohya, metadata = flux_lora_to_kohya(lora, RANK, ALPHA)

    assert metadata == {"ss_network_module": "networks.lora_flux", "ss_network_dim": "4", "ss_network_alpha": "8",
                        "ss_base_model_version": "flux1"}
    assert [k for k in kohya if not KOHYA_KEY.fullmatch(k)] == []
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert kohya.keys() == {f"{m}.{s}" for m in layers for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    bfl = bfl_layers(model)
    assert layers - bfl.keys() == set()  # each a layer of BFL's model with these block counts

    expected = bfl_deltas(deltas(lora, ALPHA / RANK), model)
    assert layers == expected.keys()  # only the layers trained, all of them
    for name in layers:
        down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"]
        assert (up.shape[0], down.shape[1]) == bfl[name], name
        assert alpha.ndim == 0 and alpha.dtype == torch.float32
        # ComfyUI and Forge add alpha / rows of lora_down · up @ down to BFL's weight
        got = lora_delta(down, up, alpha.item() / down.shape[0])
        torch.testing.assert_close(got, expected[name], rtol=1e-6, atol=1e-9, msg=name)

    if targets is DEFAULT_TARGETS:  # q, k, v of a single block trained, its MLP input not: a zero block for it
        assert len(layers) == 2 * 8 + 2
        for i in range(2):
            down, up = kohya[f"lora_unet_single_blocks_{i}_linear1.lora_down.weight"], kohya[f"lora_unet_single_blocks_{i}_linear1.lora_up.weight"]
            assert down.shape == (4 * RANK, 32) and up.shape == (7 * 32, 4 * RANK)
            assert not down[3 * RANK:].any() and not up[3 * 32:].any() and up[:3 * 32].any()
            assert kohya[f"lora_unet_single_blocks_{i}_linear1.alpha"].item() == 4 * ALPHA
        assert kohya["lora_unet_double_blocks_1_img_attn_qkv.alpha"].item() == 3 * ALPHA
        assert kohya["lora_unet_double_blocks_1_img_mlp_0.alpha"].item() == ALPHA
    else:
        assert len(layers) == len(bfl)
        # diffusers' reader drops the final layer's alpha, so alpha / rank is folded into lora_up and alpha = rank
        assert kohya["lora_unet_final_layer_linear.alpha"].item() == RANK


# --------------------------------------------------------------------------- diffusers' reader and loader

@pytest.mark.parametrize("config", [DOUBLE, SINGLE], ids=["double-blocks", "single-block-3072"])
@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ALL_TARGETS], ids=["default-targets", "all-layers"])
def test_diffusers_reads_the_kohya_file_back_and_its_model_gives_the_peft_models_output(config, targets, base_models, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    base = base_models(config)
    base_out = forward(base)
    adapted = copy.deepcopy(base)
    lora = add_lora(adapted, targets)
    peft_out = forward(adapted)
    del adapted

    kohya, metadata = flux_lora_to_kohya(lora, RANK, ALPHA)
    path = tmp_path / "flux-kohya.safetensors"
    save_file(kohya, str(path), metadata=metadata)

    # (1) the reader's LoRA: alpha / rank baked into the weights, no alphas; each layer's delta is peft's
    read, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    assert alphas is None
    got, want = deltas(read, 1.0), deltas(lora, ALPHA / RANK)
    assert want.keys() <= got.keys()
    for layer in got.keys() - want.keys():  # only an untrained MLP input beside a trained q, k, v
        assert layer.endswith(".proj_mlp") and not got[layer].any(), layer
    for layer, delta in want.items():
        torch.testing.assert_close(got[layer], delta, rtol=1e-6, atol=1e-9, msg=layer)
    # the reader took each fused layer apart along its blocks (rank 4 each), not as one rank-12/16 LoRA copied
    assert {tuple(v.shape)[0] for k, v in read.items() if k.endswith(".lora_A.weight")} == {RANK}

    # (2) a fresh copy of the base model given the file by FluxPipeline.load_lora_weights behaves as the peft model
    fresh = copy.deepcopy(base)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=fresh)
    if all(k.startswith("transformer.") for k in read):
        pipe.load_lora_weights(str(path))
    else:
        # diffusers 0.42.1's kohya reader names the layers outside the blocks (img_in, final_layer, ...) without the
        # `transformer.` its loader looks for, so load_lora_weights of the file leaves them out without a word
        pipe.load_lora_weights({k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in read.items()})
    adapted_layers = {name for name, module in fresh.named_modules() if getattr(module, "lora_A", None)}
    assert adapted_layers == got.keys()
    loaded_out = forward(fresh)
    assert (peft_out - base_out).abs().max() > 1e-2  # the LoRA changes the output...
    torch.testing.assert_close(loaded_out, peft_out, rtol=1e-5, atol=1e-5)  # ...and the kohya file changes it alike


# --------------------------------------------------------------------------- what it refuses

def test_input_it_cannot_convert_is_refused_in_one_sentence():
    a, b = torch.randn(RANK, 32), torch.randn(96, RANK)
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(RANK, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, RANK)}
    cases = [
        ("not of a FLUX.1 transformer layer", {**good, "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": a}),
        ("not of a FLUX.1 transformer layer", {**good, "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.randn(32)}),
        ("not of a FLUX.1 transformer layer", {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a}),
        ("lacks its lora_B", {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a}),
        ("has rank 8", {"transformer.proj_out.lora_A.weight": torch.randn(8, 32), "transformer.proj_out.lora_B.weight": torch.randn(16, 8)}),
        ("do not form a LoRA", {"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": torch.randn(16, 3)}),
        ("not those of a FLUX.1 transformer", {**good, "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,
                                               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b}),
        ("holds no FLUX.1", {}),
    ]
    for words, state in cases:
        with pytest.raises(UserError, match=re.escape(words)) as error:
            flux_lora_to_kohya(state, RANK, ALPHA)
        message = str(error.value)
        assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
    with pytest.raises(UserError, match="positive"):
        flux_lora_to_kohya(good, 0, ALPHA)
    assert flux_lora_to_kohya(good, RANK, ALPHA)[0].keys() == {
        f"lora_unet_double_blocks_0_img_attn_qkv.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
