#!/usr/bin/env bash
# The GPU figures of the LibriSpeech-scale work in one go, sized for a short loan of a GPU
# (its steps' time limits add up to 11 minutes; not yet run on a GPU): the MoE layer under
# bf16 autocast, eager and with CUDA graphs, at the benchmark's size and at a LibriSpeech-
# sized one; the distillation step; the forced aligner's throughput; and the aligner's CUDA
# test. Each step adds a line to $RESULTS/gpu.jsonl (its name, exit status, seconds and the
# JSON line it printed) and its output to $RESULTS/gpu.log; a step that fails or runs past its
# time limit is reported there and the next one runs.
#
#   RESULTS=benchmarks/results bash benchmarks/gpu.sh [STEP ...]
#
# With STEP names (those below: moe_gpu_bf16, ..., aligner_cuda_test) only those run, e.g. to
# split the whole (up to 11 minutes) over two calls of a machine limited to 10 per command.
#
# Run from the repository root. On a machine that has PyTorch but not the package's other
# dependencies, and no network, set WHEELS to a folder of their wheels (speechbrain,
# hyperpyyaml, ruamel.yaml, ruamel.yaml.clib, soundfile, cffi, pycparser, kaldiio,
# espeakng-loader), made beforehand with `pip download --no-deps --only-binary=:all:` for
# that machine's Python; they are installed into a temporary folder, nothing else changes.
set -u
RESULTS=${RESULTS:-benchmarks/results}
ONLY=("$@")
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl \
        || { echo "could not install the wheels in $WHEELS"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$site"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name())" || exit 1

step() {  # step NAME SECONDS COMMAND...: the last line the command prints is its JSON
    local name=$1 limit=$2 start=$SECONDS out
    shift 2
    if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $name " ]]; then return; fi
    echo "=== $name: $*" >> "$RESULTS/gpu.log"
    out=$(timeout "$limit" "$@" 2>> "$RESULTS/gpu.log")
    local rc=$?
    printf '%s\n' "$out" >> "$RESULTS/gpu.log"
    python3 - "$name" "$rc" "$((SECONDS - start))" "$(printf '%s' "$out" | tail -n 1)" \
        >> "$RESULTS/gpu.jsonl" <<'PY'
import json, sys
name, rc, seconds, last = sys.argv[1:]
try:
    result = json.loads(last)
except ValueError:
    result = None
print(json.dumps({"step": name, "rc": int(rc), "seconds": int(seconds), "result": result}))
PY
    echo "$name: rc=$rc, $((SECONDS - start)) s"
}

moe="python3 benchmarks/moe.py --device cuda --amp bf16"
step moe_gpu_bf16 80 $moe
step moe_gpu_bf16_librispeech 80 $moe --size librispeech
# Compiled: the two ratios the targets name, without the peak-memory processes.
step moe_gpu_bf16_compiled 120 $moe --compile reduce-overhead \
    --only vs_transformers,vs_dense_active --no-peaks
step moe_gpu_bf16_librispeech_compiled 120 $moe --size librispeech --compile reduce-overhead \
    --only vs_transformers,vs_dense_active --no-peaks
step kd_step_gpu 60 python3 benchmarks/kd_step.py --device cuda
step alignment_gpu 240 python3 benchmarks/alignment.py --corpus "$(mktemp -d)/synth" --device cuda
step aligner_cuda_test 40 python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_forced.py -k cuda
