"""The pieces of the GPU fast path that can be checked on a CPU: stochastic rounding and AdamWBF16."""
import torch

from dreamnb.fast import AdamWBF16, add_stochastically_rounded, stochastic_round_to_bf16


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


def test_a_sum_below_fp32_resolution_is_still_rounded_without_bias():
    """1 - 2e-8 is exactly 1 in fp32; rounded stochastically from the exact sum it is 1 - 2**-8 (bf16's step below 1, half
    the one above) with probability 2e-8 / 2**-8, else 1. Sums of any size and sign land on average where they should."""
    generator = torch.Generator().manual_seed(0)
    ones = torch.ones(1 << 21)
    assert torch.equal(ones + -2e-8, ones)  # the plain fp32 sum loses the update
    moved = 0
    for _ in range(8):
        down = add_stochastically_rounded(ones, torch.full_like(ones, -2e-8), generator).float()
        assert set(down.unique().tolist()) <= {1.0, 1 - 2 ** -8}
        moved += int((down < 1).sum())
    assert 60 < moved < 115, moved  # 2**24 · 2e-8 / 2**-8 ≈ 86 (±9); with the step above 1, 43
    up = add_stochastically_rounded(ones, torch.full_like(ones, 3e-6), generator).float()
    assert set(up.unique().tolist()) <= {1.0, 1 + 2 ** -7}
    assert 0.8 < int((up > 1).sum()) / (ones.numel() * 3e-6 / 2 ** -7) < 1.2  # ≈ 805 (±28)
    weights = torch.randn(1 << 16, generator=generator).to(torch.bfloat16).float()
    update = torch.randn(1 << 16, generator=generator) * weights.abs() * 1e-3  # a fraction of a bf16 step, either way
    error = add_stochastically_rounded(weights, update, generator).float() - weights - update
    assert (error * update.sign()).mean().abs() < 0.05 * update.abs().mean()  # round-to-nearest: -1 × that mean


def test_weight_decay_shrinks_bf16_weights_at_a_full_fine_tune_s_learning_rate():
    """At lr 2e-6 and weight decay 1e-2 the factor 1 - lr·wd is exactly 1 in fp32; applied as a term of the update and
    rounded stochastically, zero gradients shrink weights of 1 by (1 - 2e-8)**500 ≈ 1 - 1e-5 on average."""
    n, steps = 1 << 18, 500
    weights = torch.nn.Parameter(torch.ones(n))
    optimizer = AdamWBF16([weights], lr=2e-6, weight_decay=1e-2, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad()  # zero gradients: Adam's own term is 0, only the decay acts
        optimizer.step()
    shrink, expected = 1 - weights.float().mean().item(), 1 - (1 - 2e-6 * 1e-2) ** steps
    assert abs(shrink / expected - 1) < 0.2, (shrink, expected)  # ~670 weights stepped down: ±4% is one sigma


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


def test_unflatten_frees_the_moments_and_gradients_before_it_copies_the_weights(monkeypatch):
    """The weights' own copies must be able to reuse the moments' memory: made beside them, the end of a GPU phase held
    one more model's worth (bench (a) on an H200: 13.0 GB reserved at its peak before this order, 12.2 after)."""
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    optimizer = AdamWBF16(model.parameters(), lr=1e-3, rounding="kahan")
    model(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    optimizer.step()
    buffers = [weakref.ref(t) for t in (optimizer.flat_grad, optimizer.exp_avg, optimizer.exp_avg_sq, optimizer.compensation)]
    alive_at_copy = []
    clone = torch.Tensor.clone

    def watching_clone(tensor, *args, **kwargs):
        alive_at_copy.append(sum(ref() is not None for ref in buffers))
        return clone(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", watching_clone)
    optimizer.unflatten()
    monkeypatch.undo()
    assert alive_at_copy == [0] * 4  # one copy per weight, none while a buffer was alive
    assert all(p.grad is None and p.untyped_storage().nbytes() == p.numel() * 2 for p in model.parameters())


def _data_parallel_worker(rank: int, world: int, init_file: str, results):
    """One of two gloo processes: rank-dependent weights and gradients, then the graph path's collectives."""
    import torch.distributed as dist

    from dreamnb.train import average_gradients, broadcast_weights

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # like LoRA's random start: every process draws its own
        flat_params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(2)]
        plain_params = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
        broadcast_weights(flat_params + plain_params)
        flat_optimizer = AdamWBF16(flat_params, lr=1e-3)
        plain_optimizer = torch.optim.AdamW(plain_params, lr=1e-3)
        for params in (flat_params, plain_params):
            for index, param in enumerate(params):
                grad = torch.full(param.shape, float(rank + 1) * (index + 1))
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.copy_(grad)  # AdamWBF16's gradients are views of its flat buffer
        average_gradients(flat_optimizer, flat_params)
        average_gradients(plain_optimizer, plain_params)
        results[rank] = ([p.detach().float().clone() for p in flat_params + plain_params],
                         [p.grad.float().clone() for p in flat_params + plain_params])
    finally:
        dist.destroy_process_group()


def test_graph_path_data_parallel_starts_from_the_first_process_weights_and_averages_gradients(tmp_path):
    """The CUDA-graph data-parallel path replaces DDP with these two collectives; checked here with gloo."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
    (weights0, grads0), (weights1, grads1) = results[0], results[1]
    assert all(torch.equal(a, b) for a, b in zip(weights0, weights1))  # rank 1 took rank 0's random start
    torch.manual_seed(0)
    assert torch.equal(weights0[0], torch.randn(3, 4).bfloat16().float())  # ... and not the reverse
    for index, (grad0, grad1) in enumerate(zip(grads0, grads1)):
        expected = (1 + 2) / 2 * (index % 2 + 1)  # mean of rank 0's (1×) and rank 1's (2×) gradient
        assert torch.equal(grad0, grad1) and torch.allclose(grad0, torch.full_like(grad0, expected))
