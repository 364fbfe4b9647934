#!/usr/bin/env bash
# The GPU checks in one call on a lent device machine (its own Python with CUDA torch; no package index), with the
# `.gpu/` folder `python -m tests.gpu.carry` wrote here carried along:
#   run(command="bash tests/gpu/on_device.sh", carry=[".gpu"], timeout_s=600)
# Writes to $OUT (or ./gpu-out): summary.txt (each step's exit status and seconds), the GPU suite's log, and the
# JSON of bench/pipeline.py --device cuda (issue #29's 3x) and bench/generate.py --device cuda. Each step has its own
# time limit, so one that hangs leaves the others their time (the total stays under the call's 10 minutes).
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}
mkdir -p "$out"
py=$(command -v python3)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .gpu/whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl > "$out/pip.log" 2>&1 || { echo "pip install failed: pip.log" >> "$out/summary.txt"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD/.gpu/standin:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >> "$out/summary.txt" 2>&1

step() {  # step NAME LIMIT_S COMMAND...: run it, log its output to $out/NAME.log, record status and seconds
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" >> "$out/summary.txt"
}
step test_gpu 280 "$py" -m pytest -q -s -rs -p no:cacheprovider -m gpu tests/gpu
step pipeline 180 "$py" bench/pipeline.py --device cuda --repeats 5 --out "$out/pipeline_cuda.json"
step generate 90 "$py" bench/generate.py --device cuda --repeats 5 --out "$out/generate_cuda.json"
cat "$out/summary.txt"
tail -3 "$out/test_gpu.log"
