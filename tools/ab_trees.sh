#!/usr/bin/env bash
# Same-run comparisons of versions (the device's METHOD.md: a baseline is measured in the same run
# on the same card). Each commit's src/ goes side by side under build/trees/, and a command runs
# once per tree with that tree first on PYTHONPATH, then once on the working tree's src/.
#
#   tools/ab_trees.sh prepare REV...     here: writes build/trees/<REV>/src (build/ is ignored; pass
#                                        build/trees in the device tool's `carry`)
#   tools/ab_trees.sh run COMMAND...     there: COMMAND for each prepared tree, then for src/,
#                                        each under a "== <tree>" header
#
# For example, v7 against the working tree on one GPU:
#   tools/ab_trees.sh prepare 06a748a
#   (device) tools/ab_trees.sh run python3 -m megamoe.bench.breakdown --tokens 1,64,4096
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TREES=$ROOT/build/trees

case "${1:-}" in
    prepare)
        shift
        [ $# -ge 1 ] || { echo "usage: $0 prepare REV..." >&2; exit 2; }
        for rev in "$@"; do
            git -C "$ROOT" rev-parse --verify --quiet "$rev^{commit}" > /dev/null \
                || { echo "$0: $rev is not a commit" >&2; exit 2; }
            rm -rf "${TREES:?}/$rev"
            mkdir -p "$TREES/$rev"
            git -C "$ROOT" archive "$rev" src | tar -x -C "$TREES/$rev"
            echo "$TREES/$rev/src: $(git -C "$ROOT" log -1 --format='%h %s' "$rev" | cut -c1-80)"
        done ;;
    run)
        shift
        [ $# -ge 1 ] || { echo "usage: $0 run COMMAND..." >&2; exit 2; }
        status=0
        for tree in "$TREES"/*/src "$ROOT/src"; do
            [ -d "$tree" ] || continue
            name=$(basename "$(dirname "$tree")")
            [ "$tree" = "$ROOT/src" ] && name="working tree"
            echo "== $name"
            PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" "$@" || status=$?
        done
        exit $status ;;
    *)
        echo "usage: $0 prepare REV... | run COMMAND..." >&2
        exit 2 ;;
esac
