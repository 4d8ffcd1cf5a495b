"""The Mask R-CNN model: one thin keras.Model composing the layers built by the factory."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mrcnn_tf.config import Config, config_from_dict, to_dict
from mrcnn_tf.factory import build_layers
from mrcnn_tf.ops.anchors import multilevel_anchors

DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "detection_masks",
                  "num_detections")


def _unpack(inputs):
    if isinstance(inputs, dict):
        unknown = set(inputs) - {"images", "image_sizes"}
        if unknown:
            raise ValueError(f"MaskRCNN inputs: unknown keys {sorted(unknown)}; expected "
                             "'images' and optionally 'image_sizes'")
        return inputs["images"], inputs.get("image_sizes")
    return inputs, None


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class MaskRCNN(keras.Model):
    """Mask R-CNN (He et al., 2017) with a ResNet-FPN backbone.

    ``model(images)`` takes [B, H, W, C] uint8 or float images in 0..255 of any size (or a dict
    ``{"images": ..., "image_sizes": [B, 2]}`` for a zero-padded batch of images of different
    sizes) and returns::

        detection_boxes   [B, D, 4] float32 (y1, x1, y2, x2) pixels of the images as given
        detection_scores  [B, D] float32
        detection_classes [B, D] int32 in 1..num_classes
        detection_masks   [B, D, 28, 28] float32 probabilities inside each box
        num_detections    [B] int32; rows past it are zero

    ``mrcnn_tf.paste_masks`` turns the masks into full-size binary masks.
    The parts are handles for fine-tuning: ``backbone``, ``fpn``, ``rpn_head``, ``box_head``,
    ``mask_head`` (e.g. ``model.backbone.trainable = False``).
    """

    def __init__(self, config: Config | dict, **kwargs):
        super().__init__(**kwargs)
        self.cfg = config if isinstance(config, Config) else config_from_dict(config)
        for name, layer in build_layers(self.cfg.model).items():
            setattr(self, name, layer)

    # -- the algorithm, one screen -----------------------------------------------------------

    def call(self, inputs, training=False):
        images, image_sizes = _unpack(inputs)
        original_sizes = self._original_sizes(images, image_sizes)
        pre = self.preprocessor(images, original_sizes)
        features = self.fpn(self.backbone(pre["images"], training=training), training=training)
        rpn = self.rpn_head(features, training=training)
        anchors = self.anchors(features, tf.shape(pre["images"])[1:3])
        proposals = self.proposal_generator(rpn["objectness"], rpn["deltas"], anchors,
                                            pre["image_sizes"], training=training)
        box = self.box_head(self.box_roi_align(features, proposals["boxes"]), training=training)
        detections = self.detection_generator(box["class_logits"], box["box_deltas"],
                                              proposals["boxes"], proposals["valid"],
                                              pre["image_sizes"])
        detections["detection_masks"] = self.predict_masks(features, detections, training)
        return self.postprocess(detections, pre["scales"], original_sizes)

    # -- pieces --------------------------------------------------------------------------------

    @staticmethod
    def _original_sizes(images, image_sizes):
        if image_sizes is not None:
            return tf.cast(image_sizes, tf.int32)
        shape = tf.shape(images)
        return tf.tile(shape[None, 1:3], [shape[0], 1])

    def anchors(self, features, image_size):
        """Anchors per RPN level, [H_l * W_l * A, 4] each, for the padded input size."""
        a = self.cfg.model.anchors
        levels = self.rpn_head.levels
        grids = {lv: (tf.shape(features[f"p{lv}"])[1], tf.shape(features[f"p{lv}"])[2])
                 for lv in levels}
        by_level = multilevel_anchors((image_size[0], image_size[1]), grids, a.sizes,
                                      a.aspect_ratios, a.scales, a.offset, a.round_to_int)
        return [by_level[lv] for lv in levels]

    def predict_masks(self, features, detections, training=False):
        """Mask probabilities [B, D, 28, 28] for each detection's class."""
        logits = self.mask_head(self.mask_roi_align(features, detections["detection_boxes"]),
                                training=training)
        if logits.shape[-1] == 1:
            picked = logits[..., 0]
        else:
            classes = tf.cast(detections["detection_classes"], tf.int32)
            picked = tf.gather(tf.transpose(logits, [0, 1, 4, 2, 3]), classes[..., None],
                               batch_dims=2)[:, :, 0]
        real = tf.range(tf.shape(picked)[1])[None, :] < detections["num_detections"][:, None]
        return tf.where(real[..., None, None], tf.sigmoid(tf.cast(picked, tf.float32)), 0.0)

    @staticmethod
    def postprocess(detections, scales, original_sizes):
        """Maps boxes from the resized frame back to each original image (torchvision's ratio)."""
        s = tf.tile(tf.cast(scales, tf.float32), [1, 2])[:, None, :]  # (sy, sx, sy, sx)
        boxes = detections["detection_boxes"] * s
        size = tf.tile(tf.cast(original_sizes, tf.float32), [1, 2])[:, None, :]
        boxes = tf.clip_by_value(boxes, 0.0, size)
        out = dict(detections)
        out["detection_boxes"] = boxes
        return {k: out[k] for k in DETECTION_KEYS}

    # -- Keras plumbing ------------------------------------------------------------------------

    def build(self, input_shape=None):
        """Creates every weight by running the model once on a small blank image."""
        if self.built:
            return
        self.built = True  # before the call, or Keras would call build again
        channels = self.cfg.model.backbone.input_channels
        self(np.zeros((1, 64, 64, channels), np.uint8), training=False)

    def get_config(self):
        return {"config": to_dict(self.cfg), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_model(config: Config) -> MaskRCNN:
    """A built MaskRCNN for ``config`` (weights created, ready to load or train)."""
    model = MaskRCNN(config, name="mask_rcnn")
    model.build()
    return model


CLASS_DEPENDENT = ("box_head/class_logits", "box_head/box_deltas", "mask_head/mask_logits")


def with_num_classes(model: MaskRCNN, num_classes: int) -> MaskRCNN:
    """A new model for ``num_classes`` foreground classes carrying every weight of ``model``
    except the class-dependent output layers (box class logits and deltas, mask predictor),
    which are freshly initialised: the usual start of fine-tuning on a new dataset."""
    import dataclasses

    cfg = model.cfg
    new_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 num_classes=int(num_classes)))
    new = build_model(new_cfg)
    old = {_rel_path(w.path): w for w in model.weights}
    for w in new.weights:
        path = _rel_path(w.path)
        if any(path.startswith(p) for p in CLASS_DEPENDENT):
            continue
        w.assign(old[path])
    for name in ("backbone", "fpn", "rpn_head", "box_head", "mask_head"):
        getattr(new, name).trainable = getattr(model, name).trainable
    return new


def _rel_path(path: str) -> str:
    """Weight path without the model's own name: 'box_head/fc1/kernel'."""
    return path.split("/", 1)[1] if "/" in path else path
