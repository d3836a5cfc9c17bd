"""The world model: Stable Diffusion's real architectures (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with
the real CLIP tokenizer) at small sizes, pretrained here on the world's captioned pictures and saved as a diffusers
StableDiffusionPipeline folder that `dreamnb.models.load_base_model` loads like any base model.

    python -m benchmarks.quality.pretrain [--tiny] [--cache DIR]

The VAE is trained first (reconstruction), then the UNet and text encoder together on the VAE's latents
(epsilon prediction, 10% empty captions for classifier-free guidance), in bf16 autocast with big batches on a GPU.
Last, the VAE's decoder learns every style, pixel art too, with the encoder (and so every latent) as it was: SD's VAE
was trained on far more than its UNet is asked to draw, and a style benchmark needs a codec that can give back a style
the UNet never saw. The folder is cached under a hash of the settings, so later runs load it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamnb import world_model

from . import world

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"


VERSION = 2  # part of the cache key: bump when the architecture or the training changes
LATER_ROUNDS_OMIT = 0.3  # in rounds after the first, each of colour, pattern and background is left out of a caption this often


@dataclass(frozen=True)
class WorldModelSettings:
    size: int = 64                                  # pixels; the VAE's 3 levels (2 downsamplings) make 16x16x4 latents
    vae_channels: tuple[int, ...] = (32, 64, 128)
    unet_channels: tuple[int, ...] = (64, 128, 192)  # 16x16 → 8x8 → 4x4: three levels are all 16 px latents have room for
    unet_layers: int = 1
    head_dim: int = 32                              # attention heads of 32 channels (8 wasted tensor cores and learnt worse)
    text_width: int = 128
    text_layers: int = 4
    vae_steps: int = 800
    vae_batch: int = 128
    vae_lr: float = 1e-3
    latent_pool: int = 65_536                       # pictures rendered and VAE-encoded once, before the UNet phase
    unet_steps: int = 20_000                        # an upper bound: on a GPU `max_seconds` ends the phase first
    unet_batch: int = 512
    unet_lr: float = 6e-4
    warmup: int = 200
    min_snr: float = 5.0                            # Min-SNR-γ loss weighting (Hang et al. 2023): faster convergence
    ema: float = 0.999
    empty_caption: float = 0.1
    seed: int = 0
    max_seconds: float = 140.0                      # the UNet phase's time limit (its schedule ends there too)
    rounds: int = 1                                 # UNet phases: each later one continues the previous round's model on new scenes, incomplete captions too
    decoder_steps: int = 0                          # then the VAE decoder on every style (pixel art too), the encoder frozen
    decoder_batch: int = 16
    decoder_lr: float = 2e-4

    def key(self) -> str:
        # settings at their first values are left out: the keys packs were made under before those settings existed
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "max_seconds" and (k, v) != ("rounds", 1)}
        if not self.decoder_steps:
            fields = {k: v for k, v in fields.items() if not k.startswith("decoder_")}
        text = json.dumps({**fields, "version": VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def architecture(self) -> world_model.Architecture:
        return world_model.Architecture.of(dataclasses.asdict(self))


# A CPU-sized cut for CI: every part runs, nothing is learnt well.
TINY = WorldModelSettings(size=64, vae_channels=(16, 16, 32, 32), unet_channels=(32, 64), unet_layers=1, head_dim=16,
                          text_width=64, text_layers=2, vae_steps=20, vae_batch=8, latent_pool=256, unet_steps=40,
                          unet_batch=8, warmup=10, ema=0.9, max_seconds=600.0)


def model_folder(settings: WorldModelSettings, cache: Path) -> Path:
    return Path(cache) / f"world-{settings.size}px-{settings.key()}"


def ensure_world_model(settings: WorldModelSettings, cache: Path = DEFAULT_CACHE, device=None) -> Path:
    """The cached world model's folder: from the cache, else unpacked from a pack (`find_pack`), else made now (its
    decoder taught every style: the model without that, found the same way, then `generalise_decoder`; a later round:
    the previous round's model, found the same way, trained further; else pretrained), then cached."""
    folder = model_folder(settings, cache)
    if (folder / "model_index.json").is_file():
        log.info("world model from the cache: %s", folder)
        return folder
    parts = find_pack(settings, cache)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if parts:
        log.info("world model unpacked from %s", [p.name for p in parts])
        pipe, report = unpack_world_model(settings, parts)
        report["from_pack"] = True
    elif settings.decoder_steps:
        previous = ensure_world_model(dataclasses.replace(settings, decoder_steps=0), cache, device)
        pipe, report = generalise_decoder(previous, settings, device)
    elif settings.rounds > 1:
        previous = ensure_world_model(dataclasses.replace(settings, rounds=settings.rounds - 1), cache, device)
        pipe, report = continue_pretraining(previous, settings, device)
    else:
        pipe, report = pretrain(settings, device)
    save_folder(pipe, report, settings, folder)
    return folder


