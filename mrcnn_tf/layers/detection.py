"""Detection generator: class scores and deltas of the final RoIs -> per-class NMS detections."""

from __future__ import annotations

import keras
import tensorflow as tf

from mrcnn_tf.ops.box_coder import BoxCoder
from mrcnn_tf.ops.boxes import box_sizes, clip_boxes
from mrcnn_tf.ops.nms import multiclass_nms


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class DetectionGenerator(keras.layers.Layer):
    """Softmax scores, per-class decode and clip, size filter, per-class NMS, top-D (no weights).

    As torchvision's ``postprocess_detections``: background dropped, boxes narrower or shorter
    than ``min_box_size`` dropped, candidates with score > ``score_threshold`` kept, NMS within
    each class, the best ``max_detections`` kept.

    Inputs (call): class_logits [B, R, C + 1]; box_deltas [B, R, C + 1 or 1, 4]; proposals
    [B, R, 4]; valid [B, R] bool; image_sizes [B, 2] (content size in the padded frame).
    Output: {"detection_boxes": [B, D, 4], "detection_scores": [B, D], "detection_classes":
    [B, D] int32 in 1..C, "num_detections": [B] int32}; rows past num_detections are zero.
    """

    def __init__(self, score_threshold=0.05, nms_threshold=0.5, max_detections=100,
                 min_box_size=1e-2, box_coder_weights=(10.0, 10.0, 5.0, 5.0), nms_impl="tf",
                 **kwargs):
        # Boxes and sizes must not be cast to a mixed-precision compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.score_threshold, self.nms_threshold = float(score_threshold), float(nms_threshold)
        self.max_detections, self.min_box_size = int(max_detections), float(min_box_size)
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)
        self.coder = BoxCoder(self.box_coder_weights)
        self.nms_impl = nms_impl

    def call(self, class_logits, box_deltas, proposals, valid, image_sizes):
        scores = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[..., 1:]
        boxes = self.coder.decode(box_deltas, tf.cast(proposals, tf.float32)[:, :, None, :])
        image_sizes = tf.cast(image_sizes, tf.float32)
        boxes = clip_boxes(tf.reshape(boxes, tf.stack([tf.shape(boxes)[0], -1, 4])),
                           image_sizes[:, 0], image_sizes[:, 1])
        boxes = tf.reshape(boxes, tf.shape(box_deltas))
        if box_deltas.shape[2] != 1:
            boxes = boxes[:, :, 1:, :]  # drop the background column
        h, w = box_sizes(boxes)
        keep = (h >= self.min_box_size) & (w >= self.min_box_size) & valid[:, :, None]
        keep = tf.broadcast_to(keep, tf.shape(scores))
        out = multiclass_nms(boxes, scores, self.max_detections, self.nms_threshold,
                             self.score_threshold, valid=keep, impl=self.nms_impl)
        num = out["num_detections"]
        real = tf.range(self.max_detections)[None, :] < num[:, None]
        out["detection_classes"] = tf.where(real, out["detection_classes"] + 1, 0)
        return out

    def compute_output_shape(self, input_shape):
        """``input_shape``: the shape of ``class_logits`` (Keras passes the first argument's)."""
        b = input_shape[0]
        d = self.max_detections
        return {"detection_boxes": (b, d, 4), "detection_scores": (b, d),
                "detection_classes": (b, d), "num_detections": (b,)}

    def get_config(self):
        return {**super().get_config(), "score_threshold": self.score_threshold,
                "nms_threshold": self.nms_threshold, "max_detections": self.max_detections,
                "min_box_size": self.min_box_size,
                "box_coder_weights": list(self.box_coder_weights), "nms_impl": self.nms_impl}
