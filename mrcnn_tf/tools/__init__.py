"""Command-line tools: ``python -m mrcnn_tf.tools.convert`` (checkpoint conversion)."""
