"""A FLUX.1 transformer's weights in Black Forest Labs' original single-file layout.

diffusers' `FluxTransformer2DModel` names its weights `transformer_blocks.0.attn.to_q.weight` and so on. BFL's
original model, the file ComfyUI loads as a "diffusion model" and the one civitai shares, names them after its own
modules and fuses some layers: a double block's query, key and value projections of each stream are one layer
(`double_blocks.0.img_attn.qkv`, outputs q|k|v), a single block's q, k, v and MLP input projection are one layer
(`single_blocks.0.linear1`, outputs q|k|v|mlp), and the final layer's modulation outputs (shift, scale) where diffusers'
`norm_out.linear` outputs (scale, shift). The RMSNorms of the queries and keys keep their weight as `.scale`.

The layer tables (which diffusers layers each BFL layer holds, in output order) are the kohya LoRA writer's
(`flux_kohya`), whose names are BFL's module paths with '.' written '_'; this module spells them with BFL's dots.
What it writes is exactly what diffusers' own reader (`convert_flux_transformer_checkpoint_to_diffusers`) turns back
into the input.
"""
from __future__ import annotations

import re

import torch

from ..errors import UserError
from .flux_kohya import BLOCKS, SWAPPED_HALVES, TOP_LAYERS

# kohya's layer names (flux_kohya's tables) -> BFL's module path, whose '.' kohya writes as '_'
BFL_PATHS = {
    # in a double block
    "img_attn_qkv": "img_attn.qkv",
    "img_attn_proj": "img_attn.proj",
    "img_mlp_0": "img_mlp.0",
    "img_mlp_2": "img_mlp.2",
    "img_mod_lin": "img_mod.lin",
    "txt_attn_qkv": "txt_attn.qkv",
    "txt_attn_proj": "txt_attn.proj",
    "txt_mlp_0": "txt_mlp.0",
    "txt_mlp_2": "txt_mlp.2",
    "txt_mod_lin": "txt_mod.lin",
    # in a single block
    "linear1": "linear1",
    "linear2": "linear2",
    "modulation_lin": "modulation.lin",
    # outside the blocks
    "img_in": "img_in",
    "txt_in": "txt_in",
    "time_in_in_layer": "time_in.in_layer",
    "time_in_out_layer": "time_in.out_layer",
    "vector_in_in_layer": "vector_in.in_layer",
    "vector_in_out_layer": "vector_in.out_layer",
    "guidance_in_in_layer": "guidance_in.in_layer",
    "guidance_in_out_layer": "guidance_in.out_layer",
    "final_layer_linear": "final_layer.linear",
    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}
# the RMSNorms of queries and keys (no LoRA adapts them, so kohya's tables lack them), by diffusers' block list:
# diffusers' norm inside the block -> BFL's; diffusers' `.weight` is BFL's `.scale`
BLOCK_NORMS = {
    "transformer_blocks": {
        "attn.norm_q": "img_attn.norm.query_norm",
        "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm",
        "attn.norm_added_k": "txt_attn.norm.key_norm",
    },
    "single_transformer_blocks": {
        "attn.norm_q": "norm.query_norm",
        "attn.norm_k": "norm.key_norm",
    },
}
GUIDANCE = "time_text_embed.guidance_embedder."  # FLUX.1 [dev]'s guidance embedding; [schnell] has none

_BLOCK_WEIGHT = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)")


