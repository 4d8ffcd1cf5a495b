import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.layers.norm import FrozenBatchNormalization, make_norm
from tests.layers.contract import check_layer_contract


def test_contract_and_formula():
    layer, _ = check_layer_contract(FrozenBatchNormalization, {"epsilon": 1e-3},
                                    (np.ones((2, 3, 3, 4), np.float32),),
                                    expected_shapes=(2, 3, 3, 4), non_default=("epsilon",))
    layer.gamma.assign([1.0, 2.0, 3.0, 4.0])
    layer.beta.assign([0.0, 1.0, 0.0, 1.0])
    layer.moving_mean.assign([1.0, 0.0, 2.0, 0.0])
    layer.moving_variance.assign([1.0, 4.0, 1.0, 0.25])
    x = np.full((1, 1, 1, 4), 2.0, np.float32)
    expected = (2.0 - np.array([1, 0, 2, 0])) / np.sqrt(np.array([1, 4, 1, 0.25]) + 1e-3) * \
        np.array([1, 2, 3, 4]) + np.array([0, 1, 0, 1])
    np.testing.assert_allclose(layer(x).numpy().ravel(), expected, rtol=1e-6)
    # Frozen: nothing trainable, and training mode computes the same thing.
    assert not layer.trainable_weights
    np.testing.assert_allclose(layer(x, training=True).numpy(), layer(x).numpy())


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_frozen_bn_fused_kernel_is_the_formula_with_its_gradient(dtype, rtol):
    """On [B, H, W, C] the layer runs FusedBatchNormV3 (inference mode); it must equal
    x * scale + shift of torchvision's FrozenBatchNorm2d, and its gradient w.r.t. x must be
    dy * scale, in float32 and in bfloat16 (mixed precision); rank 2 takes the mul-add form."""
    rng = np.random.default_rng(3)
    c = 16
    layer = FrozenBatchNormalization(
        epsilon=1e-5, dtype="mixed_bfloat16" if dtype == "bfloat16" else "float32")
    layer.build((None, c))
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.1, 3, c)
    for w, v in zip((layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
                    (gamma, beta, mean, var)):
        w.assign(v.astype(np.float32))
    scale = gamma / np.sqrt(var + 1e-5)
    shift = beta - mean * scale
    for shape in ((2, 5, 7, c), (3, c)):
        x = rng.normal(size=shape).astype(np.float32) * 3
        dy = rng.normal(size=shape).astype(np.float32)
        xt = tf.cast(tf.constant(x), dtype)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        assert y.dtype == dtype
        x_seen = tf.cast(xt, tf.float32).numpy()
        np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), x_seen * scale + shift,
                                   rtol=rtol, atol=rtol * 10)
        grad = tf.cast(tape.gradient(loss, xt), tf.float32).numpy()
        np.testing.assert_allclose(grad, dy * scale, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("kind", ["frozen_bn", "bn", "sync_bn", "group_norm"])
def test_every_kind_normalises(kind):
    layer = make_norm(kind, "n", groups=2)
    out = layer(tf.random.normal([2, 4, 4, 8]) * 3 + 1, training=False)
    assert out.shape == (2, 4, 4, 8)


def test_none_and_unknown():
    assert make_norm("none", "n") is None
    with pytest.raises(ValueError, match="unknown normalisation 'layer'"):
        make_norm("layer", "n")


def test_fused_batch_norm_equals_keras_batch_norm():
    """Our BatchNormalization (fused kernel) computes what keras.layers.BatchNormalization does:
    outputs and gradients in training and inference, and the moving statistics (which differ
    only by Bessel's correction of the variance)."""
    import keras

    from mrcnn_tf.layers.norm import BatchNormalization

    x = tf.random.stateless_normal([2, 5, 6, 8], seed=[1, 2]) * 3.0 + 1.0
    ours = BatchNormalization(momentum=0.9, epsilon=1e-5)
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    ours.build(x.shape)
    ref.build(x.shape)
    for a, b in zip(ours.weights, ref.weights):
        a.assign(tf.random.stateless_uniform(a.shape, seed=[3, len(a.name)], minval=0.5,
                                             maxval=1.5))
        b.assign(a)
    for training in (False, True):  # inference first: training updates the moving statistics
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y_ours = ours(x, training=training)
            y_ref = ref(x, training=training)
            loss_ours = tf.reduce_sum(y_ours * tf.range(8.0))
            loss_ref = tf.reduce_sum(y_ref * tf.range(8.0))
        np.testing.assert_allclose(y_ours.numpy(), y_ref.numpy(), rtol=1e-4, atol=1e-4)
        for g_ours, g_ref in zip(tape.gradient(loss_ours, [x, ours.gamma, ours.beta]),
                                 tape.gradient(loss_ref, [x, ref.gamma, ref.beta])):
            np.testing.assert_allclose(g_ours.numpy(), g_ref.numpy(), rtol=1e-3, atol=1e-3)
    n = 2 * 5 * 6
    np.testing.assert_allclose(ours.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5)
    # moving_var = 0.9 * v0 + 0.1 * var_batch; ours uses var_batch * n / (n - 1).
    v0 = (ref.moving_variance.numpy() - 0.1 * tf.math.reduce_variance(x, [0, 1, 2]).numpy()) / 0.9
    expected = 0.9 * v0 + 0.1 * tf.math.reduce_variance(x, [0, 1, 2]).numpy() * n / (n - 1)
    np.testing.assert_allclose(ours.moving_variance.numpy(), expected, rtol=1e-4)
    # The fused layer round-trips through its config like any Keras layer.
    assert isinstance(BatchNormalization.from_config(ours.get_config()), BatchNormalization)


def _rows(seed: int, n: int = 6, c: int = 5):
    """[n, 3, 3, c] RoI-like rows, the padded ones (``valid`` False) full of large values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 3, c)).astype(np.float32) * 2 + 1
    valid = rng.random(n) < 0.6
    valid[0] = True
    x[~valid] = rng.normal(size=(int((~valid).sum()), 3, 3, c)) * 100 + 50
    return x, valid


@pytest.mark.parametrize("kind", ["bn", "sync_bn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_norm_over_valid_rows_is_batch_norm_of_those_rows(kind, seed):
    """Training with ``valid_rows``: the valid rows' outputs, every gradient and the moving
    statistics equal those of the same layer run on the valid rows alone (what torchvision's and
    detectron2's heads see: padded RoIs do not exist there); padded rows receive no gradient."""
    x, valid = _rows(seed)
    masked, alone = make_norm(kind, "a"), make_norm(kind, "b")
    for layer in (masked, alone):
        layer.build(x.shape)
    rng = np.random.default_rng(seed + 10)
    for a, b in zip(masked.weights, alone.weights):
        a.assign(rng.uniform(0.5, 1.5, a.shape).astype(np.float32))
        b.assign(a)
    var0 = masked.moving_variance.numpy().copy()
    weights = rng.normal(size=x.shape[1:]).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        y = masked(xt, training=True, valid_rows=tf.constant(valid))
        loss = tf.reduce_sum(tf.boolean_mask(y, valid) * weights)
        sub = tf.boolean_mask(xt, valid)
        y_alone = alone(sub, training=True)
        loss_alone = tf.reduce_sum(y_alone * weights)
    np.testing.assert_allclose(tf.boolean_mask(y, valid).numpy(), y_alone.numpy(),
                               rtol=1e-4, atol=1e-4)
    gx, gg, gb = tape.gradient(loss, [xt, masked.gamma, masked.beta])
    gx_alone, gg_alone, gb_alone = tape.gradient(loss_alone, [sub, alone.gamma, alone.beta])
    np.testing.assert_allclose(gx.numpy()[valid], gx_alone.numpy(), rtol=1e-3, atol=1e-4)
    assert not gx.numpy()[~valid].any()
    np.testing.assert_allclose(gg.numpy(), gg_alone.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gb.numpy(), gb_alone.numpy(), rtol=1e-4)
    np.testing.assert_allclose(masked.moving_mean.numpy(), alone.moving_mean.numpy(), rtol=1e-5)
    # The moving variance takes the unbiased batch variance, as PyTorch's BatchNorm2d does.
    v = x[valid].reshape(-1, x.shape[-1]).var(0, ddof=1)
    np.testing.assert_allclose(masked.moving_variance.numpy(), 0.9 * var0 + 0.1 * v, rtol=1e-4)


def test_batch_norm_without_a_valid_row_keeps_its_statistics_and_stays_finite():
    x, _ = _rows(3)
    layer = make_norm("bn", "n")
    layer.build(x.shape)
    mean, var = layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True, valid_rows=tf.zeros([len(x)], tf.bool))
        loss = tf.reduce_sum(y * 0.0)
    assert np.isfinite(y.numpy()).all() and np.isfinite(tape.gradient(loss, xt).numpy()).all()
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), var)


