#!/usr/bin/env bash
# Device call 25 (one H200, session 12): the warp-specialized GEMM core
# (prefill_wgmma._gemm_ws: one warpgroup issues the MMAs and promotes, four more warps copy and
# decode, mbarriers between them) against the single-warpgroup core in tools/wgmma_prefill.py
# (float64 check first, then v4-flash L1/L2 at 4096 tokens); the GPU tests of both; the layer's
# stage breakdown with prefill_wgmma.WARP_SPECIALIZED off and on (same call); Nsight Compute on
# one launch of the warp-specialized core (v4-flash L1, 4096 tokens).
set -u
export PYTHONPATH=src
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; echo "ncu: $NCU"
timeout 150 python3 tools/wgmma_prefill.py --tokens 4096 --variants 4x128x4,4x128x4w,4x128x4gw,4x128x3w,4x128x5w 2>&1 | tail -16 | tee $OUT/wgmma_variants.log
timeout 130 python3 -m pytest -q -x -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -4 | tee $OUT/tests_wgmma.log
for shape in v4-flash gpt-oss-120b; do
  for ws in False True; do
    echo "WARP_SPECIALIZED = $ws" | tee -a $OUT/breakdown.log
    timeout 55 python3 -c "
from megamoe.kernels import prefill_wgmma as pw
pw.WARP_SPECIALIZED = $ws
from megamoe.bench import breakdown
breakdown.main(['--shape', '$shape', '--tokens', '4096,8192'])" 2>&1 | tail -3 | tee -a $OUT/breakdown.log
  done
done
SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis --section LaunchStats"
timeout 70 $NCU -k regex:_gemm_kernel -c 1 $SECTIONS --print-details all python3 tools/wgmma_prefill.py --once --tokens 4096 --variants 4x128x4w > $OUT/ncu_ws.log 2>&1
grep -iE "Duration|Stall|Issued Warp|Eligible Warps|No Eligible|Achieved Occupancy|Block Limit|Pipe|Throughput" $OUT/ncu_ws.log | head -40
