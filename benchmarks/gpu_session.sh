#!/usr/bin/env bash
# Everything issue 5 needs from a GPU, in one call: the kernel tests against the *compiled*
# kernels on CUDA tensors (the CPU suite runs them under Triton's interpreter, whose NaN,
# flush-to-zero and log2 behaviour is not the GPU's), then the benchmark with the anchors and
# the launch sweep. Results land in $OUT (or ./gpu-out): cuda_tests.log, BENCHMARKS.md,
# divergence.jsonl, bench.log. Planned at about 7 minutes on an H200; the stages' bounds sum to
# 9.5 minutes, under the device tool's 10-minute command limit (run it with timeout_s 600).
#
# Prepare once on the CPU machine, in the repo root (.gpu/ is git-ignored; nothing is fetched at
# run time):
#   mkdir -p .gpu && cp ../shared/bench/divergence_anchor.py .gpu/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu liger-kernel   # Liger JSD anchor
# Run on the device (carry .gpu):  bash benchmarks/gpu_session.sh
# Then copy BENCHMARKS.md and divergence.jsonl back into the repo (benchmarks/divergence.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
if compgen -G ".gpu/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"

KERNEL_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_kernels_triton.py tests/kernels/test_kernels_fused_linear.py 2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

anchor=".gpu/divergence_anchor.py"
[ -f "$anchor" ] || anchor="../shared/bench/divergence_anchor.py"
timeout 400 python3 benchmarks/bench_divergence.py --anchor "$anchor" --anchor-timeout 200 --sweep \
    --out "$out/BENCHMARKS.md" --json "$out/divergence.jsonl" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "cuda tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
