"""RoIAlign (He et al., 2017) on ``tf.image.crop_and_resize``, numerically equal to torchvision's
``roi_align`` and detectron2's ``ROIAlign`` for a fixed ``sampling_ratio >= 1``.

How the reference computes one output bin (torchvision's CPU kernel, in feature-map pixels whose
centres sit at integer coordinates):

* RoI start = box * spatial_scale - offset, with offset 0.5 if ``aligned`` else 0; when not
  aligned the RoI is at least 1x1.
* ``sampling_ratio`` x ``sampling_ratio`` points per bin, at (i + 0.5) / ratio of the bin; each is
  bilinearly interpolated and the bin is their mean. Over one RoI side the points are therefore
  ``n = out * ratio`` evenly spaced points from ``start + 0.5 * step`` to
  ``start + (n - 0.5) * step`` with ``step = length / n``.
* Border rule: a point in [-1, 0] or [size - 1, size] takes the edge value; a point farther out
  than one pixel counts as zero.

``crop_and_resize`` samples ``n`` corner-aligned points between the two normalised box edges and
returns ``extrapolation_value`` outside [0, size - 1]. So we (1) pad the map by one pixel on each
side with a copy of its edge (``SYMMETRIC``), which turns "within one pixel outside -> edge value"
into ordinary bilinear interpolation and "farther out -> zero" into extrapolation, and (2) give
crop_and_resize the first and last sample point as the box, normalised by the padded size minus 1.
Then an average pool over each bin's ``ratio x ratio`` points gives the reference values.

Adaptive sampling (``sampling_ratio=0``: ``ceil(roi_h / out_h) x ceil(roi_w / out_w)`` points per
bin, a number that differs per RoI; detectron2's model-zoo configs) cannot be one crop_and_resize.
Bilinear sampling is separable, so the mean over a bin's sample grid is ``Wy @ F @ Wx^T`` with
per-axis weights that hold every sample's two neighbours (:func:`_axis_weights`): computed per
RoI on the window of the map its samples touch (:func:`roi_align_adaptive_flat`), with the static
output shape [R, out_h, out_w, C] and the exact numbers of torchvision's kernel for any RoI size.

The gradient to the features is our own (:func:`crop_and_resize`): TensorFlow's CPU kernel for
the gradient of crop_and_resize w.r.t. the image adds from several threads into the same pixels
without synchronisation (tensorflow/tensorflow#42033) and loses updates: 1.6% of the gradient's
norm for 3000 RoIs on a 2-core machine, where torchvision's roi_align backward is exact.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from mrcnn_tf.ops._graph import dims, graph_when_eager


def _as_pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _sample_span(start, length, bins: int, ratio: int):
    """First and last of ``bins * ratio`` evenly spaced sample points over [start, start + len]."""
    n = bins * ratio
    step = length / float(n)
    return start + 0.5 * step, start + (n - 0.5) * step


def _edge_pad(image):
    """[N, H, W, C] -> [N, H + 2, W + 2, C] with the border rows and columns repeated once (a
    SYMMETRIC pad of 1, built by concatenation: TensorFlow's MirrorPad and its gradient were 4% of
    an R50-FPN training step on CPU)."""
    padded = tf.concat([image[:, :1], image, image[:, -1:]], axis=1)
    return tf.concat([padded[:, :, :1], padded, padded[:, :, -1:]], axis=2)


def _bilinear_scatter(grads, boxes, box_indices, height, width, start, segments: int,
                      crop_size):
    """The adjoint of ``tf.image.crop_and_resize`` of edge-padded maps (bilinear, extrapolation
    outside the padded map), summed into the rows of flat maps: each crop sample's gradient split
    onto its four neighbours with the bilinear weights, summed by one ``unsorted_segment_sum``
    over the four (exact on every device). A neighbour in the pad adds to the edge pixel it
    repeats, so no padded-size gradient is built.

    Args:
      grads: [R, h, w, C]; boxes: [R, 4] normalised to each RoI's padded map; box_indices: [R]
        int32 image of each RoI; height, width: [R] int32 sizes of each RoI's (unpadded) map;
        start: [R] int32 flat row of each RoI's map's pixel (0, 0) of image 0; segments: rows of
        the output; crop_size: (h, w) ints.
    Returns:
      [segments, C] float32: pixel (b, y, x) of a map at flat row ``start + (b * H + y) * W + x``.
    """
    def per_roi(v):
        return tf.reshape(v, [-1, 1])

    def axis(lo, hi, size, out: int):
        """Unpadded indices and weights of the lower and upper neighbour along one axis of
        ``size`` pixels, each [2, R, out], with the kernel's own arithmetic
        (crop_and_resize_op.cc) on the padded ``size + 2``."""
        size = per_roi(size)
        extent = tf.cast(size + 1, tf.float32)
        if out > 1:
            step = (hi - lo)[:, None] * extent / (out - 1)
            pos = lo[:, None] * extent + tf.range(out, dtype=tf.float32)[None, :] * step
        else:
            pos = (0.5 * (lo + hi))[:, None] * extent
        inside = tf.cast((pos >= 0.0) & (pos <= extent), tf.float32)
        low = tf.floor(pos)
        frac = pos - low
        # Padded pixel p repeats unpadded pixel clip(p - 1, 0, size - 1).
        low = tf.cast(low, tf.int32)
        index = tf.stack([tf.clip_by_value(low - 1, 0, size - 1),
                          tf.clip_by_value(low, 0, size - 1)])
        return index, tf.stack([(1.0 - frac) * inside, frac * inside])

    rows, wy = axis(boxes[:, 0], boxes[:, 2], height, crop_size[0])
    cols, wx = axis(boxes[:, 1], boxes[:, 3], width, crop_size[1])
    base = tf.cast(box_indices, tf.int32)[:, None, None] * per_roi(height)[..., None]
    # The four neighbours (row 2 x column 2) of every sample: [2, 2, R, h, w].
    weight = wy[:, None, :, :, None] * wx[None, :, :, None, :]
    index = ((base + rows[:, None, :, :, None]) * per_roi(width)[..., None]
             + cols[None, :, :, None, :] + per_roi(start)[..., None])
    grads = tf.cast(grads, tf.float32)
    channels = tf.shape(grads)[3]
    return tf.math.unsorted_segment_sum(
        tf.reshape(grads * weight[..., None], tf.stack([-1, channels])),
        tf.reshape(index, [-1]), segments)


def crop_and_resize(image: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor, crop_size
                    ) -> tf.Tensor:
    """``tf.image.crop_and_resize`` (bilinear, zero extrapolation) of :func:`_edge_pad` of
    ``image``, with an exact gradient straight to the unpadded ``image`` (see the module
    docstring; the pad's own gradient, strided-slice gradients of the full map added up, is not
    built); no gradient to ``boxes``. :func:`crop_and_resize_levels` of one map.

    Args:
      image: [N, H, W, C] float32; boxes: [R, 4] (y1, x1, y2, x2) normalised to the padded
        [N, H + 2, W + 2, C] map; box_indices: [R] int32; crop_size: (h, w) ints.
    Returns:
      [R, h, w, C] float32.
    """
    return crop_and_resize_levels([image], [boxes], [box_indices], crop_size)[0]


def crop_and_resize_levels(images, boxes, box_indices, crop_size) -> list:
    """:func:`crop_and_resize` of several maps (the levels of a pyramid), each with its own RoIs,
    and one gradient for all of them: every level's samples summed into the levels' maps
    flattened one after the other, by one ``unsorted_segment_sum``. The same numbers as one
    :func:`crop_and_resize` per level (each pixel's contributions are added in the same order),
    with one gradient to trace instead of one per level.

    Args:
      images: list of [N, H_l, W_l, C] float32; boxes: list of [R_l, 4] normalised to each
        padded map; box_indices: list of [R_l] int32; crop_size: (h, w) ints.
    Returns:
      list of [R_l, h, w, C] float32.
    """
    boxes = [tf.stop_gradient(b) for b in boxes]

    @tf.custom_gradient
    def forward(*images):
        crops = [tf.image.crop_and_resize(_edge_pad(image), b, i, crop_size, method="bilinear",
                                          extrapolation_value=0.0)
                 for image, b, i in zip(images, boxes, box_indices)]

        def grad(*dys):
            shapes = [dims(image) for image in images]  # [N, H_l, W_l, C]
            sizes = [n * h * w for n, h, w, _ in shapes]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            level = tf.concat([tf.fill(tf.shape(b)[:1], i) for i, b in enumerate(boxes)], 0)

            def per_roi(values):  # each RoI's level's value: [sum R_l]
                return tf.gather(tf.stack(values), level)

            total = _bilinear_scatter(
                tf.concat(dys, 0), tf.concat(boxes, 0), tf.concat(box_indices, 0),
                per_roi([h for _, h, _, _ in shapes]), per_roi([w for _, _, w, _ in shapes]),
                per_roi(starts), sum(sizes), crop_size)
            return [tf.reshape(part, shape)
                    for part, shape in zip(tf.split(total, sizes), shapes)]

        return crops, grad

    return forward(*images)


def _neighbours(pos, size):
    """torchvision's border rule for bilinear samples at ``pos`` on an axis of ``size`` pixels:
    (low, high, frac, inside) with the sample = (1 - frac) * v[low] + frac * v[high] where
    ``inside``; beyond one pixel outside [0, size - 1] it is zero, within it the edge value."""
    inside = (pos >= -1.0) & (pos <= size)
    pos = tf.maximum(pos, 0.0)
    low = tf.floor(pos)
    at_edge = low >= size - 1.0
    low = tf.where(at_edge, size - 1.0, low)
    frac = tf.where(at_edge, 0.0, pos - low)
    return low, tf.minimum(low + 1.0, size - 1.0), frac, inside


def _axis_weights(start, length, bins: int, extent):
    """[bins, extent] weights W with W @ column = the mean, over each bin, of the adaptive
    RoIAlign samples of one axis (torchvision's CPU kernel, sampling_ratio <= 0).

    ``n = ceil(length / bins)`` samples per bin at ``start + (b + (k + 0.5) / n) * length / bins``.
    A sample beyond one pixel outside [0, extent - 1] is zero; within it, it takes the edge
    value; otherwise it is linear between its two neighbours.
    """
    n = tf.cast(tf.math.ceil(length / bins), tf.int32)
    nf = tf.maximum(tf.cast(n, tf.float32), 1.0)
    step = length / bins
    b = tf.range(bins, dtype=tf.float32)[:, None]
    k = tf.range(n, dtype=tf.float32)[None, :]
    pos = start + b * step + (k + 0.5) * step / nf  # [bins, n]
    low, high, frac, inside = _neighbours(pos, tf.cast(extent, tf.float32))
    weight = tf.where(inside, 1.0 / nf, 0.0)
    rows = tf.cast(tf.concat([low, high], axis=1), tf.int32)  # [bins, 2n]
    values = tf.concat([weight * (1.0 - frac), weight * frac], axis=1)
    segments = tf.range(bins)[:, None] * extent + rows
    flat = tf.math.unsorted_segment_sum(tf.reshape(values, [-1]), tf.reshape(segments, [-1]),
                                        bins * extent)
    return tf.reshape(flat, tf.stack([bins, extent]))


def roi_extent(boxes, aligned: bool):
    """(y1, x1, h, w) of (y1, x1, y2, x2) boxes [..., 4] as RoIAlign samples them: shifted by
    half a pixel (aligned), or at least 1x1 (not aligned, torchvision's legacy rule)."""
    y1, x1, y2, x2 = tf.unstack(boxes - (0.5 if aligned else 0.0), 4, axis=-1)
    h, w = y2 - y1, x2 - x1
    if not aligned:
        h, w = tf.maximum(h, 1.0), tf.maximum(w, 1.0)
    return y1, x1, h, w


def axis_weights_static(start, length, bins: int, extent, width: int):
    """:func:`_axis_weights` for a batch of RoIs on static shapes (XLA): [R, bins, width].

    The adaptive sample count ``n`` differs per RoI, so the samples are not enumerated from 0:
    each bin takes ``J = 2 * width + 5`` consecutive samples from the first one at or before
    position -1 (masked beyond ``n``). With n >= 2 the spacing is above 0.5 px, so at most
    ``2 * (width + 1) + 1`` samples of a bin fall in [-1, width], where any has weight; with
    n = 1 there is one. The result equals :func:`_axis_weights` padded to ``width`` columns.

    Args:
      start, length: [R] float32 RoI start and size on this axis (after the aligned offset).
      bins: output size on this axis.
      extent: [R] int32 the map's size for the border rules (<= width).
      width: static number of columns (the mask's static size).
    """
    n = tf.math.ceil(length / bins)  # [R]
    nf = tf.maximum(n, 1.0)
    step = length / bins
    spacing = step / nf
    safe = tf.where(spacing > 0.0, spacing, 1.0)
    base = start[:, None] + tf.range(bins, dtype=tf.float32)[None, :] * step[:, None]  # [R, b]
    # First sample at or before -1 (one earlier than the formula, against rounding).
    k0 = tf.math.ceil((-1.0 - base) / safe[:, None] - 0.5) - 1.0
    k0 = tf.clip_by_value(k0, 0.0, tf.maximum(n - 1.0, 0.0)[:, None])
    k = k0[..., None] + tf.range(2 * width + 5, dtype=tf.float32)  # [R, b, J]
    pos = base[..., None] + (k + 0.5) * spacing[:, None, None]
    ext = tf.cast(extent, tf.float32)[:, None, None]
    low, high, frac, inside = _neighbours(pos, ext)
    weight = tf.where(inside & (k < n[:, None, None]), 1.0 / nf[:, None, None], 0.0)
    rows = tf.cast(tf.concat([low, high], axis=-1), tf.int32)  # [R, b, 2J]
    values = tf.concat([weight * (1.0 - frac), weight * frac], axis=-1)
    r = tf.shape(start)[0]
    segments = tf.reshape(tf.range(r * bins), [r, bins, 1]) * width + rows
    flat = tf.math.unsorted_segment_sum(tf.reshape(values, [-1]), tf.reshape(segments, [-1]),
                                        r * bins * width)
    return tf.reshape(flat, [r, bins, width])


def adaptive_window(box, size, output_size, aligned: bool):
    """The window of the map one RoI's adaptive samples touch, and its per-axis weights.

    Args:
      box: [4] (y1, x1, y2, x2) in map pixels (before the aligned offset).
      size: [2] int32 (height, width) of the map (the border rules' extent).
      output_size: int or (out_h, out_w).
      aligned: half-pixel shift, or not (the RoI is then at least 1x1).
    Returns:
      ((r0, r1, c0, c1) window bounds, wy [out_h, r1 - r0], wx [out_w, c1 - c0]); the RoI's
      RoIAlign is ``wy @ map[r0:r1, c0:c1] @ wx^T``.
    """
    out_h, out_w = _as_pair(output_size)
    y1, x1, h, w = roi_extent(box, aligned)
    # The rows/columns any sample can touch, clipped to the map.
    r0 = tf.clip_by_value(tf.cast(tf.floor(tf.maximum(y1, 0.0)), tf.int32), 0, size[0] - 1)
    r1 = tf.clip_by_value(tf.cast(tf.floor(tf.maximum(y1 + h, 0.0)), tf.int32) + 2, 1, size[0])
    c0 = tf.clip_by_value(tf.cast(tf.floor(tf.maximum(x1, 0.0)), tf.int32), 0, size[1] - 1)
    c1 = tf.clip_by_value(tf.cast(tf.floor(tf.maximum(x1 + w, 0.0)), tf.int32) + 2, 1, size[1])
    r1, c1 = tf.maximum(r1, r0 + 1), tf.maximum(c1, c0 + 1)
    # Weights over the whole axis, restricted to the window: the border rules need the map's
    # size, the product only the window.
    wy = _axis_weights(y1, h, out_h, size[0])[:, r0:r1]
    wx = _axis_weights(x1, w, out_w, size[1])[:, c0:c1]
    return (r0, r1, c0, c1), wy, wx


def roi_align_adaptive_flat(features: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor,
                            output_size, aligned: bool = True) -> tf.Tensor:
    """RoIAlign with adaptive sampling (``sampling_ratio=0``, detectron2's ``POOLER_SAMPLING_RATIO:
    0``) for a flat list of RoIs, in feature-map coordinates.

    Args:
      features: [N_img, H, W, C] any float dtype, C static.
      boxes: [R, 4] (y1, x1, y2, x2) in feature-map pixels (R may be 0).
      box_indices: [R] int32 image of each RoI.
      output_size: int or (out_h, out_w).
      aligned: half-pixel shift (detectron2) or not (torchvision).
    Returns:
      [R, out_h, out_w, C] in the features' dtype. Gradients flow to ``features``.
    """
    channels = features.shape[-1]
    if channels is None:
        raise ValueError("roi_align (adaptive): the features' channel count must be static")
    # The output size, alignment and channels are Python values, so each keeps its own trace
    # of the eager graph function (an empty list of RoIs needs the fully defined element shape).
    return _adaptive(features, boxes, box_indices, _as_pair(output_size), bool(aligned),
                     int(channels))


@graph_when_eager
def _adaptive(features, boxes, box_indices, output_size, aligned, channels):
    out_h, out_w = output_size
    image = tf.cast(features, tf.float32)
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    size = tf.shape(image)[1:3]

    def one(args):
        box, index = args
        (r0, r1, c0, c1), wy, wx = adaptive_window(box, size, (out_h, out_w), aligned)
        window = image[index, r0:r1, c0:c1]  # [h, w, C]
        rows = tf.einsum("ih,hwc->iwc", wy, window)
        return tf.einsum("iwc,jw->ijc", rows, wx)

    out = tf.map_fn(one, (boxes, tf.cast(box_indices, tf.int32)), parallel_iterations=16,
                    fn_output_signature=tf.TensorSpec([out_h, out_w, channels], tf.float32))
    return tf.cast(out, features.dtype)


def roi_align_flat(features: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor, output_size,
                   sampling_ratio: int = 2, aligned: bool = True) -> tf.Tensor:
    """RoIAlign for a flat list of RoIs, in feature-map coordinates.

    Args:
      features: [N_img, H, W, C] any float dtype.
      boxes: [R, 4] (y1, x1, y2, x2) in feature-map pixels (already multiplied by the scale).
      box_indices: [R] int32 image of each RoI.
      output_size: int or (out_h, out_w).
      sampling_ratio: >= 1 sample points per bin side, or 0 for adaptive sampling
        (:func:`roi_align_adaptive_flat`).
      aligned: half-pixel shift (detectron2 default) or not (torchvision's MultiScaleRoIAlign).
    Returns:
      [R, out_h, out_w, C] in the features' dtype.
    """
    if int(sampling_ratio) < 0:
        raise ValueError(f"roi_align: sampling_ratio must be >= 0 (0 = adaptive), got "
                         f"{sampling_ratio}")
    if int(sampling_ratio) == 0:
        return roi_align_adaptive_flat(features, boxes, box_indices, output_size, aligned)
    ratio = int(sampling_ratio)
    out_h, out_w = _as_pair(output_size)
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    offset = 0.5 if aligned else 0.0
    y1, x1, y2, x2 = tf.unstack(boxes - offset, 4, axis=-1)
    roi_h = y2 - y1
    roi_w = x2 - x1
    if not aligned:
        roi_h = tf.maximum(roi_h, 1.0)
        roi_w = tf.maximum(roi_w, 1.0)
    first_y, last_y = _sample_span(y1, roi_h, out_h, ratio)
    first_x, last_x = _sample_span(x1, roi_w, out_w, ratio)

    image = features
    if image.dtype not in (tf.float16, tf.float32, tf.float64):
        image = tf.cast(image, tf.float32)  # crop_and_resize has no bfloat16 kernel
    shape = tf.shape(features)
    # Padded map has size + 2 rows; crop_and_resize normalises by (padded size - 1) = size + 1.
    norm_h = tf.cast(shape[1] + 1, tf.float32)
    norm_w = tf.cast(shape[2] + 1, tf.float32)
    crop_boxes = tf.stack([(first_y + 1.0) / norm_h, (first_x + 1.0) / norm_w,
                           (last_y + 1.0) / norm_h, (last_x + 1.0) / norm_w], axis=-1)
    crops = crop_and_resize(image, crop_boxes, tf.cast(box_indices, tf.int32),
                            (out_h * ratio, out_w * ratio))  # float32
    if ratio > 1:
        # The mean of each ratio x ratio block of samples. An average pool, not a reduce_mean over
        # a [R, out_h, ratio, out_w, ratio, C] view: the strided reduction was the slowest op of
        # the RoI heads (0.9 s of a 9 s R50-FPN training step on 2 CPU cores).
        crops = tf.nn.avg_pool2d(crops, ratio, ratio, "VALID")
    return tf.cast(crops, features.dtype)


def _gather_axis(start, length, bins: int, ratio: int, size):
    """Bilinear neighbours and weights of ``bins * ratio`` evenly spaced samples per RoI along one
    axis, with torchvision's border rules (see the module docstring).

    Args:
      start, length: [R] float32, the RoI's start and extent on this axis (map pixels).
      size: [R] float32, the map's size on this axis for each RoI.
    Returns:
      ((low [R, n] int32, w_low [R, n]), (high [R, n] int32, w_high [R, n])).
    """
    n = bins * ratio
    step = length / float(n)
    pos = start[:, None] + (tf.range(n, dtype=tf.float32)[None, :] + 0.5) * step[:, None]
    low, high, frac, inside = _neighbours(pos, size[:, None])
    inside = tf.cast(inside, tf.float32)
    return ((tf.cast(low, tf.int32), (1.0 - frac) * inside),
            (tf.cast(high, tf.int32), frac * inside))


def _gather_pool(flat, base, width, boxes, sizes, output_size, ratio: int, aligned: bool):
    """RoIAlign by four gathers from a flat [rows, C] map (no crop_and_resize, no dynamic shape:
    XLA compiles it).

    Args:
      flat: [M, C] float32, every map's pixels row-major.
      base: [R] int32, the flat row of each RoI's map's pixel (0, 0).
      width: [R] int32, its map's width.
      boxes: [R, 4] in map pixels; sizes: [R, 2] float32 (height, width) of each RoI's map.
    Returns:
      [R, out_h, out_w, C] float32.
    """
    out_h, out_w = _as_pair(output_size)
    offset = 0.5 if aligned else 0.0
    y1, x1, y2, x2 = tf.unstack(boxes - offset, 4, axis=-1)
    roi_h, roi_w = y2 - y1, x2 - x1
    if not aligned:
        roi_h, roi_w = tf.maximum(roi_h, 1.0), tf.maximum(roi_w, 1.0)
    rows = _gather_axis(y1, roi_h, out_h, ratio, sizes[:, 0])
    cols = _gather_axis(x1, roi_w, out_w, ratio, sizes[:, 1])
    total = 0.0
    for yy, wy in rows:
        for xx, wx in cols:
            index = (base[:, None, None] + yy[:, :, None] * width[:, None, None]
                     + xx[:, None, :])
            weight = wy[:, :, None] * wx[:, None, :]
            total += tf.gather(flat, index) * weight[..., None]
    if ratio > 1:
        total = tf.nn.avg_pool2d(total, ratio, ratio, "VALID")
    return total


def roi_align_gather_flat(features: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor,
                          output_size, sampling_ratio: int = 2, aligned: bool = True
                          ) -> tf.Tensor:
    """:func:`roi_align_flat`'s numbers by gathers instead of ``crop_and_resize`` (which XLA,
    hence TPUs and ``jit_compile``, cannot compile). Memory: four [R, out * ratio, out * ratio,
    C] gathers, where crop_and_resize holds one.

    Args:
      features: [N_img, H, W, C]; boxes: [R, 4] in map pixels; box_indices: [R] int32;
      output_size: int or (out_h, out_w); sampling_ratio: >= 1 (adaptive sampling has no static
      number of samples); aligned: as :func:`roi_align_flat`.
    Returns:
      [R, out_h, out_w, C] in the features' dtype.
    """
    if int(sampling_ratio) < 1:
        raise ValueError(f"roi_align (gather): sampling_ratio must be >= 1, got "
                         f"{sampling_ratio}; adaptive sampling needs the crop_and_resize "
                         "implementation")
    image = tf.cast(features, tf.float32)
    shape = tf.shape(image)
    height, width = shape[1], shape[2]
    flat = tf.reshape(image, tf.stack([-1, shape[3]]))
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    r = tf.shape(boxes)[0]
    base = tf.cast(box_indices, tf.int32) * height * width
    sizes = tf.cast(tf.tile(tf.stack([height, width])[None], [r, 1]), tf.float32)
    out = _gather_pool(flat, base, tf.fill([r], width), boxes, sizes, output_size,
                       int(sampling_ratio), aligned)
    return tf.cast(out, features.dtype)


def roi_align(features: tf.Tensor, boxes: tf.Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = 2, aligned: bool = True) -> tf.Tensor:
    """RoIAlign over a batch, boxes given per image.

    Args:
      features: [B, H, W, C].
      boxes: [B, N, 4] (y1, x1, y2, x2) in image pixels; times ``spatial_scale`` gives
        feature-map pixels.
      output_size: int or (out_h, out_w).
      spatial_scale: feature-map pixels per image pixel (1 / stride).
      sampling_ratio: >= 1 sample points per bin side, or 0 for adaptive sampling.
      aligned: half-pixel shift (True, detectron2) or not (False, torchvision).
    Returns:
      [B, N, out_h, out_w, C]. Gradients flow to ``features`` only.

    Example (detectron2's test): a 5x5 map of 0..24, box x1=y1=1, x2=y2=3, 4x4 output,
    sampling_ratio 1, aligned=True -> first row [4.5, 5, 5.5, 6].
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    batch = tf.shape(boxes)[0]
    n = tf.shape(boxes)[1]
    flat = tf.reshape(boxes, [-1, 4]) * spatial_scale
    indices = tf.repeat(tf.range(batch), n)
    out = roi_align_flat(features, flat, indices, output_size, sampling_ratio, aligned)
    out_h, out_w = _as_pair(output_size)
    return tf.reshape(out, tf.concat([[batch, n, out_h, out_w], tf.shape(out)[-1:]], 0))


def roi_levels(boxes: tf.Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
               canonical_level: int = 4) -> tf.Tensor:
    """FPN level of each RoI (FPN paper eq. 1, torchvision's LevelMapper).

    level = floor(canonical_level + log2(sqrt(h * w) / canonical_size) + 1e-6), clamped to
    [min_level, max_level]. Examples with the defaults: 111 px -> 2, 113 -> 3, 223 -> 3,
    225 -> 4, 449 -> 5.

    Args:
      boxes: [..., 4] (y1, x1, y2, x2) image pixels.
    Returns:
      [...] int32 levels.
    """
    boxes = tf.cast(boxes, tf.float32)
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    size = tf.sqrt(tf.maximum(h * w, 0.0))
    level = tf.floor(canonical_level + tf.math.log(size / canonical_size) / math.log(2.0) + 1e-6)
    level = tf.clip_by_value(level, float(min_level), float(max_level))  # -inf (empty) -> min
    return tf.cast(level, tf.int32)


def _per_level(value, levels, name):
    if isinstance(value, dict):
        missing = [lv for lv in levels if lv not in value]
        if missing:
            raise ValueError(f"{name}: no entry for levels {missing}")
        return [int(value[lv]) for lv in levels]
    if isinstance(value, (list, tuple)):
        if len(value) != len(levels):
            raise ValueError(f"{name}: {len(value)} entries for {len(levels)} levels")
        return [int(v) for v in value]
    return [int(value)] * len(levels)


def multilevel_roi_align(features_by_level, boxes: tf.Tensor, output_size, sampling_ratio=2,
                         aligned: bool = True, min_level: int = 2, max_level: int = 5,
                         canonical_size: float = 224.0, canonical_level: int = 4,
                         impl: str = "crop_and_resize") -> tf.Tensor:
    """Pools each RoI from the one FPN level its size selects.

    Args:
      features_by_level: {level: [B, H_l, W_l, C]} with stride 2**level; levels
        ``min_level..max_level`` are used.
      boxes: [B, N, 4] (y1, x1, y2, x2) in image pixels.
      output_size: int or (out_h, out_w).
      sampling_ratio: one int for all levels, or a sequence / {level: int} per level (the user's
        notes ask whether a level-dependent number of samples helps).
      aligned, canonical_size, canonical_level: see :func:`roi_align` and :func:`roi_levels`.
      impl: ``crop_and_resize`` (the default): RoIs are partitioned by level
        (``tf.dynamic_partition``), each part is pooled from its level with crop_and_resize and
        the results are stitched back in order (with one sampling ratio, the crop boxes of all
        levels are computed at once and one gradient serves all levels). ``gather``: every RoI
        is pooled by gathers from the levels' maps flattened into one (no crop_and_resize, no
        dynamic shape: XLA compiles it); the same numbers, one sampling ratio for all levels.
    Returns:
      [B, N, out_h, out_w, C]. Either way every RoI is pooled once.
    """
    if impl not in ("crop_and_resize", "gather"):
        raise ValueError(f"multilevel_roi_align: impl must be 'crop_and_resize' or 'gather', got "
                         f"{impl!r}")
    levels = list(range(min_level, max_level + 1))
    missing = [lv for lv in levels if lv not in features_by_level]
    if missing:
        raise ValueError(f"multilevel_roi_align: no features for levels {missing}")
    ratios = _per_level(sampling_ratio, levels, "sampling_ratio")
    boxes = tf.stop_gradient(tf.convert_to_tensor(boxes, tf.float32))
    batch, n = dims(boxes)[:2]
    flat = tf.reshape(boxes, [-1, 4])
    if isinstance(batch, int) and isinstance(n, int):
        image_index = tf.constant(np.repeat(np.arange(batch, dtype=np.int32), n))
    else:
        image_index = tf.reshape(tf.tile(tf.range(batch)[:, None], tf.stack([1, n])), [-1])
    level = roi_levels(flat, min_level, max_level, canonical_size, canonical_level)
    level_index = level - min_level
    if impl == "gather":
        return _multilevel_gather(features_by_level, levels, flat, image_index, level_index,
                                  ratios, output_size, aligned, batch, n)
    positions = tf.range(tf.shape(flat)[0])
    part_images = tf.dynamic_partition(image_index, level_index, len(levels))
    part_positions = tf.dynamic_partition(positions, level_index, len(levels))
    if len(set(ratios)) == 1 and ratios[0] >= 1:
        pooled = _multilevel_crops(features_by_level, levels, flat, level_index, part_images,
                                   ratios[0], output_size, aligned)
    else:  # a sampling ratio per level, or adaptive: each level on its own
        part_boxes = tf.dynamic_partition(flat, level_index, len(levels))
        pooled = []
        for i, level in enumerate(levels):
            scale = 1.0 / (2.0 ** level)
            pooled.append(roi_align_flat(features_by_level[level], part_boxes[i] * scale,
                                         part_images[i], output_size, ratios[i], aligned))
    out = tf.dynamic_stitch(part_positions, pooled)
    out_h, out_w = _as_pair(output_size)
    channels = features_by_level[levels[0]].shape[-1]
    return tf.reshape(out, [batch, n, out_h, out_w, channels])


def _multilevel_crops(features_by_level, levels, boxes, level_index, part_images, ratio: int,
                      output_size, aligned):
    """The ``crop_and_resize`` path of :func:`multilevel_roi_align` with one sampling ratio: the
    crop boxes of all RoIs computed at once (each with its level's scale and map size), then
    one crop_and_resize per level (:func:`crop_and_resize_levels`: one gradient for all levels)
    and its average pool. The same float32 arithmetic as :func:`roi_align_flat` on each level
    (bit for bit, forward and gradient, as written; TensorFlow's graph rewrites round either
    in its own way, about 1e-5 relative), with a graph that grows by one crop and one pool per
    level rather than by a whole RoIAlign per level.

    Args:
      boxes: [R, 4] image pixels; level_index: [R] int32 position in ``levels``;
      part_images: per level, the image index of its RoIs (``tf.dynamic_partition`` order).
    Returns:
      per level, [R_l, out_h, out_w, C] in the features' dtype.
    """
    out_h, out_w = _as_pair(output_size)
    maps = [tf.convert_to_tensor(features_by_level[lv]) for lv in levels]
    dtype = maps[0].dtype
    images = [m if m.dtype in (tf.float16, tf.float32, tf.float64) else tf.cast(m, tf.float32)
              for m in maps]  # crop_and_resize has no bfloat16 kernel
    shapes = [dims(m) for m in maps]

    def per_roi(values):  # each RoI's level's value, float32: [R]
        return tf.gather(tf.cast(tf.stack(values), tf.float32), level_index)

    scale = per_roi([1.0 / (2.0 ** lv) for lv in levels])
    y1, x1, y2, x2 = tf.unstack(boxes * scale[:, None] - (0.5 if aligned else 0.0), 4, axis=-1)
    roi_h, roi_w = y2 - y1, x2 - x1
    if not aligned:
        roi_h, roi_w = tf.maximum(roi_h, 1.0), tf.maximum(roi_w, 1.0)
    first_y, last_y = _sample_span(y1, roi_h, out_h, ratio)
    first_x, last_x = _sample_span(x1, roi_w, out_w, ratio)
    # Padded maps have size + 2 rows; crop_and_resize normalises by (padded size - 1).
    norm_h = per_roi([h + 1 for _, h, _, _ in shapes])
    norm_w = per_roi([w + 1 for _, _, w, _ in shapes])
    crop_boxes = tf.stack([(first_y + 1.0) / norm_h, (first_x + 1.0) / norm_w,
                           (last_y + 1.0) / norm_h, (last_x + 1.0) / norm_w], axis=-1)
    part_boxes = tf.dynamic_partition(crop_boxes, level_index, len(levels))
    crops = crop_and_resize_levels(images, part_boxes, part_images,
                                   (out_h * ratio, out_w * ratio))
    if ratio > 1:  # the mean of each ratio x ratio block of samples (see roi_align_flat)
        crops = [tf.nn.avg_pool2d(c, ratio, ratio, "VALID") for c in crops]
    return [tf.cast(c, dtype) for c in crops]


def _multilevel_gather(features_by_level, levels, boxes, image_index, level_index, ratios,
                       output_size, aligned, batch, n):
    """The ``gather`` path of :func:`multilevel_roi_align`: the levels' maps flattened into one
    [sum_l B * H_l * W_l, C] tensor; each RoI reads its level through its own base row, width,
    size and scale."""
    if len(set(ratios)) != 1:
        raise ValueError("multilevel_roi_align (gather): one sampling ratio for all levels")
    maps = [tf.cast(features_by_level[lv], tf.float32) for lv in levels]
    channels = maps[0].shape[-1]
    heights = tf.stack([tf.shape(m)[1] for m in maps])
    widths = tf.stack([tf.shape(m)[2] for m in maps])
    counts = tf.stack([tf.size(m) // tf.shape(m)[3] for m in maps])
    starts = tf.concat([[0], tf.cumsum(counts)[:-1]], 0)
    flat = tf.concat([tf.reshape(m, tf.stack([-1, tf.shape(m)[3]])) for m in maps], 0)
    h = tf.gather(heights, level_index)
    w = tf.gather(widths, level_index)
    base = tf.gather(starts, level_index) + image_index * h * w
    scale = tf.pow(2.0, -tf.cast(level_index + levels[0], tf.float32))
    sizes = tf.cast(tf.stack([h, w], axis=-1), tf.float32)
    out = _gather_pool(flat, base, w, boxes * scale[:, None], sizes, output_size, ratios[0],
                       aligned)
    out_h, out_w = _as_pair(output_size)
    dtype = features_by_level[levels[0]].dtype
    return tf.cast(tf.reshape(out, [batch, n, out_h, out_w, channels]), dtype)
