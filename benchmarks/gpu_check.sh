#!/usr/bin/env bash
# Transfer throughput against plain training on one GPU: ResNet-50 student, ViT-B/16 teacher,
# 224 px, batch 256, bf16 autocast, channels-last (see docs/performance.md, "On a GPU").
# Finishes in a few minutes on an H100. Any argument is passed on (e.g. --compile, --device cpu),
# and GPU_CHECK_* variables override the defaults (see benchmarks/gpu_throughput.py --help).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$here/gpu_throughput.py" "$@"
