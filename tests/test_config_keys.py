"""Every configuration key acts: changed to another valid value, it changes what the library
builds from the config (the model's parts, the optimiser, the input pipeline, the export), or,
for the few keys that act in the training loop, it is read where this table says.

A key added to the config that nothing reads fails here.
"""

import dataclasses
import json
import pathlib
import re
import types
import typing

import pytest
import yaml

from mrcnn_tf.config import Config, config_from_dict, to_dict
from tests.conftest import REPO

SHAPES = yaml.safe_load((REPO / "configs" / "shapes.yaml").read_text())

# Keys that only act in some settings: the settings under which they are checked.
CONTEXT = {
    "model.rpn.focal_alpha": ["model.rpn.objectness_loss=focal"],
    "model.rpn.focal_gamma": ["model.rpn.objectness_loss=focal"],
    "model.rpn.box_loss_weights": ["model.rpn.box_loss=weighted_smooth_l1"],
    "data.canvas_long_sides": ["model.preprocess.resize=short_long",
                               "model.preprocess.short_size=96",
                               "model.preprocess.long_size=128"],
}
# Values for keys whose other values must satisfy rules between keys.
VALUES = {
    "data.canvas_long_sides": [96, 128],
    "data.image_size": 160,
    "model.anchors.sizes": [8.0, 32.0, 64.0, 128.0, 256.0],
    "model.roi_align.level_sampling_ratios": [1, 2, 2, 3],
    "model.roi_align.canonical_level": 3,
    "model.fpn.min_level": 3,
    "model.fpn.max_level": 5,
    "model.roi_align.min_level": 3,
    "model.preprocess.pixel_mean": [0.5, 0.5, 0.5],
    "model.preprocess.pixel_std": [0.5, 0.5, 0.5],
    "train.decay_steps": [100, 200],
    "export.input_types": ["image_bytes"],
    "model.box_head.foreground_iou": 0.7,
    "model.preprocess.square_size": 96,
    "data.aug_scale_max": 1.5,
    "data.train_short_sizes": [64, 96],
}
# Extra settings, in both configs, that the other value needs to be valid.
NEEDS = {
    "model.backbone.input_channels": ["model.preprocess.pixel_mean=[0.5]",
                                      "model.preprocess.pixel_std=[0.25]"],
    "model.preprocess.resize": ["model.preprocess.short_size=96",
                                "model.preprocess.long_size=128"],
    "model.roi_align.min_level": ["model.roi_align.canonical_level=4"],
    "model.rpn.objectness": ["model.rpn.objectness_loss=bce"],
    "model.preprocess.short_size": ["model.preprocess.long_size=1333"],
    "data.train_short_sizes": ["model.preprocess.resize=short_long",
                               "model.preprocess.short_size=96",
                               "model.preprocess.long_size=128",
                               "data.canvas_long_sides=[96, 128]"],
}
# Keys whose other value is valid only with other keys changed with it (in the changed config).
WITH = {
    "model.fpn.min_level": ["model.anchors.sizes=[32.0, 64.0, 128.0, 256.0]",
                            "model.roi_align.min_level=3"],
    "model.fpn.max_level": ["model.anchors.sizes=[16.0, 32.0, 64.0, 128.0]"],
}
# Keys that act in the training loop or its tools rather than in a built object: where each
# is read (a regular expression over that file).
READ_IN_LOOP = {
    "train.steps": ("mrcnn_tf/training.py", r"\bt\.steps\b"),
    "train.checkpoint_every": ("mrcnn_tf/training.py", r"\bt\.checkpoint_every\b"),
    "train.log_every": ("mrcnn_tf/training.py", r"\bt\.log_every\b"),
    "train.seed": ("mrcnn_tf/training.py", r"\bt\.seed\b"),
    "train.mixed_precision": ("mrcnn_tf/training.py", r"\bt\.mixed_precision\b"),
    "train.jit_compile": ("mrcnn_tf/training.py", r"\btrain\.jit_compile\b"),
    "eval.every_n_steps": ("mrcnn_tf/evaluation/run.py", r"\beval\.every_n_steps\b"),
    "eval.num_images": ("mrcnn_tf/evaluation/run.py", r"\beval\.num_images\b"),
    "eval.tensorboard_images": ("mrcnn_tf/evaluation/run.py", r"\beval\.tensorboard_images\b"),
    "model.init_from": ("mrcnn_tf/training.py", r"\bm\.init_from\b"),
    "model.backbone.weights": ("mrcnn_tf/training.py", r"\bm\.backbone\.weights\b"),
    "model.detection.mask_threshold": ("mrcnn_tf/evaluation/run.py",
                                       r"\bdetection\.mask_threshold\b"),
    "model.detection.mask_paste": ("mrcnn_tf/evaluation/run.py", r"\bdetection\.mask_paste\b"),
}


