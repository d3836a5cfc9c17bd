"""Speed and memory of dreamnb's trainer and sampler, beside the diffusers DreamBooth example scripts.

    python benchmarks/bench.py                  # on a GPU: full SD-1.5 architecture, random weights
    python benchmarks/bench.py --tiny           # on a CPU: the tiny model, to check the script itself
    python benchmarks/bench.py --reference .ref # also run diffusers' train_dreambooth(.py|_lora.py) from .ref/
    python benchmarks/bench.py --reference .ref --reference-gpu 1   # 2 GPUs: the reference beside, in half the time
    python benchmarks/bench.py --reference .ref --configs xl-lora16,xl-t4,xl-sample   # SDXL (see benchmarks/README.md)
    python benchmarks/bench.py --reference .ref --configs flux-lora16,flux-lora16-1024  # FLUX.1 [dev]

Builds the SD-1.5 UNet (859.5M), text encoder (123.1M) and VAE (83.7M) from their configs with random
weights (nothing is downloaded), 20 generated 512 px photos, and measures each configuration in a fresh
process: steady-state s/step and images/s, time to the first step, the projected wall time of the whole
default run (1500 UNet + 350 text-encoder steps), and peak GPU memory (allocated and reserved).
Prints a table; `--json FILE` keeps the raw figures with the machine and versions they were taken on, and
`--table FILE` prints the table again from such a file (the READMEs' figures come from committed ones).

The `xl-` configurations do the same for SDXL base (UNet 2567.5M, text encoders 123.1M + 694.7M, VAE 83.7M, from
SDXL's configs with random weights), at 1024 px beside diffusers' train_dreambooth_lora_sdxl.py, and sample with
dreamnb's `generate` against a plain diffusers StableDiffusionXLPipeline (`xl-sample`). The `flux-` configurations
train a LoRA of FLUX.1 [dev]'s architecture (transformer 11.9B, T5 encoder 4.8B, built in bf16 on the GPU) beside
diffusers' train_dreambooth_lora_flux.py, at 512 and 1024 px.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# name: (what it is, TrainConfig overrides, reference script + arguments or None)
CONFIGS = {
    "a": ("TheLastBen's job: UNet + text encoder, bf16, batch 1, 512 px (reference: 8-bit Adam + grad. checkpointing); "
          "dreamnb: its defaults (bf16 weights + stochastic-rounding AdamW, checkpointing 'auto' = off when it fits)",
          dict(text_encoder_steps=350),
          ("train_dreambooth.py", ["--train_text_encoder", "--use_8bit_adam", "--gradient_checkpointing", "--mixed_precision", "bf16"])),
    "a-gc": ("(a) with gradient checkpointing forced on in dreamnb too",
             dict(text_encoder_steps=350, gradient_checkpointing="on"),
             None),
    # the optimizers the quality harness compares (benchmarks/quality), each in (a)'s job, for their speed and memory
    "a-kahan": ("(a) with optimizer 'adamw-bf16-kahan': bf16 weights, compensated (Kahan) sums instead of stochastic rounding",
                dict(text_encoder_steps=350, optimizer="adamw-bf16-kahan"),
                None),
    "a-v32": ("(a) with optimizer 'adamw-bf16-v32': stochastic rounding, fp32 second moment",
              dict(text_encoder_steps=350, optimizer="adamw-bf16-v32"),
              None),
    "a-adamw": ("(a) with fp32 AdamW: fp32 master weights, bf16 autocast (the quality harness's reference)",
                dict(text_encoder_steps=350, optimizer="adamw"),
                None),
    "b": ("UNet only, AdamW, bf16",
          dict(text_encoder_steps=0, optimizer="adamw", gradient_checkpointing="off"),
          ("train_dreambooth.py", ["--mixed_precision", "bf16"])),
    "c": ("(a) with prior preservation (batch: 1 photo + 1 class image)",
          dict(text_encoder_steps=350, with_prior_preservation=True),
          ("train_dreambooth.py", ["--train_text_encoder", "--use_8bit_adam", "--gradient_checkpointing", "--mixed_precision", "bf16",
                                   "--with_prior_preservation", "--class_prompt", "photo of a person", "--num_class_images", "20"])),
    "d4": ("LoRA rank 4, UNet",
           dict(method="lora", lora_rank=4, lora_alpha=4, text_encoder_steps=0, unet_lr=1e-4),
           ("train_dreambooth_lora.py", ["--rank", "4", "--mixed_precision", "bf16"])),
    "d16": ("LoRA rank 16, UNet, grad. checkpointing",
            dict(method="lora", lora_rank=16, lora_alpha=16, text_encoder_steps=0, unet_lr=1e-4, gradient_checkpointing="on"),
            ("train_dreambooth_lora.py", ["--rank", "16", "--gradient_checkpointing", "--mixed_precision", "bf16"])),
    "e": ("T4 stand-in: fp16 + loss scaling, UNet + text encoder, 15 GB cap",
          dict(text_encoder_steps=350, mixed_precision="fp16"),
          None),
    # SDXL base (issue 18): the face preset's SDXL values (`TrainConfig.from_preset(family="sdxl")`: LoRA rank 16 on
    # the UNet, 1024 px, text encoders frozen) with these overrides, on the SDXL model built by `sdxl_pipeline`.
    "xl-lora16": ("SDXL: LoRA rank 16 (UNet), 1024 px, batch 1, bf16; grad. checkpointing off in both (it fits)",
                  dict(method="lora", lora_rank=16, lora_alpha=16, text_encoder_steps=0, unet_lr=1e-4, gradient_checkpointing="off"),
                  ("train_dreambooth_lora_sdxl.py", ["--rank", "16", "--mixed_precision", "bf16", "--learning_rate", "1e-4"])),
    # FLUX.1 [dev] (issue 30): the face preset's FLUX.1 values (`Family.preset_overrides`: LoRA rank 16 on the
    # transformer, text encoders frozen, guidance input 1) on the architecture built by `flux_pipeline`; the reference
    # is diffusers' train_dreambooth_lora_flux.py with its own default LoRA targets (the same layers) at the same rank.
    "flux-lora16": ("FLUX.1 [dev]: LoRA rank 16 (transformer), 512 px, batch 1, bf16; grad. checkpointing off in both",
                    dict(lora_rank=16, lora_alpha=16, gradient_checkpointing="off"),
                    ("train_dreambooth_lora_flux.py", ["--rank", "16", "--mixed_precision", "bf16", "--learning_rate", "1e-4",
                                                       "--guidance_scale", "1"])),
    "flux-lora16-1024": ("FLUX.1 [dev]: LoRA rank 16 (transformer), 1024 px, batch 1, bf16; grad. checkpointing off in both",
                         dict(lora_rank=16, lora_alpha=16, gradient_checkpointing="off", resolution=1024),
                         ("train_dreambooth_lora_flux.py", ["--rank", "16", "--mixed_precision", "bf16", "--learning_rate", "1e-4",
                                                            "--guidance_scale", "1", "--resolution", "1024"])),
    "xl-t4": ("SDXL T4 stand-in: the face preset's SDXL defaults as shipped (LoRA rank 16, 1024 px, prior preservation: "
              "1 photo + 1 class image, checkpointing 'auto') in fp16 math, 15 GB cap, no bitsandbytes",
              dict(mixed_precision="fp16", with_prior_preservation=True),
              None),
}
SAMPLING = ("f", "xl-sample")  # measured by run_sampling / run_sampling_xl, not trained
T4_STAND_INS = ("e", "xl-t4")  # run under a 15 GB cap: a Colab T4 has 15 GB
CLASS_IMAGES = {"c": "class", "xl-t4": "class-xl"}  # configurations with prior preservation: their shared class images
T4_FP16_TFLOPS = 65  # the T4's published fp16 tensor-core peak; projections assume 30-40% of it is reached
DEFAULT_RUN = (350, 1500)  # text-encoder steps, UNet steps: what the face preset trains (SDXL: 0 + 1500)


def family_of(name: str) -> str:
    """The model family a configuration runs on (`dreamnb.families` key), from its name's prefix."""
    return "sdxl" if name.startswith("xl-") else "flux1" if name.startswith("flux-") else "sd1"


