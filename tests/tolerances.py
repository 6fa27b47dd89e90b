"""Every tolerance of the test suite, in one place, each with its reason."""

LAYER_CONTRACT = 1e-2
"""DESIGN.md section 4: a whole layer against the float64 reference (which reproduces the
kernels' rounding steps). Expected about 1e-3 or less."""

LAYER_KERNEL_VS_REFERENCE = 2e-3
"""What the fused kernels actually reach against the reference on the test shapes: the only
differences are FP32 vs float64 accumulation order and the FP32 SiLU, which move a BF16 or
FP8 rounding by one step now and then. A fifth of the contract, so a wrong
scale or a lost rounding step (each worth >= 4e-3) fails."""

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