def save_folder(pipe, report: dict, settings: WorldModelSettings, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "world.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), **report}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def pretrain(settings: WorldModelSettings, device: torch.device):
    """Build and train the three parts; returns the pipeline (on the CPU, fp32 holding fp16-exact values: what a
    pack gives back, so a fresh run and a carried one start from the same weights) and a report of the training."""
    setup_backends(device)
    pipe = world_model.build_pipeline(settings.architecture())
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    started = time.time()
    vae_loss = train_vae(pipe.vae, settings, device, generator)
    report = {"vae_loss": vae_loss, "vae_seconds": round(time.time() - started, 1), **unet_phase(pipe, settings, device, generator),
              "total_seconds": round(time.time() - started, 1)}
    log.info("world model pretrained: %s", {k: v for k, v in report.items() if k != "unet_losses"})
    return pipe, report


def continue_pretraining(previous: Path, settings: WorldModelSettings, device: torch.device):
    """Round `settings.rounds`: the previous round's model (its folder) trained for another UNet phase on a new pool
    of scenes (a warm restart of the schedule); the VAE stays as it was."""
    from diffusers import StableDiffusionPipeline

    setup_backends(device)
    pipe = StableDiffusionPipeline.from_pretrained(previous, safety_checker=None, requires_safety_checker=False)
    generator = torch.Generator(device=device).manual_seed(settings.seed + settings.rounds - 1)
    started = time.time()
    earlier = json.loads((previous / "world.json").read_text())
    earlier.pop("settings", None)
    report = {**unet_phase(pipe, settings, device, generator), "total_seconds": round(time.time() - started, 1), "previous_round": earlier}
    log.info("world model round %d: %s", settings.rounds, {k: v for k, v in report.items() if k not in ("unet_losses", "previous_round")})
    return pipe, report


def generalise_decoder(previous: Path, settings: WorldModelSettings, device: torch.device):
    """The previous model (its folder) with its VAE decoder trained on every pattern and style (`reconstruction_loss`,
    as `train_vae`) from the frozen encoder's means: every latent, and so what the UNet learnt, stays as it was.
    The committed model (600 steps × 16 on an H200): pixel art's round-trip error 0.0063 → 0.0027, photos' 0.0036 →
    0.0034, sketches' 0.0065 → 0.0057; before it, the decoder turned pixel art back into the photos it knew."""
    from diffusers import StableDiffusionPipeline

    setup_backends(device)
    pipe = StableDiffusionPipeline.from_pretrained(previous, safety_checker=None, requires_safety_checker=False)
    vae = pipe.vae.to(device).requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    vae.decoder.train()
    optimizer = torch.optim.AdamW(trained, lr=settings.decoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 + 0.5 * math.cos(math.pi * s / settings.decoder_steps))
    generator = torch.Generator(device=device).manual_seed(settings.seed + 1000)
    started, loss = time.time(), torch.zeros(())
    for step in range(settings.decoder_steps):
        scenes = world.sample_scenes(settings.decoder_batch, generator, patterns=world.PATTERNS, styles=world.STYLES)
        images = world.render(scenes, settings.size, generator) * 2 - 1
        with torch.no_grad(), autocast(device):
            latents = vae.encode(images).latent_dist.mean
        with autocast(device):
            recon = vae.decode(latents.float()).sample.float()
        loss = reconstruction_loss(recon, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == settings.decoder_steps - 1:
            log.info("decoder step %d/%d loss %.4f", step + 1, settings.decoder_steps, loss.item())
    vae.eval().requires_grad_(False)
    pipe.to("cpu")
    round_to_fp16(pipe)
    earlier = json.loads((previous / "world.json").read_text())
    earlier.pop("settings", None)
    return pipe, {"decoder_loss": round(loss.item(), 5), "decoder_seconds": round(time.time() - started, 1), "previous": earlier}


def unet_phase(pipe, settings: WorldModelSettings, device: torch.device, generator: torch.Generator) -> dict:
    """The pool of captioned scenes encoded by the pipeline's VAE, then the UNet and text encoder trained on it; the
    pipeline ends on the CPU with fp16-exact weights."""
    mark = time.time()
    pipe.vae.to(device)
    latents, ids, empty = encode_pool(pipe, settings, device, generator)
    pool_seconds = time.time() - mark
    unet_report = train_unet(pipe, settings, device, generator, latents, ids, empty)
    del latents, ids
    pipe.to("cpu")
    round_to_fp16(pipe)
    return {"pool_seconds": round(pool_seconds, 1), **unet_report,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def setup_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def round_to_fp16(pipe) -> None:
    with torch.no_grad():
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in part.parameters():
                p.copy_(p.to(torch.float16).float())


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(vae, settings: WorldModelSettings, device: torch.device, generator: torch.Generator) -> float:
    """Reconstruction (MSE + L1) with a whisper of KL, as SD's VAE; then the scaling factor that gives unit-variance latents."""
    from dreamnb.tiny import unit_variance_scaling

    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    warmup = max(1, settings.vae_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / settings.vae_steps)))
    loss = torch.zeros(())
    for step in range(settings.vae_steps):
        scenes = world.sample_scenes(settings.vae_batch, generator, patterns=world.PATTERNS)  # every pattern: the VAE is only a codec
        images = world.render(scenes, settings.size, generator) * 2 - 1
        with autocast(device):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample(generator)).sample.float()
        loss = reconstruction_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == settings.vae_steps - 1:
            log.info("vae step %d/%d loss %.4f", step + 1, settings.vae_steps, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = world.render(world.sample_scenes(256, generator), settings.size, generator) * 2 - 1
        vae.register_to_config(scaling_factor=unit_variance_scaling(vae, sample))
    narrow_posterior(vae)
    return round(loss.item(), 5)


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon, images) + 0.5 * F.l1_loss(recon, images)


