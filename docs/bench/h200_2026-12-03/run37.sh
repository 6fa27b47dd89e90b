#!/usr/bin/env bash
# Device call 37 (one H200, session 14): compute-sanitizer memcheck and racecheck on pressure
# iterations that take the prefill tiles (on Hopper the Gluon kernels of v17, with their
# cp.async rings, barriers and wgmma): the new `prefill` stress profile, iterations 0-15 (six
# of them put 128-256 rows on an expert in FP8 x MXFP4 mode: 5, 8, 9, 10, 13, 14).
# The earlier sanitizer runs (2026-11-28) used the tiny profile, which never reaches them.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
# Kernels compiled before the sanitizers run (they slow the compiler's own GPU work too).
timeout 120 python3 -m megamoe.cli stress --iterations 16 --profile prefill --device cuda > $OUT/plain.log 2>&1
tail -4 $OUT/plain.log
SANITIZE_PROFILE=prefill SANITIZE_ITERATIONS=16 timeout 200 tools/gpu_reliability.sh memcheck $OUT/san | tail -15
SANITIZE_PROFILE=prefill SANITIZE_ITERATIONS=16 timeout 250 tools/gpu_reliability.sh racecheck $OUT/san | tail -15
cd $OUT && tar czf san.tgz san && rm -rf san
