#!/usr/bin/env bash
# Device calls 5 and 6 (one H200, the machine of call 4 still warm): the GPU tests, then 250 more
# pressure iterations at EP = 1 (from 100). Call 5's output (15 passed) came back in the reply only.
set -u
export PYTHONPATH=src
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -3
START=100 ITERATIONS=250 timeout 200 tools/gpu_reliability.sh stress-ep1 $OUT/rel > /dev/null 2>&1; echo "stress rc=$?"; tail -5 $OUT/rel/stress-ep1*.log
