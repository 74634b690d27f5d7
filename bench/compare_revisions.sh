#!/usr/bin/env bash
# Runs the same benchmark scenarios against several revisions of statestore's source, one after
# the other on this machine, with this checkout's bench/ harness and baselines. Each revision's
# src/ is checked out into a temporary worktree and put first on PYTHONPATH.
#
#   bench/compare_revisions.sh REV [REV...]     (default: a set of revisions listed below)
#
# Results: bench/results/rev-<REV>.md, one file per revision.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
revs=("$@")
[ ${#revs[@]} -gt 0 ] || revs=(fac7594 44415e6 b2748ff 6e30b0d 03dea8b d2cc893 HEAD)
mkdir -p bench/results
for rev in "${revs[@]}"; do
    tree=$(mktemp -d /tmp/statestore-rev-XXXXXX)
    git worktree add --detach --quiet "$tree" "$rev"
    echo "== $rev ($(git log -1 --format=%s "$rev"))"
    PYTHONPATH="$tree/src" "$python" bench/run.py \
        --scenarios latency,memory,contention --sizes 1KB,1MB --latency-updates 400,40 --rounds 5 \
        --contenders statestore-durable,filelock-fsync,raw-floor --memory-updates 10 \
        --contention-contenders statestore-durable --workers 1,8,16 -k 100 \
        --out "bench/results/rev-$rev.md" >/dev/null
    grep -E '^\| statestore durable' "bench/results/rev-$rev.md" || true
    git worktree remove --force "$tree"
done
