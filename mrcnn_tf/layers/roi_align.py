"""Keras layer over the multilevel RoIAlign op."""

from __future__ import annotations

import keras

from mrcnn_tf.ops.roi_align import multilevel_roi_align


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class MultilevelRoIAlign(keras.layers.Layer):
    """Pools each RoI from the FPN level its size selects (no weights).

    Inputs (call): features {"p2": [B, H/4, W/4, C], ..., "p5": ...}; boxes [B, N, 4]
    (y1, x1, y2, x2) image pixels. Output: [B, N, output_size, output_size, C].

    Args:
      output_size: 7 (references) or 14 (the design notes) for the box head, 14 for the mask head.
      sampling_ratio: samples per bin side, or a list with one per level (min..max).
      aligned: half-pixel shift (detectron2) or not (torchvision).
      impl: "crop_and_resize" or "gather" (see ``multilevel_roi_align``).
    """

    def __init__(self, output_size: int = 7, sampling_ratio=2, aligned: bool = True,
                 min_level: int = 2, max_level: int = 5, canonical_size: float = 224.0,
                 canonical_level: int = 4, impl: str = "crop_and_resize", **kwargs):
        # Boxes and sizes must not be cast to a mixed-precision compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.output_size = int(output_size)
        self.sampling_ratio = (list(sampling_ratio) if isinstance(sampling_ratio, (list, tuple))
                               else int(sampling_ratio))
        self.aligned, self.min_level, self.max_level = bool(aligned), min_level, max_level
        self.canonical_size, self.canonical_level = float(canonical_size), canonical_level
        self.impl = impl

    def call(self, features, boxes):
        by_level = {lv: features[f"p{lv}"] for lv in range(self.min_level, self.max_level + 1)}
        return multilevel_roi_align(by_level, boxes, self.output_size, self.sampling_ratio,
                                    self.aligned, self.min_level, self.max_level,
                                    self.canonical_size, self.canonical_level, self.impl)

    def build(self, features_shape, boxes_shape):
        # No weights. Named per call argument so that Keras records both shapes, and
        # summary() can call compute_output_shape with them.
        self.built = True

    def compute_output_shape(self, features_shape, boxes_shape):
        c = features_shape[f"p{self.min_level}"][-1]
        return (boxes_shape[0], boxes_shape[1], self.output_size, self.output_size, c)

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size,
                "sampling_ratio": self.sampling_ratio, "aligned": self.aligned,
                "min_level": self.min_level, "max_level": self.max_level,
                "canonical_size": self.canonical_size, "canonical_level": self.canonical_level,
                "impl": self.impl}
