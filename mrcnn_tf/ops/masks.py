"""Instance masks: ground-truth crops for the mask head, and pasting predicted masks into images."""

from __future__ import annotations

import tensorflow as tf

from mrcnn_tf.ops._graph import graph_when_eager
from mrcnn_tf.ops.roi_align import adaptive_window, axis_weights_static, roi_align_flat, roi_extent


def crop_masks(masks: tf.Tensor, boxes: tf.Tensor, mask_indices: tf.Tensor, output_size: int = 28,
               sampling_ratio: int = 2, aligned: bool = True) -> tf.Tensor:
    """Crops each RoI's ground-truth mask and resizes it to ``output_size`` (mask targets).

    Uses the same crop_and_resize-based RoIAlign as the features, so a target pixel is the average
    coverage of its bin, exactly what RoIAlign of the mask would give (torchvision builds its
    targets with roi_align as well).

    Args:
      masks: [B, M, H, W] full-frame masks (0/1, any numeric dtype).
      boxes: [B, R, 4] (y1, x1, y2, x2) in the masks' pixel frame.
      mask_indices: [B, R] int32, which of the M masks each RoI is cropped from.
      output_size: side of the square target (28 in the paper).
    Returns:
      [B, R, output_size, output_size] float32 in [0, 1].
    """
    masks = tf.cast(masks, tf.float32)
    shape = tf.shape(masks)
    batch, num_masks = shape[0], shape[1]
    images = tf.reshape(masks, tf.concat([[-1], shape[2:4], [1]], 0))  # [B*M, H, W, 1]
    r = tf.shape(boxes)[1]
    image_index = tf.range(batch)[:, None] * num_masks + tf.cast(mask_indices, tf.int32)
    out = roi_align_flat(images, tf.reshape(tf.cast(boxes, tf.float32), [-1, 4]),
                         tf.reshape(image_index, [-1]), output_size, sampling_ratio, aligned)
    return tf.reshape(out, [batch, r, output_size, output_size])


def roi_align_masks(masks: tf.Tensor, boxes: tf.Tensor, mask_indices: tf.Tensor,
                    content_sizes: tf.Tensor, output_size: int = 28, aligned: bool = True
                    ) -> tf.Tensor:
    """RoIAlign of ground-truth masks with adaptive sampling (``sampling_ratio=0``): the mask
    targets of torchvision (``project_masks_on_boxes``: aligned=False, kept soft) and detectron2
    (``BitMasks.crop_and_resize``: aligned=True, then >= 0.5).

    Each bin averages ``ceil(roi_h / size) x ceil(roi_w / size)`` bilinear samples, a number that
    differs per RoI: ``Wy @ mask @ Wx^T`` on the RoI's window (see
    :func:`mrcnn_tf.ops.roi_align.adaptive_window`), one RoI at a time: exact for any RoI size,
    and only the covered pixels are read.

    Args:
      masks: [B, M, H, W] full-frame 0/1 masks (any numeric dtype).
      boxes: [B, R, 4] (y1, x1, y2, x2) in mask pixels; no gradient flows through them.
      mask_indices: [B, R] int32, which of the M masks each RoI reads.
      content_sizes: [B, 2] int32 (height, width) of each image's content: the border rules
        apply there, as in the references, where the mask has the image's size.
      output_size: side of the target (28).
      aligned: half-pixel shift (detectron2) or not (torchvision; the RoI is then at least 1x1).
    Returns:
      [B, R, output_size, output_size] float32 in [0, 1].

    Example: a 4x4 mask whose left half is 1, RoI (0, 0, 4, 4), output 2, aligned=True: the RoI
    starts at -0.5 and each bin has 2 x 2 samples, at x = 0 and 1 in the left bins (-> 1.0) and
    x = 2 and 3 in the right ones (-> 0.0).
    """
    return _roi_align_masks(masks, boxes, mask_indices, content_sizes, int(output_size),
                            bool(aligned))


@graph_when_eager
def _roi_align_masks(masks, boxes, mask_indices, content_sizes, output_size, aligned):
    masks = tf.convert_to_tensor(masks)
    shape = tf.shape(masks)
    batch, num_masks = shape[0], shape[1]
    flat_masks = tf.reshape(masks, tf.concat([[-1], shape[2:4]], 0))  # [B*M, H, W]
    r = tf.shape(boxes)[1]
    boxes = tf.reshape(tf.stop_gradient(tf.cast(boxes, tf.float32)), [-1, 4])
    which = tf.reshape(tf.range(batch)[:, None] * num_masks + tf.cast(mask_indices, tf.int32),
                       [-1])
    sizes = tf.reshape(tf.repeat(tf.cast(content_sizes, tf.int32), r, axis=0), [-1, 2])

    def one(args):
        box, index, size = args
        (r0, r1, c0, c1), wy, wx = adaptive_window(box, size, output_size, aligned)
        window = tf.cast(flat_masks[index, r0:r1, c0:c1], tf.float32)
        return tf.matmul(tf.matmul(wy, window), wx, transpose_b=True)

    out = tf.map_fn(one, (boxes, which, sizes), parallel_iterations=16,
                    fn_output_signature=tf.TensorSpec([output_size, output_size], tf.float32))
    return tf.reshape(out, tf.stack([batch, r, output_size, output_size]))


