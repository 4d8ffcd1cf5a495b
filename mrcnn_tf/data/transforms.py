"""Per-image transforms in TensorFlow: resize keeping the aspect ratio, scale jitter, horizontal
flip, crop, pad to one of a few fixed canvases, and pad instances to ``max_instances``.

A decoded example is a dict: ``image`` [H, W, 3] uint8, ``boxes`` [n, 4] float32 (y1, x1, y2, x2)
pixels, ``classes`` [n] int32 (1..N), ``masks`` [n, H, W] uint8, ``image_id`` int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from mrcnn_tf.layers.preprocess import resized_sizes
from mrcnn_tf.ops.masks import crop_masks


@dataclass(frozen=True)
class TransformParams:
    """Everything the per-image transform needs, read from the config by the pipeline."""

    canvases: tuple  # ((H, W), ...) by increasing area: each image goes to the first that holds it
    resize: str  # "short_long" | "square" (the model's preprocess.resize)
    short_size: int
    long_size: int
    square_size: int
    max_instances: int
    mask_mode: str  # "full" | "mini"
    mask_resize: str  # "bilinear" | "nearest"
    mini_mask_size: int
    hflip: bool
    train_short_sizes: tuple  # short sides to draw from in training; () = short_size
    aug_scale_min: float
    aug_scale_max: float
    image_dtype: str  # "float32" | "uint8"


def _flip_boxes(boxes, width):
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    return tf.stack([y1, width - x2, y2, width - x1], axis=-1)


def _nearest_rows(size_in, size_out):
    """torch's ``interpolate(mode="nearest")`` source index of each output row:
    min(floor(i * (in / out)), in - 1), in float32 as torch computes it."""
    scale = tf.cast(size_in, tf.float32) / tf.cast(size_out, tf.float32)
    rows = tf.floor(tf.cast(tf.range(size_out), tf.float32) * scale)
    return tf.minimum(tf.cast(rows, tf.int32), size_in - 1)


def _resize_masks(masks, size, method: str):
    """[n, H, W] 0/1 masks -> [n, h, w] uint8 at ``size`` (h, w)."""
    if method == "nearest":
        shape = tf.shape(masks)
        masks = tf.gather(masks, _nearest_rows(shape[1], size[0]), axis=1)
        return tf.cast(tf.gather(masks, _nearest_rows(shape[2], size[1]), axis=2), tf.uint8)
    masks = tf.image.resize(tf.cast(masks, tf.float32)[..., None], size, method="bilinear")
    return tf.cast(masks[..., 0] >= 0.5, tf.uint8)


def choose_canvas(size, canvases) -> tf.Tensor:
    """Index of the first (smallest) canvas that holds an image of ``size`` (h, w); the last
    (largest) when none does (the image is then cropped).

    Example: canvases ((800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800)):
    800x1066 -> 1 (800x1088), 1066x800 -> 2, 750x1333 -> 3, 800x800 -> 0.
    """
    heights = tf.constant([c[0] for c in canvases], tf.int32)
    widths = tf.constant([c[1] for c in canvases], tf.int32)
    fits = (heights >= size[0]) & (widths >= size[1])
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    return tf.where(tf.reduce_any(fits), first, len(canvases) - 1)


def transform(example: dict, p: TransformParams, training: bool) -> tuple:
    """Decoded example -> (image [H, W, 3], targets) on its canvas (H, W) (the one
    :func:`choose_canvas` picks for its resized size; static [S, S] with one square canvas).

    targets: ``gt_boxes`` [M, 4] float32 pixels of the padded frame, ``gt_classes`` [M] int32
    (-1 padding), ``gt_masks`` [M, H, W] uint8 (full) or [M, m, m] uint8 (mini: the mask inside
    its box), ``image_info``: {``image_id`` int64, ``original_size`` [2] int32, ``image_size``
    [2] int32 content size in the canvas, ``resize_factor`` [2] float32 resized / original}.
    """
    image = example["image"]
    boxes = tf.reshape(tf.cast(example["boxes"], tf.float32), [-1, 4])
    classes = tf.reshape(tf.cast(example["classes"], tf.int32), [-1])
    masks = example["masks"]
    shape = tf.shape(image)
    orig = shape[:2]
    short = p.short_size
    if training and p.train_short_sizes:  # multi-scale: one short side per image, uniformly
        pick = tf.random.uniform([], 0, len(p.train_short_sizes), dtype=tf.int32)
        short = tf.cast(tf.gather(tf.constant(p.train_short_sizes), pick), tf.float64)
    new, _ = resized_sizes(orig[None], p.resize, short, p.long_size, p.square_size)
    new = new[0]
    canvas = tf.gather(tf.constant(p.canvases, tf.int32), choose_canvas(new, p.canvases))
    if training and (p.aug_scale_min != 1.0 or p.aug_scale_max != 1.0):
        jitter = tf.random.uniform([], p.aug_scale_min, p.aug_scale_max)
        new = tf.maximum(tf.cast(tf.round(tf.cast(new, tf.float32) * jitter), tf.int32), 1)
    resize_factor = tf.cast(new, tf.float32) / tf.cast(orig, tf.float32)  # [fy, fx]

    image = tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear")
    boxes = boxes * tf.tile(resize_factor, [2])[None, :]
    masks = _resize_masks(masks, new, p.mask_resize)

    if training and p.hflip:
        flip = tf.random.uniform([]) < 0.5
        width = tf.cast(new[1], tf.float32)
        image = tf.cond(flip, lambda: image[:, ::-1, :], lambda: image)
        masks = tf.cond(flip, lambda: masks[:, :, ::-1], lambda: masks)
        boxes = tf.cond(flip, lambda: _flip_boxes(boxes, width), lambda: boxes)

    # Crop to the canvas when the (jittered) image is larger: random window in training.
    size = tf.minimum(new, canvas)
    room = new - size
    if training:
        offset = tf.cast(tf.floor(tf.random.uniform([2]) * tf.cast(room + 1, tf.float32)),
                         tf.int32)
        offset = tf.minimum(offset, room)
    else:
        offset = tf.zeros([2], tf.int32)
    image = image[offset[0]: offset[0] + size[0], offset[1]: offset[1] + size[1]]
    masks = masks[:, offset[0]: offset[0] + size[0], offset[1]: offset[1] + size[1]]
    shift = tf.cast(tf.tile(offset, [2]), tf.float32)[None, :]
    limit = tf.cast(tf.tile(size, [2]), tf.float32)[None, :]
    boxes = tf.clip_by_value(boxes - shift, 0.0, limit)
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, classes = tf.boolean_mask(boxes, keep), tf.boolean_mask(classes, keep)
    masks = tf.boolean_mask(masks, keep)

    static = list(p.canvases[0]) if len(p.canvases) == 1 else [None, None]
    image = tf.pad(image, [[0, canvas[0] - size[0]], [0, canvas[1] - size[1]], [0, 0]])
    image = tf.ensure_shape(image, static + [3])
    if p.image_dtype == "uint8":
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    n = tf.shape(classes)[0]
    m = p.max_instances
    if p.mask_mode == "mini":
        masks = crop_masks(masks[None], boxes[None], tf.range(n)[None], p.mini_mask_size)[0]
        masks = tf.cast(masks >= 0.5, tf.uint8)
        mask_shape = [m, p.mini_mask_size, p.mini_mask_size]
    else:
        masks = tf.pad(masks, [[0, 0], [0, canvas[0] - size[0]], [0, canvas[1] - size[1]]])
        mask_shape = [m] + static
    boxes, classes, masks = boxes[:m], classes[:m], masks[:m]
    pad = m - tf.minimum(n, m)
    targets = {
        "gt_boxes": tf.ensure_shape(tf.pad(boxes, [[0, pad], [0, 0]]), [m, 4]),
        "gt_classes": tf.ensure_shape(tf.pad(classes, [[0, pad]], constant_values=-1), [m]),
        "gt_masks": tf.ensure_shape(tf.pad(masks, [[0, pad], [0, 0], [0, 0]]), mask_shape),
        "image_info": {
            "image_id": tf.cast(example["image_id"], tf.int64),
            "original_size": tf.cast(orig, tf.int32),
            "image_size": tf.cast(size, tf.int32),
            "resize_factor": resize_factor,
        },
    }
    return image, targets
