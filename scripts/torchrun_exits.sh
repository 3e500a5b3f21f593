#!/usr/bin/env bash
# How often does a 2-rank gloo run of `tiedlm train` fail at exit? Runs N pairs of torchrun
# launches (a 1-epoch run, then its resume to epoch 2) on a tiny synthetic corpus and counts
# non-zero exits; each failure's stderr is kept in the work folder.
#
#     scripts/torchrun_exits.sh 60 [WORK_DIR]
#
# Before the fix in tiedlm.cli.run (ranks leave with os._exit), about 1 launch in 40 died with
# "terminate called without an active exception" during interpreter finalization.
set -euo pipefail
pairs=${1:?usage: scripts/torchrun_exits.sh PAIRS [WORK_DIR]}
top=$(cd "$(dirname "$0")/.." && pwd)
work=${2:-$(mktemp -d)}
python=${PYTHON:-$top/.venv/bin/python}
export PYTHONPATH=$top/src:$top/tests OMP_NUM_THREADS=1 PYTHONFAULTHANDLER=1
mkdir -p "$work" && cd "$work"
"$python" - <<'EOF'
from pathlib import Path

from conftest import write_config, write_corpus

config = write_config(Path("c.toml"), write_corpus(Path("corpus")))
config.write_text(config.read_text().replace("batch_size = 4", "batch_size = 20"))
EOF
launch() { "$python" -m torch.distributed.run --standalone --nproc-per-node 2 -m tiedlm train "$@" \
             --set train.max_steps_per_epoch=3 > out.txt 2> err.txt; }
failed=0
for i in $(seq "$pairs"); do
    rm -rf run
    launch c.toml --out run --set train.max_epochs=1 || { failed=$((failed + 1)); cp err.txt "failed-$i-first.txt"; }
    launch --resume run --set train.max_epochs=2 || { failed=$((failed + 1)); cp err.txt "failed-$i-resume.txt"; }
done
echo "failed: $failed of $((2 * pairs)) launches (stderr of each in $work)"
