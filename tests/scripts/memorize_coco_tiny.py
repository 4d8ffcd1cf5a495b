"""Trains the small model from scratch on ../shared/data/coco_tiny16 and evaluates it on the same
16 images (COCO metrics, original category ids). Proves the real COCO path end to end: loading,
targets, losses, evaluation. Prints one JSON line.

    python tests/scripts/memorize_coco_tiny.py DATA_DIR MODEL_DIR [steps]
"""

import json
import os
import sys

import keras
import tensorflow as tf

import mrcnn_tf
from mrcnn_tf.evaluation.run import evaluate, model_predict_fn
from mrcnn_tf.training import train

data, model_dir = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 400
ann = os.path.join(data, "coco_tiny16", "instances_train2017.json")
images = os.path.join(data, "coco_tiny16", "train2017")
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cfg = mrcnn_tf.load_config(os.path.join(repo, "configs", "shapes.yaml"), [
    "model.num_classes=80", "data.train.source=coco", f"data.train.annotation_file={ann}",
    f"data.train.image_dir={images}", "data.eval.source=coco",
    f"data.eval.annotation_file={ann}", f"data.eval.image_dir={images}",
    "data.image_size=320", "model.preprocess.square_size=320", "data.max_instances=64",
    "data.hflip=false", "data.mask_mode=mini", "data.cache=true",
    "model.rpn.pre_nms_topk_train=1000", "model.rpn.post_nms_topk_train=300",
    "model.rpn.pre_nms_topk_test=1000", "model.rpn.post_nms_topk_test=300",
    "model.box_head.batch_size_per_image=256", "model.detection.max_detections=100",
    f"train.steps={steps}", "train.batch_size=4", "train.base_learning_rate=0.02",
    "train.reference_batch_size=8", "train.warmup_steps=50",
    f"train.decay_steps=[{int(steps * 0.75)}, {int(steps * 0.9)}]",
    f"train.checkpoint_every={steps}", "eval.batch_size=4"])
keras.utils.set_random_seed(0)
model, summary = train(cfg, tf.distribute.get_strategy(), model_dir, verbose=0)
results = evaluate(model_predict_fn(model), cfg,
                   results_path=os.path.join(model_dir, "results.json"))
print(json.dumps({"steps": summary["final_step"], "seconds": summary["seconds"],
                  "final_loss": summary["final_logs"].get("loss"),
                  "bbox": results["bbox"], "segm": results["segm"]}))
