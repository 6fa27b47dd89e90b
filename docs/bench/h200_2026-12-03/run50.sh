# Session 16, run 50: the tree as committed (`_gemm_t` for the exact-products prefill GEMMs, `_gemm`
# FP8 only): the Gluon prefill GPU tests, the GEMM core's variants against FP8 in the same call,
# then pressure iterations on mma="fp16-l1": the prefill profile (batches that take the Gluon
# kernels) and the gpu profile (EP = 1, 160-999).
export PYTHONPATH=$PWD/src
O=$OUT/r50; mkdir -p $O
t0=$(date +%s)
timeout -s KILL 170 python -m pytest -q -m gpu tests/test_prefill_wgmma.py tests/test_gpu.py -k "prefill or exact or far_apart or fold" > $O/pytest.log 2>&1
echo "== pytest ($(( $(date +%s) - t0 )) s)"; tail -n 4 $O/pytest.log
timeout -s KILL 100 python tools/wgmma_prefill.py --tokens 4096 --variants 4x128x4,8x128x3t,8x128x2t,4x128x2t,4x64x3t > $O/core.log 2>&1
echo "== core ($(( $(date +%s) - t0 )) s)"; grep check $O/core.log; tail -n 11 $O/core.log
PROFILE=prefill START=0 ITERATIONS=64 COPIES=8 MMA=fp16-l1 timeout -s KILL 60 tools/gpu_reliability.sh stress-ep1 $O/prefill > /dev/null 2>&1
echo "== prefill profile ($(( $(date +%s) - t0 )) s)"; for f in $O/prefill/stress-ep1*.log; do grep -E "failures:|max relative" $f | tail -n 2; done
START=160 ITERATIONS=840 COPIES=8 MMA=fp16-l1 timeout -s KILL 150 tools/gpu_reliability.sh stress-ep1 $O/gpu > /dev/null 2>&1
echo "== gpu profile ($(( $(date +%s) - t0 )) s)"; for f in $O/gpu/stress-ep1*.log; do grep -E "failures:|max relative" $f | tail -n 2; done
tar czf $OUT/r50.tgz -C $OUT r50
