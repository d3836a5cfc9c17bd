"""The world model: a small Stable Diffusion (the real AutoencoderKL, UNet2DConditionModel and CLIPTextModel with
the real CLIP tokenizer) pretrained on a procedural world of shapes and creatures on grass, water, sky or in a room,
as photos, paintings or sketches (`benchmarks/quality/`). It is what the CPU demo teaches a new subject, since no
real weights can be downloaded everywhere; the quality harness measures training on it.

It travels as a pack: fp16 safetensors in parts of at most 15 MiB, whose metadata holds the settings it was built
with. Of the token embedding's 49408 rows a pack keeps only those pretraining moved (the world's words); the rest
are rebuilt from their seed, which keeps the pack a fifth of the folder's size.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .tiny import TOKENIZER_DIR

# The world's own grammar ("a photo of a red star on grass"; a subject takes the colour's place): SD presets' "photo of
# zwx star" / "photo of a star" are captions the world model never saw, and it draws smears for them.
INSTANCE_PROMPT = "a photo of {token} {class}"
CLASS_PROMPT = "a photo of a {class}"

PART_BYTES = 15 * 2 ** 20  # the GPU machine's tool brings back files of up to 16 MiB
PARTS = ("unet", "vae", "text_encoder")


@dataclass(frozen=True)
class Architecture:
    """What `build_pipeline` needs to know: sizes only (the harness's settings add how it was trained)."""
    size: int                      # pixels
    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]
    unet_layers: int
    head_dim: int                  # channels per attention head
    text_width: int
    text_layers: int
    seed: int                      # the random start, including the token embedding's rows a pack leaves out

    @classmethod
    def of(cls, settings: dict) -> "Architecture":
        """The architecture's fields out of a fuller settings record (a pack's metadata, the harness's settings)."""
        return cls(**{f.name: tuple(v) if isinstance(v := settings[f.name], list) else v for f in dataclasses.fields(cls)})

    def attention_heads(self) -> tuple[int, ...]:
        return tuple(max(1, c // self.head_dim) for c in self.unet_channels)


def build_pipeline(arch: Architecture):
    """A StableDiffusionPipeline of this architecture with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(arch.seed)
    levels = len(arch.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    latent_size = arch.size // 2 ** (len(arch.vae_channels) - 1)
    # attention_head_dim is diffusers' (historically misnamed) number of heads per level
    unet = UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, down_block_types=down,
                                up_block_types=up, block_out_channels=arch.unet_channels, layers_per_block=arch.unet_layers,
                                cross_attention_dim=arch.text_width, attention_head_dim=arch.attention_heads(),
                                norm_num_groups=32 if all(c % 32 == 0 for c in arch.unet_channels) else 8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels), block_out_channels=arch.vae_channels,
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=arch.size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=arch.text_width, intermediate_size=4 * arch.text_width,
        num_attention_heads=max(1, arch.text_width // 32), num_hidden_layers=arch.text_layers, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=arch.text_width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    with torch.no_grad():  # seeded on its own: a pack stores only the rows pretraining moves and rebuilds the rest
        token_embedding(text_encoder).copy_(initial_token_embedding(arch))
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="<|endoftext|>")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def token_embedding(text_encoder) -> torch.Tensor:
    return text_encoder.get_input_embeddings().weight


def initial_token_embedding(arch: Architecture) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 + arch.seed)
    return torch.randn(49408, arch.text_width, generator=generator).mul_(0.02).to(torch.float16).float()


def pack_parts(folder: Path, stem: str = "*") -> list[Path]:
    """A pack's files in order (`stem.pack.00`, `.01`, ...)."""
    return sorted(Path(folder).glob(f"{stem}.pack.[0-9][0-9]"))


def write_pack(pipe, arch: Architecture, out: Path, stem: str, metadata: dict[str, str]) -> list[Path]:
    """The pipeline's three models as a pack in `out` (replacing one of the same stem); `metadata` (strings) goes
    into the safetensors header beside the architecture and the VAE's scaling factor."""
    from safetensors.torch import save

    tensors = {f"{name}.{key}": value.detach().to("cpu", torch.float16).contiguous()
               for name in PARTS for key, value in getattr(pipe, name).state_dict().items()}
    embedding_key = next(k for k in tensors if k.startswith("text_encoder.") and k.endswith("token_embedding.weight"))
    embedding = tensors.pop(embedding_key)
    rows = (embedding.float() != initial_token_embedding(arch)).any(1).nonzero()[:, 0]
    tensors["token_rows"] = rows.to(torch.int64)
    tensors["token_values"] = embedding[rows].contiguous()
    meta = {**metadata, "architecture": json.dumps(dataclasses.asdict(arch)),
            "scaling_factor": str(pipe.vae.config.scaling_factor)}
    blob = save(tensors, metadata=meta)
    out.mkdir(parents=True, exist_ok=True)
    for old in pack_parts(out, stem):
        old.unlink()
    parts = []
    for i, start in enumerate(range(0, len(blob), PART_BYTES)):
        path = out / f"{stem}.pack.{i:02d}"
        path.write_bytes(blob[start:start + PART_BYTES])
        parts.append(path)
    return parts


def pack_metadata(parts: list[Path]) -> dict[str, str]:
    """The pack's metadata, read from the safetensors header (8 bytes of its length, then JSON) of the first part."""
    if not parts:
        raise FileNotFoundError("no world model pack: its files end in .pack.00, .pack.01, ...")
    with parts[0].open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length)).get("__metadata__", {})


def unpack_to(parts: list[Path], folder: Path) -> None:
    """The pack as a diffusers pipeline folder that `models.load_base_model` loads, written whole or not at all."""
    from .fileio import atomic_dir

    pipe, _ = read_pack(parts)
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def read_pack(parts: list[Path]):
    """The pipeline a pack holds (on the CPU, in fp32), and its metadata."""
    from safetensors.torch import load

    meta = pack_metadata(parts)
    arch = Architecture.of(json.loads(meta["architecture"]))
    tensors = load(b"".join(p.read_bytes() for p in parts))
    pipe = build_pipeline(arch)
    embedding = initial_token_embedding(arch)
    embedding[tensors.pop("token_rows")] = tensors.pop("token_values").float()
    for name in PARTS:
        part = getattr(pipe, name)
        state = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
        if name == "text_encoder":  # its key's prefix differs between transformers versions
            state[next(k for k in part.state_dict() if k.endswith("token_embedding.weight"))] = embedding
        missing, unexpected = part.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "position_ids" not in m]:
            raise ValueError(f"the pack does not fit the {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    pipe.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return pipe, meta
