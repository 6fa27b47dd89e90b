#!/usr/bin/env bash
# Device call 26 (one H200, session 12): the fold table's rows up to 11 binades computed
# instead of loaded (run 25's profile: long-scoreboard stalls, 40% of the warps' cycles, from
# the table loads in the decode). GEMM core variants (plain and warp-specialized), the GPU
# tests, the layer's breakdown with WARP_SPECIALIZED off and on, and a warp-state profile of
# the plain core.
set -u
export PYTHONPATH=src
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 100 python3 tools/wgmma_prefill.py --tokens 4096 --variants 4x128x4,4x128x4w,4x128x3 2>&1 | tail -8 | tee $OUT/wgmma_variants.log
timeout 110 python3 -m pytest -q -x -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -4 | tee $OUT/tests_wgmma.log
for shape in v4-flash gpt-oss-120b; do
  for ws in False True; do
    echo "WARP_SPECIALIZED = $ws" | tee -a $OUT/breakdown.log
    timeout 50 python3 -c "
from megamoe.kernels import prefill_wgmma as pw
pw.WARP_SPECIALIZED = $ws
from megamoe.bench import breakdown
breakdown.main(['--shape', '$shape', '--tokens', '4096,8192'])" 2>&1 | tail -2 | tee -a $OUT/breakdown.log
  done
done
timeout 60 $NCU -k regex:_gemm_kernel -c 1 --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --print-details all python3 tools/wgmma_prefill.py --once --tokens 4096 --variants 4x128x4 > $OUT/ncu_plain.log 2>&1
grep -iE "Duration|Stall (Long|Wait|Barrier|MIO|Short|GMMA|Not Sel)|Issued Warp|Eligible Warps|Lsu Wavefronts|Tensor Cycles|L1/TEX Cache Throughput" $OUT/ncu_plain.log | head -20
