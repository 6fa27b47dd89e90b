# Session 15, run 2: ranks sharing one GPU through CUDA IPC; finding 6 replays; short EP=2/4 pressure.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r2; mkdir -p $O
t0=$(date +%s)
for spec in "2 397" "2 641" "4 498" "4 295"; do
  set -- $spec
  for m in fp8 fp16; do
    timeout -s KILL 200 python -m megamoe.cli stress --ranks $1 --share-gpu --start $2 --iterations 1 --profile gpu \
      --mma $m --deadline 180 --json $O/replay_$2_$m.json > $O/replay_$2_$m.log 2>&1 &
  done
  [ $1 = 2 ] && [ $2 = 641 ] && wait
done
wait
echo "replays took $(( $(date +%s) - t0 )) s" | tee $O/times.txt
for f in $O/replay_*.log; do echo "== $f"; tail -n 4 $f; done
t1=$(date +%s)
timeout -s KILL 330 python tools/token_error_tail.py --seeds 3 > $O/token_error_tail.log 2>&1 &
SHARE_GPU=1 COPIES=4 ITERATIONS=40 timeout -s KILL 250 tools/gpu_reliability.sh stress-ep2 $O/p > /dev/null 2>&1 &
SHARE_GPU=1 COPIES=2 ITERATIONS=20 timeout -s KILL 250 tools/gpu_reliability.sh stress-ep4 $O/p > /dev/null 2>&1 &
wait
echo "pressure took $(( $(date +%s) - t1 )) s" | tee -a $O/times.txt
for f in $O/p/stress-ep*.log; do echo "== $f"; grep -E "iterations|failures|error" $f | tail -n 4; done
cat $O/token_error_tail.log
tar czf $OUT/r2.tgz -C $OUT r2