_REPLICAS = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mrcnn_tf.layers.norm import masked_moments
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
rng = np.random.default_rng(0)
scale, shift = np.array([1.0, 3.0]), np.array([0.0, 2.0])
x = rng.normal(size=(2, 5, 3, 3, 4)).astype(np.float32) * scale[:, None, None, None, None]
x += shift[:, None, None, None, None]
valid = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)
out = {}
for sync in (True, False):
    def step(ctx_x, ctx_v):
        return masked_moments(ctx_x, ctx_v, synchronized=sync)
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: (tf.constant(x[ctx.replica_id_in_sync_group]),
                     tf.constant(valid[ctx.replica_id_in_sync_group])))
    res = strategy.run(step, args=values)
    out[str(sync)] = [[r.numpy().tolist() for r in strategy.experimental_local_results(v)]
                      for v in res]
json.dump(out, sys.stdout)
"""


@pytest.mark.slow
def test_masked_statistics_span_the_replicas_with_sync_bn_and_not_with_bn():
    """Under MirroredStrategy on two replicas: sync_bn's statistics are those of the valid rows
    of both replicas together (SyncBatchNorm), bn's those of each replica's own valid rows."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _REPLICAS], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 3, 4)).astype(np.float32) * np.array([1.0, 3.0])[:, None, None,
                                                                         None, None]
    x += np.array([0.0, 2.0])[:, None, None, None, None]
    valid = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)
    union = np.concatenate([x[0][valid[0]], x[1][valid[1]]]).reshape(-1, 4)
    for replica in range(2):
        mean, var, count = (np.array(v[replica]) for v in out["True"])
        np.testing.assert_allclose(mean, union.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, union.var(0), rtol=1e-4)
        assert count == len(union)
        own = x[replica][valid[replica]].reshape(-1, 4)
        mean, var, count = (np.array(v[replica]) for v in out["False"])
        np.testing.assert_allclose(mean, own.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, own.var(0), rtol=1e-4)
        assert count == len(own)
