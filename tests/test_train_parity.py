"""The training path against torchvision's (v1 and v2), without torch.

tests/fixtures/torchvision_train_small.npz was written by
``tests/scripts/torchvision_train_parity.py reference --small`` (torch 2.14.1, torchvision 0.29.1)
from six real COCO photos (portrait, tall portrait, square, very wide, 4:3, 2:1): torchvision's
reduced-width Mask R-CNN (the weights of torchvision_maskrcnn_small.npz, FrozenBatchNorm2d, conv1
and layer1 frozen) in training mode; its losses with sampling off (padded as torchvision pads,
and padded to the canvases our grouped pipeline uses), its sampled counts with sampling on, the
gradients of a two-image batch and its momentum buffers after two steps of the reference recipe
(SGD 0.9, weight decay 1e-4, warmup factor 0.001, lr 0.02).

tests/fixtures/torchvision_v2_train_small.npz was written by
``tests/scripts/torchvision_train_parity.py reference --small --v2`` from the same photos:
torchvision's reduced-width maskrcnn_resnet50_fpn_v2 (the weights of
torchvision_v2_maskrcnn_small.npz; FrozenBatchNorm2d in the backbone as our config, BatchNorm2d on
batch statistics in the FPN and heads), the same records, its gradients and buffers from a
float64 copy with torchvision's own float32 deviation from them, the losses of the model as
maskrcnn_resnet50_fpn_v2 builds it (BatchNorm2d in the backbone), and its box and mask heads in
float64 on random RoI features.

tests/fixtures/detectron2_train_small.npz was written by
``tests/scripts/detectron2_train_parity.py reference --small`` (detectron2 0.6 built from source
at facebookresearch/detectron2@02b5c4e2) from the same photos resized by detectron2's
ResizeShortestEdge: detectron2's GeneralizedRCNN from mask_rcnn_R_50_FPN_1x.yaml at reduced width
(the weights of detectron2_maskrcnn_small.npz, stem and res2 frozen), bitmask targets, its losses
with sampling off, its sampled counts, and the gradients and buffers of two steps of its own
build_optimizer and build_lr_scheduler.
"""

import json

import pytest

from tests.parity import detectron2_training as d2tp
from tests.parity import training as tp

FIXTURE = str(tp.SMALL_FIXTURE)
FIXTURE_V2 = str(tp.SMALL_FIXTURE_V2)
FIXTURE_D2 = str(d2tp.SMALL_FIXTURE)


def _assert_update_and_counts(r: dict) -> None:
    """Gradients, momentum buffers and two-step updates within 1e-3 (the update also within
    twice its float32 floor), the same learning rates, and the samplers' candidates and samples
    per photo equal the reference's and follow the rule (256 anchors at 1:1, 512 RoIs at 25%)."""
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
    _assert_update_and_counts(r)
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
    r = tp.check(FIXTURE, overrides=[override], losses_only=True, photos=2)
    print(override, r["loss_rel_diff_max"])
    assert r["loss_rel_diff_max"][loss] > 1e-3


@pytest.mark.slow
def test_v2_training_path_equals_torchvision():
    """v2: batch norm on batch statistics in the FPN and heads, over the RoIs that exist (the
    sampled ones, not the padding of a static count); see tp.TOLERANCES_V2 for why its gradients
    are compared with torchvision's float64 ones."""
    r = tp.check(FIXTURE_V2)
    print(json.dumps({k: v for k, v in r.items() if "counts" not in k}, indent=1))
    assert r["v2"] and len({tuple(s) for s in r["images"]}) == len(r["images"]) >= 5
    for key in ("loss_rel_diff_max", "canvas_loss_rel_diff_max"):
        assert max(r[key].values()) <= 1e-4, (key, r[key])
    assert r["batch_loss_rel_diff_max"] <= 1e-4
    assert r["trainable"][0] == r["trainable"][1] > 70 and r["trainable"][2] == 0
    name, grad, noise = r["grad_rel_diff_max"]
    assert grad <= 3e-3 + 2 * noise, r["grad_rel_diff_max"]
    name, buffer, allowance = r["momentum_buffer_rel_diff_max"]
    assert buffer <= 3e-3 + allowance, r["momentum_buffer_rel_diff_max"]
    ours, ref = r["rois_per_step"]
    assert ours == ref
    # The heads in float64: equal to the float32 storage of torchvision's float64 results, and
    # the padded rows beside the real RoIs receive no gradient.
    for head in ("box", "mask"):
        h = r["float64_heads"][head]
        assert h["params"] >= 10 and h["padded_row_grad"] == 0.0
        assert max(h["output"], h["input_grad"], h["param_grad"]) <= 1e-6, (head, h)
    # torchvision's own v2 layout (BatchNorm2d in the backbone) is measurably different.
    assert max(r["as_built_loss_rel_diff_max"].values()) > 1e-2
    assert tp.passes(r)


