#!/usr/bin/env bash
# The GPU check, one script for a machine with CUDA: under 8 minutes on a current data-centre GPU.
#   bash benchmarks/gpu_check.sh [DATA_DIR]       (default ../shared/data; generated CIFAR-10-shaped data if absent)
# Writes everything it measured under ${OUT:-gpu_check}/: the CUDA tests' result, the default command's
# first rounds at full scale with the run's own time estimate, and benchmarks/performance.py --device cuda.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
data=${1:-../shared/data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" >> "$out/gpu.txt" 2>&1
if [ ! -f "$data/cifar10/test.npz" ]; then      # generated images of CIFAR-10's shape: timing, not accuracy
  data="$out/data"
  python -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_tiny_dataset; make_tiny_dataset('$data', train_per_class=5000, test_per_class=1000)"
  echo "data: generated, CIFAR-10's shape (50,000 + 10,000 images)" >> "$out/gpu.txt"
fi
# 1. the CUDA-only tests (about 3 minutes)
timeout 300 python -m pytest -q tests/test_cuda.py > "$out/cuda_tests.txt" 2>&1
echo "cuda tests exit code $?" >> "$out/cuda_tests.txt"
# 2. the default command at full scale (the full preset, chosen by CUDA): stop after 5 rounds, keep its estimate
timeout 180 python train.py --dataset cifar10 --batches 2 --data-dir "$data" --out "$out/full_run" --overwrite \
  --stop-after-rounds 5 > "$out/full_run.txt" 2>&1
echo "full-scale run exit code $? (130 = stopped after 5 rounds as asked)" >> "$out/full_run.txt"
# 3. the overhead benchmark on the GPU at its default sizes (cut off after 200 s; its lines print as it goes)
timeout 200 python benchmarks/performance.py --device cuda --json "$out/performance.json" \
  > "$out/performance.txt" 2>&1
echo "performance exit code $?" >> "$out/performance.txt"
tail -n 3 "$out"/*.txt
