"""Training targets, computed inside the model's one forward pass.

Why in the model and not in the input pipeline (as Model Garden does): the anchors depend only on
the padded canvas, which is static in training, so labelling them in the graph costs one IoU
matrix and keeps every user pipeline trivial -- a user's own ``tf.data`` pipeline only has to
deliver images and padded ground truth (the data contract), never anchors or sampled RoIs; and the
RoI sampler needs the proposals, which only the model has.
"""

from __future__ import annotations

import tensorflow as tf

from mrcnn_tf.ops.box_coder import BoxCoder
from mrcnn_tf.ops.boxes import pairwise_iou
from mrcnn_tf.ops.masks import roi_align_masks, roi_align_masks_static
from mrcnn_tf.ops.matcher import Matcher
from mrcnn_tf.ops.sampler import sample_balanced, sampled_mask


def rpn_targets(anchors: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor, matcher: Matcher,
                coder: BoxCoder, batch_size_per_image: int | None, positive_fraction: float
                ) -> dict:
    """Labels and samples anchors (torchvision's RPN assignment).

    Args:
      anchors: [N, 4] for the padded canvas (shared by the batch).
      gt_boxes: [B, M, 4]; gt_valid: [B, M] bool.
      batch_size_per_image: anchors sampled per image; None: every positive and negative.
    Returns:
      ``match_labels`` [B, N] int32 (1 positive, 0 negative, -1 ignored), ``labels`` [B, N]
      float32 (1 positive, else 0), ``sampled`` [B, N] bool (the
      ``batch_size_per_image`` anchors in the loss), ``positive`` [B, N] bool (sampled positives),
      ``box_targets`` [B, N, 4] deltas to the matched ground truth, ``matched_boxes`` [B, N, 4].
    """
    batch = tf.shape(gt_boxes)[0]
    anchors_b = tf.tile(anchors[None], tf.stack([batch, 1, 1]))
    iou = pairwise_iou(anchors_b, gt_boxes, valid2=gt_valid)
    matched, labels = matcher(iou)
    if batch_size_per_image is None:
        sampled = labels >= 0
    else:
        sample = sample_balanced(labels, batch_size_per_image, positive_fraction)
        sampled = sampled_mask(sample, tf.shape(labels)[1])
    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1)
    return {
        "match_labels": labels,
        "labels": tf.cast(labels >= 1, tf.float32),
        "sampled": sampled,
        "positive": sampled & (labels >= 1),
        "box_targets": coder.encode(matched_boxes, anchors_b),
        "matched_boxes": matched_boxes,
    }


def sample_rois(proposals: tf.Tensor, proposal_valid: tf.Tensor, gt_boxes: tf.Tensor,
                gt_classes: tf.Tensor, gt_valid: tf.Tensor, matcher: Matcher, coder: BoxCoder,
                batch_size_per_image: int | None, positive_fraction: float,
                static_foreground: bool = False) -> dict:
    """Adds the ground truth to the proposals, matches, samples a fixed number of RoIs.

    Args:
      proposals: [B, P, 4] (stop-gradient) with proposal_valid [B, P].
      gt_boxes: [B, M, 4]; gt_classes: [B, M] int32; gt_valid: [B, M] bool.
      batch_size_per_image: S; None: no sampling, every proposal and ground truth (S = P + M).
      static_foreground: the foreground slice ``fg`` has the static size F below instead of the
        batch's largest positive count.
    Returns:
      ``boxes`` [B, S, 4]; ``valid`` [B, S]; ``foreground`` [B, S]; ``classes`` [B, S] int32
      (0 background, or the matched class); ``box_targets`` [B, S, 4] deltas; ``matched`` [B, S]
      int32 ground-truth index; ``match_labels`` [B, P + M] the labels of all candidates before
      sampling (1 foreground, 0 background, -1 ignored or padding); and ``fg``: the first five
      keys for the first F rows, which hold every foreground RoI, for the mask head: F is the
      largest positive count of the batch (a dynamic size: the mask head runs on positives only,
      as in the references), or with ``static_foreground`` int(S * positive_fraction) (S
      without sampling). Rows of ``fg`` whose ``foreground`` is False are padding.
    """
    boxes = tf.concat([tf.stop_gradient(proposals), gt_boxes], axis=1)
    valid = tf.concat([proposal_valid, gt_valid], axis=1)
    iou = pairwise_iou(boxes, gt_boxes, valid1=valid, valid2=gt_valid)
    matched, labels = matcher(iou)
    labels = tf.where(valid, labels, -1)  # padding is never sampled
    sample = sample_balanced(labels, batch_size_per_image, positive_fraction)
    idx = sample["indices"]
    rois = tf.gather(boxes, idx, batch_dims=1)
    roi_matched = tf.gather(matched, idx, batch_dims=1)
    fg = sample["is_positive"]
    classes = tf.where(fg, tf.gather(gt_classes, roi_matched, batch_dims=1), 0)
    target_boxes = tf.gather(gt_boxes, roi_matched, batch_dims=1)
    out = {"boxes": rois, "valid": sample["valid"], "foreground": fg, "classes": classes,
           "matched": roi_matched}
    # The sampler puts positives first, so the foreground rows are a prefix.
    if not static_foreground:
        rows = tf.maximum(tf.reduce_max(sample["num_positive"]), 1)
    elif batch_size_per_image is None:
        rows = None
    else:
        rows = int(batch_size_per_image * positive_fraction)
    out["fg"] = {k: v[:, :rows] for k, v in out.items()}
    out["box_targets"] = coder.encode(target_boxes, rois)
    out["match_labels"] = labels
    return out


