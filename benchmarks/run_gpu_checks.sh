#!/usr/bin/env bash
# One GPU session's worth of checks on a machine where the package is not installed (e.g. the lent
# device): CUDA tests, then benchmarks; logs and tables go to ${OUT:-gpu_results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT" /tmp/hr1_pkg
ln -sfn "$PWD/kernels" /tmp/hr1_pkg/hybrid_r1_kernels
ln -sfn "$PWD/merge_tools" /tmp/hr1_pkg/hybrid_r1_merge_tools
export PYTHONPATH="$PWD:/tmp/hr1_pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_model.py tests/test_kernels_int8_gemm.py \
    tests/test_kernels_act_quant.py ${EXTRA_TESTS:-} 2>&1 | tail -n 30 | tee "$OUT/cuda_tests.txt"
python3 benchmarks/bench_decode_gpu.py "$OUT/decode_gpu.md" ${DECODE_ARGS:-} 2>&1 | tail -n 20
