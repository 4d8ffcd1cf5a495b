import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.ops.roi_align import (
    multilevel_roi_align,
    roi_align,
    roi_align_flat,
    roi_align_gather_flat,
    roi_levels,
)
from tests.ops import reference

# detectron2's test: 5x5 map of 0..24, box x1=y1=1, x2=y2=3, 4x4 output (DESIGN.md section 3).
KNOWN = {
    False: [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]],
    True: [[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11], [12, 12.5, 13, 13.5]],
}


@pytest.mark.parametrize("aligned", [False, True])
def test_known_values(aligned):
    feat = tf.reshape(tf.range(25, dtype=tf.float32), [1, 5, 5, 1])
    out = roi_align(feat, [[[1.0, 1.0, 3.0, 3.0]]], 4, sampling_ratio=1, aligned=aligned)
    np.testing.assert_allclose(out[0, 0, :, :, 0], KNOWN[aligned], atol=1e-5)


def _random_case(rng, n=40, h=19, w=23, c=3):
    feat = rng.standard_normal((2, h, w, c)).astype(np.float32)
    # Boxes of every kind: inside, straddling a border, wholly outside, tiny, thin.
    y1 = rng.uniform(-8, h + 4, (2, n))
    x1 = rng.uniform(-8, w + 4, (2, n))
    hh = rng.choice([0.3, 1.0, 4.0, 12.0], (2, n)) * rng.uniform(0.2, 1.5, (2, n))
    ww = rng.choice([0.3, 1.0, 4.0, 12.0], (2, n)) * rng.uniform(0.2, 1.5, (2, n))
    boxes = np.stack([y1, x1, y1 + hh, x1 + ww], -1).astype(np.float32)
    return feat, boxes


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_matches_numpy_reference(aligned, ratio):
    rng = np.random.default_rng(ratio + 10 * aligned)
    feat, boxes = _random_case(rng)
    scale = 0.5
    out = roi_align(feat, boxes / scale, (3, 4), spatial_scale=scale, sampling_ratio=ratio,
                    aligned=aligned).numpy()
    ref = np.stack([np.stack([reference.roi_align(feat[b], boxes[b, i] / scale, 3, 4, scale,
                                                  ratio, aligned)
                              for i in range(boxes.shape[1])]) for b in range(2)])
    diff = np.abs(out - ref).max()
    assert diff <= 1e-5, diff
    # The case must exercise the border rule: some outputs are exactly zero (wholly outside).
    assert np.any(np.all(ref == 0, axis=(2, 3, 4)))


def test_gradients_reach_features():
    feat = tf.Variable(tf.random.normal([1, 8, 8, 2]))
    with tf.GradientTape() as tape:
        out = roi_align(feat, [[[2.0, 2.0, 10.0, 12.0]]], 2, spatial_scale=0.5)
        loss = tf.reduce_sum(out)
    grad = tape.gradient(loss, feat)
    assert grad is not None
    # Each output is a mean of bilinear samples whose weights sum to 1: the gradient sums to the
    # number of outputs (2 x 2 bins x 2 channels) when every sample lies inside the map.
    np.testing.assert_allclose(tf.reduce_sum(grad).numpy(), 2 * 2 * 2, rtol=1e-5)


def test_empty_and_degenerate_boxes():
    feat = tf.random.normal([2, 6, 6, 4])
    empty = roi_align(feat, tf.zeros([2, 0, 4]), 7)
    assert empty.shape == (2, 0, 7, 7, 4)
    padded = roi_align(feat, tf.zeros([2, 3, 4]), 7, aligned=False)
    assert padded.shape == (2, 3, 7, 7, 4) and np.isfinite(padded.numpy()).all()


def test_one_pixel_map():
    feat = tf.constant([[[[3.0]]]])
    out = roi_align(feat, [[[-0.5, -0.5, 0.5, 0.5]]], 2, sampling_ratio=2, aligned=False)
    ref = reference.roi_align(feat.numpy()[0], [-0.5, -0.5, 0.5, 0.5], 2, 2, 1.0, 2, False)
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=1e-6)


def test_rejects_a_negative_sampling_ratio():
    with pytest.raises(ValueError, match="sampling_ratio must be >= 0"):
        roi_align(tf.zeros([1, 4, 4, 1]), tf.zeros([1, 1, 4]), 2, sampling_ratio=-1)


