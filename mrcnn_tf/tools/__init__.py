"""Command-line tools: ``python -m mrcnn_tf.tools.convert_torchvision``."""
