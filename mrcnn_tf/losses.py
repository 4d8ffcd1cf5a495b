"""Mask R-CNN losses: pure, padding-aware functions in float32.

Normalisation follows torchvision: RPN losses are sums over the batch's sampled anchors divided by
their number (or, as detectron2 divides them, by the number of anchors the sampler was asked for:
``rpn_requested``); box-head losses are sums over the sampled RoIs divided by their number; the mask
loss is the mean over foreground RoIs and pixels. ``normalizer`` counts are all-reduced across
replicas under a ``tf.distribute`` strategy, so the gradients summed over replicas equal the
single-device ones for the same global batch. An image without objects gives exactly zero box and
mask losses.
"""

from __future__ import annotations

import tensorflow as tf

from mrcnn_tf.ops.box_coder import BoxCoder


def global_sum(x: tf.Tensor) -> tf.Tensor:
    """Sum of ``x`` over all replicas (identity outside a multi-replica context)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _normalizer(mask) -> tf.Tensor:
    return tf.maximum(global_sum(tf.reduce_sum(tf.cast(mask, tf.float32))), 1.0)


def clip_by_global_norm(grads, clip_norm: float, loss_scale=1.0):
    """Gradients scaled so that the norm of the gradient summed over replicas is at most
    ``clip_norm``: every replica scales its share by the same factor (Keras' ``global_clipnorm``
    clips each replica's share before they are summed). ``loss_scale``: the dynamic loss scale
    the gradients still carry (mixed_float16)."""
    norm = tf.sqrt(tf.add_n([global_sum(tf.reduce_sum(tf.square(tf.cast(g, tf.float32))))
                             for g in grads if g is not None])) / loss_scale
    factor = tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-12))
    return [g * tf.cast(factor, g.dtype) if g is not None else g for g in grads]


def smooth_l1(diff: tf.Tensor, beta: float) -> tf.Tensor:
    """Elementwise smooth L1 (Huber / beta): 0.5 d^2 / beta if |d| < beta else |d| - beta / 2.

    beta = 0 is plain L1.
    """
    d = tf.abs(diff)
    if beta <= 0:
        return d
    return tf.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def giou(boxes1: tf.Tensor, boxes2: tf.Tensor) -> tf.Tensor:
    """Generalised IoU of matching rows, [..., 4] (y1, x1, y2, x2) -> [...] in [-1, 1]."""
    a1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    a2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    ih = tf.maximum(tf.minimum(boxes1[..., 2], boxes2[..., 2])
                    - tf.maximum(boxes1[..., 0], boxes2[..., 0]), 0.0)
    iw = tf.maximum(tf.minimum(boxes1[..., 3], boxes2[..., 3])
                    - tf.maximum(boxes1[..., 1], boxes2[..., 1]), 0.0)
    inter = ih * iw
    union = a1 + a2 - inter
    iou = tf.math.divide_no_nan(inter, union)
    ch = tf.maximum(boxes1[..., 2], boxes2[..., 2]) - tf.minimum(boxes1[..., 0], boxes2[..., 0])
    cw = tf.maximum(boxes1[..., 3], boxes2[..., 3]) - tf.minimum(boxes1[..., 1], boxes2[..., 1])
    hull = ch * cw
    return iou - tf.math.divide_no_nan(hull - union, hull)


def focal_loss(logits: tf.Tensor, labels: tf.Tensor, alpha: float, gamma: float) -> tf.Tensor:
    """Elementwise sigmoid focal loss (Lin et al., 2017)."""
    p = tf.sigmoid(logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = alpha * labels + (1 - alpha) * (1 - labels)
    return alpha_t * (1 - p_t) ** gamma * ce


def rpn_normalizer(sampled: tf.Tensor, requested: int | None = None) -> tf.Tensor:
    """What both RPN losses are divided by: the number of sampled anchors in the global batch
    (torchvision), or with ``requested`` (anchors asked of the sampler per image) that many
    times the global number of images (detectron2's ``batch_size_per_image * num_images``).
    sampled: [B, N] bool."""
    if requested is None:
        return _normalizer(sampled)
    images = tf.cast(tf.shape(sampled)[0], tf.float32)
    return tf.maximum(global_sum(images * float(requested)), 1.0)


def rpn_objectness_loss(logits: tf.Tensor, labels: tf.Tensor, sampled: tf.Tensor,
                        kind: str = "bce", alpha: float = 0.25, gamma: float = 2.0,
                        normalizer: tf.Tensor | None = None) -> tf.Tensor:
    """RPN objectness over the sampled anchors.

    Args:
      logits: [B, N] sigmoid logits or [B, N, 2] softmax logits.
      labels: [B, N] float 1/0; sampled: [B, N] bool.
      kind: "bce" (log loss) or "focal".
      normalizer: what the sum is divided by (default: the sampled count, global).
    Returns: scalar.
    """
    logits = tf.cast(logits, tf.float32)
    if logits.shape.rank == 3:
        per = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=logits)
    elif kind == "focal":
        per = focal_loss(logits, labels, alpha, gamma)
    else:
        per = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    w = tf.cast(sampled, tf.float32)
    return tf.reduce_sum(per * w) / (_normalizer(sampled) if normalizer is None else normalizer)


def rpn_box_loss(deltas: tf.Tensor, targets: tf.Tensor, positive: tf.Tensor, sampled: tf.Tensor,
                 kind: str = "smooth_l1", beta: float = 1.0 / 9.0,
                 coord_weights=(1.0, 1.0, 1.0, 1.0), anchors: tf.Tensor | None = None,
                 matched_boxes: tf.Tensor | None = None,
                 coder: BoxCoder | None = None, normalizer: tf.Tensor | None = None) -> tf.Tensor:
    """RPN box regression on the sampled positives, normalised by the sampled count.

    Args:
      deltas, targets: [B, N, 4]; positive, sampled: [B, N] bool.
      kind: "smooth_l1", "weighted_smooth_l1" (per-coordinate ``coord_weights``) or "giou"
        (needs ``anchors`` [N, 4], ``matched_boxes`` [B, N, 4] and ``coder``).
      normalizer: what the sum is divided by (default: the sampled count, global).
    Returns: scalar.
    """
    deltas = tf.cast(deltas, tf.float32)
    w = tf.cast(positive, tf.float32)
    if kind == "giou":
        pred = coder.decode(deltas, anchors[None])
        per = 1.0 - giou(pred, matched_boxes)
    else:
        per = smooth_l1(deltas - targets, beta)
        if kind == "weighted_smooth_l1":
            per = per * tf.constant(coord_weights, tf.float32)
        per = tf.reduce_sum(per, axis=-1)
    return tf.reduce_sum(per * w) / (_normalizer(sampled) if normalizer is None else normalizer)


def box_class_loss(logits: tf.Tensor, classes: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy over the sampled RoIs. logits [B, S, C+1]; classes, valid [B, S]."""
    per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=classes,
                                                         logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(per * tf.cast(valid, tf.float32)) / _normalizer(valid)


def box_reg_loss(deltas: tf.Tensor, targets: tf.Tensor, classes: tf.Tensor,
                 foreground: tf.Tensor, valid: tf.Tensor, beta: float = 1.0) -> tf.Tensor:
    """Smooth L1 of the true class's deltas on foreground RoIs, over the sampled count.

    Args:
      deltas: [B, S, K, 4] (K = C + 1 class-specific, or 1 agnostic); targets [B, S, 4];
      classes: [B, S] int32; foreground, valid: [B, S] bool.
    """
    deltas = tf.cast(deltas, tf.float32)
    if deltas.shape[2] == 1:
        picked = deltas[:, :, 0]
    else:
        picked = tf.gather(deltas, classes[..., None], batch_dims=2)[:, :, 0]
    per = tf.reduce_sum(smooth_l1(picked - targets, beta), axis=-1)
    return tf.reduce_sum(per * tf.cast(foreground, tf.float32)) / _normalizer(valid)


def mask_loss(logits: tf.Tensor, targets: tf.Tensor, classes: tf.Tensor, foreground: tf.Tensor,
              kind: str = "bce") -> tf.Tensor:
    """Mask loss of the true class's map on foreground RoIs (no competition between classes).

    Args:
      logits: [B, F, 28, 28, K] (K = C + 1 maps, or 1 class-agnostic).
      targets: [B, F, 28, 28] in {0, 1}; classes: [B, F] int32; foreground: [B, F] bool.
      kind: "bce" (per-pixel sigmoid cross-entropy, mean over pixels) or "dice" (1 - soft Dice
        per RoI).
    Returns: scalar, 0 when there is no foreground RoI.
    """
    logits = tf.cast(logits, tf.float32)
    if logits.shape[-1] == 1:
        picked = logits[..., 0]
    else:
        picked = tf.gather(tf.transpose(logits, [0, 1, 4, 2, 3]), classes[..., None],
                           batch_dims=2)[:, :, 0]
    fg = tf.cast(foreground, tf.float32)
    if kind == "dice":
        p = tf.sigmoid(picked)
        inter = tf.reduce_sum(p * targets, axis=[2, 3])
        denom = tf.reduce_sum(p, axis=[2, 3]) + tf.reduce_sum(targets, axis=[2, 3])
        per = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
        return tf.reduce_sum(per * fg) / _normalizer(foreground)
    per = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=picked),
                         axis=[2, 3])
    return tf.reduce_sum(per * fg) / _normalizer(foreground)


