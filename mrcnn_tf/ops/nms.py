"""Non-maximum suppression with static, padded outputs.

Greedy NMS exactly as torchvision's ``nms``: highest score first, a box is suppressed when its IoU
with a kept box is strictly greater than the threshold (IoU exactly at the threshold survives).
Outputs always have the requested size; ``valid`` / ``num_*`` say how many rows are real.

Two implementations keep the same boxes (``impl``): ``tf`` uses TensorFlow's NMS kernels
(NonMaxSuppressionV5, CombinedNonMaxSuppression), ``static`` is the same greedy rule written with
top_k, IoU matrices and a few loop iterations over tiles of the ranked boxes, on static shapes,
which XLA compiles and tf2onnx converts (TensorFlow's NMS kernels have no XLA kernel, and ONNX
none with per-class boxes).
"""

from __future__ import annotations

import tensorflow as tf

from mrcnn_tf.ops._graph import graph_when_eager

# Scores of rows that must never be selected; any real score (probability or logit) is above it.
INVALID_SCORE = -1e30


# Ranked boxes per tile of the static NMS: each tile is one loop iteration (plus the few of its
# own fixed point). Larger tiles mean fewer iterations but IoU matrices of more wasted pairs;
# 128 suits the detection NMS's 90 classes x 1000 RoIs (benchmarks/README.md).
NMS_TILE = 128


def _iou(a, b):
    """IoU of boxes ``a`` and ``b`` [..., 4] (y1, x1, y2, x2), broadcast against each other;
    0 for an empty union (torchvision's NaN, which never suppresses)."""
    y1 = tf.maximum(a[..., 0], b[..., 0])
    x1 = tf.maximum(a[..., 1], b[..., 1])
    y2 = tf.minimum(a[..., 2], b[..., 2])
    x2 = tf.minimum(a[..., 3], b[..., 3])
    inter = tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)

    def area(t):
        return (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1])

    return tf.math.divide_no_nan(inter, area(a) + area(b) - inter)


@graph_when_eager
def _greedy_keep(ranked_boxes, alive, iou_threshold: float, tile: int = NMS_TILE):
    """Greedy NMS over boxes already in decreasing score order: box i, if still kept when its
    turn comes, suppresses every later box whose IoU with it is > ``iou_threshold``.

    Tile by tile (Model Garden's sorted_non_max_suppression_padded, written here): a tile's
    boxes are first suppressed by the kept boxes of the tiles before it (one IoU matrix), then
    among themselves by iterating keep[j] = alive[j] and no kept i < j overlaps j, from the
    tile's alive boxes until nothing changes. Greedy NMS's result is the unique fixed point of
    that rule (box j's fate depends only on the boxes before it), so the loop ends on it: the
    same boxes as the per-box loop, ties included. The tile loop stops once no box from the
    current tile on is alive (ranked boxes are alive first, so mostly dead tiles cost nothing).

    Args:
      ranked_boxes: [..., N, 4]; alive: [..., N] bool (False rows are never kept).
    Returns:
      the kept mask [..., N].
    """
    n = tf.shape(alive)[-1]  # a constant wherever XLA compiles the loop
    boxes = tf.reshape(tf.cast(ranked_boxes, tf.float32), tf.stack([-1, n, 4]))
    keep = tf.reshape(alive, tf.stack([-1, n]))
    tiles = (n + tile - 1) // tile
    total = tiles * tile
    boxes = tf.pad(boxes, [[0, 0], [0, total - n], [0, 0]])
    keep = tf.pad(keep, [[0, 0], [0, total - n]])
    position = tf.range(total)
    before = tf.range(tile)[:, None] < tf.range(tile)[None, :]  # [i, j]: i ranks before j

    def tile_step(k, tiles, keep):
        # Slices of a static size at a loop position (XLA's DynamicSlice, ONNX's Slice).
        start = k * tile
        tile_boxes = tf.slice(boxes, tf.stack([0, start, 0]), [-1, tile, 4])  # [R, T, 4]
        alive_here = tf.slice(keep, tf.stack([0, start]), [-1, tile])
        earlier = keep & (position < start)[None, :]  # kept boxes of the earlier tiles
        overlap = _iou(boxes[:, :, None, :], tile_boxes[:, None, :, :]) > iou_threshold
        alive_here &= ~tf.reduce_any(overlap & earlier[:, :, None], axis=1)
        inside = (_iou(tile_boxes[:, :, None, :], tile_boxes[:, None, :, :]) > iou_threshold
                  ) & before

        def settle(current, _):
            return alive_here & ~tf.reduce_any(inside & current[:, :, None], axis=1), current

        first, _ = settle(alive_here, alive_here)
        kept, _ = tf.while_loop(lambda cur, prev: tf.reduce_any(tf.not_equal(cur, prev)),
                                settle, (first, alive_here))
        in_tile = (position >= start) & (position < start + tile)
        placed = tf.gather(kept, tf.clip_by_value(position - start, 0, tile - 1), axis=1)
        return k + 1, tiles, tf.where(in_tile[None, :], placed, keep)

    def more(k, tiles, keep):
        return (k < tiles) & tf.reduce_any(keep & (position >= k * tile)[None, :])

    # tiles is a loop variable, not a capture, so that converters (tf2onnx) bind the condition.
    _, _, keep = tf.while_loop(more, tile_step, (tf.constant(0), tiles, keep))
    return tf.reshape(keep[:, :n], tf.shape(alive))


