# Session 17, runs 55 and 56: pressure at EP = 2 (run 56: STEP=stress-ep4 S0=152, EP = 4) with both ranks' processes on the one GPU (symm over CUDA
# IPC), default FP8 MMAs, v19's tree: iterations S0-999 (default 200) in chunks of up to 200 (4 copies of 50), as
# many chunks as fit in the call (each chunk starts its processes afresh).
O=$OUT/${TAG:-r55}; mkdir -p $O
t0=$(date +%s); s=${S0:-200}
while [ $s -lt 1000 ] && [ $(( $(date +%s) - t0 )) -lt ${BUDGET:-430} ]; do
    n=$(( 1000 - s < 200 ? 1000 - s : 200 ))
    SHARE_GPU=1 START=$s ITERATIONS=$n COPIES=4 timeout 300 tools/gpu_reliability.sh ${STEP:-stress-ep2} $O/c$s > /dev/null 2>&1
    echo "== chunk $s ($(( $(date +%s) - t0 )) s)"
    for f in $O/c$s/*-?.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
    s=$((s + n))
done
cat $O/c*/summary.txt
tar czf $OUT/${TAG:-r55}.tgz -C $OUT ${TAG:-r55} && rm -rf $O
