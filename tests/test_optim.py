"""The optimiser and schedule against their definitions (torch.optim.SGD, LinearLR warmup)."""

import keras
import numpy as np
import pytest

from mrcnn_tf.optim import SGD, WarmupStepDecay, decays


def _torch_sgd(w0, grads, lrs, momentum, wd, decayed):
    """torch.optim.SGD (dampening 0, not nesterov) written out in numpy."""
    w, buf = w0.astype(np.float64), None
    for g, lr in zip(grads, lrs):
        d = g + (wd * w if decayed else 0.0)
        buf = d if buf is None else momentum * buf + d
        w = w - lr * buf
    return w


@pytest.mark.parametrize("decayed_name", ["kernel", "bias"])
def test_sgd_is_torch_sgd_through_warmup(decayed_name):
    """Three steps while the warmup raises the learning rate: our SGD follows torch's update
    (the whole momentum buffer scaled by the current lr); Keras' SGD, whose velocity keeps the
    old learning rates, does not."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    schedule = WarmupStepDecay(0.02, warmup_steps=4, warmup_factor=0.001)
    lrs = [float(schedule(k)) for k in range(3)]
    assert lrs[2] > 100 * lrs[0]
    results = {}
    for name, opt in (("ours", SGD(schedule, momentum=0.9, weight_decay=0.1,
                                   weight_decay_params="kernels")),
                      ("keras", keras.optimizers.SGD(schedule, momentum=0.9))):
        var = keras.Variable(w0, name=decayed_name)
        for g in grads:
            opt.apply_gradients([(g, var)])
        results[name] = var.numpy()
    expected = _torch_sgd(w0, grads, lrs, 0.9, 0.1, decayed=decayed_name == "kernel")
    np.testing.assert_allclose(results["ours"], expected, rtol=1e-6, atol=1e-9)
    keras_expected = _torch_sgd(w0, grads, lrs, 0.9, 0.0, decayed=False)
    assert np.abs(results["keras"] - keras_expected).max() > 1e-6  # the formulations differ


def test_weight_decay_params_select_by_variable():
    paths = {"backbone/res3_0/conv1/kernel": (True, True, True),
             "box_head/fc1/bias": (True, True, False),
             "backbone/res3_0/norm1/gamma": (True, False, False),
             "fpn/norm/beta": (True, False, False),
             "mask_head/deconv/kernel": (True, True, True)}
    for path, expected in paths.items():
        got = tuple(decays(path, p) for p in ("all", "no_norm", "kernels"))
        assert got == expected, path


def test_sgd_rejects_unknown_decay_selection():
    with pytest.raises(ValueError, match="weight_decay_params"):
        SGD(0.1, weight_decay_params="norms")


def test_schedule_matches_torchvision_linear_lr_warmup():
    # references/detection: LinearLR(start_factor=1/1000, total_iters=1000) stepped after each
    # iteration: factor(k) = 1/1000 + (1 - 1/1000) * k / 1000, then 1.
    s = WarmupStepDecay(0.02, 1000, 0.001)
    for k in (0, 1, 2, 500, 999, 1000, 5000):
        factor = 0.001 + 0.999 * min(k, 1000) / 1000
        assert float(s(k)) == pytest.approx(0.02 * factor, rel=1e-6)


def test_sgd_update_is_one_fused_kernel_per_variable_in_a_graph():
    """Inside a traced step the update is ResourceApplyMomentum (1 op per variable, not ~7),
    with the same numbers as torch.optim.SGD."""
    import tensorflow as tf

    w0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    g = np.full((2, 3), 0.5, np.float32)
    opt = SGD(0.1, momentum=0.9, weight_decay=0.01)
    var = keras.Variable(w0, name="kernel")
    step = tf.function(lambda g: opt.apply_gradients([(g, var)]), autograph=False)
    for _ in range(2):
        step(tf.constant(g))
    graph = step.get_concrete_function(tf.TensorSpec((2, 3))).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("ResourceApplyMomentum") == 1
    assert "AssignSubVariableOp" not in types
    np.testing.assert_allclose(var.numpy(), _torch_sgd(w0, [g, g], [0.1, 0.1], 0.9, 0.01, True),
                               rtol=1e-6)
