#!/usr/bin/env bash
# One run on a lent GPU machine, about 10 minutes: the CUDA tests, then the GPU decode bench on the
# 315M and 3B shapes. Prepare here (`python tools/device_bundle.py`: the packages that machine
# lacks, in .device/), then call the device tool from the repository root with
#     carry: [".device"], timeout_s: 600, command: "bash bench/device.sh"
# Results land in $OUT (they come back) and in bench/results/ there: commit the copy from $OUT.
# Each stage has its own time limit, so a slow stage costs its own results, not the others'.
# What comes back ($OUT, at most 8 files): device.log (every stage's output) and each model's
# results (.md/.json/.png). The stage limits are estimates: no GPU was lent when this was written.
set -uo pipefail
OUT=${OUT:-bench/work/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SC2QUANT_LOG_DIR=/tmp/sc2quant-logs SC2QUANT_CACHE=/tmp/sc2quant-cache
PY=python3
started=$(date +%s)
LOG="$OUT/device.log"
stage() { echo "== $1 ($(($(date +%s) - started)) s)" | tee -a "$LOG"; }

stage "install the carried packages"
site=/tmp/site
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .device/*.whl || exit 1
BUILD_CUDA_EXT=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target "$site" .device/*.tar.gz || exit 1
export PYTHONPATH="$site:$PWD"
nvidia-smi -L | tee -a "$LOG"
$PY -c "import torch, transformers, bitsandbytes, gptqmodel, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'gptqmodel', gptqmodel.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1 | tee -a "$LOG"

stage "tests/test_cuda.py"
timeout 200 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs --durations=10 2>&1 | tail -40 | tee -a "$LOG"

bench() {  # model, seconds, contenders (name substrings)
    stage "GPU decode bench: $1"
    timeout "$2" $PY -m bench.run --device cuda --models "$1" --rounds 1 --no-llama --threads 8 --only "$3" \
        --work /tmp/bench-work --out "$OUT/$1" 2>&1 | tail -30 | tee -a "$LOG"
}
bench 300m 150 "bf16,bnb,GPTQ"
bench 3b 220 "bf16,GPTQ"  # bitsandbytes at 3B: left out to fit the lease
stage "done"