def model_paths(workdir: Path, family: str) -> tuple[Path, Path]:
    """The saved base model and the photos of one family (SDXL's at 1024 px)."""
    suffix = {"sd1": "", "sdxl": "-xl", "flux1": "-flux"}[family]
    return workdir / f"model{suffix}", workdir / f"photos{suffix}"


def resolution_for(name: str, tiny: bool) -> int:
    if tiny:
        return 64
    return CONFIGS.get(name, ("", {}, None))[1].get("resolution") or {"sdxl": 1024}.get(family_of(name), 512)


# --- the model and photos ------------------------------------------------------------------------------

def sd15_pipeline(tiny: bool):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreamnb.tiny import TOKENIZER_DIR, tiny_pipeline

    if tiny:
        return tiny_pipeline("sd1", seed=0)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute
        unet = UNet2DConditionModel(  # stable-diffusion-v1-5/unet/config.json
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(  # stable-diffusion-v1-5/vae/config.json
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14 text model
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407,
        ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text_encoder.cpu(), unet=unet.cpu(),
                                   tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(tiny: bool):
    """SDXL base with random weights (tiny: dreamnb.tiny's). The configs are stabilityai/stable-diffusion-xl-base-1.0's
    (unet/, vae/, text_encoder/, text_encoder_2/, scheduler/ config.json), checked against Stability-AI/generative-models
    configs/inference/sd_xl_base.yaml (commit 3df5c81: model_channels 320, channel_mult [1, 2, 4], transformer_depth
    [1, 2, 10] with the first level unused (attention_resolutions [4, 2]), num_head_channels 64 -> 5/10/20 heads, which
    diffusers calls attention_head_dim; context_dim 2048; adm_in_channels 2816 = 1280 pooled + 6 x 256 size/crop ids;
    scale_factor 0.13025; the VAE's ch_mult [1, 2, 4, 4]), against the diffusers-format config.json files as public
    repositories reproduce them, and against diffusers' single-file loader (bigG = laion/CLIP-ViT-bigG-14-laion2B-39B-b160k).
    Counted here from these configs (meta device): UNet 2567.5M, text encoders 123.1M + 694.7M, VAE 83.7M."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dreamnb.tiny import TOKENIZER_DIR, tiny_sdxl_pipeline

    if tiny:
        return tiny_sdxl_pipeline("sdxl", seed=0)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        unet = UNet2DConditionModel(  # stable-diffusion-xl-base-1.0/unet/config.json
            sample_size=128, in_channels=4, out_channels=4, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
        )
        vae = AutoencoderKL(  # stable-diffusion-xl-base-1.0/vae/config.json: SD's VAE layout, retrained; overflows in fp16
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.13025, force_upcast=True,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14's text model, as SD 1.5's
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407,
        ))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(  # OpenCLIP ViT-bigG/14's text model
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=0,
        ))
    scheduler = EulerDiscreteScheduler(  # stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
    )
    # bigG's tokenizer is CLIP's BPE vocabulary padding with "!" (id 0) instead of <|endoftext|> (see dreamnb.tiny)
    return StableDiffusionXLPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), text_encoder_2=text_encoder_2.cpu(), unet=unet.cpu(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"),
        scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def flux_pipeline(tiny: bool):
    """FLUX.1 [dev] with random weights (tiny: dreamnb.tiny's). The configs are black-forest-labs/FLUX.1-dev's
    (transformer/, vae/, scheduler/ config.json; text_encoder: openai/clip-vit-large-patch14's text model; text_encoder_2:
    google/t5-v1_1-xxl's encoder), as diffusers' own tests and docs give them: transformer 19 double + 38 single blocks,
    24 heads of 128, joint_attention_dim 4096, pooled 768, guidance embedding, rope axes (16, 56, 56); VAE 16 latent
    channels, scale 0.3611, shift 0.1159, no quant convs. T5's vocabulary cannot be downloaded here: its tokenizer is
    dreamnb.tiny's (ids below T5's 32128), which changes nothing the benchmark measures (512 tokens are padded anyway).
    Built in bf16 on the GPU (11.9B + 4.8B weights: fp32 would not fit beside each other)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from dreamnb.tiny import TOKENIZER_DIR, tiny_flux_pipeline, tiny_t5_tokenizer

    if tiny:
        return tiny_flux_pipeline(seed=0)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.3611,
                                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407))
            text_encoder_2 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                                     num_layers=24, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6))
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae.cpu(), text_encoder=text_encoder.cpu(), text_encoder_2=text_encoder_2.cpu(),
                        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), tokenizer_2=tiny_t5_tokenizer(),
                        transformer=transformer.cpu())


