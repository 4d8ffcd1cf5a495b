"""Parity of our MaskRCNN with torchvision's maskrcnn_resnet50_fpn (v1) or
maskrcnn_resnet50_fpn_v2 (``--v2``) after weight conversion.

Two halves, because torch and TensorFlow live in different virtual environments:

  reference (needs torch + torchvision): builds torchvision's model with seeded random weights,
    runs it on a real COCO image and writes its state dict and every stage's output to an .npz;
  check (needs mrcnn_tf): converts that state dict with ``mrcnn_tf.weights.load_torchvision``,
    runs our model stage by stage on the same image and compares.

``--small`` builds a reduced-width model (the resnet_small widths, FPN 64, fc 64, short side 200)
from torchvision's own building blocks; its reference is committed as
tests/fixtures/torchvision_maskrcnn_small.npz (v1) and torchvision_v2_maskrcnn_small.npz (v2) and
checked by the default test suite without torch. The full-size check is one command (torch in its
own venv, see benchmarks/README.md)::

    python tests/scripts/torchvision_parity.py [--v2] --torch_python /path/to/torchvenv/bin/python

Random weights give near-uniform scores, so the reference widens them (seeded) to make rankings
well separated, and uses score thresholds of 0 on both sides so that detections exist.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL_FIXTURE = REPO / "tests" / "fixtures" / "torchvision_maskrcnn_small.npz"
SMALL_FIXTURE_V2 = REPO / "tests" / "fixtures" / "torchvision_v2_maskrcnn_small.npz"
CONFIGS = {False: REPO / "configs" / "torchvision_r50_fpn.yaml",
           True: REPO / "configs" / "torchvision_r50_fpn_v2.yaml"}
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "coco_tiny16" / "train2017" / "000000060623.jpg"

SMALL = dict(stem=16, widths=(16, 32, 64, 128), fpn=64, fc=64, mask=64, min_size=200,
             max_size=320, crop=(240, 320))  # the small fixture uses a 240x320 centre crop
FULL = dict(min_size=800, max_size=1333)
BOX_ROWS = 256


# -- the torch half -----------------------------------------------------------------------------

def _torch_model(small: bool, v2: bool = False, frozen_backbone: bool | None = None):
    """torchvision's Mask R-CNN (v1 or v2, full or reduced width). ``frozen_backbone``: the
    backbone's norms are FrozenBatchNorm2d (v1's default) or BatchNorm2d (v2's default, as
    ``maskrcnn_resnet50_fpn_v2`` builds it with or without pretrained weights)."""
    from torch import nn
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import (
        FastRCNNConvFCHead,
        FastRCNNPredictor,
        TwoMLPHead,
    )
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops import FrozenBatchNorm2d

    common = dict(box_score_thresh=0.0)
    frozen = (not v2) if frozen_backbone is None else frozen_backbone
    if not small and v2:
        # BatchNorm2d everywhere (v2 never freezes its norms); eval mode uses the statistics.
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                         **FULL, **common)
        if frozen:  # the same model with the backbone's BatchNorm2d frozen, names unchanged
            _freeze_norms(model.backbone.body, FrozenBatchNorm2d, nn.BatchNorm2d)
        return model
    if not small:
        # maskrcnn_resnet50_fpn(weights=COCO) builds exactly this (FrozenBatchNorm2d, 3 layers
        # trainable); weights=None would switch to BatchNorm2d.
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
        return MaskRCNN(backbone, num_classes=91, **FULL, **common)

    s = SMALL
    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d

    class SmallResNet(nn.Module):  # torchvision's ResNet layout and names, narrower
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, s["stem"], 7, 2, 3, bias=False)
            self.bn1 = norm(s["stem"])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = s["stem"]
            for i, w in enumerate(s["widths"]):
                stride = 1 if i == 0 else 2
                down = nn.Sequential(nn.Conv2d(cin, w * 4, 1, stride, bias=False),
                                     norm(w * 4))
                setattr(self, f"layer{i + 1}", nn.Sequential(
                    Bottleneck(cin, w, stride, down, norm_layer=norm)))
                cin = w * 4

    body = SmallResNet()
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                               [w * 4 for w in s["widths"]], s["fpn"],
                               norm_layer=nn.BatchNorm2d if v2 else None)
    f = s["fpn"]
    if v2:  # maskrcnn_resnet50_fpn_v2's heads, narrower
        return MaskRCNN(
            backbone, num_classes=None, min_size=s["min_size"], max_size=s["max_size"],
            rpn_head=RPNHead(f, 3, conv_depth=2),
            box_head=FastRCNNConvFCHead((f, 7, 7), [f] * 4, [s["fc"]], norm_layer=nn.BatchNorm2d),
            box_predictor=FastRCNNPredictor(s["fc"], 91),
            mask_head=MaskRCNNHeads(f, [f] * 4, 1, norm_layer=nn.BatchNorm2d),
            mask_predictor=MaskRCNNPredictor(f, f, 91), **common)
    return MaskRCNN(
        backbone, num_classes=None, min_size=s["min_size"], max_size=s["max_size"],
        rpn_head=RPNHead(f, 3), box_head=TwoMLPHead(f * 49, s["fc"]),
        box_predictor=FastRCNNPredictor(s["fc"], 91),
        mask_head=MaskRCNNHeads(f, (f, f, f, f), 1),
        mask_predictor=MaskRCNNPredictor(f, f, 91), **common)


def _freeze_norms(module, frozen_cls, bn_cls) -> None:
    """Replaces every ``bn_cls`` child of ``module`` (recursively) by ``frozen_cls`` of the same
    width and epsilon (its statistics are loaded afterwards)."""
    for name, child in module.named_children():
        if isinstance(child, bn_cls):
            setattr(module, name, frozen_cls(child.num_features, eps=child.eps))
        else:
            _freeze_norms(child, frozen_cls, bn_cls)


def _randomise(model, seed: int, backbone: str = "body", deconv: str = "conv5_mask",
               norm_types=()):
    """Seeded weights with spread-out outputs: random norm statistics everywhere and fan-in scaled
    weights elsewhere, so that objectness and class logits spread over a few units (torchvision's
    own init gives near-equal scores whose ranking float rounding decides). ``backbone`` and
    ``deconv`` mark the backbone's keys (gain 2) and the transposed conv's ([in, out, ...]);
    ``norm_types`` adds norm module classes (detectron2's FrozenBatchNorm2d)."""
    import torch
    from torchvision.ops import FrozenBatchNorm2d

    types = (torch.nn.BatchNorm2d, FrozenBatchNorm2d, *norm_types)
    norms = {name for name, m in model.named_modules() if isinstance(m, types)}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.rsplit(".", 1)[0] in norms:
                if name.endswith("running_var"):
                    t.copy_(torch.empty(t.shape).uniform_(0.5, 2.0, generator=gen))
                elif name.endswith("running_mean") or name.endswith("bias"):
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
                else:
                    t.copy_(torch.empty(t.shape).uniform_(0.5, 1.5, generator=gen))
            elif name.endswith("weight"):
                fan_in = t[0].numel() if t.dim() > 1 else 1
                if deconv in name:
                    fan_in = t.shape[0]
                gain = 2.0 if backbone in name else 1.0
                t.copy_(torch.randn(t.shape, generator=gen) * (gain / fan_in) ** 0.5)
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)


