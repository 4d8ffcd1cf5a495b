import keras
import numpy as np
import pytest
import tensorflow as tf

import mrcnn_tf
from mrcnn_tf.layers.norm import FrozenBatchNormalization
from tests.conftest import REPO

SHAPES = str(REPO / "configs" / "shapes.yaml")
COCO = str(REPO / "configs" / "coco_r50_fpn_1x.yaml")
# Random weights give scores near 1 / (num_classes + 1); a zero threshold keeps detections.
TINY = ["model.detection.score_threshold=0.0"]


@pytest.fixture(scope="module")
def shapes_model():
    return mrcnn_tf.build_model(mrcnn_tf.load_config(SHAPES, TINY))


def _check_outputs(out, batch, d):
    assert set(out) == {"detection_boxes", "detection_scores", "detection_classes",
                        "detection_masks", "num_detections"}
    assert out["detection_boxes"].shape == (batch, d, 4)
    assert out["detection_scores"].shape == (batch, d)
    assert out["detection_classes"].shape == (batch, d)
    assert out["detection_masks"].shape == (batch, d, 28, 28)
    assert out["num_detections"].shape == (batch,)
    assert out["detection_classes"].dtype == tf.int32
    assert out["num_detections"].dtype == tf.int32
    for k in ("detection_boxes", "detection_scores", "detection_masks"):
        assert out[k].dtype == tf.float32
        assert np.isfinite(out[k].numpy()).all(), k
    num = out["num_detections"].numpy()
    for b in range(batch):
        n = num[b]
        assert (out["detection_boxes"].numpy()[b, n:] == 0).all()
        assert (out["detection_scores"].numpy()[b, n:] == 0).all()
        assert (out["detection_classes"].numpy()[b, n:] == 0).all()
        assert (out["detection_masks"].numpy()[b, n:] == 0).all()
        cls = out["detection_classes"].numpy()[b, :n]
        assert ((cls >= 1) & (cls <= 3)).all()


def test_shapes_model_outputs(shapes_model):
    images = np.random.default_rng(0).integers(0, 255, (2, 100, 150, 3)).astype(np.uint8)
    out = shapes_model(images)
    _check_outputs(out, 2, 20)
    assert out["num_detections"].numpy().min() > 0
    boxes = out["detection_boxes"].numpy()
    assert boxes[..., 2].max() <= 100 and boxes[..., 3].max() <= 150  # the images as given
    masks = out["detection_masks"].numpy()
    assert masks.min() >= 0 and masks.max() <= 1


def test_float_input_equals_uint8(shapes_model):
    images = np.random.default_rng(1).integers(0, 255, (1, 64, 64, 3)).astype(np.uint8)
    a = shapes_model(images)
    b = shapes_model(images.astype(np.float32))
    np.testing.assert_allclose(a["detection_scores"], b["detection_scores"], atol=1e-6)


def test_batch_of_two_sizes(shapes_model):
    rng = np.random.default_rng(2)
    batch = np.zeros((2, 120, 160, 3), np.uint8)
    batch[0, :60, :160] = rng.integers(0, 255, (60, 160, 3))
    batch[1, :120, :90] = rng.integers(0, 255, (120, 90, 3))
    out = shapes_model({"images": batch, "image_sizes": np.array([[60, 160], [120, 90]])})
    _check_outputs(out, 2, 20)
    boxes = out["detection_boxes"].numpy()
    assert boxes[0, :, 2].max() <= 60 and boxes[0, :, 3].max() <= 160
    assert boxes[1, :, 2].max() <= 120 and boxes[1, :, 3].max() <= 90
    # Each image alone gives the same detections as in the batch (square resize: same canvas).
    alone = shapes_model(batch[1:2, :120, :90])
    np.testing.assert_allclose(alone["detection_scores"].numpy()[0],
                               out["detection_scores"].numpy()[1], atol=1e-5)
    np.testing.assert_allclose(alone["detection_boxes"].numpy()[0], boxes[1], atol=1e-3)


def test_all_black_image(shapes_model):
    out = shapes_model(np.zeros((1, 128, 128, 3), np.uint8))
    _check_outputs(out, 1, 20)


def test_graph_mode_equals_eager(shapes_model):
    images = np.random.default_rng(3).integers(0, 255, (1, 96, 128, 3)).astype(np.uint8)
    eager = shapes_model(images)
    graph = tf.function(lambda x: shapes_model(x))(images)
    for k in eager:
        # Boxes are ~100 px: a few float32 ulps (seen: 1.5e-5 at 49 px) are rounding, not a bug.
        np.testing.assert_allclose(eager[k].numpy(), graph[k].numpy(), rtol=1e-6, atol=1e-5)


