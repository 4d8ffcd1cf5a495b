"""COCO evaluation (bbox and segm) with pycocotools' COCOeval.

Detections are mapped back to each original image: boxes divided by the resize scale, masks
pasted at the original resolution and RLE-encoded, classes mapped to the dataset's category ids.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_tf.ops.masks import paste_masks

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def load_coco(gt) -> COCO:
    """A pycocotools COCO from a file path, a dict, or a COCO object (quietly)."""
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, str):
            with open(gt, encoding="utf-8") as f:
                coco.dataset = json.load(f)
        else:
            coco.dataset = gt
        coco.createIndex()
    return coco


class CocoEvaluator:
    """Accumulates detections of many batches, then runs COCOeval for bbox and segm.

    Args:
      category_ids: dataset category id of each contiguous class 1..N.
      class_names: names of the classes (for the per-class table).
      ground_truth: a COCO annotation file, dict or COCO object; or None to build the ground
        truth from the batches' targets (synthetic shapes, TFRecords without a JSON).
      mask_threshold: pasted-mask binarisation threshold.
      mask_paste: "detectron2" or "torchvision" (see ``mrcnn_tf.ops.paste_masks``).
    """

    def __init__(self, category_ids, class_names, ground_truth=None, mask_threshold=0.5,
                 mask_paste="detectron2"):
        self.category_ids = list(category_ids)
        self.mask_paste = mask_paste
        self.class_names = list(class_names)
        self.mask_threshold = mask_threshold
        self.gt = load_coco(ground_truth) if ground_truth is not None else None
        self.results: list[dict] = []
        self._gt_images, self._gt_anns = [], []
        self.image_ids: list[int] = []

    # -- accumulation ----------------------------------------------------------------------

    def add_predictions(self, detections: dict, image_info: dict) -> None:
        """Adds a batch of model outputs.

        Args:
          detections: model outputs for images given in the pipeline's frame (content at the
            model's scale): detection_boxes [B, D, 4], scores, classes (1..N), masks
            [B, D, 28, 28] inside each box (or [B, D, H, W] binary masks of the given frame, as
            an exported model returns them), num_detections [B].
          image_info: image_id [B], original_size [B, 2], resize_factor [B, 2] (resized /
            original).
        """
        det = {k: np.asarray(v) for k, v in detections.items()}
        info = {k: np.asarray(v) for k, v in image_info.items()}
        for b in range(det["num_detections"].shape[0]):
            image_id = int(info["image_id"][b])
            h, w = (int(v) for v in info["original_size"][b])
            sy, sx = (float(v) for v in info["resize_factor"][b])
            n = int(det["num_detections"][b])
            self.image_ids.append(image_id)
            if n == 0:
                continue
            boxes = det["detection_boxes"][b, :n] / np.array([sy, sx, sy, sx], np.float32)
            boxes = np.clip(boxes, 0, [h, w, h, w])
            masks = det["detection_masks"][b, :n]
            if masks.shape[1] == masks.shape[2] == 28:
                masks = paste_masks(masks[None], boxes[None], h, w, self.mask_threshold,
                                    self.mask_paste).numpy()[0]
            else:  # full-frame masks of the given image: back to the original size
                ch, cw = int(round(h * sy)), int(round(w * sx))
                frame = masks[:, :ch, :cw].astype(np.float32)[..., None]
                masks = (tf.image.resize(frame, (h, w)).numpy()[..., 0] >= 0.5).astype(np.uint8)
            self.add_original_frame(image_id, boxes, det["detection_scores"][b, :n],
                                    det["detection_classes"][b, :n], masks)

    def add_original_frame(self, image_id, boxes, scores, classes, masks) -> None:
        """Adds detections already in the original image frame.

        boxes [n, 4] (y1, x1, y2, x2) pixels; classes 1..N; masks [n, H, W] 0/1 or None.
        """
        for i in range(len(scores)):
            y1, x1, y2, x2 = (float(v) for v in boxes[i])
            r = {"image_id": int(image_id),
                 "category_id": self.category_ids[int(classes[i]) - 1],
                 "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                 "score": round(float(scores[i]), 5)}
            if masks is not None:
                r["segmentation"] = _rle(masks[i])
            self.results.append(r)

    def add_ground_truth(self, targets: dict, mini_masks: bool = False) -> None:
        """Adds a batch's targets as ground truth (when no annotation file is given): boxes and
        masks are mapped back to the original frame, masks RLE-encoded. ``mini_masks``: the
        targets hold box-cropped mini-masks (data.mask_mode=mini)."""
        info = {k: np.asarray(v) for k, v in targets["image_info"].items()}
        boxes_b = np.asarray(targets["gt_boxes"])
        classes_b = np.asarray(targets["gt_classes"])
        masks_b = np.asarray(targets["gt_masks"])
        for b in range(classes_b.shape[0]):
            image_id = int(info["image_id"][b])
            h, w = (int(v) for v in info["original_size"][b])
            sy, sx = (float(v) for v in info["resize_factor"][b])
            ch, cw = (int(v) for v in info["image_size"][b])
            self._gt_images.append({"id": image_id, "height": h, "width": w})
            valid = classes_b[b] > 0
            for k in np.nonzero(valid)[0]:
                box = boxes_b[b, k] / np.array([sy, sx, sy, sx], np.float32)
                if mini_masks:
                    full = paste_masks(masks_b[b, k][None].astype(np.float32),
                                       box[None], h, w).numpy()[0]
                else:
                    m = masks_b[b, k, :ch, :cw].astype(np.float32)
                    full = (tf.image.resize(m[..., None], (h, w))[..., 0].numpy() >= 0.5)
                y1, x1, y2, x2 = (float(v) for v in box)
                rle = _rle(full)
                self._gt_anns.append({
                    "id": len(self._gt_anns) + 1, "image_id": image_id,
                    "category_id": self.category_ids[int(classes_b[b, k]) - 1],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask_utils.area(rle)),
                    "iscrowd": 0, "segmentation": rle})

    # -- evaluation --------------------------------------------------------------------------

    def ground_truth(self) -> COCO:
        if self.gt is not None:
            return self.gt
        cats = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
        return load_coco({"images": self._gt_images, "annotations": self._gt_anns,
                          "categories": cats})

    def evaluate(self, iou_types=("bbox", "segm"), verbose: bool = False) -> dict:
        """{"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...},
        "per_class": {"bbox": {name: AP}, "segm": {...}},
        "pr_curves": {"bbox": {"IoU=0.50": [101], "IoU=0.75": [101]}, "segm": {...}}}.
        AP is -1 where undefined. A precision-recall curve is COCO's interpolated precision at
        recall 0, 0.01, ..., 1 (all areas, 100 detections), averaged over the classes that have
        ground truth; 0 where no class reaches that recall."""
        gt = self.ground_truth()
        image_ids = sorted(set(self.image_ids)) or sorted(gt.getImgIds())
        out, per_class, curves = {}, {}, {}
        for iou_type in iou_types:
            if not self.results:
                out[iou_type] = {k: 0.0 for k in STAT_NAMES}
                per_class[iou_type] = {n: 0.0 for n in self.class_names}
                curves[iou_type] = {name: [0.0] * 101 for name in PR_IOUS}
                continue
            results = self.results if iou_type == "segm" else [
                {k: v for k, v in r.items() if k != "segmentation"} for r in self.results]
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink):
                dt = gt.loadRes(results)
                ev = COCOeval(gt, dt, iou_type)
                ev.params.imgIds = image_ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            if verbose:
                print(sink.getvalue())
            out[iou_type] = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[:6])}
            per_class[iou_type] = self._per_class(ev)
            curves[iou_type] = pr_curves(ev.eval["precision"])
        out["per_class"] = per_class
        out["pr_curves"] = curves
        return out

    def _per_class(self, ev) -> dict:
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        table = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            name = self.class_names[self.category_ids.index(cat_id)]
            table[name] = float(p.mean()) if p.size else -1.0
        return table

    def write_results(self, path: str) -> None:
        """The detections as a COCO results JSON (loads with pycocotools' loadRes)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.results, f)


PR_IOUS = {"IoU=0.50": 0, "IoU=0.75": 5}  # name: index in COCOeval's IoU thresholds


def pr_curves(precision: np.ndarray) -> dict:
    """Precision at COCO's 101 recall points for IoU 0.5 and 0.75, averaged over the classes
    with ground truth (all areas, 100 detections). ``precision``: COCOeval's [T, R, K, A, M]
    (-1 where a class has no ground truth)."""
    out = {}
    for name, t in PR_IOUS.items():
        p = precision[t, :, :, 0, -1]  # [R, K]
        valid = (p > -1).all(axis=0)
        out[name] = [float(v) for v in (p[:, valid].mean(axis=1) if valid.any()
                                        else np.zeros(p.shape[0]))]
    return out


def evaluate_results_json(ground_truth, results_path: str, class_names=None) -> dict:
    """Evaluates a COCO results JSON against a COCO ground truth."""
    gt = load_coco(ground_truth)
    cats = sorted(gt.loadCats(gt.getCatIds()), key=lambda c: c["id"])
    ev = CocoEvaluator([c["id"] for c in cats], class_names or [c["name"] for c in cats], gt)
    with open(results_path, encoding="utf-8") as f:
        ev.results = json.load(f)
    ev.image_ids = sorted({r["image_id"] for r in ev.results}) or sorted(gt.getImgIds())
    return ev.evaluate()