class Losses:
    """The five Mask R-CNN losses of a batch with their kinds and weights (no config). Built by
    the factory; ``losses(...)`` -> {loss_rpn_objectness, loss_rpn_box, loss_box_class,
    loss_box_reg, loss_mask}, each weighted.

    Args:
      rpn_objectness: "bce" or "focal" (``focal_alpha``, ``focal_gamma``); rpn_box:
        "smooth_l1", "weighted_smooth_l1" (``rpn_box_weights``) or "giou"; rpn_beta: its smooth
        L1 transition; rpn_requested: divide both RPN losses by this many anchors per image
        (detectron2) instead of the number sampled (None, torchvision); box_beta: the RoI box
        loss's; mask: "bce" or "dice"; weights: {loss key: weight}.
    """

    def __init__(self, rpn_objectness="bce", focal_alpha=0.25, focal_gamma=2.0,
                 rpn_box="smooth_l1", rpn_beta=1.0 / 9.0, rpn_box_weights=(1.0, 1.0, 1.0, 1.0),
                 rpn_requested=None, box_beta=0.0, mask="bce", weights=None):
        self.rpn_objectness, self.focal_alpha, self.focal_gamma = (rpn_objectness, focal_alpha,
                                                                   focal_gamma)
        self.rpn_box, self.rpn_beta = rpn_box, rpn_beta
        self.rpn_box_weights = tuple(rpn_box_weights)
        self.rpn_requested = rpn_requested
        self.box_beta, self.mask = box_beta, mask
        self.weights = dict(weights or {})

    def __call__(self, rpn: dict, rpn_targets: dict, anchors, rpn_coder, box: dict, rois: dict,
                 mask_logits, mask_targets) -> dict:
        """rpn: the RPN head's ``objectness`` [B, N(, 2)] and ``deltas`` [B, N, 4] over all
        levels; rpn_targets: :meth:`TargetAssigner.rpn`; anchors: [N, 4]; box: the box head's
        outputs on ``rois`` (:meth:`TargetAssigner.rois`); mask_logits and mask_targets of the
        RoIs of ``rois["fg"]``."""
        fg = rois["fg"]
        rpn_norm = rpn_normalizer(rpn_targets["sampled"], self.rpn_requested)
        losses = {
            "loss_rpn_objectness": rpn_objectness_loss(
                rpn["objectness"], rpn_targets["labels"], rpn_targets["sampled"],
                self.rpn_objectness, self.focal_alpha, self.focal_gamma, rpn_norm),
            "loss_rpn_box": rpn_box_loss(
                rpn["deltas"], rpn_targets["box_targets"], rpn_targets["positive"],
                rpn_targets["sampled"], self.rpn_box, self.rpn_beta, self.rpn_box_weights,
                anchors, rpn_targets["matched_boxes"], rpn_coder, rpn_norm),
            "loss_box_class": box_class_loss(box["class_logits"], rois["classes"],
                                             rois["valid"]),
            "loss_box_reg": box_reg_loss(box["box_deltas"], rois["box_targets"],
                                         rois["classes"], rois["foreground"], rois["valid"],
                                         self.box_beta),
            "loss_mask": mask_loss(mask_logits, mask_targets, fg["classes"], fg["foreground"],
                                   self.mask),
        }
        return {k: self.weights.get(k, 1.0) * v for k, v in losses.items()}

    def get_config(self) -> dict:
        return {"rpn_objectness": self.rpn_objectness, "focal_alpha": self.focal_alpha,
                "focal_gamma": self.focal_gamma, "rpn_box": self.rpn_box,
                "rpn_beta": self.rpn_beta, "rpn_box_weights": list(self.rpn_box_weights),
                "rpn_requested": self.rpn_requested,
                "box_beta": self.box_beta, "mask": self.mask, "weights": dict(self.weights)}
