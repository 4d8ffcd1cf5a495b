"""Our side of the training-path parity with detectron2: the committed small reference and
our config of the parity model. The check is tests/parity/training.py's (by the reference's
``family``); the reference is written by tests/scripts/detectron2_train_parity.py. Needs no
torch.
"""

from __future__ import annotations

import pathlib

from tests.parity import detectron2_inference as d2p

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL_FIXTURE = REPO / "tests" / "fixtures" / "detectron2_train_small.npz"


def our_config(small: bool, sampling: bool, overrides=(), rpn_all: int | None = None):
    """configs/detectron2_r50_fpn.yaml as the parity model; without ``sampling``, every anchor
    (``rpn_all`` asked of the RPN's sampler, detectron2's normaliser) and every proposal."""
    from mrcnn_tf.config import load_config

    off = [] if sampling else [f"model.rpn.batch_size_per_image={rpn_all}",
                               "model.rpn.positive_fraction=1.0",
                               "model.box_head.batch_size_per_image=null"]
    return load_config(d2p.CONFIG, d2p.parity_overrides(small) + off + list(overrides))
