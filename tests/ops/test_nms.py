import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.ops.nms import _greedy_keep, multiclass_nms, non_max_suppression, proposal_nms
from tests.ops import reference


@pytest.fixture(params=["tf", "static"])
def impl(request):
    """Every test runs on both implementations (model.nms_impl)."""
    return request.param


def _random_boxes(rng, shape, max_xy=100.0):
    xy = rng.uniform(0, max_xy, shape + (2,))
    return np.concatenate([xy, xy + rng.uniform(5, 40, shape + (2,))], -1).astype(np.float32)


def test_iou_at_threshold_survives(impl):
    boxes = tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]]])  # IoU exactly 0.5
    out = non_max_suppression(boxes, tf.constant([[0.9, 0.8]]), 4, 0.5)
    np.testing.assert_array_equal(out["num_valid"].numpy(), [2])
    out = non_max_suppression(boxes, tf.constant([[0.9, 0.8]]), 4, 0.49, impl=impl)
    np.testing.assert_array_equal(out["num_valid"].numpy(), [1])


def test_matches_greedy_reference_and_respects_validity(impl):
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, (2, 60))
    scores = rng.uniform(0, 1, (2, 60)).astype(np.float32)
    valid = rng.uniform(0, 1, (2, 60)) > 0.2
    out = non_max_suppression(boxes, scores, 30, 0.5, valid=tf.constant(valid), impl=impl)
    for b in range(2):
        vi = np.nonzero(valid[b])[0]
        ref = vi[reference.greedy_nms(boxes[b][vi], scores[b][vi], 0.5)][:30]
        n = int(out["num_valid"][b])
        np.testing.assert_array_equal(out["indices"].numpy()[b, :n], ref)
        assert not out["valid"].numpy()[b, n:].any()


def test_empty_and_all_invalid(impl):
    out = non_max_suppression(tf.zeros([2, 0, 4]), tf.zeros([2, 0]), 5, 0.5, impl=impl)
    np.testing.assert_array_equal(out["num_valid"].numpy(), [0, 0])
    out = non_max_suppression(tf.zeros([1, 3, 4]), tf.ones([1, 3]), 5, 0.5,
                              valid=tf.zeros([1, 3], bool), impl=impl)
    np.testing.assert_array_equal(out["num_valid"].numpy(), [0])


def test_proposal_nms_per_level_vs_across(impl):
    # Two identical boxes on different levels: per-level NMS keeps both, across levels one.
    b = tf.constant([[[0.0, 0.0, 10.0, 10.0]]])
    lv = [b, b]
    sc = [tf.constant([[0.9]]), tf.constant([[0.8]])]
    va = [tf.constant([[True]]), tf.constant([[True]])]
    per = proposal_nms(lv, sc, va, 3, 0.7, per_level=True, impl=impl)
    across = proposal_nms(lv, sc, va, 3, 0.7, per_level=False, impl=impl)
    np.testing.assert_array_equal(per["valid"].numpy(), [[True, True, False]])
    np.testing.assert_allclose(per["scores"].numpy()[0, :2], [0.9, 0.8])
    np.testing.assert_array_equal(per["level_index"].numpy()[0, :2], [0, 1])
    np.testing.assert_array_equal(across["valid"].numpy(), [[True, False, False]])


def test_proposal_nms_per_level_matches_reference(impl):
    rng = np.random.default_rng(1)
    boxes = [_random_boxes(rng, (1, 40)), _random_boxes(rng, (1, 25))]
    scores = [rng.uniform(0, 1, (1, 40)).astype(np.float32),
              rng.uniform(0, 1, (1, 25)).astype(np.float32)]
    valid = [np.ones((1, 40), bool), np.ones((1, 25), bool)]
    out = proposal_nms(boxes, scores, valid, 20, 0.5, per_level=True, impl=impl)
    cands = []
    for bl, sl in zip(boxes, scores):
        keep = reference.greedy_nms(bl[0], sl[0], 0.5)
        cands += [(sl[0][k], tuple(bl[0][k])) for k in keep]
    cands.sort(key=lambda c: -c[0])
    np.testing.assert_allclose(out["scores"].numpy()[0], [c[0] for c in cands[:20]])
    np.testing.assert_allclose(out["boxes"].numpy()[0], [c[1] for c in cands[:20]])


def test_multiclass_nms_per_class_and_top_k(impl):
    boxes = tf.constant([[[[0.0, 0.0, 10.0, 10.0]], [[1.0, 1.0, 10.0, 10.0]],
                          [[50.0, 50.0, 60.0, 60.0]]]])  # [1, 3, 1, 4], shared by classes
    scores = tf.constant([[[0.9, 0.8], [0.85, 0.01], [0.02, 0.7]]])
    out = multiclass_nms(boxes, scores, 3, 0.5, 0.05, impl=impl)
    # class 0: box 0 (0.9) suppresses box 1; class 1: box 0 (0.8), box 2 (0.7); top-3 by score.
    np.testing.assert_array_equal(out["num_detections"].numpy(), [3])
    np.testing.assert_allclose(out["detection_scores"].numpy(), [[0.9, 0.8, 0.7]])
    np.testing.assert_array_equal(out["detection_classes"].numpy(), [[0, 1, 1]])
    np.testing.assert_allclose(out["detection_boxes"].numpy()[0, 2], [50, 50, 60, 60])


