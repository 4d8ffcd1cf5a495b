import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.ops.anchors import base_anchors, multilevel_anchors


def test_base_anchors_hand_computed():
    # size 32, ratios (0.5, 1, 2): h = 32 sqrt(r), w = 32 / sqrt(r), halves rounded half-to-even.
    out = base_anchors(32, (0.5, 1.0, 2.0))
    np.testing.assert_array_equal(out, [[-11, -23, 11, 23], [-16, -16, 16, 16],
                                        [-23, -11, 23, 11]])
    unrounded = base_anchors(32, (0.5,), round_to_int=False)
    np.testing.assert_allclose(unrounded, [[-11.3137, -22.6274, 11.3137, 22.6274]], rtol=1e-5)


def test_order_is_ratio_major_then_scale():
    out = base_anchors(10, (1.0, 4.0), scales=(1.0, 2.0), round_to_int=False)
    heights = out[:, 2] - out[:, 0]
    np.testing.assert_allclose(heights, [10, 20, 20, 40])


def test_multilevel_layout_and_strides():
    grids = {2: (4, 6), 3: (2, 3)}
    out = multilevel_anchors((16, 24), grids, sizes=(8, 16), aspect_ratios=(0.5, 1.0, 2.0))
    a2 = out[2].numpy()
    assert a2.shape == (4 * 6 * 3, 4) and out[3].shape == (2 * 3 * 3, 4)
    # Position (y=1, x=2) of P2 (stride 4), anchor 1 (ratio 1): centre (4, 8), side 8.
    np.testing.assert_array_equal(a2[(1 * 6 + 2) * 3 + 1], [0.0, 4.0, 8.0, 12.0])
    # Offset 0.5 (Model Garden) centres anchors on cells.
    half = multilevel_anchors((16, 24), grids, (8, 16), (1.0,), offset=0.5)[2].numpy()
    np.testing.assert_array_equal(half[0], [-2.0, -2.0, 6.0, 6.0])


def test_torchvision_stride_rule_for_indivisible_sizes():
    # An 800-px-high image has a 13-row P6: torchvision uses stride 800 // 13 = 61.
    out = multilevel_anchors((800, 1216), {6: (13, 19)}, (512,), (1.0,))[6].numpy()
    centres_y = (out[:, 0] + out[:, 2]) / 2
    assert centres_y.reshape(13, 19)[1, 0] == 61.0
    centres_x = (out[:, 1] + out[:, 3]) / 2
    assert centres_x.reshape(13, 19)[0, 1] == 64.0


def test_dynamic_grid_in_tf_function():
    @tf.function(input_signature=[tf.TensorSpec([None, None, 1])])
    def fn(feat):
        shape = tf.shape(feat)
        return multilevel_anchors((shape[0] * 4, shape[1] * 4), {2: (shape[0], shape[1])},
                                  (32,), (0.5, 1.0, 2.0))[2]

    assert fn(tf.zeros([5, 7, 1])).shape == (5 * 7 * 3, 4)


@pytest.mark.parametrize("canvas, sizes, offset, rounded, level_strides", [
    ((800, 1088), (32, 64, 128, 256, 512), 0.0, True, False),
    ((1088, 800), (32, 64, 128, 256, 512), 0.5, True, True),
    ((1344, 1344), (32, 64, 128, 256, 512), 0.0, False, True),
    ((517, 333), (20, 40, 80, 160, 250), 0.5, False, False)])
def test_static_sizes_give_one_constant_equal_to_the_traced_anchors(canvas, sizes, offset,
                                                                     rounded, level_strides):
    """Python-int sizes take the numpy path (one Const in a traced graph); tensor sizes the
    TensorFlow ops. Bit for bit the same, over real canvases (800x1088, 1088x800, 1344 square,
    odd sizes), strides of both rules, both offsets and unrounded bases."""
    h, w = canvas
    grids = {lv: (-(-h // 2 ** lv), -(-w // 2 ** lv)) for lv in range(2, 7)}
    kwargs = dict(sizes=sizes, aspect_ratios=(0.5, 1.0, 2.0), scales=(1.0, 1.26), offset=offset,
                  round_to_int=rounded, level_strides=level_strides)

    @tf.function(autograph=False)
    def traced(hw, grid_tensors):
        return multilevel_anchors((hw[0], hw[1]), dict(zip(grids, grid_tensors)), **kwargs)

    static = multilevel_anchors((h, w), grids, **kwargs)
    dynamic = traced(tf.constant([h, w]),
                     [(tf.constant(gh), tf.constant(gw)) for gh, gw in grids.values()])
    graph = tf.function(lambda: multilevel_anchors((h, w), grids, **kwargs)
                        ).get_concrete_function().graph
    assert {op.type for op in graph.get_operations()} <= {"Const", "Identity", "NoOp"}
    for lv in grids:
        assert static[lv].dtype == tf.float32
        np.testing.assert_array_equal(static[lv].numpy(), dynamic[lv].numpy(),
                                      err_msg=f"{h}x{w} level {lv}")
