#!/usr/bin/env bash
# The wheel trains: builds the wheel, installs it (not editable) into a fresh virtual environment
# of the given Python, and runs the console scripts from an empty directory, where no configs/ or
# source tree is in reach. Usage: bash tests/scripts/wheel_trains.sh [python3.12] [WORK_DIR]
set -euo pipefail
PY=${1:-python3}
WORK=${2:-$(mktemp -d)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$WORK/wheel" "$WORK/cwd"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
"$WORK/venv/bin/pip" wheel -q --no-deps -w "$WORK/wheel" "$REPO"
"$WORK/venv/bin/pip" install -q "$WORK"/wheel/mrcnn_tf-*.whl
cd "$WORK/cwd"
"$WORK/venv/bin/python" --version
for tool in mrcnn-train mrcnn-export mrcnn-predict mrcnn-convert; do
  "$WORK/venv/bin/$tool" --help > /dev/null
done
# The shapes job, short: the packaged configs/shapes.yaml, built-in synthetic data.
"$WORK/venv/bin/mrcnn-train" --model_dir run --set train.steps=30 train.checkpoint_every=30 \
  eval.every_n_steps=30 eval.num_images=8
"$WORK/venv/bin/mrcnn-export" --model_dir run --output export --mask_output png
# A --config path that is not here names the packaged config of that name.
"$WORK/venv/bin/python" -c "from mrcnn_tf.config import load_config, packaged_config as p; \
assert 'site-packages' in p('configs/coco_r50_fpn_1x.yaml'); \
load_config(p('configs/coco_r50_fpn_1x.yaml'))"
test -f run/metrics.json && test -d export/1 && test -f run/summary.json
echo "wheel trains: OK ($("$WORK/venv/bin/python" --version))"