PIPELINES = {"sd1": sd15_pipeline, "sdxl": sdxl_pipeline, "flux1": flux_pipeline}


def unet_step_tflop(unet_config: dict, batch: int, resolution: int) -> dict:
    """FLOPs of one training step of a UNet with frozen weights (LoRA: the adapters' own ~2% left out), counted with
    torch.utils.flop_counter on the meta device (no memory, no GPU): forward, and backward through the activations.
    With gradient checkpointing a step is forward + forward again + backward."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(False)
        side = resolution // 8
        latents = torch.randn(batch, unet.config.in_channels, side, side, requires_grad=True)
        embeds = torch.randn(batch, 77, unet.config.cross_attention_dim)
        extra = None
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra = dict(text_embeds=torch.randn(batch, pooled), time_ids=torch.randn(batch, 6))
        timesteps = torch.full((batch,), 500)
    with FlopCounterMode(display=False) as forward:
        out = unet(latents, timesteps, embeds, added_cond_kwargs=extra).sample
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    f, b = forward.get_total_flops() / 1e12, backward.get_total_flops() / 1e12
    return {"forward": f, "backward": b, "step": f + b, "step_checkpointed": 2 * f + b}


def make_photos(folder: Path, count: int, size: int) -> None:
    """Varied synthetic 'photos' (gradients, discs, noise) so every photo is a different image."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = np.linspace(0, 255, size, dtype=np.float32)
        img = np.stack([np.add.outer(base * rng.random(), base * rng.random()) / 2 for _ in range(3)], -1)
        img = Image.fromarray(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 16, size // 4))]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 255, 3).tolist()))
        img.save(folder / f"photo-{i:02d}.png")


def prepare(workdir: Path, tiny: bool, family: str = "sd1") -> dict:
    from dreamnb.families import get

    model_dir, photos = model_paths(workdir, family)
    size = 64 if tiny else 1024 if family == "sdxl" else 512
    if not (model_dir / "model_index.json").exists():
        t = time.time()
        pipe = PIPELINES[family](tiny)
        counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6 for name in (*get(family).trained_parts, "vae")}
        if family == "sdxl" and not tiny:  # saved in fp16, as the Hub's fp16 variant: half the 14 GB to write and read;
            pipe.to(dtype=__import__("torch").float16)  # every loader casts to its own dtype anyway (FLUX.1's: bf16 as built)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        (model_dir.parent / f"params{model_dir.name[len('model'):]}.json").write_text(json.dumps(counts))
        print(f"built the model in {time.time() - t:.0f} s: " + ", ".join(f"{k} {v:.1f}M" for k, v in counts.items()), flush=True)
    if not photos.exists():
        make_photos(photos, 20, size)
    return {"model": str(model_dir), "photos": str(photos), "size": size}


# --- one dreamnb configuration, in its own process ------------------------------------------------------

def run_dreamnb(name: str, workdir: Path, tiny: bool, unet_steps: int, te_steps: int,
                session_name: str | None = None, extra: dict | None = None, resume: bool = False) -> dict:
    """One configuration; `extra` overrides settings (batch size, CUDA graphs, checkpoints); `resume` continues
    the session's attempt from its newest checkpoint.
    Under `accelerate launch` every process runs this and reports its own figures (rank, peak memory)."""
    import shutil

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from dreamnb.config import TrainConfig
    from dreamnb.session import create_session, open_session, update_attempt
    from dreamnb.train import train

    started = time.time()  # after the imports: a notebook has made them in its setup cell
    # one process, or this one of several under accelerate launch (on the CPU when --tiny: the trainer's Accelerator agrees)
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cuda = torch.cuda.is_available()
    family = family_of(name)
    model_dir, photos_dir = model_paths(workdir, family)
    if name in T4_STAND_INS and cuda:  # a Colab T4 has 15 GB
        torch.cuda.set_per_process_memory_fraction(15e9 / torch.cuda.get_device_properties(0).total_memory)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    session_dir = workdir / (session_name or f"session-{name}")
    if not resume and processes.is_main_process:
        shutil.rmtree(session_dir, ignore_errors=True)
        session = create_session(session_dir)
        for photo in sorted(photos_dir.iterdir()):
            shutil.copy(photo, session.instance_dir / photo.name)
        if name == "c":  # the same 20 class images the reference uses, generated once
            shutil.copytree(workdir / "class", session.class_dir, dirs_exist_ok=True)
    processes.wait_for_everyone()
    session = open_session(session_dir)
    overrides = {**CONFIGS[name][1], **(extra or {})}
    overrides["text_encoder_steps"] = min(overrides.get("text_encoder_steps", 0), te_steps)
    if not cuda:
        overrides.pop("mixed_precision", None)  # fp16 needs a GPU; the CPU run only checks the script
    settings = dict(token="zwx", resolution=resolution_for(name, tiny), seed=0, unet_steps=unet_steps,
                    with_prior_preservation=False, num_class_images=20, checkpoint_every=0, log_every=10)
    config = TrainConfig.from_preset("face", family=family, **{**settings, **overrides})
    from dreamnb.models import load_base_model

    base = load_base_model(model_dir)
    loaded_s = time.time() - started
    if name in CLASS_IMAGES and not resume:  # the 20 class images generated once (c: the reference's too), where
        from dreamnb.data import class_images_dir  # the trainer looks for them

        folder = class_images_dir(session.class_dir, base.info.cache_key, config.resolved_class_prompt(), config.resolution)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(sorted((workdir / CLASS_IMAGES[name]).glob("*.png"))):
            shutil.copy(image, folder / f"class-{i:04d}.png")
    marks: list[tuple[str, int, float]] = []
    messages: list[str] = [f"{loaded_s:6.1f}s loaded the base model"]

    memory: list[str] = []  # where the peak comes from: GPU memory at each message and the first logged steps

    def note_memory(what: str) -> None:
        if cuda:
            allocated, reserved, peaks = torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            memory.append(f"{what}: allocated {allocated / 1e9:.1f}, reserved {reserved / 1e9:.1f}, "
                          f"peak so far {peaks[0] / 1e9:.1f} / {peaks[1] / 1e9:.1f} GB")

    def on_event(event):
        if event.kind == "step":
            marks.append((event.phase, event.step, time.time()))
            if len(marks) <= 3:
                note_memory(f"{event.phase} step {event.step}")
        elif event.message:
            messages.append(f"{time.time() - started:6.1f}s {event.message}")
            note_memory(event.message[:60])

    if resume and processes.is_main_process:  # as a runtime lost after that checkpoint leaves it (a finished one has nothing to resume)
        attempt = session.attempt(None)
        shutil.rmtree(session.attempt_dir(attempt.name) / "final", ignore_errors=True)
        update_attempt(session, attempt.name, status="interrupted")
    result = train(session, config, base, callback=on_event, progress=False, resume=resume)
    if result.status != "finished":
        raise RuntimeError(result.message)
    if resume:  # the attempt went on with the settings it started with
        config = TrainConfig.from_dict(json.loads((session.attempt_dir(result.attempt) / "config.json").read_text()))
    out = {"name": name, "messages": messages, "memory": memory, "wall_s": time.time() - started, "steps_done": result.steps_done, "rank": processes.process_index, "processes": processes.num_processes,
           "images_per_step": config.train_batch_size * (2 if config.with_prior_preservation else 1) * processes.num_processes}
    for phase, key in (("text_encoder", "text_encoder"), (base.family.denoiser, "unet")):  # "unet": the denoiser's phase
        points = [(step, t) for p, step, t in marks if p == phase]
        if len(points) >= 3:  # skip the first logged interval: warm-up and graph capture
            (s0, t0), (s1, t1) = points[1], points[-2 if len(points) >= 4 else -1]  # the last may hold a checkpoint write
            out[f"{key}_s_per_step"] = (t1 - t0) / (s1 - s0)
    first = marks[0] if marks else None
    per_step = out.get(f"{first[0]}_s_per_step", 0) if first else 0
    out["startup_s"] = (first[2] - started) - first[1] * per_step if first else None
    te, un = DEFAULT_RUN
    if "unet_s_per_step" in out:
        te_rate = out.get("text_encoder_s_per_step", out["unet_s_per_step"]) if overrides.get("text_encoder_steps") else 0
        out["projected_default_run_s"] = out["startup_s"] + te * te_rate + un * out["unet_s_per_step"]
    if cuda:
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    if name == "xl-t4":  # the T4's time is projected from counted FLOPs (no T4 here), as for SD 1.5's in the README
        flops = unet_step_tflop(dict(base.pipeline.unet.config), out["images_per_step"], config.resolution)
        out["unet_step_tflop"] = flops
        out["t4_projected_s_per_step"] = [flops["step_checkpointed"] / (T4_FP16_TFLOPS * share) for share in (0.4, 0.3)]
        out["t4_projected_default_run_s"] = [DEFAULT_RUN[1] * s for s in out["t4_projected_s_per_step"]]
    return out


