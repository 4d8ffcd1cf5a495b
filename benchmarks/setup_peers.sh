#!/usr/bin/env bash
# Creates the peers' virtual environments for benchmarks/compare.py (not project dependencies):
#   $MRCNN_BENCH_VENVS/torch        torch 2.14.1 + torchvision 0.29.1 + pycocotools (the e2e
#                                   worker reads coco128's JSON; also used by the parity scripts
#                                   tests/scripts/torchvision_parity.py, torchvision_train_parity.py;
#                                   onnx for onnx_vs_torchvision.py's torch.onnx.export, matplotlib
#                                   for learning_curves.py's figure)
#   $MRCNN_BENCH_VENVS/modelgarden  tf-models-official 2.20 with its pinned TensorFlow 2.20 and
#                                   tf_keras
# Default location: benchmarks/.venvs. Idempotent: an existing venv that imports is kept.
set -euo pipefail
VENVS="${MRCNN_BENCH_VENVS:-$(cd "$(dirname "$0")" && pwd)/.venvs}"
mkdir -p "$VENVS"
if ! "$VENVS/torch/bin/python" -c "import torch, torchvision, pycocotools, onnx, matplotlib" \
    2>/dev/null; then
  python3 -m venv "$VENVS/torch"
  "$VENVS/torch/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 numpy pycocotools onnx \
    matplotlib
fi
if ! "$VENVS/modelgarden/bin/python" -c "import official.vision" 2>/dev/null; then
  python3 -m venv "$VENVS/modelgarden"
  "$VENVS/modelgarden/bin/pip" install -q "tf-models-official==2.20.*"
fi
echo "peers ready in $VENVS"
