#!/usr/bin/env bash
# Every GPU check in one call: the test suite on CUDA, the kernel benchmarks, the training-step
# benchmark and the time-to-quality run. Results go to $OUT (default benchmarks/results); each
# stage's log is kept there as well. Stages can be run alone, to fit a time limit per call:
#
#   OUT=/somewhere bash benchmarks/gpu_suite.sh [all|tests|kernels|train|quality|pytest-bench]
#
# A failing stage is reported and the next one still runs; the exit status says if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
RESULTS="$OUT/results"
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
stage=${1:-all}
failed=()

run() {  # run NAME COMMAND...: log to $OUT/NAME.log, remember failures
    local name=$1; shift
    echo "=== $name: $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
$PY -c "import tinygpt" 2>/dev/null || $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1

case $stage in all|tests)
    run tests $PY -m pytest tests -q -p no:cacheprovider ;;
esac
case $stage in all|kernels)
    run bench_layernorm $PY -m benchmarks.bench_layernorm --out "$RESULTS"
    run bench_attention $PY -m benchmarks.bench_attention --out "$RESULTS" ;;
esac
case $stage in all|train)
    run bench_train $PY -m benchmarks.bench_train --out "$RESULTS" ;;
esac
case $stage in all|quality)
    run bench_quality $PY -m benchmarks.bench_quality --preset shakespeare-char --target 1.47 \
        --out "$RESULTS" ;;
esac
case $stage in all|pytest-bench)
    run pytest_benchmarks $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable \
        --benchmark-json "$RESULTS/pytest-benchmark-cuda.json" ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED stages: ${failed[*]}"
    exit 1
fi
echo "all stages passed"
