import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.layers.fpn import FPN
from tests.layers.contract import check_layer_contract, rand


def _features(b=2, s=64, widths=(16, 24, 32, 40)):
    return {f"c{lv}": rand(b, s >> lv, s >> lv, w)
            for lv, w in zip(range(2, 6), widths)}


def test_contract_and_shapes():
    expected = {f"p{lv}": (2, 64 >> lv, 64 >> lv, 8) for lv in range(2, 7)}
    check_layer_contract(FPN, dict(channels=8, norm="group_norm", group_norm_groups=4),
                         (_features(),), expected_shapes=expected,
                         non_default=("channels", "norm", "group_norm_groups"))


def test_top_down_wiring_and_p6():
    fpn = FPN(channels=6)
    feats = _features()
    out = fpn(feats)
    lat = [fpn.lateral[i](feats[f"c{lv}"]) for i, lv in enumerate(range(2, 6))]
    top5 = lat[3]
    top4 = lat[2] + tf.repeat(tf.repeat(top5, 2, 1), 2, 2)
    top3 = lat[1] + tf.repeat(tf.repeat(top4, 2, 1), 2, 2)
    np.testing.assert_allclose(out["p5"], fpn.output_convs[3](top5), atol=1e-5)
    np.testing.assert_allclose(out["p4"], fpn.output_convs[2](top4), atol=1e-5)
    np.testing.assert_allclose(out["p3"], fpn.output_convs[1](top3), atol=1e-5)
    np.testing.assert_allclose(out["p6"], out["p5"].numpy()[:, ::2, ::2], atol=0)


def test_odd_sizes_and_p5_only():
    feats = {"c2": np.zeros((1, 13, 13, 4), np.float32), "c3": np.zeros((1, 7, 7, 4), np.float32),
             "c4": np.zeros((1, 4, 4, 4), np.float32), "c5": np.zeros((1, 2, 2, 4), np.float32)}
    out = FPN(channels=4)(feats)
    assert out["p2"].shape == (1, 13, 13, 4) and out["p6"].shape == (1, 1, 1, 4)
    assert "p6" not in FPN(channels=4, max_level=5)(feats)
    with pytest.raises(ValueError, match="max_level must be 5 or 6"):
        FPN(max_level=7)
