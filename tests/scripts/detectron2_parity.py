"""Parity of our MaskRCNN with detectron2's Mask R-CNN R50-FPN after weight conversion.

Two halves, in two virtual environments, as tests/scripts/torchvision_parity.py:

  reference (needs detectron2, built from source in the torch venv): builds detectron2's
    ``mask_rcnn_R_50_FPN_3x`` model from its own config file with seeded random weights (random
    FrozenBN statistics, fan-in scaled weights, calibrated predictors), runs it on a real COCO
    photo and writes its state dict (detectron2's key layout) and every stage's output;
  check (needs mrcnn_tf): ``tests/parity/torchvision_inference.py``'s check, which converts the
    state dict with ``mrcnn_tf.weights_detectron2.load_detectron2`` into
    ``configs/detectron2_r50_fpn.yaml`` and compares stage by stage.

The photo is resized by detectron2's own ``ResizeShortestEdge`` (PIL, on uint8) before both
models see it: detectron2 resizes uint8 images with PIL in its data loader, which we do not
reproduce (our model resizes float tensors as torchvision does), so the comparison starts from
the same pixels and every later stage is the model's.

``--small`` builds a reduced-width model (one bottleneck per stage, widths 16..128, FPN 64,
fc 64, short side 200) from detectron2's own blocks; its reference is committed as
tests/fixtures/detectron2_maskrcnn_small.npz and checked by the default test suite.
``--resnext`` takes ``mask_rcnn_X_101_32x8d_FPN_3x`` instead (grouped 3x3 convs, stride on the
3x3, its pixel std); with ``--small`` its bottlenecks are 4 groups of 8 channels
(tests/fixtures/detectron2_x_maskrcnn_small.npz).

    python tests/scripts/detectron2_parity.py --torch_python benchmarks/.venvs/torch/bin/python \\
        --detectron2_configs /path/to/detectron2/configs
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

from tests.parity.detectron2_inference import SMALL, SMALL_FIXTURE, SMALL_FIXTURE_X  # noqa: E402
from tests.parity.torchvision_inference import check, passes  # noqa: E402
from tests.scripts import torchvision_parity as tp  # noqa: E402

D2_CONFIGS = {False: "mask_rcnn_R_50_FPN_3x.yaml", True: "mask_rcnn_X_101_32x8d_FPN_3x.yaml"}
FULL = dict(min_size=800, max_size=1333)
TARGET_STD = {"proposal_generator.rpn_head.objectness_logits": 2.0,
              "proposal_generator.rpn_head.anchor_deltas": 0.3,
              "roi_heads.box_predictor.cls_score": 2.0,
              "roi_heads.box_predictor.bbox_pred": 1.0,
              "roi_heads.mask_head.predictor": 2.0}


# -- the detectron2 half ----------------------------------------------------------------------

def _register_small_backbone():
    from detectron2.modeling import BACKBONE_REGISTRY
    from detectron2.modeling.backbone import FPN, BasicStem, BottleneckBlock, ResNet
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    if "small_resnet_fpn" in BACKBONE_REGISTRY:
        return

    @BACKBONE_REGISTRY.register()
    def small_resnet_fpn(cfg, input_shape):  # detectron2's ResNet(-X)-FPN, narrower
        s = SMALL
        groups = cfg.MODEL.RESNETS.NUM_GROUPS
        resnext = groups > 1
        stem = BasicStem(in_channels=3, out_channels=s["stem"], norm="FrozenBN")
        stages, cin = [], s["stem"]
        for i, w in enumerate(s["widths"]):
            out = 4 * w
            width = 2 * w if resnext else w  # resnext_small: 4 groups of 8 in res2
            stages.append(ResNet.make_stage(
                BottleneckBlock, 1, stride_per_block=[1 if i == 0 else 2], in_channels=cin,
                bottleneck_channels=width, out_channels=out,
                num_groups=4 if resnext else 1, norm="FrozenBN",
                stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1))
            cin = out
        features = ["res2", "res3", "res4", "res5"]
        bottom_up = ResNet(stem, stages, out_features=features)
        return FPN(bottom_up=bottom_up, in_features=features, out_channels=s["fpn"], norm="",
                   top_block=LastLevelMaxPool(), fuse_type="sum")


def _d2_model(small: bool, configs: str, resnext: bool = False):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(configs, "COCO-InstanceSegmentation", D2_CONFIGS[resnext]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    sizes = SMALL if small else FULL
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = sizes["min_size"], sizes["max_size"]
    if small:
        _register_small_backbone()
        cfg.MODEL.BACKBONE.NAME = "small_resnet_fpn"
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = SMALL["fc"]
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = SMALL["mask"]
    return build_model(cfg).eval(), cfg


def reference(out_path: str, small: bool, image_path: str, configs: str, seed: int = 0,
              resnext: bool = False) -> None:
    import detectron2
    import torch
    from detectron2.data import transforms as T
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.structures import Boxes
    from PIL import Image

    torch.manual_seed(seed)
    model, cfg = _d2_model(small, configs, resnext)
    tp._randomise(model, seed, backbone="bottom_up", deconv="mask_head.deconv",
                  norm_types=(FrozenBatchNorm2d,))
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    rgb = resize.get_transform(rgb).apply_image(rgb)  # detectron2's own (PIL) resize
    h, w = rgb.shape[:2]
    bgr = torch.as_tensor(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))).float()
    inputs = {"image": bgr, "height": h, "width": w}
    tp._calibrate(model, inputs, targets=TARGET_STD)
    out = {"meta": np.array(json.dumps({"family": "detectron2", "small": small, "seed": seed,
                                        "resnext": resnext,
                                        "image": image_path,
                                        "detectron2": detectron2.__version__}))}
    out["image"] = rgb

    def nhwc(t):
        return t.permute(0, 2, 3, 1).numpy()

    def yxyx(b):
        return b[:, [1, 0, 3, 2]].numpy()

    with torch.no_grad():
        images = model.preprocess_image([inputs])
        out["resized_size"] = np.array(images.image_sizes[0])
        out["input"] = nhwc(images.tensor)[..., ::-1]  # BGR -> RGB, as our model's input
        body = model.backbone.bottom_up(images.tensor)
        for lv in range(2, 6):
            out[f"c{lv}"] = nhwc(body[f"res{lv}"])
        feats = model.backbone(images.tensor)
        for lv in range(2, 7):
            out[f"p{lv}"] = nhwc(feats[f"p{lv}"])
        proposals, _ = model.proposal_generator(images, feats, None)
        boxes = proposals[0].proposal_boxes.tensor
        out["proposals"] = yxyx(boxes)
        heads = model.roi_heads
        pooled = heads.box_pooler([feats[f] for f in heads.box_in_features],
                                  [Boxes(boxes[:tp.BOX_ROWS])])
        scores, deltas = heads.box_predictor(heads.box_head(pooled))
        # Ours: background first, and a (zero) background slot in the deltas.
        out["class_logits"] = torch.cat([scores[:, -1:], scores[:, :-1]], 1).numpy()
        deltas = deltas.reshape(len(deltas), -1, 4)[..., [1, 0, 3, 2]]
        out["box_deltas"] = torch.cat([torch.zeros_like(deltas[:, :1]), deltas], 1).numpy()
        dets = model([inputs])[0]["instances"]
        # The detections' 28x28 mask probabilities before pasting, in the same order.
        raw = model.inference([inputs], do_postprocess=False)[0]
        out["det_mask_probs"] = raw.pred_masks[:, 0].numpy()
    out["det_boxes"] = yxyx(dets.pred_boxes.tensor)
    out["det_scores"] = dets.scores.numpy()
    out["det_classes"] = dets.pred_classes.numpy() + 1  # ours: 0 is background
    out["det_masks"] = dets.pred_masks.numpy().astype(bool)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            out[f"sd/{k}"] = v.numpy()
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 1e6:.1f} MB), image {h}x{w}, "
          f"{len(out['det_scores'])} detections, {len(out['proposals'])} proposals")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", choices=("reference", "check", "both"), default="both")
    p.add_argument("--small", action="store_true", help="the reduced-width model")
    p.add_argument("--resnext", action="store_true", help="X101-32x8d instead of R50")
    p.add_argument("--reference", help="reference .npz (default: the committed small fixture, "
                   "or /tmp for the full model)")
    p.add_argument("--image", default=str(tp.DEFAULT_IMAGE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detectron2_configs", default="/work/d2src/configs",
                   help="detectron2's configs/ folder (its source tree)")
    p.add_argument("--torch_python", default=sys.executable,
                   help="interpreter with torch and detectron2 for the reference half")
    args = p.parse_args(argv)
    x = "_x" if args.resnext else ""
    path = args.reference or (str(SMALL_FIXTURE_X if args.resnext else SMALL_FIXTURE)
                              if args.small else f"/tmp/detectron2{x}_maskrcnn_full.npz")
    if args.mode == "reference":
        reference(path, args.small, args.image, args.detectron2_configs, args.seed, args.resnext)
        return 0
    if args.mode == "both":
        subprocess.run([args.torch_python, __file__, "reference", "--reference", path,
                        "--image", args.image, "--seed", str(args.seed),
                        "--detectron2_configs", args.detectron2_configs]
                       + (["--small"] if args.small else [])
                       + (["--resnext"] if args.resnext else []), check=True)
    result = check(path)
    print(json.dumps(result, indent=1))
    return 0 if passes(result) else 1


if __name__ == "__main__":
    sys.exit(main())
