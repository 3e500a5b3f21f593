#!/usr/bin/env bash
# One prepared command for a lent GPU (issue 20): install, self-check, the training queue, $OUT.
#
# On the device machine, through the device tool (one call; the machine start is not in timeout_s):
#
#     run  command:   bash scripts/gpu_run.sh
#          timeout_s: 600
#
#   The script keeps to --budget-s (default 540 s, counted from its own start, the install included),
#   so it ends about 60 s inside the 600 s limit; a 15-minute lease (about 1.5 min of machine start,
#   9 min of this command) then leaves about 4 minutes. If it fails in its first minute (the output
#   tail shows why), fix it and call `run` again at once, while the machine is warm (30 s); else
#   give_back. Options: --budget-s S, --precision auto|fp32|bf16 (auto: bf16 on the H200),
#   --jobs N (runs at once; default from the self-check), --only TABLE/VARIANT,...
#
#   1. pip install --no-deps --no-build-isolation -e .  (the machine's own PyTorch; no network there),
#      falling back to PYTHONPATH=src.
#   2. Self-check (<= 60 s; python -m tiedlm.gpu_run selfcheck): the captured CUDA-graph step (with the
#      fused Triton LSTM cell, TIEDLM_CUDA_CELL=on) against the eager fp32 step on a tiny config (losses
#      and weights must agree), in fp32 and in the run precision; tok/s of WikiText-2 medium REAL eager,
#      captured, captured without the cell, evaluation tok/s, the projected epoch; then two captured
#      workers at once (does a second run raise the throughput?). Fallbacks, in order: captured without
#      the cell (TIEDLM_CUDA_CELL=off), then eager (train.cuda_graph=off); the summary says which ran.
#   3. The queue, in order, each with train.time_limit_minutes = the minutes left: WikiText-2 medium
#      RE, REAL; PTB medium REAL, RE, AL, VD; PTB large REAL, RE. Run folders: /tmp/gpu-run/runs/TABLE/VARIANT.
#   4. $OUT (<= 8 files of <= 16 MiB; rewritten after every run, so a killed command still returns them):
#        summary.json     the self-check, the speeds, the concurrency gain, every run's status
#        logs.tar.gz      this script's log, the self-check's, every trainer's
#        runs.tar.gz      runs/TABLE/VARIANT/{metrics.jsonl,run.json,config.json,final.json,best/vocab.txt,...}
#        results.tar.gz   results/TABLE.{md,json,png} collected there
#        ckpt-*.tar       checkpoints, only where they fit (a WikiText-2 medium model is 114 MB: it does not)
#
#   Collect here:  mkdir DIR && tar xzf /work/.device/.../runs.tar.gz -C DIR
#                  tiedlm reproduce wikitext-2-medium --collect-only --runs DIR/runs
#                  (and ptb-medium, ptb-large likewise)
#
# CPU dry run (seconds; tiny corpus and configs, no install; a test in the default suite runs it):
#
#     PYTHON=.venv/bin/python bash scripts/gpu_run.sh --dry-run --work /tmp/gpu-dry
set -u
export GPU_RUN_T0="${GPU_RUN_T0:-$(date +%s)}"
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done

if [ "$dry" = 1 ]; then
    # One thread per process: the tiny models gain nothing from more, and on a busy CPU threads that
    # wait for each other make them several times slower.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    echo "gpu_run: dry run: no install ($PY)"
else
    echo "gpu_run: $(date -u +%FT%TZ) on $(hostname); $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi: none')"
    if "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/tmp/gpu-run-pip.log 2>&1; then
        echo "gpu_run: installed ($(($(date +%s) - GPU_RUN_T0)) s)"
    else
        echo "gpu_run: pip install failed, using PYTHONPATH=src instead:"; tail -n 3 /tmp/gpu-run-pip.log
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
exec "$PY" -m tiedlm.gpu_run run "$@"
