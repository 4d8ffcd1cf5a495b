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


@pytest.mark.parametrize("kind", ["frozen_bn", "bn", "sync_bn", "group_norm"])
def test_every_kind_normalises(kind):
    layer = make_norm(kind, "n", groups=2)
    out = layer(tf.random.normal([2, 4, 4, 8]) * 3 + 1, training=False)
    assert out.shape == (2, 4, 4, 8)


def test_none_and_unknown():
    assert make_norm("none", "n") is None
    with pytest.raises(ValueError, match="unknown normalisation 'layer'"):
        make_norm("layer", "n")
