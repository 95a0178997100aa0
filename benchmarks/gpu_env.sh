# Sourced by the run_gpu_*.sh scripts: makes the repository importable without installing it (the
# lent device has torch and Triton but not this package) and records the GPU. Expects OUT set.
mkdir -p "$OUT" /tmp/hr1_pkg
ln -sfn "$PWD/kernels" /tmp/hr1_pkg/hybrid_r1_kernels
ln -sfn "$PWD/merge_tools" /tmp/hr1_pkg/hybrid_r1_merge_tools
export PYTHONPATH="$PWD:/tmp/hr1_pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
