"""Box geometry. Boxes are ``(y1, x1, y2, x2)`` float32 pixels unless a name says otherwise.

Widths are ``x2 - x1`` (no +1), as in torchvision and detectron2.
"""

from __future__ import annotations

import tensorflow as tf


def area(boxes: tf.Tensor) -> tf.Tensor:
    """Box areas.

    Args:
      boxes: [..., 4] (y1, x1, y2, x2).
    Returns:
      [...] float32 ``(y2 - y1) * (x2 - x1)``; degenerate boxes give 0, never a negative area.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    return tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)


def pairwise_iou(boxes1: tf.Tensor, boxes2: tf.Tensor, valid1: tf.Tensor | None = None,
                 valid2: tf.Tensor | None = None) -> tf.Tensor:
    """Intersection over union of every pair, batched.

    Args:
      boxes1: [B, N, 4]; boxes2: [B, M, 4].
      valid1: optional [B, N] bool, False for padded rows; valid2: optional [B, M] bool.
    Returns:
      [B, N, M] float32 IoU in [0, 1]; -1 where either box is padding, so a padded ground truth
      never matches and a padded proposal is never foreground. Two empty boxes give 0, not NaN.

    Example: [0, 0, 10, 10] against [0, 5, 10, 15] -> 50 / 150 = 1/3.
    """
    b1 = tf.convert_to_tensor(boxes1, tf.float32)[:, :, None, :]
    b2 = tf.convert_to_tensor(boxes2, tf.float32)[:, None, :, :]
    y1 = tf.maximum(b1[..., 0], b2[..., 0])
    x1 = tf.maximum(b1[..., 1], b2[..., 1])
    y2 = tf.minimum(b1[..., 2], b2[..., 2])
    x2 = tf.minimum(b1[..., 3], b2[..., 3])
    inter = tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)
    union = area(b1) + area(b2) - inter
    iou = tf.math.divide_no_nan(inter, union)
    if valid1 is not None or valid2 is not None:
        shape = tf.shape(iou)
        v1 = tf.ones(shape[:2], tf.bool) if valid1 is None else tf.cast(valid1, tf.bool)
        v2 = tf.ones(tf.stack([shape[0], shape[2]]), tf.bool) if valid2 is None else tf.cast(
            valid2, tf.bool)
        iou = tf.where(v1[:, :, None] & v2[:, None, :], iou, -1.0)
    return iou


def clip_boxes(boxes: tf.Tensor, height, width) -> tf.Tensor:
    """Clips boxes to ``[0, height] x [0, width]``.

    Args:
      boxes: [B, N, 4] (or [N, 4] with scalar height and width).
      height, width: scalars, or [B] per-image sizes.
    Returns:
      the clipped boxes, same shape.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    if h.shape.rank == 1:  # one size per image: broadcast over [B, N]
        h = h[:, None]
        w = w[:, None]
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    y1 = tf.clip_by_value(y1, 0.0, h)
    y2 = tf.clip_by_value(y2, 0.0, h)
    x1 = tf.clip_by_value(x1, 0.0, w)
    x2 = tf.clip_by_value(x2, 0.0, w)
    return tf.stack([y1, x1, y2, x2], axis=-1)


def yxyx_to_xywh(boxes: tf.Tensor) -> tf.Tensor:
    """(y1, x1, y2, x2) -> COCO [x, y, w, h]. Shapes [..., 4]."""
    y1, x1, y2, x2 = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), 4, axis=-1)
    return tf.stack([x1, y1, x2 - x1, y2 - y1], axis=-1)


def xywh_to_yxyx(boxes: tf.Tensor) -> tf.Tensor:
    """COCO [x, y, w, h] -> (y1, x1, y2, x2). Shapes [..., 4]."""
    x, y, w, h = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), 4, axis=-1)
    return tf.stack([y, x, y + h, x + w], axis=-1)


def box_sizes(boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(heights, widths), each [...]."""
    y1, x1, y2, x2 = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), 4, axis=-1)
    return y2 - y1, x2 - x1
