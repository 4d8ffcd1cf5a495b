"""Command-line programs, installed as console scripts (pyproject ``[project.scripts]``):
``mrcnn-train`` (``train``), ``mrcnn-export`` (``export``), ``mrcnn-predict``
(``mrcnn_tf.predict``) and ``mrcnn-convert`` (``mrcnn_tf.tools.convert``). The
top-level ``train.py`` and ``export/export_saved_model.py`` run the same ``main``."""

import logging
import os


def quiet() -> None:
    """The one place where the programs silence what they cannot fix. Each ``main`` calls it
    before TensorFlow is imported.

    - ``TF_CPP_MIN_LOG_LEVEL=2`` unless already set: TensorFlow's C++ INFO and WARNING lines,
      among them grappler's "Error in PredictCost() for the op: CropAndResize" (its cost model
      has no entry for the op; harmless), eight lines at every trace. Set
      ``TF_CPP_MIN_LOG_LEVEL=0`` to see them. (The CUDA probing lines of a CPU-only machine are
      written by absl before that level applies, and remain.)
    - Keras' "shuffle=True was passed, but will be ignored" is not silenced but avoided: ``fit``
      gets ``shuffle=False`` (the input pipeline shuffles).
    - Python logging: our own logger (``mrcnn_tf``) at INFO; every other logger, including
      TensorFlow's and absl's ("Sharding callback duration", "Assets written to", the input
      renaming notes of ``tf.saved_model.save``), at WARNING.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mrcnn_tf").setLevel(logging.INFO)
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
