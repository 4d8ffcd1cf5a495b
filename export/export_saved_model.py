"""Export a trained model as a SavedModel for TF Serving: the same program as the
``mrcnn-export`` console script (``mrcnn_tf/cli/export.py``; ``--help`` lists the options)."""

import sys

from mrcnn_tf.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