# Output spread (std) the calibration gives each predictor on the test image.
_TARGET_STD = {"rpn.head.cls_logits": 2.0, "rpn.head.bbox_pred": 0.3,
               "roi_heads.box_predictor.cls_score": 2.0, "roi_heads.box_predictor.bbox_pred": 1.0,
               "roi_heads.mask_predictor.mask_fcn_logits": 2.0}


def _calibrate(model, x, passes: int = 3, targets=None):
    """Rescales each predictor so that its outputs on ``x`` have the spread of ``targets``
    (default _TARGET_STD): random ResNet-50 features reach thousands, which would push every
    random box out of the image (no proposals) and saturate every score. ``x`` is what the model
    is called with."""
    import torch

    targets = targets or _TARGET_STD
    modules = dict(model.named_modules())
    for _ in range(passes):
        stds = {}

        def record(name, stds=stds):
            def hook(module, inputs, output):  # returns None: the output is left as it is
                if output.numel() > 1:
                    stds.setdefault(name, float(output.std()))
            return hook

        hooks = [modules[name].register_forward_hook(record(name)) for name in targets]
        with torch.no_grad():
            model([x])
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, std in stds.items():
                factor = targets[name] / max(std, 1e-12)
                modules[name].weight.mul_(factor)
                modules[name].bias.mul_(factor)


