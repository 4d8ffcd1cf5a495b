import json

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.ops.masks import crop_masks, paste_masks, roi_align_masks, roi_align_masks_static


def test_crop_hand_computed():
    # A 4x4 mask whose left half is on; cropping the whole frame to 2x2 gives coverage per bin.
    mask = np.zeros((1, 1, 4, 4), np.uint8)
    mask[..., :2] = 1
    out = crop_masks(mask, [[[0.0, 0.0, 4.0, 4.0]]], tf.zeros([1, 1], tf.int32), 2).numpy()
    np.testing.assert_allclose(out[0, 0], [[1, 0], [1, 0]], atol=1e-6)
    # Box x in [0, 2] of the second of two masks: aligned sample points (pixel-index space)
    # -0.25, 0.25 | 0.75, 1.25; the last interpolates pixel 1 (on) and pixel 2 (off) -> 0.75,
    # so the right bin is (1 + 0.75) / 2 = 0.875.
    masks = np.concatenate([np.zeros_like(mask), mask], axis=1)
    out = crop_masks(masks, [[[0.0, 0.0, 4.0, 2.0]]], tf.ones([1, 1], tf.int32), 2).numpy()
    np.testing.assert_allclose(out[0, 0], [[1, 0.875], [1, 0.875]], atol=1e-6)


def test_paste_hand_computed():
    # A 2x2 all-ones mask pasted on box [2, 4, 6, 8] of a 10x10 frame covers exactly that box.
    out = paste_masks(np.ones((1, 1, 2, 2), np.float32), [[[2.0, 4.0, 6.0, 8.0]]], 10, 10).numpy()
    expected = np.zeros((10, 10), np.uint8)
    expected[2:6, 4:8] = 1
    np.testing.assert_array_equal(out[0, 0], expected)
    # Probabilities (grid_sample with zero padding): pixel centre y -> mask coordinate
    # (y - 2) * 2 / 4 - 0.5, interpolated against a zero border: 2.5 -> -0.25 -> 0.75;
    # 1.5 -> -0.75 -> 0.25; 0.5 -> -1.25 -> 0.
    prob = paste_masks(np.ones((1, 1, 2, 2), np.float32), [[[2.0, 4.0, 6.0, 8.0]]], 10, 10,
                       threshold=None).numpy()
    np.testing.assert_allclose(prob[0, 0, 2, 5], 0.75, atol=1e-6)
    np.testing.assert_allclose(prob[0, 0, 3, 5], 1.0, atol=1e-6)
    np.testing.assert_allclose(prob[0, 0, 1, 5], 0.25, atol=1e-6)
    assert prob[0, 0, 0, 5] == 0


def test_paste_unbatched_empty_and_degenerate():
    assert paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), 5,
                       7).shape == (0, 5, 7)
    out = paste_masks(np.ones((1, 2, 28, 28), np.float32), np.zeros((1, 2, 4), np.float32), 6, 6)
    assert out.numpy().sum() == 0


def test_crop_paste_round_trip_on_coco(shared_data):
    from pycocotools import mask as mask_utils

    ann_file = shared_data / "coco_tiny16" / "instances_train2017.json"
    with open(ann_file) as f:
        data = json.load(f)
    images = {im["id"]: im for im in data["images"]}
    ious = []
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            continue
        im = images[ann["image_id"]]
        h, w = im["height"], im["width"]
        rles = mask_utils.frPyObjects(ann["segmentation"], h, w)
        m = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        box = np.array([[[ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]]], np.float32)
        crop = crop_masks(m[None, None], box, tf.zeros([1, 1], tf.int32), 28)
        back = paste_masks(crop, box, h, w).numpy()[0, 0].astype(bool)
        ious.append((back & (m > 0)).sum() / (back | (m > 0)).sum())
    assert len(ious) > 150
    mean = float(np.mean(ious))
    print(f"crop->paste round trip on {len(ious)} COCO masks: mean IoU {mean:.4f}")
    assert mean >= 0.94, mean


