"""Matching of predictions (anchors or proposals) to ground truth by IoU (detectron2's Matcher).

Worked example, thresholds (0.3, 0.7), labels (0, -1, 1), allow_low_quality_matches=True, one
ground truth and three anchors with IoU [0.8, 0.5, 0.1]:
  0.8 >= 0.7 -> 1 (positive); 0.3 <= 0.5 < 0.7 -> -1 (ignored); 0.1 < 0.3 -> 0 (negative).
With IoU [0.6, 0.5, 0.1] no anchor reaches 0.7, but anchor 0 is the ground truth's best, so the
low-quality rule makes it positive: labels [1, -1, 0].
"""

from __future__ import annotations

import tensorflow as tf


class Matcher:
    """Assigns each row (anchor/proposal) the ground truth it overlaps most, and a label.

    Args:
      thresholds: increasing IoU thresholds t_1 < ... < t_k.
      labels: k + 1 labels, for IoU in [-inf, t_1), [t_1, t_2), ..., [t_k, inf). Typical values
        are 0 (negative), -1 (ignore), 1 (positive).
      allow_low_quality_matches: also label positive (labels[-1]) every row whose IoU with some
        ground truth equals that ground truth's highest IoU (ties included), as torchvision and
        detectron2 do, so every instance gets at least one positive. Unlike both references, a
        ground truth that overlaps nothing (highest IoU 0) promotes nothing.
    """

    def __init__(self, thresholds, labels, allow_low_quality_matches: bool = False):
        thresholds = [float(t) for t in thresholds]
        if sorted(thresholds) != thresholds:
            raise ValueError(f"Matcher thresholds must increase, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"Matcher needs len(thresholds) + 1 labels, got {labels} for "
                             f"{thresholds}")
        self.thresholds = thresholds
        self.labels = [int(v) for v in labels]
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Matches rows to columns.

        Args:
          iou: [B, N, M] float32 from :func:`pairwise_iou`, -1 for padded pairs.
        Returns:
          matched_indices: [B, N] int32 in [0, M) (0 where nothing matches: look at the label);
          match_labels: [B, N] int32 from ``labels``. Rows with no valid ground truth get labels[0].
        """
        iou = tf.convert_to_tensor(iou, tf.float32)
        if iou.shape[2] == 0:  # no ground-truth rows at all: one padded column keeps ops defined
            iou = tf.fill(tf.concat([tf.shape(iou)[:2], [1]], 0), -1.0)
        max_iou = tf.reduce_max(iou, axis=2)
        matched = tf.argmax(iou, axis=2, output_type=tf.int32)
        labels = tf.fill(tf.shape(max_iou), self.labels[0])
        for t, lab in zip(self.thresholds, self.labels[1:]):
            labels = tf.where(max_iou >= t, lab, labels)
        if self.allow_low_quality_matches:
            best_per_gt = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, M]
            is_best = (iou == best_per_gt) & (best_per_gt > 0.0)
            labels = tf.where(tf.reduce_any(is_best, axis=2), self.labels[-1], labels)
        return matched, labels