def run_sampling(workdir: Path, tiny: bool) -> dict:
    """(f): 4 images and 1 image, 25 DPM-Solver++ steps, guidance 7.5; dreamnb's sampler (on a GPU also with the UNet
    compiled, and how far its images are from the plain ones) and diffusers' pipeline."""
    import torch

    from dreamnb.models import load_base_model
    from dreamnb.sample import SampleSettings, generate

    cuda = torch.cuda.is_available()
    t = time.time()
    base = load_base_model(workdir / "model")  # placed as a user's is: the GPU in fp16 when there is one
    pipe = base.pipeline
    load_s = time.time() - t
    size = 64 if tiny else 512
    out = {"name": "f", "load_s": load_s}
    from diffusers import DPMSolverMultistepScheduler

    def timed(run) -> float:
        return timed_warm(run, cuda)

    pipe.set_progress_bar_config(disable=True)
    for count in (1, 4):
        # the plain diffusers pipeline first, before dreamnb's sampler records its CUDA graphs on this UNet
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
        generators = [torch.Generator(pipe.device).manual_seed(i) for i in range(count)]
        out[f"diffusers_{count}_images_s"] = timed(lambda: pipe(["photo of zwx person"] * count, num_inference_steps=25,
                                                                height=size, width=size, generator=generators))

    def images(count: int, compile_unet: bool = False):
        settings = [SampleSettings(prompt="photo of zwx person", seed=i, num_inference_steps=25, width=size, height=size)
                    for i in range(count)]
        return generate(pipe, settings, batch_size=4, progress=False, compile_unet=compile_unet)

    for count in (1, 4):
        out[f"dreamnb_{count}_images_s"] = timed(lambda: images(count))
    if cuda:  # torch.compile on the CPU is not what a user would run
        import numpy as np

        plain = images(4)
        for count in (1, 4):  # the first call per batch size compiles (a cold cache unless run before on this machine)
            t = time.time()
            images(count, compile_unet=True)
            out[f"compile_{count}_images_first_call_s"] = time.time() - t
            out[f"dreamnb_compiled_{count}_images_s"] = timed(lambda: images(count, compile_unet=True))
        compiled = images(4, compile_unet=True)
        out["compiled_vs_plain_mean_abs_pixel_diff"] = float(np.mean([
            np.abs(np.asarray(a.image, np.float32) - np.asarray(b.image, np.float32)).mean() for a, b in zip(plain, compiled)]))
    # switching attempts: load two full attempts' UNets in turn onto the base already in memory
    switch = _attempt_switch_seconds(workdir, base)
    if switch is not None:
        out["switch_attempt_s"] = switch
    return out


def timed_warm(run, cuda: bool) -> float:
    """Seconds for one call after two warm-up calls (kernels chosen, CUDA graphs recorded)."""
    import torch

    for _ in range(2):
        run()
    if cuda:
        torch.cuda.synchronize()
    t = time.time()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.time() - t


