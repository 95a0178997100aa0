#!/usr/bin/env bash
# One GPU session's worth of checks on a machine where the package is not installed (e.g. the lent
# device): CUDA tests, then benchmarks; logs and tables go to ${OUT:-gpu_results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
. benchmarks/gpu_env.sh
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_model.py tests/test_kernels_int8_gemm.py \
    tests/test_kernels_act_quant.py ${EXTRA_TESTS:-} 2>&1 | tail -n 30 | tee "$OUT/cuda_tests.txt"
python3 benchmarks/bench_decode_gpu.py "$OUT/decode_gpu.md" ${DECODE_ARGS:-} 2>&1 | tail -n 20
