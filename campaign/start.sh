#!/bin/bash
# start.sh "YYYY-MM-DD HH:MM UTC": lay out /work/runs on this machine if it lacks it (code clone,
# venv, the stashed runs), bring the code clone to this checkout's main, and start both lanes to
# that deadline (about 12 minutes before the session ends). campaign/README.md says why.
set -eu
deadline=$1
date -d "$deadline" >/dev/null
main=$(cd "$(dirname "$0")/.." && pwd)
runs=/work/runs
mkdir -p "$runs/results-scratch"
cd "$runs"
if pgrep -f "tiedlm reproduce" >/dev/null; then
  echo "start.sh: lanes are running already (pgrep -af 'tiedlm reproduce')" >&2
  exit 1
fi
[ -d code/.git ] || git clone -q "$main" code
git -C code pull -q "$main" main
[ -x venv/bin/tiedlm ] || { python3 -m venv venv && venv/bin/pip install -q -c code/constraints.txt -e code; }
venv/bin/pip install -q --no-deps -e code
venv/bin/python code/scripts/stash_runs.py restore code/campaign/stash "$runs"
# the gamma studies' stage 1 is AL's own (gamma 0.5); only their stage 2 trains at another gamma
for study in gamma-10 gamma-0.8; do
  mkdir -p "$study/ptb-small"
  ln -sfn "$runs/rerun/ptb-small/al" "$study/ptb-small/al"
done
cp code/campaign/lane.sh code/campaign/queue.A code/campaign/queue.B .
echo "$deadline" >deadline
for lane in A B; do
  setsid ./lane.sh "$lane" >/dev/null 2>&1 &
done
sleep 5
pgrep -af "tiedlm (reproduce|train)" || { echo "start.sh: no lane started; see $runs/lane.*.log" >&2; exit 1; }