def test_roi_align_masks_hand_computed():
    # A 4x4 mask whose left half is on, RoI = the frame, 2x2 output, adaptive sampling: 2 x 2
    # samples per bin. aligned=True: x = 0, 1 (left bins) and 2, 3 (right bins).
    mask = np.zeros((1, 1, 4, 4), np.uint8)
    mask[..., :2] = 1
    box = [[[0.0, 0.0, 4.0, 4.0]]]
    out = roi_align_masks(mask, box, tf.zeros([1, 1], tf.int32), [[4, 4]], 2, True).numpy()
    np.testing.assert_allclose(out[0, 0], [[1, 0], [1, 0]], atol=1e-6)
    # aligned=False: x = 0.5, 1.5 -> 1 and 0.5; 2.5, 3.5 -> 0 and 0 (3.5 is past the last pixel
    # centre, within one pixel: the edge value 0).
    out = roi_align_masks(mask, box, tf.zeros([1, 1], tf.int32), [[4, 4]], 2, False).numpy()
    np.testing.assert_allclose(out[0, 0], [[0.75, 0], [0.75, 0]], atol=1e-6)


@pytest.mark.parametrize("crop", [roi_align_masks, roi_align_masks_static])
def test_roi_align_masks_equals_numpy_reference_with_content_sizes(crop):
    """Adaptive sampling on random masks and boxes (sub-pixel to larger than the image, across
    its border), two images whose content is smaller than the padded tensor: the border rules
    apply at the content edge, as in the references where the mask has the image's size. The
    static-shape version (XLA) gives the same numbers."""
    from tests.ops.reference import roi_align

    rng = np.random.default_rng(0)
    masks = (rng.random((2, 3, 40, 50)) < 0.5).astype(np.uint8)
    sizes = np.array([[40, 50], [31, 43]])
    masks[1, :, 31:] = 0
    masks[1, :, :, 43:] = 0
    n = 30
    y1 = rng.uniform(-6, 44, (2, n))
    x1 = rng.uniform(-6, 54, (2, n))
    side = rng.choice([0.6, 5.0, 20.0, 70.0], (2, n, 2)) * rng.uniform(0.5, 1.5, (2, n, 2))
    boxes = np.stack([y1, x1, y1 + side[..., 0], x1 + side[..., 1]], -1).astype(np.float32)
    index = rng.integers(0, 3, (2, n)).astype(np.int32)
    for aligned in (False, True):
        out = crop(masks, boxes, index, sizes, 28, aligned).numpy()
        for b in range(2):
            h, w = sizes[b]
            for r in range(n):
                feat = masks[b, index[b, r], :h, :w, None]
                ref = roi_align(feat, boxes[b, r], 28, 28, 1.0, 0, aligned)[..., 0]
                np.testing.assert_allclose(out[b, r], ref, atol=1e-5, err_msg=f"{b} {r}")


def test_static_mask_targets_equal_the_windowed_ones_for_any_roi_size():
    """roi_align_masks_static (per-axis weights over the whole mask, static shapes) against
    roi_align_masks (per-RoI windows) on 20 random mask sizes: RoIs from empty and sub-pixel to
    4x the mask, across every border, as mini-mask frames make them; both alignments."""
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(12, 90, 2))
        masks = (rng.random((2, 3, h, w)) > 0.5).astype(np.uint8)
        corner = rng.uniform(-30, max(h, w) + 30, (2, 16, 2))
        side = rng.uniform(0, 4 * max(h, w), (2, 16, 2)) * (rng.random((2, 16, 1)) > 0.1)
        boxes = np.concatenate([corner, corner + side], -1).astype(np.float32)
        index = rng.integers(0, 3, (2, 16)).astype(np.int32)
        sizes = np.array([[h, w], [rng.integers(8, h + 1), rng.integers(8, w + 1)]], np.int32)
        for aligned in (True, False):
            a = roi_align_masks(masks, boxes, index, sizes, 28, aligned).numpy()
            b = roi_align_masks_static(masks, boxes, index, sizes, 28, aligned).numpy()
            worst = max(worst, float(np.abs(a - b).max()))
    assert worst < 1e-5, worst