def _first_kept(keep, k: int):
    """Positions [..., k] of the first ``k`` True entries of ``keep`` [..., N] (in order) and
    whether each is real; N may be dynamic (then a position past the kept ones is N)."""
    n = tf.shape(keep)[-1]
    rank = tf.where(keep, n - tf.range(n), 0)  # earlier positions rank higher
    pad = tf.zeros(tf.concat([tf.shape(keep)[:-1], [k]], 0), rank.dtype)  # k <= N + k always
    top = tf.math.top_k(tf.concat([rank, pad], -1), k)
    real = top.values > 0
    return tf.where(real, n - top.values, 0), real


def non_max_suppression_static(boxes: tf.Tensor, scores: tf.Tensor, max_output_size: int,
                               iou_threshold: float, valid: tf.Tensor | None = None) -> dict:
    """:func:`non_max_suppression`'s result with ops XLA compiles and tf2onnx converts: boxes
    ranked by ``top_k`` (ties: lower index first), then the greedy loop. Shapes are static
    wherever the input's are."""
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    if valid is not None:
        scores = tf.where(valid, scores, INVALID_SCORE)
    n = tf.shape(scores)[1]
    ranked = tf.math.top_k(scores, n)
    ranked_boxes = tf.gather(boxes, ranked.indices, batch_dims=1)
    alive = ranked.values > INVALID_SCORE / 2
    keep = tf.ensure_shape(_greedy_keep(ranked_boxes, alive, iou_threshold), alive.shape)
    pos, real = _first_kept(keep, max_output_size)
    # One padding column, so that a position past the boxes (N = 0 among them) gathers safely.
    order = tf.pad(ranked.indices, [[0, 0], [0, 1]])
    indices = tf.gather(order, pos, batch_dims=1)
    return {"indices": tf.where(real, indices, 0), "valid": real,
            "num_valid": tf.reduce_sum(tf.cast(real, tf.int32), axis=1)}


