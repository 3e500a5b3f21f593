#!/bin/bash
# stash.sh: after the lanes have stopped, replace campaign/stash with resumable copies of every
# unfinished PTB-small run and of the stage-1 runs that stage 2s still start from. Then commit it.
set -eu
main=$(cd "$(dirname "$0")/.." && pwd)
runs=/work/runs
if pgrep -f "tiedlm reproduce" >/dev/null; then
  echo "stash.sh: lanes are still running; let them reach the deadline first" >&2
  exit 1
fi
keep=()
for run in "$runs"/rerun/ptb-small/* "$runs"/ptb-small/* "$runs"/gamma-*/ptb-small/*; do
  [ -L "$run" ] || [ ! -f "$run/run.json" ] && continue
  case "$run" in
  */rerun/ptb-small/al | */ptb-small/re) keep+=("$run") ;;  # stage 2s start from these
  *) [ -f "$run/final.json" ] || keep+=("$run") ;;
  esac
done
"$main/.venv/bin/python" "$main/scripts/stash_runs.py" save "$runs" "$main/campaign/stash" "${keep[@]}"
du -sh "$main/campaign/stash"
