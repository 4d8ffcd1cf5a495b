"""Stateless, batched, padding-aware ops in float32. Boxes are (y1, x1, y2, x2) pixels."""

from mrcnn_tf.ops.anchors import base_anchors, level_anchors, multilevel_anchors
from mrcnn_tf.ops.box_coder import BoxCoder
from mrcnn_tf.ops.boxes import (
    area,
    box_sizes,
    clip_boxes,
    pairwise_iou,
    xywh_to_yxyx,
    yxyx_to_xywh,
)
from mrcnn_tf.ops.masks import crop_masks, paste_masks
from mrcnn_tf.ops.matcher import Matcher
from mrcnn_tf.ops.nms import multiclass_nms, non_max_suppression, proposal_nms
from mrcnn_tf.ops.roi_align import multilevel_roi_align, roi_align, roi_levels
from mrcnn_tf.ops.sampler import sample_balanced, sampled_mask

__all__ = [
    "BoxCoder", "Matcher", "area", "base_anchors", "box_sizes", "clip_boxes", "crop_masks",
    "level_anchors", "multiclass_nms", "multilevel_anchors", "multilevel_roi_align",
    "non_max_suppression", "pairwise_iou", "paste_masks", "proposal_nms", "roi_align",
    "roi_levels", "sample_balanced", "sampled_mask", "xywh_to_yxyx", "yxyx_to_xywh",
]
