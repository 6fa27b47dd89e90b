# Session 18, run 63: v20's 64-token `_gemm_t` shape (4 warps, 2 ring stages) under
# compute-sanitizer: memcheck and racecheck on the tiny profile with both GEMMs exact (mma="fp16":
# batches of more than 3 rows an expert take it), then pressure iterations at EP = 1 on fp16.
export PYTHONPATH=$PWD/src
O=$OUT/r63; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
timeout -s KILL 90 python -m megamoe.cli stress --iterations 16 --profile tiny --device cuda --mma fp16 > $O/plain.log 2>&1
el plain; tail -n 2 $O/plain.log
export SANITIZE_PROFILE=tiny SANITIZE_ITERATIONS=16 MMA=fp16
timeout 150 tools/gpu_reliability.sh memcheck $O/rel > /dev/null 2>&1; el memcheck
timeout 150 tools/gpu_reliability.sh racecheck $O/rel > /dev/null 2>&1; el racecheck
cat $O/rel/summary.txt
grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|failures:|max relative" $O/rel/memcheck.log $O/rel/racecheck.log | head
unset SANITIZE_PROFILE SANITIZE_ITERATIONS
START=0 ITERATIONS=240 COPIES=8 MMA=fp16 timeout -s KILL 150 tools/gpu_reliability.sh stress-ep1 $O/gpu > /dev/null 2>&1
el "stress fp16 0-239"; for f in $O/gpu/stress-ep1*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
rm -f $O/gpu/*.json
tar czf $OUT/r63.tgz -C $OUT r63
