#!/usr/bin/env bash
# Device call 6 (one H200): two more prefill attempts on v12, same run: the wide tiles load
# each step's scales a step ahead (X_PREF=1, as the decode tiles do), and the 4-warp 64-row
# tiles ("m64") instead of 8 warps.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
for shape in v4-flash gpt-oss-120b; do
  echo "== $shape X_PREF=0"; X_PREF=0 PYTHONPATH=build/abl/src timeout 100 python3 -m megamoe.bench.breakdown --shape $shape --tokens 4096 --variants default,m64 | grep -v "^$" | sort -u
  echo "== $shape X_PREF=1"; X_PREF=1 PYTHONPATH=build/abl/src timeout 100 python3 -m megamoe.bench.breakdown --shape $shape --tokens 4096 | grep -v "^$" | sort -u
done 2>&1 | tee $O/prefetch.log
