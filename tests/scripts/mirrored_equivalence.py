"""Trains N steps on one device and under MirroredStrategy over 2 logical CPUs, with the same
global batch, and prints the largest weight difference (relative to the weight's scale).

Deterministic by construction: every anchor and every RoI is sampled (sample counts above the
candidate counts), no dropout, no flip, frozen BN, one fixed batch.
"""

import json
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import mrcnn_tf  # noqa: E402
from mrcnn_tf.data import build_dataset  # noqa: E402

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
cfg = mrcnn_tf.load_config(sys.argv[2], [
    "model.backbone.norm=frozen_bn", "model.preprocess.square_size=64", "data.image_size=64",
    "model.rpn.batch_size_per_image=2048", "model.rpn.positive_fraction=1.0",
    "model.rpn.pre_nms_topk_train=50", "model.rpn.post_nms_topk_train=20",
    "model.box_head.batch_size_per_image=32", "model.box_head.positive_fraction=1.0",
    "data.hflip=false", "train.batch_size=4", "train.warmup_steps=0",
    "data.eval.num_images=4", "eval.batch_size=4"])
batch = next(iter(build_dataset(cfg, training=False)))
data = tf.data.Dataset.from_tensors(batch).repeat()


def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = mrcnn_tf.build_model(cfg)
        model.compile()
    hist = model.fit(data, steps_per_epoch=STEPS, epochs=1, verbose=0)
    return {w.path: w.numpy() for w in model.weights}, hist.history["loss"][-1]


devices = [d.name for d in tf.config.list_logical_devices("CPU")]
single, loss1 = run(tf.distribute.OneDeviceStrategy(devices[0]))
mirrored, loss2 = run(tf.distribute.MirroredStrategy(devices))
rows = sorted(((float(np.abs(single[k] - mirrored[k]).max()), float(np.abs(single[k]).max()), k)
               for k in single), reverse=True)
print(json.dumps({"max_abs_weight_diff": rows[0][0], "its_weight_scale": rows[0][1],
                  "weight": rows[0][2], "loss_single": loss1, "loss_mirrored": loss2,
                  "steps": STEPS}))
