"""Our side of the inference parity with detectron2's Mask R-CNN R50-FPN (and X101-32x8d):
the committed small references, our configs and their parity overrides. The check itself is
tests/parity/torchvision_inference.py's, which takes a reference's ``family`` into account; the
references are written by tests/scripts/detectron2_parity.py. Needs no torch.
"""

from __future__ import annotations

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL_FIXTURE = REPO / "tests" / "fixtures" / "detectron2_maskrcnn_small.npz"
SMALL_FIXTURE_X = REPO / "tests" / "fixtures" / "detectron2_x_maskrcnn_small.npz"
CONFIG = REPO / "configs" / "detectron2_r50_fpn.yaml"
CONFIG_X = REPO / "configs" / "detectron2_x101_32x8d_fpn.yaml"
SMALL = dict(stem=16, widths=(16, 32, 64, 128), fpn=64, fc=64, mask=64, min_size=200,
             max_size=320)


def parity_overrides(small: bool, resnext: bool = False) -> list[str]:
    """Overrides of configs/detectron2_r50_fpn.yaml (or the X101 one) for the parity model:
    score threshold 0 (as on detectron2's side), and the small widths and sizes with ``small``."""
    s = SMALL
    overrides = ["model.detection.score_threshold=0.0"]
    if small:
        name = "resnext_small" if resnext else "resnet_small"
        overrides += [f"model.backbone.name={name}", f"model.fpn.channels={s['fpn']}",
                      f"model.rpn.conv_channels={s['fpn']}", f"model.box_head.fc_dim={s['fc']}",
                      f"model.mask_head.conv_dim={s['mask']}",
                      f"model.preprocess.short_size={s['min_size']}",
                      f"model.preprocess.long_size={s['max_size']}",
                      "data.canvas_long_sides=[224, 288, 320]",
                      "data.train_short_sizes=null"]  # detectron2's 640..800 exceed 200
    return overrides


def our_config(small: bool, resnext: bool = False):
    from mrcnn_tf.config import load_config

    return load_config(CONFIG_X if resnext else CONFIG, parity_overrides(small, resnext))
