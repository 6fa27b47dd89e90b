"""Compile the fused kernels for sm_90a on a machine without a GPU and report registers,
spills, shared memory and which MMA instructions the SASS uses.

    python tools/inspect_kernels.py [--sass DIR] [--symm] [--f16-mma] [--gluon]

Triton's wheel carries ptxas and nvdisasm, so this needs no CUDA device: the resource
report and the disassembly answer most performance questions before any GPU time is spent.
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from megamoe.experts import _register_cap
from megamoe.kernels import prefill_wgmma
from megamoe.kernels.config import GemmConfig, fma_ahead, is_wide, pick_config
from megamoe.kernels.l1_swiglu import _l1_swiglu_kernel
from megamoe.kernels.l2 import _l2_kernel

TARGET = GPUTarget("cuda", 90, 32)
SYMM = False
F16_MMA = False


def _signature(fn, types, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    return sig


def compile_kernel(fn, types, constexprs, num_warps, num_stages, maxnreg=None):
    gluon = fn in (prefill_wgmma._l1_kernel, prefill_wgmma._l2_kernel)
    sig = _signature(fn, types, constexprs)
    # As at a real launch, where Triton specialises pointers and integers divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and sig[name] != "fp32" and name not in NOT_DIVISIBLE}
    src = (GluonASTSource if gluon else ASTSource)(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=options)


NOT_DIVISIBLE = {"num_local_experts", "num_experts", "num_topk", "num_cols_tiles", "rank", "num_ranks", "entries_per_rank",
                 "sf_words", "groups"}
L1_TYPES = dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", topk_weights_ptr="*fp32", sorted_rows_ptr="*i32",
                expert_offsets_ptr="*i32", w_ptr="*u8", w_scale_ptr="*bf16", inter_ptr="*fp8e4nv",
                inter_scale_ptr="*fp32", clamp="fp32", bias_ptr="*fp32")
L2_TYPES = dict(inter_ptr="*fp8e4nv", inter_scale_ptr="*fp32", sorted_rows_ptr="*i32", expert_offsets_ptr="*i32",
                w_ptr="*u8", w_scale_ptr="*bf16", out_ptr="*bf16", topk_weights_ptr="*fp32", bias_ptr="*fp32",
                peer_ptrs_ptr="*i64", out_offset="i64")
GLUON_L1_TYPES = dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", topk_weights_ptr="*fp32", sorted_rows_ptr="*i32",
                      expert_offsets_ptr="*i32", w_ptr="*u8", ws_ptr="*i32", bias_ptr="*fp32", lut_ptr="*i32",
                      inter_ptr="*fp8e4nv", inter_scale_ptr="*fp32", clamp="fp32", stride_w_e="i64",
                      stride_ws_e="i64")
GLUON_L2_TYPES = dict(inter_ptr="*fp8e4nv", inter_scale_ptr="*fp32", sorted_rows_ptr="*i32", expert_offsets_ptr="*i32",
                      topk_weights_ptr="*fp32", w_ptr="*u8", ws_ptr="*i32", bias_ptr="*fp32", lut_ptr="*i32",
                      out_ptr="*bf16", stride_w_e="i64", stride_ws_e="i64")
BARRIER_TYPES = dict(peer_ptrs_ptr="*i64", signals_offset="i64", signals_ptr="*i64", meta_ptr="*i32",
                     error_address="i64", timeout_ns="i64", max_polls="i64")
GATHER_TYPES = dict(peer_ptrs_ptr="*i64", x_offset="i64", sf_offset="i64", weights_offset="i64",
                    sorted_rows_ptr="*i32", expert_offsets_ptr="*i32", recv_x_ptr="*i64", recv_scales_ptr="*fp32",
                    recv_weights_ptr="*fp32")


def innermost_mma_loop(sass: str) -> int | None:
    """SASS instructions of the shortest backward-branch loop holding a GMMA (the K loop)."""
    labels, body = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\.L_x_(\d+):", line.strip())
        if label:
            labels[label.group(1)] = len(body)
        elif re.match(r"\s+/\*[0-9a-f]+\*/", line):
            body.append(line)
    sizes = []
    for i, line in enumerate(body):
        target = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", line)
        if target and labels.get(target.group(1), i + 1) <= i:
            start = labels[target.group(1)]
            if any("GMMA" in b for b in body[start:i + 1]):
                sizes.append(i + 1 - start)
    return min(sizes) if sizes else None


def variants():
    """The heuristic's configs for a v4-flash-like shape at 1/256, 0.1, 2 and 200 rows an expert (FMA
    tiles with split K, FMA, MMA decode and prefill tiles); with --symm also the symm backend's variants (gathered rows,
    L2 writing to peers) and its own kernels."""
    for rows_per_expert in (1 / 256, 0.1, 2, 200):
        for symm in (False, True) if SYMM else (False,):
            tag = "-symm" if symm else ""
            cfg = pick_config("l1", int(rows_per_expert * 256), 256)
            yield ("l1" + tag, cfg), _l1_swiglu_kernel, L1_TYPES, dict(
                QUANTIZED=True, HAS_CLAMP=False, INTER_SF_FP32=False, HAS_BIAS=False, GPT_OSS=False, GATHERED=symm,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_E=256, BLOCK_K=cfg.block_k, UPCAST=False,
                WIDE_SCALES=False, F16_MMA=F16_MMA, A_PER_STEP=is_wide(cfg), PERSISTENT=symm, PDL=not symm,
                FMA_AHEAD=fma_ahead(cfg), FMA_SPLIT=cfg.k_split, ROWS_ABOVE=0, ROWS_UP_TO=0)
            cfg = pick_config("l2", int(rows_per_expert * 256), 256)
            yield ("l2" + tag, cfg), _l2_kernel, L2_TYPES, dict(
                QUANTIZED=True, HAS_BIAS=False, GATHERED=symm, REMOTE_OUT=symm, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_E=256, BLOCK_K=cfg.block_k, UPCAST=False, WIDE_SCALES=False,
                F16_MMA=F16_MMA, A_PER_STEP=is_wide(cfg), PERSISTENT=symm, PDL=not symm,
                FMA_AHEAD=fma_ahead(cfg), FMA_SPLIT=cfg.k_split, ROWS_ABOVE=0, ROWS_UP_TO=0)
    if SYMM:
        from megamoe.comm.symm import _barrier_kernel, _gather_kernel

        one = GemmConfig(16, 16, 1, 1)
        for phase in (0, 1):
            yield (f"barrier{phase}", one), _barrier_kernel, BARRIER_TYPES, dict(
                PHASE=phase, NUM_PHASES=2, BLOCK_R=8, META_FAIL=3, INTERPRET=False, PDL=True)
        yield ("gather", GemmConfig(16, 16, 4, 1)), _gather_kernel, GATHER_TYPES, dict(
            QUANTIZED=True, BLOCK_W=512, BLOCK_G=128, PDL=True)


def gluon_variants():
    """The Gluon kernels of kernels/prefill_wgmma.py as `_shape_args` launches them for 256
    experts: FP8 `_gemm` at prefill (200 rows an expert), the exact products at 8 (exact
    `_gemm`), 24 (`_gemm_t`, 64 tokens) and 200 rows an expert (`_gemm_t`, 128 tokens), and at 2
    the MMA launch of a split GEMM (exact `_gemm`, experts with more than 2 rows). The config's
    block_m is the tokens a tile, block_n the weight rows a program."""
    for exact, rows_per_expert, rows_above in ((False, 200, 0), (True, 8, 0), (True, 24, 0), (True, 200, 0),
                                               (True, 2, 2)):
        shape = prefill_wgmma._shape_args(256, exact, rows_per_expert * 256)
        warps = shape.pop("num_warps")
        cfg = GemmConfig(shape["BLOCK_T"], shape["BLOCK_W"], warps, shape["STAGES"])
        core = "gemm_t" if shape["TOKENS_M"] else "gemm"
        tag = f"{core}{'-exact' if exact else ''}{'-mix' if rows_above else ''}"
        yield (f"gl1-{tag}", cfg), prefill_wgmma._l1_kernel, GLUON_L1_TYPES, dict(
            shape, HAS_CLAMP=False, INTER_SF_FP32=False, HAS_BIAS=False, GPT_OSS=False, PDL=True,
            ROWS_ABOVE=rows_above)
        yield (f"gl2-{tag}", cfg), prefill_wgmma._l2_kernel, GLUON_L2_TYPES, dict(
            shape, HAS_BIAS=False, PDL=True, ROWS_ABOVE=rows_above)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sass", help="write each kernel's PTX and SASS into this folder")
    parser.add_argument("--symm", action="store_true", help="also the symm backend's kernel variants")
    parser.add_argument("--f16-mma", action="store_true", help="the GEMMs of MegaMoEBuffer(mma='fp16')")
    parser.add_argument("--gluon", action="store_true", help="the Gluon kernels of kernels/prefill_wgmma.py instead")
    args = parser.parse_args()
    global SYMM, F16_MMA
    SYMM = args.symm
    F16_MMA = args.f16_mma
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    nvdisasm, cuobjdump = os.path.join(bin_dir, "nvdisasm"), os.path.join(bin_dir, "cuobjdump")
    for (name, cfg), fn, types, constexprs in (gluon_variants() if args.gluon else variants()):
        block_m = cfg.block_m
        # The launchers' register cap (experts._register_cap) where they set one.
        persistent_fp8 = constexprs.get("PERSISTENT", False) and constexprs["QUANTIZED"]
        which = {_l1_swiglu_kernel: "l1", _l2_kernel: "l2"}.get(fn)
        cap = _register_cap(which, persistent_fp8, cfg).get("maxnreg") if which else None
        k = compile_kernel(fn, types, constexprs, cfg.num_warps, cfg.num_stages, cap)
        ptx = k.asm["ptx"]
        cubin = k.asm["cubin"]
        tag = f"{name}_m{block_m}" + (f"k{cfg.k_split}" if cfg.k_split > 1 else "")
        sass = ""
        if args.sass:
            os.makedirs(args.sass, exist_ok=True)
            with open(os.path.join(args.sass, tag + ".ptx"), "w") as f:
                f.write(ptx)
            path = os.path.join(args.sass, tag + ".cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True).stdout
            with open(os.path.join(args.sass, tag + ".sass"), "w") as f:
                f.write(sass)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        ops = {op: len(re.findall(op, ptx)) for op in ("wgmma.mma_async", "cp.async.cg", "cp.async.ca", "ld.global",
                                                        "ld.shared", "st.shared")}
        loop = innermost_mma_loop(sass) if sass else None
        print(f"{tag:<16} regs={res[1]:<4} stack={res[2]:<4} local={res[4]:<5} smem={k.metadata.shared:<7} "
              + " ".join(f"{op}={n}" for op, n in ops.items())
              + (f" k-loop={loop} SASS" if loop else ""))


if __name__ == "__main__":
    main()
