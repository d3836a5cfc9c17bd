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
        optimizer.zero_grad()
        weights.grad += 1  # Adam moves each weight by ~lr per step
        optimizer.step()
    moved = (start.to(torch.bfloat16).float() - weights.float()).mean().item()
    assert abs(moved - 200 * 1e-4) < 0.15 * 200 * 1e-4  # 0.02 in total, far below bf16's step near 1 (0.0078)
    naive = start.to(torch.bfloat16)
    for _ in range(200):
        naive = (naive.float() - 1e-4).to(torch.bfloat16)
    assert abs((start.to(torch.bfloat16).float() - naive.float()).mean().item()) < 0.5 * moved


def test_adamw_bf16_follows_adamw():
    """Same gradients: the bf16 weights stay within bf16 rounding of fp32 AdamW's weights."""
    torch.manual_seed(0)
    start = torch.randn(256, 64).to(torch.bfloat16).float()
    ours_weights = torch.nn.Parameter(start.clone())
    reference_weights = torch.nn.Parameter(start.clone())
    ours = AdamWBF16([ours_weights], lr=1e-2, weight_decay=1e-2, generator=torch.Generator().manual_seed(0))
    reference = torch.optim.AdamW([reference_weights], lr=1e-2, weight_decay=1e-2)
    assert ours_weights.dtype == torch.bfloat16  # the optimizer re-homes the weights as bf16 views
    for step in range(50):
        grad = torch.randn(256, 64, generator=torch.Generator().manual_seed(step))
        ours.zero_grad()
        ours_weights.grad += grad.to(torch.bfloat16)
        reference_weights.grad = grad.to(torch.bfloat16).float()
        ours.step()
        reference.step()
    moved = (reference_weights.detach() - start).abs().mean().item()
    difference = (ours_weights.float() - reference_weights.detach()).abs().mean().item()
    assert difference < 0.2 * moved, (difference, moved)  # within bf16 rounding noise of the weights (~0.004 here)


def test_flat_views_keep_channels_last_layout_and_state_round_trips():
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    optimizer = AdamWBF16(conv.parameters(), lr=1e-3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.data_ptr() == optimizer.flat_param.data_ptr()
    out = conv(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16))
    out.float().pow(2).mean().backward()
    assert conv.weight.grad.data_ptr() == optimizer.flat_grad.data_ptr()  # gradients land in the flat buffer
    optimizer.step()
    state = optimizer.state_dict()
    other = AdamWBF16(torch.nn.Conv2d(4, 8, 3).parameters(), lr=1e-3)
    other.load_state_dict(state)
    assert torch.equal(other.exp_avg, optimizer.exp_avg) and other.step_count.item() == 1
    optimizer.unflatten()
    assert conv.weight.grad is None and conv.weight.data_ptr() != 0
