# Session 18, run 65: v21 (exact GEMMs at 3-12 rows an expert on exact `_gemm`) under the checks:
# GPU tests, memcheck and racecheck (tiny profile, mma="fp16"), a CUDA-graph soak whose 16-token
# batch takes exact `_gemm`, and pressure iterations at EP = 1 on fp16-l1.
export PYTHONPATH=$PWD/src
O=$OUT/r65; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
timeout -s KILL 120 python -m pytest -q -m gpu tests/test_prefill_wgmma.py -k "three_rows or exact" > $O/pytest.log 2>&1
el pytest; tail -n 3 $O/pytest.log
timeout -s KILL 60 python -m megamoe.cli stress --iterations 16 --profile tiny --device cuda --mma fp16 > $O/plain.log 2>&1
el plain; tail -n 1 $O/plain.log
export SANITIZE_PROFILE=tiny SANITIZE_ITERATIONS=16 MMA=fp16
timeout 60 tools/gpu_reliability.sh memcheck $O/rel > /dev/null 2>&1; el memcheck
timeout 60 tools/gpu_reliability.sh racecheck $O/rel > /dev/null 2>&1; el racecheck
grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|failures:" $O/rel/memcheck.log $O/rel/racecheck.log | head -n 4
unset SANITIZE_PROFILE SANITIZE_ITERATIONS
timeout -s KILL 60 python -m megamoe.cli stress --graphs --replays 2000 --check-every 100 --batch-sizes 1,16,40,256 \
  --experts 32 --mma fp16-l1 > $O/graphs.log 2>&1
el graphs; tail -n 1 $O/graphs.log
START=480 ITERATIONS=240 COPIES=8 MMA=fp16-l1 timeout -s KILL 100 tools/gpu_reliability.sh stress-ep1 $O/gpu > /dev/null 2>&1
el "stress fp16-l1 480-719"; for f in $O/gpu/stress-ep1*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
rm -f $O/gpu/*.json
tar czf $OUT/r65.tgz -C $OUT r65
