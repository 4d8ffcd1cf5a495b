"""Proposal generation from RPN outputs: decode, clip, filter, NMS, top-k. No weights."""

from __future__ import annotations

import keras
import tensorflow as tf

from mrcnn_tf.ops.box_coder import BoxCoder
from mrcnn_tf.ops.boxes import box_sizes, clip_boxes
from mrcnn_tf.ops.nms import proposal_nms_stacked, stack_levels


def objectness_logits(logits: tf.Tensor) -> tf.Tensor:
    """Foreground logit from [B, N] sigmoid logits or [B, N, 2] softmax logits -> [B, N]
    (for two-way softmax, fg - bg: its sigmoid is the softmax foreground probability)."""
    logits = tf.cast(logits, tf.float32)
    if logits.shape.rank == 3:
        return logits[..., 1] - logits[..., 0]
    return logits


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class ProposalGenerator(keras.layers.Layer):
    """Turns RPN outputs into a fixed number of proposals per image (torchvision's order).

    Per level: top ``pre_nms_topk`` anchors by objectness logit, decode their deltas, clip to the
    image, drop boxes smaller than ``min_box_size`` (with 0: empty boxes, detectron2's rule) and
    probabilities below ``score_threshold``;
    then NMS per level (or across levels) and the top ``post_nms_topk`` by probability. After
    the per-level top-k, the levels run stacked as one [B, L, K] batch (K the largest top-k,
    shorter levels padded with invalid rows): the graph's size does not grow with the levels.

    Inputs (call): objectness: list of [B, N_l] or [B, N_l, 2]; deltas: list of [B, N_l, 4];
    anchors: list of [N_l, 4]; image_sizes: [B, 2] (height, width) of each image's content in the
    padded frame.
    Output: {"boxes": [B, P, 4], "scores": [B, P] probabilities, "valid": [B, P] bool}, P the
    training or test ``post_nms_topk``. Invalid rows are zero boxes. No gradient flows through.
    """

    def __init__(self, pre_nms_topk_train=2000, post_nms_topk_train=1000, pre_nms_topk_test=1000,
                 post_nms_topk_test=1000, nms_threshold=0.7, nms_per_level=True,
                 min_box_size=1e-3, score_threshold=0.0, box_coder_weights=(1.0, 1.0, 1.0, 1.0),
                 nms_impl="tf", **kwargs):
        # Boxes and sizes must not be cast to a mixed-precision compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.pre_nms_topk_train, self.post_nms_topk_train = pre_nms_topk_train, post_nms_topk_train
        self.pre_nms_topk_test, self.post_nms_topk_test = pre_nms_topk_test, post_nms_topk_test
        self.nms_threshold, self.nms_per_level = float(nms_threshold), bool(nms_per_level)
        self.min_box_size, self.score_threshold = float(min_box_size), float(score_threshold)
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)
        self.coder = BoxCoder(self.box_coder_weights)
        self.nms_impl = nms_impl

    def call(self, objectness, deltas, anchors, image_sizes, training=None):
        pre = self.pre_nms_topk_train if training else self.pre_nms_topk_test
        post = self.post_nms_topk_train if training else self.post_nms_topk_test
        image_sizes = tf.cast(image_sizes, tf.float32)
        logits_l, deltas_l, anchors_l = [], [], []
        for logits, dl, anc in zip(objectness, deltas, anchors):
            # Rank by logit as torchvision does: probabilities saturate to 1.0 and tie.
            fg_logits = tf.stop_gradient(objectness_logits(logits))
            n = fg_logits.shape[1]  # static when the input size is (a static k: static NMS)
            k = min(pre, n) if n is not None else tf.minimum(pre, tf.shape(fg_logits)[1])
            top = tf.math.top_k(fg_logits, k=k, sorted=True)
            logits_l.append(top.values)
            deltas_l.append(tf.gather(tf.stop_gradient(tf.cast(dl, tf.float32)), top.indices,
                                      batch_dims=1))
            anchors_l.append(tf.gather(tf.cast(anc, tf.float32), top.indices))
        # The levels' top-k stacked and padded to one length K: decode, clip, filter and NMS
        # run once for all levels ([B, L, K]), not once per level.
        sizes = [t.shape[1] for t in logits_l]
        rows = max(sizes) if None not in sizes else pre
        levels = len(logits_l)
        real = stack_levels([tf.ones_like(t, tf.bool) for t in logits_l], rows, False)
        probs = tf.sigmoid(stack_levels(logits_l, rows))  # [B, L, K]
        flat_deltas = tf.reshape(stack_levels(deltas_l, rows), [-1, levels * rows, 4])
        flat_anchors = tf.reshape(stack_levels(anchors_l, rows), [-1, levels * rows, 4])
        boxes = clip_boxes(self.coder.decode(flat_deltas, flat_anchors), image_sizes[:, 0],
                           image_sizes[:, 1])
        h, w = box_sizes(boxes)
        if self.min_box_size > 0:  # torchvision's remove_small_boxes
            big = (h >= self.min_box_size) & (w >= self.min_box_size)
        else:  # detectron2's Boxes.nonempty(threshold=0)
            big = (h > 0.0) & (w > 0.0)
        valid = real & tf.reshape(big, [-1, levels, rows]) & (probs >= self.score_threshold)
        out = proposal_nms_stacked(tf.reshape(boxes, [-1, levels, rows, 4]), probs, valid, post,
                                   self.nms_threshold, per_level=self.nms_per_level,
                                   impl=self.nms_impl)
        return {"boxes": out["boxes"],
                "scores": tf.where(out["valid"], out["scores"], 0.0),
                "valid": out["valid"]}

    def compute_output_shape(self, input_shape):
        """Shapes at test time (training uses post_nms_topk_train rows). ``input_shape``: the
        shape of ``objectness`` (Keras passes the first argument's), a list per level."""
        first = input_shape[0]
        b, p = first[0], self.post_nms_topk_test
        return {"boxes": (b, p, 4), "scores": (b, p), "valid": (b, p)}

    def get_config(self):
        return {**super().get_config(), "pre_nms_topk_train": self.pre_nms_topk_train,
                "post_nms_topk_train": self.post_nms_topk_train,
                "pre_nms_topk_test": self.pre_nms_topk_test,
                "post_nms_topk_test": self.post_nms_topk_test,
                "nms_threshold": self.nms_threshold, "nms_per_level": self.nms_per_level,
                "min_box_size": self.min_box_size, "score_threshold": self.score_threshold,
                "box_coder_weights": list(self.box_coder_weights), "nms_impl": self.nms_impl}