def test_multiclass_nms_padding_is_zero_and_valid_mask(impl):
    boxes = tf.constant([[[[0.0, 0.0, 10.0, 10.0]], [[20.0, 20.0, 30.0, 30.0]]]])
    scores = tf.constant([[[0.9], [0.8]]])
    out = multiclass_nms(boxes, scores, 4, 0.5, 0.05, valid=tf.constant([[[True], [False]]]),
                         impl=impl)
    np.testing.assert_array_equal(out["num_detections"].numpy(), [1])
    assert (out["detection_boxes"].numpy()[0, 1:] == 0).all()
    assert (out["detection_scores"].numpy()[0, 1:] == 0).all()


def test_static_implementation_equals_tf_on_many_boxes_and_compiles_with_xla():
    """model.nms_impl=static keeps the same boxes as TensorFlow's kernels: single-class NMS on
    1000 heavily overlapping boxes with invalid rows, and per-class NMS with class-specific boxes
    (1000 x 8 classes, score threshold, validity mask); and it compiles with XLA, which
    NonMaxSuppressionV5 and CombinedNonMaxSuppression do not."""
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, (2, 1000), max_xy=60.0)
    scores = rng.uniform(0, 1, (2, 1000)).astype(np.float32)
    valid = rng.uniform(0, 1, (2, 1000)) > 0.1
    a = non_max_suppression(boxes, scores, 300, 0.4, tf.constant(valid), impl="tf")
    static = tf.function(lambda b, s, v: non_max_suppression(b, s, 300, 0.4, v, impl="static"),
                         jit_compile=True)
    b = static(boxes, scores, tf.constant(valid))
    assert 50 < int(a["num_valid"][0]) < 300
    for k in ("indices", "valid", "num_valid"):
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())

    class_boxes = _random_boxes(rng, (2, 1000, 8), max_xy=300.0)
    class_scores = rng.uniform(0, 1, (2, 1000, 8)).astype(np.float32) ** 4
    keep = tf.constant(rng.uniform(0, 1, (2, 1000, 8)) > 0.05)
    a = multiclass_nms(class_boxes, class_scores, 100, 0.5, 0.05, valid=keep, impl="tf")
    static = tf.function(lambda b, s, v: multiclass_nms(b, s, 100, 0.5, 0.05, valid=v,
                                                        impl="static"), jit_compile=True)
    b = static(class_boxes, class_scores, keep)
    np.testing.assert_array_equal(a["num_detections"].numpy(), b["num_detections"].numpy())
    np.testing.assert_array_equal(a["detection_classes"].numpy(), b["detection_classes"].numpy())
    np.testing.assert_allclose(a["detection_scores"].numpy(), b["detection_scores"].numpy())
    np.testing.assert_allclose(a["detection_boxes"].numpy(), b["detection_boxes"].numpy())
    with pytest.raises(Exception, match="NonMaxSuppressionV5"):
        tf.function(lambda b, s: non_max_suppression(b, s, 10, 0.5), jit_compile=True)(
            boxes, scores)


def _tied_case(rng, rows: int, n: int, grid: int):
    """Boxes on an integer grid of step ``grid`` (many equal boxes and IoUs exactly at the
    threshold; areas < 2^17, so float32 and the float64 oracle compare alike), some empty, and
    scores with ties."""
    yx = rng.integers(0, 128 // grid, (rows, n, 2)) * grid
    hw = rng.integers(0, 64 // grid + 1, (rows, n, 2)) * grid
    boxes = np.concatenate([yx, yx + hw], -1).astype(np.float32)
    scores = (rng.integers(0, 16, (rows, n)) / 16).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("threshold", [0.5, 0.25, 0.75, 0.0])
def test_tiled_static_nms_keeps_the_greedy_boxes_with_ties(threshold):
    """The static NMS runs tile by tile (ops/nms.py: _greedy_keep): it keeps exactly the boxes of
    greedy NMS (the float64 oracle, ties in index order as top_k ranks them) and of TensorFlow's
    NonMaxSuppressionV5, on 3 x 4 x 1000 boxes per threshold (12,000) spanning 8 tiles of 128,
    with equal boxes, equal scores and IoUs exactly at the threshold."""
    rng = np.random.default_rng(int(threshold * 100))
    checked = 0
    for grid in (1, 4, 16):
        boxes, scores = _tied_case(rng, 4, 1000, grid)
        valid = rng.uniform(0, 1, scores.shape) > 0.1
        out = {impl: non_max_suppression(boxes, scores, 1000, threshold, tf.constant(valid),
                                         impl=impl) for impl in ("static", "tf")}
        for b in range(4):
            vi = np.nonzero(valid[b])[0]
            ref = vi[reference.greedy_nms(boxes[b][vi], scores[b][vi], threshold)]
            for impl, o in out.items():
                n = int(o["num_valid"][b])
                np.testing.assert_array_equal(o["indices"].numpy()[b, :n], ref, err_msg=impl)
            checked += len(vi)
    assert checked > 10_000


@pytest.mark.parametrize("tile", [1, 3, 64, 2048])
def test_any_tile_size_keeps_the_same_boxes(tile):
    """Tiles of 1 (the per-box loop), of sizes that do not divide N, and one tile for all."""
    rng = np.random.default_rng(tile)
    boxes, scores = _tied_case(rng, 3, 301, 4)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(boxes, order[..., None], 1)
    alive = np.take_along_axis(scores, order, 1) > 0.2
    keep = _greedy_keep(tf.constant(ranked), tf.constant(alive), 0.5, tile).numpy()
    for b in range(3):
        live = np.nonzero(alive[b])[0]
        ref = live[reference.greedy_nms(ranked[b][live], -np.arange(len(live)), 0.5)]
        np.testing.assert_array_equal(np.nonzero(keep[b])[0], ref)
