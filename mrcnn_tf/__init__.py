"""mrcnn_tf: Mask R-CNN instance segmentation for TensorFlow 2 and Keras 3."""

from mrcnn_tf.config import Config, ConfigError, load_config

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
