"""Normalisation layers selectable by name: frozen_bn | bn | sync_bn | group_norm | none."""

from __future__ import annotations

import keras
import tensorflow as tf

NORMS = ("frozen_bn", "bn", "sync_bn", "group_norm", "none")


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class FrozenBatchNormalization(keras.layers.Layer):
    """Batch norm with fixed statistics and affine parameters (torchvision's FrozenBatchNorm2d).

    y = x * gamma / sqrt(moving_variance + epsilon) + (beta - moving_mean * scale), on the last
    axis. All four weights are non-trainable; training and inference compute the same thing.

    Input/output: [..., C].
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        c = int(input_shape[-1])
        for name, init in (("gamma", "ones"), ("beta", "zeros"), ("moving_mean", "zeros"),
                           ("moving_variance", "ones")):
            setattr(self, name, self.add_weight(name=name, shape=(c,), initializer=init,
                                                trainable=False))

    def call(self, x):
        scale = tf.cast(self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon), x.dtype)
        shift = tf.cast(self.beta, x.dtype) - tf.cast(self.moving_mean, x.dtype) * scale
        return x * scale + shift

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def make_norm(kind: str, name: str, groups: int = 32, epsilon: float = 1e-5):
    """A normalisation layer of the given kind, or None for ``"none"``.

    BN momentum 0.9 and epsilon 1e-5 follow torchvision/detectron2 (PyTorch's momentum 0.1).
    """
    if kind == "frozen_bn":
        return FrozenBatchNormalization(epsilon=epsilon, name=name)
    if kind in ("bn", "sync_bn"):
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=epsilon,
                                               synchronized=kind == "sync_bn", name=name)
    if kind == "group_norm":
        return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon, name=name)
    if kind == "none":
        return None
    raise ValueError(f"unknown normalisation {kind!r}; allowed: {', '.join(NORMS)}")
