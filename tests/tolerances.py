"""Every tolerance of the test suite, in one place, each with its reason."""

LAYER_CONTRACT = 1e-2
"""DESIGN.md section 4: a whole layer against the float64 reference (which reproduces the
kernels' rounding steps). Expected about 1e-3 or less."""

LAYER_KERNEL_VS_REFERENCE = 5e-3
"""The fused kernels against the reference (which takes the same rounding steps in float64).
In the Triton interpreter the result is exact up to FP32 accumulation order (measured 0 on the
test shapes). On Hopper, FP8 tensor-core MMAs sum each 32-product group with truncated partial
sums (about 14 bits), so L1's output sits ~1e-5 away from the float64 value and now and then
lands on the other side of a BF16 or FP8 rounding step, each such element off by one step
(0.4% or 6%): measured 2-3e-3 on an H200 at v4-flash and gpt-oss shapes. The Gluon prefill
kernels (kernels/prefill_wgmma.py) chain a step's four k32 MMAs before promoting, so the
truncated sums run over 128 products: 3.7e-3 at 4096 and 8192 tokens (H200, 2026-12-02). Near
the contract's half: a wrong scale, a lost rounding step or a skipped row is >= 1e-2."""

LAYER_EXACT_PRODUCTS = 1e-3
"""MegaMoEBuffer(mma="fp16") against the reference on a GPU: exact products and FP32 sums, so
only the FP32 summation order differs from float64, and a rounding step flips only when L1's
output lies within an FP32 ulp of it. Measured 0 (1 token) to 1.5e-4 (4096 tokens) at v4-flash
on an H200, 2026-11-28; a tenth of the contract, 7x above the largest measured."""

BF16_REFERENCE_VS_UNROUNDED = 1e-2
"""bf16xbf16 reference against an unrounded float64 MoE: four BF16 roundings (L1 output,
SwiGLU output, L2 output, y), each <= 2^-9 relative; measured about 4e-3."""

FP8_REFERENCE_VS_DEQUANTIZED = 8e-2
"""fp8xfp4 reference against a float64 MoE with the same (dequantized MXFP4) weights and
unquantized activations: two FP8 e4m3 roundings of activations (x and the SwiGLU output),
each about 2.7% RMS relative; measured about 4.7e-2."""

FP8_REFERENCE_VS_UNQUANTIZED = 0.3
"""fp8xfp4 reference against the float64 MoE with the original BF16 weights: adds the MXFP4
weight error (e2m1 keeps one mantissa bit: about 12% RMS per matrix); measured about 0.2."""

ROUTER_WEIGHTS = 1e-6
"""Routing weights against float64: an FP32 softmax / sigmoid and one division, a few FP32 ulps
(1.2e-7 each) apart; the experts chosen are compared exactly."""

HF_ROUTER_WEIGHTS = 2.0**-8
"""Our routing weights against transformers': Qwen3-MoE's router and gpt-oss's softmax round
them to BF16 (relative step 2^-8 at most); ours stay FP32. The experts chosen are compared exactly."""

TORCH_BF16_ERROR_FACTOR = 2.0
"""bf16xbf16 patched block against a float64 MoE on the same routing: at most twice the error of
transformers' own BF16 block (flash-attention's rule for a fused kernel at the same precision)."""

MODEL_LOGITS_BF16 = 2e-2
"""Logits of a tiny model patched in bf16xbf16 mode against the same model in BF16: the fused
path rounds at other points than transformers' BF16 path (each slot before the FP32 sum; routing
weights in FP32), so each MoE output moves by about 5e-3, which the residual stream carries to
the logits; measured 5e-3 to 1e-2 (2 layers, random weights)."""

MODEL_LOGITS_FP8_MEDIAN = 0.1
"""Median over tokens of the logits' relative error, a tiny model patched in fp8xfp4 mode
against the same model on the same (MXFP4-valued) weights: two FP8 activation roundings per MoE
layer (FP8_REFERENCE_VS_DEQUANTIZED each) carried through the residual stream; measured 3e-2 to
7e-2. The median, because a token whose quantized activations tip a later router into another
expert (a near-tie) rightly moves further (measured up to 0.5 for 1 token in 10)."""