def _adaptive_boxes(rng, n, h, w):
    """RoIs from empty to larger than an h x w map, some crossing or outside its border."""
    side = rng.choice([0.0, 0.3, 2.0, 9.0, 25.0, 60.0], size=(n, 2)) * rng.uniform(0.5, 1.5,
                                                                                  (n, 2))
    y1, x1 = rng.uniform(-8, h + 3, n), rng.uniform(-8, w + 3, n)
    return np.stack([y1, x1, y1 + side[:, 0], x1 + side[:, 1]], -1).astype(np.float32)


@pytest.mark.parametrize("aligned", [False, True])
def test_adaptive_sampling_matches_numpy_reference(aligned):
    """sampling_ratio=0: ceil(RoI side / output side) samples per bin side, per RoI (1 to 10
    here), equal to the reference kernel for empty, sub-pixel, large and outside RoIs."""
    rng = np.random.default_rng(5)
    feat = rng.standard_normal((2, 23, 31, 3)).astype(np.float32)
    boxes = _adaptive_boxes(rng, 40, 23, 31)
    index = rng.integers(0, 2, 40).astype(np.int32)
    out = roi_align_flat(feat, boxes, index, (6, 5), sampling_ratio=0, aligned=aligned).numpy()
    ref = np.stack([reference.roi_align(feat[index[i]], boxes[i], 6, 5, 1.0, 0, aligned)
                    for i in range(40)])
    counts = np.ceil((boxes[:, 2:] - boxes[:, :2]) / [6, 5])
    assert counts.max() >= 10 and (np.abs(ref).max(axis=(1, 2, 3)) == 0).any()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_adaptive_sampling_gradient_is_the_exact_adjoint():
    """RoIAlign is linear in the map, so an exact gradient g = A^T u satisfies
    <A(F), u> = <F, g> for any map F and upstream u."""
    rng = np.random.default_rng(6)
    feat = tf.constant(rng.standard_normal((2, 19, 17, 4)).astype(np.float32))
    boxes = _adaptive_boxes(rng, 30, 19, 17)
    index = rng.integers(0, 2, 30).astype(np.int32)
    upstream = rng.standard_normal((30, 7, 7, 4)).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(feat)
        out = roi_align_flat(feat, boxes, index, 7, sampling_ratio=0, aligned=True)
        loss = tf.reduce_sum(out * upstream)
    grad = tape.gradient(loss, feat).numpy()
    other = rng.standard_normal(feat.shape).astype(np.float32)
    lhs = np.sum(roi_align_flat(other, boxes, index, 7, 0, True).numpy() * upstream)
    np.testing.assert_allclose(lhs, np.sum(other * grad), rtol=1e-4)
    assert np.abs(grad).max() > 0


@pytest.mark.parametrize("side,level", [(111, 2), (113, 3), (223, 3), (225, 4), (449, 5),
                                        (0, 2), (5000, 5)])
def test_level_rule(side, level):
    boxes = tf.constant([[10.0, 20.0, 10.0 + side, 20.0 + side]])
    assert int(roi_levels(boxes, 2, 5)[0]) == level


def _pyramid(rng, size=64, c=2):
    return {lv: tf.constant(rng.standard_normal((2, size >> lv, size >> lv, c)), tf.float32)
            for lv in range(2, 6)}


@pytest.mark.parametrize("aligned", [False, True])
def test_multilevel_pools_each_roi_from_its_level(aligned):
    rng = np.random.default_rng(0)
    feats = _pyramid(rng)
    sides = np.array([[8, 40, 300, 250, 60], [700, 16, 100, 230, 3]], np.float32)
    y1 = rng.uniform(0, 30, sides.shape).astype(np.float32)
    boxes = np.stack([y1, y1 + 1, y1 + sides, y1 + 1 + sides * 0.8], -1)
    out = multilevel_roi_align(feats, boxes, 7, sampling_ratio=2, aligned=aligned).numpy()
    levels = roi_levels(boxes, 2, 5).numpy()
    assert set(levels.ravel()) == {2, 3, 4, 5}
    for b in range(2):
        for i in range(sides.shape[1]):
            lv = levels[b, i]
            ref = reference.roi_align(feats[lv].numpy()[b], boxes[b, i], 7, 7, 2.0 ** -lv, 2,
                                      aligned)
            np.testing.assert_allclose(out[b, i], ref, atol=1e-5)


