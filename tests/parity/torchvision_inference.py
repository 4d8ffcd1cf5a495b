"""Our side of the inference parity with torchvision's maskrcnn_resnet50_fpn (v1) and
maskrcnn_resnet50_fpn_v2 (v2): the small model's overrides, our config, and ``check``, which
converts a reference's state dict (written by tests/scripts/torchvision_parity.py), runs our model
stage by stage on the reference's image and measures the differences; ``passes`` applies the
tolerances. Needs no torch.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL_FIXTURE = REPO / "tests" / "fixtures" / "torchvision_maskrcnn_small.npz"
SMALL_FIXTURE_V2 = REPO / "tests" / "fixtures" / "torchvision_v2_maskrcnn_small.npz"
CONFIGS = {False: REPO / "configs" / "torchvision_r50_fpn.yaml",
           True: REPO / "configs" / "torchvision_r50_fpn_v2.yaml"}

SMALL = dict(stem=16, widths=(16, 32, 64, 128), fpn=64, fc=64, mask=64, min_size=200,
             max_size=320, crop=(240, 320))  # the small fixture uses a 240x320 centre crop


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
        from tests.parity import detectron2_inference

        return (detectron2_inference.our_config(meta["small"], meta.get("resnext", False)),
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
