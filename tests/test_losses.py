import math

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf import losses as L
from mrcnn_tf.ops.box_coder import BoxCoder


def test_smooth_l1_hand_computed():
    d = tf.constant([0.0, 0.05, -0.2, 2.0])
    np.testing.assert_allclose(L.smooth_l1(d, 0.1).numpy(), [0, 0.5 * 0.0025 / 0.1, 0.15, 1.95],
                               rtol=1e-6)
    np.testing.assert_allclose(L.smooth_l1(d, 0.0).numpy(), [0, 0.05, 0.2, 2.0], rtol=1e-6)


def test_giou_hand_computed():
    a = tf.constant([[0.0, 0.0, 2.0, 2.0]])
    b = tf.constant([[0.0, 1.0, 2.0, 3.0]])  # IoU 2/6, hull 6 = union -> GIoU = 1/3
    np.testing.assert_allclose(L.giou(a, b).numpy(), [1 / 3], rtol=1e-6)
    c = tf.constant([[0.0, 3.0, 2.0, 4.0]])  # disjoint: IoU 0, hull 8, union 6 -> -2/8
    np.testing.assert_allclose(L.giou(a, c).numpy(), [-0.25], rtol=1e-6)


def test_rpn_objectness_bce_over_sampled_only():
    logits = tf.constant([[0.0, 2.0, -1.0, 5.0]])
    labels = tf.constant([[1.0, 0.0, 0.0, 1.0]])
    sampled = tf.constant([[True, True, False, False]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    np.testing.assert_allclose(L.rpn_objectness_loss(logits, labels, sampled).numpy(), expected,
                               rtol=1e-6)


def test_rpn_objectness_softmax_and_focal():
    logits2 = tf.constant([[[0.0, 0.0], [1.0, -1.0]]])
    labels = tf.constant([[1.0, 0.0]])
    sampled = tf.constant([[True, True]])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    np.testing.assert_allclose(L.rpn_objectness_loss(logits2, labels, sampled).numpy(), expected,
                               rtol=1e-6)
    logits = tf.constant([[0.0]])
    # p = 0.5, label 1: alpha 0.25 * (0.5)^2 * log 2
    got = L.rpn_objectness_loss(logits, tf.constant([[1.0]]), tf.constant([[True]]), "focal")
    np.testing.assert_allclose(got.numpy(), 0.25 * 0.25 * math.log(2), rtol=1e-6)


def test_rpn_box_losses():
    deltas = tf.constant([[[0.1, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]])
    targets = tf.zeros([1, 2, 4])
    positive = tf.constant([[True, False]])
    sampled = tf.constant([[True, True]])
    beta = 1 / 9
    np.testing.assert_allclose(L.rpn_box_loss(deltas, targets, positive, sampled,
                                              beta=beta).numpy(), 0.5 * 0.01 / beta / 2, rtol=1e-5)
    weighted = L.rpn_box_loss(deltas, targets, positive, sampled, "weighted_smooth_l1", beta,
                              (3.0, 1.0, 1.0, 1.0))
    np.testing.assert_allclose(weighted.numpy(), 3 * 0.5 * 0.01 / beta / 2, rtol=1e-5)
    anchors = tf.constant([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    coder = BoxCoder()
    perfect = coder.encode(tf.constant([[[0.0, 0.0, 10.0, 10.0]] * 2]), anchors[None])
    g = L.rpn_box_loss(perfect, targets, positive, sampled, "giou", anchors=anchors,
                       matched_boxes=tf.constant([[[0.0, 0.0, 10.0, 10.0]] * 2]), coder=coder)
    assert abs(float(g)) < 1e-6


def test_box_losses_pick_the_true_class():
    logits = tf.constant([[[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    classes = tf.constant([[0, 2]])
    valid = tf.constant([[True, True]])
    sm = lambda v, i: -np.log(np.exp(v[i]) / np.exp(v).sum())
    expected = (sm(np.array([2.0, 0, 0]), 0) + sm(np.array([0, 0, 3.0]), 2)) / 2
    np.testing.assert_allclose(L.box_class_loss(logits, classes, valid).numpy(), expected,
                               rtol=1e-6)
    deltas = np.zeros((1, 2, 3, 4), np.float32)
    deltas[0, 1, 2] = [2.0, 0, 0, 0]  # true class of RoI 1
    deltas[0, 1, 1] = [9.0, 9, 9, 9]  # another class: ignored
    targets = tf.zeros([1, 2, 4])
    fg = tf.constant([[False, True]])
    np.testing.assert_allclose(L.box_reg_loss(deltas, targets, classes, fg, valid).numpy(),
                               (2.0 - 0.5) / 2, rtol=1e-6)


def test_mask_losses():
    logits = np.zeros((1, 2, 2, 2, 3), np.float32)
    logits[0, 0, :, :, 1] = 10.0  # right class, confident, all-ones target
    logits[0, 0, :, :, 2] = -50.0  # wrong class: ignored
    targets = np.ones((1, 2, 2, 2), np.float32)
    classes = tf.constant([[1, 2]])
    fg = tf.constant([[True, False]])
    got = L.mask_loss(logits, targets, classes, fg).numpy()
    np.testing.assert_allclose(got, math.log(1 + math.exp(-10)), rtol=1e-4)
    dice = L.mask_loss(logits, targets, classes, fg, "dice").numpy()
    assert 0 <= dice < 1e-3


@pytest.mark.parametrize("kind", ["bce", "dice"])
def test_no_objects_gives_exactly_zero(kind):
    fg = tf.zeros([2, 4], bool)
    valid = tf.ones([2, 4], bool)
    assert float(L.box_reg_loss(tf.random.normal([2, 4, 3, 4]), tf.random.normal([2, 4, 4]),
                                tf.zeros([2, 4], tf.int32), fg, valid)) == 0.0
    assert float(L.mask_loss(tf.random.normal([2, 4, 28, 28, 3]), tf.ones([2, 4, 28, 28]),
                             tf.zeros([2, 4], tf.int32), fg, kind)) == 0.0
    assert float(L.rpn_box_loss(tf.random.normal([2, 5, 4]), tf.zeros([2, 5, 4]),
                                tf.zeros([2, 5], bool), tf.ones([2, 5], bool))) == 0.0
    cls = L.box_class_loss(tf.random.normal([2, 4, 3]), tf.zeros([2, 4], tf.int32), valid)
    assert np.isfinite(float(cls)) and float(cls) > 0


def test_float16_inputs_give_float32_losses():
    out = L.box_class_loss(tf.zeros([1, 2, 3], tf.float16), tf.zeros([1, 2], tf.int32),
                           tf.ones([1, 2], bool))
    assert out.dtype == tf.float32


def test_rpn_losses_divided_by_the_requested_count_as_detectron2():
    """detectron2's rpn.py divides both RPN losses by batch_size_per_image x images, however
    many anchors the sampler found; torchvision by the number it sampled. Hand-computed: two
    images, 3 of 4 anchors sampled in all, 8 asked for per image."""
    logits = tf.constant([[0.0, 2.0], [-1.0, 5.0]])
    labels = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    sampled = tf.constant([[True, True], [True, False]])
    per = [math.log(2), math.log(1 + math.exp(2)), math.log(1 + math.exp(-1))]
    losses = L.Losses(rpn_requested=8)
    assert float(L.rpn_normalizer(sampled)) == 3.0
    assert float(L.rpn_normalizer(sampled, 8)) == 16.0
    np.testing.assert_allclose(
        L.rpn_objectness_loss(logits, labels, sampled,
                              normalizer=L.rpn_normalizer(sampled, losses.rpn_requested)),
        sum(per) / 16, rtol=1e-6)
    deltas = tf.constant([[[0.5, 0.0, 0.0, 0.0], [0.0] * 4], [[0.0, -2.0, 0.0, 0.0], [0.0] * 4]])
    positive = tf.constant([[True, False], [True, False]])  # sampled positives
    l1 = L.rpn_box_loss(deltas, tf.zeros_like(deltas), positive, sampled, beta=0.0,
                        normalizer=L.rpn_normalizer(sampled, 8))
    np.testing.assert_allclose(l1, 2.5 / 16, rtol=1e-6)
    np.testing.assert_allclose(L.rpn_box_loss(deltas, tf.zeros_like(deltas), positive, sampled,
                                              beta=0.0), 2.5 / 3, rtol=1e-6)


@pytest.mark.parametrize("name, beta, normalizer", [
    ("coco_r50_fpn_1x", 0.0, "requested"), ("detectron2_r50_fpn", 0.0, "requested"),
    ("detectron2_r101_fpn", 0.0, "requested"), ("detectron2_x101_32x8d_fpn", 0.0, "requested"),
    ("torchvision_r50_fpn", 1 / 9, "sampled"), ("torchvision_r50_fpn_v2", 1 / 9, "sampled")])
def test_each_recipe_trains_the_rpn_as_its_reference(name, beta, normalizer):
    """detectron2's defaults.py: RPN.SMOOTH_L1_BETA = 0.0 (L1), its losses over
    BATCH_SIZE_PER_IMAGE x images; torchvision's rpn.py: smooth L1 with beta 1/9 over the
    sampled anchors. The factory hands each to the losses."""
    from mrcnn_tf.config import load_config
    from mrcnn_tf.factory import losses
    from tests.conftest import REPO

    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    terms = losses(cfg.model)
    assert terms.rpn_beta == pytest.approx(beta)
    assert cfg.model.rpn.loss_normalizer == normalizer
    assert terms.rpn_requested == (cfg.model.rpn.batch_size_per_image
                                   if normalizer == "requested" else None)
