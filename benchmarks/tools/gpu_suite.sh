#!/usr/bin/env bash
# Every GPU check in one call: `tinygpt doctor`, the test suite on CUDA, the kernel benchmarks, the
# training-step benchmark, the time-to-quality run, a one-process NCCL torchrun and the
# pytest-benchmark entries.
#
#   OUT=/somewhere DATA=path/to/tinyshakespeare.txt bash benchmarks/tools/gpu_suite.sh [STAGE[:SECONDS]...]
#
# STAGE: all (default), doctor, tests, kernels (= layernorm + attention), layernorm, attention,
# train, quality, ddp, tune, generate, pytest-bench; stages run in that order whatever order they are
# named in. :SECONDS caps one stage: when it is up the stage gets SIGINT, as at DEADLINE below.
# ATTENTION_CASES and LAYERNORM_CASES pass --cases to bench_attention and bench_layernorm
# (default: every case). first-light is the plan for a first 600 s call: doctor:90 tests:130
# layernorm:80 attention:150 train:100 quality, the kernel benchmarks on the cases their goals name
# (LAYERNORM_CASES="model bandwidth", ATTENTION_CASES="model goals" unless set), the quality run
# in what time is left.
# Tables, their gathered report (report-cuda-DATE.md) and logs are written under $WORK and packed
# into $OUT/gpu_suite-STAGES.tgz (one file: the device tool returns few files), with summary.txt
# beside it. DATA defaults to the first tiny Shakespeare copy found in shared/data, ../shared/data
# or .data. A failing stage is reported and the next one still runs; the exit status says if any
# failed. Copy the tables you keep into benchmarks/results/.
#
# DEADLINE=SECONDS bounds the whole call (under a limit such as the device tool's 600 s, say
# DEADLINE=570): a stage still running MARGIN (default 20) seconds before the deadline gets
# SIGINT and writes the rows it measured, marked partial; a stage that would get less than
# MARGIN seconds is not started; the archive is packed either way. The tests stage runs the test
# files kernels first (so that a cap cuts the checks the CPU has already made) in TEST_WORKERS
# (default 8) processes when pytest-xdist is installed, lists its slowest tests and writes
# tests-junit.xml, partial if the stage was stopped.
set -uo pipefail
cd "$(dirname "$0")/../.."
DEADLINE=${DEADLINE:-}
MARGIN=${MARGIN:-20}
for name in DEADLINE MARGIN; do
    value=${!name}
    [[ -z "$value" || "$value" =~ ^[0-9]+$ ]] ||
        { echo "gpu_suite.sh: $name must be whole seconds, got '$value'" >&2; exit 2; }