def transformer_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.1 transformer's weights, as diffusers' FluxTransformer2DModel names them (its `state_dict()`), renamed and
    fused into Black Forest Labs' original layout, ready to save with safetensors.

    The keys come without the `model.diffusion_model.` prefix some files carry (ComfyUI and diffusers read both). The
    tensors keep their dtype; fused layers are new tensors, the others are the input's own. Both FLUX.1 [dev] (with a
    guidance embedding, `guidance_in`) and [schnell] (without) convert. Any width converts; note that diffusers' own
    reader of this layout assumes FLUX.1's hidden size of 3072 when it splits a single block's `linear1`, while ComfyUI
    reads the sizes from the file. Raises UserError for an empty input, a key that is not a FLUX.1 transformer weight, a
    transformer that lacks some of its weights, and layers to be fused whose shapes or dtypes do not fit together.
    """
    if not state_dict:
        raise UserError("The transformer's state dict is empty, so there is nothing to write in Black Forest Labs' layout.")
    places = {}  # diffusers key -> (BFL key, the diffusers keys fused into it in output order, halves swapped)
    for key in state_dict:
        place = _bfl_place(key)
        if place is None:
            raise UserError(
                f"The weight {key} is not one of a FLUX.1 transformer's (diffusers' FluxTransformer2DModel), so the "
                "transformer cannot be written in Black Forest Labs' layout; pass the transformer's own state dict, "
                "with any LoRA merged into it."
            )
        places[key] = place

    missing = sorted(_expected_keys(state_dict) - set(state_dict))
    if missing:
        others = f" and {len(missing) - 1} other weights" if len(missing) > 1 else ""
        raise UserError(
            f"The transformer's weights lack {missing[0]}{others}, so they are not a whole FLUX.1 transformer and "
            "cannot be written in Black Forest Labs' layout."
        )

    converted: dict[str, torch.Tensor] = {}
    for bfl_key, members, swapped in dict.fromkeys(places.values()):  # each BFL key once, in the input's order
        tensors = [state_dict[member] for member in members]
        if len({tensor.shape[1:] for tensor in tensors}) > 1 or len({tensor.dtype for tensor in tensors}) > 1:
            shapes = ", ".join(f"{member} {tuple(tensor.shape)} {tensor.dtype}" for member, tensor in zip(members, tensors))
            raise UserError(f"The weights fused into {bfl_key} do not fit together ({shapes}), so the transformer cannot be written in Black Forest Labs' layout.")
        tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
        if swapped:
            tensor = torch.cat(tensor.chunk(2, dim=0)[::-1], dim=0)
        converted[bfl_key] = tensor.contiguous()
    return converted


def _bfl_place(key: str) -> tuple[str, tuple[str, ...], bool] | None:
    """A diffusers key's BFL key, the diffusers keys that BFL key holds (in output order) and whether its two halves
    trade places; None for a key a FLUX.1 transformer does not have."""
    layer, _, param = key.rpartition(".")
    if layer in TOP_LAYERS and param in ("weight", "bias"):
        name = TOP_LAYERS[layer]
        return f"{BFL_PATHS[name]}.{param}", (key,), name in SWAPPED_HALVES
    match = _BLOCK_WEIGHT.fullmatch(key)
    if match is None:
        return None
    blocks, index, member, param = match.groups()
    bfl_blocks, layers = BLOCKS[blocks]
    if member in BLOCK_NORMS[blocks]:
        return (f"{bfl_blocks}.{index}.{BLOCK_NORMS[blocks][member]}.scale", (key,), False) if param == "weight" else None
    for name, names in layers.items():
        if member in names:
            fused = tuple(f"{blocks}.{index}.{other}.{param}" for other in names)
            return f"{bfl_blocks}.{index}.{BFL_PATHS[name]}.{param}", fused, False
    return None


def _expected_keys(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """The keys of a whole FLUX.1 transformer with as many blocks of each kind as the input's highest block index says,
    and a guidance embedding if the input has any of it."""
    has_guidance = any(key.startswith(GUIDANCE) for key in state_dict)
    keys = {f"{layer}.{param}" for layer in TOP_LAYERS for param in ("weight", "bias") if has_guidance or not layer.startswith(GUIDANCE)}
    for blocks, (_, layers) in BLOCKS.items():
        indices = [int(match.group(2)) for match in map(_BLOCK_WEIGHT.fullmatch, state_dict) if match and match.group(1) == blocks]
        for index in range(max(indices, default=-1) + 1):
            keys |= {f"{blocks}.{index}.{member}.{param}" for names in layers.values() for member in names for param in ("weight", "bias")}
            keys |= {f"{blocks}.{index}.{norm}.weight" for norm in BLOCK_NORMS[blocks]}
    return keys