def non_max_suppression(boxes: tf.Tensor, scores: tf.Tensor, max_output_size: int,
                        iou_threshold: float, valid: tf.Tensor | None = None,
                        impl: str = "tf") -> dict:
    """Per-image greedy NMS over a batch.

    Args:
      boxes: [B, N, 4] (y1, x1, y2, x2).
      scores: [B, N].
      max_output_size: K rows kept per image at most.
      iou_threshold: suppress boxes whose IoU with a kept box is > this.
      valid: optional [B, N] bool; False rows are never kept.
      impl: "tf" (NonMaxSuppressionV5) or "static" (:func:`non_max_suppression_static`).
    Returns:
      dict with ``indices`` [B, K] int32 into N in decreasing score order (0 where invalid),
      ``valid`` [B, K] bool, ``num_valid`` [B] int32.
    """
    if impl == "static":
        return non_max_suppression_static(boxes, scores, max_output_size, iou_threshold, valid)
    if impl != "tf":
        raise ValueError(f"non_max_suppression: impl must be 'tf' or 'static', got {impl!r}")
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    if valid is not None:
        scores = tf.where(valid, scores, INVALID_SCORE)

    def one(args):
        b, s = args
        idx, _, num = tf.raw_ops.NonMaxSuppressionV5(
            boxes=b, scores=s, max_output_size=max_output_size, iou_threshold=iou_threshold,
            score_threshold=INVALID_SCORE / 2, soft_nms_sigma=0.0, pad_to_max_output_size=True)
        return idx, num

    indices, num = tf.map_fn(one, (boxes, scores),
                             fn_output_signature=(tf.TensorSpec([max_output_size], tf.int32),
                                                  tf.TensorSpec([], tf.int32)))
    keep = tf.range(max_output_size)[None, :] < num[:, None]
    return {"indices": tf.where(keep, indices, 0), "valid": keep, "num_valid": num}


def _pad_rows(x: tf.Tensor, rows, value) -> tf.Tensor:
    """``x`` [B, N, ...] padded with ``value`` to [B, rows, ...] (N <= rows); no op when N is
    statically ``rows``."""
    n = x.shape[1]
    if n is not None and isinstance(rows, int) and n == rows:
        return x
    extra = rows - (n if n is not None else tf.shape(x)[1])
    paddings = [[0, 0], [0, extra]] + [[0, 0]] * (x.shape.rank - 2)
    out = tf.pad(x, paddings, constant_values=value)
    if isinstance(rows, int):
        out = tf.ensure_shape(out, [x.shape[0], rows, *x.shape[2:]])
    return out


def stack_levels(tensors, rows, value=0) -> tf.Tensor:
    """Per-level [B, K_l, ...] tensors -> [B, L, rows, ...], each padded with ``value`` to
    ``rows`` (an int, or a scalar tensor when some K_l is dynamic)."""
    return tf.stack([_pad_rows(t, rows, value) for t in tensors], axis=1)


def proposal_nms(boxes_by_level, scores_by_level, valid_by_level, max_output_size: int,
                 iou_threshold: float, per_level: bool = True, impl: str = "tf") -> dict:
    """NMS of RPN proposals, within each level (torchvision, detectron2) or across all levels.

    Per level: NMS runs on each level independently, then the survivors of all levels are ranked
    by score and the top ``max_output_size`` kept (torchvision's ``batched_nms`` with level ids
    followed by ``keep[:post_nms_top_n]``).

    Args:
      boxes_by_level: list of [B, K_l, 4]; scores_by_level: list of [B, K_l];
      valid_by_level: list of [B, K_l] bool.
      max_output_size: P proposals per image.
      impl: see :func:`non_max_suppression`.
    Returns:
      dict with ``boxes`` [B, P, 4], ``scores`` [B, P] (INVALID_SCORE where invalid),
      ``valid`` [B, P] bool, ``level_index`` [B, P] int32 (position in the input lists), sorted by
      decreasing score with valid rows first.
    """
    boxes_by_level = [tf.cast(b, tf.float32) for b in boxes_by_level]
    scores_by_level = [tf.cast(s, tf.float32) for s in scores_by_level]
    valid_by_level = [tf.cast(v, tf.bool) for v in valid_by_level]
    sizes = [b.shape[1] for b in boxes_by_level]
    if all(k is not None for k in sizes):
        rows = max(sizes)
    else:
        rows = tf.reduce_max(tf.stack([tf.shape(b)[1] for b in boxes_by_level]))
    return proposal_nms_stacked(stack_levels(boxes_by_level, rows, 0.0),
                                stack_levels(scores_by_level, rows, 0.0),
                                stack_levels(valid_by_level, rows, False), max_output_size,
                                iou_threshold, per_level, impl)


