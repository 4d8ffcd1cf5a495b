"""The torchvision converter's earlier name: ``python -m mrcnn_tf.tools.convert_torchvision``
runs ``python -m mrcnn_tf.tools.convert`` (which reads v1 and v2 checkpoints, and more)."""

from __future__ import annotations

import sys

from mrcnn_tf.tools.convert import convert, main

__all__ = ["convert", "main"]

if __name__ == "__main__":
    sys.exit(main())
