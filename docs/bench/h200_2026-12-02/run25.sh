#!/usr/bin/env bash
# Device call 25 (one H200, session 12): the warp-specialized GEMM core
# (prefill_wgmma._gemm_ws: one warpgroup issues the MMAs and promotes, four more warps copy and
# decode, mbarriers between them) against the single-warpgroup core in tools/wgmma_prefill.py
# (float64 check first, then v4-flash L1/L2 at 4096 tokens); then Nsight Compute on one launch
# of each (v4-flash L1, 4096 tokens): stall reasons, issue, pipes.
set -u
export PYTHONPATH=src
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; echo "ncu: $NCU"
timeout 200 python3 tools/wgmma_prefill.py --tokens 4096 --variants 4x128x4,4x128x4w,4x128x4gw,4x128x3w,4x128x5w 2>&1 | tail -16 | tee $OUT/wgmma_variants.log
SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats"
for v in 4x128x4 4x128x4w; do
  timeout 120 $NCU -k regex:_gemm_kernel -c 1 $SECTIONS --print-details all python3 tools/wgmma_prefill.py --once --tokens 4096 --variants $v > $OUT/ncu_$v.log 2>&1
  echo "== $v"; grep -iE "Duration|Stall|Issued Warp|Eligible Warps|No Eligible|Achieved Occupancy|Registers Per|Block Limit|Pipe Utilization|L2 Cache Throughput|L1/TEX Cache Throughput|Memory Throughput|Compute \(SM\) Throughput|Tensor" $OUT/ncu_$v.log | head -40
done
