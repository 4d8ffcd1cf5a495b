"""ResNet backbones (He et al., 2016) producing C2..C5, with explicit symmetric padding so that
weights from PyTorch-style ResNets (torchvision, detectron2) give the same outputs."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mrcnn_tf.layers.norm import make_norm

# name -> (blocks per stage res2..res5, stem width, bottleneck width of res2, groups of the 3x3
# convs). Stage outputs are 4 x stem x 2**i channels (256..2048 for the full-size ones).
ARCHS = {
    "resnet50": ((3, 4, 6, 3), 64, 64, 1),
    "resnet101": ((3, 4, 23, 3), 64, 64, 1),
    # ResNeXt-101 32x8d (Xie et al., 2017): 32 groups of 8 channels in res2's 3x3 convs.
    "resnext101_32x8d": ((3, 4, 23, 3), 64, 256, 32),
    # CPU-sized: one bottleneck per stage, a quarter of the width (outputs 64..512 channels).
    "resnet_small": ((1, 1, 1, 1), 16, 16, 1),
    "resnext_small": ((1, 1, 1, 1), 16, 32, 4),
}
EXPANSION = 4


def _pad(x, p):
    return tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) if p else x


def _conv(filters, kernel, stride, name, groups=1):
    # He (fan_out) init as torchvision's ResNet; no bias: every conv is followed by a norm.
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False,
                               groups=groups,
                               kernel_initializer=keras.initializers.VarianceScaling(
                                   2.0, "fan_out", "untruncated_normal"), name=name)


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class Bottleneck(keras.layers.Layer):
    """1x1 -> 3x3 -> 1x1 residual block.

    Input [B, H, W, C_in] -> output [B, ceil(H / stride), ceil(W / stride), out_filters]
    (``filters * 4`` unless given; ResNeXt's bottleneck is wider than a quarter of its output).
    ``stride_in_1x1`` puts the stride on the first 1x1 conv (MSRA, Keras Applications) instead of
    the 3x3 (torchvision, "ResNet v1.5"). ``groups`` > 1 makes the 3x3 conv grouped (ResNeXt).
    """

    def __init__(self, filters: int, stride: int = 1, stride_in_1x1: bool = False,
                 norm: str = "frozen_bn", group_norm_groups: int = 32, project: bool = False,
                 groups: int = 1, out_filters: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride, self.stride_in_1x1 = int(filters), int(stride), stride_in_1x1
        self.norm, self.group_norm_groups, self.project = norm, int(group_norm_groups), project
        self.groups = int(groups)
        self.out_filters = int(out_filters) if out_filters else self.filters * EXPANSION
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        out = self.out_filters
        self.conv1 = _conv(filters, 1, s1, "conv1")
        self.norm1 = make_norm(norm, "norm1", group_norm_groups)
        self.conv2 = _conv(filters, 3, s3, "conv2", self.groups)
        self.norm2 = make_norm(norm, "norm2", group_norm_groups)
        self.conv3 = _conv(out, 1, 1, "conv3")
        self.norm3 = make_norm(norm, "norm3", group_norm_groups)
        if project:
            self.shortcut = _conv(out, 1, stride, "shortcut")
            self.shortcut_norm = make_norm(norm, "shortcut_norm", group_norm_groups)

    def build(self, input_shape):
        # Sub-layers are built explicitly so that every variable gets a unique name (Keras 3
        # names lazily built nested variables after the outermost layer only, which breaks
        # TF1-style SavedModel loaders such as TF Serving's).
        def shape(c):
            return (None, None, None, c)

        c_in, out = int(input_shape[-1]), self.out_filters
        self.conv1.build(shape(c_in))
        self.norm1.build(shape(self.filters))
        self.conv2.build(shape(self.filters))
        self.norm2.build(shape(self.filters))
        self.conv3.build(shape(self.filters))
        self.norm3.build(shape(out))
        if self.project:
            self.shortcut.build(shape(c_in))
            self.shortcut_norm.build(shape(out))

    def call(self, x, training=None):
        y = tf.nn.relu(self.norm1(self.conv1(x), training=training))
        y = tf.nn.relu(self.norm2(self.conv2(_pad(y, 1)), training=training))
        y = self.norm3(self.conv3(y), training=training)
        short = self.shortcut_norm(self.shortcut(x), training=training) if self.project else x
        return tf.nn.relu(y + short)

    def compute_output_shape(self, input_shape):
        def div(v):
            return None if v is None else -(-v // self.stride)

        return (input_shape[0], div(input_shape[1]), div(input_shape[2]), self.out_filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride,
                "stride_in_1x1": self.stride_in_1x1, "norm": self.norm,
                "group_norm_groups": self.group_norm_groups, "project": self.project,
                "groups": self.groups, "out_filters": self.out_filters}


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class ResNet(keras.layers.Layer):
    """ResNet-50/101, ResNeXt-101 32x8d (or small CPU variants) as a feature extractor.

    Input: [B, H, W, input_channels] normalised images (H, W multiples of 32 for exact strides).
    Output: {"c2": [B, H/4, W/4, 256], "c3": [B, H/8, W/8, 512], "c4": [B, H/16, W/16, 1024],
    "c5": [B, H/32, W/32, 2048]} (a quarter of those widths for resnet_small).

    ``freeze_at`` k makes the stem (k >= 1) and res2..res_k (k >= 2) non-trainable, as detectron2's
    FREEZE_AT; 2 equals torchvision's ``trainable_backbone_layers=3``.
    """

    def __init__(self, name_or_depth: str = "resnet50", norm: str = "frozen_bn",
                 stride_in_1x1: bool = False, freeze_at: int = 2, input_channels: int = 3,
                 group_norm_groups: int = 32, **kwargs):
        super().__init__(**kwargs)
        if name_or_depth not in ARCHS:
            raise ValueError(f"ResNet: unknown architecture {name_or_depth!r}; allowed: "
                             f"{', '.join(ARCHS)}")
        self.name_or_depth, self.norm, self.stride_in_1x1 = name_or_depth, norm, stride_in_1x1
        self.freeze_at, self.input_channels = int(freeze_at), int(input_channels)
        self.group_norm_groups = int(group_norm_groups)
        blocks, stem, width, groups = ARCHS[name_or_depth]
        self.stem_conv = _conv(stem, 7, 2, "stem_conv")
        self.stem_norm = make_norm(norm, "stem_norm", group_norm_groups)
        # One flat list: tf.train.Checkpoint does not follow lists nested in lists.
        self.blocks = []
        self._stage_sizes = tuple(blocks)
        in_ch = stem
        for i, n in enumerate(blocks):
            filters, out = width * 2 ** i, stem * EXPANSION * 2 ** i
            for b in range(n):
                stride = 2 if (b == 0 and i > 0) else 1
                project = b == 0 and (stride != 1 or in_ch != out)
                self.blocks.append(Bottleneck(filters, stride, stride_in_1x1, norm,
                                              group_norm_groups, project, groups, out,
                                              name=f"res{i + 2}_{b}"))
                in_ch = out
        self.out_channels = {f"c{i + 2}": stem * EXPANSION * 2 ** i for i in range(4)}
        self._apply_freeze()

    @property
    def stages(self) -> list[list[Bottleneck]]:
        """The blocks grouped by stage (res2..res5)."""
        out, start = [], 0
        for n in self._stage_sizes:
            out.append(self.blocks[start: start + n])
            start += n
        return out

    def _apply_freeze(self):
        if self.freeze_at >= 1:
            self.stem_conv.trainable = False
            if self.stem_norm is not None:
                self.stem_norm.trainable = False
        for i, stage in enumerate(self.stages):
            if self.freeze_at >= i + 2:
                for block in stage:
                    block.trainable = False

    def build(self, input_shape):
        if input_shape[-1] is not None and int(input_shape[-1]) != self.input_channels:
            raise ValueError(f"ResNet: images have {input_shape[-1]} channels but the backbone "
                             f"was configured with input_channels={self.input_channels}")
        self.stem_conv.build((None, None, None, self.input_channels))
        self.stem_norm.build((None, None, None, self.stem_conv.filters))
        channels = self.stem_conv.filters
        for block in self.blocks:
            block.build((None, None, None, channels))
            channels = block.out_filters

    def call(self, images, training=None):
        x = self.stem_conv(_pad(images, 3))
        x = tf.nn.relu(self.stem_norm(x, training=training))
        # Inputs are >= 0 after ReLU, so zero padding equals PyTorch's -inf padding here.
        x = tf.nn.max_pool2d(_pad(x, 1), 3, 2, "VALID")
        out = {}
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, training=training)
            out[f"c{i + 2}"] = x
        return out

    def compute_output_shape(self, input_shape):
        b, h, w = input_shape[0], input_shape[1], input_shape[2]

        def div(v, s):
            return None if v is None else -(-v // s)

        return {k: (b, div(h, 2 ** (i + 2)), div(w, 2 ** (i + 2)), c)
                for i, (k, c) in enumerate(self.out_channels.items())}

    def get_config(self):
        return {**super().get_config(), "name_or_depth": self.name_or_depth, "norm": self.norm,
                "stride_in_1x1": self.stride_in_1x1, "freeze_at": self.freeze_at,
                "input_channels": self.input_channels,
                "group_norm_groups": self.group_norm_groups}


def _set_norm_from_bn(norm_layer, gamma, beta, mean, var, eps, conv_bias=None):
    """Loads BN statistics into our norm, folding a preceding conv bias and an epsilon change."""
    if conv_bias is not None:
        mean = mean - conv_bias
    own_eps = norm_layer.epsilon
    var = var + (eps - own_eps)
    if isinstance(norm_layer, keras.layers.BatchNormalization):
        norm_layer.set_weights([gamma, beta, mean, var])
    elif hasattr(norm_layer, "moving_variance"):
        for w, v in zip((norm_layer.gamma, norm_layer.beta, norm_layer.moving_mean,
                         norm_layer.moving_variance), (gamma, beta, mean, var)):
            w.assign(v)
    else:
        raise ValueError(f"cannot load batch-norm statistics into {type(norm_layer).__name__}: "
                         "use norm=frozen_bn or bn with these weights")


def load_keras_applications_resnet50(backbone: ResNet, weights_path: str) -> None:
    """Initialises a ResNet-50 backbone from a Keras Applications ``.h5`` weights file.

    The file is the one ``keras.applications.ResNet50`` uses (with or without the top); nothing
    is downloaded. Keras Applications' convs have biases and its BN epsilon is 1.001e-5: both are
    folded into our bias-free convs' norms exactly (mean -= bias, variance += eps difference), so
    the features equal Keras Applications' ``conv{2..5}_block*_out`` outputs.

    Raises:
      ValueError: the backbone is not a ResNet-50 with ``stride_in_1x1=True`` and BN-type norms,
        or the file does not hold ResNet-50 weights.
    """
    if backbone.name_or_depth != "resnet50":
        raise ValueError(f"Keras Applications weights are ResNet-50 weights; the backbone is "
                         f"{backbone.name_or_depth}")
    if not backbone.stride_in_1x1:
        raise ValueError("Keras Applications' ResNet-50 has its stride on the first 1x1 conv: "
                         "set model.backbone.stride_in_1x1=true to use these weights")
    if backbone.input_channels != 3:
        raise ValueError("Keras Applications weights expect 3 input channels")
    try:
        ref = keras.applications.ResNet50(include_top=False, weights=weights_path,
                                          input_shape=(None, None, 3))
    except Exception as e:  # keras raises several types for a wrong file
        raise ValueError(f"{weights_path}: not a Keras Applications ResNet-50 weights file "
                         f"({type(e).__name__}: {e})") from None
    if not backbone.built:
        backbone(np.zeros((1, 64, 64, 3), np.float32))

    def load(conv, norm, prefix):
        kernel, bias = ref.get_layer(prefix + "_conv").get_weights()
        conv.set_weights([kernel])
        bn = ref.get_layer(prefix + "_bn")
        _set_norm_from_bn(norm, *bn.get_weights(), bn.epsilon, conv_bias=bias)

    load(backbone.stem_conv, backbone.stem_norm, "conv1")
    for i, stage in enumerate(backbone.stages):
        for b, block in enumerate(stage):
            p = f"conv{i + 2}_block{b + 1}"
            load(block.conv1, block.norm1, p + "_1")
            load(block.conv2, block.norm2, p + "_2")
            load(block.conv3, block.norm3, p + "_3")
            if block.project:
                load(block.shortcut, block.shortcut_norm, p + "_0")
