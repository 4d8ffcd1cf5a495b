"""Resize keeping the aspect ratio, normalise and pad, inside the model (serving takes raw
images)."""

from __future__ import annotations

import keras
import tensorflow as tf


def resized_sizes(sizes: tf.Tensor, resize: str, short_size: int, long_size: int,
                  square_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Output size and resize factor (resized / original) of each image.

    ``short_long`` (torchvision): factor = min(short / min(h, w), long / max(h, w)) and
    size = floor(dim * factor), in float64 exactly as torchvision's GeneralizedRCNNTransform
    computes them (480x640 -> 800x1066; 500x2000 -> 333x1333).
    ``square`` (Model Garden): factor = square / max(h, w), size = round(dim * factor).

    Args:
      sizes: [B, 2] int32 (height, width).
    Returns:
      (new_sizes [B, 2] int32, resize factors [B] float32).
    """
    f = tf.cast(sizes, tf.float64)
    if resize == "short_long":
        scale = tf.minimum(short_size / tf.reduce_min(f, axis=1),
                           long_size / tf.reduce_max(f, axis=1))
        new = tf.floor(f * scale[:, None])
    elif resize == "square":
        scale = square_size / tf.reduce_max(f, axis=1)
        new = tf.round(f * scale[:, None])
    else:
        raise ValueError(f"resize must be 'short_long' or 'square', got {resize!r}")
    scale = tf.cast(scale, tf.float32)
    return tf.maximum(tf.cast(new, tf.int32), 1), scale


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class Preprocessor(keras.layers.Layer):
    """Raw images -> normalised, resized, padded model input.

    Inputs (call): images [B, H, W, C] uint8 or float in 0..255; image_sizes optional [B, 2]
    int32 (height, width) of each image's content at the top-left of a zero-padded batch
    (None: every image fills the tensor).
    Output: {"images": [B, Hp, Wp, C] float32, "image_sizes": [B, 2] int32 content size after
    resizing, "resize_factors": [B, 2] float32 resized / original size per axis (boxes are
    divided by it to map back, torchvision's ratio)}. Hp and Wp are multiples of
    ``size_divisibility`` (``square``: exactly ``square_size`` rounded up to it).
    """

    def __init__(self, resize="short_long", short_size=800, long_size=1333, square_size=1024,
                 size_divisibility=32, pixel_mean=(0.485, 0.456, 0.406),
                 pixel_std=(0.229, 0.224, 0.225), **kwargs):
        # Boxes and sizes must not be cast to a mixed-precision compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.resize, self.short_size, self.long_size = resize, int(short_size), int(long_size)
        self.square_size, self.size_divisibility = int(square_size), int(size_divisibility)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        if resize not in ("short_long", "square"):
            raise ValueError(f"Preprocessor: resize must be 'short_long' or 'square', got "
                             f"{resize!r}")

    def call(self, images, image_sizes=None, resize=True):
        """``resize=False``: images are already at the model's scale (the training pipeline
        resized them, with scale jitter); only normalise and pad to ``size_divisibility``.
        Without ``image_sizes`` every image fills the tensor, and the batch is resized in one op
        (the same numbers as one image at a time; no loop, which ONNX converters need)."""
        shape = tf.shape(images)
        uniform = image_sizes is None
        if image_sizes is None:
            image_sizes = tf.tile(shape[None, 1:3], [shape[0], 1])
        image_sizes = tf.cast(image_sizes, tf.int32)
        if not resize:
            return self._normalize_and_pad(images, image_sizes)
        new_sizes, _ = resized_sizes(image_sizes, self.resize, self.short_size, self.long_size,
                                     self.square_size)
        d = self.size_divisibility
        if self.resize == "square":
            canvas = tf.constant([-(-self.square_size // d) * d] * 2)
        else:
            canvas = (tf.reduce_max(new_sizes, axis=0) + d - 1) // d * d
        def one(args):
            image, size, new = args
            image = self._normalize(image[: size[0], : size[1]])
            image = tf.image.resize(image, new, method="bilinear")
            return tf.pad(image, [[0, canvas[0] - new[0]], [0, canvas[1] - new[1]], [0, 0]])

        channels = images.shape[-1]
        if uniform:
            # The size from the tensor's own shape, not a row of new_sizes: tf2onnx loses the
            # length of a size gathered from a tiled [B, 2] tensor.
            new = resized_sizes(shape[None, 1:3], self.resize, self.short_size, self.long_size,
                                self.square_size)[0][0]
            out = tf.image.resize(self._normalize(images), new, method="bilinear")
            out = tf.pad(out, [[0, 0], [0, canvas[0] - new[0]], [0, canvas[1] - new[1]], [0, 0]])
        else:
            out = tf.map_fn(one, (images, image_sizes, new_sizes),
                            fn_output_signature=tf.TensorSpec([None, None, channels],
                                                              tf.float32))
        if self.resize == "square":
            side = -(-self.square_size // d) * d
            out = tf.ensure_shape(out, [None, side, side, channels])
        factors = tf.cast(new_sizes, tf.float32) / tf.cast(image_sizes, tf.float32)
        return {"images": out, "image_sizes": new_sizes, "resize_factors": factors}

    def compute_output_shape(self, input_shape):
        """``input_shape``: the shape of ``images`` (Keras passes the first argument's)."""
        b, h, w, c = input_shape
        if self.resize == "square":
            h = w = -(-self.square_size // self.size_divisibility) * self.size_divisibility
        else:
            h = w = None  # depends on each image's aspect ratio
        return {"images": (b, h, w, c), "image_sizes": (b, 2), "resize_factors": (b, 2)}

    def _normalize(self, images):
        """(x - mean) / std with the 0..1 ImageNet statistics scaled to 0..255 pixels."""
        mean = tf.constant(self.pixel_mean, tf.float32) * 255.0
        std = tf.constant(self.pixel_std, tf.float32) * 255.0
        return (tf.cast(images, tf.float32) - mean) / std

    def _normalize_and_pad(self, images, image_sizes):
        shape = tf.shape(images)
        d = self.size_divisibility
        x = self._normalize(images)
        # Zero outside each image's content, as after resize-and-pad.
        rows = tf.range(shape[1])[None, :, None] < image_sizes[:, 0, None, None]
        cols = tf.range(shape[2])[None, None, :] < image_sizes[:, 1, None, None]
        x = tf.where((rows & cols)[..., None], x, 0.0)
        h = images.shape[1] if images.shape[1] is not None else shape[1]
        w = images.shape[2] if images.shape[2] is not None else shape[2]
        pad_h, pad_w = (d - h % d) % d, (d - w % d) % d  # static when the canvas is
        x = tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        return {"images": x, "image_sizes": image_sizes,
                "resize_factors": tf.ones(tf.shape(image_sizes), tf.float32)}

    def get_config(self):
        return {**super().get_config(), "resize": self.resize, "short_size": self.short_size,
                "long_size": self.long_size, "square_size": self.square_size,
                "size_divisibility": self.size_divisibility, "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std)}
