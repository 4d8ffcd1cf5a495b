"""Region proposal network head (Ren et al., 2015), one per FPN level, shared or not."""

from __future__ import annotations

import keras
import tensorflow as tf

from mrcnn_tf.ops._graph import dims


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class RPNHead(keras.layers.Layer):
    """``num_convs`` x (3x3 conv + ReLU) (+ dropout), then 1x1 objectness and 1x1 box-delta convs,
    per level. One conv in torchvision v1 and detectron2, two in torchvision v2 (conv_depth=2).

    Input: {"p2": [B, H2, W2, C], ..., "p6": ...}.
    Output: {"objectness": list over levels of [B, H_l * W_l * A] logits (sigmoid) or
    [B, H_l * W_l * A, 2] (softmax: background, foreground), "deltas": list of
    [B, H_l * W_l * A, 4] (dy, dx, dh, dw)}. Rows follow the anchors' layout (positions row-major,
    then the A anchors of a position), so they concatenate over levels like the anchors.

    Args:
      num_anchors: A anchors per position.
      conv_channels: 256 in the references, 512 in the design notes.
      share_heads: one set of weights for every level (every reference) or one per level.
      objectness: "sigmoid" (A logits) or "softmax" (2A logits, the design notes).
      levels: the FPN levels, e.g. (2, 3, 4, 5, 6).
      num_convs: 3x3 convs before the predictors.

    ``convs`` is flat: head h's k-th conv is ``convs[h * num_convs + k]`` (checkpoints do not
    follow nested lists). The first conv of a head keeps the name ``conv``, so one-conv
    checkpoints are unchanged.
    """

    def __init__(self, num_anchors: int = 3, conv_channels: int = 256, share_heads: bool = True,
                 dropout: float = 0.0, objectness: str = "sigmoid", levels=(2, 3, 4, 5, 6),
                 num_convs: int = 1, **kwargs):
        super().__init__(**kwargs)
        if objectness not in ("sigmoid", "softmax"):
            raise ValueError(f"RPNHead: objectness must be 'sigmoid' or 'softmax', got "
                             f"{objectness!r}")
        self.num_anchors, self.conv_channels = int(num_anchors), int(conv_channels)
        self.share_heads, self.dropout_rate = bool(share_heads), float(dropout)
        self.objectness, self.levels = objectness, tuple(int(v) for v in levels)
        if int(num_convs) < 1:
            raise ValueError(f"RPNHead: num_convs must be >= 1, got {num_convs}")
        self.num_convs = int(num_convs)
        init = keras.initializers.RandomNormal(stddev=0.01)  # torchvision / detectron2
        cls_out = self.num_anchors * (2 if objectness == "softmax" else 1)
        n_heads = 1 if self.share_heads else len(self.levels)
        self.convs, self.cls_convs, self.box_convs = [], [], []
        for i in range(n_heads):
            sfx = "" if self.share_heads else f"_p{self.levels[i]}"
            for k in range(self.num_convs):
                self.convs.append(keras.layers.Conv2D(
                    conv_channels, 3, padding="same", activation="relu", kernel_initializer=init,
                    name=f"conv{k + 1 if k else ''}{sfx}"))
            self.cls_convs.append(keras.layers.Conv2D(cls_out, 1, kernel_initializer=init,
                                                      name=f"objectness{sfx}"))
            self.box_convs.append(keras.layers.Conv2D(4 * self.num_anchors, 1,
                                                      kernel_initializer=init,
                                                      name=f"deltas{sfx}"))
        self.dropout = keras.layers.Dropout(dropout) if dropout > 0 else None

    def build(self, input_shape):
        # Explicit sub-layer builds give every variable a unique name (see Bottleneck.build).
        for i, conv in enumerate(self.convs):
            h, k = divmod(i, self.num_convs)
            level = self.levels[h] if not self.share_heads else self.levels[0]
            channels = int(input_shape[f"p{level}"][-1]) if k == 0 else self.conv_channels
            conv.build((None, None, None, channels))
        for i in range(len(self.cls_convs)):
            self.cls_convs[i].build((None, None, None, self.conv_channels))
            self.box_convs[i].build((None, None, None, self.conv_channels))

    def call(self, features, training=None):
        objectness, deltas = [], []
        for i, lv in enumerate(self.levels):
            h = 0 if self.share_heads else i
            x = features[f"p{lv}"]
            for conv in self.convs[h * self.num_convs: (h + 1) * self.num_convs]:
                x = conv(x)
            if self.dropout is not None:
                x = self.dropout(x, training=training)
            logits = self.cls_convs[h](x)
            b, height, width, _ = dims(logits)  # ints for a static input size
            n = height * width * self.num_anchors
            if self.objectness == "softmax":
                objectness.append(tf.reshape(logits, [b, n, 2]))
            else:
                objectness.append(tf.reshape(logits, [b, n]))
            deltas.append(tf.reshape(self.box_convs[h](x), [b, n, 4]))
        return {"objectness": objectness, "deltas": deltas}

    def compute_output_shape(self, input_shape):
        obj, dl = [], []
        for lv in self.levels:
            b, h, w = input_shape[f"p{lv}"][:3]
            n = None if h is None or w is None else h * w * self.num_anchors
            obj.append((b, n, 2) if self.objectness == "softmax" else (b, n))
            dl.append((b, n, 4))
        return {"objectness": obj, "deltas": dl}

    def get_config(self):
        return {**super().get_config(), "num_anchors": self.num_anchors,
                "conv_channels": self.conv_channels, "share_heads": self.share_heads,
                "dropout": self.dropout_rate, "objectness": self.objectness,
                "levels": list(self.levels), "num_convs": self.num_convs}
