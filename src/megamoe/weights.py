"""Expert weights in the layout the kernels read.

User layout (DESIGN.md section 2), per rank's local experts E_l:
    fp8xfp4:   L1 (uint8 [E_l, 2I, H/2], uint8 [E_l, 2I, H/32]), gate rows then up rows;
               L2 (uint8 [E_l, H, I/2], uint8 [E_l, H, I/32]). Element 2i in the low nibble.
    bf16xbf16: L1 bfloat16 [E_l, 2I, H], L2 bfloat16 [E_l, H, I].

Kernel layout (`ExpertWeights`), fp8xfp4:
    w    uint8 [E_l, N/32, S, 32, 64]
                                S = ceil(K/128) steps of 128 columns. Rows come in tiles of
                                TILE_ROWS = 32, and a tile's 32 rows x 64 bytes of one step are
                                one contiguous 2 KB block, so the GEMMs' loads of a step are
                                whole blocks, not 64 bytes from each of 32 rows K/2 bytes apart.
                                Within a row's 64 bytes of a step: K is cut into chunks of 64;
                                byte j of chunk c holds element 64c + j in its low nibble and
                                element 64c + 32 + j in its high nibble, so the two nibbles of
                                a tile of bytes decode to two whole scale groups with no
                                shuffling. Columns past K hold code 0 (the value 0).
    w_sf bf16 [E_l, N, G4]      each group's scale 2^(e-127) (exact in BF16); a row's 4 scales
                                of a 128-wide step of K are one 8-byte vector. G4 = ceil(K/128)
                                * 4: the kernels read whole steps; padding groups hold 1. Costs
                                1 byte per 32 weights over the 17 of MXFP4.
bf16xbf16: w is the user tensor (contiguous), w_sf is None.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .formats import SCALE_GROUP, e2m1_lut, ue8m0_to_float
from .buffer import step_groups
from .reference import check_bias, check_expert_weights, check_mode

CHUNK = 64
"""K elements per packed chunk: two scale groups, one in each nibble."""
STEP = 128
"""K elements per step of the GEMM loop: two chunks."""
TILE_ROWS = 32
"""Rows of a weight tile whose bytes of one step are contiguous. The GPU's tile configs read whole
tiles (L1: BLOCK_N gate and BLOCK_N up rows, L2: BLOCK_N rows, BLOCK_N >= 32); narrower test
configs read parts of blocks, which is correct, only less contiguous."""


@dataclass(frozen=True)
class ExpertWeights:
    """One projection of all local experts, laid out for the kernels. out = W @ in, W: [N, K]."""

    mode: str
    w: torch.Tensor
    w_sf: torch.Tensor | None
    num_experts: int
    n: int
    k: int
    bias: torch.Tensor | None = None   # float32 [E_l, N], added to the FP32 output

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + (self.w_sf.numel() if self.w_sf is not None else 0)

    def dequantize(self, expert: int) -> torch.Tensor:
        """float32 [N, K]: the values of one expert's matrix (the CPU path and tests use this)."""
        if self.mode != "fp8xfp4":
            return self.w[expert].float()
        tiles, steps, rows, step_bytes = self.w[expert].shape
        packed = self.w[expert].permute(0, 2, 1, 3).reshape(tiles * rows, steps * step_bytes)
        n, half_kp = packed.shape
        chunks = packed.view(n, half_kp // (CHUNK // 2), 1, CHUNK // 2)
        codes = torch.cat([chunks & 0xF, chunks >> 4], dim=2).reshape(n, 2 * half_kp)
        values = e2m1_lut(packed.device)[codes.long()].view(n, -1, SCALE_GROUP)
        scales = self.w_sf[expert].float().unsqueeze(-1)
        return (values * scales).reshape(n, -1)[:, : self.k]


def tile_steps(rows: torch.Tensor) -> torch.Tensor:
    """Packed rows [E, N, S * 64] (bytes of S 128-wide steps) -> the kernels' tiled layout
    [E, N / TILE_ROWS, S, TILE_ROWS, 64], contiguous: each step of a row tile one block."""
    e, n, row_bytes = rows.shape
    if n % TILE_ROWS or row_bytes % (STEP // 2):
        raise ValueError(f"rows: expected [E, N, S * {STEP // 2}] with N a multiple of {TILE_ROWS}, "
                         f"got {tuple(rows.shape)}")
    steps = row_bytes // (STEP // 2)
    return rows.view(e, n // TILE_ROWS, TILE_ROWS, steps, STEP // 2).permute(0, 1, 3, 2, 4).contiguous()


def _pack_chunks(w_q: torch.Tensor, w_sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, n, half_k = w_q.shape
    k = 2 * half_k
    steps = -(-k // STEP)
    codes = torch.zeros(e, n, steps * STEP, dtype=torch.uint8, device=w_q.device)
    codes[..., 0:k:2] = w_q & 0xF
    codes[..., 1:k:2] = w_q >> 4
    chunks = codes.view(e, n, steps * STEP // CHUNK, 2, CHUNK // 2)
    packed = chunks[..., 0, :] | (chunks[..., 1, :] << 4)            # [e, n, chunks, 32]
    scales = torch.ones((e, n, step_groups(k)), dtype=torch.bfloat16, device=w_sf.device)
    scales[:, :, : k // SCALE_GROUP] = ue8m0_to_float(w_sf).bfloat16()
    return tile_steps(packed.reshape(e, n, steps * STEP // 2)), scales


def _transform_one(weights, mode: str, name: str) -> ExpertWeights:
    e, n, k = check_expert_weights(weights, mode, name)
    if mode == "fp8xfp4":
        if n % TILE_ROWS:
            raise ValueError(f"{name}: expected a multiple of {TILE_ROWS} rows (N of [E, N, K/2]), got {n}")
        packed, scales = _pack_chunks(*weights)
        return ExpertWeights(mode, packed, scales, e, n, k)
    return ExpertWeights(mode, weights.contiguous(), None, e, n, k)


def transform_weights(l1_weights, l2_weights, mode: str = "fp8xfp4", *, l1_bias: torch.Tensor | None = None,
                      l2_bias: torch.Tensor | None = None) -> tuple[ExpertWeights, ExpertWeights]:
    """User-layout L1 / L2 expert weights (module docstring) -> (l1, l2) for `mega_moe`.

    L1 is [E_l, 2I, H] (gate rows 0..I-1, up rows I..2I-1), L2 is [E_l, H, I], in the packed
    forms of `mode`. l1_bias [E_l, 2I] and l2_bias [E_l, H] are optional (any float dtype,
    kept as float32). Raises TypeError / ValueError naming the tensor on any mismatch.
    """
    check_mode(mode)
    l1 = _transform_one(l1_weights, mode, "l1_weights")
    l2 = _transform_one(l2_weights, mode, "l2_weights")
    check_bias("l1_bias", l1_bias, l1.num_experts, l1.n, l1.device)
    check_bias("l2_bias", l2_bias, l2.num_experts, l2.n, l2.device)
    if l1_bias is not None:
        l1 = replace(l1, bias=l1_bias.float().contiguous())
    if l2_bias is not None:
        l2 = replace(l2, bias=l2_bias.float().contiguous())
    if l1.n % 2:
        raise ValueError(f"l1_weights: expected 2I rows (gate then up), got {l1.n}")
    inter = l1.n // 2
    if inter % SCALE_GROUP:
        raise ValueError(f"l1_weights: intermediate I = {inter} must be a multiple of {SCALE_GROUP}")
    expected_l2 = (l1.num_experts, l1.k, inter)
    if (l2.num_experts, l2.n, l2.k) != expected_l2:
        raise ValueError(f"l2_weights: expected [E, H, I] = {list(expected_l2)} to match l1_weights "
                         f"[E, 2I, H] = {[l1.num_experts, l1.n, l1.k]}, got {[l2.num_experts, l2.n, l2.k]}")
    if l1.device != l2.device:
        raise ValueError(f"l2_weights: expected device {l1.device} like l1_weights, got {l2.device}")
    return l1, l2