done
STAGES=(doctor tests layernorm attention train quality ddp tune generate pytest-bench)
args=("${@:-all}")
declare -A cap=()  # stage -> its cap in seconds
stages=()
for arg in "${args[@]}"; do
    items=("$arg")
    if [ "$arg" = first-light ]; then
        items=(doctor:90 tests:130 layernorm:80 attention:150 train:100 quality)
        LAYERNORM_CASES=${LAYERNORM_CASES:-model bandwidth}
        ATTENTION_CASES=${ATTENTION_CASES:-model goals}
    fi
    for item in "${items[@]}"; do
        name=${item%%:*}
        [[ " all kernels ${STAGES[*]} " == *" $name "* ]] ||
            { echo "gpu_suite.sh: unknown stage '$name'; stages: all kernels ${STAGES[*]}" \
                "first-light" >&2; exit 2; }
        if [[ "$item" == *:* ]]; then
            seconds=${item#*:}
            [[ " ${STAGES[*]} " == *" $name "* && "$seconds" =~ ^[1-9][0-9]*$ ]] ||
                { echo "gpu_suite.sh: '$item': a cap is one stage's whole seconds," \
                    "as in tests:240" >&2; exit 2; }
            cap[$name]=$seconds
        fi
        stages+=("$name")
    done
done
OUT=${OUT:-bench-results}
WORK=${WORK:-$(mktemp -d)}
RESULTS="$WORK/results"
mkdir -p "$OUT" "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
tag=$(IFS=-; echo "${args[*]%%:*}")  # the archive's name: the stages asked for, without caps
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

run() {  # run STAGE NAME COMMAND...: log to $WORK/NAME.log, remember failures, keep the
         # deadline and STAGE's cap
    local stage=$1 name=$2; shift 2
    local left="" why=""
    if [ -n "$DEADLINE" ]; then
        left=$((DEADLINE - SECONDS - MARGIN))
        why="DEADLINE=$DEADLINE"
        if [ "$left" -lt "$MARGIN" ]; then
            echo "=== $name: not run, $((DEADLINE - SECONDS)) s left of DEADLINE=$DEADLINE" |
                tee -a "$WORK/summary.txt"
            not_run+=("$name")
            return
        fi
    fi
    if [ -n "${cap[$stage]:-}" ] && { [ -z "$left" ] || [ "${cap[$stage]}" -lt "$left" ]; }; then
        left=${cap[$stage]}
        why="its cap of $left s"
    fi
    local limit=()
    # SIGINT to the stage's process group; SIGKILL if it has not ended 10 s later
    [ -n "$left" ] && limit=(timeout --signal=INT --kill-after=10 "$left")
    echo "=== $name: $*" | tee "$WORK/$name.log"
    local t0=$SECONDS
    "${limit[@]}" "$@" 2>&1 | tee -a "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    local how="exit $rc"
    if [ -n "$left" ] && [ "$rc" -eq 124 ]; then
        how="stopped at $why (SIGINT: what it measured is kept)"
        stopped+=("$name")
    elif [ -n "$left" ] && [ "$rc" -eq 137 ]; then
        how="killed at $why (it ignored SIGINT for 10 s)"
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

# The kernels checked at the model's shape and two odd ones, and a training step timed per
# backend; its JSON report is packed with the logs.
wants doctor && run doctor doctor $PY -m tinygpt doctor --json "$WORK/doctor-cuda.json"
if wants tests; then
    # The kernels' tests first: under xdist the files run in the order given.
    test_files=()
    for file in tests/kernels/test_{attention,layernorm}.py \
            tests/model/test_{ops,backends,model,generate}.py \
            tests/training/test_{train,training_rules,distributed}.py tests/test_*.py tests/*/test_*.py; do
        [[ -f "$file" && " ${test_files[*]} " != *" $file "* ]] && test_files+=("$file")
    done
    test_args=(-q -p no:cacheprovider --durations=30 --junitxml="$WORK/tests-junit.xml")
    $PY -c "import xdist" 2>/dev/null && test_args+=(-n "${TEST_WORKERS:-8}")
    # Inductor's compile workers: 2 per test process, not one per core in each of them
    run tests tests env TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-2}" \
        $PY -m pytest "${test_files[@]}" "${test_args[@]}"
fi
read -ra layernorm_cases <<< "${LAYERNORM_CASES:-}"
read -ra attention_cases <<< "${ATTENTION_CASES:-}"
wants layernorm kernels && run layernorm bench_layernorm $PY -m benchmarks.bench_layernorm \
    ${layernorm_cases[@]+--cases "${layernorm_cases[@]}"} --out "$RESULTS"
wants attention kernels && run attention bench_attention $PY -m benchmarks.bench_attention \
    ${attention_cases[@]+--cases "${attention_cases[@]}"} --out "$RESULTS"
wants train && run train bench_train $PY -m benchmarks.bench_train --out "$RESULTS"
wants quality && run quality bench_quality $PY -m benchmarks.bench_quality \
    --preset shakespeare-char --target 1.47 --set eval_iters 50 "${data_args[@]}" --out "$RESULTS"
wants ddp && run ddp ddp_nccl_1proc $PY -m tinygpt torchrun --nproc_per_node=1 \
    train --preset shakespeare-char --max-iters 500 --eval-interval 250 --eval-iters 20 \
    --out-dir "$WORK/ddp" "${data_args[@]}"
wants tune && run tune tune_attention $PY -m benchmarks.tools.tune_attention --out "$RESULTS"
wants generate && run generate bench_generate $PY -m benchmarks.bench_generate --out "$RESULTS"
wants pytest-bench && run pytest-bench pytest_benchmarks $PY -m pytest benchmarks -q \
    -p no:cacheprovider --benchmark-enable --benchmark-json "$WORK/pytest-benchmark-cuda.json"

if compgen -G "$RESULTS/*.json" > /dev/null; then
    $PY -m benchmarks.report "$RESULTS" "gpu_suite.sh stages: ${stages[*]}" 2>&1 | tail -1
fi
rm -rf "$WORK/ddp"
tar -czf "$OUT/gpu_suite-$tag.tgz" -C "$WORK" .
cp "$WORK/summary.txt" "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ] || echo "FAILED stages: ${failed[*]}" | tee -a "$OUT/summary.txt"
[ ${#stopped[@]} -eq 0 ] ||
    echo "STOPPED (deadline or cap): ${stopped[*]}" | tee -a "$OUT/summary.txt"
[ ${#not_run[@]} -eq 0 ] || echo "NOT RUN (no time left): ${not_run[*]}" | tee -a "$OUT/summary.txt"
[ $((${#failed[@]} + ${#stopped[@]} + ${#not_run[@]})) -eq 0 ] || exit 1
echo "all stages passed" | tee -a "$OUT/summary.txt"
