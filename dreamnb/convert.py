"""Diffusers Stable Diffusion components -> the original single-file checkpoint layout.

AUTOMATIC1111, ComfyUI and civitai share one `.safetensors` layout from the original
CompVis/Stability code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.*` (text encoder: Hugging Face CLIP keys for SD 1.x, OpenCLIP keys with fused
q/k/v for SD 2.x; SDXL has both, under `conditioner.embedders.0` and `.1`). diffusers reads that layout (`from_single_file`) but only writes its own
folders, and its reference script for the other direction hard-codes SD's 4 levels x 2
resnets. Here the mapping follows the model's own config (levels, `layers_per_block`, which
levels have attention), so the tiny test models and the real SD 1.5 / 2.1 convert alike, and
it is the exact inverse of `diffusers.loaders.single_file_utils`.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .fileio import save_with

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
TEXT_ENCODER_LAYOUTS = ("clip", "open_clip")


class ConversionError(UserError):
    """The weights do not have the Stable Diffusion 1.x/2.x/XL structure the single-file layout needs."""


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    """Read a config field from a diffusers FrozenDict, a transformers config or a plain dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _unknown_keys_error(component: str, keys: list[str]) -> ConversionError:
    shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
    return ConversionError(
        f"cannot write the {component} in the original Stable Diffusion layout because it has weights "
        f"that layout has no place for ({shown}); only SD 1.x/2.x/XL-style models can be exported as a single file."
    )


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    # class / addition embeddings: SDXL's "text_time" embedding (pooled text + sizes) is `label_emb.0.*`
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}

# Inside a resnet only the layer names differ; attention (transformer) blocks keep their names.
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_UNET_BLOCK_KEY = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_MID_BLOCK_KEY = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _layers_per_block(config: Any) -> int:
    """diffusers' loader numbers LDM blocks with one `layers_per_block`, so it must be the same at every level."""
    layers = _config_value(config, "layers_per_block")
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ConversionError(
                f"cannot export a UNet with different layers_per_block per level ({list(layers)}) as a single file; "
                "the original layout needs the same number at every level."
            )
        layers = layers[0]
    if not isinstance(layers, int) or layers < 1:
        raise ConversionError(f"the UNet config has no valid layers_per_block ({layers!r}), so it cannot be exported.")
    return layers


def _rename_resnet_part(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_UNET_RESNET_PARTS.get(layer, layer)}.{param}"


def unet_to_ldm(unet_state_dict: dict, unet_config) -> dict:
    """Rename a diffusers `UNet2DConditionModel` state dict to the original `model.diffusion_model.*` keys.

    The original UNet numbers its sub-blocks in one flat list: `input_blocks.0` is conv_in, then each
    level has `layers_per_block` (resnet, attention) pairs and one downsampler; `output_blocks` has
    `layers_per_block + 1` pairs per level, with the upsampler after the last pair's attention (or
    in the attention's place when the level has none); `middle_block` interleaves resnet, attention,
    resnet. Tensors are shared, not copied: SD 1.x (1x1 conv) and SD 2.x (linear) projections
    already have the same shapes in both layouts.
    """
    layers = _layers_per_block(unet_config)
    up_levels_with_attention = {
        int(m.group(2))
        for key in unet_state_dict
        if (m := _UNET_BLOCK_KEY.match(key)) and m.group(1) == "up_blocks" and m.group(3) == "attentions"
    }
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []

    def put(ldm_key: str, value: torch.Tensor, key: str) -> None:
        if UNET_PREFIX + ldm_key in out:
            unknown.append(key)  # two diffusers weights would land on one original key
        out[UNET_PREFIX + ldm_key] = value

    for key, value in unet_state_dict.items():
        top = next((p for p in _UNET_TOP_LEVEL if key.startswith(p)), None)
        block = _UNET_BLOCK_KEY.match(key)
        mid = _MID_BLOCK_KEY.match(key)
        if top is not None:
            put(_UNET_TOP_LEVEL[top] + key[len(top):], value, key)
        elif block:
            kind, part, rest = block.group(1), block.group(3), block.group(5)
            level, index = int(block.group(2)), int(block.group(4))
            if kind == "down_blocks":
                first = 1 + level * (layers + 1)  # input_blocks.0 is conv_in
                if part == "resnets" and index < layers:
                    put(f"input_blocks.{first + index}.0.{_rename_resnet_part(rest)}", value, key)
                elif part == "attentions" and index < layers:
                    put(f"input_blocks.{first + index}.1.{rest}", value, key)
                elif part == "downsamplers" and index == 0 and rest.startswith("conv."):
                    put(f"input_blocks.{first + layers}.0.op.{rest[len('conv.'):]}", value, key)
                else:
                    unknown.append(key)
            else:
                first = level * (layers + 1)
                if part == "resnets" and index <= layers:
                    put(f"output_blocks.{first + index}.0.{_rename_resnet_part(rest)}", value, key)
                elif part == "attentions" and index <= layers:
                    put(f"output_blocks.{first + index}.1.{rest}", value, key)
                elif part == "upsamplers" and index == 0:
                    slot = 2 if level in up_levels_with_attention else 1
                    put(f"output_blocks.{first + layers}.{slot}.{rest}", value, key)
                else:
                    unknown.append(key)
        elif mid:
            part, index, rest = mid.group(1), int(mid.group(2)), mid.group(3)
            if part == "resnets":
                put(f"middle_block.{2 * index}.{_rename_resnet_part(rest)}", value, key)
            else:
                put(f"middle_block.{2 * index + 1}.{rest}", value, key)
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error("UNet", unknown)
    return out


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------

