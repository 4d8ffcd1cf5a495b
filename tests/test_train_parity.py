"""The training path against torchvision's, without torch.

tests/fixtures/torchvision_train_small.npz was written by
``tests/scripts/torchvision_train_parity.py reference --small`` (torch 2.14.1, torchvision 0.29.1)
from six real COCO photos (portrait, tall portrait, square, very wide, 4:3, 2:1): torchvision's
reduced-width Mask R-CNN (the weights of torchvision_maskrcnn_small.npz, FrozenBatchNorm2d, conv1
and layer1 frozen) in training mode; its losses with sampling off (padded as torchvision pads,
and padded to the canvases our grouped pipeline uses), its sampled counts with sampling on, the
gradients of a two-image batch and its momentum buffers after two steps of the reference recipe
(SGD 0.9, weight decay 1e-4, warmup factor 0.001, lr 0.02).
"""

import json

import pytest

from tests.scripts import torchvision_train_parity as tp

FIXTURE = str(tp.SMALL_FIXTURE)


@pytest.mark.slow
def test_training_path_equals_torchvision():
    r = tp.check(FIXTURE)
    print(json.dumps({k: v for k, v in r.items() if "counts" not in k}, indent=1))
    assert len(r["images"]) >= 5 and len({tuple(s) for s in r["images"]}) == len(r["images"])
    for key, rel in r["loss_rel_diff_max"].items():
        assert rel <= 1e-4, key
    # On the canvases of our grouped pipeline (some larger than torchvision's own padding).
    padded = [[-(-s // 32) * 32 for s in size] for size in r["images"]]
    assert any(c != p for c, p in zip(r["canvases"], padded))
    for key, rel in r["canvas_loss_rel_diff_max"].items():
        assert rel <= 1e-4, key
    assert r["batch_loss_rel_diff_max"] <= 1e-4
    assert r["trainable"][0] == r["trainable"][1] > 50 and r["trainable"][2] == 0
    assert r["grad_rel_diff_max"][1] <= 1e-3, r["grad_rel_diff_max"]
    assert r["momentum_buffer_rel_diff_max"][1] <= 1e-3, r["momentum_buffer_rel_diff_max"]
    name, update, floor = r["update_rel_diff_max"]
    assert update <= 1e-3 + 2 * floor, r["update_rel_diff_max"]
    assert r["lrs"][0] == pytest.approx(r["lrs"][1], rel=1e-6)
    ours, ref = r["rpn_counts"]
    assert ours == ref and all(c[2] == min(c[0], 128) and c[3] == 256 - c[2] for c in ours)
    ours, ref = r["roi_counts"]
    assert ours == ref and all(c[2] == min(c[0], 128) and c[3] == min(c[1], 512 - c[2])
                               for c in ours)
    assert tp.passes(r)


@pytest.mark.parametrize("override, loss", [
    ("model.box_head.smooth_l1_beta=0.0", "loss_box_reg"),  # detectron2's L1
    ("model.rpn.smooth_l1_beta=0.0", "loss_rpn_box"),  # detectron2's RPN L1
    ("model.mask_head.target=binary", "loss_mask"),  # detectron2's thresholded targets
    ("model.roi_align.aligned=true", "loss_mask"),  # and its half-pixel RoIAlign
])
def test_the_other_recipe_is_measurably_different(override, loss):
    """Each switch of the torchvision recipe has its effect: with detectron2's value the loss
    leaves torchvision's by far more than the parity tolerance."""
    r = tp.check(FIXTURE, overrides=[override], losses_only=True)
    print(override, r["loss_rel_diff_max"])
    assert r["loss_rel_diff_max"][loss] > 1e-3
