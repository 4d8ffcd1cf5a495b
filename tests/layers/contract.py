"""One shared contract every layer test runs: the checks each Keras layer of the package must
pass whatever it computes."""

import keras
import numpy as np
import tensorflow as tf


def _to_input(x):
    x = tf.convert_to_tensor(x)
    return keras.Input(batch_shape=tuple(x.shape), dtype=x.dtype.name)


def _shapes(tree):
    return keras.tree.map_structure(lambda t: tuple(t.shape), tree)


def check_layer_contract(cls, kwargs: dict, args: tuple, expected_shapes=None, call_kwargs=None,
                         non_default: tuple = ()):
    """Checks a layer class against the contract.

    1. get_config round trip: ``cls.from_config(layer.get_config())`` has the same config, and
       each key of ``non_default`` carries the non-default value given in ``kwargs``.
    2. Eager call: output shapes equal ``expected_shapes`` (a structure of tuples), if given.
    3. Symbolic call on ``keras.Input``s: same structure and shapes as the eager call.
    4. The clone, given the layer's weights, computes the same outputs.
    Returns the layer and its eager outputs.
    """
    call_kwargs = call_kwargs or {}
    layer = cls(**kwargs)
    config = layer.get_config()
    for key in non_default:
        value = config[key]
        want = kwargs[key]
        if isinstance(want, tuple):
            want = list(want)
        assert value == want, (key, value, want)
    clone = cls.from_config(config)
    assert clone.get_config() == config

    out = layer(*args, **call_kwargs)
    shapes = _shapes(out)
    if expected_shapes is not None:
        assert shapes == expected_shapes, (shapes, expected_shapes)

    sym_args = keras.tree.map_structure(_to_input, args)
    sym_out = cls.from_config(config)(*sym_args, **call_kwargs)
    flat_sym = [tuple(t.shape) for t in keras.tree.flatten(sym_out)]
    flat_eager = [tuple(t.shape) for t in keras.tree.flatten(out)]
    assert len(flat_sym) == len(flat_eager)
    for s, e in zip(flat_sym, flat_eager):
        assert len(s) == len(e) and all(a is None or a == b for a, b in zip(s, e)), (s, e)

    clone(*args, **call_kwargs)
    clone.set_weights(layer.get_weights())
    again = clone(*args, **call_kwargs)
    for a, b in zip(keras.tree.flatten(out), keras.tree.flatten(again)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    return layer, out


def rand(*shape, seed=0):
    """Uniform [0, 1) float32 array of the given shape, reproducible."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)
