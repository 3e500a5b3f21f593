#!/bin/bash
# lane.sh A|B: train the lines of /work/runs/queue.A (or .B) in order, one thread, nice 10, until
# the time in /work/runs/deadline. Each line holds the arguments of `tiedlm reproduce`, after an
# optional "FILE |": such a line is skipped until FILE exists (a stage 1 another lane still trains).
# A finished line is collected again in seconds and passed; a line that stops (the deadline, SIGTERM)
# or fails ends the lane. Log: /work/runs/lane.LANE.log. Edit a queue by writing a new file and mv-ing
# it over the old one, never in place; never edit this file while a lane runs it.
set -u
cd /work/runs
lane=$1
log=lane.$lane.log
while IFS= read -r line; do
  case "$line" in '' | '#'*) continue ;; esac
  if [[ "$line" == *'|'* ]]; then
    need=$(echo "${line%%|*}" | xargs)
    line=$(echo "${line#*|}" | xargs)
    if [ ! -e "$need" ]; then
      echo "$(date -u +%FT%TZ) skip (needs $need): $line" >>"$log"
      continue
    fi
  fi
  left=$((($(date -d "$(cat deadline)" +%s) - $(date +%s)) / 60))
  if [ "$left" -lt 6 ]; then
    echo "$(date -u +%FT%TZ) deadline: $left min left, lane $lane stops" >>"$log"
    exit 0
  fi
  echo "$(date -u +%FT%TZ) start ($left min): reproduce $line" >>"$log"
  # shellcheck disable=SC2086  # the line is a list of arguments
  OMP_NUM_THREADS=1 nice -n 10 venv/bin/tiedlm reproduce $line --jobs 1 --stop-after "$left" >>"$log" 2>&1
  rc=$?
  echo "$(date -u +%FT%TZ) exit $rc: reproduce $line" >>"$log"
  [ "$rc" -eq 0 ] || exit "$rc"
done <"queue.$lane"