def _options(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _options(hints[f.name], key)
        else:
            yield key, hints[f.name], f


def _default(key):
    node = to_dict(config_from_dict(SHAPES))
    for part in key.split("."):
        node = node[part]
    return node


def _other_value(key, tp, f):
    """A valid value other than the shapes config's."""
    if key in VALUES:
        return VALUES[key]
    meta, current = f.metadata, _default(key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if current is not None:
            return None
        tp, origin = inner, typing.get_origin(inner)
        current = {int: 5, float: 0.5, str: "x"}.get(inner)
    if meta.get("choices"):
        if origin is tuple:
            return [c for c in meta["choices"] if c not in (current or [])][:1] or None
        return next(c for c in meta["choices"] if c != current)
    if tp is bool:
        return not current
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        return [(v * 2 if elem is not str else v) for v in current]
    lo, hi = meta.get("min"), meta.get("max")
    if tp is int:
        for cand in (current + 1, current - 1, current * 2):
            if (lo is None or cand >= lo) and (hi is None or cand <= hi) and cand != current:
                return cand
    if tp is float:
        for cand in (current / 2 if current else 0.25, current * 2, min(1.0, current + 0.1)):
            if (lo is None or cand > lo or (cand == lo and not meta.get("min_exclusive"))) and \
                    (hi is None or cand <= hi) and cand != current:
                return cand
    if tp is str:
        return "x"
    raise AssertionError(f"no other value for {key}")


def fingerprint(cfg) -> dict:
    """What the library builds from ``cfg``, as plain data."""
    from mrcnn_tf.data.pipeline import dataset_spec
    from mrcnn_tf.factory import model_parts
    from mrcnn_tf.serving import serving_options

    out = {}
    for name, part in model_parts(cfg).items():
        if name == "config":
            continue
        if name == "optimizer_factory":
            opt = part()
            out[name] = {k: str(v) for k, v in opt.get_config().items() if k != "name"}
        elif hasattr(part, "get_config"):
            out[name] = {k: v for k, v in part.get_config().items() if k != "name"}
        else:
            out[name] = part
    for training in (True, False):
        spec = dataset_spec(cfg, training)
        out[f"data {training}"] = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v)
                                       else v) for k, v in spec.items()}
    out["export"] = serving_options(cfg)
    return out


KEYS = [k for k, _, _ in _options()]


def test_the_table_is_complete():
    assert set(CONTEXT) | set(VALUES) | set(NEEDS) | set(WITH) | set(READ_IN_LOOP) <= set(KEYS)


@pytest.mark.parametrize("key, tp, f", list(_options()), ids=KEYS)
def test_every_key_acts(key, tp, f):
    if key in READ_IN_LOOP:
        path, pattern = READ_IN_LOOP[key]
        assert re.search(pattern, pathlib.Path(REPO / path).read_text()), (key, path)
        if key not in CONTEXT:
            return
    context = CONTEXT.get(key, []) + NEEDS.get(key, [])
    base = config_from_dict(SHAPES, context)
    value = _other_value(key, tp, f)
    changed = config_from_dict(SHAPES, context + WITH.get(key, [])
                               + [f"{key}={json.dumps(value)}"])
    assert to_dict(changed) != to_dict(base), f"{key}={value!r} did not change the config"
    if key in READ_IN_LOOP:
        return
    assert fingerprint(changed) != fingerprint(base), \
        f"{key}={value!r} changes nothing the library builds"
