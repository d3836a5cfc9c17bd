"""What one pretraining sample costs, the first run's way and this one's: FLOPs counted (torch's FlopCounterMode) and
milliseconds measured on this machine at a small batch. The README turns these into GPU projections.

    python -m benchmarks.quality.step_cost [--batch 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dreamnb import world_model

from . import pretrain, world

# the first GPU run's world model: 2 layers a level, heads of 8 channels, a text encoder 256 wide; each step
# rendered and VAE-encoded its pictures
FIRST_RUN = dataclasses.replace(pretrain.WorldModelSettings(), unet_channels=(64, 128, 256), unet_layers=2, head_dim=8,
                                text_width=256)


def sample_cost(settings: pretrain.WorldModelSettings, batch: int, repeats: int, render_and_encode: bool) -> dict:
    pipe = world_model.build_pipeline(settings.architecture())
    if settings is FIRST_RUN:  # its UNet had 8 heads on every level (diffusers' attention_head_dim=8)
        from diffusers import UNet2DConditionModel

        config = dict(pipe.unet.config)
        config["attention_head_dim"] = 8
        pipe.unet = UNet2DConditionModel.from_config(config)
    unet, text_encoder, vae = pipe.unet.train(), pipe.text_encoder.train(), pipe.vae.eval()
    latent = settings.size // 2 ** (len(settings.vae_channels) - 1)
    generator = torch.Generator().manual_seed(0)
    scenes = world.sample_scenes(batch, generator)
    ids = world.token_ids(pipe.tokenizer, world.captions(scenes))

    def step():
        if render_and_encode:
            images = world.render(scenes, settings.size, generator) * 2 - 1
            with torch.no_grad():
                x0 = vae.encode(images).latent_dist.mean
        else:
            x0 = torch.randn(batch, 4, latent, latent)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(x0, t, text_encoder(ids)[0]).sample
        F.mse_loss(pred, x0).backward()

    with FlopCounterMode(display=False) as counter:
        step()
    step()  # warm
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    ms = (time.perf_counter() - started) / repeats * 1000
    return {"gflop_per_sample": round(counter.get_total_flops() / batch / 1e9, 2), "cpu_ms_per_sample": round(ms / batch, 1),
            "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
            "text_encoder_params_m": round(sum(p.numel() for p in text_encoder.parameters()) / 1e6, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    figures = {"first run (render + encode each step)": sample_cost(FIRST_RUN, args.batch, args.repeats, True),
               "this run (encoded pool)": sample_cost(pretrain.WorldModelSettings(), args.batch, args.repeats, False)}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
