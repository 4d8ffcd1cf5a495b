import numpy as np
import tensorflow as tf

from mrcnn_tf import targets as T
from mrcnn_tf.ops.box_coder import BoxCoder
from mrcnn_tf.ops.matcher import Matcher

RPN_MATCHER = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)
ROI_MATCHER = Matcher((0.5, 0.5), (0, -1, 1))


def test_rpn_targets_labels_samples_and_deltas():
    anchors = tf.constant([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0],
                           [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = tf.constant([[True, False]])
    t = T.rpn_targets(anchors, gt, valid, RPN_MATCHER, BoxCoder(), 256, 0.5)
    np.testing.assert_array_equal(t["labels"].numpy(), [[1, 1, 0, 0]])  # IoU 1, 0.83, 0, 0
    np.testing.assert_array_equal(t["sampled"].numpy(), [[True] * 4])
    np.testing.assert_array_equal(t["positive"].numpy(), [[True, True, False, False]])
    np.testing.assert_allclose(t["box_targets"].numpy()[0, 0], [0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(t["box_targets"].numpy()[0, 1], [0, -1 / 12, 0, np.log(10 / 12)],
                               atol=1e-5)


def test_rpn_targets_without_objects_are_all_negative():
    anchors = tf.constant([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    t = T.rpn_targets(anchors, tf.zeros([2, 3, 4]), tf.zeros([2, 3], bool), RPN_MATCHER,
                      BoxCoder(), 256, 0.5)
    assert t["labels"].numpy().sum() == 0 and not t["positive"].numpy().any()
    assert t["sampled"].numpy().all()
    assert np.isfinite(t["box_targets"].numpy()).all()


def test_sample_rois_adds_ground_truth_and_classes():
    proposals = tf.constant([[[0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0],
                              [0.0, 0.0, 0.0, 0.0]]])
    pvalid = tf.constant([[True, True, False]])
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    gcls = tf.constant([[2, -1]])
    gvalid = gcls > 0
    r = T.sample_rois(proposals, pvalid, gt, gcls, gvalid, ROI_MATCHER,
                      BoxCoder((10.0, 10.0, 5.0, 5.0)), 8, 0.25)
    valid = r["valid"].numpy()[0]
    assert valid.sum() == 3  # 2 real proposals + 1 ground truth; padding never sampled
    fg = r["foreground"].numpy()[0]
    assert fg.sum() == 2 and fg[:2].all()  # the 0.9-IoU proposal and the gt itself
    np.testing.assert_array_equal(r["classes"].numpy()[0][:3], [2, 2, 0])
    boxes = r["boxes"].numpy()[0][:3]
    assert [50, 50, 60, 60] in boxes.tolist()


def test_mask_targets_full_and_mini_agree():
    full = np.zeros((1, 1, 64, 64), np.uint8)
    full[0, 0, 16:48, 16:32] = 1  # left half of the box [16, 16, 48, 48]
    gt_boxes = tf.constant([[[16.0, 16.0, 48.0, 48.0]]])
    rois = tf.constant([[[16.0, 16.0, 48.0, 48.0], [16.0, 16.0, 48.0, 32.0]]])
    matched = tf.zeros([1, 2], tf.int32)
    sizes = tf.constant([[64, 64]])
    a = T.mask_targets(full, gt_boxes, rois, matched, sizes, 28, False, True, False).numpy()
    mini = np.zeros((1, 1, 56, 56), np.uint8)
    mini[0, 0, :, :28] = 1  # the same mask inside its box
    b = T.mask_targets(mini, gt_boxes, rois, matched, sizes, 28, True, True, False).numpy()
    assert a[0, 0, :, :14].all() and not a[0, 0, :, 14:].any()
    assert a[0, 1].all()  # RoI = the mask's extent
    np.testing.assert_array_equal(a, b)


def test_foreground_slice_is_the_positives_or_static():
    # model.mask_head.static_rois: the mask head's rows are the batch's largest positive count
    # (2 here), or with static_foreground int(S * positive_fraction) (8 * 0.5 = 4).
    proposals = tf.constant([[[0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]]])
    pvalid = tf.constant([[True, True]])
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0]]])
    gcls = tf.constant([[2]])
    for static, rows in ((False, 2), (True, 4)):
        r = T.sample_rois(proposals, pvalid, gt, gcls, gcls > 0, ROI_MATCHER,
                          BoxCoder((10.0, 10.0, 5.0, 5.0)), 8, 0.5, static_foreground=static)
        assert r["fg"]["boxes"].shape[1] == rows
        assert r["fg"]["foreground"].numpy()[0].sum() == 2