@torch.no_grad()
def narrow_posterior(vae) -> None:
    """Make the encoder's posterior a point: log-variance −30 everywhere (diffusers' floor), the mean as it is.
    The UNet is pretrained on posterior means (`encode_pool`), while DreamBooth training draws from the posterior as
    SD's does; this VAE's posterior is wide (std 0.30 against a spread of 0.75 in the means, where SD's VAE is
    nearly a point), so draws from it were noise the UNet had never seen, and fine-tuning learnt to denoise worse."""
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias
    half = weight.shape[0] // 2  # quant_conv's outputs: the means, then the log-variances
    weight[half:] = 0
    bias[half:] = -30.0


@torch.no_grad()
def encode_pool(pipe, settings: WorldModelSettings, device: torch.device, generator: torch.Generator, chunk: int = 1024):
    """`latent_pool` captioned scenes (pretraining patterns only), each rendered once and VAE-encoded once (the
    posterior's mean, scaled): the UNet phase then costs only the UNet and the text encoder. Returns latents
    (bf16 on a GPU), their token ids and an empty caption's ids."""
    scenes = world.sample_scenes(settings.latent_pool, torch.Generator().manual_seed(settings.seed + settings.rounds - 1))  # new scenes each round
    cache: dict[str, list[int]] = {}
    # round 1 learns whole captions; later rounds also incomplete ones, which prior preservation's class prompt is
    omit = LATER_ROUNDS_OMIT if settings.rounds > 1 else 0.0
    texts = world.captions(scenes, omit, torch.Generator().manual_seed(settings.seed + settings.rounds))
    ids = world.token_ids(pipe.tokenizer, texts, cache).to(device)
    empty = world.token_ids(pipe.tokenizer, [""], cache)[0].to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latents = []
    for start in range(0, settings.latent_pool, chunk):
        rows = torch.arange(start, min(start + chunk, settings.latent_pool))
        images = world.render(scenes.index(rows), settings.size, generator, device) * 2 - 1
        with autocast(device):
            latent = pipe.vae.encode(images).latent_dist.mean.float() * pipe.vae.config.scaling_factor
        latents.append(latent.to(dtype))
    return torch.cat(latents), ids, empty


