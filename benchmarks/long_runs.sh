#!/usr/bin/env bash
# The long sequential-editing runs of BENCHMARKS.md (issues 10 and 14), one after another, each
# resumable: a run with a summary.md is done and skipped, one with a run.json is continued with
# `alphaedit eval --resume`, any other is started. Run it again after a kill, a reboot or a new
# session and it carries on where it stopped.
#
#   bash benchmarks/long_runs.sh [NAME ...]        # default: every run below, in order
#   RUNS=~/alphaedit-runs (default) holds the run folders, the frozen code and the logs.
#   DRY=1 bash benchmarks/long_runs.sh             # say what each run would do, run nothing
#   CODE_COMMIT=HEAD bash benchmarks/long_runs.sh  # runs started from now on use this commit
#   (nohup setsid bash benchmarks/long_runs.sh > ~/alphaedit-runs/queue.log 2>&1 &)
#                                                  # in the background, past the session's end
#
# The code is frozen per run: a run starts with the commit in $RUNS/code.commit (written from
# this repository's HEAD, or $CODE_COMMIT, at the first start; $CODE_COMMIT given later changes
# it for runs not yet started), checked out as a worktree under $RUNS/code-<commit>, and keeps
# that commit in its own folder (NAME/code.commit) for every resume, so editing src/ meanwhile,
# or moving the queue to newer code, changes no run midway. Use this project's .venv (make install).
# Pause for a test suite with `kill -STOP -- -<pid>` / `kill -CONT -- -<pid>` (the pid is in
# $RUNS/queue.pid and, started with setsid as above, is also its process group's, so the signal
# reaches the running evaluation too; timings of a paused run stay right, its ETA does not).
# Edit this file only while no queue runs (bash reads a script as it goes), or replace it whole
# (write a new file and mv it over this one: a running queue keeps reading the old one).
set -uo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
RUNS=${RUNS:-$HOME/alphaedit-runs}
mkdir -p "$RUNS"
commit_file=$RUNS/code.commit
dry=${DRY:-0}
queue_pin=$(cat "$commit_file" 2>/dev/null)
if [[ -n $queue_pin && $dry != 1 ]]; then
  # runs begun before runs kept their own commit were all made with the queue's
  for folder in "$RUNS"/*/; do
    [[ -f $folder/run.json && ! -f $folder/code.commit && ! -f $folder/summary.md ]] && echo "$queue_pin" > "$folder/code.commit"
  done
fi
if [[ -n ${CODE_COMMIT:-} ]]; then
  queue_pin=$(git -C "$root" rev-parse "$CODE_COMMIT") || exit 2
elif [[ -z $queue_pin ]]; then
  queue_pin=$(git -C "$root" rev-parse HEAD)
fi
[[ $dry == 1 ]] || { echo "$queue_pin" > "$commit_file"; echo $$ > "$RUNS/queue.pid"; }

data=$root/../shared/data
source "$root/benchmarks/runs_table.sh"  # protocol, args, order
(( $# )) && order=("$@")

for name in "${order[@]}"; do
  [[ -n ${args[$name]:-} ]] || { echo "no run named $name (known: ${!args[*]})" >&2; exit 2; }
  out=$RUNS/$name
  if [[ -f $out/summary.md ]]; then echo "$name: done"; continue; fi
  commit=$(cat "$out/code.commit" 2>/dev/null || echo "$queue_pin")
  code=$RUNS/code-${commit:0:7}
  echo "$name: $( [[ -f $out/run.json ]] && echo resuming || echo starting ) $(date -u +%FT%TZ), code ${commit:0:7}"
  if [[ $dry == 1 ]]; then
    [[ -f $out/run.json ]] && echo "  alphaedit eval --resume $out" || echo "  alphaedit eval ${protocol[*]} ${args[$name]} --out $out"
    continue
  fi
  [[ -d $code/src ]] || git -C "$root" worktree add -f --detach "$code" "$commit" > /dev/null || exit 1
  mkdir -p "$out" && echo "$commit" > "$out/code.commit"
  alphaedit() { PYTHONPATH=$code/src "$root/.venv/bin/python" -m alphaedit "$@"; }
  if [[ -f $out/run.json ]]; then
    alphaedit eval --resume "$out" >> "$RUNS/$name.log" 2>&1
  else
    # shellcheck disable=SC2086  # the arguments above are space-separated words
    alphaedit eval "${protocol[@]}" ${args[$name]} --out "$out" >> "$RUNS/$name.log" 2>&1
  fi
  rc=$?
  (( rc == 0 )) || { echo "$name: stopped with exit status $rc (see $RUNS/$name.log); run the queue again to resume" >&2; exit "$rc"; }
done
