import numpy as np
import tensorflow as tf

from mrcnn_tf.ops import boxes as B
from tests.ops import reference


def test_area_hand_computed_and_degenerate():
    out = B.area([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 5.0, 9.0], [3.0, 3.0, 1.0, 1.0]]).numpy()
    np.testing.assert_allclose(out, [200.0, 0.0, 0.0])


def test_pairwise_iou_hand_computed():
    a = [[[0.0, 0.0, 10.0, 10.0]]]
    b = [[[0.0, 5.0, 10.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]]
    np.testing.assert_allclose(B.pairwise_iou(a, b).numpy(), [[[1 / 3, 1.0, 0.0]]], rtol=1e-6)


def test_pairwise_iou_matches_numpy_and_masks_padding():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (2, 7, 2))
    a = np.concatenate([xy, xy + rng.uniform(1, 30, (2, 7, 2))], -1).astype(np.float32)
    xy = rng.uniform(0, 50, (2, 5, 2))
    b = np.concatenate([xy, xy + rng.uniform(1, 30, (2, 5, 2))], -1).astype(np.float32)
    out = B.pairwise_iou(a, b).numpy()
    for i in range(2):
        np.testing.assert_allclose(out[i], reference.iou_matrix(a[i], b[i]), atol=1e-6)
    valid = np.array([[True] * 3 + [False] * 2, [False] * 5])
    masked = B.pairwise_iou(a, b, valid2=valid).numpy()
    np.testing.assert_array_equal(masked[0, :, 3:], -1.0)
    np.testing.assert_array_equal(masked[1], -1.0)
    np.testing.assert_allclose(masked[0, :, :3], out[0, :, :3])


def test_pairwise_iou_empty_and_zero_boxes():
    assert B.pairwise_iou(tf.zeros([1, 0, 4]), tf.zeros([1, 3, 4])).shape == (1, 0, 3)
    z = B.pairwise_iou(tf.zeros([1, 2, 4]), tf.zeros([1, 3, 4])).numpy()
    np.testing.assert_array_equal(z, 0.0)


def test_clip_scalar_and_per_image():
    boxes = tf.constant([[[-5.0, 3.0, 50.0, 120.0]], [[-5.0, 3.0, 50.0, 120.0]]])
    np.testing.assert_allclose(B.clip_boxes(boxes, 40, 100).numpy()[0, 0], [0, 3, 40, 100])
    out = B.clip_boxes(boxes, tf.constant([40, 60]), tf.constant([100, 110])).numpy()
    np.testing.assert_allclose(out[:, 0], [[0, 3, 40, 100], [0, 3, 50, 110]])


def test_coco_conversion_round_trip():
    yxyx = np.array([[10.0, 20.0, 40.0, 80.0]], np.float32)
    xywh = B.yxyx_to_xywh(yxyx).numpy()
    np.testing.assert_allclose(xywh, [[20.0, 10.0, 60.0, 30.0]])
    np.testing.assert_allclose(B.xywh_to_yxyx(xywh).numpy(), yxyx)
