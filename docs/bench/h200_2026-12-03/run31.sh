#!/usr/bin/env bash
# Device call 31 (one H200, session 13): back on v17 (v18 measured slower in run 30). Nsight
# Compute's memory sections on the plain GEMM core (shared-memory bank conflicts, L2 and L1
# traffic of the prefill step), then GPU pressure iterations at EP = 1 from 150 in what is left.
set -u
export PYTHONPATH=src
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 70 $NCU -k regex:_gemm_kernel -c 1 --section MemoryWorkloadAnalysis_Tables --section MemoryWorkloadAnalysis \
  --section SpeedOfLight python3 tools/wgmma_prefill.py --once --tokens 4096 --variants 4x128x4 > $OUT/ncu_mem.log 2>&1
grep -iE "Bank|Wavefront|Shared|L2 Hit|L1/TEX Hit|Mem Busy|Max Bandwidth|Throughput" $OUT/ncu_mem.log | head -30
START=150 ITERATIONS=$(( (175 - SECONDS) * 10 / 17 )) timeout $((195 - SECONDS)) tools/gpu_reliability.sh stress-ep1 $OUT/rel 2>&1 | tail -6
