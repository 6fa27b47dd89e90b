#!/usr/bin/env bash
# Device call 25 (one H200, session 12): Nsight Compute profile of the Gluon prefill GEMM core
# (tools/wgmma_prefill.py --once: v4-flash's L1 at 4096 tokens, 4 warps, 128 tokens, 4
# stages, one launch): speed of light, warp stall reasons, scheduler, memory, and the
# per-instruction source page (SASS with stall samples) as CSV.
set -u
export PYTHONPATH=src
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats --section SourceCounters"
timeout 200 $NCU -k regex:_gemm_kernel -c 1 $SECTIONS --print-details all -o $OUT/l1_core python3 tools/wgmma_prefill.py --once --tokens 4096 --variants 4x128x4 > $OUT/ncu_run.log 2>&1
tail -3 $OUT/ncu_run.log
timeout 60 $NCU -i $OUT/l1_core.ncu-rep --print-details all > $OUT/ncu_details.log 2>&1
timeout 60 $NCU -i $OUT/l1_core.ncu-rep --page source --csv --print-source sass > $OUT/ncu_source.csv 2>&1
grep -iE "stall|Issued Warp|Eligible|Active Warps|Throughput|Duration|Registers|Pipe|L2 Hit|Bandwidth|No Eligible|One or More" $OUT/ncu_details.log | head -80
wc -l $OUT/ncu_source.csv
