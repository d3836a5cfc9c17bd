"""GPU check: the fused Triton AdamWBF16 update lands each weight on one of the two bf16 neighbours of the
exact fp32 update (what stochastic rounding promises). Prints how many do not, with examples."""
import torch

from dreamnb import fast

torch.manual_seed(0)
n = 333_000
start = torch.randn(n, device="cuda")
grad = torch.randn(n, device="cuda").to(torch.bfloat16)
opt = fast.AdamWBF16([torch.nn.Parameter(start.clone())], lr=1e-3)
w0, m0, v0 = opt.flat_param.float().clone(), opt.exp_avg.float().clone(), opt.exp_avg_sq.float().clone()
opt.zero_grad()
opt.flat_grad.copy_(grad)
opt.step()
g = grad.float()
m = m0 + 0.1 * (g - m0)
v = 0.999 * v0 + 0.001 * g * g
exact = w0 * (1 - 1e-3 * 1e-2) - (1e-3 / 0.1) * m / (v.sqrt() / (0.001 ** 0.5) + 1e-8)
low = exact.to(torch.bfloat16).float()  # round to nearest, then its neighbours
up = torch.nextafter(low.to(torch.bfloat16), torch.tensor(float("inf"), device="cuda", dtype=torch.bfloat16)).float()
down = torch.nextafter(low.to(torch.bfloat16), torch.tensor(float("-inf"), device="cuda", dtype=torch.bfloat16)).float()
got = opt.flat_param.float()
ok = (got == low) | (got == up) | (got == down)
print("kernel used:", fast._fused_kernel() is not None, "bad:", int((~ok).sum()), "of", n)
bad = (~ok).nonzero().flatten()[:5]
for i in bad.tolist():
    print(i, "w0", w0[i].item(), "exact", exact[i].item(), "got", got[i].item(), "m", opt.exp_avg[i].item(), m[i].item())
print("mean(got - exact) =", (got - exact).mean().item(), " mean|got - exact| =", (got - exact).abs().mean().item())
