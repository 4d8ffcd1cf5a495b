import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.ops.boxes import pairwise_iou
from mrcnn_tf.ops.matcher import Matcher

RPN = dict(thresholds=(0.3, 0.7), labels=(0, -1, 1))


def test_docstring_example():
    m = Matcher(**RPN, allow_low_quality_matches=True)
    iou = tf.constant([[[0.8], [0.5], [0.1]]])
    idx, lab = m(iou)
    np.testing.assert_array_equal(lab.numpy(), [[1, -1, 0]])
    np.testing.assert_array_equal(idx.numpy(), [[0, 0, 0]])
    _, lab = m(tf.constant([[[0.6], [0.5], [0.1]]]))
    np.testing.assert_array_equal(lab.numpy(), [[1, -1, 0]])
    _, lab = Matcher(**RPN)(tf.constant([[[0.6], [0.5], [0.1]]]))
    np.testing.assert_array_equal(lab.numpy(), [[-1, -1, 0]])


def test_thresholds_inclusive_at_lower_bound():
    _, lab = Matcher(**RPN)(tf.constant([[[0.7], [0.3], [0.2999]]]))
    np.testing.assert_array_equal(lab.numpy(), [[1, -1, 0]])


def test_argmax_and_low_quality_ties():
    # Two ground truths; gt 1's best IoU (0.4) is shared by rows 1 and 2: both promoted, each
    # keeping its own best ground truth (torchvision's rule).
    iou = tf.constant([[[0.9, 0.1], [0.2, 0.4], [0.45, 0.4], [0.1, 0.0]]])
    idx, lab = Matcher(**RPN, allow_low_quality_matches=True)(iou)
    np.testing.assert_array_equal(idx.numpy(), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(lab.numpy(), [[1, 1, 1, 0]])


def test_padding_never_matches():
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = tf.constant([[True, False]])
    anchors = tf.constant([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]])
    idx, lab = Matcher(**RPN, allow_low_quality_matches=True)(
        pairwise_iou(anchors, gt, valid2=valid))
    np.testing.assert_array_equal(lab.numpy(), [[1, 0]])
    np.testing.assert_array_equal(idx.numpy(), [[0, 0]])


def test_all_padding_and_no_columns_are_negative():
    m = Matcher(**RPN, allow_low_quality_matches=True)
    _, lab = m(-tf.ones([2, 5, 3]))
    np.testing.assert_array_equal(lab.numpy(), 0)
    idx, lab = m(tf.zeros([2, 5, 0]))
    assert idx.shape == (2, 5)
    np.testing.assert_array_equal(lab.numpy(), 0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="increase"):
        Matcher((0.7, 0.3), (0, -1, 1))
    with pytest.raises(ValueError, match="labels"):
        Matcher((0.5,), (0, -1, 1))
