#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_speed.py) at DeltaNet-1.3B size, for one CUDA machine.
#
#   bash benchmarks/gpu.sh [gpu_speed.py options]     # from anywhere; ~4-8 min on one H200
#
# Writes $OUT/gpu.json and $OUT/gpu.log when $OUT is set, else benchmarks/results/gpu.{json,log}.
# Needs python3 with CUDA torch, triton, transformers, einops and safetensors (the H200 image has
# them) plus fla (flash-linear-attention 0.6.0 and fla-core 0.6.0, pure-Python wheels). If fla is
# not importable and the wheels are in .whl/ of the repository, they are installed to /tmp/site.
# Fetch them beforehand, on a machine with the package index, with:
#   python3 -m pip download --no-deps -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
# (and carry .whl to the GPU machine). The run is bounded by GPU_TIMEOUT seconds (default 540).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import fla" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu.sh: fla is not importable and .whl/ holds no wheels; see the header of this script" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTHONWARNINGS="ignore::UserWarning"

OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton, fla; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

set +e
timeout "${GPU_TIMEOUT:-540}" "$PY" benchmarks/gpu_speed.py --device cuda --out "$OUTDIR/gpu.json" "$@" 2>&1 \
  | tee "$OUTDIR/gpu.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 124 ] && echo "gpu.sh: stopped after ${GPU_TIMEOUT:-540} s" >&2
exit "$rc"
