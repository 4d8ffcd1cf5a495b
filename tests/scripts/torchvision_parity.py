"""Parity of our MaskRCNN with torchvision's maskrcnn_resnet50_fpn (v1) or
maskrcnn_resnet50_fpn_v2 (``--v2``) after weight conversion.

Two halves, because torch and TensorFlow live in different virtual environments:

  reference (needs torch + torchvision): builds torchvision's model with seeded random weights,
    runs it on a real COCO image and writes its state dict and every stage's output to an .npz;
  check (needs mrcnn_tf): converts that state dict with ``mrcnn_tf.weights.load_torchvision``,
    runs our model stage by stage on the same image and compares (``check`` and ``passes`` of
    tests/parity/torchvision_inference.py, which the tests share).

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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.parity.torchvision_inference import (  # noqa: E402
    SMALL,
    SMALL_FIXTURE,
    SMALL_FIXTURE_V2,
    check,
    passes,
)

DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "coco_tiny16" / "train2017" / "000000060623.jpg"

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


if __name__ == "__main__":
    sys.exit(main())
