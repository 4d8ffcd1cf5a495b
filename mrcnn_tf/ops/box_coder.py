"""Box <-> delta encoding of Faster R-CNN (Girshick et al.), exactly as torchvision's BoxCoder.

Deltas are ordered ``(dy, dx, dh, dw)`` to match ``(y1, x1, y2, x2)`` boxes; torchvision orders
them ``(dx, dy, dw, dh)``, which only matters when converting its weights
(:mod:`mrcnn_tf.weights` does that in one place).
"""

from __future__ import annotations

import math

import tensorflow as tf

# torchvision/detectron2: never let exp(dh) grow a box more than 1000/16 times.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centers_and_sizes(boxes):
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    h = y2 - y1
    w = x2 - x1
    return y1 + 0.5 * h, x1 + 0.5 * w, h, w


class BoxCoder:
    """Encodes boxes as deltas relative to reference boxes (anchors or proposals) and back.

    ``encode``: dy = wy * (gy - ay) / ah, dx = wx * (gx - ax) / aw, dh = wh * log(gh / ah),
    dw = ww * log(gw / aw), with (ay, ax) centres and (ah, aw) sizes.
    ``decode`` inverts it, clamping dh/wh and dw/ww from above at ``scale_clamp``.

    Example: anchor [0, 0, 10, 10], box [1, 2, 11, 22], weights 1 -> deltas
    (0.1, 0.7, log 1, log 2) = (0.1, 0.7, 0, 0.6931).
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must be 4 values (wy, wx, wh, ww), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, boxes: tf.Tensor, anchors: tf.Tensor) -> tf.Tensor:
        """Deltas that turn ``anchors`` into ``boxes``.

        Args:
          boxes: [..., 4] targets; anchors: [..., 4] (broadcastable).
        Returns:
          [..., 4] float32 deltas (dy, dx, dh, dw). Degenerate (zero-size) boxes or anchors give
          finite deltas: sizes are floored at 1e-6 px, so padded rows never produce NaN or Inf.
        """
        boxes = tf.cast(boxes, tf.float32)
        anchors = tf.cast(anchors, tf.float32)
        wy, wx, wh, ww = self.weights
        gy, gx, gh, gw = _centers_and_sizes(boxes)
        ay, ax, ah, aw = _centers_and_sizes(anchors)
        eps = 1e-6
        ah = tf.maximum(ah, eps)
        aw = tf.maximum(aw, eps)
        dy = wy * (gy - ay) / ah
        dx = wx * (gx - ax) / aw
        dh = wh * tf.math.log(tf.maximum(gh, eps) / ah)
        dw = ww * tf.math.log(tf.maximum(gw, eps) / aw)
        return tf.stack([dy, dx, dh, dw], axis=-1)

    def decode(self, deltas: tf.Tensor, anchors: tf.Tensor) -> tf.Tensor:
        """Boxes from deltas, in float32 whatever the deltas' dtype.

        Args:
          deltas: [..., 4] (dy, dx, dh, dw); anchors: [..., 4] (broadcastable).
        Returns:
          [..., 4] float32 boxes (y1, x1, y2, x2).
        """
        deltas = tf.cast(deltas, tf.float32)
        anchors = tf.cast(anchors, tf.float32)
        wy, wx, wh, ww = self.weights
        ay, ax, ah, aw = _centers_and_sizes(anchors)
        dy, dx, dh, dw = tf.unstack(deltas, 4, axis=-1)
        dy = dy / wy
        dx = dx / wx
        dh = tf.minimum(dh / wh, self.scale_clamp)
        dw = tf.minimum(dw / ww, self.scale_clamp)
        cy = dy * ah + ay
        cx = dx * aw + ax
        h = tf.exp(dh) * ah
        w = tf.exp(dw) * aw
        return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)
