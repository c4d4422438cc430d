#!/usr/bin/env bash
# The FLUX GPU benchmark as one prepared run for a lent device machine (issue 18): at most 8 minutes in
# all, most telling cases first, each command under its own timeout so one slow case cannot eat the rest.
#
# Prepare here, once (the device has torch and transformers, not diffusers or torchao):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 torchao==0.18.0 sentencepiece
# Then run it with `.whl` carried, writing its JSON under $OUT:
#   bash bench/flux_device.sh
# Record the printed tables, the device and the versions in bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-/tmp/flux-bench}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
bench() {  # bench SECONDS NAME ARGS...: one bench/flux_gpu.py run, its JSON in $out/NAME.json
  local seconds=$1 name=$2; shift 2
  echo "== $name: $*"
  timeout "$seconds" python3 bench/flux_gpu.py --iterations 2 --json "$out/$name.json" "$@" \
    || echo "== $name: exit $? (timeout: 124)"
}
# Target 1: dfk8s's default (the fast path on CUDA) against DataFlow-MM's settings at 512², 20 steps.
bench 150 t2i-512 --height 512 --width 512 --steps 20 --cases dataflow,fast
# Targets 2-4: the fast path and the step cache against bf16 eager at 1024², 28 steps, and the warm start.
bench 210 t2i-1024 --height 1024 --width 1024 --steps 28 --cases eager,fast,warm-start,step-cache,fp8
# Kontext at its 1024² resolution.
bench 120 kontext-1024 --pipeline imageedit --height 1024 --width 1024 --steps 28 --cases eager,fast,step-cache
