#!/usr/bin/env bash
# Issue 14's GPU checks in one run, for a session lent a CUDA machine (one call of the device tool's `run`):
# under 10 minutes in all (the timeouts below add up to 570 s).
#
#   bash benchmarks/device_check.sh          # logs in $OUT (the device tool's folder), else ./device-check
#
# 1. the tests marked gpu (tests/test_gpu.py, tests/test_gpu_hf.py): scans and fine-tuning on CUDA equal to
#    CPU, a bf16 folder scanned in bf16, --device-map over the GPU, CPU memory and disk;
# 2. benchmarks/scan_overhead.py on CUDA: scan / bare forward (target <= 1.05) and images/s of one GPU;
# 3. the same with the per-call statistics fused by torch.compile (--compiled-stats), eager beside it.
# Not covered by one GPU: NCCL between processes (two processes cannot share one GPU under NCCL).
#
# The lent H200 image has every dependency but plotly: carry its wheel in .whl (an ignored folder), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl plotly
# and it is installed here first.
set -uo pipefail
py="${PYTHON:-python3}"  # the interpreter holding torch (the H200 image: python3)
out="${OUT:-device-check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.csv" 2>&1
timeout 240 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_gpu_hf.py 2>&1 \
    | tee "$out/gpu_tests.log"
tests=$?
timeout 150 "$py" benchmarks/scan_overhead.py --device cuda 2>&1 | tee "$out/scan_overhead_cuda.log"
bench=$?
# the experiment that decides whether a fused statistics kernel is worth adopting on GPUs
timeout 180 "$py" benchmarks/scan_overhead.py --device cuda --compiled-stats 2>&1 | tee "$out/scan_overhead_compiled.log"
echo "gpu tests exit $tests, scan_overhead exit $bench" | tee "$out/result.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
