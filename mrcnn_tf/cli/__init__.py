"""Command-line programs, installed as console scripts (pyproject ``[project.scripts]``):
``mrcnn-train`` (``train``), ``mrcnn-export`` (``export``), ``mrcnn-predict``
(``mrcnn_tf.predict``) and ``mrcnn-convert`` (``mrcnn_tf.tools.convert``). The
top-level ``train.py`` and ``export/export_saved_model.py`` run the same ``main``."""

import logging
import os
import sys
import tempfile

# What TensorFlow's C++ side writes at start-up on a CPU-only machine before its log level
# applies: the CUDA build probing for a GPU, oneDNN's notice, absl's preamble. None is a fault.
_STARTUP_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations",
                  "cudart_stub.cc", "Could not find cuda drivers", "failed call to cuInit",
                  "cuda_platform.cc", "Unable to register cuDNN factory",
                  "Unable to register cuFFT factory", "Unable to register cuBLAS factory",
                  "computation_placer.cc", "TF-TRT Warning", "cpu_feature_guard.cc",
                  "rebuild TensorFlow with the appropriate compiler flags")


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
    - TensorFlow is imported here, and its GPUs listed, with the process's stderr (fd 2) held
      in a file: the lines its C++ side writes before any log level applies (about seven on a
      CPU-only machine, among them "failed call to cuInit: ... CUDA error", which reads like
      a failure and is not one) are dropped, every other line is passed on, and one line
      says when no GPU was found. With ``TF_CPP_MIN_LOG_LEVEL`` 0 or 1 nothing is held back.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mrcnn_tf").setLevel(logging.INFO)
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "tensorflow" not in sys.modules and os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("0", "1"):
        _import_tensorflow_quietly()


def _import_tensorflow_quietly() -> None:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")  # CUDA's probe (cuInit) runs here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", "replace")
    probed = "cuda" in text.lower()
    rest = [line for line in text.splitlines()
            if line.strip() and not any(n in line for n in _STARTUP_NOISE)]
    if rest:
        sys.stderr.write("\n".join(rest) + "\n")
    if probed and not gpus:
        logging.getLogger("mrcnn_tf").info("no GPU found (no CUDA driver): running on the CPU")
