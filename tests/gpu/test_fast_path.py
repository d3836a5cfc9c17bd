"""The CUDA fast path against the plain path, on the tiny model loaded as a user's is (on the GPU, fp16), with the
presets' prior preservation and learning-rate schedules that change the rate. Bounds are shares of what training
changed (`relative_difference`): a quarter of one average step, so a skipped update or a wrong rate fails."""
import dataclasses
import threading

import pytest
import torch

from dreamnb.train import train
from .gpu_util import final_weights, graphed_sampling_matches_eager, relative_difference, start_weights


def config(**changes):
    from test_train import quick_config

    return dataclasses.replace(quick_config(
        text_encoder_steps=10, unet_steps=20, log_every=5, unet_lr=2e-4, text_encoder_lr=5e-5, mixed_precision="bf16",
        with_prior_preservation=True, num_class_images=2, lr_scheduler="linear", lr_warmup_steps=3), **changes)


def test_cuda_graph_steps_match_the_eager_steps(photo_session, gpu_base):
    cfg = config(optimizer="adamw")
    train(photo_session, dataclasses.replace(cfg, cuda_graphs="off"), gpu_base, progress=False, attempt="eager")
    train(photo_session, dataclasses.replace(cfg, cuda_graphs="on"), gpu_base, progress=False, attempt="graphed")
    start = start_weights(gpu_base)
    eager, graphed = final_weights(photo_session.path, "eager"), final_weights(photo_session.path, "graphed")
    for part, steps in (("unet", cfg.unet_steps), ("text_encoder", cfg.text_encoder_steps)):
        pick = lambda weights: {k: v for k, v in weights.items() if k.startswith(part)}  # noqa: E731
        assert relative_difference(pick(graphed), pick(eager), start) < 0.25 / steps, part


def test_bf16_weights_with_stochastic_rounding_learn_like_fp32_adamw(photo_session, gpu_base):
    fp32 = train(photo_session, config(optimizer="adamw", unet_steps=60), gpu_base, progress=False, attempt="fp32")
    bf16 = train(photo_session, config(optimizer="adamw-bf16", unet_steps=60), gpu_base, progress=False, attempt="bf16")
    from dreamnb.attempts import attempt_pipeline, denoising_error
    from test_train import instance_latents

    latents = instance_latents(photo_session, gpu_base).float()
    before = denoising_error(gpu_base.pipeline, latents, "photo of zwx thing")
    after = denoising_error(attempt_pipeline(gpu_base, photo_session, "bf16"), latents, "photo of zwx thing")
    assert after < 0.85 * before, (before, after)  # it learns (measured on the H100: 1.07 → 0.79)
    a, b = (torch.tensor([loss for _, loss in r.losses]) for r in (fp32, bf16))
    half = len(a) // 2  # single-batch losses are noisy: compare the curves over their second half
    assert abs(a[half:].mean() - b[half:].mean()) < 0.15 * a[half:].mean(), (a, b)


@pytest.mark.parametrize("method, optimizer", [("full", "adamw-bf16"), ("lora", "adamw")])
def test_a_graphed_run_stopped_and_resumed_ends_where_a_straight_run_does(photo_session, gpu_base, method, optimizer):
    """Stopped after the graph was captured, resumed (warm-up and a new capture), with a linear schedule: the resumed
    run's learning rate must reach the replayed graph (fused AdamW's is a GPU tensor that loading once replaced)."""
    cfg = config(method=method, optimizer=optimizer, cuda_graphs="on", log_every=1, text_encoder_steps=4,
                 unet_lr=1e-4 if method == "lora" else 2e-4)
    train(photo_session, cfg, gpu_base, progress=False, attempt="straight")
    stop = threading.Event()
    train(photo_session, cfg, gpu_base, progress=False, attempt="resumed", stop=stop,
          callback=lambda e: stop.set() if e.kind == "step" and e.step == 12 else None)
    done = train(photo_session, cfg, gpu_base, progress=False, attempt="resumed", resume=True)
    assert done.status == "finished" and done.steps_done == 24
    straight, resumed = final_weights(photo_session.path, "straight"), final_weights(photo_session.path, "resumed")
    if method == "lora":  # the adapters' B matrices start at zero: what training changed
        straight, resumed = ({k: v for k, v in w.items() if "lora_B" in k or "lora.up" in k} for w in (straight, resumed))
        start = {k: torch.zeros_like(v) for k, v in straight.items()}
    else:
        start = start_weights(gpu_base)
    assert relative_difference(resumed, straight, start) < 0.25 / cfg.unet_steps
    logged = [(photo_session.attempt_dir(a) / "log.csv").read_text().splitlines() for a in ("straight", "resumed")]
    assert [row.split(",")[3] for row in logged[0]] == [row.split(",")[3] for row in logged[1]]  # the same learning rates


def test_fused_triton_update_rounds_the_exact_update_to_a_bf16_neighbour():
    """One step from known moments: every weight lands next to the exact fp32 AdamW result, unbiased."""
    from dreamnb import fast

    if fast._fused_kernel() is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    n = 333_000
    grad = torch.randn(n, device="cuda").to(torch.bfloat16)
    optimizer = fast.AdamWBF16([torch.nn.Parameter(torch.randn(n, device="cuda"))], lr=1e-3)
    start = optimizer.flat_param.float().clone()
    optimizer.zero_grad()
    optimizer.flat_grad.copy_(grad)
    optimizer.step()
    m = 0.1 * grad.float()  # first step: moments start at zero; bias corrections 0.1 and 0.001
    v = 0.001 * grad.float() ** 2
    exact = start * (1 - 1e-3 * 1e-2) - (1e-3 / 0.1) * m / (v.sqrt() / 0.001 ** 0.5 + 1e-8)
    nearest = exact.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf"))).float()
    down = torch.nextafter(nearest, torch.full_like(nearest, float("-inf"))).float()
    got = optimizer.flat_param.float()
    assert ((got == nearest.float()) | (got == up) | (got == down)).all()
    assert abs((got - exact).mean().item()) < 0.05 * (got - exact).abs().mean().item()  # unbiased on average


def test_graphed_sampling_gives_the_same_images(gpu_base):
    graphed_sampling_matches_eager(gpu_base.pipeline)


def test_graphed_sdxl_sampling_gives_the_same_images(tiny_sdxl):
    """SDXL's pooled prompt and size/crop numbers are graph inputs too (its VAE in fp32 beside the fp16 UNet)."""
    from dreamnb.models import load_base_model

    graphed_sampling_matches_eager(load_base_model(tiny_sdxl.folder).pipeline)


def test_previews_on_the_graphed_path_leave_training_untouched(photo_session, gpu_base):
    """Previews run eagerly between graph replays, with the text encoder parked on the CPU in the UNet phase."""
    cfg = config(cuda_graphs="on", optimizer="adamw", sample_every=10)
    events = []
    train(photo_session, cfg, gpu_base, progress=False, attempt="previews", callback=events.append)
    train(photo_session, dataclasses.replace(cfg, sample_every=0), gpu_base, progress=False, attempt="plain")
    assert [e.step for e in events if e.kind == "sample"] == [10, 20, 30]
    previews, plain = final_weights(photo_session.path, "previews"), final_weights(photo_session.path, "plain")
    assert relative_difference(previews, plain, start_weights(gpu_base)) < 0.25 / cfg.unet_steps
