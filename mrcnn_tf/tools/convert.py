"""Converts a public Mask R-CNN checkpoint into a run directory of this library.

    python -m mrcnn_tf.tools.convert --checkpoint maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth \\
        --output runs/torchvision_v2_coco
    python -m mrcnn_tf.tools.convert --checkpoint model_final_f10217.pkl --output runs/d2_r50_3x

The checkpoint's family and architecture are read from its keys and shapes (``--from`` checks a
family instead of guessing it), the matching config is picked and what was found is printed:
torchvision v1 -> ``configs/torchvision_r50_fpn.yaml``, v2 ->
``configs/torchvision_r50_fpn_v2.yaml``, detectron2 -> ``configs/detectron2_r50_fpn.yaml``.
Depth, widths and class count that differ from the config's are taken from the checkpoint.

The output is what ``train.py`` writes: ``config.json``, ``labels.json`` and ``checkpoints/ckpt-0``
(a step-0 training checkpoint), so ``python -m mrcnn_tf.predict --model_dir``, ``python train.py
--mode eval --model_dir`` and ``python export/export_saved_model.py --model_dir`` take it as it
is. Labels: torchvision's 91 COCO labels (class i is COCO category id i), or detectron2's 80
contiguous COCO classes (class i is the i-th COCO category id); other class counts get
``class i``. Files: a ``.pth`` needs torch (``torch.load(weights_only=True)``); a detectron2
``.pkl`` is read by an unpickler that admits numpy arrays and plain containers only; an
``.npz`` of the state dict needs nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

FAMILIES = {
    "torchvision": ("torchvision maskrcnn_resnet50_fpn (v1)", "torchvision_r50_fpn.yaml"),
    "torchvision_v2": ("torchvision maskrcnn_resnet50_fpn_v2", "torchvision_r50_fpn_v2.yaml"),
    "detectron2": ("detectron2 Mask R-CNN R-FPN", "detectron2_r50_fpn.yaml"),
}


@dataclasses.dataclass
class Found:
    """What a checkpoint holds: its family, the config to build and the overrides its shapes
    need (depth, widths, classes), with a one-line description."""

    family: str
    config: str
    overrides: list[str]
    description: str


def _count(state, prefix: str) -> int:
    """Number of consecutive blocks ``{prefix}{i}.`` present in the keys."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def _backbone_name(state, where: str, stages: list[str], stem_key: str) -> str:
    """The ARCHS entry whose blocks per stage, stem width, bottleneck width and groups the
    state's shapes have (keys ``{where}{stage}.{block}.conv{1,2}.weight`` and
    ``{where}{stem_key}``)."""
    from mrcnn_tf.layers.backbone import ARCHS
    from mrcnn_tf.weights import WeightsError

    blocks = tuple(_count(state, f"{where}{stage}.") for stage in stages)
    stem = _shape(state, where + stem_key)
    width = _shape(state, f"{where}{stages[0]}.0.conv1.weight")
    groups = width // _shape(state, f"{where}{stages[0]}.0.conv2.weight", 1)
    for name, arch in ARCHS.items():
        if (tuple(arch[0]), arch[1], arch[2], arch[3]) == (blocks, stem, width, groups):
            return name
    raise WeightsError(
        f"{where}: {blocks} blocks per stage, a {stem}-channel stem and {groups} group(s) of "
        f"{width // groups} in the first 3x3 conv match no supported backbone (resnet50: "
        "(3, 4, 6, 3) blocks, resnet101: (3, 4, 23, 3), resnext101_32x8d: (3, 4, 23, 3) with "
        "32 groups of 8)")


def _shape(state, key: str, axis: int = 0) -> int:
    from mrcnn_tf.weights import WeightsError

    if key not in state:
        raise WeightsError(f"missing from the state dict: {key}")
    return int(state[key].shape[axis])