def roi_align_masks_static(masks: tf.Tensor, boxes: tf.Tensor, mask_indices: tf.Tensor,
                           content_sizes: tf.Tensor, output_size: int = 28, aligned: bool = True
                           ) -> tf.Tensor:
    """:func:`roi_align_masks` on static shapes, which XLA compiles (``model.roi_align.impl:
    gather``): the same numbers, from the per-axis weights over the whole mask
    (:func:`mrcnn_tf.ops.roi_align.axis_weights_static`) instead of a per-RoI window.

    Costs ``2 * output_size * H * W`` multiply-adds per RoI instead of the window's; the loop
    over RoIs keeps memory at one [H, W] mask per iteration.

    Args and returns: as :func:`roi_align_masks`; ``masks`` must have a static H and W.
    """
    masks = tf.convert_to_tensor(masks)
    height, width = masks.shape[2], masks.shape[3]
    if height is None or width is None:
        raise ValueError("roi_align_masks_static: the masks' height and width must be static, "
                         f"got {masks.shape}")
    shape = tf.shape(masks)
    batch, num_masks = shape[0], shape[1]
    flat_masks = tf.reshape(masks, [-1, height, width])
    r = tf.shape(boxes)[1]
    boxes = tf.reshape(tf.stop_gradient(tf.cast(boxes, tf.float32)), [-1, 4])
    which = tf.reshape(tf.range(batch)[:, None] * num_masks + tf.cast(mask_indices, tf.int32),
                       [-1])
    sizes = tf.reshape(tf.repeat(tf.cast(content_sizes, tf.int32), r, axis=0), [-1, 2])
    y1, x1, h, w = roi_extent(boxes, aligned)
    wy = axis_weights_static(y1, h, output_size, sizes[:, 0], height)  # [R, out, H]
    wx = axis_weights_static(x1, w, output_size, sizes[:, 1], width)  # [R, out, W]

    def one(args):
        a, b, index = args
        mask = tf.cast(tf.gather(flat_masks, index), tf.float32)
        return tf.matmul(tf.matmul(a, mask), b, transpose_b=True)

    out = tf.map_fn(one, (wy, wx, which), parallel_iterations=16,
                    fn_output_signature=tf.TensorSpec([output_size, output_size], tf.float32))
    return tf.reshape(out, tf.stack([batch, r, output_size, output_size]))


def paste_masks(masks: tf.Tensor, boxes: tf.Tensor, height, width,
                threshold: float | None = 0.5, method: str = "detectron2") -> tf.Tensor:
    """Pastes per-box mask probabilities into an image frame.

    ``detectron2``: each image pixel centre is mapped into its box's mask and bilinearly
    interpolated with zeros outside the mask (detectron2's ``paste_masks_in_image``: grid_sample,
    align_corners=False). Implemented as one crop_and_resize per box over the mask padded with a
    zero border.
    ``torchvision``: torchvision's ``paste_masks_in_image``: the mask gets a zero border, its box
    is scaled by (m + 2) / m about the centre and truncated to integers, the padded mask is resized
    (bilinear, align_corners=False) to the integer box's (y2 - y1 + 1) x (x2 - x1 + 1) pixels and
    written there. See ``_paste_torchvision``.
    Either is then thresholded with ``>= threshold``.

    Args:
      masks: [B, D, m, m] probabilities (or [D, m, m]).
      boxes: [B, D, 4] (y1, x1, y2, x2) in pixels of the target frame (or [D, 4]).
      height, width: the target frame's size (ints or scalar tensors).
      threshold: binarisation threshold, or None to return the interpolated probabilities.
    Returns:
      [B, D, height, width] uint8 0/1 (float32 probabilities if ``threshold`` is None).
    """
    if method not in ("detectron2", "torchvision"):
        raise ValueError(f"paste_masks: method must be 'detectron2' or 'torchvision', got "
                         f"{method!r}")
    masks = tf.convert_to_tensor(masks)
    unbatched = masks.shape.rank == 3
    if unbatched:
        masks, boxes = masks[None], tf.convert_to_tensor(boxes)[None]
    if method == "torchvision":
        pasted = _paste_torchvision(masks, boxes, height, width)
    else:
        pasted = _paste_detectron2(masks, boxes, height, width)
    if threshold is not None:
        pasted = tf.cast(pasted >= threshold, tf.uint8)
    return pasted[0] if unbatched else pasted