def run_sampling_xl(workdir: Path, tiny: bool) -> dict:
    """(xl-sample): 1 image, 30 Euler steps (SDXL's own scheduler), guidance 7.5, 1024 px, warm. First the plain
    diffusers StableDiffusionXLPipeline as its documentation loads it (fp16 on the GPU; its VAE upcast around each
    decode), then dreamnb's `generate` on the model `load_base_model` placed; the same seed, and how far apart their
    images are (they should agree)."""
    import gc

    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from dreamnb.sample import SampleSettings, generate

    cuda = torch.cuda.is_available()
    model_dir, _ = model_paths(workdir, "sdxl")
    # --tiny checks the script: 5 steps (the CPU's time means nothing here)
    size, steps, guidance, prompt = 64 if tiny else 1024, 5 if tiny else 30, 7.5, "photo of zwx person"
    out: dict = {"name": "xl-sample", "steps": steps, "size": size}

    t = time.time()
    plain = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float16 if cuda else torch.float32)
    plain.to("cuda" if cuda else "cpu")
    out["diffusers_load_s"] = time.time() - t
    plain.set_progress_bar_config(disable=True)

    def diffusers_image():
        return plain(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                     generator=torch.Generator(plain.device).manual_seed(0)).images[0]

    out["diffusers_1_image_s"] = timed_warm(diffusers_image, cuda)
    reference = np.asarray(diffusers_image(), np.float32)
    plain = None  # its GPU memory goes before dreamnb loads the same model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    from dreamnb.models import load_base_model

    t = time.time()
    base = load_base_model(model_dir)  # placed as a user's is: the GPU in fp16 when there is one
    out["load_s"] = time.time() - t
    settings = [SampleSettings(prompt=prompt, seed=0, num_inference_steps=steps, guidance_scale=guidance, scheduler="euler",
                               width=size, height=size)]

    def dreamnb_image(compile_unet: bool = False):
        return generate(base.pipeline, settings, batch_size=1, progress=False, compile_unet=compile_unet)[0].image

    out["dreamnb_1_image_s"] = timed_warm(dreamnb_image, cuda)
    out["dreamnb_vs_diffusers_mean_abs_pixel_diff"] = float(np.abs(np.asarray(dreamnb_image(), np.float32) - reference).mean())
    out["decode"] = decode_probe(base.pipeline, size, cuda)
    if cuda:  # the playground's "compile" switch, as for (f); torch.compile on the CPU is not what a user would run
        t = time.time()
        dreamnb_image(compile_unet=True)
        out["compile_first_call_s"] = time.time() - t
        out["dreamnb_compiled_1_image_s"] = timed_warm(lambda: dreamnb_image(compile_unet=True), cuda)
    return out


def decode_probe(pipe, size: int, cuda: bool) -> dict:
    """Where xl-sample's time goes besides the UNet: one 1024-px VAE decode in the VAE's own dtype (fp32: SDXL's VAE
    overflows in fp16), and in bf16, which has fp32's range, with how far its pixels are from the fp32 decode."""
    import torch

    from dreamnb.sample import decode_latents

    latents = torch.randn(1, 4, size // 8, size // 8, device=pipe.vae.device, generator=torch.Generator(pipe.vae.device).manual_seed(0))
    out = {"vae_dtype": str(pipe.vae.dtype), f"{pipe.vae.dtype}_s".replace("torch.", ""): timed_warm(lambda: decode_latents(pipe, latents, size, size), cuda)}
    if cuda and pipe.vae.dtype == torch.float32:
        import numpy as np

        exact = np.asarray(decode_latents(pipe, latents, size, size)[0], np.float32)
        pipe.vae.to(torch.bfloat16)
        try:
            out["bfloat16_s"] = timed_warm(lambda: decode_latents(pipe, latents, size, size), cuda)
            out["bfloat16_mean_abs_pixel_diff"] = float(np.abs(np.asarray(decode_latents(pipe, latents, size, size)[0], np.float32) - exact).mean())
        finally:
            pipe.vae.to(torch.float32)
    return out


def _attempt_switch_seconds(workdir: Path, base) -> float | None:
    """Seconds to build a sampling pipeline for a trained attempt when the base is already loaded."""
    import torch

    from dreamnb.attempts import attempt_pipeline
    from dreamnb.session import list_sessions

    sessions = [s for s in list_sessions(workdir) if any(a.status == "finished" for a in s.attempts)]
    full = [s for s in sessions if (s.attempt_dir(s.attempts[-1].name) / "final" / "unet").is_dir()]
    if len(full) < 2:
        return None
    times = []
    for session in full[:2] * 2:
        t = time.time()
        attempt_pipeline(base, session, session.attempts[-1].name)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.time() - t)
    return max(times[1:])


# --- the reference scripts --------------------------------------------------------------------------------

class GpuMemoryPoller:
    """Peak GPU memory of another process, from nvidia-smi every 200 ms (what the reference figures used);
    of one GPU (`gpu`, nvidia-smi's index) or the largest of all."""

    def __init__(self, gpu: int | None = None):
        self.peak_mb, self._stop = 0, threading.Event()
        self._which = ["-i", str(gpu)] if gpu is not None else []
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", *self._which],
                                      capture_output=True, text=True, timeout=5).stdout.split()
                self.peak_mb = max([self.peak_mb] + [int(u) for u in used if u.isdigit()])
            except (OSError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_reference(name: str, workdir: Path, reference_dir: Path, steps: int, gpu: int | None = None, tiny: bool = False) -> dict:
    """diffusers' script for configuration `name`, on GPU `gpu` when given (else wherever CUDA puts it). Offline: the
    saved random-weight model and the photos from disk, no validation prompt, no Hub; `extra` comes last and wins
    (argparse keeps the last value: the LoRA configurations' --learning_rate)."""
    script, extra = CONFIGS[name][2]
    out_dir = workdir / f"reference-{name}"
    model_dir, photos_dir = model_paths(workdir, family_of(name))
    args = [sys.executable, str(reference_dir / script), "--pretrained_model_name_or_path", str(model_dir),
            "--instance_data_dir", str(photos_dir), "--instance_prompt", "photo of zwx person",
            "--output_dir", str(out_dir), "--resolution", str(resolution_for(name, tiny)), "--train_batch_size", "1", "--learning_rate", "2e-6",
            "--max_train_steps", str(steps), "--checkpointing_steps", "1000000", "--seed", "0", *extra]
    if "--with_prior_preservation" in extra:
        args += ["--class_data_dir", str(workdir / "class")]
    env = {**os.environ, **gpu_env(gpu)}
    started = time.time()
    with GpuMemoryPoller(gpu) as poller:
        done = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"reference {name} failed: {done.stderr[-2000:]}")
    # tqdm's last rate on the "Steps" bar: a moving average over the recent steps, i.e. steady state
    rates = re.findall(r"Steps:.*?(\d+\.\d+)(it/s|s/it)", done.stderr)
    value, unit = rates[-1]
    s_per_step = 1 / float(value) if unit == "it/s" else float(value)
    return {"name": name, "s_per_step": s_per_step, "peak_gpu_gb_nvidia_smi": poller.peak_mb / 1024 * 1.048576,
            "wall_s": time.time() - started}


