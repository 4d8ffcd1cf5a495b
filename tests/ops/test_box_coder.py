import math

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.ops.box_coder import BoxCoder


def test_hand_computed_encode():
    d = BoxCoder().encode([[1.0, 2.0, 11.0, 22.0]], [[0.0, 0.0, 10.0, 10.0]]).numpy()
    np.testing.assert_allclose(d, [[0.1, 0.7, 0.0, math.log(2.0)]], rtol=1e-6)
    d = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode([[1.0, 2.0, 11.0, 22.0]],
                                                [[0.0, 0.0, 10.0, 10.0]]).numpy()
    np.testing.assert_allclose(d, [[1.0, 7.0, 0.0, 5 * math.log(2.0)]], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_round_trip(weights):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (3, 50, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(4, 300, (3, 50, 2))], -1).astype(np.float32)
    xy = rng.uniform(0, 500, (3, 50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 300, (3, 50, 2))], -1).astype(np.float32)
    coder = BoxCoder(weights)
    back = coder.decode(coder.encode(boxes, anchors), anchors).numpy()
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_decode_clamps_scale_and_is_float32():
    coder = BoxCoder()
    out = coder.decode(tf.constant([[0.0, 0.0, 100.0, 100.0]], tf.float16),
                       [[0.0, 0.0, 16.0, 16.0]])
    assert out.dtype == tf.float32
    side = 16.0 * math.exp(math.log(1000.0 / 16))  # = 1000
    np.testing.assert_allclose(out.numpy(), [[8 - side / 2, 8 - side / 2, 8 + side / 2,
                                              8 + side / 2]], rtol=1e-5)


def test_degenerate_boxes_give_finite_deltas():
    d = BoxCoder().encode(tf.zeros([4, 4]), tf.zeros([4, 4])).numpy()
    assert np.isfinite(d).all()


def test_rejects_wrong_weights():
    with pytest.raises(ValueError, match="4 values"):
        BoxCoder((1.0, 1.0))
