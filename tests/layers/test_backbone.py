import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.layers.backbone import Bottleneck, ResNet, load_keras_applications_resnet50
from tests.layers.contract import check_layer_contract, rand

SMALL_SHAPES = {"c2": (2, 16, 16, 64), "c3": (2, 8, 8, 128), "c4": (2, 4, 4, 256),
                "c5": (2, 2, 2, 512)}


def test_contract_small_with_non_default_options():
    kwargs = dict(name_or_depth="resnet_small", norm="group_norm", stride_in_1x1=True,
                  freeze_at=3, input_channels=4, group_norm_groups=4)
    check_layer_contract(ResNet, kwargs, (rand(2, 64, 64, 4),),
                         expected_shapes=SMALL_SHAPES,
                         non_default=("name_or_depth", "norm", "stride_in_1x1", "freeze_at",
                                      "input_channels", "group_norm_groups"))


def test_bottleneck_contract():
    check_layer_contract(Bottleneck, dict(filters=8, stride=2, stride_in_1x1=True, norm="bn",
                                          project=True),
                         (rand(1, 9, 9, 16),),
                         expected_shapes=(1, 5, 5, 32),
                         non_default=("filters", "stride", "stride_in_1x1", "norm", "project"))


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "sync_bn", "group_norm"])
def test_norm_options_run(norm):
    net = ResNet("resnet_small", norm=norm, freeze_at=0, group_norm_groups=8)
    out = net(tf.random.normal([1, 64, 64, 3]), training=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (1,) + s[1:] for k, s in SMALL_SHAPES.items()}


@pytest.mark.parametrize("channels", [1, 4, 7])
def test_input_channels(channels):
    net = ResNet("resnet_small", input_channels=channels)
    net(tf.zeros([1, 32, 32, channels]))
    assert net.stem_conv.kernel.shape == (7, 7, channels, 16)


def test_wrong_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="images have 3 channels but the backbone was configured "
                                         "with input_channels=1"):
        ResNet("resnet_small", input_channels=1)(tf.zeros([1, 32, 32, 3]))


def test_stride_placement():
    a = ResNet("resnet_small", stride_in_1x1=True)
    b = ResNet("resnet_small", stride_in_1x1=False)
    for net in (a, b):
        net(tf.zeros([1, 64, 64, 3]))
    assert a.stages[1][0].conv1.strides == (2, 2) and a.stages[1][0].conv2.strides == (1, 1)
    assert b.stages[1][0].conv1.strides == (1, 1) and b.stages[1][0].conv2.strides == (2, 2)


@pytest.mark.parametrize("freeze_at,trainable_stages", [(0, 4), (1, 4), (2, 3), (5, 0)])
def test_freeze_at(freeze_at, trainable_stages):
    net = ResNet("resnet_small", norm="bn", freeze_at=freeze_at)
    net(tf.zeros([1, 64, 64, 3]))
    assert bool(net.stem_conv.trainable_weights) == (freeze_at == 0)
    trainable = [any(b.trainable_weights for b in stage) for stage in net.stages]
    assert trainable == [False] * (4 - trainable_stages) + [True] * trainable_stages


def test_resnet50_and_101_depths():
    r50 = ResNet("resnet50")
    r101 = ResNet("resnet101")
    assert [len(s) for s in r50.stages] == [3, 4, 6, 3]
    assert [len(s) for s in r101.stages] == [3, 4, 23, 3]
    assert r50.out_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}


def test_symmetric_padding_of_strided_convs():
    # An impulse in the bottom-right corner of a 64x64 image: with PyTorch-style symmetric
    # padding the stem conv's output at (31, 31) sees it through kernel tap (4, 4); Keras
    # "same" padding would use tap (3, 3) instead (it pads 2 before and 3 after).
    net = ResNet("resnet_small", freeze_at=0)
    net(tf.zeros([1, 64, 64, 3]))
    k = np.zeros((7, 7, 3, 16), np.float32)
    k[4, 4, 0, 0] = 1.0
    net.stem_conv.kernel.assign(k)
    img = np.zeros((1, 64, 64, 3), np.float32)
    img[0, 63, 63, 0] = 1.0
    out = net.stem_conv(tf.pad(img, [[0, 0], [3, 3], [3, 3], [0, 0]])).numpy()
    assert out[0, 31, 31, 0] == 1.0


def test_loads_keras_applications_weights(tmp_path):
    ref = keras.applications.ResNet50(include_top=False, weights=None,
                                      input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in ref.layers:  # non-trivial BN statistics and conv biases
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                               rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 2.0, v.shape)])
        elif isinstance(layer, keras.layers.Conv2D):
            w, bias = layer.get_weights()
            layer.set_weights([w, rng.normal(0, 0.1, bias.shape)])
    path = str(tmp_path / "resnet50.weights.h5")
    ref.save_weights(path)
    net = ResNet("resnet50", stride_in_1x1=True)
    load_keras_applications_resnet50(net, path)
    x = rng.normal(0, 1, (1, 64, 96, 3)).astype(np.float32)
    ours = net(x)
    probe = keras.Model(ref.input, [ref.get_layer(f"conv{s}_block{n}_out").output
                                    for s, n in ((2, 3), (3, 4), (4, 6), (5, 3))])
    theirs = probe(x)
    for key, t in zip(("c2", "c3", "c4", "c5"), theirs):
        t = np.asarray(t)
        np.testing.assert_allclose(ours[key].numpy(), t, atol=1e-4 * max(1.0, np.abs(t).max()))


def test_keras_applications_weights_need_stride_in_1x1(tmp_path):
    with pytest.raises(ValueError, match="stride_in_1x1=true"):
        load_keras_applications_resnet50(ResNet("resnet50"), str(tmp_path / "x.h5"))
    with pytest.raises(ValueError, match="not a Keras Applications ResNet-50 weights file"):
        bad = tmp_path / "bad.h5"
        bad.write_bytes(b"not hdf5")
        load_keras_applications_resnet50(ResNet("resnet50", stride_in_1x1=True), str(bad))
