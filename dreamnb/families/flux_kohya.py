"""A FLUX.1 transformer LoRA in kohya's layout, the one ComfyUI and A1111-Forge load.

Training (peft, diffusers' names) adapts the transformer's layers one by one: `transformer_blocks.0.attn.to_q`,
`single_transformer_blocks.3.proj_mlp`. kohya names layers as Black Forest Labs' original model does, and that model
fuses some of them: the query, key and value projections of a double block's image stream are one layer
(`double_blocks.0.img_attn.qkv`, outputs q|k|v), and a single block's q, k, v and MLP input projection are one layer
(`single_blocks.0.linear1`, outputs q|k|v|mlp). A kohya key is `lora_unet_` plus that path with '.' turned into '_',
followed by `.lora_down.weight` (peft's A), `.lora_up.weight` (peft's B) or `.alpha`; loaders add
(alpha / rank) · up @ down to the layer's weight, rank being the rows of `lora_down`.

A fused layer's LoRA is its members' LoRAs side by side: `lora_down` stacks the A matrices (rank n·r), `lora_up` puts
each B on the diagonal of a block matrix so each member's B only sees its own A, and alpha is n·alpha so that
alpha / rank stays peft's alpha / r. A member that was not trained gets zero blocks of the same rank, which keeps the
layout that diffusers' kohya reader recognises and splits back exactly.
"""
from __future__ import annotations

import re

import torch

from ..errors import UserError

# BFL's layer (kohya's name after `lora_unet_<blocks>_<index>_`) -> the diffusers layers it holds, in BFL's output order
DOUBLE_BLOCK_LAYERS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_BLOCK_LAYERS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
BLOCKS = {  # diffusers' block list -> BFL's, and its layers
    "transformer_blocks": ("double_blocks", DOUBLE_BLOCK_LAYERS),
    "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK_LAYERS),
}
# the layers outside the blocks: diffusers' path -> BFL's layer (kohya's name after `lora_unet_`)
TOP_LAYERS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
    "proj_out": "final_layer_linear",
}
# diffusers' norm_out.linear outputs (scale, shift); BFL's final adaLN outputs (shift, scale)
SWAPPED_HALVES = {"final_layer_adaLN_modulation_1"}
# diffusers' kohya reader takes these two as if alpha were their rank (it drops their alpha); ComfyUI applies it
ALPHA_FOLDED = {"final_layer_adaLN_modulation_1", "final_layer_linear"}
MLP_RATIO = 4  # FLUX.1's MLP is 4 times the hidden size wide (proj_mlp's outputs in linear1)

KOHYA_METADATA = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}

