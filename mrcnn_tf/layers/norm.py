"""Normalisation layers selectable by name: frozen_bn | bn | sync_bn | group_norm | none."""

from __future__ import annotations

import keras
import tensorflow as tf

NORMS = ("frozen_bn", "bn", "sync_bn", "group_norm", "none")
BATCH_NORMS = ("frozen_bn", "bn", "sync_bn")  # those that hold batch-norm statistics


def _fusable_input(x) -> bool:
    """Whether TensorFlow's fused batch-norm kernel takes ``x``: [B, H, W, C] in a float dtype
    it has a kernel for."""
    return len(x.shape) == 4 and x.dtype in (tf.float32, tf.bfloat16, tf.float16)


def _fused_inference(x, gamma, beta, mean, variance, epsilon: float):
    """(x - mean) / sqrt(variance + epsilon) * gamma + beta on the last axis of [B, H, W, C]
    ``x``, as one inference-mode FusedBatchNormV3 (statistics given, not computed); the
    parameters are cast to float32, as the kernel takes them."""
    f32 = [tf.cast(v, tf.float32) for v in (gamma, beta, mean, variance)]
    y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=f32[0], offset=f32[1], mean=f32[2], variance=f32[3], epsilon=epsilon,
        is_training=False)
    return y


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class FrozenBatchNormalization(keras.layers.Layer):
    """Batch norm with fixed statistics and affine parameters (torchvision's FrozenBatchNorm2d).

    y = x * gamma / sqrt(moving_variance + epsilon) + (beta - moving_mean * scale), on the last
    axis. All four weights are non-trainable; training and inference compute the same thing.
    On [B, H, W, C] it is one inference-mode FusedBatchNormV3 (and one gradient op): an R50-FPN
    has 53 of these layers, and the mul-add form was about ten ops each to trace.

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
        if _fusable_input(x):
            return _fused_inference(x, self.gamma, self.beta, self.moving_mean,
                                    self.moving_variance, self.epsilon)
        scale = tf.cast(self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon), x.dtype)
        shift = tf.cast(self.beta, x.dtype) - tf.cast(self.moving_mean, x.dtype) * scale
        return x * scale + shift

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras batch norm computed by TensorFlow's fused kernel (FusedBatchNormV3) on [B, H, W, C].

    Keras 3 computes batch norm from separate moments, scale and shift ops; the fused kernel (what
    tf.keras used) makes a ResNet-50-FPN training step about 10% faster on CPU
    (benchmarks/README.md). Same weights, same config; other ranks, other axes and
    ``synchronized=True`` fall back to Keras. The one numerical difference: the moving variance
    is updated with the kernel's batch variance, which has Bessel's correction
    (n / (n - 1), n = B * H * W, as PyTorch and tf.keras do), where Keras 3 uses the biased one.
    ``sync_bn`` is this class with ``synchronized=True``. In the RoI heads, ``valid_rows`` keeps
    padded RoIs out of the batch statistics.
    """

    def _fusable(self, inputs):
        return (_fusable_input(inputs) and not self.synchronized and self.axis in (-1, 3)
                and self.center and self.scale)

    def call(self, inputs, training=None, mask=None, valid_rows=None):
        """``valid_rows`` [N] bool, for [N, ...] inputs whose rows are RoIs: in training, the
        batch statistics are taken over the valid rows only (padded or unsampled RoIs do not
        enter them, as they do not exist in torchvision's or detectron2's heads); every row is
        normalised with those statistics."""
        if valid_rows is not None and training and self.trainable:
            return self._masked_training(inputs, valid_rows)
        if not self._fusable(inputs):
            return super().call(inputs, training=training, mask=mask)
        if training and self.trainable:
            gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=gamma, offset=beta, mean=tf.zeros_like(gamma),
                variance=tf.ones_like(gamma), epsilon=self.epsilon, is_training=True)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + tf.stop_gradient(mean) * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m
                                        + tf.stop_gradient(variance) * (1.0 - m))
            return y
        return _fused_inference(inputs, self.gamma, self.beta, self.moving_mean,
                                self.moving_variance, self.epsilon)

    def _masked_training(self, inputs, valid_rows):
        axis = self.axis % len(inputs.shape)
        if axis != len(inputs.shape) - 1:
            raise ValueError("BatchNormalization: valid_rows needs channels on the last axis")
        dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        x = tf.cast(inputs, dtype)
        mean, variance, count = masked_moments(x, valid_rows, self.synchronized)
        y = tf.nn.batch_normalization(x, mean, variance, tf.cast(self.beta, dtype),
                                      tf.cast(self.gamma, dtype), self.epsilon)
        stat = self.moving_mean.dtype
        mean, variance, count = (tf.cast(v, stat) for v in (mean, variance, count))
        # The moving statistics as the fused kernel (and PyTorch) keep them: the unbiased
        # variance; left unchanged by a batch without a valid row.
        m = tf.where(count > 0, tf.constant(self.momentum, stat), tf.constant(1.0, stat))
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        self.moving_mean.assign(self.moving_mean * m + tf.stop_gradient(mean) * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m
                                    + tf.stop_gradient(unbiased) * (1.0 - m))
        return tf.cast(y, self.compute_dtype)


def masked_moments(x, valid_rows, synchronized: bool = False):
    """Mean and biased variance [C] of ``x`` [N, ..., C] over its valid rows (``valid_rows``
    [N] bool) and every other axis but the last, and the element count they were taken over
    (a float scalar). With ``synchronized``, over the valid rows of every replica (one
    all-reduce per moment, as SyncBatchNorm). No valid row gives mean 0 and variance 0."""
    w = tf.reshape(tf.cast(valid_rows, x.dtype), [-1] + [1] * (len(x.shape) - 1))
    axes = list(range(len(x.shape) - 1))
    per_row = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), x.dtype)
    total = tf.reduce_sum(x * w, axes)
    count = tf.reduce_sum(w) * per_row
    ctx = tf.distribute.get_replica_context() if synchronized else None
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
    mean = total / tf.maximum(count, 1.0)
    squares = tf.reduce_sum(tf.square(x - mean) * w, axes)
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        squares = ctx.all_reduce(tf.distribute.ReduceOp.SUM, squares)
    return mean, squares / tf.maximum(count, 1.0), count


def make_norm(kind: str, name: str, groups: int = 32, epsilon: float = 1e-5):
    """A normalisation layer of the given kind, or None for ``"none"``.

    BN momentum 0.9 and epsilon 1e-5 follow torchvision/detectron2 (PyTorch's momentum 0.1).
    """
    if kind == "frozen_bn":
        return FrozenBatchNormalization(epsilon=epsilon, name=name)
    if kind == "bn":
        return BatchNormalization(momentum=0.9, epsilon=epsilon, name=name)
    if kind == "sync_bn":
        return BatchNormalization(momentum=0.9, epsilon=epsilon, synchronized=True, name=name)
    if kind == "group_norm":
        return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon, name=name)
    if kind == "none":
        return None
    raise ValueError(f"unknown normalisation {kind!r}; allowed: {', '.join(NORMS)}")