def test_keras_save_and_weights_round_trip(shapes_model, tmp_path):
    images = np.random.default_rng(4).integers(0, 255, (1, 128, 128, 3)).astype(np.uint8)
    ref = shapes_model(images)
    path = str(tmp_path / "m.keras")
    shapes_model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, mrcnn_tf.MaskRCNN) and loaded.config == shapes_model.config
    out = loaded(images)
    for k in ref:
        np.testing.assert_array_equal(ref[k].numpy(), out[k].numpy())
    wpath = str(tmp_path / "m.weights.h5")
    shapes_model.save_weights(wpath)
    other = mrcnn_tf.build_model(shapes_model.config)
    other.load_weights(wpath)
    out = other(images)
    for k in ref:
        np.testing.assert_array_equal(ref[k].numpy(), out[k].numpy())


def test_variable_names_are_unique(shapes_model):
    # TF1-style SavedModel loaders (TF Serving, saved_model_cli run) address variables by name.
    names = [v.value.name for v in shapes_model.weights]
    assert len(set(names)) == len(names)


def test_tf_checkpoint_restores_every_weight(shapes_model, tmp_path):
    from mrcnn_tf.checkpoint import make_checkpoint, restore

    path = make_checkpoint(shapes_model).save(str(tmp_path / "ckpt"))
    other = mrcnn_tf.build_model(shapes_model.config)
    restore(other, path)
    assert len(other.weights) == len(shapes_model.weights)
    for a, b in zip(shapes_model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_training_checkpoint_restores_whatever_the_optimizer_is_named(shapes_model, tmp_path):
    """Keras names optimisers sgd, sgd_1, ... by creation order in the process; a checkpoint
    written with one must restore into another."""
    from mrcnn_tf.checkpoint import make_checkpoint, restore

    first = mrcnn_tf.build_model(shapes_model.config)
    first.compile()
    first.optimizer.iterations.assign(7)
    path = make_checkpoint(first, first.optimizer).save(str(tmp_path / "ckpt"))
    second = mrcnn_tf.build_model(shapes_model.config)
    second.compile()
    assert second.optimizer.variables[0].path.split("/")[0] != \
        first.optimizer.variables[0].path.split("/")[0]
    restore(second, path, second.optimizer)
    assert int(second.optimizer.iterations.numpy()) == 7
    # Checkpoints written before (keys with the optimiser's name, "sgd" in a fresh process)
    # still resume.
    old = mrcnn_tf.build_model(shapes_model.config)
    old.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, name="sgd"))
    old.optimizer.iterations.assign(5)
    legacy = make_checkpoint(old, old.optimizer, legacy_optimizer_keys=True).save(
        str(tmp_path / "legacy"))
    third = mrcnn_tf.build_model(shapes_model.config)
    third.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, name="sgd"))
    restore(third, legacy, third.optimizer)
    assert int(third.optimizer.iterations.numpy()) == 5
    # Into today's optimiser (torch's momentum buffer, not Keras' -lr * buffer): weights and
    # step carry over, the momentum restarts from zero.
    fourth = mrcnn_tf.build_model(shapes_model.config)
    fourth.compile()
    for v in fourth.optimizer.momentum_buffers:
        v.assign(tf.ones_like(v))
    restore(fourth, legacy, fourth.optimizer)
    assert int(fourth.optimizer.iterations.numpy()) == 5
    assert all(not v.numpy().any() for v in fourth.optimizer.momentum_buffers)
    for a, b in zip(old.weights, fourth.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_handles_freeze_and_new_num_classes(shapes_model):
    model = mrcnn_tf.build_model(shapes_model.config)
    model.set_weights(shapes_model.get_weights())
    n_all = len(model.trainable_weights)
    n_backbone = len(model.backbone.trainable_weights)
    assert n_backbone > 0
    model.backbone.trainable = False
    assert len(model.trainable_weights) == n_all - n_backbone
    new = mrcnn_tf.with_num_classes(model, 7)
    assert new.config.model.num_classes == 7 and not new.backbone.trainable
    old_w = {w.path.split("/", 1)[1]: w.numpy() for w in model.weights}
    changed = []
    for w in new.weights:
        p = w.path.split("/", 1)[1]
        if old_w[p].shape != tuple(w.shape) or not np.array_equal(old_w[p], w.numpy()):
            changed.append(p)
    assert sorted({p.rsplit("/", 1)[0] for p in changed}) == [
        "box_head/box_deltas", "box_head/class_logits", "mask_head/mask_logits"]
    out = new(np.zeros((1, 64, 64, 3), np.uint8))
    assert out["detection_masks"].shape == (1, 20, 28, 28)


@pytest.mark.parametrize("override", [
    "model.rpn.conv_channels=96",                 # the design notes: 512 channels
    "model.rpn.share_heads=false",
    "model.rpn.dropout=0.3",
    "model.rpn.objectness=softmax",              # the design notes: 2k two-way softmax
    "model.roi_align.box_output_size=14",        # the design notes: 14x14 box RoIs
    "model.roi_align.level_sampling_ratios=[1, 2, 3, 4]",
    "model.box_head.dropout=0.3",
    "model.box_head.type=4conv1fc",
    "model.box_head.class_agnostic=true",
    "model.mask_head.class_agnostic=true",
    "model.mask_head.norm=group_norm",
    "model.backbone.norm=frozen_bn",
    "model.rpn.nms_per_level=false",
    "model.preprocess.resize=short_long",
])
def test_design_note_options_build_and_run(override):
    extra = ["model.backbone.group_norm_groups=8"] if "group_norm" in override else []
    cfg = mrcnn_tf.load_config(SHAPES, TINY + [override] + extra)
    model = mrcnn_tf.build_model(cfg)
    out = model(np.random.default_rng(5).integers(0, 255, (1, 96, 96, 3)).astype(np.uint8))
    _check_outputs(out, 1, 20)


def test_paste_masks_full_size(shapes_model):
    out = shapes_model(np.random.default_rng(6).integers(0, 255, (1, 90, 70, 3)).astype(np.uint8))
    full = mrcnn_tf.paste_masks(out["detection_masks"], out["detection_boxes"], 90, 70)
    assert full.shape == (1, 20, 90, 70) and full.dtype == tf.uint8


def _frozen_bn_count(model):
    return sum(int(np.prod(w.shape)) for layer in model._flatten_layers()
               if isinstance(layer, FrozenBatchNormalization) for w in layer.weights)


def test_r50_fpn_builds_and_matches_torchvision_parameter_count():
    # torchvision's maskrcnn_resnet50_fpn (91 class logits) has 44,401,393 parameters, its
    # FrozenBatchNorm statistics and affine terms being buffers. With num_classes=90 (91 logits)
    # ours must count the same once the frozen-BN weights are set aside.
    cfg = mrcnn_tf.load_config(COCO, ["model.num_classes=90", "model.preprocess.short_size=64",
                                      "model.preprocess.long_size=64",
                                      "data.train_short_sizes=null"])
    model = mrcnn_tf.build_model(cfg)
    total = model.count_params()
    frozen_bn = _frozen_bn_count(model)
    print(f"R50-FPN, 91 logits: {total:,} weights = {total - frozen_bn:,} parameters + "
          f"{frozen_bn:,} frozen-BN values")
    assert total - frozen_bn == 44_401_393
    out = model(np.zeros((1, 64, 64, 3), np.uint8))
    assert out["detection_boxes"].shape == (1, 100, 4)


def test_summary_lists_every_part_with_its_parameters(shapes_model):
    lines = []
    shapes_model.summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    for layer in shapes_model.layers:
        assert layer.name in text
        if layer.count_params():
            assert f"{layer.count_params():,}" in text, layer.name
    assert f"Total params: {shapes_model.count_params():,}" in text
    # compute_output_shape on every part, from the shapes Keras recorded when it was built.
    for layer in shapes_model.layers:
        assert layer.compute_output_shape(**layer._build_shapes_dict) is not None, layer.name


@pytest.mark.slow
def test_keras_file_resumes_training_at_its_step(tmp_path):
    """A .keras file keeps the compile config and the optimiser state: loaded, it continues at
    the saved step with the same learning rate and momentum."""
    from mrcnn_tf.data import build_dataset

    cfg = mrcnn_tf.load_config(SHAPES, ["train.batch_size=2", "data.train.num_images=8",
                                        "train.warmup_steps=10"])
    model = mrcnn_tf.build_model(cfg)
    model.compile()
    model.fit(build_dataset(cfg, True), steps_per_epoch=3, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert int(loaded.optimizer.iterations.numpy()) == 3
    assert float(loaded.optimizer.learning_rate) == pytest.approx(
        float(model.optimizer.learning_rate))
    for a, b in zip(model.optimizer.momentum_buffers, loaded.optimizer.momentum_buffers):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(b.numpy().any() for b in loaded.optimizer.momentum_buffers)
    loaded.fit(build_dataset(cfg, True), steps_per_epoch=1, epochs=1, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 4


@pytest.mark.slow
def test_keras_export_needs_no_arguments_and_serves_like_our_signature(shapes_model, tmp_path):
    from mrcnn_tf.serving import export_saved_model

    shapes_model.export(str(tmp_path / "keras_export"))
    export_saved_model(shapes_model, [1, 2, 3], ["a", "b", "c"], str(tmp_path / "ours"),
                       ("image_tensor",))
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (1, 100, 140, 3), np.uint8))
    keras_loaded = tf.saved_model.load(str(tmp_path / "keras_export"))
    ours_loaded = tf.saved_model.load(str(tmp_path / "ours"))
    keras_out = keras_loaded.serve(image)
    ours = ours_loaded.signatures["image_tensor"](images=image)
    n = int(ours["num_detections"][0])
    assert int(keras_out["num_detections"][0]) == n > 0
    np.testing.assert_allclose(keras_out["detection_boxes"][0, :n], ours["detection_boxes"][0, :n],
                               atol=1e-3)
    np.testing.assert_allclose(keras_out["detection_scores"][0, :n],
                               ours["detection_scores"][0, :n], atol=1e-5)
    np.testing.assert_array_equal(keras_out["detection_classes"][0, :n],
                                  ours["detection_classes"][0, :n])
