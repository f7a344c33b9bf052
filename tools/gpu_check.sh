#!/usr/bin/env bash
# What a lent GPU machine runs first, prepared here so that its minutes go to running checks, not writing them.
# For the machine as it is: Python 3.12 with CUDA torch, Triton and transformers, no network, no megatron-core,
# fla or Transformer Engine; the wheels carried in .whl/ (tools/gpu_setup.sh download) fill in.
#
#   tools/gpu_check.sh tests              # nvidia-smi, install, every CUDA-only test (pytest -m cuda)
#   tools/gpu_check.sh bench              # nvidia-smi, install, the CUDA benchmarks; figures in $OUT/bench.json
#   tools/gpu_check.sh --dry-run tests    # anywhere: print the plan and check .whl/ (imports no torch)
#
# Each step runs under its own `timeout`; the timeouts (each plus 5 s to kill) add up to at most 470 s, so an
# invocation ends within 8 minutes. A failed required step skips the steps after it. Everything lands in $OUT
# (default ./gpu_check_out), at most 8 files: a log per step, junit.xml (tests), tests.json or bench.json (each
# step's result and seconds; bench's figures under the step's name) and summary.txt, also printed at the end.
# PYTHON (default python3), SITE (default /tmp/site: the install's --target, put on PYTHONPATH) and WHEEL_DIR
# (default .whl) are passed to tools/gpu_setup.sh. Exit status 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit

BUDGET=470  # seconds of step timeouts and kill graces; the rest of 8 minutes is for this script itself
GRACE=5     # seconds from a step's SIGTERM to its SIGKILL
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-./gpu_check_out}
PARTS=${TMPDIR:-/tmp}/gpu_check_parts  # each benchmark's --json, merged into $OUT/bench.json after its step
export PYTHON SITE

usage() {
    echo "usage: $0 [--dry-run] tests|bench" >&2
    exit 2
}

NAMES=() TIMEOUTS=() REQUIRED=() COMMANDS=()
step() {  # step NAME TIMEOUT required|optional COMMAND...
    NAMES+=("$1") TIMEOUTS+=("$2") REQUIRED+=("$3")
    COMMANDS+=("$(printf '%q ' "${@:4}")")
}

plan() {
    step nvidia-smi 15 required nvidia-smi
    local install=90
    [[ $1 == bench ]] && install=75
    step install "$install" required tools/gpu_setup.sh install
    if [[ $1 == tests ]]; then
        # Only the files holding CUDA-only tests are collected: the others import packages the image lacks
        # (lm-eval, nemo-run). Plugin autoloading is off: the image's own pytest plugins are not for this pytest.
        step pytest 350 optional env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PYTHON" -P -m pytest -p pytest_timeout \
            -p no:cacheprovider -o timeout=240 -m cuda -v -ra --durations=20 --continue-on-collection-errors \
            --junitxml="$OUT/junit.xml" "${CUDA_TESTS[@]}"
    else
        step kernels 75 optional "$PYTHON" benchmarks/kernels.py --device cuda --cases fla --lengths 4096 16384 \
            --heads 16 --head-dim 128 --repeats 5 --json "$PARTS/kernels.json"
        step layer 60 optional "$PYTHON" benchmarks/throughput.py --level layer --config deltanet_1p3b \
            --seq-length 4096 --micro-batch-size 8 --warmup 3 --steps 10 --json "$PARTS/layer.json"
        step refine 95 optional "$PYTHON" benchmarks/refine_cost.py --device cuda --lengths 4096 16384 \
            --hidden 1024 --layers 8 --heads 8 --repeats 3 --json "$PARTS/refine.json"
        step model 120 optional "$PYTHON" benchmarks/throughput.py --config deltanet_1p3b --seq-length 4096 \
            --micro-batch-size 2 --warmup 2 --steps 5 --json "$PARTS/model.json"
    fi
}

dry_run() {
    local total=0 i rc=0
    echo "plan of tools/gpu_check.sh $1 (each step: name, timeout, command; output in $OUT/NAME.log):"
    echo "    environment: PYTHONPATH=$SITE PYTHONUNBUFFERED=1"
    for i in "${!NAMES[@]}"; do
        printf '%d. %-10s timeout %3ss  %-8s %s\n' $((i + 1)) "${NAMES[i]}" "${TIMEOUTS[i]}" "${REQUIRED[i]}" \
            "${COMMANDS[i]}"
        total=$((total + TIMEOUTS[i] + GRACE))
    done
    echo "timeouts + ${GRACE} s kill graces: ${total} s of ${BUDGET} s"
    if ((total > BUDGET)); then
        echo "gpu_check: the steps' timeouts add up to ${total} s, over ${BUDGET} s: shorten them in $0" >&2
        rc=1
    fi
    tools/gpu_setup.sh check || rc=1
    return $rc
}

run() {
    local json="$OUT/$1.json" i rc start seconds result skip="" detail ok=1 logname
    mkdir -p "$OUT" && rm -f "$OUT"/*.log "$OUT/junit.xml" "$json" "$OUT/summary.txt"
    rm -rf "$PARTS" && mkdir -p "$PARTS"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    local summary=("tools/gpu_check.sh $1 on ${HOSTNAME:-?}, $(date -u +%FT%TZ)")
    for i in "${!NAMES[@]}"; do
        local name=${NAMES[i]} t=${TIMEOUTS[i]} log="$OUT/${NAMES[i]}.log"
        echo "== $name (timeout ${t}s): ${COMMANDS[i]}"
        if [[ -n $skip ]]; then
            result=skipped seconds=0 detail="after $skip failed"
        else
            start=$SECONDS
            eval "timeout -k $GRACE $t ${COMMANDS[i]}" > "$log" 2>&1 < /dev/null
            rc=$? seconds=$((SECONDS - start))
            case $rc in
                0) result=passed ;;
                124 | 137) result="timed-out" ;;
                *) result="failed" ;;
            esac
            detail="rc $rc: $(tail -n 1 "$log" | cut -c 1-160)"
            [[ $result != passed && ${REQUIRED[i]} == required ]] && skip=$name
        fi
        [[ $result == passed ]] || ok=0
        logname="$name.log"
        [[ $result == skipped ]] && logname=""
        "$PYTHON" tools/gpu_check.py record "$json" "$name" "$result" "$seconds" "$t" "$logname" "$PARTS/$name.json" \
            || echo "could not record $name in $json" >&2
        summary+=("$(printf '%-10s %-9s %4ss of %3ss  %s' "$name" "$result" "$seconds" "$t" "$detail")")
        echo "   ${summary[-1]}"
    done
    printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
    ((ok))
}

dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
[[ $# -eq 1 && ($1 == tests || $1 == bench) ]] || usage
CUDA_TESTS=()
if [[ $1 == tests ]]; then
    mapfile -t CUDA_TESTS < <(grep -rlE --include='test_*.py' 'pytest\.mark\.cuda\b' tests | sort)
    if ((${#CUDA_TESTS[@]} == 0)); then
        echo "gpu_check: no test file in tests/ uses pytest.mark.cuda: mark the CUDA-only tests with it" >&2
        exit 1
    fi
fi
plan "$1"
if ((dry)); then dry_run "$1"; else run "$1"; fi
