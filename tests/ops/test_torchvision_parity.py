"""Our ops against torchvision's own outputs.

The outputs were stored by tests/fixtures/make_torchvision_ops_fixture.py; torch is not needed to
run these tests.
"""

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.ops.anchors import multilevel_anchors
from mrcnn_tf.ops.box_coder import BoxCoder
from mrcnn_tf.ops.masks import paste_masks, roi_align_masks
from mrcnn_tf.ops.nms import non_max_suppression
from mrcnn_tf.ops.roi_align import multilevel_roi_align, roi_align_flat, roi_align_gather_flat
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "torchvision_ops.npz"


@pytest.fixture(scope="module")
def tv():
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("impl", ["crop_and_resize", "gather"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_roi_align_equals_torchvision(tv, aligned, ratio, impl):
    """Both implementations (model.roi_align.impl), RoIs inside, across and outside the map."""
    pool = roi_align_flat if impl == "crop_and_resize" else roi_align_gather_flat
    out = pool(tv["roi_features"], tv["roi_boxes"] * 0.5, tv["roi_batch"], (5, 4), ratio,
               aligned).numpy()
    ref = tv[f"roi_out_{int(aligned)}_{ratio}"]
    assert np.abs(ref).max() > 0.5 and (np.abs(ref).max(axis=(1, 2, 3)) == 0).any()
    diff = np.abs(out - ref).max()
    print(f"roi_align aligned={aligned} ratio={ratio}: max |ours - torchvision| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("aligned", [False, True])
def test_adaptive_roi_align_equals_torchvision(tv, aligned):
    """sampling_ratio=0 (detectron2's model zoo pools this way), RoIs needing 1 to 10 samples
    per bin side."""
    out = roi_align_flat(tv["adaptive_features"], tv["adaptive_boxes"] * 0.25,
                         tv["adaptive_batch"], (7, 6), 0, aligned).numpy()
    ref = tv[f"adaptive_out_{int(aligned)}"]
    assert np.abs(ref).max() > 0.5 and (np.abs(ref).max(axis=(1, 2, 3)) == 0).any()
    diff = np.abs(out - ref).max()
    print(f"adaptive roi_align aligned={aligned}: max |ours - torchvision| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("impl", ["crop_and_resize", "gather"])
def test_multiscale_roi_align_equals_torchvision(tv, impl):
    feats = {lv: tv[f"ms_p{lv}"] for lv in range(2, 6)}
    out = multilevel_roi_align(feats, tv["ms_boxes"][None], 7, sampling_ratio=2, aligned=False,
                               impl=impl)
    diff = np.abs(out.numpy()[0] - tv["ms_out"]).max()
    print(f"MultiScaleRoIAlign: max |ours - torchvision| = {diff:.2e}")
    assert diff <= 1e-5


def test_anchors_equal_torchvision(tv):
    grids = {lv: tuple(int(v) for v in g) for lv, g in zip(range(2, 7), tv["anchor_grids"])}
    ours = multilevel_anchors((160, 224), grids, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    np.testing.assert_array_equal(np.concatenate([ours[lv].numpy() for lv in grids]),
                                  tv["anchors"])


@pytest.mark.parametrize("impl", ["tf", "static"])
@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_nms_equals_torchvision(tv, threshold, impl):
    keep = tv[f"nms_keep_{threshold}"]
    out = non_max_suppression(tv["nms_boxes"][None], tv["nms_scores"][None], 300, threshold,
                              impl=impl)
    n = int(out["num_valid"][0])
    np.testing.assert_array_equal(out["indices"].numpy()[0, :n], keep)


def test_box_coder_equals_torchvision(tv):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    np.testing.assert_allclose(coder.encode(tv["coder_gt"], tv["coder_ref"]).numpy(),
                               tv["coder_deltas"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(coder.decode(tv["coder_wild_deltas"], tv["coder_ref"]).numpy(),
                               tv["coder_decoded"], rtol=1e-5, atol=1e-3)


def test_torchvision_paste_equals_torchvision(tv):
    h, w = (int(v) for v in tv["paste_size"])
    ref = tv["paste_out"]
    out = paste_masks(tv["paste_masks"], tv["paste_boxes"], h, w, threshold=None,
                      method="torchvision").numpy()
    diff = np.abs(out - ref).max()
    print(f"paste_masks(torchvision): max |ours - torchvision| = {diff:.2e}")
    assert diff <= 1e-5
    np.testing.assert_array_equal(out >= 0.5, ref >= 0.5)
    # The detectron2 paste is a different algorithm: close, but not equal.
    other = paste_masks(tv["paste_masks"], tv["paste_boxes"], h, w, threshold=None).numpy()
    assert np.abs(other - ref).max() > 1e-2


def test_fixture_is_torchvision_output(tv):
    assert str(tv["torchvision_version"]).startswith("0.")
    assert tf.constant(tv["anchors"]).shape[-1] == 4


@pytest.mark.parametrize("aligned", [False, True])
def test_mask_targets_equal_torchvision_adaptive_roi_align(tv, aligned):
    """roi_align_masks = torchvision's roi_align(sampling_ratio=-1) of 0/1 masks: the mask
    targets of project_masks_on_boxes (aligned=False) and of detectron2 (aligned=True)."""
    masks = tv["mask_targets_masks"]
    h, w = masks.shape[1:]
    out = roi_align_masks(masks[None], tv["mask_targets_boxes"][None],
                          tv["mask_targets_index"][None], [[h, w]], 28, aligned).numpy()[0]
    ref = tv[f"mask_targets_{int(aligned)}"]
    soft = ((ref > 0.01) & (ref < 0.99)).mean()
    assert soft > 0.01 and (ref.max(axis=(1, 2)) == 0).any()  # soft edges and empty RoIs occur
    diff = np.abs(out - ref).max()
    print(f"mask targets aligned={aligned}: max |ours - torchvision| = {diff:.2e}")
    assert diff <= 1e-5


def test_nearest_mask_resize_equals_torchvision(tv):
    """data.mask_resize=nearest picks the rows and columns torchvision's transform picks
    (interpolate, mode nearest) for real COCO resizes and down-scales."""
    from mrcnn_tf.data.transforms import _nearest_rows

    for n_in, n_out in tv["nearest_pairs"]:
        ours = _nearest_rows(int(n_in), int(n_out)).numpy()
        np.testing.assert_array_equal(ours, tv[f"nearest_{n_in}_{n_out}"], err_msg=(n_in, n_out))