def inspect(state: dict, family: str | None = None) -> Found:
    """What ``state`` is and the overrides that build its model; with ``family``, a WeightsError
    when it is another family."""
    from mrcnn_tf.weights import WeightsError, family_of

    found = family_of(state)
    if family not in (None, "auto") and family != found:
        raise WeightsError(f"--from {family}: the checkpoint is {FAMILIES[found][0]}, not "
                           f"{FAMILIES[family][0]}; pass --from {found} or leave --from out")
    if found == "detectron2":
        p = "backbone.bottom_up."
        name = _backbone_name(state, p, ["res2", "res3", "res4", "res5"], "stem.conv1.weight")
        classes = _shape(state, "roi_heads.box_predictor.cls_score.weight") - 1
        fpn = _shape(state, "backbone.fpn_lateral2.weight")
        fc = _shape(state, "roi_heads.box_head.fc1.weight")
        mask = _shape(state, "roi_heads.mask_head.mask_fcn1.weight")
    else:
        name = _backbone_name(state, "backbone.body.", ["layer1", "layer2", "layer3", "layer4"],
                              "conv1.weight")
        classes = _shape(state, "roi_heads.box_predictor.cls_score.weight") - 1
        fpn = _shape(state, "backbone.fpn.inner_blocks.0.0.weight")
        fc = _shape(state, "roi_heads.box_predictor.cls_score.weight", 1)
        mask = _shape(state, "roi_heads.mask_head.0.0.weight")
    overrides = [f"model.backbone.name={name}", f"model.num_classes={classes}",
                 f"model.fpn.channels={fpn}", f"model.rpn.conv_channels={fpn}",
                 f"model.box_head.fc_dim={fc}", f"model.mask_head.conv_dim={mask}"]
    if found == "torchvision_v2":
        overrides.append(
            f"model.box_head.conv_dim={_shape(state, 'roi_heads.box_head.0.0.weight')}")
    label, config = FAMILIES[found]
    if found == "detectron2" and name.startswith("resnext"):
        config = "detectron2_x101_32x8d_fpn.yaml"  # its stride and pixel std differ from R50's
    elif found == "detectron2" and name == "resnet101":
        config = "detectron2_r101_fpn.yaml"
    return Found(found, config, overrides,
                 f"{label}, {name}, {classes} classes, FPN {fpn} channels")


def read_checkpoint(source) -> dict:
    """Any supported file (or a dict) as {key: numpy array}: ``.pkl`` through the restricted
    unpickler, the rest through ``mrcnn_tf.weights.read_state_dict``."""
    from mrcnn_tf.weights import read_state_dict
    from mrcnn_tf.weights_detectron2 import read_detectron2

    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".pkl"):
        return read_detectron2(source)
    return read_state_dict(source)


def labels_for(family: str, num_classes: int):
    """(category ids, names) written to the run's labels.json."""
    from mrcnn_tf.weights import coco_label_map
    from mrcnn_tf.weights_detectron2 import coco80_label_map

    if family == "detectron2":
        if num_classes == 80:
            return coco80_label_map()
        return list(range(1, num_classes + 1)), [f"class {i}" for i in range(1, num_classes + 1)]
    return coco_label_map(num_classes)


def convert(checkpoint, output: str, config_path: str | None = None, overrides=(),
            family: str | None = None) -> str:
    """Writes the run directory ``output`` from ``checkpoint`` (a path, or a state dict);
    returns the checkpoint path written."""
    import tensorflow as tf

    from mrcnn_tf import rundir
    from mrcnn_tf.checkpoint import make_checkpoint
    from mrcnn_tf.config import load_config, packaged_config
    from mrcnn_tf.model import build_model
    from mrcnn_tf.weights import load_torchvision
    from mrcnn_tf.weights_detectron2 import load_detectron2

    state = read_checkpoint(checkpoint)
    found = inspect(state, family)
    path = config_path or packaged_config(os.path.join("configs", found.config))
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {path} not found; pass --config")
    config = load_config(path, found.overrides + list(overrides))
    print(f"found {found.description}; config {os.path.basename(path)}")
    model = build_model(config)
    load = load_detectron2 if found.family == "detectron2" else load_torchvision
    n = load(model, state)
    model.compile()  # a step-0 training checkpoint, as train.py's, with the optimiser slots
    os.makedirs(rundir.checkpoint_dir(output), exist_ok=True)
    rundir.write_config(output, config)
    rundir.write_labels(output, *labels_for(found.family, config.model.num_classes))
    manager = tf.train.CheckpointManager(make_checkpoint(model, model.optimizer),
                                         rundir.checkpoint_dir(output), max_to_keep=1)
    saved = manager.save(checkpoint_number=0)
    where = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "the state dict"
    print(f"converted {n} tensors from {where} -> {saved}")
    return saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="the state dict: .pth, a detectron2 model-zoo .pkl, or .npz")
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
    from mrcnn_tf.config import ConfigError
    from mrcnn_tf.weights import WeightsError

    try:
        convert(args.checkpoint, args.output, args.config, args.set, args.family)
    except (WeightsError, FileNotFoundError, ConfigError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