def proposal_nms_stacked(boxes: tf.Tensor, scores: tf.Tensor, valid: tf.Tensor,
                         max_output_size: int, iou_threshold: float, per_level: bool = True,
                         impl: str = "tf") -> dict:
    """:func:`proposal_nms` on the levels stacked and padded to one length K (padding rows not
    ``valid``): one NMS over the B x L rows instead of one per level, so that the traced graph
    does not grow with the number of levels. The same proposals in the same order: padding
    rows are never kept, and the levels' candidates stay level-major for the final ranking.

    Args:
      boxes: [B, L, K, 4]; scores: [B, L, K]; valid: [B, L, K] bool.
    Returns:
      as :func:`proposal_nms`.
    """
    levels, rows = boxes.shape[1], boxes.shape[2]
    if levels is None:
        raise ValueError("proposal_nms: the number of levels must be static")
    rows = rows if rows is not None else tf.shape(boxes)[2]
    scores = tf.where(valid, scores, INVALID_SCORE)
    if per_level:
        k = min(max_output_size, rows) if isinstance(rows, int) else max_output_size
        flat_boxes = tf.reshape(boxes, [-1, rows, 4])
        flat_scores = tf.reshape(scores, [-1, rows])
        kept = non_max_suppression(flat_boxes, flat_scores, k, iou_threshold, impl=impl)
        # Each level's survivors in NMS order, the levels one after the other: [B, L * k].
        boxes = tf.reshape(tf.gather(flat_boxes, kept["indices"], batch_dims=1),
                           [-1, levels * k, 4])
        scores = tf.reshape(tf.where(kept["valid"], tf.gather(flat_scores, kept["indices"],
                                                              batch_dims=1), INVALID_SCORE),
                            [-1, levels * k])
        valid = tf.reshape(kept["valid"], [-1, levels * k])
        level_ids = tf.repeat(tf.range(levels), k)
        order, in_range = _top_k_padded(scores, max_output_size)
        valid = tf.gather(valid, order, batch_dims=1) & in_range
    else:
        boxes = tf.reshape(boxes, [-1, levels * rows, 4])
        scores = tf.reshape(scores, [-1, levels * rows])
        level_ids = tf.repeat(tf.range(levels), rows)
        kept = non_max_suppression(boxes, scores, max_output_size, iou_threshold, impl=impl)
        order, valid = kept["indices"], kept["valid"]
    out_scores = tf.where(valid, tf.gather(scores, order, batch_dims=1), INVALID_SCORE)
    out_boxes = tf.where(valid[..., None], tf.gather(boxes, order, batch_dims=1), 0.0)
    return {"boxes": out_boxes, "scores": out_scores, "valid": valid,
            "level_index": tf.where(valid, tf.gather(level_ids, order), 0)}


def _top_k_padded(scores, k):
    """Indices [B, k] of the k highest scores per row and whether each is a real row.

    k may exceed the row length N: the extra positions point at row 0 and are flagged False.
    """
    n = tf.shape(scores)[1]
    padded = tf.pad(scores, [[0, 0], [0, k]], constant_values=INVALID_SCORE)
    idx = tf.math.top_k(padded, k).indices
    in_range = idx < n
    return tf.where(in_range, idx, 0), in_range


