"""Keras 3 layers of Mask R-CNN; each takes plain keyword arguments and round-trips get_config."""

from mrcnn_tf.layers.backbone import Bottleneck, ResNet, load_keras_applications_resnet50
from mrcnn_tf.layers.detection import DetectionGenerator
from mrcnn_tf.layers.fpn import FPN
from mrcnn_tf.layers.heads import BoxHead, MaskHead
from mrcnn_tf.layers.norm import FrozenBatchNormalization, make_norm
from mrcnn_tf.layers.preprocess import Preprocessor
from mrcnn_tf.layers.proposals import ProposalGenerator
from mrcnn_tf.layers.roi_align import MultilevelRoIAlign
from mrcnn_tf.layers.rpn_head import RPNHead

__all__ = [
    "FPN", "BoxHead", "Bottleneck", "DetectionGenerator", "FrozenBatchNormalization", "MaskHead",
    "MultilevelRoIAlign", "Preprocessor", "ProposalGenerator", "RPNHead", "ResNet",
    "load_keras_applications_resnet50", "make_norm",
]
