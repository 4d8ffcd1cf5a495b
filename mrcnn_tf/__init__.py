"""mrcnn_tf: Mask R-CNN instance segmentation for TensorFlow 2 and Keras 3.

The names below are imported on first use (PEP 562), so that ``import mrcnn_tf`` and the
command-line programs' ``--help`` do not load TensorFlow, and the programs can set its log level
before it starts (``mrcnn_tf.cli.quiet``).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "mrcnn_tf.config", "ConfigError": "mrcnn_tf.config",
    "load_config": "mrcnn_tf.config", "MaskRCNN": "mrcnn_tf.model",
    "build_model": "mrcnn_tf.model", "with_num_classes": "mrcnn_tf.model",
    "paste_masks": "mrcnn_tf.ops.masks",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mrcnn_tf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
