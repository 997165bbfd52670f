#!/usr/bin/env bash
# The first command on a lent GPU machine (GPU.md): the GPU benchmarks and the GPU-only test, in
# one go, each under its own time limit, results under $OUT. Needs .device/kit from
# benchmarks/device_kit.sh carried along:
#   run(command="bash benchmarks/device_first.sh", carry=[".device/kit"], timeout_s=540)
# Prints a short table last. `DEVICE=cpu SHAPE=tiny bash benchmarks/device_first.sh` runs the
# same plumbing on a CPU in a minute (a smoke test of this script, not a measurement; PYTHON
# names an interpreter with torch, e.g. PYTHON=.venv/bin/python).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
kit=$root/.device/kit
out=${OUT:-$root/.device/out}
device=${DEVICE:-cuda}
shape=${SHAPE:-llama3-8b}
python=${PYTHON:-python3}
[[ -d $kit/wheels ]] || { echo "no $kit: run benchmarks/device_kit.sh here and carry .device/kit" >&2; exit 2; }
mkdir -p "$out"
site=$(mktemp -d)
"$python" -m pip install -q --no-index --no-deps --target "$site" "$kit"/wheels/*.whl 2>&1 | tail -2
# the kit's wheels last: where the machine has a package (packaging, pygments), its own copy wins
export PYTHONPATH="$root/src:$root/benchmarks:$site" ALPHAEDIT_HOME=$(mktemp -d)
# the machine has no ../shared/data: the tests read the kit's copy (conftest.SHARED_DATA), the
# benchmarks are given its paths
data=${ALPHAEDIT_SHARED_DATA:-$root/../shared/data}
[[ -e $data/wikitext2_raw/wiki.valid.raw ]] || data=$kit/data
export ALPHAEDIT_SHARED_DATA=$data
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu.txt"

status=()
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.out" 2> "$out/$name.err"
  local rc=$?
  status+=("$(printf '%-14s rc %-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
}
tokens=$([[ $device == cpu ]] && echo 2000 || echo 50000)  # 50,000 on the H200: 34 s for both paths (2026-12-04)
# limits: 90 + 300 + 70 s (measured 2026-12-04 on the H200: 20, 261 and 34 s), within the run's 540 s
# with room for the installs and the table; a
# second try on what device time is left can change them (SKIP_TESTS=1 EDIT_LIMIT=s STATS_LIMIT=s
# STATS_TOKENS=n SEQUENTIAL=n). Both benchmarks report each finished part on stderr, so a part
# stopped at its limit still shows in the table below.
[[ ${SKIP_TESTS:-0} == 1 ]] || step test_devices 90 "$python" -m pytest -q -p no:cacheprovider tests/test_devices.py -rs
step edit_speed "${EDIT_LIMIT:-300}" "$python" benchmarks/edit_speed.py --device "$device" --shape "$shape" --sequential-edits "${SEQUENTIAL:-3}" \
    --tokenizer "$kit/tokenizer" --requests "$data/counterfact/counterfact_test.json" \
    --corpus "$data/wikitext2_raw/wiki.valid.raw" --json $([[ $device == cpu ]] && echo --edits 4 --steps 3)
step stats_speed "${STATS_LIMIT:-70}" "$python" benchmarks/stats_speed.py --device "$device" --shape "$shape" --tokens "${STATS_TOKENS:-$tokens}" --json

echo
printf '%s\n' "${status[@]}"
"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    e = json.loads((out / "edit_speed.out").read_text())
    print(f"edit_speed: {e['model']}, {e['machine']}")
    for p in e["paths"]:
        print(f"  {p['path']:<36} {p['edits']:>4} edits {p['s_per_edit']:8.3f} s/edit  peak {p.get('peak_gib', 0):5.1f} GiB")
except Exception as error:
    print("edit_speed: no JSON", error)
    err = out / "edit_speed.err"
    for line in err.read_text().splitlines() if err.exists() else []:
        if line.startswith("path done"):
            head, _, body = line.partition(": ")
            try:
                p = json.loads(body)
            except ValueError:
                continue  # cut off mid-line by the time limit
            print(f"  {p['path']:<36} {p['edits']:>4} edits {p['s_per_edit']:8.3f} s/edit  peak {p.get('peak_gib', 0):5.1f} GiB  ({head})")
try:
    s = json.loads((out / "stats_speed.out").read_text())
    print(f"stats_speed: {s['model']}: one pass {s['one_pass_tokens_per_s']:.0f} tok/s ({s['one_pass_dtype']}), "
          f"per layer fp32 {s['per_layer_fp32_tokens_per_s']:.0f} tok/s, 44M tokens {s['hours_for_44M_tokens_one_pass']:.2f} h")
except Exception as error:
    print("stats_speed: no JSON", error)
    err = out / "stats_speed.err"
    for line in err.read_text().splitlines() if err.exists() else []:
        if line.startswith("one pass:"):
            print("  " + line)
lines = (out / "test_devices.out").read_text().strip().splitlines() if (out / "test_devices.out").exists() else []
print("test_devices:", lines[-1] if lines else "no output")
PY