def multiclass_nms(boxes: tf.Tensor, scores: tf.Tensor, max_detections: int,
                   iou_threshold: float, score_threshold: float, valid: tf.Tensor | None = None,
                   impl: str = "tf") -> dict:
    """Per-class NMS then the top ``max_detections`` over all classes (detection post-processing).

    Same result as torchvision's ``postprocess_detections`` after its score and size filters:
    every (box, class) pair with score > ``score_threshold`` is a candidate, NMS runs within each
    class, and the best ``max_detections`` survivors are kept, sorted by score.

    Args:
      boxes: [B, N, C, 4] class-specific boxes, or [B, N, 1, 4] shared by all classes.
      scores: [B, N, C] (no background column).
      valid: optional [B, N, C] bool; False pairs are never kept (e.g. boxes too small).
      impl: "tf" (CombinedNonMaxSuppression) or "static" (the greedy loop run for all classes
        at once, each class over its own ranking; XLA compiles it).
    Returns:
      dict with ``detection_boxes`` [B, D, 4], ``detection_scores`` [B, D],
      ``detection_classes`` [B, D] int32 in 0..C-1 (column of ``scores``),
      ``num_detections`` [B] int32. Rows past ``num_detections`` are zero.
    """
    scores = tf.cast(scores, tf.float32)
    if valid is not None:
        scores = tf.where(valid, scores, 0.0)
        score_threshold = max(float(score_threshold), 0.0)
    if impl == "static":
        return _multiclass_nms_static(tf.cast(boxes, tf.float32), scores, max_detections,
                                      iou_threshold, score_threshold)
    if impl != "tf":
        raise ValueError(f"multiclass_nms: impl must be 'tf' or 'static', got {impl!r}")
    out = tf.image.combined_non_max_suppression(
        tf.cast(boxes, tf.float32), scores, max_output_size_per_class=max_detections,
        max_total_size=max_detections, iou_threshold=iou_threshold,
        score_threshold=score_threshold, pad_per_class=False, clip_boxes=False)
    num = out.valid_detections
    keep = tf.range(max_detections)[None, :] < num[:, None]
    return {
        "detection_boxes": tf.where(keep[..., None], out.nmsed_boxes, 0.0),
        "detection_scores": tf.where(keep, out.nmsed_scores, 0.0),
        "detection_classes": tf.where(keep, tf.cast(out.nmsed_classes, tf.int32), 0),
        "num_detections": tf.cast(num, tf.int32),
    }


def _multiclass_nms_static(boxes, scores, max_detections: int, iou_threshold: float,
                           score_threshold: float) -> dict:
    """:func:`multiclass_nms` on static shapes: each class ranks its own candidates (score >
    ``score_threshold``), the greedy loop runs over rank i of every class at once, and the best
    ``max_detections`` survivors over all classes are kept."""
    n, c = scores.shape[1], scores.shape[2]
    if n is None or c is None:
        raise ValueError("multiclass_nms (static): the number of boxes and classes must be "
                         "static")
    per_class = tf.transpose(scores, [0, 2, 1])  # [B, C, N]
    class_boxes = tf.transpose(tf.broadcast_to(boxes, tf.concat([tf.shape(scores), [4]], 0)),
                               [0, 2, 1, 3])  # [B, C, N, 4]
    ranked = tf.math.top_k(per_class, n)
    ranked_boxes = tf.gather(class_boxes, ranked.indices, batch_dims=2)
    alive = ranked.values > score_threshold
    keep = tf.ensure_shape(_greedy_keep(ranked_boxes, alive, iou_threshold), alive.shape)
    kept_scores = tf.reshape(tf.where(keep, ranked.values, -1.0), tf.stack([-1, c * n]))
    top = tf.math.top_k(kept_scores, min(max_detections, c * n))
    real = top.values >= 0.0
    classes = top.indices // n
    boxes_out = tf.gather(tf.reshape(ranked_boxes, tf.stack([-1, c * n, 4])), top.indices,
                          batch_dims=1)
    pad = max_detections - min(max_detections, c * n)
    out = {
        "detection_boxes": tf.where(real[..., None], boxes_out, 0.0),
        "detection_scores": tf.where(real, top.values, 0.0),
        "detection_classes": tf.where(real, classes, 0),
        "num_detections": tf.reduce_sum(tf.cast(real, tf.int32), axis=1),
    }
    if pad:
        out = {k: (tf.pad(v, [[0, 0], [0, pad]] + [[0, 0]] * (len(v.shape) - 2))
                   if k != "num_detections" else v) for k, v in out.items()}
    return out
