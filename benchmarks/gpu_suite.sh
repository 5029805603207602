#!/usr/bin/env bash
# Every GPU check in one call: the test suite on CUDA, the kernel benchmarks, the training-step
# benchmark, the time-to-quality run, a one-process NCCL torchrun and the pytest-benchmark entries.
#
#   OUT=/somewhere DATA=path/to/tinyshakespeare.txt bash benchmarks/gpu_suite.sh [STAGE...]
#
# STAGE: all (default), tests, kernels (= layernorm + attention), layernorm, attention, train,
# quality, ddp, tune, generate, pytest-bench; run stages alone to fit a time limit per call
# (layernorm and attention each take minutes: every compiled competitor compiles per shape).
# Tables, their gathered report (report-cuda-DATE.md) and logs are written under $WORK and packed
# into $OUT/gpu_suite-STAGES.tgz (one file: the device tool returns few files), with summary.txt
# beside it. DATA defaults to the first tiny Shakespeare copy found in shared/data, ../shared/data
# or .data. A failing stage is reported and the next one still runs; the exit status says if any
# failed. Copy the tables you keep into benchmarks/results/.
#
# DEADLINE=SECONDS bounds the whole call (under a limit such as the device tool's 600 s, say
# DEADLINE=570): a stage still running MARGIN (default 20) seconds before the deadline gets
# SIGINT and writes the rows it measured, marked partial; a stage that would get less than
# MARGIN seconds is not started; the archive is packed either way. The tests stage runs in TEST_WORKERS
# (default 8) processes when pytest-xdist is installed, lists its slowest tests and writes
# tests-junit.xml.
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${DEADLINE:-}
MARGIN=${MARGIN:-20}
for name in DEADLINE MARGIN; do
    value=${!name}
    [[ -z "$value" || "$value" =~ ^[0-9]+$ ]] ||
        { echo "gpu_suite.sh: $name must be whole seconds, got '$value'" >&2; exit 2; }
done
OUT=${OUT:-bench-results}
WORK=${WORK:-$(mktemp -d)}
RESULTS="$WORK/results"
mkdir -p "$OUT" "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
stages=("${@:-all}")
tag=$(IFS=-; echo "${stages[*]}")
failed=()
stopped=()
not_run=()

if [ -z "${DATA:-}" ]; then
    for candidate in shared/data/tinyshakespeare.txt ../shared/data/tinyshakespeare.txt .data/tinyshakespeare.txt; do
        [ -f "$candidate" ] && DATA=$candidate && break
    done
fi

wants() {  # wants STAGE [ALIAS...]: was it, or a stage that includes it, asked for?
    local s name
    for s in "${stages[@]}"; do
        for name in all "$@"; do [ "$s" = "$name" ] && return 0; done
    done
    return 1
}

run() {  # run NAME COMMAND...: log to $WORK/NAME.log, remember failures, keep the deadline
    local name=$1; shift
    local limit=()
    if [ -n "$DEADLINE" ]; then
        local left=$((DEADLINE - SECONDS - MARGIN))
        if [ "$left" -lt "$MARGIN" ]; then
            echo "=== $name: not run, $((DEADLINE - SECONDS)) s left of DEADLINE=$DEADLINE" |
                tee -a "$WORK/summary.txt"
            not_run+=("$name")
            return
        fi
        # SIGINT to the stage's process group; SIGKILL if it has not ended 10 s later
        limit=(timeout --signal=INT --kill-after=10 "$left")
    fi
    echo "=== $name: $*" | tee "$WORK/$name.log"
    local t0=$SECONDS
    "${limit[@]}" "$@" 2>&1 | tee -a "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    local how="exit $rc"
    if [ ${#limit[@]} -gt 0 ] && [ "$rc" -eq 124 ]; then
        how="stopped at DEADLINE=$DEADLINE (SIGINT: what it measured is kept)"
        stopped+=("$name")
    elif [ ${#limit[@]} -gt 0 ] && [ "$rc" -eq 137 ]; then
        how="killed at DEADLINE=$DEADLINE (it ignored SIGINT for 10 s)"
        stopped+=("$name")
    elif [ "$rc" -ne 0 ]; then
        failed+=("$name")
    fi
    echo "=== $name: $how after $((SECONDS - t0)) s" | tee -a "$WORK/$name.log" "$WORK/summary.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    echo "data: ${DATA:-none found}"
} > "$WORK/summary.txt" 2>&1
cat "$WORK/summary.txt"
$PY -c "import tinygpt" 2>/dev/null || $PY -m pip install --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1
data_args=()
[ -n "${DATA:-}" ] && data_args=(--data "$DATA")

if wants tests; then
    test_args=(-q -p no:cacheprovider --durations=30 --junitxml="$WORK/tests-junit.xml")
    $PY -c "import xdist" 2>/dev/null && test_args+=(-n "${TEST_WORKERS:-8}")
    run tests $PY -m pytest tests "${test_args[@]}"
fi
wants layernorm kernels && run bench_layernorm $PY -m benchmarks.bench_layernorm --out "$RESULTS"
wants attention kernels && run bench_attention $PY -m benchmarks.bench_attention --out "$RESULTS"
wants train && run bench_train $PY -m benchmarks.bench_train --out "$RESULTS"
wants quality && run bench_quality $PY -m benchmarks.bench_quality --preset shakespeare-char \
    --target 1.47 --set eval_iters 50 "${data_args[@]}" --out "$RESULTS"
wants ddp && run ddp_nccl_1proc $PY -m torch.distributed.run --nproc_per_node=1 -m tinygpt train \
    --preset shakespeare-char --max-iters 500 --eval-interval 250 --eval-iters 20 \
    --out-dir "$WORK/ddp" "${data_args[@]}"
wants tune && run tune_attention $PY -m benchmarks.tune_attention --out "$RESULTS"
wants generate && run bench_generate $PY -m benchmarks.bench_generate --out "$RESULTS"
wants pytest-bench && run pytest_benchmarks $PY -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-enable --benchmark-json "$RESULTS/pytest-benchmark-cuda.json"

if compgen -G "$RESULTS/*.json" > /dev/null; then
    $PY -m benchmarks.report "$RESULTS" "gpu_suite.sh stages: ${stages[*]}" 2>&1 | tail -1
fi
rm -rf "$WORK/ddp"
tar -czf "$OUT/gpu_suite-$tag.tgz" -C "$WORK" .
cp "$WORK/summary.txt" "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ] || echo "FAILED stages: ${failed[*]}" | tee -a "$OUT/summary.txt"
[ ${#stopped[@]} -eq 0 ] || echo "STOPPED AT DEADLINE: ${stopped[*]}" | tee -a "$OUT/summary.txt"
[ ${#not_run[@]} -eq 0 ] || echo "NOT RUN (no time left): ${not_run[*]}" | tee -a "$OUT/summary.txt"
[ $((${#failed[@]} + ${#stopped[@]} + ${#not_run[@]})) -eq 0 ] || exit 1
echo "all stages passed" | tee -a "$OUT/summary.txt"
