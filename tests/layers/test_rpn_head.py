import numpy as np
import pytest

from mrcnn_tf.layers.rpn_head import RPNHead
from tests.layers.contract import check_layer_contract, rand


def _pyramid(b=2, s=64, c=8):
    return {f"p{lv}": rand(b, max(s >> lv, 1), max(s >> lv, 1), c).astype(np.float32)
            for lv in range(2, 7)}


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
def test_contract_and_shapes(objectness):
    sizes = [16, 8, 4, 2, 1]
    cls = [(2, s * s * 3, 2) if objectness == "softmax" else (2, s * s * 3) for s in sizes]
    expected = {"objectness": cls, "deltas": [(2, s * s * 3, 4) for s in sizes]}
    check_layer_contract(RPNHead, dict(num_anchors=3, conv_channels=12, share_heads=False,
                                       dropout=0.2, objectness=objectness),
                         (_pyramid(),), expected_shapes=expected,
                         non_default=("conv_channels", "share_heads", "dropout", "objectness"))


def test_shared_vs_per_level_weights():
    shared, separate = RPNHead(3, 16, share_heads=True), RPNHead(3, 16, share_heads=False)
    feats = _pyramid()
    shared(feats)
    separate(feats)
    assert separate.count_params() == 5 * shared.count_params()
    # 3x3 conv (8 -> 16) + objectness (16 -> 3) + deltas (16 -> 12), with biases.
    assert shared.count_params() == (9 * 8 * 16 + 16) + (16 * 3 + 3) + (16 * 12 + 12)


def test_rows_follow_the_anchor_layout():
    head = RPNHead(3, 4)
    feats = _pyramid(b=1)
    out = head(feats)
    raw = head.box_convs[0](head.convs[0](feats["p3"])).numpy()  # [1, 8, 8, 12]
    # Row (y * W + x) * A + a holds channels [4a, 4a + 4) of position (y, x).
    y, x, a = 5, 2, 1
    np.testing.assert_allclose(out["deltas"][1][0, (y * 8 + x) * 3 + a], raw[0, y, x, 4:8],
                               rtol=1e-6)


def test_rejects_unknown_objectness():
    with pytest.raises(ValueError, match="objectness must be"):
        RPNHead(objectness="tanh")
