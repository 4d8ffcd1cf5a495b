import numpy as np
import tensorflow as tf

from mrcnn_tf.ops.nms import multiclass_nms, non_max_suppression, proposal_nms
from tests.ops import reference


def _random_boxes(rng, shape, max_xy=100.0):
    xy = rng.uniform(0, max_xy, shape + (2,))
    return np.concatenate([xy, xy + rng.uniform(5, 40, shape + (2,))], -1).astype(np.float32)


def test_iou_at_threshold_survives():
    boxes = tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]]])  # IoU exactly 0.5
    out = non_max_suppression(boxes, tf.constant([[0.9, 0.8]]), 4, 0.5)
    np.testing.assert_array_equal(out["num_valid"].numpy(), [2])
    out = non_max_suppression(boxes, tf.constant([[0.9, 0.8]]), 4, 0.49)
    np.testing.assert_array_equal(out["num_valid"].numpy(), [1])


def test_matches_greedy_reference_and_respects_validity():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, (2, 60))
    scores = rng.uniform(0, 1, (2, 60)).astype(np.float32)
    valid = rng.uniform(0, 1, (2, 60)) > 0.2
    out = non_max_suppression(boxes, scores, 30, 0.5, valid=tf.constant(valid))
    for b in range(2):
        vi = np.nonzero(valid[b])[0]
        ref = vi[reference.greedy_nms(boxes[b][vi], scores[b][vi], 0.5)][:30]
        n = int(out["num_valid"][b])
        np.testing.assert_array_equal(out["indices"].numpy()[b, :n], ref)
        assert not out["valid"].numpy()[b, n:].any()


def test_empty_and_all_invalid():
    out = non_max_suppression(tf.zeros([2, 0, 4]), tf.zeros([2, 0]), 5, 0.5)
    np.testing.assert_array_equal(out["num_valid"].numpy(), [0, 0])
    out = non_max_suppression(tf.zeros([1, 3, 4]), tf.ones([1, 3]), 5, 0.5,
                              valid=tf.zeros([1, 3], bool))
    np.testing.assert_array_equal(out["num_valid"].numpy(), [0])


def test_proposal_nms_per_level_vs_across():
    # Two identical boxes on different levels: per-level NMS keeps both, across levels one.
    b = tf.constant([[[0.0, 0.0, 10.0, 10.0]]])
    lv = [b, b]
    sc = [tf.constant([[0.9]]), tf.constant([[0.8]])]
    va = [tf.constant([[True]]), tf.constant([[True]])]
    per = proposal_nms(lv, sc, va, 3, 0.7, per_level=True)
    across = proposal_nms(lv, sc, va, 3, 0.7, per_level=False)
    np.testing.assert_array_equal(per["valid"].numpy(), [[True, True, False]])
    np.testing.assert_allclose(per["scores"].numpy()[0, :2], [0.9, 0.8])
    np.testing.assert_array_equal(per["level_index"].numpy()[0, :2], [0, 1])
    np.testing.assert_array_equal(across["valid"].numpy(), [[True, False, False]])


def test_proposal_nms_per_level_matches_reference():
    rng = np.random.default_rng(1)
    boxes = [_random_boxes(rng, (1, 40)), _random_boxes(rng, (1, 25))]
    scores = [rng.uniform(0, 1, (1, 40)).astype(np.float32),
              rng.uniform(0, 1, (1, 25)).astype(np.float32)]
    valid = [np.ones((1, 40), bool), np.ones((1, 25), bool)]
    out = proposal_nms(boxes, scores, valid, 20, 0.5, per_level=True)
    cands = []
    for bl, sl in zip(boxes, scores):
        keep = reference.greedy_nms(bl[0], sl[0], 0.5)
        cands += [(sl[0][k], tuple(bl[0][k])) for k in keep]
    cands.sort(key=lambda c: -c[0])
    np.testing.assert_allclose(out["scores"].numpy()[0], [c[0] for c in cands[:20]])
    np.testing.assert_allclose(out["boxes"].numpy()[0], [c[1] for c in cands[:20]])


def test_multiclass_nms_per_class_and_top_k():
    boxes = tf.constant([[[[0.0, 0.0, 10.0, 10.0]], [[1.0, 1.0, 10.0, 10.0]],
                          [[50.0, 50.0, 60.0, 60.0]]]])  # [1, 3, 1, 4], shared by classes
    scores = tf.constant([[[0.9, 0.8], [0.85, 0.01], [0.02, 0.7]]])
    out = multiclass_nms(boxes, scores, 3, 0.5, 0.05)
    # class 0: box 0 (0.9) suppresses box 1; class 1: box 0 (0.8), box 2 (0.7); top-3 by score.
    np.testing.assert_array_equal(out["num_detections"].numpy(), [3])
    np.testing.assert_allclose(out["detection_scores"].numpy(), [[0.9, 0.8, 0.7]])
    np.testing.assert_array_equal(out["detection_classes"].numpy(), [[0, 1, 1]])
    np.testing.assert_allclose(out["detection_boxes"].numpy()[0, 2], [50, 50, 60, 60])


def test_multiclass_nms_padding_is_zero_and_valid_mask():
    boxes = tf.constant([[[[0.0, 0.0, 10.0, 10.0]], [[20.0, 20.0, 30.0, 30.0]]]])
    scores = tf.constant([[[0.9], [0.8]]])
    out = multiclass_nms(boxes, scores, 4, 0.5, 0.05, valid=tf.constant([[[True], [False]]]))
    np.testing.assert_array_equal(out["num_detections"].numpy(), [1])
    assert (out["detection_boxes"].numpy()[0, 1:] == 0).all()
    assert (out["detection_scores"].numpy()[0, 1:] == 0).all()