_PEFT_KEY = re.compile(r"(?:transformer\.)?(.+)\.lora_([AB])\.weight")
_BLOCK_LAYER = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def flux_lora_to_kohya(
    state_dict: dict[str, torch.Tensor], rank: int, alpha: float
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A FLUX.1 transformer LoRA in peft's/diffusers' names, trained with rank `rank` and `lora_alpha` `alpha`, as kohya's
    tensors and the safetensors metadata kohya writes beside them (`ss_network_dim` and `ss_network_alpha` are the
    training's rank and alpha; a fused layer's own rank and alpha are n times those).

    Keys are `transformer.<layer>.lora_A.weight` / `.lora_B.weight` (the `transformer.` prefix is optional). Only the
    layers present in the input are written. The final layer's two (`proj_out`, `norm_out.linear`) get alpha / r
    folded into `lora_up` and alpha = rank, because diffusers' kohya reader ignores their alpha while ComfyUI applies
    it; `norm_out.linear`'s outputs are also put in BFL's order. (diffusers 0.42.1's `load_lora_weights` reads the
    blocks of such a file but leaves the layers outside them out without a word: its kohya reader names those without
    the `transformer.` prefix its loader looks for. diffusers users are better served by the diffusers-named file.)
    Raises UserError for a key, rank or shape it cannot convert.
    """
    if rank <= 0 or alpha <= 0:
        raise UserError(f"A LoRA's rank and alpha must be positive (got rank {rank} and alpha {alpha}); pass those it was trained with.")
    tensors: dict[str, torch.Tensor] = {}
    for name, (names, pairs) in _group(state_dict, rank).items():
        down, up = _fuse([pairs.get(member) for member in names], names, rank, name)
        layer_alpha = float(alpha) * len(names)
        if name in ALPHA_FOLDED:
            up, layer_alpha = (up.float() * (alpha / rank)).to(up.dtype), float(rank)
        if name in SWAPPED_HALVES:
            up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
        tensors[f"lora_unet_{name}.lora_down.weight"] = down
        tensors[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(layer_alpha, dtype=torch.float32)
    metadata = {**KOHYA_METADATA, "ss_network_dim": str(rank), "ss_network_alpha": f"{float(alpha):g}"}
    return tensors, metadata


def kohya_layer(layer: str) -> tuple[str, tuple[str, ...], str] | None:
    """A diffusers layer path's kohya layer: (kohya's name after `lora_unet_`, the diffusers layers it fuses, in output
    order, as they are named inside the block, this layer's own such name); None for a layer kohya's Flux layout lacks."""
    if layer in TOP_LAYERS:
        return TOP_LAYERS[layer], (layer,), layer
    match = _BLOCK_LAYER.fullmatch(layer)
    if match is None:
        return None
    blocks, index, member = match.groups()
    bfl_blocks, layers = BLOCKS[blocks]
    for name, names in layers.items():
        if member in names:
            return f"{bfl_blocks}_{int(index)}_{name}", names, member
    return None


def _group(state_dict: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[tuple[str, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """The input's LoRAs by kohya layer: {kohya name: (its diffusers members, {member present: (A, B)})}, each checked."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None or kohya_layer(match.group(1)) is None:
            raise UserError(f"The LoRA weight {key} is not of a FLUX.1 transformer layer that kohya's Flux layout holds, so the LoRA cannot be written in that layout.")
        found.setdefault(match.group(1), {})[match.group(2)] = value
    if not found:
        raise UserError("The LoRA holds no FLUX.1 transformer weights, so there is nothing to write in kohya's layout.")

    groups: dict[str, tuple[tuple[str, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for layer in sorted(found, key=_natural):
        pair = found[layer]
        if set(pair) != {"A", "B"}:
            raise UserError(f"The LoRA of layer {layer} lacks its lora_{'B' if 'A' in pair else 'A'} weight, so the file is incomplete.")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise UserError(f"The LoRA of layer {layer} has A of shape {tuple(a.shape)} and B of shape {tuple(b.shape)}, which do not form a LoRA of a linear layer.")
        if a.shape[0] != rank:
            raise UserError(f"The LoRA of layer {layer} has rank {a.shape[0]}, not the rank {rank} given, and kohya's layout needs one rank throughout; pass the rank it was trained with.")
        name, names, member = kohya_layer(layer)
        groups.setdefault(name, (names, {}))[1][member] = (a, b)
    return groups


def _fuse(
    pairs: list[tuple[torch.Tensor, torch.Tensor] | None], names: tuple[str, ...], rank: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One kohya layer's (lora_down, lora_up) from its members' (A, B) pairs in output order (None: not trained).

    A single member passes through. Several: down stacks the A's, up is block-diagonal in the B's; an untrained member
    gets zero rows in down and a zero block in up, its height FLUX.1's: the hidden size for q, k and v, 4 times it for
    the MLP.
    """
    present = [pair for pair in pairs if pair is not None]
    if len(names) == 1:
        a, b = present[0]
        return a.contiguous(), b.contiguous()
    hidden = present[0][0].shape[1]  # every member reads the block's hidden states
    dtype = present[0][0].dtype
    heights = [hidden * MLP_RATIO if name == "proj_mlp" else hidden for name in names]
    downs, ups = [], []
    for name, pair, height in zip(names, pairs, heights):
        if pair is None:
            pair = (torch.zeros(rank, hidden, dtype=dtype), torch.zeros(height, rank, dtype=dtype))
        a, b = pair
        if a.shape[1] != hidden or b.shape[0] != height:
            raise UserError(f"The LoRA of {name} in kohya's layer {where} has shapes {tuple(a.shape)} and {tuple(b.shape)}, which are not those of a FLUX.1 transformer with hidden size {hidden}.")
        downs.append(a.to(dtype))
        ups.append(b.to(dtype))
    return torch.cat(downs, dim=0).contiguous(), torch.block_diag(*ups).contiguous()


def _natural(text: str) -> list:
    """A sort key that puts block 2 before block 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