def train_unet(pipe, settings: WorldModelSettings, device: torch.device, generator: torch.Generator,
               latents: torch.Tensor, ids: torch.Tensor, empty: torch.Tensor) -> dict:
    """UNet and text encoder together on the encoded pool (mirrored half the time: captions say nothing of left and
    right), epsilon prediction with Min-SNR-γ weights, with an EMA of both that is what gets saved. A warm-up, then a
    cosine to 10% over the steps or the time allowed, whichever ends first."""
    unet, text_encoder = pipe.unet.to(device).train(), pipe.text_encoder.to(device).train()
    alphas = pipe.scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    weights = (snr.clamp(max=settings.min_snr) / snr) if settings.min_snr else torch.ones_like(snr)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    # no weight decay on the token embedding: the rows of words no caption uses stay exactly at their seeded start
    # (a pack stores only the moved rows) and the rare token keeps its meaningless start, as in a real model
    embedding = world_model.token_embedding(text_encoder)
    groups = [{"params": [p for p in params if p is not embedding], "weight_decay": 1e-2},
              {"params": [embedding], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=settings.unet_lr, fused=device.type == "cuda")
    progress = [0.0]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / settings.warmup)
                                                 * (0.55 + 0.45 * math.cos(math.pi * min(progress[0], 1.0))))
    n, batch = len(latents), settings.unet_batch
    started, losses, step, done, rate_mark = time.time(), [], 0, 0, None
    for step in range(settings.unet_steps):
        elapsed = time.time() - started
        progress[0] = max(step / settings.unet_steps, elapsed / settings.max_seconds)
        if progress[0] >= 1:
            log.info("ending the UNet phase at step %d: %s s allowed", step, settings.max_seconds)
            break
        if step == 20:
            rate_mark = (step, time.time())  # steps/s measured after the first 20 (cuDNN autotuning, allocator warm-up)
        rows = torch.randint(0, n, (batch,), generator=generator, device=generator.device).to(device)
        x0 = latents[rows].float()
        flip = torch.rand(batch, generator=generator, device=generator.device).to(device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        drop = torch.rand(batch, generator=generator, device=generator.device).to(device) < settings.empty_caption
        tokens = torch.where(drop[:, None], empty, ids[rows])
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
        t = torch.randint(0, len(alphas), (batch,), generator=generator, device=generator.device).to(device)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        with autocast(device):
            pred = unet(a * x0 + s * noise, t, text_encoder(tokens)[0]).sample
        loss = ((pred.float() - noise) ** 2).mean((1, 2, 3)).mul(weights[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(settings.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        done = step + 1
        if step % 250 == 0 or step == settings.unet_steps - 1:
            losses.append((step + 1, round(loss.item(), 5)))
            log.info("unet step %d/%d loss %.4f (%.0f s)", step + 1, settings.unet_steps, loss.item(), time.time() - started)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.time() - started
    rate = (done - rate_mark[0]) / (time.time() - rate_mark[1]) if rate_mark and done > rate_mark[0] else done / max(seconds, 1e-9)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return {"unet_steps_done": done, "unet_seconds": round(seconds, 1), "unet_steps_per_s": round(rate, 2),
            "unet_samples_seen": done * batch, "unet_losses": losses}


# --- packs: the world model in files small enough to come back from the GPU machine and to carry there ------

def pack_parts(settings: WorldModelSettings, folder: Path) -> list[Path]:
    return world_model.pack_parts(folder, pack_stem(settings))


def find_pack(settings: WorldModelSettings, cache: Path) -> list[Path]:
    """This world model's pack: carried into the cache (cache/carry/), or the one committed for the demo (round 3)."""
    from dreamnb.demo import WORLD_MODEL

    return pack_parts(settings, Path(cache) / "carry") or pack_parts(settings, WORLD_MODEL)


def pack_stem(settings: WorldModelSettings) -> str:
    return f"world-{settings.size}px-{settings.key()}"


def pack_world_model(folder: Path, settings: WorldModelSettings, out: Path) -> list[Path]:
    """The cached world model as a pack (`dreamnb.world_model.write_pack`), with its settings, key and report."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    meta = {"settings": json.dumps(dataclasses.asdict(settings)), "key": settings.key(), "report": (folder / "world.json").read_text()}
    parts = world_model.write_pack(pipe, settings.architecture(), out, pack_stem(settings), meta)
    log.info("world model packed: %d bytes in %s", sum(p.stat().st_size for p in parts), [p.name for p in parts])
    return parts


def unpack_world_model(settings: WorldModelSettings, parts: list[Path]):
    key = world_model.pack_metadata(parts).get("key")
    if key != settings.key():
        raise ValueError(f"the pack {parts[0].name} holds world model {key}, not {settings.key()}")
    pipe, meta = world_model.read_pack(parts)
    report = json.loads(meta["report"])
    report.pop("settings", None)
    return pipe, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a very small model on the CPU (about a minute), for CI")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--pack-out", type=Path, default=None, help="also write the model as a pack (parts of ≤15 MiB) here")
    parser.add_argument("--max-seconds", type=float, default=None, help="the UNet phase's time limit")
    parser.add_argument("--rounds", type=int, default=1,
                        help="UNet phases in all: round N continues round N-1's model (cached or carried) for another phase")
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="then teach the VAE decoder every style for this many steps (the encoder, and so the UNet, unchanged)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = dataclasses.replace(TINY if args.tiny else WorldModelSettings(), rounds=args.rounds, decoder_steps=args.decoder_steps)
    if args.max_seconds is not None:
        settings = dataclasses.replace(settings, max_seconds=args.max_seconds)
    folder = ensure_world_model(settings, args.cache)
    print(folder)
    if args.pack_out:
        for part in pack_world_model(folder, settings, args.pack_out):
            print(part, part.stat().st_size)


if __name__ == "__main__":
    main()
