import numpy as np

from mrcnn_tf.layers.detection import DetectionGenerator
from tests.layers.contract import check_layer_contract

PROPOSALS = np.array([[[10, 10, 50, 50], [12, 10, 52, 50], [60, 60, 90, 95], [0, 0, 0, 0]]],
                     np.float32)


def _inputs():
    logits = np.full((1, 4, 4), -10.0, np.float32)
    logits[0, 0, 2] = 10.0  # class 2, confident
    logits[0, 1, 2] = 8.0  # class 2, overlaps proposal 0 (IoU 0.9): suppressed
    logits[0, 2, 3] = 9.0  # class 3
    logits[0, 2, 0] = 9.0  # ... but as likely background: score 0.5
    logits[0, 3, 1] = 10.0  # a padded proposal: never detected
    deltas = np.zeros((1, 4, 4, 4), np.float32)
    valid = np.array([[True, True, True, False]])
    return logits, deltas, PROPOSALS, valid, np.array([[80, 100]], np.int32)


def test_contract_and_hand_computed():
    kw = dict(score_threshold=0.1, nms_threshold=0.6, max_detections=3, min_box_size=0.5,
              box_coder_weights=(1.0, 1.0, 1.0, 1.0))
    _, out = check_layer_contract(DetectionGenerator, kw, _inputs(), non_default=tuple(kw),
                                  expected_shapes={"detection_boxes": (1, 3, 4),
                                                   "detection_scores": (1, 3),
                                                   "detection_classes": (1, 3),
                                                   "num_detections": (1,)})
    out = {k: v.numpy()[0] for k, v in out.items()}
    assert out["num_detections"] == 2
    np.testing.assert_array_equal(out["detection_classes"], [2, 3, 0])
    np.testing.assert_allclose(out["detection_scores"][:2], [1.0, 0.5], atol=1e-4)
    # Second box clipped to the 80-px-high image.
    np.testing.assert_allclose(out["detection_boxes"][:2], [[10, 10, 50, 50], [60, 60, 80, 95]])
    assert (out["detection_boxes"][2] == 0).all()


def test_score_threshold_is_strict():
    gen = DetectionGenerator(score_threshold=0.5, box_coder_weights=(1.0, 1.0, 1.0, 1.0))
    out = gen(*_inputs())
    assert int(out["num_detections"][0]) == 1  # the class-3 score is just under 0.5: dropped