def mask_targets(gt_masks: tf.Tensor, gt_boxes: tf.Tensor, rois: tf.Tensor, matched: tf.Tensor,
                 content_sizes: tf.Tensor, size: int, mini_masks: bool, aligned: bool,
                 soft: bool, static: bool = False) -> tf.Tensor:
    """Mask targets of the foreground RoIs: the RoIAlign (adaptive sampling) of the matched
    ground-truth mask, soft (torchvision) or thresholded at 0.5 (detectron2).

    Args:
      gt_masks: [B, M, H, W] full-frame masks, or [B, M, m, m] mini-masks inside each gt box.
      gt_boxes: [B, M, 4]; rois: [B, R, 4]; matched: [B, R] gt index of each RoI.
      content_sizes: [B, 2] image content sizes in the full frame.
      size: target side (28).
      aligned: the recipe's RoIAlign convention (model.roi_align.aligned).
      static: static shapes (XLA; :func:`roi_align_masks_static`, the same numbers).
    Returns:
      [B, R, size, size] float32 in [0, 1] (soft) or {0, 1}.
    """
    rois = tf.stop_gradient(rois)
    if mini_masks:
        # Express each RoI in the frame of its ground truth's mini-mask.
        gt = tf.gather(gt_boxes, matched, batch_dims=1)
        m = tf.cast(tf.shape(gt_masks)[2], tf.float32)
        gy1, gx1, gy2, gx2 = tf.unstack(gt, 4, axis=-1)
        sy = m / tf.maximum(gy2 - gy1, 1e-6)
        sx = m / tf.maximum(gx2 - gx1, 1e-6)
        y1, x1, y2, x2 = tf.unstack(rois, 4, axis=-1)
        rois = tf.stack([(y1 - gy1) * sy, (x1 - gx1) * sx, (y2 - gy1) * sy, (x2 - gx1) * sx], -1)
        content_sizes = tf.tile(tf.shape(gt_masks)[None, 2:4], [tf.shape(gt_masks)[0], 1])
    crop = roi_align_masks_static if static else roi_align_masks
    targets = crop(gt_masks, rois, matched, content_sizes, size, aligned)
    return targets if soft else tf.cast(targets >= 0.5, tf.float32)


class TargetAssigner:
    """The training targets of a batch, with their settings (no config): anchor labels and
    samples, sampled RoIs, and mask targets. Built by the factory.

    Args:
      rpn_iou: (negative below, positive from) IoU thresholds of anchors; rpn_low_quality: the
        best anchor of each object is positive too; rpn_batch_size / rpn_positive_fraction:
        anchors sampled per image (None: all); rpn_coder: deltas of anchors.
      roi_iou, roi_batch_size, roi_positive_fraction, roi_coder: the same for RoIs;
        static_foreground: see :func:`sample_rois`.
      mini_masks: ground-truth masks are mini-masks inside their boxes; mask_aligned: the
        RoIAlign convention of the mask targets; soft_masks: keep them soft (torchvision);
        static_masks: compute them on static shapes (XLA).
    """

    def __init__(self, rpn_iou=(0.3, 0.7), rpn_low_quality=True, rpn_batch_size=256,
                 rpn_positive_fraction=0.5, rpn_coder_weights=(1.0, 1.0, 1.0, 1.0),
                 roi_iou=(0.5, 0.5), roi_batch_size=512, roi_positive_fraction=0.25,
                 roi_coder_weights=(10.0, 10.0, 5.0, 5.0), static_foreground=False,
                 mini_masks=False, mask_aligned=True, soft_masks=False, static_masks=False):
        self.config = {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in dict(locals()).items() if k != "self"}
        self.rpn_matcher = Matcher(rpn_iou, (0, -1, 1), rpn_low_quality)
        self.roi_matcher = Matcher(roi_iou, (0, -1, 1), allow_low_quality_matches=False)
        self.rpn_coder, self.roi_coder = BoxCoder(rpn_coder_weights), BoxCoder(roi_coder_weights)
        self.rpn_batch_size, self.rpn_positive_fraction = rpn_batch_size, rpn_positive_fraction
        self.roi_batch_size, self.roi_positive_fraction = roi_batch_size, roi_positive_fraction
        self.static_foreground = static_foreground
        self.mini_masks, self.mask_aligned, self.soft_masks = mini_masks, mask_aligned, soft_masks
        self.static_masks = static_masks

    def rpn(self, anchors, gt_boxes, gt_valid) -> dict:
        """:func:`rpn_targets` with these settings."""
        return rpn_targets(anchors, gt_boxes, gt_valid, self.rpn_matcher, self.rpn_coder,
                           self.rpn_batch_size, self.rpn_positive_fraction)

    def rois(self, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid) -> dict:
        """:func:`sample_rois` with these settings."""
        return sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
                           self.roi_matcher, self.roi_coder, self.roi_batch_size,
                           self.roi_positive_fraction, self.static_foreground)

    def masks(self, gt_masks, gt_boxes, rois, matched, content_sizes, size: int):
        """:func:`mask_targets` with these settings."""
        return mask_targets(gt_masks, gt_boxes, rois, matched, content_sizes, size,
                            self.mini_masks, self.mask_aligned, self.soft_masks,
                            self.static_masks)

    def get_config(self) -> dict:
        return dict(self.config)
