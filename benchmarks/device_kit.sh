#!/usr/bin/env bash
# Prepares what benchmarks/device_first.sh needs on the lent GPU machine, which has torch and
# transformers but no network, no pytest, no accelerate and no ../shared/data (GPU.md): the
# SmolLM2 tokenizer (the random 8B-shaped models' tokenizer), the two data files the benchmarks
# and tests/test_devices.py read, and the wheels of pytest and accelerate. Writes .device/kit/
# (git-ignored; ~8 MiB, under the 64 MiB a command may carry). Run here, from the project root,
# after `make install` (it copies the tokenizer from the converted SmolLM2 folder).
#
#   bash benchmarks/device_kit.sh
#   then, on the device: run(command="bash benchmarks/device_first.sh", carry=[".device/kit"], timeout_s=540)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
kit=.device/kit
rm -rf "$kit" && mkdir -p "$kit/tokenizer" "$kit/data/wikitext2_raw" "$kit/data/counterfact" "$kit/wheels"
py=.venv/bin/python
folder=$($py -c "from alphaedit.models import smollm2_folder; print(smollm2_folder())")
cp "$folder"/tokenizer* "$folder"/special_tokens_map.json "$kit/tokenizer/" 2>/dev/null || cp "$folder"/tokenizer* "$kit/tokenizer/"
cp ../shared/data/wikitext2_raw/wiki.valid.raw ../shared/data/wikitext2_raw/wiki.test.raw "$kit/data/wikitext2_raw/"
# the first 200 CounterFact records are all the benchmarks read (edit_speed: --edits 100)
$py -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:200], open(sys.argv[2], 'w'))" \
    ../shared/data/counterfact/counterfact_test.json "$kit/data/counterfact/counterfact_test.json"
# pure-Python wheels for any Python 3 (tomli and exceptiongroup only matter below 3.11), and
# psutil's abi3 one (any CPython 3): installed there with --no-index --no-deps
$py -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.10 -d "$kit/wheels" \
    pytest pluggy iniconfig pygments packaging exceptiongroup tomli accelerate
$py -m pip download -q --no-deps --only-binary=:all: -d "$kit/wheels" psutil
du -sh "$kit"