def _paste_detectron2(masks, boxes, height, width):
    """detectron2's paste (probabilities) of [B, D, m, m] masks -> [B, D, height, width]."""
    shape = tf.shape(masks)
    batch, num, m_h, m_w = shape[0], shape[1], shape[2], shape[3]
    flat = tf.reshape(tf.cast(masks, tf.float32), tf.stack([-1, m_h, m_w, 1]))
    flat = tf.pad(flat, [[0, 0], [1, 1], [1, 1], [0, 0]])  # zeros outside, as grid_sample
    y0, x0, y1, x1 = tf.unstack(tf.reshape(tf.cast(boxes, tf.float32), [-1, 4]), 4, axis=-1)
    box_h = tf.maximum(y1 - y0, 1e-6)
    box_w = tf.maximum(x1 - x0, 1e-6)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    fm_h = tf.cast(m_h, tf.float32)
    fm_w = tf.cast(m_w, tf.float32)

    def to_mask(pixel, start, size, m):  # image pixel index -> padded-mask coordinate
        return (pixel + 0.5 - start) * m / size - 0.5 + 1.0

    last_y = tf.cast(height - 1, tf.float32)
    last_x = tf.cast(width - 1, tf.float32)
    crop = tf.stack([to_mask(0.0, y0, box_h, fm_h) / (fm_h + 1.0),
                     to_mask(0.0, x0, box_w, fm_w) / (fm_w + 1.0),
                     to_mask(last_y, y0, box_h, fm_h) / (fm_h + 1.0),
                     to_mask(last_x, x0, box_w, fm_w) / (fm_w + 1.0)], axis=-1)
    pasted = tf.image.crop_and_resize(flat, crop, tf.range(tf.shape(flat)[0]),
                                      tf.stack([height, width]), method="bilinear",
                                      extrapolation_value=0.0)[..., 0]
    return tf.reshape(pasted, tf.stack([batch, num, height, width]))


def _interp_matrix(start, end, size, m_pad):
    """[N, size, m_pad] weights that resize a padded mask axis of m_pad cells onto the image
    pixels start..end (integers, inclusive), as torch's bilinear ``F.interpolate`` with
    align_corners=False does; rows outside start..end and outside the image are zero."""
    length = tf.maximum(end - start + 1.0, 1.0)  # [N]
    pixel = tf.range(tf.cast(size, tf.float32))[None, :]  # [1, size]
    j = pixel - start[:, None]  # index in the resized mask
    scale = tf.cast(m_pad, tf.float32) / length[:, None]
    src = tf.maximum((j + 0.5) * scale - 0.5, 0.0)
    i0 = tf.floor(src)
    lam = src - i0
    i0 = tf.cast(i0, tf.int32)
    i1 = tf.minimum(i0 + 1, m_pad - 1)
    inside = (j >= 0.0) & (j < length[:, None])
    w0 = tf.one_hot(i0, m_pad) * (1.0 - lam)[..., None]
    w1 = tf.one_hot(i1, m_pad) * lam[..., None]
    return tf.where(inside[..., None], w0 + w1, 0.0)


def _paste_torchvision(masks, boxes, height, width):
    """torchvision's paste (probabilities) of [B, D, m, m] masks -> [B, D, height, width].

    The resize is separable: pasted = Wy @ padded_mask @ Wx^T per box, with the 1-D bilinear
    weights of ``_interp_matrix``.
    """
    shape = tf.shape(masks)
    batch, num, m = shape[0], shape[1], shape[2]
    flat = tf.reshape(tf.cast(masks, tf.float32), tf.stack([-1, m, m]))
    flat = tf.pad(flat, [[0, 0], [1, 1], [1, 1]])
    scale = tf.cast(m + 2, tf.float32) / tf.cast(m, tf.float32)
    y0, x0, y1, x1 = tf.unstack(tf.reshape(tf.cast(boxes, tf.float32), [-1, 4]), 4, axis=-1)
    half_h, half_w = (y1 - y0) * 0.5 * scale, (x1 - x0) * 0.5 * scale
    cy, cx = (y1 + y0) * 0.5, (x1 + x0) * 0.5
    # torch's .to(int64) truncates toward zero.
    def trunc(v):
        return tf.sign(v) * tf.floor(tf.abs(v))

    ey0, ey1, ex0, ex1 = trunc(cy - half_h), trunc(cy + half_h), trunc(cx - half_w), trunc(
        cx + half_w)
    wy = _interp_matrix(ey0, ey1, height, m + 2)  # [N, H, m + 2]
    wx = _interp_matrix(ex0, ex1, width, m + 2)  # [N, W, m + 2]
    pasted = tf.matmul(tf.matmul(wy, flat), wx, transpose_b=True)
    return tf.reshape(pasted, tf.stack([batch, num, height, width]))
