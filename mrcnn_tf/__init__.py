"""mrcnn_tf: Mask R-CNN instance segmentation for TensorFlow 2 and Keras 3."""

from mrcnn_tf.config import Config, ConfigError, load_config
from mrcnn_tf.model import MaskRCNN, build_model, with_num_classes
from mrcnn_tf.ops.masks import paste_masks

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "MaskRCNN", "__version__", "build_model", "load_config",
           "paste_masks", "with_num_classes"]
