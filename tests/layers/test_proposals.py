import numpy as np
import tensorflow as tf

from mrcnn_tf.layers.proposals import ProposalGenerator
from tests.layers.contract import check_layer_contract, rand

# Two levels, four anchors each; image 100 x 100.
ANCHORS = [np.array([[0, 0, 20, 20], [1, 1, 21, 21], [50, 50, 70, 70], [90, 90, 130, 130]],
                    np.float32),
           np.array([[0, 0, 20, 20], [10, 60, 40, 90], [0, 0, 0.0005, 10], [30, 30, 60, 60]],
                    np.float32)]


def _inputs(batch=1):
    logits = [np.tile(np.array([[3.0, 2.0, 1.0, 0.0]], np.float32), [batch, 1]),
              np.tile(np.array([[2.5, 1.5, 4.0, -1.0]], np.float32), [batch, 1])]
    deltas = [np.zeros((batch, 4, 4), np.float32) for _ in range(2)]
    return logits, deltas, ANCHORS, np.full((batch, 2), 100, np.int32)


def test_contract():
    kw = dict(pre_nms_topk_test=3, post_nms_topk_test=5, nms_threshold=0.6, nms_per_level=False,
              min_box_size=0.01, score_threshold=0.1, box_coder_weights=(2.0, 2.0, 1.0, 1.0))
    check_layer_contract(ProposalGenerator, kw, _inputs(2),
                         expected_shapes={"boxes": (2, 5, 4), "scores": (2, 5), "valid": (2, 5)},
                         non_default=tuple(kw))


def test_hand_computed_per_level():
    gen = ProposalGenerator(pre_nms_topk_test=3, post_nms_topk_test=6, nms_threshold=0.7)
    out = {k: v.numpy()[0] for k, v in gen(*_inputs()).items()}
    # Level 0 top-3: anchors 0, 1, 2; anchor 1 (IoU 0.82 with 0) suppressed. Level 1 top-3:
    # anchor 2 is thinner than min_box_size (dropped), anchors 0 and 1 kept. The clipped
    # anchor 3 of level 0 is not in its top-3.
    sig = lambda v: 1 / (1 + np.exp(-v))
    np.testing.assert_allclose(out["scores"][:4], sig(np.array([3.0, 2.5, 1.5, 1.0])), rtol=1e-6)
    np.testing.assert_allclose(out["boxes"][:4], [[0, 0, 20, 20], [0, 0, 20, 20],
                                                 [10, 60, 40, 90], [50, 50, 70, 70]])
    np.testing.assert_array_equal(out["valid"], [True] * 4 + [False] * 2)
    assert (out["boxes"][4:] == 0).all() and (out["scores"][4:] == 0).all()


def test_across_levels_clipping_and_train_counts():
    gen = ProposalGenerator(pre_nms_topk_train=4, post_nms_topk_train=8, pre_nms_topk_test=1,
                            post_nms_topk_test=2, nms_per_level=False)
    out = gen(*_inputs(), training=True)
    boxes, valid = out["boxes"].numpy()[0], out["valid"].numpy()[0]
    assert boxes.shape == (8, 4)
    # Across levels the duplicate [0, 0, 20, 20] is suppressed; the clipped anchor stays.
    assert valid.sum() == 5
    assert [90, 90, 100, 100] in boxes[valid].tolist()
    assert gen(*_inputs(), training=False)["boxes"].shape == (1, 2, 4)


def test_softmax_objectness_and_no_gradient():
    logits = [tf.Variable(rand(1, 4, 2)) for _ in range(2)]
    deltas = [tf.Variable(rand(1, 4, 4) * 0.1) for _ in range(2)]
    gen = ProposalGenerator(pre_nms_topk_test=4, post_nms_topk_test=4)
    with tf.GradientTape() as tape:
        out = gen(logits, deltas, ANCHORS, np.array([[100, 100]]))
        total = tf.reduce_sum(out["boxes"]) + tf.reduce_sum(out["scores"])
    grads = tape.gradient(total, logits + deltas)
    assert all(g is None for g in grads)
    assert out["valid"].numpy().sum() >= 1


def test_min_box_size_zero_drops_empty_boxes_only():
    """min_box_size 0 is detectron2's Boxes.nonempty(): a box clipped to zero width (an anchor
    wholly outside the image) is dropped, a 0.0005 px-thin one is kept (1e-3 drops both)."""
    anchors = [np.array([[0, 0, 20, 20], [0, 0, 0.0005, 10], [-30, -30, -10, -10]], np.float32)]
    logits = [np.array([[3.0, 2.0, 1.0]], np.float32)]
    deltas = [np.zeros((1, 3, 4), np.float32)]
    sizes = np.full((1, 2), 100, np.int32)
    for min_size, kept in ((0.0, 2), (1e-3, 1)):
        gen = ProposalGenerator(pre_nms_topk_test=3, post_nms_topk_test=3, nms_threshold=0.7,
                                min_box_size=min_size)
        assert int(np.sum(gen(logits, deltas, anchors, sizes)["valid"])) == kept, min_size
