"""Box head (RCNN) and mask head over pooled RoI features."""

from __future__ import annotations

import keras
import tensorflow as tf

from mrcnn_tf.layers.norm import BatchNormalization, make_norm

# detectron2's inits: c2_xavier_fill for fc, c2_msra_fill for convs, small normals for predictors.
_FC_INIT = dict(scale=1.0, mode="fan_in", distribution="uniform")
_CONV_INIT = dict(scale=2.0, mode="fan_out", distribution="untruncated_normal")


def _build_conv_stack(convs, norms, size: int, channels: int) -> int:
    """Builds conv3x3 (+ norm) layers explicitly on [N, size, size, channels] inputs (unique
    variable names, see Bottleneck.build); returns the output channels."""
    for conv, norm in zip(convs, norms):
        conv.build((None, size, size, channels))
        channels = conv.filters
        if norm is not None:
            norm.build((None, size, size, channels))
    return channels


def _merge_rois(x):
    """[B, R, S, S, C] -> ([B * R, S, S, C], (B, R))."""
    shape = tf.shape(x)
    return tf.reshape(x, tf.concat([[-1], shape[2:]], 0)), (shape[0], shape[1])


def _normalise(norm, x, training, valid):
    """``norm`` on merged RoI rows; batch norm takes its training statistics over the rows whose
    ``valid`` [B, R] is True (the RoIs the references' heads see), when given."""
    if norm is None:
        return x
    if valid is not None and isinstance(norm, BatchNormalization):
        return norm(x, training=training, valid_rows=tf.reshape(valid, [-1]))
    return norm(x, training=training)


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class BoxHead(keras.layers.Layer):
    """RoI features -> class logits and box deltas.

    ``2fc`` (paper, torchvision v1): flatten, fc + ReLU, fc + ReLU (+ dropout after each).
    ``4conv1fc`` (torchvision v2): 4 x (conv3x3 + norm + ReLU), flatten, fc + ReLU.
    Then class logits (num_classes + 1, column 0 background) and deltas (dy, dx, dh, dw) per
    class including background (torchvision's layout), or one set (class_agnostic).

    Input: [B, R, S, S, C] pooled features. Output: {"class_logits": [B, R, num_classes + 1],
    "box_deltas": [B, R, num_classes + 1, 4] (or [B, R, 1, 4] class-agnostic)}.
    """

    def __init__(self, num_classes: int, head_type: str = "2fc", fc_dim: int = 1024,
                 conv_dim: int = 256, num_convs: int = 4, norm: str = "none",
                 dropout: float = 0.0, class_agnostic: bool = False,
                 group_norm_groups: int = 32, **kwargs):
        super().__init__(**kwargs)
        if head_type not in ("2fc", "4conv1fc"):
            raise ValueError(f"BoxHead: head_type must be '2fc' or '4conv1fc', got {head_type!r}")
        self.num_classes, self.head_type = int(num_classes), head_type
        self.fc_dim, self.conv_dim, self.num_convs = int(fc_dim), int(conv_dim), int(num_convs)
        self.norm, self.dropout_rate = norm, float(dropout)
        self.class_agnostic, self.group_norm_groups = bool(class_agnostic), int(group_norm_groups)
        self.convs, self.conv_norms = [], []
        if head_type == "4conv1fc":
            for i in range(num_convs):
                self.convs.append(keras.layers.Conv2D(
                    conv_dim, 3, padding="same", use_bias=norm == "none",
                    kernel_initializer=keras.initializers.VarianceScaling(**_CONV_INIT),
                    name=f"conv{i + 1}"))
                self.conv_norms.append(make_norm(norm, f"conv_norm{i + 1}", group_norm_groups))
        n_fc = 2 if head_type == "2fc" else 1
        self.fcs = [keras.layers.Dense(fc_dim, activation="relu",
                                       kernel_initializer=keras.initializers.VarianceScaling(
                                           **_FC_INIT), name=f"fc{i + 1}") for i in range(n_fc)]
        self.dropout = keras.layers.Dropout(dropout) if dropout > 0 else None
        self.class_logits = keras.layers.Dense(
            num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="class_logits")
        self.num_box_classes = 1 if class_agnostic else num_classes + 1
        self.box_deltas = keras.layers.Dense(
            4 * self.num_box_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001), name="box_deltas")

    def build(self, input_shape):
        s = int(input_shape[2])
        c = _build_conv_stack(self.convs, self.conv_norms, s, int(input_shape[-1]))
        width = s * s * c
        for fc in self.fcs:
            fc.build((None, width))
            width = self.fc_dim
        self.class_logits.build((None, width))
        self.box_deltas.build((None, width))

    def call(self, roi_features, training=None, valid=None):
        """``valid`` [B, R] bool: which RoIs are real (the rest are padding), for the batch
        statistics of ``norm="bn"``/``"sync_bn"`` in training."""
        x, (b, r) = _merge_rois(roi_features)
        for conv, norm in zip(self.convs, self.conv_norms):
            x = tf.nn.relu(_normalise(norm, conv(x), training, valid))
        shape = tf.shape(x)
        flat = x.shape[1] * x.shape[2] * x.shape[3] if None not in x.shape[1:] else (
            shape[1] * shape[2] * shape[3])
        x = tf.reshape(x, [-1, flat])  # row-major over (y, x, channel)
        for fc in self.fcs:
            x = fc(x)
            if self.dropout is not None:
                x = self.dropout(x, training=training)
        logits = tf.reshape(self.class_logits(x), tf.stack([b, r, self.num_classes + 1]))
        deltas = tf.reshape(self.box_deltas(x), tf.stack([b, r, self.num_box_classes, 4]))
        return {"class_logits": logits, "box_deltas": deltas}

    def compute_output_shape(self, input_shape):
        b, r = input_shape[:2]
        return {"class_logits": (b, r, self.num_classes + 1),
                "box_deltas": (b, r, self.num_box_classes, 4)}

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "head_type": self.head_type, "fc_dim": self.fc_dim, "conv_dim": self.conv_dim,
                "num_convs": self.num_convs, "norm": self.norm, "dropout": self.dropout_rate,
                "class_agnostic": self.class_agnostic,
                "group_norm_groups": self.group_norm_groups}


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class MaskHead(keras.layers.Layer):
    """RoI features -> mask logits: num_convs x (conv3x3 + norm + ReLU), a stride-2 transposed
    conv + ReLU, and a 1x1 conv to one map per class (num_classes + 1, indexed by class id as
    torchvision's predictor) or one map (class_agnostic).

    Input: [B, R, S, S, C] (S = 14). Output: [B, R, 2S, 2S, num_classes + 1 or 1] logits.
    """

    def __init__(self, num_classes: int, num_convs: int = 4, conv_dim: int = 256,
                 norm: str = "none", class_agnostic: bool = False, group_norm_groups: int = 32,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.num_convs, self.conv_dim = int(num_classes), int(num_convs), int(
            conv_dim)
        self.norm, self.class_agnostic = norm, bool(class_agnostic)
        self.group_norm_groups = int(group_norm_groups)
        init = keras.initializers.VarianceScaling(**_CONV_INIT)
        self.convs = [keras.layers.Conv2D(conv_dim, 3, padding="same", use_bias=norm == "none",
                                          kernel_initializer=init, name=f"conv{i + 1}")
                      for i in range(num_convs)]
        self.norms = [make_norm(norm, f"norm{i + 1}", group_norm_groups)
                      for i in range(num_convs)]
        self.deconv = keras.layers.Conv2DTranspose(conv_dim, 2, strides=2, padding="valid",
                                                   kernel_initializer=init, name="deconv")
        self.num_mask_classes = 1 if class_agnostic else num_classes + 1
        self.predictor = keras.layers.Conv2D(
            self.num_mask_classes, 1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001), name="mask_logits")

    def build(self, input_shape):
        s = int(input_shape[2])
        c = _build_conv_stack(self.convs, self.norms, s, int(input_shape[-1]))
        self.deconv.build((None, s, s, c))
        self.predictor.build((None, 2 * s, 2 * s, self.conv_dim))

    def call(self, roi_features, training=None, valid=None):
        """``valid`` [B, R] bool: which RoIs are real, as for :class:`BoxHead`."""
        x, (b, r) = _merge_rois(roi_features)
        for conv, norm in zip(self.convs, self.norms):
            x = tf.nn.relu(_normalise(norm, conv(x), training, valid))
        x = tf.nn.relu(self.deconv(x))
        x = self.predictor(x)
        shape = tf.shape(x)
        return tf.reshape(x, tf.concat([[b, r], shape[1:]], 0))

    def compute_output_shape(self, input_shape):
        b, r, s = input_shape[0], input_shape[1], input_shape[2]
        s2 = None if s is None else 2 * s
        return (b, r, s2, s2, self.num_mask_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "num_convs": self.num_convs, "conv_dim": self.conv_dim, "norm": self.norm,
                "class_agnostic": self.class_agnostic,
                "group_norm_groups": self.group_norm_groups}
