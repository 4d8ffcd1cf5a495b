"""Training-path parity with detectron2's Mask R-CNN R50-FPN in training mode: the five losses,
the gradient of every trainable parameter, the sampled counts (PROPOSAL_APPEND_GT included) and
two steps of detectron2's own solver (``build_optimizer`` and ``build_lr_scheduler``: SGD with
momentum, weight decay, WEIGHT_DECAY_NORM and the bias factors, linear warmup).

Three halves, as tests/scripts/torchvision_train_parity.py, whose inputs (six real COCO photos of
different sizes and aspect ratios with their instances) and check (tests/parity/training.py,
generalised by the reference's ``family``) this script shares:

  reference (needs detectron2, built from source in the torch venv): detectron2's
    ``GeneralizedRCNN`` from its own ``mask_rcnn_R_50_FPN_1x`` config (the model of the 3x is the
    same), seeded random weights as in tests/scripts/detectron2_parity.py, in training mode.
    Each photo is resized by detectron2's own ``ResizeShortestEdge`` (PIL on uint8; the masks
    with its segmentation transform, the boxes with its box transform), and its instances are
    given as ``BitMasks`` (``INPUT.MASK_FORMAT: bitmask``; detectron2's default, polygons, makes
    other mask targets). Sampling off: every anchor (``RPN.BATCH_SIZE_PER_IMAGE`` set to at least
    the anchor count, so that its loss normaliser is that count times the images, as ours with
    ``loss_normalizer: requested``) and every proposal;
  check (mrcnn_tf): ``configs/detectron2_r50_fpn.yaml`` (or ``configs/coco_r50_fpn_1x.yaml``,
    the same recipe) with the state dict through ``load_detectron2``, on the same resized inputs.

``--small`` uses the reduced-width model of detectron2_parity.py with that script's committed
weights; its reference is committed as tests/fixtures/detectron2_train_small.npz and checked by
tests/test_train_parity.py without torch. The full-size run (after building detectron2 from
source into the torch venv)::

    python tests/scripts/detectron2_train_parity.py \\
        --torch_python benchmarks/.venvs/torch/bin/python \\
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

from tests.parity.detectron2_training import SMALL_FIXTURE  # noqa: E402
from tests.parity.training import check, passes  # noqa: E402
from tests.scripts import detectron2_parity as d2p  # noqa: E402
from tests.scripts import torchvision_parity as tp  # noqa: E402
from tests.scripts import torchvision_train_parity as ttp  # noqa: E402

D2_CONFIG = "mask_rcnn_R_50_FPN_1x.yaml"
# RPN.BATCH_SIZE_PER_IMAGE with sampling off: at least every anchor of the largest padded batch
# (the full model's two-photo batch, 1088 x 1056: 286,977 anchors; the small model's, 288 x 288:
# 20,730); the reference asserts that its sampler kept every candidate.
RPN_ALL = {False: 400_000, True: 30_000}
LOSS_NAMES = {"loss_rpn_cls": "loss_rpn_objectness", "loss_rpn_loc": "loss_rpn_box",
              "loss_cls": "loss_box_class", "loss_box_reg": "loss_box_reg",
              "loss_mask": "loss_mask"}
# COCO's 80 category ids; detectron2's classes are their indices (0..79).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


# -- the detectron2 half ------------------------------------------------------------------------

def _model(small: bool, configs: str):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(configs, "COCO-InstanceSegmentation", D2_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MASK_FORMAT = "bitmask"
    sizes = d2p.SMALL if small else d2p.FULL
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = sizes["min_size"], sizes["max_size"]
    if small:
        d2p._register_small_backbone()
        cfg.MODEL.BACKBONE.NAME = "small_resnet_fpn"
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = d2p.SMALL["fc"]
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = d2p.SMALL["mask"]
    model = build_model(cfg)
    if small:  # build_resnet_backbone freezes; the small backbone's builder does not
        model.backbone.bottom_up.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
    return model, cfg


def _sampling(model, rpn: int, rpn_fraction: float, box: int, box_fraction: float) -> None:
    model.proposal_generator.batch_size_per_image = rpn
    model.proposal_generator.positive_fraction = rpn_fraction
    model.roi_heads.batch_size_per_image = box
    model.roi_heads.positive_fraction = box_fraction


def _counting(record: list, background: int | None):
    """detectron2's subsample_labels, recording per image the positive and negative candidates
    and how many of each it sampled (``background``: the ROI heads' background label)."""
    from detectron2.modeling.sampling import subsample_labels

    def sample(labels, num_samples, positive_fraction, bg_label):
        pos, neg = subsample_labels(labels, num_samples, positive_fraction, bg_label)
        if background is None:  # RPN: 1 foreground, 0 background, -1 ignored
            cand_pos, cand_neg = (labels == 1).sum(), (labels == 0).sum()
        else:
            cand_pos = ((labels != -1) & (labels != background)).sum()
            cand_neg = (labels == background).sum()
        record.append([int(cand_pos), int(cand_neg), len(pos), len(neg)])
        return pos, neg

    return sample


def _taking_all():
    """detectron2's subsample_labels, asserting that it kept every candidate (sampling off)."""
    from detectron2.modeling.sampling import subsample_labels

    def sample(labels, num_samples, positive_fraction, bg_label):
        pos, neg = subsample_labels(labels, num_samples, positive_fraction, bg_label)
        assert len(pos) + len(neg) == int((labels >= 0).sum()), (len(pos), len(neg))
        return pos, neg

    return sample


def reference(inputs_path: str, out_path: str, small: bool, configs: str, seed: int = 0) -> None:
    import detectron2
    import torch
    from detectron2.data import transforms as T
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling.proposal_generator import rpn as rpn_module
    from detectron2.modeling.roi_heads import roi_heads as roi_module
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(seed)
    model, cfg = _model(small, configs)
    if small:  # the inference fixture's weights
        with np.load(d2p.SMALL_FIXTURE) as f:
            missing, unexpected = model.load_state_dict(
                {k[3:]: torch.from_numpy(f[k]) for k in f.files if k.startswith("sd/")},
                strict=False)
        assert not unexpected and not missing, (missing, unexpected)
    else:
        tp._randomise(model, seed, backbone="bottom_up", deconv="mask_head.deconv",
                      norm_types=(FrozenBatchNorm2d,))
    data = dict(np.load(inputs_path))
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    out, inputs = {}, []
    for i in range(len(ttp.IMAGES)):
        rgb = data[f"image{i}"]
        tfm = resize.get_transform(rgb)
        image = tfm.apply_image(rgb)
        boxes = tfm.apply_box(data[f"boxes{i}"].astype(np.float64)).astype(np.float32)
        masks = np.stack([tfm.apply_segmentation(m) for m in data[f"masks{i}"]]).astype(bool)
        classes = np.array([COCO_IDS.index(int(c)) for c in data[f"labels{i}"]])
        h, w = image.shape[:2]
        inst = Instances((h, w), gt_boxes=Boxes(torch.from_numpy(boxes)),
                         gt_classes=torch.from_numpy(classes).long(),
                         gt_masks=BitMasks(torch.from_numpy(masks)))
        bgr = torch.as_tensor(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))
        inputs.append({"image": bgr.float(), "height": h, "width": w, "instances": inst})
        # Ours: RGB, boxes (y1, x1, y2, x2), classes 1..80 (0 is background), masks.
        out[f"image{i}"] = image
        out[f"boxes{i}"] = boxes[:, [1, 0, 3, 2]]
        out[f"labels{i}"] = classes + 1
        out[f"masks{i}"] = masks.astype(np.uint8)
    if not small:
        model.eval()
        tp._calibrate(model, {k: v for k, v in inputs[0].items() if k != "instances"},
                      targets=d2p.TARGET_STD)
        out.update({f"sd/{k}": v.numpy().copy() for k, v in model.state_dict().items()
                    if not k.endswith("num_batches_tracked")})
    everything = RPN_ALL[small]
    out["meta"] = np.array(json.dumps({
        "family": "detectron2", "small": small, "seed": seed, "images": ttp.IMAGES,
        "batch": ttp.BATCH, "rpn_all": everything, "detectron2": detectron2.__version__,
        "config": D2_CONFIG}))
    model.train()

    def losses_of(idx):
        return model([dict(inputs[i]) for i in idx])

    originals = rpn_module.subsample_labels, roi_module.subsample_labels
    with EventStorage():
        # Per image, sampling off.
        _sampling(model, everything, 1.0, ttp.OFF, 1.0)
        rpn_module.subsample_labels = roi_module.subsample_labels = _taking_all()
        with torch.no_grad():
            for i in range(len(inputs)):
                losses = losses_of([i])
                out[f"losses{i}"] = np.array([float(losses[k]) for k in LOSS_NAMES])
        rpn_module.subsample_labels, roi_module.subsample_labels = originals

        # Per image, sampling on (detectron2's 256 anchors at 1:1, 512 RoIs at 25%): counts.
        _sampling(model, cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE, cfg.MODEL.RPN.POSITIVE_FRACTION,
                  cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION)
        rpn_counts, roi_counts = [], []
        rpn_module.subsample_labels = _counting(rpn_counts, None)
        roi_module.subsample_labels = _counting(roi_counts, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        try:
            with torch.no_grad():
                for i in range(len(inputs)):
                    losses_of([i])
        finally:
            rpn_module.subsample_labels, roi_module.subsample_labels = originals
        out["rpn_counts"] = np.array(rpn_counts)
        out["roi_counts"] = np.array(roi_counts)

        # One batch, sampling off: gradients, then two steps of detectron2's solver.
        _sampling(model, everything, 1.0, ttp.OFF, 1.0)
        rpn_module.subsample_labels = roi_module.subsample_labels = _taking_all()
        batch = list(ttp.BATCH)
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        before = {k: p.detach().clone() for k, p in params.items()}
        lrs, decay = [], {}
        for step in range(2):
            optimizer.zero_grad()
            losses = losses_of(batch)
            sum(losses.values()).backward()
            if step == 0:
                out["batch_losses"] = np.array([float(losses[k].detach()) for k in LOSS_NAMES])
                for k, p in params.items():
                    out[f"grad/{k}"] = p.grad.numpy().copy()
            step_lrs = {groups[id(p)]["lr"] for p in params.values()}
            assert len(step_lrs) == 1, step_lrs  # R50-FPN: no bias or norm factors differ
            lrs.append(step_lrs.pop())
            optimizer.step()
            scheduler.step()
        rpn_module.subsample_labels, roi_module.subsample_labels = originals
        decay = {k: groups[id(p)]["weight_decay"] for k, p in params.items()}
    out["lrs"] = np.array(lrs)
    assert set(decay.values()) == {cfg.SOLVER.WEIGHT_DECAY}, set(decay.values())
    out["weight_decay"] = np.array(cfg.SOLVER.WEIGHT_DECAY)
    worst = 0.0
    for k, p in params.items():
        buf = optimizer.state[p]["momentum_buffer"].numpy()
        out[f"buffer/{k}"] = buf
        w0 = before[k].numpy().astype(np.float64)
        update = -lrs[0] * (out[f"grad/{k}"] + decay[k] * w0) - lrs[1] * buf
        applied = (p.detach() - before[k]).numpy()
        floor = np.spacing(np.abs(before[k].numpy())) * 2
        worst = max(worst, float((np.abs(applied - update) / (floor + 1e-3 * np.abs(update)))
                                 .max()))
    assert worst <= 1.0, f"detectron2's applied update differs from SGD's formula ({worst})"
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 1e6:.1f} MB)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", choices=("inputs", "reference", "check", "all"),
                   default="all")
    p.add_argument("--small", action="store_true", help="the reduced-width model")
    p.add_argument("--inputs", default="/tmp/torchvision_train_inputs.npz",
                   help="the photos (written by torchvision_train_parity.py's inputs half)")
    p.add_argument("--reference", help="reference .npz; default: the committed small fixture "
                   "or /tmp for the full model")
    p.add_argument("--data", default=str(ttp.DATA), help="the coco128 folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detectron2_configs", default="/work/peers/detectron2/configs",
                   help="detectron2's configs/ folder (its source tree)")
    p.add_argument("--torch_python", default=sys.executable,
                   help="interpreter with torch and detectron2 for the reference half")
    args = p.parse_args(argv)
    path = args.reference or (str(SMALL_FIXTURE) if args.small
                              else "/tmp/detectron2_train_full.npz")
    if args.mode in ("inputs", "all"):
        ttp.inputs(args.inputs, args.data)
    if args.mode == "reference":
        reference(args.inputs, path, args.small, args.detectron2_configs, args.seed)
    if args.mode == "all":
        subprocess.run([args.torch_python, __file__, "reference", "--inputs", args.inputs,
                        "--reference", path, "--seed", str(args.seed),
                        "--detectron2_configs", args.detectron2_configs]
                       + (["--small"] if args.small else []), check=True)
    if args.mode in ("check", "all"):
        result = check(path)
        print(json.dumps(result, indent=1))
        return 0 if passes(result) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
