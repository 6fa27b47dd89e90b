"""How exact is one FP8 wgmma (k = 32) on this GPU? Error vs float64 relative to sum |products|."""
import torch, triton, triton.language as tl

@triton.jit
def k(a_ptr, b_ptr, c_ptr):
    m = tl.arange(0, 64); n = tl.arange(0, 16); kk = tl.arange(0, 32)
    a = tl.load(a_ptr + m[:, None] * 32 + kk[None, :])
    b = tl.load(b_ptr + kk[:, None] * 16 + n[None, :])
    tl.store(c_ptr + m[:, None] * 16 + n[None, :], tl.dot(a, b))

torch.manual_seed(0)
worst, errs = 0.0, []
for trial in range(50):
    a = (torch.randn(64, 32, device="cuda") * 2.0 ** torch.randint(-6, 6, (64, 32), device="cuda")).clamp(-448, 448).to(torch.float8_e4m3fn)
    b = (torch.randn(32, 16, device="cuda") * 4).to(torch.float8_e4m3fn)
    c = torch.empty(64, 16, device="cuda")
    k[(1,)](a, b, c, num_warps=4)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    e = ((c.double() - exact).abs() / scale.clamp_min(1e-30))
    errs.append(e.flatten())
    worst = max(worst, e.max().item())
e = torch.cat(errs)
print(f"fp8 k32 dot: |err| / sum|a*b|: median {e.median():.2e}  p99 {e.quantile(0.99):.2e}  max {worst:.2e}  "
      f"(fp32 would be ~6e-8; 2^-13 = {2**-13:.1e})")
