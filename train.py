"""Train (and evaluate) Mask R-CNN: ``python train.py`` trains configs/shapes.yaml into
runs/shapes. The same program as the ``mrcnn-train`` console script; ``python train.py --help``
lists the options, and ``mrcnn_tf/cli/train.py`` documents them."""

import sys

from mrcnn_tf.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
