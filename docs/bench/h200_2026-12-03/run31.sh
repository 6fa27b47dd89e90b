#!/usr/bin/env bash
# Device call 31 (one H200, session 13): back on v17 (v18 measured slower in run 30), with 90
# seconds left of the session's device time. Nsight Compute's memory sections on the plain GEMM
# core (shared-memory bank conflicts, L1 and L2 traffic of the prefill step), then GPU pressure
# iterations at EP = 1 from 150 in what is left.
set -u
export PYTHONPATH=src
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 55 $NCU -k regex:_gemm_kernel -c 1 --section MemoryWorkloadAnalysis_Tables --section MemoryWorkloadAnalysis \
  python3 tools/wgmma_prefill.py --once --tokens 4096 --variants 4x128x4 > $OUT/ncu_mem.log 2>&1
grep -iE "Bank|Wavefront|Shared|Hit Rate|Mem Busy|Max Bandwidth|Mem Pipes" $OUT/ncu_mem.log | head -30
left=$(( 85 - SECONDS ))
[ $left -gt 20 ] && START=150 ITERATIONS=$(( left * 10 / 25 )) timeout $left tools/gpu_reliability.sh stress-ep1 $OUT/rel 2>&1 | tail -4
