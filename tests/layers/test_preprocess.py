import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.layers.preprocess import Preprocessor, resized_sizes
from tests.layers.contract import check_layer_contract


def test_torchvision_sizes():
    # What torchvision 0.29's GeneralizedRCNNTransform(800, 1333) gives for these sizes.
    new, scale = resized_sizes(tf.constant([[480, 640], [427, 640], [500, 2000]]), "short_long",
                               800, 1333, 1024)
    np.testing.assert_array_equal(new.numpy(), [[800, 1066], [800, 1199], [333, 1333]])
    new, _ = resized_sizes(tf.constant([[480, 640], [640, 320]]), "square", 800, 1333, 1024)
    np.testing.assert_array_equal(new.numpy(), [[768, 1024], [1024, 512]])


def test_contract_square():
    x = np.random.default_rng(0).integers(0, 255, (2, 30, 40, 3)).astype(np.uint8)
    kw = dict(resize="square", square_size=64, size_divisibility=16, pixel_mean=(0.5, 0.5, 0.5),
              pixel_std=(0.25, 0.25, 0.25))
    _, out = check_layer_contract(Preprocessor, kw, (x,), non_default=tuple(kw),
                                  expected_shapes={"images": (2, 64, 64, 3),
                                                   "image_sizes": (2, 2), "resize_factors": (2, 2)})
    np.testing.assert_array_equal(out["image_sizes"].numpy(), [[48, 64], [48, 64]])
    np.testing.assert_allclose(out["resize_factors"].numpy(), [[48 / 30, 64 / 40]] * 2)
    assert (out["images"].numpy()[:, 48:] == 0).all()  # padding


def test_normalisation_and_identity_resize():
    x = np.random.default_rng(0).integers(0, 255, (1, 32, 64, 3)).astype(np.uint8)
    pre = Preprocessor(resize="square", square_size=64, size_divisibility=32)
    out = pre(x)["images"].numpy()
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    np.testing.assert_allclose(out[0, :32], (x[0] - mean) / std, rtol=1e-5, atol=1e-5)


def test_padded_batch_of_different_sizes():
    pre = Preprocessor(short_size=64, long_size=100, size_divisibility=32)
    batch = np.zeros((2, 60, 80, 3), np.uint8)
    batch[0, :30, :80] = 200
    batch[1, :60, :40] = 100
    out = pre(batch, np.array([[30, 80], [60, 40]]))
    # Image 0: min(64/30, 100/80) = 1.25 -> 37 x 100; image 1: min(64/40, 100/60) -> 96 x 64.
    np.testing.assert_array_equal(out["image_sizes"].numpy(), [[37, 100], [96, 64]])
    assert out["images"].shape == (2, 96, 128, 3)
    img0 = out["images"].numpy()[0]
    assert np.allclose(img0[:37, :100], img0[0, 0]) and (img0[37:] == 0).all()


def test_rejects_unknown_resize():
    with pytest.raises(ValueError, match="resize must be"):
        Preprocessor(resize="crop")