def reference(out_path: str, small: bool, image_path: str, seed: int = 0,
              v2: bool = False) -> None:
    import torch
    import torchvision
    from torchvision.io import ImageReadMode, read_image

    torch.manual_seed(seed)
    model = _torch_model(small, v2).eval()
    _randomise(model, seed)
    image = read_image(image_path, ImageReadMode.RGB)  # uint8 [3, H, W]
    if small:  # a centre crop keeps the committed fixture small
        ch, cw = SMALL["crop"]
        top, left = (image.shape[1] - ch) // 2, (image.shape[2] - cw) // 2
        image = image[:, top: top + ch, left: left + cw].contiguous()
    x = image.float() / 255.0
    _calibrate(model, x)
    out = {"meta": np.array(json.dumps({"small": small, "v2": v2, "seed": seed,
                                        "image": image_path,
                                        "torchvision": torchvision.__version__}))}
    out["image"] = image.permute(1, 2, 0).numpy()

    def nhwc(t):
        return t.permute(0, 2, 3, 1).numpy()

    def yxyx(b):
        return b[:, [1, 0, 3, 2]].numpy()

    with torch.no_grad():
        images, _ = model.transform([x])
        out["resized_size"] = np.array(images.image_sizes[0])
        out["input"] = nhwc(images.tensors)
        body = model.backbone.body(images.tensors)
        for i, k in enumerate(body):
            out[f"c{i + 2}"] = nhwc(body[k])
        feats = model.backbone.fpn(body)
        for lv, k in zip(range(2, 7), feats):
            out[f"p{lv}"] = nhwc(feats[k])
        proposals, _ = model.rpn(images, feats)
        out["proposals"] = yxyx(proposals[0])
        # The box head's outputs for the first BOX_ROWS proposals (all rows cost megabytes).
        proposals = [proposals[0][:BOX_ROWS]]
        pooled = model.roi_heads.box_roi_pool(feats, proposals, images.image_sizes)
        head = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
        out["class_logits"] = head[0].numpy()
        out["box_deltas"] = head[1].reshape(-1, 91, 4)[..., [1, 0, 3, 2]].numpy()
        dets = model([x])[0]
        # The detections' 28x28 mask probabilities before pasting (roi_heads' "masks"; the
        # transform's postprocess only pastes them, in the same order).
        heads, _ = model.roi_heads(feats, model.rpn(images, feats)[0], images.image_sizes)
        out["det_mask_probs"] = heads[0]["masks"][:, 0].numpy()
    out["det_boxes"] = yxyx(dets["boxes"])
    out["det_scores"] = dets["scores"].numpy()
    out["det_classes"] = dets["labels"].numpy()
    out["det_masks"] = dets["masks"][:, 0].numpy() >= 0.5  # [D, H, W] in the original image
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            out[f"sd/{k}"] = v.numpy()
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 1e6:.1f} MB), "
          f"{len(out['det_scores'])} detections, {len(out['proposals'])} proposals")


# -- the TensorFlow half ------------------------------------------------------------------------

def small_overrides() -> list[str]:
    """Config overrides that turn configs/torchvision_r50_fpn[_v2].yaml into the small model."""
    s = SMALL
    return ["model.backbone.name=resnet_small", f"model.fpn.channels={s['fpn']}",
            f"model.box_head.conv_dim={s['fpn']}",
            f"model.rpn.conv_channels={s['fpn']}", f"model.box_head.fc_dim={s['fc']}",
            f"model.mask_head.conv_dim={s['mask']}", f"model.preprocess.short_size={s['min_size']}",
            f"model.preprocess.long_size={s['max_size']}",
            "data.canvas_long_sides=[224, 288, 320]"]


def parity_overrides(small: bool) -> list[str]:
    """Overrides of configs/torchvision_r50_fpn.yaml for the parity model: score threshold 0
    (as box_score_thresh=0 on torchvision's side), and the small widths with ``small``."""
    return ["model.detection.score_threshold=0.0"] + (small_overrides() if small else [])


def our_config(small: bool, v2: bool = False):
    from mrcnn_tf.config import load_config

    return load_config(CONFIGS[v2], parity_overrides(small))


