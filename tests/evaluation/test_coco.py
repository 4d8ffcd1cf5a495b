import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mrcnn_tf.evaluation.coco import CocoEvaluator, evaluate_results_json


def _gt():
    m1 = np.zeros((50, 60), np.uint8, order="F")
    m1[10:30, 10:40] = 1
    m2 = np.zeros((50, 60), np.uint8, order="F")
    m2[35:45, 5:25] = 1
    anns = []
    for i, (m, cat) in enumerate([(m1, 3), (m2, 7)]):
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode()
        ys, xs = np.nonzero(m)
        anns.append({"id": i + 1, "image_id": 5, "category_id": cat, "iscrowd": 0,
                     "area": float(m.sum()), "segmentation": rle,
                     "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                              float(ys.max() + 1 - ys.min())]})
    gt = {"images": [{"id": 5, "height": 50, "width": 60}], "annotations": anns,
          "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    return gt, [m1, m2]


def test_perfect_detections_give_ap_1():
    gt, masks = _gt()
    ev = CocoEvaluator([3, 7], ["cat", "dog"], gt)
    boxes = np.array([[10, 10, 30, 40], [35, 5, 45, 25]], np.float32)
    ev.add_original_frame(5, boxes, [0.9, 0.8], [1, 2], np.stack(masks))
    out = ev.evaluate()
    assert out["bbox"]["AP"] == pytest.approx(1.0)
    assert out["segm"]["AP"] == pytest.approx(1.0)
    assert out["per_class"]["segm"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert out["pr_curves"]["segm"]["IoU=0.75"] == pytest.approx([1.0] * 101)


def test_known_imperfect_case():
    # One class, two objects; the top detection is perfect, the second a false positive.
    # Recall reaches 0.5 at precision 1 and no further: COCO's 101-point AP = 51 / 101.
    gt, masks = _gt()
    for a in gt["annotations"]:
        a["category_id"] = 3
    ev = CocoEvaluator([3, 7], ["cat", "dog"], gt)
    boxes = np.array([[10, 10, 30, 40], [0, 45, 8, 59]], np.float32)
    fp = np.zeros((50, 60), np.uint8)
    fp[0:8, 45:59] = 1
    ev.add_original_frame(5, boxes, [0.9, 0.8], [1, 1], np.stack([masks[0], fp]))
    out = ev.evaluate()
    assert out["bbox"]["AP"] == pytest.approx(51 / 101, abs=1e-6)
    assert out["segm"]["AP"] == pytest.approx(51 / 101, abs=1e-6)
    assert out["bbox"]["AP50"] == pytest.approx(51 / 101, abs=1e-6)
    # The precision-recall curve (class "dog" has no ground truth here: left out of the mean):
    # precision 1 up to recall 0.5, 0 beyond.
    for kind in ("bbox", "segm"):
        curve = out["pr_curves"][kind]["IoU=0.50"]
        assert len(curve) == 101
        assert curve[:51] == pytest.approx([1.0] * 51) and curve[51:] == [0.0] * 50
    assert np.mean(out["pr_curves"]["bbox"]["IoU=0.50"]) == pytest.approx(out["bbox"]["AP50"])


def test_results_json_round_trip(tmp_path):
    gt, masks = _gt()
    ev = CocoEvaluator([3, 7], ["cat", "dog"], gt)
    ev.add_original_frame(5, np.array([[10, 10, 30, 40]], np.float32), [0.9], [1], masks[:1])
    path = str(tmp_path / "res.json")
    ev.write_results(path)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    a = ev.evaluate()
    b = evaluate_results_json(str(gt_path), path)
    assert a["bbox"] == b["bbox"] and a["segm"] == b["segm"]
    res = json.loads(open(path).read())
    assert res[0]["category_id"] == 3 and res[0]["bbox"] == [10.0, 10.0, 30.0, 20.0]


def test_ground_truth_from_targets_and_predictions_in_model_frame():
    # The pipeline frame is the original scaled by 2: predictions and targets both map back.
    ev = CocoEvaluator([1, 2], ["a", "b"])
    masks = np.zeros((1, 2, 64, 64), np.uint8)
    masks[0, 0, 20:60, 10:50] = 1
    targets = {"gt_boxes": np.array([[[20, 10, 60, 50], [0, 0, 0, 0]]], np.float32),
               "gt_classes": np.array([[2, -1]]), "gt_masks": masks,
               "image_info": {"image_id": np.array([1]), "original_size": np.array([[32, 32]]),
                              "image_size": np.array([[64, 64]]),
                              "resize_factor": np.array([[2.0, 2.0]])}}
    ev.add_ground_truth(targets)
    det_masks = np.zeros((1, 3, 28, 28), np.float32)
    det_masks[0, 0] = 1.0
    detections = {"detection_boxes": np.array([[[20, 10, 60, 50], [0, 0, 0, 0], [0, 0, 0, 0]]],
                                              np.float32),
                  "detection_scores": np.array([[0.9, 0, 0]], np.float32),
                  "detection_classes": np.array([[2, 0, 0]]), "detection_masks": det_masks,
                  "num_detections": np.array([1])}
    ev.add_predictions(detections, targets["image_info"])
    assert ev.results[0]["bbox"] == [5.0, 10.0, 20.0, 20.0]
    out = ev.evaluate()
    assert out["bbox"]["AP"] == pytest.approx(1.0)
    assert out["segm"]["AP"] > 0.9


def test_no_detections_is_zero_not_an_error():
    gt, _ = _gt()
    ev = CocoEvaluator([3, 7], ["cat", "dog"], gt)
    ev.add_predictions({"detection_boxes": np.zeros((1, 2, 4)), "detection_scores": np.zeros(
        (1, 2)), "detection_classes": np.zeros((1, 2), int), "detection_masks": np.zeros(
        (1, 2, 28, 28)), "num_detections": np.array([0])},
        {"image_id": np.array([5]), "original_size": np.array([[50, 60]]),
         "resize_factor": np.array([[1.0, 1.0]])})
    assert ev.evaluate()["bbox"]["AP"] == 0.0