def _v2_batch_loss_rel_diff() -> float:
    import numpy as np
    import tensorflow as tf

    from mrcnn_tf.model import LOSS_KEYS

    ref = dict(np.load(FIXTURE_V2))
    meta = json.loads(str(ref["meta"]))
    model = tp._model(ref, sampling=False)
    images, targets = tp._batch(ref, meta["batch"])
    losses = model.forward_train(tf.constant(images), targets, training=True)
    return max(abs(float(losses[k]) - ref["batch_losses"][j]) / abs(ref["batch_losses"][j])
               for j, k in enumerate(LOSS_KEYS))


def test_v2_batch_statistics_leave_padded_rois_out(monkeypatch):
    """In a batch of two photos the mask head's foreground rows are padded to the larger count:
    batch norm's statistics over the real RoIs only give torchvision's losses, and with the
    padding in them the losses leave torchvision's."""
    from mrcnn_tf.layers import heads

    assert _v2_batch_loss_rel_diff() <= 1e-4
    normalise = heads._normalise
    monkeypatch.setattr(heads, "_normalise",
                        lambda norm, x, training, valid: normalise(norm, x, training, None))
    assert _v2_batch_loss_rel_diff() > 1e-3


@pytest.mark.slow
def test_detectron2_training_path_equals_detectron2():
    r = tp.check(FIXTURE_D2)
    print(json.dumps({k: v for k, v in r.items() if "counts" not in k}, indent=1))
    assert len({tuple(s) for s in r["images"]}) == len(r["images"]) >= 5
    assert max(r["loss_rel_diff_max"].values()) <= 1e-4, r["loss_rel_diff_max"]
    assert r["batch_loss_rel_diff_max"] <= 1e-4
    assert r["trainable"][0] == r["trainable"][1] > 40 and r["trainable"][2] == 0
    # detectron2's WarmupMultiStepLR: 0.02 x 0.001, then 0.02 x (0.001 + 0.999 / 1000).
    assert r["lrs"][1] == pytest.approx([2e-5, 3.998e-5], rel=1e-9)
    # Its samplers (256 anchors at 1:1, 512 RoIs at 25%, the ground truth appended to the
    # proposals): candidates and samples per photo equal, as below.
    _assert_update_and_counts(r)
    assert tp.passes(r)


@pytest.mark.parametrize("override, loss", [
    ("model.rpn.smooth_l1_beta=0.1111111111111111", "loss_rpn_box"),  # torchvision's RPN loss
    ("model.rpn.loss_normalizer=sampled", "loss_rpn_objectness"),  # torchvision's normaliser
    ("model.box_head.smooth_l1_beta=0.1111111111111111", "loss_box_reg"),
    ("model.mask_head.target=soft", "loss_mask"),  # torchvision's soft mask targets
    ("model.roi_align.aligned=false", "loss_mask"),
])
def test_the_other_value_of_each_detectron2_switch_breaks_parity(override, loss):
    """Each switch of the detectron2 recipe, set to torchvision's value, moves the loss far
    outside the tolerance on the first two photos, where detectron2's own values are equal."""
    r = tp.check(FIXTURE_D2, overrides=[override], losses_only=True, photos=2)
    print(override, r["loss_rel_diff_max"])
    assert r["loss_rel_diff_max"][loss] > 1e-3
