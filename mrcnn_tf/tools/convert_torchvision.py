"""Converts a torchvision Mask R-CNN checkpoint into a run directory of this library.

    python -m mrcnn_tf.tools.convert_torchvision \\
        --checkpoint maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --output runs/torchvision_coco

The output is what ``train.py`` writes: ``config.json``, ``labels.json`` (torchvision's COCO
labels: class i is COCO category id i) and ``checkpoints/ckpt-0`` (a step-0 training checkpoint),
so ``python -m mrcnn_tf.predict --model_dir``, ``python train.py --mode eval --model_dir`` and
``python export/export_saved_model.py --model_dir`` take it as it is. Reading a ``.pth`` needs
torch (``pip install torch``; loaded with ``weights_only=True``); an ``.npz`` of the state dict
needs nothing else.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "torchvision_r50_fpn.yaml"


def convert(checkpoint: str, output: str, config_path: str | None = None, overrides=()) -> str:
    """Writes the run directory ``output``; returns the checkpoint path."""
    import tensorflow as tf

    from mrcnn_tf import rundir
    from mrcnn_tf.checkpoint import make_checkpoint
    from mrcnn_tf.config import load_config
    from mrcnn_tf.model import build_model
    from mrcnn_tf.weights import coco_label_map, load_torchvision

    path = config_path or DEFAULT_CONFIG
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {path} not found; pass --config "
                                "(the repository's configs/torchvision_r50_fpn.yaml)")
    config = load_config(path, list(overrides))
    model = build_model(config)
    n = load_torchvision(model, checkpoint)
    model.compile()  # a step-0 training checkpoint, as train.py's, with the optimiser slots
    os.makedirs(rundir.checkpoint_dir(output), exist_ok=True)
    rundir.write_config(output, config)
    rundir.write_labels(output, *coco_label_map(config.model.num_classes))
    manager = tf.train.CheckpointManager(make_checkpoint(model, model.optimizer),
                                         rundir.checkpoint_dir(output), max_to_keep=1)
    saved = manager.save(checkpoint_number=0)
    print(f"converted {n} tensors from {checkpoint} -> {saved}")
    return saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="torchvision state dict (.pth or .npz)")
    p.add_argument("--output", required=True, help="run directory to write")
    p.add_argument("--config", default=None,
                   help="model config (default: configs/torchvision_r50_fpn.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.detection.score_threshold=0.3")
    args = p.parse_args(argv)
    from mrcnn_tf.cli import quiet

    quiet()
    convert(args.checkpoint, args.output, args.config, args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
