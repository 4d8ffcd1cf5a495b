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


@pytest.mark.parametrize("h,w,like_h,like_w", [(4, 5, 8, 10), (4, 5, 7, 9), (3, 3, 5, 6),
                                                (1, 1, 1, 2), (25, 34, 50, 68)])
@pytest.mark.parametrize("static", [True, False])
def test_upsample2x_is_repeat_then_crop_with_its_gradient(h, w, like_h, like_w, static):
    """The broadcast upsampling equals np.repeat twice then the crop to ``like`` (odd sizes
    included), with static or unknown shapes, and its gradient sums each kept 2x2 block."""
    from mrcnn_tf.layers.fpn import _upsample2x_to

    rng = np.random.default_rng(h * 100 + like_w)
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    like = np.zeros((2, like_h, like_w, 1), np.float32)
    want = np.repeat(np.repeat(x, 2, 1), 2, 2)[:, :like_h, :like_w]
    dy = rng.normal(size=want.shape).astype(np.float32)
    want_grad = np.zeros_like(x)
    for i in range(like_h):
        for j in range(like_w):
            want_grad[:, i // 2, j // 2] += dy[:, i, j]

    def run(x, like):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = _upsample2x_to(x, like)
        return y, tape.gradient(y, x, output_gradients=dy)

    if not static:
        run = tf.function(run, input_signature=[tf.TensorSpec([None, None, None, 3]),
                                                tf.TensorSpec([None, None, None, 1])])
    y, grad = run(tf.constant(x), tf.constant(like))
    np.testing.assert_array_equal(y.numpy(), want)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-6, atol=1e-6)
