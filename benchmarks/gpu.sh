#!/usr/bin/env bash
# Every GPU measurement in one command, each step under its own time limit, so that a slow step cannot
# starve the others and a stopped one keeps what it wrote.
#
#   bash benchmarks/gpu.sh [STEP[:LIMIT] ...]     default: every step, in this order
#
#   check          the kernel, CUDA graph, model and engine tests on CUDA (tests/test_{kernels,bcq_mma,cuda_graphs,
#                  models,elementwise,engine}.py)
#   kernels-llada  benchmarks/kernels.py on LLaDA-8B's linear shapes
#   kernels-dream  benchmarks/kernels.py on Dream-7B's linear shapes
#   kernels-mma    the mma kernel against the dequantize path on LLaDA-8B's shapes at M 1 to 256: up to 64 against
#                  the committed tables, above it the prefix cache's window sizes at batch 1 (where the
#                  dispatcher's mma_max_m should end)
#   mma-branches   each branch in MMA_BRANCHES (default: mma-chunks, the mma kernel with one mma per 32-column
#                  word and M tiles of 128, on main's split-K; then mma-prefetch, on the one-kernel split-K of
#                  baeb907) from a git worktree in build/worktrees/: its CUDA mma tests, then its mma kernel by
#                  kernels.py at the M of kernels-mma (MMA_MS) on LLaDA-8B's shapes, to compare with that step's
#                  table. A branch missing from this copy is fetched from build/branches.bundle (git bundle create)
#   convert        benchmarks/convert.py --device cuda: seconds per linear, per method
#   e2e            benchmarks/e2e.py --shape llada-8b: configs a-d at batch 1, 4 and 16
#   e2e-graphs     the same with --cuda-graphs
#   profile        e2e.py --cuda-graphs --profile for b, c and d at batch 1 and 16: per step, wall against device
#                  busy time, launches and host waits, and the top kernels
#   serve          benchmarks/serve.py on the shipped model's 2-bit artifact (converted first if missing)
#
# PYTHON: the interpreter that has qdllm installed (default python3; pytest and qdllm-serve must sit
# beside it). LIMIT, or else STEP_LIMIT, is a step's time limit in seconds (default 540). Results go to
# benchmarks/results/, named by device; each step's full log goes to build/gpu-logs/STEP.log.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=$(command -v "${PYTHON:-python3}") || { echo "gpu.sh: no ${PYTHON:-python3} on PATH"; exit 2; }
BIN=$(dirname "$PY")
LIMIT=${STEP_LIMIT:-540}
LOGS=build/gpu-logs
ARTIFACT=build/shakespeare-2bit
RESULTS=benchmarks/results
MMA_MS=1,16,32,64,96,128,192,256  # kernels-mma and mma-branches: up to 64 the small-M tables, above it the
# prefix cache's window sizes at batch 1
STEPS=(check kernels-llada kernels-dream kernels-mma mma-branches convert e2e e2e-graphs profile serve)

[[ $LIMIT =~ ^[1-9][0-9]*$ ]] || { echo "gpu.sh: STEP_LIMIT: expected whole seconds, got '$LIMIT'"; exit 2; }
for arg in "$@"; do
    s=${arg%%:*}
    [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "gpu.sh: unknown step '$s'; steps: ${STEPS[*]}"; exit 2; }
    [[ $arg != *:* || ${arg#*:} =~ ^[1-9][0-9]*$ ]] ||
        { echo "gpu.sh: '$arg': expected STEP:LIMIT, LIMIT in whole seconds"; exit 2; }
done
[[ $# -gt 0 ]] && STEPS=("$@")
SLUG=$("$PY" -c 'import re, sys, torch
if not torch.cuda.is_available(): sys.exit(1)
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))') ||
    { echo "gpu.sh: $PY sees no CUDA GPU; nothing was measured"; exit 2; }

run_step() {
    case $1 in
        check) "$BIN/pytest" -q tests/test_kernels.py tests/test_bcq_mma.py tests/test_cuda_graphs.py tests/test_models.py tests/test_elementwise.py tests/test_engine.py -k "not compile_for_gpus and not compiles_for_gpus" ;;
        kernels-llada) "$PY" benchmarks/kernels.py --models llada --out "$RESULTS/kernels-llada-$SLUG" ;;
        kernels-dream) "$PY" benchmarks/kernels.py --models dream --out "$RESULTS/kernels-dream-$SLUG" ;;
        kernels-mma) "$PY" benchmarks/kernels.py --models llada --ms "$MMA_MS" --paths mma,dense \
                         --out "$RESULTS/kernels-llada-mma-m256-$SLUG" ;;
        mma-branches)
            for br in ${MMA_BRANCHES:-mma-chunks mma-prefetch}; do
                wt=build/worktrees/$br
                git rev-parse -q --verify "$br" >/dev/null || git fetch -q build/branches.bundle "$br:$br" || return
                [[ -d $wt ]] || git worktree add -f "$wt" "$br" || return
                # qdllm imported from the worktree: a directory whose qdllm is the worktree comes first on the path
                mkdir -p "$wt.path" && ln -sfn "$PWD/$wt" "$wt.path/qdllm"
                local path="$PWD/$wt.path${PYTHONPATH:+:$PYTHONPATH}"
                PYTHONPATH=$path "$BIN/pytest" -q "$wt/tests/test_bcq_mma.py" -k "not compiles_for_gpus" || return
                PYTHONPATH=$path QDLLM_COMMIT=$(git rev-parse --short "$br") "$PY" "$wt/benchmarks/kernels.py" \
                    --models llada --ms "$MMA_MS" --paths mma --out "$RESULTS/kernels-llada-$br-$SLUG" || return
            done ;;
        convert) "$PY" benchmarks/convert.py --device cuda --out "$RESULTS/convert-$SLUG" ;;
        e2e) "$PY" benchmarks/e2e.py --shape llada-8b --out "$RESULTS/e2e-$SLUG" ;;
        e2e-graphs) "$PY" benchmarks/e2e.py --shape llada-8b --cuda-graphs --out "$RESULTS/e2e-$SLUG" ;;
        profile) "$PY" benchmarks/e2e.py --shape llada-8b --cuda-graphs --configs bcd --batch 1,16 --repeats 1 \
                     --profile --out "$RESULTS/e2e-profile-$SLUG" ;;
        serve)
            if [[ ! -f $ARTIFACT/qdllm.json ]]; then
                "$BIN/qdllm-convert" assets/llada-shakespeare "$ARTIFACT" --resume || return
            fi
            "$PY" benchmarks/serve.py "$ARTIFACT" --max-seconds 30 --out "$RESULTS/serve-$SLUG" ;;
    esac
}

export PY BIN RESULTS SLUG ARTIFACT
export -f run_step
mkdir -p "$LOGS"
"$PY" -c 'import torch, triton, transformers
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__)'
summary=()
failed=0
for arg in "${STEPS[@]}"; do
    s=${arg%%:*}
    limit=$LIMIT
    [[ $arg == *:* ]] && limit=${arg#*:}
    echo "== $s (limit $limit s)"
    start=$SECONDS
    # SIGINT reaches the step's whole process group (qdllm-serve too), so the scripts stop cleanly.
    timeout --signal=INT --kill-after=30 "$limit" bash -c "run_step $s" 2>&1 | tee "$LOGS/$s.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status="stopped at its $limit s limit" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [[ $rc == 0 ]] || failed=1
    summary+=("$s: $status after $((SECONDS - start)) s")
done
echo "== summary ($SLUG)"
printf '  %s\n' "${summary[@]}"
exit $failed
