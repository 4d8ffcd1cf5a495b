"""Optimiser and learning-rate schedule from the train config."""

from __future__ import annotations

import keras
import tensorflow as tf

from mrcnn_tf.config import TrainConfig


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from ``warmup_factor * lr`` to ``lr`` over ``warmup_steps``, then ``lr``
    multiplied by ``decay_rate`` at each of ``decay_steps`` (detectron2's WarmupMultiStepLR).

    Example: lr 0.02, warmup 1000 at factor 0.001, decays at 60k and 80k: step 0 -> 2e-5,
    step 500 -> 0.01001, step 59999 -> 0.02, step 60000 -> 0.002, step 80000 -> 2e-4.
    """

    def __init__(self, learning_rate, warmup_steps=0, warmup_factor=0.001, decay_steps=(),
                 decay_rate=0.1):
        self.learning_rate = float(learning_rate)
        self.warmup_steps, self.warmup_factor = int(warmup_steps), float(warmup_factor)
        self.decay_steps, self.decay_rate = [int(s) for s in decay_steps], float(decay_rate)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decays = tf.add_n([tf.cast(step >= s, tf.float32) for s in self.decay_steps]) \
            if self.decay_steps else 0.0
        lr = self.learning_rate * tf.pow(self.decay_rate, decays)
        if self.warmup_steps > 0:
            alpha = tf.minimum(step / self.warmup_steps, 1.0)
            lr = lr * (self.warmup_factor * (1.0 - alpha) + alpha)
        return lr

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps,
                "warmup_factor": self.warmup_factor, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate}


def scaled_learning_rate(t: TrainConfig) -> float:
    """Linear scaling rule: base_learning_rate * batch_size / reference_batch_size."""
    return t.base_learning_rate * t.batch_size / t.reference_batch_size


def build_optimizer(t: TrainConfig) -> keras.optimizers.Optimizer:
    """SGD with momentum (weight decay is added to the gradients by the model, as PyTorch's SGD
    does) or AdamW (decoupled decay on kernels only), wrapped for loss scaling under
    ``mixed_float16``. Gradient clipping is done by the model after cross-replica aggregation."""
    schedule = WarmupStepDecay(scaled_learning_rate(t), t.warmup_steps, t.warmup_factor,
                               t.decay_steps, t.decay_rate)
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=t.momentum)
    else:
        opt = keras.optimizers.AdamW(schedule, weight_decay=t.weight_decay)
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "moving_mean",
                                                 "moving_variance"])
    if t.mixed_precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt
