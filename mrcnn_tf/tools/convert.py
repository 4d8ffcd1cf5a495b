"""Converts a public Mask R-CNN checkpoint into a run directory of this library.

    python -m mrcnn_tf.tools.convert --checkpoint maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth \\
        --output runs/torchvision_v2_coco

The checkpoint's family and architecture are read from its keys and shapes (``--from`` checks a
family instead of guessing it), the matching config is picked (``configs/torchvision_r50_fpn.yaml``
for v1, ``configs/torchvision_r50_fpn_v2.yaml`` for v2) and what was found is printed. Widths,
depth and class count that differ from the config's are taken from the checkpoint.

The output is what ``train.py`` writes: ``config.json``, ``labels.json`` (torchvision's COCO labels:
class i is COCO category id i) and ``checkpoints/ckpt-0`` (a step-0 training checkpoint), so
``python -m mrcnn_tf.predict --model_dir``, ``python train.py --mode eval --model_dir`` and
``python export/export_saved_model.py --model_dir`` take it as it is. Reading a ``.pth`` needs
torch (``pip install torch``; loaded with ``weights_only=True``); an ``.npz`` of the state dict
needs nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

FAMILIES = {
    "torchvision": ("torchvision maskrcnn_resnet50_fpn (v1)", "torchvision_r50_fpn.yaml"),
    "torchvision_v2": ("torchvision maskrcnn_resnet50_fpn_v2", "torchvision_r50_fpn_v2.yaml"),
}


@dataclasses.dataclass
class Found:
    """What a checkpoint holds: its family, the config to build and the overrides its shapes
    need (depth, widths, classes), with a one-line description."""

    family: str
    config: str
    overrides: list[str]
    description: str


def _count(state, pattern_prefix: str) -> int:
    """Number of consecutive blocks ``{prefix}{i}.`` present in the keys."""
    n = 0
    while any(k.startswith(f"{pattern_prefix}{n}.") for k in state):
        n += 1
    return n


def _backbone_name(blocks: tuple[int, ...], stem: int) -> str | None:
    from mrcnn_tf.layers.backbone import ARCHS

    for name, (arch_blocks, arch_stem, _) in ARCHS.items():
        if tuple(arch_blocks) == blocks and arch_stem == stem:
            return name
    return None


def inspect_torchvision(state: dict, family: str) -> Found:
    """The config and overrides that build the model of a torchvision state dict."""
    from mrcnn_tf.weights import WeightsError

    blocks = tuple(_count(state, f"backbone.body.layer{s}.") for s in range(1, 5))
    stem = state["backbone.body.conv1.weight"].shape[0] if (
        "backbone.body.conv1.weight" in state) else None
    name = _backbone_name(blocks, stem)
    if name is None:
        raise WeightsError(f"backbone.body: {blocks} blocks per stage and a {stem}-channel stem "
                           "match no supported ResNet (resnet50: (3, 4, 6, 3), resnet101: "
                           "(3, 4, 23, 3))")
    cls = state.get("roi_heads.box_predictor.cls_score.weight")
    if cls is None:
        raise WeightsError("missing from the state dict: roi_heads.box_predictor.cls_score.weight")
    fpn = state["backbone.fpn.inner_blocks.0.0.weight"].shape[0]
    overrides = [f"model.backbone.name={name}", f"model.num_classes={cls.shape[0] - 1}",
                 f"model.fpn.channels={fpn}", f"model.rpn.conv_channels={fpn}",
                 f"model.box_head.fc_dim={cls.shape[1]}",
                 f"model.mask_head.conv_dim={state['roi_heads.mask_head.0.0.weight'].shape[0]}"]
    if family == "torchvision_v2":
        overrides.append(
            f"model.box_head.conv_dim={state['roi_heads.box_head.0.0.weight'].shape[0]}")
    label, config = FAMILIES[family]
    return Found(family, config, overrides,
                 f"{label}, {name}, {cls.shape[0] - 1} classes, FPN {fpn} channels")


def inspect(state: dict, family: str | None = None) -> Found:
    """What ``state`` is; with ``family``, a WeightsError when it is another family."""
    from mrcnn_tf.weights import WeightsError, family_of

    found = family_of(state)
    if family not in (None, "auto") and family != found:
        raise WeightsError(f"--from {family}: the checkpoint is {FAMILIES[found][0]}, not "
                           f"{FAMILIES[family][0]}; pass --from {found} or leave --from out")
    return inspect_torchvision(state, found)


def convert(checkpoint, output: str, config_path: str | None = None, overrides=(),
            family: str | None = None) -> str:
    """Writes the run directory ``output`` from ``checkpoint`` (a path, or a state dict);
    returns the checkpoint path written."""
    import tensorflow as tf

    from mrcnn_tf import rundir
    from mrcnn_tf.checkpoint import make_checkpoint
    from mrcnn_tf.config import load_config, packaged_config
    from mrcnn_tf.model import build_model
    from mrcnn_tf.weights import coco_label_map, load_torchvision, read_state_dict

    state = read_state_dict(checkpoint)
    found = inspect(state, family)
    path = config_path or packaged_config(os.path.join("configs", found.config))
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {path} not found; pass --config")
    config = load_config(path, found.overrides + list(overrides))
    print(f"found {found.description}; config {os.path.basename(path)}")
    model = build_model(config)
    n = load_torchvision(model, state)
    model.compile()  # a step-0 training checkpoint, as train.py's, with the optimiser slots
    os.makedirs(rundir.checkpoint_dir(output), exist_ok=True)
    rundir.write_config(output, config)
    rundir.write_labels(output, *coco_label_map(config.model.num_classes))
    manager = tf.train.CheckpointManager(make_checkpoint(model, model.optimizer),
                                         rundir.checkpoint_dir(output), max_to_keep=1)
    saved = manager.save(checkpoint_number=0)
    print(f"converted {n} tensors from "
          f"{checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'the state dict'}"
          f" -> {saved}")
    return saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the state dict (.pth or .npz)")
    p.add_argument("--output", required=True, help="run directory to write")
    p.add_argument("--from", dest="family", default="auto", choices=("auto", *FAMILIES),
                   help="the checkpoint's family (default: read from its keys)")
    p.add_argument("--config", default=None,
                   help="model config (default: the family's config in configs/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.detection.score_threshold=0.3")
    args = p.parse_args(argv)
    from mrcnn_tf.cli import quiet

    quiet()
    from mrcnn_tf.weights import WeightsError

    try:
        convert(args.checkpoint, args.output, args.config, args.set, args.family)
    except (WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
