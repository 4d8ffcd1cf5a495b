"""Command-line programs, installed as console scripts (pyproject ``[project.scripts]``):
``mrcnn-train`` (``train``), ``mrcnn-export`` (``export``), ``mrcnn-predict``
(``mrcnn_tf.predict``) and ``mrcnn-convert`` (``mrcnn_tf.tools.convert_torchvision``). The
top-level ``train.py`` and ``export/export_saved_model.py`` run the same ``main``."""
