"""Multilevel anchors for P2..P6, laid out to match the RPN head's output channels.

Layout (the contract with the RPN head): for level l the anchors form [H_l * W_l * A, 4] in
row-major order of positions (y, then x), and within one position the A = len(aspect_ratios) *
len(scales) anchors are ordered ratio-major, scale-minor. The RPN head's conv output
[B, H, W, A * 4] reshaped to [B, H * W * A, 4] therefore lines up anchor for anchor; this is also
torchvision's order, so its RPN weights need no channel permutation beyond (dx, dy) -> (dy, dx).

Geometry follows torchvision's AnchorGenerator: for size s and ratio r = h / w, the base anchor is
(-w/2, -h/2, w/2, h/2) with h = s * sqrt(r), w = s / sqrt(r), rounded to integers (option), and is
centred at (x + offset) * stride, (y + offset) * stride. The stride of a level is
``image_size // grid_size`` (torchvision's rule; 2**level whenever the padded image is divisible by
2**level, e.g. 61 instead of 64 for P6 of an 800-px-high image).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def base_anchors(size: float, aspect_ratios, scales=(1.0,), round_to_int: bool = True
                 ) -> np.ndarray:
    """The A anchors of one position centred at the origin.

    Returns:
      [A, 4] float32 (y1, x1, y2, x2), ratio-major then scale. Computed in float32 like torchvision.

    Example: size 32, ratio 0.5 -> h = 22.63, w = 45.25 -> rounded (-11, -23, 11, 23).
    """
    ratios = np.asarray(aspect_ratios, np.float32)
    sizes = np.asarray(scales, np.float32) * np.float32(size)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    anchors = np.stack([-hs, -ws, hs, ws], axis=1) / np.float32(2.0)
    if round_to_int:
        anchors = np.round(anchors)  # half to even, as torch.round
    return anchors.astype(np.float32)


def level_anchors(grid_height, grid_width, stride_y, stride_x, base: np.ndarray,
                  offset: float = 0.0) -> tf.Tensor:
    """Anchors of one level.

    Args:
      grid_height, grid_width: feature map size (ints or scalar int tensors).
      stride_y, stride_x: pixels per feature cell (ints or scalar tensors).
      base: [A, 4] from :func:`base_anchors`.
    Returns:
      [grid_height * grid_width * A, 4] float32 (y1, x1, y2, x2) pixels: one constant when all
      four sizes are Python ints (a static input shape), computed in numpy with the same float32
      arithmetic, so that the traced graph holds one op instead of a dozen for its optimiser to
      fold.
    """
    if all(isinstance(v, (int, np.integer)) for v in (grid_height, grid_width, stride_y,
                                                       stride_x)):
        f32 = np.float32
        sy = (np.arange(grid_height, dtype=f32) + f32(offset)) * f32(stride_y)
        sx = (np.arange(grid_width, dtype=f32) + f32(offset)) * f32(stride_x)
        yy, xx = np.meshgrid(sy, sx, indexing="ij")
        shifts = np.stack([yy, xx, yy, xx], axis=-1)
        anchors = shifts[:, :, None, :] + np.asarray(base, f32)[None, None]
        return tf.constant(anchors.reshape(-1, 4))
    sy = (tf.cast(tf.range(grid_height), tf.float32) + offset) * tf.cast(stride_y, tf.float32)
    sx = (tf.cast(tf.range(grid_width), tf.float32) + offset) * tf.cast(stride_x, tf.float32)
    yy, xx = tf.meshgrid(sy, sx, indexing="ij")
    shifts = tf.stack([yy, xx, yy, xx], axis=-1)  # [H, W, 4]
    anchors = shifts[:, :, None, :] + tf.constant(base)[None, None, :, :]
    return tf.reshape(anchors, [-1, 4])


def multilevel_anchors(image_size, grid_sizes: dict, sizes, aspect_ratios, scales=(1.0,),
                       offset: float = 0.0, round_to_int: bool = True,
                       level_strides: bool = False) -> dict:
    """Anchors for every level.

    Args:
      image_size: (height, width) of the padded model input (ints or scalar tensors).
      grid_sizes: {level: (grid_height, grid_width)} in increasing level order.
      sizes: one anchor size per level, same order as ``grid_sizes``.
      aspect_ratios, scales, offset, round_to_int: see the module docstring.
      level_strides: a level's stride is 2**level (detectron2, Model Garden) instead of
        ``image_size // grid_size`` (torchvision); they differ where the input is not a multiple
        of the stride (P6 of an 800-row input: 13 rows, stride 61 in torchvision, 64 here).
    Returns:
      {level: [H_l * W_l * A, 4] float32}; concatenate the values in level order to match the
      RPN head's concatenated outputs.
    """
    if len(sizes) != len(grid_sizes):
        raise ValueError(f"multilevel_anchors: {len(sizes)} sizes for {len(grid_sizes)} levels")
    out = {}
    for size, (level, (gh, gw)) in zip(sizes, grid_sizes.items()):
        base = base_anchors(size, aspect_ratios, scales, round_to_int)
        if level_strides:
            stride_y = stride_x = 2 ** int(level)
        else:
            stride_y = image_size[0] // gh
            stride_x = image_size[1] // gw
        out[level] = level_anchors(gh, gw, stride_y, stride_x, base, offset)
    return out


def num_anchors_per_location(aspect_ratios, scales=(1.0,)) -> int:
    """A = len(aspect_ratios) * len(scales)."""
    return len(aspect_ratios) * len(scales)


class AnchorGenerator:
    """The anchors of a model: one size per level x ``aspect_ratios`` x ``scales``.

    ``generator(image_size, grid_sizes)`` -> {level: [H_l * W_l * A, 4]}, as
    :func:`multilevel_anchors`.
    """

    def __init__(self, sizes, aspect_ratios=(0.5, 1.0, 2.0), scales=(1.0,), offset=0.0,
                 round_to_int=True, level_strides=False):
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.scales = tuple(float(s) for s in scales)
        self.offset, self.round_to_int = float(offset), bool(round_to_int)
        self.level_strides = bool(level_strides)

    @property
    def num_anchors(self) -> int:
        """Anchors per position (A)."""
        return num_anchors_per_location(self.aspect_ratios, self.scales)

    def __call__(self, image_size, grid_sizes: dict) -> dict:
        return multilevel_anchors(image_size, grid_sizes, self.sizes, self.aspect_ratios,
                                  self.scales, self.offset, self.round_to_int,
                                  self.level_strides)

    def get_config(self) -> dict:
        return {"sizes": list(self.sizes), "aspect_ratios": list(self.aspect_ratios),
                "scales": list(self.scales), "offset": self.offset,
                "round_to_int": self.round_to_int, "level_strides": self.level_strides}
