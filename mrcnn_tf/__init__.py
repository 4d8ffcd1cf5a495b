"""mrcnn_tf: Mask R-CNN instance segmentation for TensorFlow 2 and Keras 3.

The names below are imported on first use (PEP 562), so that ``import mrcnn_tf`` and the
command-line programs' ``--help`` do not load TensorFlow, and the programs can set its log level
before it starts (``mrcnn_tf.cli.quiet``). Where Keras is already imported, the model module is
imported at once, registering its Keras classes (``keras.models.load_model`` on a run directory
then says to use ``load_run``).
"""

import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "mrcnn_tf.config", "ConfigError": "mrcnn_tf.config",
    "load_config": "mrcnn_tf.config", "MaskRCNN": "mrcnn_tf.model",
    "build_model": "mrcnn_tf.model", "with_num_classes": "mrcnn_tf.model",
    "paste_masks": "mrcnn_tf.ops.masks", "load_run": "mrcnn_tf.rundir",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mrcnn_tf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if "keras" in sys.modules:
    importlib.import_module("mrcnn_tf.model")
