# Session 17, run 54: v19's exact-products Gluon kernels (mma="fp16-l1") under the checks the FP8
# kernels already passed: the Gluon-prefill GPU tests (f0f127f's test file, not GPU-run yet) and
# the new fp16-l1 graph-soak parametrization; compute-sanitizer memcheck and racecheck on the
# prefill profile; the 10,000-replay graph soak with prefill batches; the large cases past 2^31.
export PYTHONPATH=$PWD/src
O=$OUT/r54; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $O/gpu.txt
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
timeout -s KILL 170 python -m pytest -q -m gpu tests/test_prefill_wgmma.py tests/test_gpu.py -k "prefill or exact or far_apart or fold" > $O/pytest.log 2>&1
el pytest; tail -n 3 $O/pytest.log
timeout -s KILL 80 python -m pytest -q -m gpu tests/test_stress.py -k "graph_soak_on_gpu and fp16" > $O/pytest_graph.log 2>&1
el pytest_graph; tail -n 2 $O/pytest_graph.log
# Kernels compiled before the sanitizers run.
timeout -s KILL 90 python -m megamoe.cli stress --iterations 16 --profile prefill --device cuda --mma fp16 > $O/plain.log 2>&1
el plain; tail -n 3 $O/plain.log
export SANITIZE_PROFILE=prefill SANITIZE_ITERATIONS=16 MMA=fp16   # both GEMMs on _gemm_t
timeout 150 tools/gpu_reliability.sh memcheck $O/rel > /dev/null 2>&1; el memcheck
timeout 150 tools/gpu_reliability.sh racecheck $O/rel > /dev/null 2>&1; el racecheck
MMA=fp16-l1 timeout 60 tools/gpu_reliability.sh graphs-prefill $O/rel > /dev/null 2>&1; el graphs-prefill
MMA=fp16-l1 timeout 150 tools/gpu_reliability.sh large $O/rel > /dev/null 2>&1; el large
cat $O/rel/summary.txt
grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|failures:|max relative" $O/rel/memcheck.log $O/rel/racecheck.log | head
grep -h -E "CUDA-graph soak|relative error" $O/rel/graphs-prefill.log $O/rel/large.log | tail -n 4
tar czf $OUT/r54.tgz -C $OUT r54 && rm -rf $O