@pytest.mark.parametrize("canvas, aligned, ratio, size", [
    ((800, 1088), False, 2, 7), ((800, 1088), False, 2, 14), ((1088, 800), True, 1, 7),
    ((517, 333), True, 3, 5)])
def test_multilevel_equals_roi_align_flat_per_level_bit_for_bit(canvas, aligned, ratio, size):
    """The levels' crop boxes computed at once and one gradient for all levels
    (crop_and_resize_levels) give exactly the numbers of roi_align_flat on each level, forward
    and gradient to every level (eager: no graph rewrites). R50-FPN map sizes of real canvases,
    RoIs of every size (and off the map, and zero padding rows), two images."""
    rng = np.random.default_rng(sum(canvas) + ratio)
    h, w = canvas
    feats = {lv: tf.constant(rng.standard_normal((2, -(-h // 2 ** lv), -(-w // 2 ** lv), 8)),
                             tf.float32) for lv in range(2, 6)}
    n = 120
    side = np.exp(rng.uniform(np.log(4), np.log(900), (2, n)))
    y1, x1 = rng.uniform(-10, h, (2, n)), rng.uniform(-10, w, (2, n))
    boxes = np.stack([y1, x1, y1 + side * rng.uniform(0.3, 1.5, (2, n)), x1 + side], -1)
    boxes = boxes.astype(np.float32)
    boxes[:, -5:] = 0.0
    upstream = tf.constant(rng.standard_normal((2, n, size, size, 8)), tf.float32)
    levels = roi_levels(boxes, 2, 5).numpy()
    assert set(levels.ravel()) == {2, 3, 4, 5}

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(list(feats.values()))
        got = multilevel_roi_align(feats, boxes, size, ratio, aligned)
        want = [None] * (2 * n)
        for lv in range(2, 6):
            b, i = np.nonzero(levels == lv)
            pooled = roi_align_flat(feats[lv], boxes[b, i] * 2.0 ** -lv, b.astype(np.int32),
                                    size, ratio, aligned)
            for k, pos in enumerate(b * n + i):
                want[pos] = pooled[k]
        want = tf.reshape(tf.stack(want), got.shape)
        loss_got, loss_want = tf.reduce_sum(got * upstream), tf.reduce_sum(want * upstream)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    for lv, g_got, g_want in zip(range(2, 6), tape.gradient(loss_got, list(feats.values())),
                                 tape.gradient(loss_want, list(feats.values()))):
        np.testing.assert_array_equal(g_got.numpy(), g_want.numpy(), err_msg=f"level {lv}")


def test_multilevel_per_level_sampling_ratio_and_gradient():
    rng = np.random.default_rng(1)
    feats = {lv: tf.Variable(f) for lv, f in _pyramid(rng).items()}
    boxes = tf.constant([[[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 250.0, 250.0]]])
    with tf.GradientTape() as tape:
        out = multilevel_roi_align(feats, boxes, 2, sampling_ratio={2: 1, 3: 3, 4: 2, 5: 4})
        loss = tf.reduce_sum(out)
    ref0 = reference.roi_align(feats[2].numpy()[0], boxes[0, 0], 2, 2, 0.25, 1, True)
    ref1 = reference.roi_align(feats[4].numpy()[0], boxes[0, 1], 2, 2, 1 / 16, 2, True)
    np.testing.assert_allclose(out[0, 0], ref0, atol=1e-5)
    np.testing.assert_allclose(out[0, 1], ref1, atol=1e-5)
    grads = tape.gradient(loss, [feats[2], feats[3], feats[4]])
    assert float(tf.reduce_sum(tf.abs(grads[0]))) > 0
    assert grads[1] is None or float(tf.reduce_sum(tf.abs(grads[1]))) == 0  # no RoI on P3
    assert float(tf.reduce_sum(tf.abs(grads[2]))) > 0


def test_multilevel_in_tf_function_and_padding():
    rng = np.random.default_rng(2)
    feats = _pyramid(rng)
    fn = tf.function(lambda b: multilevel_roi_align(feats, b, 7))
    out = fn(tf.zeros([2, 5, 4]))
    assert out.shape == (2, 5, 7, 7, 2) and np.isfinite(out.numpy()).all()


def _bilinear_adjoint(grads, points, index, shape):
    """The exact gradient of bilinear sampling at ``points`` [R, h, w, 2] (y, x) w.r.t. the map,
    in float64, with roi_align's border rules: each sample's gradient spread on its four
    neighbours (torchvision's roi_align backward)."""
    out = np.zeros(shape)
    y, x = points[..., 0], points[..., 1]
    keep = (y >= -1) & (y <= shape[1]) & (x >= -1) & (x <= shape[2])
    y, x = np.maximum(y, 0.0), np.maximum(x, 0.0)
    y0 = np.minimum(np.floor(y), shape[1] - 1).astype(int)
    x0 = np.minimum(np.floor(x), shape[2] - 1).astype(int)
    ly = np.where(y0 == shape[1] - 1, 0.0, y - y0)
    lx = np.where(x0 == shape[2] - 1, 0.0, x - x0)
    y1, x1 = np.minimum(y0 + 1, shape[1] - 1), np.minimum(x0 + 1, shape[2] - 1)
    b = np.broadcast_to(index[:, None, None], y.shape)
    for yy, xx, w in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx),
                      (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)):
        np.add.at(out, (b[keep], yy[keep], xx[keep]), (w[..., None] * grads)[keep])
    return out


def test_gradient_to_features_is_exact_with_many_overlapping_rois():
    """2000 RoIs of 14 x 14 samples on a 20x24 map (every pixel receives gradient from many
    RoIs): the gradient equals the exact adjoint. TensorFlow's own CPU gradient of
    crop_and_resize adds from several threads into the same pixels unsynchronised and loses
    updates (1-2% of the gradient's norm in this case on 2 cores); ours sums with
    unsorted_segment_sum."""
    rng = np.random.default_rng(0)
    feat = tf.constant(rng.standard_normal((2, 20, 24, 32)).astype(np.float32))
    n = 2000
    y1, x1 = rng.uniform(-2, 19, n), rng.uniform(-2, 23, n)
    boxes = np.stack([y1, x1, y1 + rng.uniform(0.5, 12, n), x1 + rng.uniform(0.5, 12, n)], -1)
    index = rng.integers(0, 2, n).astype(np.int32)
    upstream = rng.standard_normal((n, 14, 14, 32))
    with tf.GradientTape() as tape:
        tape.watch(feat)
        out = roi_align_flat(feat, boxes.astype(np.float32), index, 14, sampling_ratio=1,
                             aligned=True)
        loss = tf.reduce_sum(out * upstream.astype(np.float32))
    grad = tape.gradient(loss, feat).numpy()
    # Sample points of sampling_ratio 1, aligned: bin centres of the half-pixel-shifted RoI.
    b = boxes.astype(np.float32).astype(np.float64) - 0.5
    centre = (np.arange(14) + 0.5) / 14
    ys = b[:, None, 0] + centre[None] * (b[:, 2] - b[:, 0])[:, None]
    xs = b[:, None, 1] + centre[None] * (b[:, 3] - b[:, 1])[:, None]
    points = np.stack(np.broadcast_arrays(ys[:, :, None], xs[:, None, :]), -1)
    ref = _bilinear_adjoint(upstream, points, index, feat.shape)
    rel = np.linalg.norm(grad - ref) / np.linalg.norm(ref)
    print(f"gradient vs exact adjoint: {rel:.2e}")
    assert rel < 1e-5


def test_gather_implementation_equals_crop_and_resize_on_a_pyramid_and_compiles_with_xla():
    """model.roi_align.impl=gather: the same numbers as the crop_and_resize path over a real
    pyramid (RoIs of every level, padded zero rows, two images, aligned both ways), the same
    gradient to every level, and it compiles with XLA, which crop_and_resize does not."""
    rng = np.random.default_rng(7)
    feats = {lv: tf.constant(rng.standard_normal((2, 320 >> lv, 256 >> lv, 3)), tf.float32)
             for lv in range(2, 6)}
    side = rng.choice([8.0, 40.0, 120.0, 300.0, 600.0], size=(2, 30, 2)) * rng.uniform(0.6, 1.4,
                                                                                (2, 30, 2))
    y1, x1 = rng.uniform(-20, 300, (2, 30)), rng.uniform(-20, 240, (2, 30))
    boxes = np.stack([y1, x1, y1 + side[..., 0], x1 + side[..., 1]], -1).astype(np.float32)
    boxes[1, -3:] = 0.0  # padding rows
    levels = roi_levels(boxes, 2, 5).numpy()
    assert set(levels.ravel()) == {2, 3, 4, 5}
    upstream = tf.constant(rng.standard_normal((2, 30, 7, 7, 3)), tf.float32)
    for aligned in (False, True):
        outs, grads = [], []
        for impl in ("crop_and_resize", "gather"):
            with tf.GradientTape() as tape:
                tape.watch(list(feats.values()))
                out = multilevel_roi_align(feats, boxes, 7, 2, aligned, impl=impl)
                loss = tf.reduce_sum(out * upstream)
            outs.append(out.numpy())
            grads.append([g.numpy() for g in tape.gradient(loss, list(feats.values()))])
        # Against the float64 kernel: crop_and_resize normalises the sample span by the map
        # size and back, which costs ~2e-5 on RoIs hundreds of pixels long; gather computes the
        # positions as torchvision does.
        ref = np.stack([np.stack([
            reference.roi_align(feats[lv].numpy()[b], boxes[b, i], 7, 7, 2.0 ** -lv, 2, aligned)
            for i, lv in enumerate(levels[b])]) for b in range(2)])
        assert np.abs(outs[1] - ref).max() <= 1e-5
        assert np.abs(outs[0] - ref).max() <= 5e-5
        for a, b in zip(grads[1], grads[0]):
            assert np.abs(a).max() > 0
            np.testing.assert_allclose(a, b, atol=1e-4)
    xla = tf.function(lambda f, b: multilevel_roi_align(f, b, 7, 2, True, impl="gather"),
                      jit_compile=True)
    # XLA fuses the position arithmetic (float32's ulp at 300 px is 3e-5 px).
    np.testing.assert_allclose(xla(feats, boxes).numpy(), outs[1], atol=5e-5)
    with pytest.raises(Exception, match="CropAndResize"):
        tf.function(lambda f, b: multilevel_roi_align(f, b, 7, 2, True), jit_compile=True)(
            feats, boxes)
    with pytest.raises(ValueError, match="adaptive sampling needs the crop_and_resize"):
        roi_align_gather_flat(feats[2], boxes[0], tf.zeros([30], tf.int32), 7, 0)


def test_adaptive_sampling_with_no_rois_after_other_shapes():
    """A level with no RoIs (common at P5) after calls with other map shapes and channel
    counts: the result is [0, out, out, C], never a failed stack of an empty list."""
    rng = np.random.default_rng(8)
    for shape in ((1, 9, 11, 3), (2, 13, 7, 5), (1, 6, 6, 2)):
        feat = rng.standard_normal(shape).astype(np.float32)
        out = roi_align_flat(feat, np.array([[1.0, 1.0, 5.0, 4.0]], np.float32),
                             np.zeros([1], np.int32), 7, sampling_ratio=0)
        assert out.shape == (1, 7, 7, shape[-1])
    feat = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    empty = roi_align_flat(feat, np.zeros([0, 4], np.float32), np.zeros([0], np.int32), 7, 0)
    assert empty.shape == (0, 7, 7, 4)
    fn = tf.function(lambda f, b: multilevel_roi_align(f, b, 7, 0),
                     input_signature=[{lv: tf.TensorSpec([1, None, None, 4], tf.float32)
                                       for lv in range(2, 6)},
                                      tf.TensorSpec([1, None, 4], tf.float32)])
    feats = {lv: tf.constant(rng.standard_normal((1, 64 >> lv, 64 >> lv, 4)), tf.float32)
             for lv in range(2, 6)}
    out = fn(feats, tf.constant([[[1.0, 1.0, 9.0, 9.0]]]))  # levels 3..5 get no RoI
    assert out.shape == (1, 1, 7, 7, 4) and np.abs(out.numpy()).max() > 0