def _config_and_loader(meta: dict):
    """Our config and weight loader for a reference's family (torchvision v1/v2, detectron2)."""
    if meta.get("family") == "detectron2":
        from mrcnn_tf.weights_detectron2 import load_detectron2
        from tests.scripts import detectron2_parity

        return (detectron2_parity.our_config(meta["small"], meta.get("resnext", False)),
                load_detectron2)
    from mrcnn_tf.weights import load_torchvision

    return our_config(meta["small"], meta.get("v2", False)), load_torchvision


def _match(ref_boxes, boxes, tol):
    """For each reference box, whether some box is within ``tol`` px in every coordinate."""
    if len(boxes) == 0:
        return np.zeros(len(ref_boxes), bool), np.full(len(ref_boxes), -1)
    d = np.abs(ref_boxes[:, None, :] - boxes[None, :, :]).max(-1)
    best = d.argmin(1)
    return d[np.arange(len(ref_boxes)), best] <= tol, best


def check(ref_path: str) -> dict:
    """Runs our converted model on the reference's image; returns the measured differences."""
    import tensorflow as tf

    from mrcnn_tf.model import build_model
    from mrcnn_tf.ops.masks import paste_masks

    ref = dict(np.load(ref_path))
    meta = json.loads(str(ref["meta"]))
    config, load = _config_and_loader(meta)
    model = build_model(config)
    state = {k[3:]: v for k, v in ref.items() if k.startswith("sd/")}
    n_loaded = load(model, state)
    image = tf.constant(ref["image"][None])
    r = {"tensors_loaded": n_loaded}

    pre = model.preprocessor(image)
    r["resized_size_equal"] = bool((pre["image_sizes"].numpy()[0] == ref["resized_size"]).all())
    r["input_max_abs_diff"] = float(np.abs(pre["images"].numpy() - ref["input"]).max())
    # Stage-wise: each stage gets torchvision's input where one is defined.
    body = model.backbone(tf.constant(ref["input"]))
    feats_in = {k: tf.constant(ref[k]) for k in ("c2", "c3", "c4", "c5")}
    fpn = model.fpn(feats_in)
    for lv in range(2, 6):
        c = f"c{lv}"
        r[f"{c}_rel_diff"] = float(np.abs(body[c].numpy() - ref[c]).max() / np.abs(ref[c]).max())
    for lv in range(2, 7):
        p = f"p{lv}"
        r[f"{p}_rel_diff"] = float(np.abs(fpn[p].numpy() - ref[p]).max() / np.abs(ref[p]).max())
    feats = {k: tf.constant(ref[k]) for k in ("p2", "p3", "p4", "p5", "p6")}
    rpn = model.rpn_head(feats)
    anchors = model.anchors(feats, tf.shape(ref["input"])[1:3])
    props = model.proposal_generator(rpn["objectness"], rpn["deltas"], anchors,
                                     tf.constant(ref["resized_size"][None]), training=False)
    ours = props["boxes"].numpy()[0][props["valid"].numpy()[0]]
    matched, _ = _match(ref["proposals"], ours, 1e-3)
    r["proposals"] = [int(len(ref["proposals"])), int(len(ours))]
    r["proposals_matched_1e-3px"] = float(matched.mean())
    box = model.box_head(model.box_roi_align(
        feats, tf.constant(ref["proposals"][None, :len(ref["class_logits"])])))
    scale = max(np.abs(ref["class_logits"]).max(), 1.0)
    r["class_logits_max_abs_diff"] = float(np.abs(box["class_logits"].numpy()[0]
                                                  - ref["class_logits"]).max())
    r["class_logits_scale"] = float(scale)
    r["box_deltas_max_abs_diff"] = float(np.abs(box["box_deltas"].numpy()[0]
                                                - ref["box_deltas"]).max())
    # End to end.
    det = model(image)
    n = int(det["num_detections"][0])
    boxes = det["detection_boxes"].numpy()[0, :n]
    scores = det["detection_scores"].numpy()[0, :n]
    classes = det["detection_classes"].numpy()[0, :n]
    h, w = ref["image"].shape[:2]
    masks = paste_masks(det["detection_masks"][0, :n], boxes, h, w,
                        method=config.model.detection.mask_paste).numpy().astype(bool)
    r["detections"] = [int(len(ref["det_scores"])), n]
    ok, idx = _match(ref["det_boxes"], boxes, 1e-2)
    same_class = ok & (classes[idx] == ref["det_classes"])
    r["detections_matched"] = float(same_class.mean())
    r["det_box_max_abs_diff"] = float(np.abs(boxes[idx[same_class]]
                                             - ref["det_boxes"][same_class]).max())
    r["det_score_max_abs_diff"] = float(np.abs(scores[idx[same_class]]
                                               - ref["det_scores"][same_class]).max())
    # The same masks pasted at the reference's boxes: boxes differ by float rounding (1e-3 px),
    # which moves a steep random mask's probabilities by up to ~1e-3; at the reference's boxes
    # only the 28x28 probabilities' own difference is left. A differing pixel whose probability
    # is then within that difference of the threshold is a rounding tie.
    rows = np.nonzero(same_class)[0]
    ours28 = tf.gather(det["detection_masks"][0], idx[rows]).numpy()
    r["mask_probs_max_abs_diff"] = float(np.abs(ours28 - ref["det_mask_probs"][rows]).max())
    # A pasted probability is a convex combination of 28x28 ones, so it can move by as much.
    band = max(r["mask_probs_max_abs_diff"], 1e-6)
    at_ref = paste_masks(tf.gather(det["detection_masks"][0], idx[rows]), ref["det_boxes"][rows],
                         h, w, threshold=None, method=config.model.detection.mask_paste).numpy()
    ious, differing, not_ties = [], 0, 0
    for k, j in enumerate(rows):
        a, b = masks[idx[j]], ref["det_masks"][j]
        union = (a | b).sum()
        ious.append(1.0 if union == 0 else (a & b).sum() / union)
        differing += int((a ^ b).sum())
        flipped = (at_ref[k] >= 0.5) ^ b
        not_ties += int((np.abs(at_ref[k][flipped] - 0.5) > band).sum())
    r["mask_pixels"] = int(sum(m.sum() for m in ref["det_masks"][rows]))
    r["mask_pixels_differing"] = differing
    r["mask_pixels_differing_not_ties"] = not_ties
    r["mask_iou_min"] = float(min(ious))
    r["mask_iou_mean"] = float(np.mean(ious))
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", choices=("reference", "check", "both"), default="both")
    p.add_argument("--small", action="store_true", help="the reduced-width model")
    p.add_argument("--v2", action="store_true", help="maskrcnn_resnet50_fpn_v2 instead of v1")
    p.add_argument("--reference", help="reference .npz (written by 'reference', read by "
                   "'check'); default: the committed small fixture or /tmp for the full model")
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_python", default=sys.executable,
                   help="interpreter with torch and torchvision for the reference half")
    args = p.parse_args(argv)
    path = args.reference or (str(SMALL_FIXTURE_V2 if args.v2 else SMALL_FIXTURE) if args.small
                              else f"/tmp/torchvision{'_v2' if args.v2 else ''}_maskrcnn_full.npz")
    if args.mode in ("reference", "both"):
        if args.mode == "both":
            cmd = [args.torch_python, __file__, "reference", "--reference", path, "--image",
                   args.image, "--seed", str(args.seed)] + (["--small"] if args.small else []) + (
                       ["--v2"] if args.v2 else [])
            subprocess.run(cmd, check=True)
        else:
            reference(path, args.small, args.image, args.seed, args.v2)
    if args.mode in ("check", "both"):
        result = check(path)
        print(json.dumps(result, indent=1))
        return 0 if passes(result) else 1
    return 0


def passes(r: dict) -> bool:
    """The issue's tolerances."""
    checks = [r["resized_size_equal"],
              all(r[f"c{lv}_rel_diff"] <= 1e-4 for lv in range(2, 6)),
              all(r[f"p{lv}_rel_diff"] <= 1e-4 for lv in range(2, 7)),
              r["proposals_matched_1e-3px"] >= 0.99,
              r["class_logits_max_abs_diff"] <= 1e-4 * r["class_logits_scale"],
              r["box_deltas_max_abs_diff"] <= 1e-4 * max(1.0, r["class_logits_scale"]),
              r["detections"][0] == r["detections"][1],
              r["detections_matched"] >= 0.99,
              r["mask_iou_min"] >= 0.99,
              r["mask_pixels_differing_not_ties"] == 0]
    return all(checks)


if __name__ == "__main__":
    sys.exit(main())
