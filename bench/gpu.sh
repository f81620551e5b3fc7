#!/usr/bin/env bash
# The GPU check of issue 11, item 5: one GPU host (e.g. one NVIDIA H200, 16 cores), under 8 minutes.
#
#   bash bench/gpu.sh            # from the repository root of a copy of the working tree
#
# 1. Finds a Python that imports torch (with CUDA) and gastrolens: .venv if present; else
#    `make bootstrap` (needs the package index; skipped quietly when offline); else the
#    system python3 with src/ on PYTHONPATH.
# 2. `pytest -m gpu`: the GPU tests (CUDA paths against their CPU references).
# 3. bench/models.py: the engine's images/s per network (classifier 512 px, segmenter
#    513 px at output stride 16) and both together from 1080 x 1350 frames, batch
#    16 / 32 / 64, fp16 autocast, channels_last, with peak GPU memory above baseline;
#    plus the host-to-device copy, pageable against pinned.
# 4. bench/pipeline.py on the GPU: the daemon end to end with this host's cores, and the
#    CPU-ms per image outside the engine (the budget of item 1), 640 x 480 and HD frames
#    while time allows. Needs DCMTK (storescp / storescu in /usr/bin).
# Prints one summary table at the end; the full logs stay in $GL_GPU_LOGS (default: a
# temporary folder, printed). GL_GPU_DEVICE=cpu runs the same steps on the CPU with
# small sizes (a smoke test of this script, not figures).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GL_GPU_BUDGET_SECONDS:-450}   # stop starting new steps after this (8 min = 480 s)
LOGS=${GL_GPU_LOGS:-$(mktemp -d -t gastrolens-gpu-XXXXXX)}
DEVICE=${GL_GPU_DEVICE:-cuda}
mkdir -p "$LOGS"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
note() { echo "[gpu.sh $(elapsed)s] $*"; }

usable() {  # usable PYTHON [PYTHONPATH]
    PYTHONPATH="${2:-}" timeout 120 "$1" -c 'import torch, gastrolens.models' >/dev/null 2>&1
}

PY="" ; PYPATH=""
if [ -x .venv/bin/python ] && usable .venv/bin/python; then
    PY=.venv/bin/python
else
    note "no usable .venv: trying make bootstrap (needs the package index)"
    timeout 240 make bootstrap >"$LOGS/bootstrap.log" 2>&1 || note "make bootstrap failed or timed out (offline?), see $LOGS/bootstrap.log"
    if [ -x .venv/bin/python ] && usable .venv/bin/python; then
        PY=.venv/bin/python
    elif command -v python3 >/dev/null && usable python3 "$PWD/src"; then
        PY=python3 ; PYPATH="$PWD/src"
        note "using the system python3 with src/ on PYTHONPATH"
    fi
fi
if [ -z "$PY" ]; then
    echo "gpu.sh: no Python here imports torch and gastrolens (no .venv, make bootstrap failed, system python3 lacks torch)." >&2
    exit 1
fi
export PYTHONPATH="$PYPATH"
run_py() { "$PY" "$@"; }

if [ "$DEVICE" = cuda ]; then
    if ! run_py -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu.sh: torch sees no CUDA device (set GL_GPU_DEVICE=cpu for a smoke run)" >&2
        exit 1
    fi
    GPU=$(run_py -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")')
    MODELS_ARGS=(--device cuda --amp fp16 --batch-sizes 16,32,64 --repeats 5)
    PIPE_ARGS=(--device cuda --batch-size 32)
    PIPE_COUNTS=(400 200)
else
    GPU="none (smoke run on the CPU)"
    MODELS_ARGS=(--device cpu --amp fp16 --batch-sizes 2 --repeats 1 --classifier-size 64 --segmenter-size 65 --frame 240x320)
    PIPE_ARGS=(--device cpu --fast-engine)
    PIPE_COUNTS=(16 8)
fi
note "python $PY, device $DEVICE: $GPU; $(nproc) cores; logs in $LOGS"

# 2. the GPU tests
note "pytest -m gpu"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/models >"$LOGS/pytest-gpu.log" 2>&1
PYTEST_RC=$?
PYTEST_LINE=$(tail -n 1 "$LOGS/pytest-gpu.log")

# 3. the engine per network
note "bench/models.py ${MODELS_ARGS[*]}"
timeout 240 "$PY" bench/models.py "${MODELS_ARGS[@]}" --only classifier,segmenter-os16,both-os16,copy \
    >"$LOGS/models.log" 2>&1 || note "bench/models.py did not finish, see $LOGS/models.log"

# 4. the daemon end to end
PIPE_DONE=()
if [ -x /usr/bin/storescp ] && [ -x /usr/bin/storescu ]; then
    for case in "480x640:${PIPE_COUNTS[0]}" "1080x1350:${PIPE_COUNTS[1]}"; do
        size=${case%%:*}; count=${case##*:}
        if [ "$(left)" -lt 150 ]; then note "skipping the $size daemon run: $(left) s left"; continue; fi
        note "bench/pipeline.py ${PIPE_ARGS[*]} --size $size --count $count"
        timeout $(( $(left) + 20 )) "$PY" bench/pipeline.py "${PIPE_ARGS[@]}" --size "$size" --count "$count" \
            --cores "$(nproc)" >"$LOGS/pipeline-$size.log" 2>&1 || note "bench/pipeline.py $size failed, see $LOGS/pipeline-$size.log"
        PIPE_DONE+=("$size")
    done
else
    note "DCMTK storescp/storescu not in /usr/bin: the daemon end-to-end step is skipped"
fi

echo
echo "================ GastroLens GPU check: $GPU, $(nproc) cores, $(elapsed) s ================"
echo "pytest -m gpu: $PYTEST_LINE (exit $PYTEST_RC)"
echo
echo "engine (bench/models.py ${MODELS_ARGS[*]}): images/s; +MB = peak GPU memory above baseline"
sed -n '/^what /,$p' "$LOGS/models.log"
for size in "${PIPE_DONE[@]}"; do
    echo
    echo "daemon end to end, $size frames (bench/pipeline.py ${PIPE_ARGS[*]}):"
    grep -E "^(end to end|engine in-process|ratio|CPU outside)|^  (daemon:|CPU \(|implied)|^    (stage|receiver|other)" \
        "$LOGS/pipeline-$size.log" || tail -n 5 "$LOGS/pipeline-$size.log"
done
echo "logs: $LOGS"
