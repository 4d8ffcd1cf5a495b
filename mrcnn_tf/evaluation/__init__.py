"""COCO evaluation of detections and masks."""

from mrcnn_tf.evaluation.coco import CocoEvaluator, evaluate_results_json
from mrcnn_tf.evaluation.run import (
    CocoEvalCallback,
    CocoMetricCallback,
    evaluate,
    evaluate_model_dir,
)

__all__ = ["CocoEvalCallback", "CocoEvaluator", "CocoMetricCallback", "evaluate",
           "evaluate_model_dir", "evaluate_results_json"]
