#!/usr/bin/env bash
# GPU speed measurements of dlrt_jax (benchmarks/speed.py with GPU sizes), under 15 minutes.
#
# For a machine with jax[cuda] installed and no network, run from anywhere in the working tree:
#     bash benchmarks/gpu.sh            # writes speed_gpu_*.{csv,json,png} to $OUT or
#                                       # benchmarks/results/, prints a short table last
#     bash benchmarks/gpu.sh --smoke    # tiny shapes, a minute on a CPU: checks that it runs
#     bash benchmarks/gpu.sh --compile  # only sections 6 and 7 (compile cost, whole runs), ~6 min
#
# Sections (each under its own time limit, so one slow section cannot eat the others):
#   1. the 500-wide MLP (784-500x4-10, batch 256), every method at ranks 32, 64, 128;
#   2. the 5120-wide MLP at batch 4096, ranks 32, 128, 512 (adaptive capacity <= 392 in the
#      784-input layer);
#   3. LeNet5 (batch 128) at ranks 16 and 64 (capped per layer);
#   4. the main job's step (end_to_end.py --speed-ranks): the default DLRT (parallel BUG, Adam
#      inside, CapacityPolicy capacities) and the issue's bug + Adam against dense Adam at the
#      ranks DLRT-Net reached ([66, 67, 69, 70]), random MNIST-shaped batches;
#   5. transformer.py --size gpu (issue 11): GPT dense vs DLRT from scratch, fine-tuning with LoRA
#      and DLRT adapters (writes transformer_gpu.*; a table at the end of its own output).
#   6. program_size.py (issue 16): the main job's step and every integrator against the dense
#      Adam step: optimised HLO size, conditionals, custom calls, host callbacks, lower+compile
#      time on the GPU, and the counts of the StableHLO exported for cuda and tpu
#      (program_size_gpu.json);
#   7. (--compile only) whole_run.py: python -m dlrt_jax.train_mnist against --integrator dense,
#      3 epochs, separate processes back to back, cold then warm compilation cache.
# Environment: PYTHON (default python), OUT (output folder), STEPS (timed steps, default 20).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OPENBLAS_NUM_THREADS=1
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-benchmarks/results}"
STEPS="${STEPS:-20}"
mkdir -p "$OUT_DIR"

"$PY" -c 'import jax; print("jax", jax.__version__, "devices", jax.devices())'

status=0
run() {  # run <seconds> <tag> <speed.py arguments...>
    local limit="$1" tag="$2"
    shift 2
    echo "== $tag (limit ${limit}s): speed.py $*"
    if ! timeout --signal=INT "$limit" "$PY" benchmarks/speed.py --out "$OUT_DIR" --tag "$tag" \
        --steps "$STEPS" "$@"; then
        echo "!! section $tag failed or ran out of time" >&2
        status=1
    fi
}

e2e() {  # e2e <seconds> <tag> <rounds>: the main job's step at DLRT-Net's ranks
    local limit="$1" tag="$2" rounds="$3"
    echo "== $tag (limit ${limit}s): end_to_end.py --speed-ranks 66 67 69 70"
    if ! timeout --signal=INT "$limit" "$PY" benchmarks/end_to_end.py --out "$OUT_DIR" \
        --tag "$tag" --speed-ranks 66 67 69 70 --rounds "$rounds" \
        --variants dense:adam@glorot par:adam@lr3e-3@s0.1 bug:adam; then
        echo "!! section $tag failed or ran out of time" >&2
        status=1
    fi
}

program_size() {  # program_size <seconds> <program_size.py arguments...>
    local limit="$1"
    shift
    echo "== program_size (limit ${limit}s): program_size.py $*"
    if ! timeout --signal=INT "$limit" "$PY" benchmarks/program_size.py --platforms cuda tpu "$@"; then
        echo "!! section program_size failed or ran out of time" >&2
        status=1
    fi
}

if [[ "${1:-}" == "--compile" ]]; then
    program_size 150 --integrators --json "$OUT_DIR/program_size_gpu.json"
    echo "== whole_run (limit 240s): whole_run.py --epochs 3"
    timeout --signal=INT 240 "$PY" benchmarks/whole_run.py --epochs 3 --tag gpu_3ep \
        --out "$OUT_DIR" || status=1
    exit "$status"
fi

if [[ "${1:-}" == "--smoke" ]]; then
    STEPS=3
    run 300 gpu_smoke --smoke --no-plot
    e2e 200 gpu_e2e_smoke 2
    program_size 120 --smoke --integrators
    tags=(gpu_smoke)
else
    run 160 gpu_mlp500 --gpu --nets mlp500 --ranks 32 64 128
    run 200 gpu_mlp5120 --gpu --nets mlp5120 --ranks 32 128 512 --batch 4096
    run 90 gpu_lenet5 --gpu --nets lenet5 --ranks 16 64
    e2e 90 gpu_e2e_ranks 30
    timeout --signal=INT 240 "$PY" benchmarks/transformer.py --size gpu --out "$OUT_DIR" || status=1
    program_size 90 --json "$OUT_DIR/program_size_gpu.json"
    tags=(gpu_mlp500 gpu_mlp5120 gpu_lenet5)
fi

files=()
for t in "${tags[@]}"; do
    [[ -f "$OUT_DIR/speed_$t.json" ]] && files+=("$OUT_DIR/speed_$t.json")
done
echo
echo "== summary (training steps; xDense = dense SGD time / this time, /USV = this / U S V^T SGD)"
if ((${#files[@]})); then
    "$PY" benchmarks/speed.py --summarize "${files[@]}"
else
    echo "no results written" >&2
    status=1
fi
exit "$status"
