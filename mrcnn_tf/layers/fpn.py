"""Feature Pyramid Network (Lin et al., 2017): P2..P5 top-down, P6 = max-pool of P5."""

from __future__ import annotations

import keras
import tensorflow as tf

from mrcnn_tf.layers.norm import make_norm
from mrcnn_tf.ops._graph import dims


def _upsample2x_to(x, like):
    """Nearest-neighbour 2x upsampling cropped to ``like``'s size (torch's "nearest" for 2x).

    Each pixel broadcast to a 2x2 block ([B, H, 1, W, 1, C] -> [B, H, 2, W, 2, C] -> [B, 2H,
    2W, C]): three ops with their shape constants and a reduce-sum gradient, where two
    ``tf.repeat`` and their gradients would be about a hundred ops per call to trace. The crop
    is built only when ``like`` is not statically 2H x 2W (odd sizes).
    """
    b, h, w, c = dims(x)
    up = tf.reshape(tf.broadcast_to(tf.reshape(x, [b, h, 1, w, 1, c]), [b, h, 2, w, 2, c]),
                    [b, 2 * h, 2 * w, c])
    if like.shape[1:3] == up.shape[1:3] and like.shape[1:3].is_fully_defined():
        return up
    shape = tf.shape(like)
    return up[:, : shape[1], : shape[2], :]


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class FPN(keras.layers.Layer):
    """Lateral 1x1 convs, top-down nearest 2x upsampling and sums, 3x3 output convs.

    Input: {"c2": [B, H/4, W/4, C2], ..., "c5": [B, H/32, W/32, C5]} (levels min..5).
    Output: {"p2": [B, H/4, W/4, channels], ..., "p5": ..., "p6": [B, H/64, W/64, channels]}.
    P6 (``max_level`` 6) is P5 max-pooled with kernel 1 and stride 2 (torchvision's
    LastLevelMaxPool), used by the RPN only. Convs have biases unless a norm follows them.
    """

    def __init__(self, channels: int = 256, min_level: int = 2, max_level: int = 6,
                 norm: str = "none", group_norm_groups: int = 32, **kwargs):
        super().__init__(**kwargs)
        if max_level not in (5, 6):
            raise ValueError(f"FPN: max_level must be 5 or 6 (P6 by max-pool), got {max_level}")
        self.channels, self.min_level, self.max_level = int(channels), min_level, max_level
        self.norm, self.group_norm_groups = norm, int(group_norm_groups)
        use_bias = norm == "none"
        # Kaiming uniform with a=1 (torchvision's FPN init) and zero bias.
        init = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")
        self.lateral, self.output_convs, self.lateral_norms, self.output_norms = [], [], [], []
        for lv in range(min_level, 6):
            self.lateral.append(keras.layers.Conv2D(channels, 1, use_bias=use_bias,
                                                    kernel_initializer=init, name=f"lateral{lv}"))
            self.output_convs.append(keras.layers.Conv2D(channels, 3, padding="same",
                                                         use_bias=use_bias, kernel_initializer=init,
                                                         name=f"output{lv}"))
            self.lateral_norms.append(make_norm(norm, f"lateral_norm{lv}", group_norm_groups))
            self.output_norms.append(make_norm(norm, f"output_norm{lv}", group_norm_groups))

    def build(self, input_shape):
        # Explicit sub-layer builds give every variable a unique name (see Bottleneck.build).
        for i, lv in enumerate(range(self.min_level, 6)):
            self.lateral[i].build((None, None, None, int(input_shape[f"c{lv}"][-1])))
            self.output_convs[i].build((None, None, None, self.channels))
            for norm in (self.lateral_norms[i], self.output_norms[i]):
                if norm is not None:
                    norm.build((None, None, None, self.channels))

    @staticmethod
    def _norm(layer, x, training):
        return x if layer is None else layer(x, training=training)

    def call(self, features, training=None):
        levels = list(range(self.min_level, 6))
        laterals = [self._norm(n, conv(features[f"c{lv}"]), training)
                    for lv, conv, n in zip(levels, self.lateral, self.lateral_norms)]
        out = {}
        top = laterals[-1]
        for i in range(len(levels) - 1, -1, -1):
            if i < len(levels) - 1:
                top = laterals[i] + _upsample2x_to(top, laterals[i])
            out[f"p{levels[i]}"] = self._norm(self.output_norms[i], self.output_convs[i](top),
                                              training)
        if self.max_level == 6:
            out["p6"] = out["p5"][:, ::2, ::2, :]  # max-pool, kernel 1, stride 2
        return {f"p{lv}": out[f"p{lv}"] for lv in range(self.min_level, self.max_level + 1)}

    def compute_output_shape(self, input_shape):
        out = {}
        for lv in range(self.min_level, self.max_level + 1):
            src = input_shape[f"c{min(lv, 5)}"]
            h, w = src[1], src[2]
            if lv == 6:
                h = None if h is None else -(-h // 2)
                w = None if w is None else -(-w // 2)
            out[f"p{lv}"] = (src[0], h, w, self.channels)
        return out

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "min_level": self.min_level,
                "max_level": self.max_level, "norm": self.norm,
                "group_norm_groups": self.group_norm_groups}
