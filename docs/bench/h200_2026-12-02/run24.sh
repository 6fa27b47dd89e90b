#!/usr/bin/env bash
# Device call 24 (one H200, session 11): GPU tests of the Gluon prefill kernels (with a CUDA
# graph capture); tools/wgmma_prefill.py variants of the GEMM core (one or two warpgroups a
# program, ring stages) at 4096 tokens; `megamoe bench` at the prefill sizes with the torch
# baselines in the same run.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 120 python3 -m pytest -q -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -5 | tee $OUT/tests_wgmma.log
timeout 150 python3 tools/wgmma_prefill.py --tokens 4096 2>&1 | tail -14 | tee $OUT/wgmma_variants.log
timeout 250 python3 -c "import sys; from megamoe.cli import main; sys.exit(main())" bench --shapes v4-flash,gpt-oss-120b --tokens 4096,8192 --sets 2 --no-loop --out $OUT/bench 2>&1 | tail -12 | tee $OUT/bench.log
