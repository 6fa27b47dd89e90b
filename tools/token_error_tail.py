"""Finding 6 measured per token: how far single tokens' outputs stray from the reference.

The precision contract bounds the layer's relative Frobenius error. When one token carries
the output's norm, the layer's error is that token's error, so the tail of the per-token
error decides whether a batch can break the contract. This script draws batches of random
tokens (the stress test's random MXFP4 weights, uniform routing), runs `mega_moe` with FP8
MMAs, with exact products (`mma="fp16"`), and with exact products in one of the two GEMMs only
(`l1-exact`, `l2-exact`: this script switches `buf.mma` around the L2 launch, to see which
GEMM's sums the tail comes from), and prints per shape and batch size the
per-token relative errors against the float64 reference: the median, the 99.9th percentile,
the largest, and how many tokens pass 5e-3 and 1e-2.

    PYTHONPATH=src python tools/token_error_tail.py [--tokens 64,1024] [--seeds 4] [--experts 32]

Batches of 64 tokens over 32 experts put 8-16 rows on an expert (the Triton MMA tiles); 1024
tokens take the prefill tiles (on Hopper the Gluon kernels, FP8 only).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import megamoe.experts
from megamoe import MegaMoEBuffer, mega_moe, pre_dispatch, transform_weights
from megamoe.reference import mega_moe_reference
from megamoe.stress import random_expert_weights

# (name, hidden, intermediate, top-k): the benchmark models and the small sizes of finding 6's cases.
SHAPES = (("v4-flash", 4096, 2048, 6), ("gpt-oss-120b", 2880, 2880, 4), ("qwen3-30b-a3b", 2048, 768, 8),
          ("H256-I768", 256, 768, 1), ("H2880-I64", 2880, 64, 3), ("H256-I64", 256, 64, 2),
          ("H64-I256", 64, 256, 8))


VARIANTS = {"fp8": ("fp8", None), "fp16": ("fp16", None), "l1-exact": ("fp16", "fp8"), "l2-exact": ("fp8", "fp16")}


@contextlib.contextmanager
def l2_mma(mma):
    """L2 launches with buf.mma = `mma` (None: unchanged)."""
    original = megamoe.experts.launch_l2
    switched = []

    def launch(buf, *args, **kwargs):
        switched.append(1)
        kept, buf.mma = buf.mma, mma
        try:
            return original(buf, *args, **kwargs)
        finally:
            buf.mma = kept

    if mma is not None:
        megamoe.experts.launch_l2 = launch
    try:
        yield
    finally:
        megamoe.experts.launch_l2 = original
    if mma is not None and not switched:
        raise RuntimeError("the call launched no L2 kernel through megamoe.experts.launch_l2 (plain torch?)")


def token_errors(hidden, intermediate, topk, tokens, experts, seed, variant, device) -> torch.Tensor:
    mma, l2 = VARIANTS[variant]
    gen = torch.Generator(device=device).manual_seed(seed)
    user_l1 = random_expert_weights(experts, 2 * intermediate, hidden, "fp8xfp4", gen)
    user_l2 = random_expert_weights(experts, hidden, intermediate, "fp8xfp4", gen)
    l1, l2w = transform_weights(user_l1, user_l2)
    x = torch.randn(tokens, hidden, generator=gen, device=device).bfloat16()
    idx = torch.rand(tokens, experts, generator=gen, device=device).topk(topk, dim=1).indices
    weights = torch.rand(tokens, topk, generator=gen, device=device) + 0.05
    buf = MegaMoEBuffer(experts, tokens, topk, hidden, intermediate, device=device, mma=mma)
    pre_dispatch(x, idx, weights, buf)
    y = torch.empty_like(x)
    with l2_mma(l2):
        mega_moe(y, l1, l2w, buf)
    ref = mega_moe_reference(x, idx, weights, user_l1, user_l2)
    buf.destroy()
    return (y.double() - ref).norm(dim=1) / ref.norm(dim=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="64,1024")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--shapes", default=None, help="comma list of SHAPES names (default all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    args = p.parse_args()
    shapes = [s for s in SHAPES if args.shapes is None or s[0] in args.shapes.split(",")]
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{where}, {args.experts} experts, {args.seeds} seeds a row")
    print(f"{'shape':>14} {'T':>5} {'mma':>8} {'tokens':>6} {'median':>9} {'p99.9':>9} {'max':>9} "
          f"{'>5e-3':>6} {'>1e-2':>6}")
    for name, h, i, k in shapes:
        for t in (int(v) for v in args.tokens.split(",")):
            for mma in args.variants.split(","):
                err = torch.cat([token_errors(h, i, k, t, args.experts, seed, mma, args.device) for seed in range(args.seeds)])
                q = torch.quantile(err.float(), torch.tensor([0.5, 0.999], device=err.device)).tolist()
                print(f"{name:>14} {t:>5} {mma:>8} {err.numel():>6} {q[0]:9.2e} {q[1]:9.2e} {err.max().item():9.2e} "
                      f"{int((err > 5e-3).sum()):>6} {int((err > 1e-2).sum()):>6}", flush=True)


if __name__ == "__main__":
    main()
