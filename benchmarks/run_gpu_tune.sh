#!/usr/bin/env bash
# Tune the INT8 GEMM tile tables on this GPU and check them, on a machine where the package is not
# installed (e.g. the lent device) or where it is. Usage:
#   OUT=results TUNE_M="1 4 16 64" benchmarks/run_gpu_tune.sh
# Writes $OUT/configs/int8_{block,channel}_<arch>.json (the shipped tables with the tuned M buckets
# replaced), the activation-quantizer sweep, CUDA kernel test results and the linear benchmark.
# Copy $OUT/configs/*.json into kernels/configs/ to ship them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT/configs"
. benchmarks/gpu_env.sh
cp -n kernels/configs/*.json "$OUT/configs/" 2>/dev/null
timeout "${TUNE_S:-420}" python3 benchmarks/tune_int8.py --out "$OUT/configs" --m ${TUNE_M:-1 4 16 64} \
    --schemes ${TUNE_SCHEMES:-block channel} \
    --budget-s "${TUNE_BUDGET_S:-330}" --verbose > "$OUT/tune.log" 2>&1
cp "$OUT"/configs/*.json kernels/configs/  # this tree's tests and benchmark use the new tables
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_int8_gemm.py tests/test_kernels_act_quant.py \
    ${EXTRA_TESTS:-} 2>&1 | tail -n 15 | tee "$OUT/cuda_tests.txt"
[ "${QUANT_BENCH:-1}" = 1 ] && timeout 120 python3 benchmarks/bench_act_quant.py "$OUT/act_quant.md" \
    --json "$OUT/act_quant.json" ${QUANT_ARGS:-} > "$OUT/act_quant.log" 2>&1
python3 benchmarks/bench_int8_linear.py "$OUT/int8_linear.md" --json "$OUT/int8_linear.json" \
    --m ${BENCH_M:-1 4 16 64} --check-m ${CHECK_M:-1 16} 2>&1 | tail -n 25
