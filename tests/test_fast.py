"""The pieces of the GPU fast path that can be checked on a CPU: stochastic rounding and AdamWBF16."""
import torch

from dreamnb.fast import AdamWBF16, stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased_and_lands_on_bf16_neighbours():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # an eighth of the way from 1.0 to the next bf16 number, 1 + 2**-7
    generator = torch.Generator().manual_seed(0)
    rounded = stochastic_round_to_bf16(x, generator)
    assert rounded.dtype == torch.bfloat16
    lower, upper = torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0 + 2 ** -7, dtype=torch.bfloat16)
    assert set(rounded.float().unique().tolist()) == {lower.item(), upper.item()}
    assert abs(rounded.float().mean().item() - x[0].item()) < 2e-5  # unbiased: round-to-nearest would give exactly 1.0
    negative = stochastic_round_to_bf16(-x, generator)
    assert abs(negative.float().mean().item() + x[0].item()) < 2e-5


def test_adamw_bf16_keeps_tiny_updates_that_plain_bf16_would_lose():
    torch.manual_seed(0)
    start = torch.randn(4096)
    weights = torch.nn.Parameter(start.to(torch.bfloat16))
    optimizer = AdamWBF16([weights], lr=1e-4, weight_decay=0.0, generator=torch.Generator().manual_seed(0))
    for _ in range(200):
        weights.grad = torch.ones_like(weights)  # Adam moves each weight by ~lr per step
        optimizer.step()
    moved = (start.to(torch.bfloat16).float() - weights.float()).mean().item()
    assert abs(moved - 200 * 1e-4) < 0.15 * 200 * 1e-4  # 0.02 in total, far below bf16's step near 1 (0.0078)
    naive = start.to(torch.bfloat16)
    for _ in range(200):
        naive = (naive.float() - 1e-4).to(torch.bfloat16)
    assert abs((start.to(torch.bfloat16).float() - naive.float()).mean().item()) < 0.5 * moved


def test_adamw_bf16_matches_adamw_on_fp32_weights():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(256, 64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamWBF16([a], lr=1e-3, weight_decay=1e-2)
    reference = torch.optim.AdamW([b], lr=1e-3, weight_decay=1e-2)
    for step in range(50):
        grad = torch.randn(256, 64, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    # bf16 moments differ from fp32 ones by rounding only: the weights agree closely
    assert torch.allclose(a, b, atol=2e-3)
    assert (a - b).abs().mean() < 2e-4
