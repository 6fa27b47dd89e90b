#!/usr/bin/env bash
# Device call 19 (one H200, session 10): the GPU tests on the final tree (v16's kernels; the e2m1
# decode PTX now one module constant, sm_90a SASS unchanged).
set -u
export PYTHONPATH=src

timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -3 | tee $OUT/gpu_tests.log