def gpu_env(gpu: int | None) -> dict:
    """Environment that puts a process on one GPU, numbered as nvidia-smi numbers them (PCI bus order)."""
    return {} if gpu is None else {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu)}


def generate_class_images(workdir: Path, count: int, tiny: bool, xl: bool = False) -> None:
    """20 class images made once with the base model; both trainers read the same files."""
    from dreamnb.data import ensure_class_images
    from dreamnb.models import load_base_model

    folder = workdir / ("class-xl" if xl else "class")
    if len(list(folder.glob("*.png"))) >= count:
        return
    base = load_base_model(model_paths(workdir, "sdxl" if xl else "sd1")[0])
    ensure_class_images(base.pipeline, folder, "photo of a person", count, 64 if tiny else 1024 if xl else 512)


# --- the table -------------------------------------------------------------------------------------------

def table(results: dict, gpu: str) -> str:
    lines = [f"GPU: {gpu}", "",
             "| config | what | dreamnb s/step (UNet / TE) | images/s | time to first step | default run (1500+350) | peak alloc / reserved GB | diffusers s/step | diffusers peak GB (nvidia-smi) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if "headline" in results:
        h = results["headline"]
        lines[1:1] = [f"Headline: `dreamnb train --preset face` as shipped, through the CLI: {h['train_wall_s']} s wall for "
                      f"{h['steps']} steps (process start, loading, class images, training, saving).", ""]
    for name, (what, _, _) in CONFIGS.items():
        ours, ref = results.get(name), results.get(f"ref-{name}")
        if not ours:
            continue
        if "error" in ours:
            lines.append(f"| {name} | {what} | failed: {ours['error'][:120]} |||||||")
            continue
        unet, te = ours.get("unet_s_per_step"), ours.get("text_encoder_s_per_step")
        if unet is None:
            lines.append(f"| {name} | {what} | too few steps to measure |||||||")
            continue
        batch = ours.get("images_per_step", 2 if name == "c" else 1)
        speed = f"{ref['s_per_step'] / unet:.1f}×" if ref and unet and "s_per_step" in ref else "–"
        lines.append(
            f"| {name} | {what} | {unet:.4f}" + (f" / {te:.4f}" if te else "") + f" | {batch / unet:.1f} | "
            f"{ours.get('startup_s', 0):.1f} s | {ours.get('projected_default_run_s', 0):.0f} s | "
            f"{ours.get('peak_allocated_gb', 0):.1f} / {ours.get('peak_reserved_gb', 0):.1f} | "
            + (f"{ref['s_per_step']:.3f} | {ref['peak_gpu_gb_nvidia_smi']:.1f} |" if ref and "s_per_step" in ref else "– | – |")
            + f" {speed} |"
        )
    f = results.get("f")
    if f:
        compiled = "dreamnb_compiled_1_images_s" in f
        lines += ["", "| sampling (f), warm, 25 DPM-Solver++ steps, guidance 7.5 | dreamnb | dreamnb, UNet compiled | diffusers pipeline |",
                  "|---|---|---|---|"]
        for count in (1, 4):
            lines.append(f"| {count} image(s) | {f[f'dreamnb_{count}_images_s']:.3f} s | "
                         + (f"{f[f'dreamnb_compiled_{count}_images_s']:.3f} s (first call {f[f'compile_{count}_images_first_call_s']:.0f} s)"
                            if compiled else "–") + f" | {f[f'diffusers_{count}_images_s']:.3f} s |")
        if compiled:
            lines.append(f"| compiled against plain images: mean absolute pixel difference (0-255) | | {f['compiled_vs_plain_mean_abs_pixel_diff']:.2f} | |")
        lines.append(f"| load from local disk | {f['load_s']:.1f} s | | |")
        if "switch_attempt_s" in f:
            lines.append(f"| switch to another trained attempt (base in memory) | {f['switch_attempt_s']:.2f} s | | |")
    t4 = results.get("xl-t4")
    if t4 and "unet_step_tflop" in t4:
        flops, (fast, slow) = t4["unet_step_tflop"], t4["t4_projected_s_per_step"]
        lines += ["", f"xl-t4 on a T4, a projection: a UNet step at batch {t4['images_per_step']} is {flops['step_checkpointed']:.3g} TFLOP "
                  f"with gradient checkpointing ({flops['forward']:.3g} forward, {flops['step']:.3g} forward + backward through the "
                  f"activations, torch.utils.flop_counter); at 30-40% of {T4_FP16_TFLOPS} TFLOP/s fp16: {fast:.3g}-{slow:.3g} s/step, "
                  f"{DEFAULT_RUN[1]} steps in {t4['t4_projected_default_run_s'][0] / 60:.0f}-{t4['t4_projected_default_run_s'][1] / 60:.0f} min."]
    xs = results.get("xl-sample")
    if xs:
        if "error" in xs:
            lines += ["", f"xl-sample failed: {xs['error'][:200]}"]
        else:
            lines += ["", f"| sampling (xl-sample), warm, {xs['steps']} Euler steps, guidance 7.5, {xs['size']} px | dreamnb (`generate`, `load_base_model`) | diffusers StableDiffusionXLPipeline | speed-up |",
                      "|---|---|---|---|",
                      f"| 1 image | {xs['dreamnb_1_image_s']:.3f} s | {xs['diffusers_1_image_s']:.3f} s | {xs['diffusers_1_image_s'] / xs['dreamnb_1_image_s']:.2f}× |",
                      *([f"| 1 image, UNet compiled (first call {xs['compile_first_call_s']:.0f} s) | {xs['dreamnb_compiled_1_image_s']:.3f} s | "
                         f"{xs['diffusers_1_image_s']:.3f} s | {xs['diffusers_1_image_s'] / xs['dreamnb_compiled_1_image_s']:.2f}× |"]
                        if "dreamnb_compiled_1_image_s" in xs else []),
                      f"| load from local disk | {xs['load_s']:.1f} s | {xs['diffusers_load_s']:.1f} s | |",
                      f"| mean absolute pixel difference between the two (0-255, same seed) | {xs['dreamnb_vs_diffusers_mean_abs_pixel_diff']:.2f} | | |"]
    return "\n".join(lines)


# --- measurements in fresh processes; data parallel: 1 GPU against N ---------------------------------------

def run_child(name: str, workdir: Path, args, *, processes: int = 1, session: str | None = None, extra: dict | None = None,
              resume: bool = False, unet_steps: int | None = None, te_steps: int | None = None, timeout: float | None = None) -> list[dict]:
    """One measurement in fresh processes (`accelerate launch` when several): each process's figures.
    After `timeout` seconds the whole process group is stopped (a hung collective must not hold the GPUs)."""
    cmd = [__file__, "--workdir", str(workdir), "--child", name, "--unet-steps", str(unet_steps or args.unet_steps),
           "--te-steps", str(te_steps or args.te_steps)] + (["--tiny"] if args.tiny else [])
    cmd += (["--session", session] if session else []) + (["--extra", json.dumps(extra)] if extra else []) + (["--resume"] if resume else [])
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}  # NVLink multicast stays off (see the device notes)
    if args.reference_gpu:  # the reference runs on that GPU meanwhile; dreamnb keeps GPU 0
        env.update(gpu_env(0))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]
        if args.tiny:  # the CPU check: gloo, one thread per process
            env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    child = subprocess.Popen(launcher + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return [{"name": name, "error": f"no result after {timeout:.0f} s (stopped)"}]
    found = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    if len(found) < processes:
        print(stderr[-3000:], file=sys.stderr)
        errors = [line for line in stderr.splitlines() if re.search(r"\w(Error|Exception)\b", line)]
        return [{"name": name, "error": (errors or stderr.strip().splitlines() or ["no result"])[-1]}]
    return sorted(found, key=lambda result: result.get("rank", 0))


def run_data_parallel(names: list[str], workdir: Path, args) -> dict:
    """Each configuration on 1 GPU and on N, with CUDA graphs off (DDP, accelerate's data parallel) and on (the
    all-reduce captured in the graph: `cuda_graphs="on"`); the N-GPU DDP run writes a checkpoint near the end,
    which is then resumed in a single process."""
    results: dict = {}
    extra = {"train_batch_size": args.batch}
    for name in names:
        total = min(CONFIGS[name][1].get("text_encoder_steps", 0), args.te_steps) + args.unet_steps
        results[f"{name}@1"] = run_child(name, workdir, args, session=f"session-{name}-1", extra={**extra, "cuda_graphs": "off"})
        if not args.tiny:
            results[f"{name}@1-graphs"] = run_child(name, workdir, args, session=f"session-{name}-1g", extra=extra)
        results[f"{name}@{args.gpus}"] = run_child(name, workdir, args, processes=args.gpus, session=f"session-{name}-{args.gpus}",
                                                   extra={**extra, "checkpoint_every": total - 10})
        if not args.tiny:
            results[f"{name}@{args.gpus}-graphs"] = run_child(name, workdir, args, processes=args.gpus, session=f"session-{name}-{args.gpus}g",
                                                              extra={**extra, "cuda_graphs": "on"}, timeout=240)
        results[f"{name}@{args.gpus}-resumed"] = run_child(name, workdir, args, session=f"session-{name}-{args.gpus}", resume=True)
        for key in (k for k in results if k.startswith(f"{name}@")):
            print(f"{key}: {json.dumps(results[key])}", flush=True)
    return results


def scaling_table(results: dict, names: list[str], gpus: int, batch: int, gpu: str) -> str:
    lines = [f"GPU: {gpu}", "",
             "| config | processes | CUDA graphs | dreamnb s/step (UNet / TE) | images/s | peak alloc / reserved GB per process | scaling vs 1 (same path) |",
             "|---|---|---|---|---|---|---|"]
    notes = []

    def images_per_s(run: dict) -> float | None:
        return run["images_per_step"] / run["unet_s_per_step"] if "unet_s_per_step" in run else None

    for name in names:
        rows = ((f"{name}@1", "off", None), (f"{name}@1-graphs", "on", None),
                (f"{name}@{gpus}", "off (DDP)", f"{name}@1"), (f"{name}@{gpus}-graphs", "on (all-reduce in the graph)", f"{name}@1-graphs"))
        for key, graphs, single in rows:
            runs = results.get(key)
            if not runs:
                continue
            first = runs[0]
            if "error" in first or "unet_s_per_step" not in first:
                lines.append(f"| {name} | {key.split('@')[1]} | {graphs} | failed: {first.get('error', 'too few steps')[:120]} ||||")
                continue
            unet, te, images = first["unet_s_per_step"], first.get("text_encoder_s_per_step"), images_per_s(first)
            single_images = images_per_s(results[single][0]) if single and results.get(single) else None
            scaling = f"{images / single_images:.2f}× (efficiency {images / (gpus * single_images):.0%})" if single_images else ""
            memory = ", ".join(f"{r['peak_allocated_gb']:.1f} / {r['peak_reserved_gb']:.1f}" if "peak_allocated_gb" in r else "–" for r in runs)
            lines.append(f"| {name} (batch {batch} per process) | {first['processes']} | {graphs} | {unet:.4f}"
                         + (f" / {te:.4f}" if te else "") + f" | {images:.1f} | {memory} | {scaling} |")
        for key in (f"{name}@{gpus}", f"{name}@{gpus}-graphs"):
            parallel = results.get(key, [{}])[0]
            notes += [f"{key}: {m.split('s ', 1)[1]}" for m in parallel.get("messages", []) if "weights" in m and "processes" in m]
        resumed = results.get(f"{name}@{gpus}-resumed", [{}])[0]
        if "error" in resumed:
            notes.append(f"{name}: resuming the {gpus}-process checkpoint in 1 process failed: {resumed['error']}")
        else:
            where = next((m.split("s ", 1)[1] for m in resumed.get("messages", []) if "Resuming" in m), "?")
            notes.append(f"{name}: the {gpus}-process run's checkpoint resumed in 1 process ({where}) and finished "
                         f"{resumed.get('steps_done')} steps.")
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks the script)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dreamnb-bench"))
    parser.add_argument("--configs", default="a,a-gc,b,c,d4,d16,e,f",
                        help="comma-separated: a a-gc b c d4 d16 e f (SD 1.5), xl-lora16 xl-t4 xl-sample (SDXL), "
                             "flux-lora16 flux-lora16-1024 (FLUX.1 [dev])")
    parser.add_argument("--unet-steps", type=int, default=200, help="UNet steps measured per configuration")
    parser.add_argument("--te-steps", type=int, default=60, help="text-encoder steps measured where trained")
    parser.add_argument("--full-run", action="store_true", help="train (a) for the whole default run (1500 + 350)")
    parser.add_argument("--headline", action="store_true", help="first, the face preset as a user runs it through the CLI, wall time")
    parser.add_argument("--reference", type=Path, help="folder with diffusers' train_dreambooth.py, train_dreambooth_lora.py "
                        "train_dreambooth_lora_sdxl.py and train_dreambooth_lora_flux.py")
    parser.add_argument("--reference-steps", type=int, default=60)
    parser.add_argument("--reference-gpu", type=int, help="run the reference on this GPU (1 or more) while dreamnb runs on GPU 0")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--table", type=Path, help="print the table of an earlier run's --json file and stop")
    parser.add_argument("--gpus", type=int, default=1, help="data parallel: run each configuration on 1 and on this many GPUs")
    parser.add_argument("--batch", type=int, default=2, help="photos per GPU per step in the data-parallel comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--session", help=argparse.SUPPRESS)
    parser.add_argument("--extra", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.table:
        results = json.loads(args.table.read_text())
        print(table(results, results.get("machine", {}).get("gpu", "?")))
        return
    if args.reference_gpu is not None and args.reference_gpu < 1:
        parser.error("--reference-gpu must be 1 or more: dreamnb's configurations run on GPU 0.")

    if args.child:  # one measurement in a fresh process, printed as a JSON line
        if args.child == "f":
            result = run_sampling(workdir, args.tiny)
        elif args.child == "xl-sample":
            result = run_sampling_xl(workdir, args.tiny)
        else:
            result = run_dreamnb(args.child, workdir, args.tiny, args.unet_steps, args.te_steps,
                                 session_name=args.session, extra=args.extra, resume=args.resume)
        print("RESULT " + json.dumps(result), flush=True)
        return

    workdir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS and n not in SAMPLING]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join([*CONFIGS, *SAMPLING])}.")
    for family in dict.fromkeys([*(["sd1"] if args.headline else []), *map(family_of, names)]):
        prepare(workdir, args.tiny, family)
    if args.headline:
        headline = run_headline(workdir, args.tiny)
        print(f"Headline — `dreamnb train --preset face` as shipped, through the CLI on {gpu_name()}: {headline['train_wall_s']} s "
              f"wall for {headline['steps']} steps (process start, loading, class images, training, saving).", flush=True)
    if "c" in names:
        generate_class_images(workdir, 20, args.tiny)
    if "xl-t4" in names:
        generate_class_images(workdir, 20, args.tiny, xl=True)
    if args.gpus > 1:
        names = [n for n in names if n in CONFIGS]  # training configurations only
        results = run_data_parallel(names, workdir, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        print()
        print(scaling_table(results, names, args.gpus, args.batch, gpu_name()))
        return
    results: dict = {"machine": machine(args), **({"headline": headline} if args.headline else {})}

    def reference(name: str) -> None:
        try:
            results[f"ref-{name}"] = run_reference(name, workdir, args.reference, args.reference_steps, args.reference_gpu, args.tiny)
        except Exception as err:  # a failed reference run is reported, not fatal
            results[f"ref-{name}"] = {"error": str(err)[-500:]}
        print(f"ref-{name}: {json.dumps(results[f'ref-{name}'])}", flush=True)

    # with --reference-gpu the reference scripts run one after another on their own GPU, beside dreamnb's
    beside = concurrent.futures.ThreadPoolExecutor(max_workers=1) if args.reference_gpu else None
    for name in names:
        has_reference = bool(args.reference and name in CONFIGS and CONFIGS[name][2])
        if has_reference and beside:
            beside.submit(reference, name)
        unet_steps, te_steps = (DEFAULT_RUN[1], DEFAULT_RUN[0]) if (name == "a" and args.full_run) else (args.unet_steps, args.te_steps)
        results[name] = run_child(name, workdir, args, unet_steps=unet_steps, te_steps=te_steps)[0]
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        if has_reference and not beside:
            reference(name)
    if beside:
        beside.shutdown(wait=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print()
    where = f"; the reference on GPU {args.reference_gpu} at the same time" if beside and args.reference else ""
    print(table(results, gpu_name() + where))


def run_headline(workdir: Path, tiny: bool) -> dict:
    """The headline: the face preset as a user runs it, through the CLI in fresh processes (`dreamnb prepare`, then
    `dreamnb train --preset face`: loading, 100 class images, 350 + 1500 steps, saving), wall time of the train command.
    The tiny model on the CPU runs the same commands at 64 px with a few steps, to check the script."""
    paths = prepare(workdir, tiny)
    session = workdir / "headline-session"
    shutil.rmtree(session, ignore_errors=True)
    cli = [sys.executable, "-m", "dreamnb"]
    subprocess.run([*cli, "prepare", paths["photos"], "--session", str(session), "--size", str(paths["size"]), "--json"],
                   check=True, capture_output=True)
    small = ["--resolution", "64", "--unet-steps", "20", "--te-steps", "5", "--num-class-images", "4"] if tiny else []
    started = time.time()
    done = subprocess.run([*cli, "train", "--session", str(session), "--model", paths["model"], "--token", "squidarth",
                           "--class-word", "person", "--preset", "face", "--json", *small], capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode:
        raise SystemExit(f"the headline run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    return {"train_wall_s": round(seconds, 1), "steps": result["steps_done"], "status": result["status"]}


def machine(args) -> dict:
    """Where and with what the figures were taken, kept in the raw file beside them."""
    import importlib.metadata as metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": sys.argv,
            **{name: version(name) for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "triton", "bitsandbytes")}}


def gpu_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return "CPU (tiny model)"


if __name__ == "__main__":
    main()