_VAE_ENCODER_BLOCK_KEY = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)$")
_VAE_DECODER_BLOCK_KEY = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$")
_VAE_MID_KEY = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_VAE_SAME_NAME = re.compile(r"^((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.")
_VAE_ATTENTION_PARTS = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _vae_resnet_part(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest


def vae_to_ldm(vae_state_dict: dict, vae_config) -> dict:
    """Rename a diffusers `AutoencoderKL` state dict to the original `first_stage_model.*` keys.

    The original decoder numbers its levels from the bottom (`up.0` is the last diffusers up
    block), and its mid-block attention uses 1x1 convolutions where diffusers uses linear layers,
    so those four weights gain two trailing unit dimensions.
    """
    levels = len(_config_value(vae_config, "up_block_types") or ())
    if levels == 0:
        raise ConversionError("the VAE config has no up_block_types, so its decoder levels cannot be numbered.")
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in vae_state_dict.items():
        if _VAE_SAME_NAME.match(key):
            out[VAE_PREFIX + key] = value
        elif key.startswith(("encoder.conv_norm_out.", "decoder.conv_norm_out.")):
            out[VAE_PREFIX + key.replace("conv_norm_out.", "norm_out.", 1)] = value
        elif m := _VAE_ENCODER_BLOCK_KEY.match(key):
            level, part, index, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if part == "resnets":
                out[f"{VAE_PREFIX}encoder.down.{level}.block.{index}.{_vae_resnet_part(rest)}"] = value
            elif index == 0:
                out[f"{VAE_PREFIX}encoder.down.{level}.downsample.{rest}"] = value
            else:
                unknown.append(key)
        elif m := _VAE_DECODER_BLOCK_KEY.match(key):
            level, part, index, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if level >= levels:
                unknown.append(key)
            elif part == "resnets":
                out[f"{VAE_PREFIX}decoder.up.{levels - 1 - level}.block.{index}.{_vae_resnet_part(rest)}"] = value
            elif index == 0:
                out[f"{VAE_PREFIX}decoder.up.{levels - 1 - level}.upsample.{rest}"] = value
            else:
                unknown.append(key)
        elif m := _VAE_MID_KEY.match(key):
            coder, part, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if part == "resnets":
                out[f"{VAE_PREFIX}{coder}.mid.block_{index + 1}.{_vae_resnet_part(rest)}"] = value
                continue
            name = next((p for p in _VAE_ATTENTION_PARTS if rest.startswith(p)), None)
            if index != 0 or name is None:
                unknown.append(key)
                continue
            if name != "group_norm." and rest.endswith("weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv
            out[f"{VAE_PREFIX}{coder}.mid.attn_1.{_VAE_ATTENTION_PARTS[name]}{rest[len(name):]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error("VAE", unknown)
    return out


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------

_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_CLIP_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_QKV_KEY = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
# A buffer some transformers versions save; it is always arange(77), and diffusers' loader would
# report it as an unused weight, so it is left out.
_POSITION_IDS = "embeddings.position_ids"


def text_encoder_layout(text_encoder) -> str:
    """'open_clip' for SD 2.x's OpenCLIP-trained encoder (GELU activations), 'clip' for SD 1.x's (quick GELU)."""
    config = getattr(text_encoder, "config", text_encoder)
    return "open_clip" if _config_value(config, "hidden_act") == "gelu" else "clip"


def text_encoder_to_ldm(te_state_dict: dict, te_config, layout: str) -> dict:
    """Rename a transformers `CLIPTextModel` state dict to the original `cond_stage_model.*` keys.

    layout 'clip' (SD 1.x) keeps the Hugging Face names under `cond_stage_model.transformer.text_model.`;
    layout 'open_clip' (SD 2.x) uses OpenCLIP's names under `cond_stage_model.model.`, with q, k and v
    fused into one `in_proj_weight` in that order. diffusers' SD 2.x text encoder already lacks
    OpenCLIP's last layer (SD 2.x reads the penultimate one), so the file holds one resblock fewer
    than the original release; the original loaders use the penultimate layer and never read it.
    """
    if layout not in TEXT_ENCODER_LAYOUTS:
        raise ValueError(f"text encoder layout must be one of {TEXT_ENCODER_LAYOUTS}, not {layout!r}.")
    # transformers < 5.6 nests everything under `text_model.`; newer versions flatten it.
    flat = {key.removeprefix("text_model."): value for key, value in te_state_dict.items()}
    flat.pop(_POSITION_IDS, None)
    expected_layers = _config_value(te_config, "num_hidden_layers")
    found_layers = {int(m.group(1)) for key in flat if (m := _CLIP_LAYER_KEY.match(key))}
    if expected_layers is not None and found_layers != set(range(expected_layers)):
        raise ConversionError(
            f"the text encoder weights hold layers {sorted(found_layers)} but its config says "
            f"{expected_layers}; save the text encoder again before exporting."
        )
    if layout == "clip":
        return {CLIP_PREFIX + key: value for key, value in flat.items()}

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in flat.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            out[OPEN_CLIP_PREFIX + _OPEN_CLIP_TOP_LEVEL[key]] = value
            continue
        layer = _CLIP_LAYER_KEY.match(key)
        if not layer:
            unknown.append(key)
            continue
        index, rest = int(layer.group(1)), layer.group(2)
        if m := _QKV_KEY.match(rest):
            qkv.setdefault((index, m.group(2)), {})[m.group(1)] = value
            continue
        part = next((p for p in _OPEN_CLIP_LAYER_PARTS if rest.startswith(p)), None)
        if part is None:
            unknown.append(key)
            continue
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{index}.{_OPEN_CLIP_LAYER_PARTS[part]}{rest[len(part):]}"] = value
    for (index, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"encoder.layers.{index}.self_attn.*_proj.{param}")
            continue
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{index}.attn.in_proj_{param}"] = fused
    if unknown:
        raise _unknown_keys_error("text encoder", unknown)
    return out


# ---------------------------------------------------------------------------------------------
# Whole pipeline
# ---------------------------------------------------------------------------------------------

SDXL_EMBEDDERS_PREFIX = "conditioner.embedders."


def pipeline_to_ldm(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """All components in one original-layout state dict (tensors shared with the models). A second text encoder
    (`text_encoder_2`) means SDXL, whose text encoders live under `conditioner.embedders` instead."""
    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config))
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    if text_encoder_2 is not None:
        state.update(sdxl_text_encoders_to_ldm(text_encoder, text_encoder_2))
    else:
        state.update(
            text_encoder_to_ldm(text_encoder.state_dict(), text_encoder.config, text_encoder_layout(text_encoder))
        )
    return state


def sdxl_text_encoders_to_ldm(text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """SDXL's text encoders as the original SGM code names them: `conditioner.embedders.0.transformer.*` (CLIP
    ViT-L, Hugging Face names, as SD 1.x) and `conditioner.embedders.1.model.*` (OpenCLIP bigG, as SD 2.x, plus its
    `text_projection`); the refiner has only the OpenCLIP one (`text_encoder` None), as `embedders.0`.

    The UNet and VAE need nothing of their own: SDXL's differ from SD 1.x/2.x only in how many levels, layers and
    transformer blocks they have, which unet_to_ldm and vae_to_ldm read from the config; the "text_time" embedding
    goes where the layout keeps class embeddings (`label_emb.0.*`)."""
    embedders = []
    if text_encoder is not None:
        clip = text_encoder_to_ldm(text_encoder.state_dict(), text_encoder.config, "clip")
        embedders.append({k.replace("cond_stage_model.", "", 1): v for k, v in clip.items()})
    te2 = dict(text_encoder_2.state_dict())
    projection = te2.pop("text_projection.weight", None)
    if projection is None:
        raise ConversionError("the second SDXL text encoder has no text_projection, so it is not SDXL's OpenCLIP bigG encoder.")
    open_clip = {"model." + k[len(OPEN_CLIP_PREFIX):]: v
                 for k, v in text_encoder_to_ldm(te2, text_encoder_2.config, "open_clip").items()}
    open_clip["model.text_projection"] = projection.T  # OpenCLIP multiplies x @ P; a Linear computes x @ W.T
    embedders.append(open_clip)
    return {f"{SDXL_EMBEDDERS_PREFIX}{index}.{key}": value for index, part in enumerate(embedders) for key, value in part.items()}


def save_single_file(
    unet,
    vae,
    text_encoder,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
    *,
    text_encoder_2=None,
) -> Path:
    """Write the pipeline as one A1111/ComfyUI-style `.safetensors` file, atomically (SDXL when `text_encoder_2`)."""
    with torch.no_grad():
        return save_state_file(pipeline_to_ldm(unet, vae, text_encoder, text_encoder_2), path, dtype, metadata)


def save_state_file(state: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype = torch.float16,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write an original-layout state dict as one `.safetensors` file, atomically.

    Floating-point tensors are cast to `dtype` (fp16 by default: half the size, what those tools
    load anyway); every tensor is made contiguous and moved to the CPU, as safetensors requires.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"a single-file checkpoint must end in .safetensors, but the path given is {path}.")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.float16, not {dtype}.")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings; convert the values with str() first.")

    with torch.no_grad():
        tensors = {
            key: (value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().cpu()).contiguous()
            for key, value in state.items()
        }
    save_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    log.info("wrote %d tensors (%s) to %s", len(tensors), dtype, path)
    return path
