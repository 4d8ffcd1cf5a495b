"""Non-maximum suppression with static, padded outputs.

Greedy NMS exactly as torchvision's ``nms``: highest score first, a box is suppressed when its IoU
with a kept box is strictly greater than the threshold (IoU exactly at the threshold survives).
Outputs always have the requested size; ``valid`` / ``num_*`` say how many rows are real.
"""

from __future__ import annotations

import tensorflow as tf

# Scores of rows that must never be selected; any real score (probability or logit) is above it.
INVALID_SCORE = -1e30


def non_max_suppression(boxes: tf.Tensor, scores: tf.Tensor, max_output_size: int,
                        iou_threshold: float, valid: tf.Tensor | None = None) -> dict:
    """Per-image greedy NMS over a batch.

    Args:
      boxes: [B, N, 4] (y1, x1, y2, x2).
      scores: [B, N].
      max_output_size: K rows kept per image at most.
      iou_threshold: suppress boxes whose IoU with a kept box is > this.
      valid: optional [B, N] bool; False rows are never kept.
    Returns:
      dict with ``indices`` [B, K] int32 into N in decreasing score order (0 where invalid),
      ``valid`` [B, K] bool, ``num_valid`` [B] int32.
    """
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


def proposal_nms(boxes_by_level, scores_by_level, valid_by_level, max_output_size: int,
                 iou_threshold: float, per_level: bool = True) -> dict:
    """NMS of RPN proposals, within each level (torchvision, detectron2) or across all levels.

    Per level: NMS runs on each level independently, then the survivors of all levels are ranked
    by score and the top ``max_output_size`` kept (torchvision's ``batched_nms`` with level ids
    followed by ``keep[:post_nms_top_n]``).

    Args:
      boxes_by_level: list of [B, K_l, 4]; scores_by_level: list of [B, K_l];
      valid_by_level: list of [B, K_l] bool.
      max_output_size: P proposals per image.
    Returns:
      dict with ``boxes`` [B, P, 4], ``scores`` [B, P] (INVALID_SCORE where invalid),
      ``valid`` [B, P] bool, ``level_index`` [B, P] int32 (position in the input lists), sorted by
      decreasing score with valid rows first.
    """
    if per_level:
        cand_boxes, cand_scores, cand_valid, cand_levels = [], [], [], []
        for i, (b, s, v) in enumerate(zip(boxes_by_level, scores_by_level, valid_by_level)):
            k = min(max_output_size, b.shape[1]) if b.shape[1] is not None else max_output_size
            kept = non_max_suppression(b, s, k, iou_threshold, v)
            cand_boxes.append(tf.gather(b, kept["indices"], batch_dims=1))
            cand_scores.append(tf.where(kept["valid"], tf.gather(s, kept["indices"], batch_dims=1),
                                        INVALID_SCORE))
            cand_valid.append(kept["valid"])
            cand_levels.append(tf.fill(tf.shape(kept["indices"]), i))
        boxes = tf.concat(cand_boxes, axis=1)
        scores = tf.concat(cand_scores, axis=1)
        valid = tf.concat(cand_valid, axis=1)
        levels = tf.concat(cand_levels, axis=1)
        order, in_range = _top_k_padded(scores, max_output_size)
        valid = tf.gather(valid, order, batch_dims=1) & in_range
    else:
        boxes = tf.concat(list(boxes_by_level), axis=1)
        scores = tf.where(tf.concat(list(valid_by_level), axis=1),
                          tf.concat(list(scores_by_level), axis=1), INVALID_SCORE)
        levels = tf.concat([tf.fill(tf.shape(s), i) for i, s in enumerate(scores_by_level)], 1)
        kept = non_max_suppression(boxes, scores, max_output_size, iou_threshold)
        order, valid = kept["indices"], kept["valid"]
    out_scores = tf.where(valid, tf.gather(scores, order, batch_dims=1), INVALID_SCORE)
    out_boxes = tf.where(valid[..., None], tf.gather(boxes, order, batch_dims=1), 0.0)
    return {"boxes": out_boxes, "scores": out_scores, "valid": valid,
            "level_index": tf.where(valid, tf.gather(levels, order, batch_dims=1), 0)}


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
                   iou_threshold: float, score_threshold: float, valid: tf.Tensor | None = None
                   ) -> dict:
    """Per-class NMS then the top ``max_detections`` over all classes (detection post-processing).

    Same result as torchvision's ``postprocess_detections`` after its score and size filters:
    every (box, class) pair with score > ``score_threshold`` is a candidate, NMS runs within each
    class, and the best ``max_detections`` survivors are kept, sorted by score.

    Args:
      boxes: [B, N, C, 4] class-specific boxes, or [B, N, 1, 4] shared by all classes.
      scores: [B, N, C] (no background column).
      valid: optional [B, N, C] bool; False pairs are never kept (e.g. boxes too small).
    Returns:
      dict with ``detection_boxes`` [B, D, 4], ``detection_scores`` [B, D],
      ``detection_classes`` [B, D] int32 in 0..C-1 (column of ``scores``),
      ``num_detections`` [B] int32. Rows past ``num_detections`` are zero.
    """
    scores = tf.cast(scores, tf.float32)
    if valid is not None:
        scores = tf.where(valid, scores, 0.0)
        score_threshold = max(float(score_threshold), 0.0)
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
