"""torchvision weight conversion: parity with torchvision's own outputs, and clear errors.

The references (tests/fixtures/torchvision_maskrcnn_small.npz for v1,
torchvision_v2_maskrcnn_small.npz for v2) were written by
``tests/scripts/torchvision_parity.py reference --small [--v2]`` in a torch venv: a reduced-width
torchvision Mask R-CNN with seeded random weights, its state dict and each stage's outputs on a
real COCO image. These tests need no torch.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from mrcnn_tf.config import load_config
from mrcnn_tf.model import build_model
from mrcnn_tf.weights import (
    CAFFE_MEAN_RGB,
    CAFFE_STD,
    WeightsError,
    load_backbone_weights,
    load_torchvision,
    read_state_dict,
)
from tests.conftest import REPO
from tests.parity import torchvision_inference as tp

FIXTURE = REPO / "tests" / "fixtures" / "torchvision_maskrcnn_small.npz"
FIXTURES = {"v1": FIXTURE, "v2": tp.SMALL_FIXTURE_V2}


def _state(version):
    with np.load(FIXTURES[version]) as f:
        return {k[3:]: f[k] for k in f.files if k.startswith("sd/")}


@pytest.fixture(scope="module")
def state():
    return _state("v1")


@pytest.fixture(scope="module")
def state_v2():
    return _state("v2")


@pytest.fixture(scope="module")
def state_npz(state, tmp_path_factory):
    """The fixture's state dict as an .npz file, as a user without torch would pass it."""
    path = tmp_path_factory.mktemp("torchvision") / "small.npz"
    np.savez(path, **state)
    return path


@pytest.fixture(scope="module")
def small_model():
    return build_model(tp.our_config(small=True))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_small_model_equals_torchvision_stage_by_stage(version):
    r = tp.check(str(FIXTURES[version]))
    print(json.dumps(r, indent=1))
    assert r["resized_size_equal"] and r["input_max_abs_diff"] < 1e-4
    for lv in range(2, 6):
        assert r[f"c{lv}_rel_diff"] <= 1e-4, lv
    for lv in range(2, 7):
        assert r[f"p{lv}_rel_diff"] <= 1e-4, lv
    assert r["proposals"][0] == r["proposals"][1] > 100
    assert r["proposals_matched_1e-3px"] >= 0.99
    assert r["class_logits_max_abs_diff"] <= 1e-4
    assert r["box_deltas_max_abs_diff"] <= 1e-4
    assert r["detections"] == [100, 100]
    assert r["detections_matched"] == 1.0
    assert r["det_score_max_abs_diff"] <= 1e-4
    assert r["mask_iou_min"] >= 0.99 and r["mask_pixels_differing_not_ties"] == 0
    assert tp.passes(r)


def _old_names(state):
    """The key names of checkpoints written before torchvision 0.13 (the COCO release)."""
    out = {}
    for k, v in state.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k = k.replace(f"fpn.{block}.{i}.0.", f"fpn.{block}.{i}.")
        for i in range(4):
            k = k.replace(f"mask_head.{i}.0.", f"mask_head.mask_fcn{i + 1}.")
        out[k] = v
    return out


def test_old_key_names_and_wrappers_load_the_same_weights(state, small_model, tmp_path):
    load_torchvision(small_model, state)
    expected = [v.numpy().copy() for v in small_model.weights]
    old = _old_names(state)
    assert "rpn.head.conv.weight" in old and "roi_heads.mask_head.mask_fcn1.weight" in old
    path = tmp_path / "old.npz"
    np.savez(path, **{"module." + k: v for k, v in old.items()})
    other = build_model(tp.our_config(small=True))
    assert load_torchvision(other, str(path)) == len(state)
    for a, b in zip(expected, other.weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert set(read_state_dict({"model": old})) == set(state)


def test_missing_and_unexpected_keys_are_named_and_nothing_is_assigned(state, small_model):
    before = [v.numpy().copy() for v in small_model.weights]
    broken = dict(state)
    del broken["roi_heads.box_head.fc6.bias"]
    broken["roi_heads.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match=r"fc6\.bias.*roi_heads\.extra\.weight"):
        load_torchvision(small_model, broken)
    for a, b in zip(before, small_model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_wrong_class_count_names_the_layer_and_the_fix(state):
    model = build_model(_with(tp.our_config(small=True), num_classes=80))
    with pytest.raises(WeightsError, match=r"cls_score\.weight.*\(91, 64\).*num_classes=90"):
        load_torchvision(model, state)


def _with(config, **model_fields):
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **model_fields))


def test_other_architectures_are_refused_with_the_reason(state):
    import dataclasses

    cfg = tp.our_config(small=True)
    cfg = _with(cfg, backbone=dataclasses.replace(cfg.model.backbone, stride_in_1x1=True))
    with pytest.raises(WeightsError, match="stride_in_1x1 must be false"):
        load_torchvision(build_model(cfg), state)


def test_a_state_dict_of_the_other_family_is_refused_with_the_keys_named(state, state_v2):
    v2_model = build_model(tp.our_config(small=True, v2=True))
    before = [v.numpy().copy() for v in v2_model.weights]
    with pytest.raises(WeightsError, match=r"the state dict is torchvision v1 \(it has "
                       r"roi_heads\.box_head\.fc6\.weight\) but the model is v2.*"
                       r"torchvision_r50_fpn\.yaml"):
        load_torchvision(v2_model, state)
    for a, b in zip(before, v2_model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    with pytest.raises(WeightsError, match=r"is torchvision v2 \(it has roi_heads\.box_head\.0\.0"
                       r"\.weight\) but the model is v1.*torchvision_r50_fpn_v2\.yaml"):
        load_torchvision(build_model(tp.our_config(small=True)), state_v2)
    # Keys of neither family (here v2 without its fc) are listed key by key.
    partial = {k: v for k, v in state_v2.items() if not k.startswith("roi_heads.box_head.")}
    with pytest.raises(WeightsError, match=r"missing from the state dict: .*box_head\.0\.0\."):
        load_torchvision(v2_model, partial)


def test_v2_with_a_v1_head_is_named_as_neither_family(state_v2):
    cfg = tp.our_config(small=True, v2=True)
    cfg = _with(cfg, rpn=dataclasses.replace(cfg.model.rpn, num_convs=3))
    with pytest.raises(WeightsError, match="model.rpn.num_convs must be 2"):
        load_torchvision(build_model(cfg), state_v2)


def test_convert_finds_the_family_and_the_architecture_from_the_keys(state, state_v2):
    from mrcnn_tf.tools.convert import inspect

    v1, v2 = inspect(state), inspect(state_v2)
    assert (v1.family, v1.config) == ("torchvision", "torchvision_r50_fpn.yaml")
    assert (v2.family, v2.config) == ("torchvision_v2", "torchvision_r50_fpn_v2.yaml")
    for found in (v1, v2):  # the small fixtures' widths, read from the shapes
        assert {"model.backbone.name=resnet_small", "model.num_classes=90",
                "model.fpn.channels=64", "model.box_head.fc_dim=64"} <= set(found.overrides)
    assert "model.box_head.conv_dim=64" in v2.overrides
    with pytest.raises(WeightsError, match="--from torchvision: the checkpoint is torchvision "
                       "maskrcnn_resnet50_fpn_v2"):
        inspect(state_v2, "torchvision")
    with pytest.raises(WeightsError, match="not a checkpoint of a known Mask R-CNN family.*"
                       "conv1.weight"):
        inspect({"conv1.weight": np.zeros((64, 3, 7, 7)), "fc.weight": np.zeros((10, 4))})
    deeper = {k: v for k, v in state.items()}
    deeper.update({k.replace("layer3.0.", "layer3.1."): v for k, v in state.items()
                   if "layer3.0." in k})
    with pytest.raises(WeightsError, match=r"\(1, 1, 2, 1\) blocks per stage"):
        inspect(deeper)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="bad.npz: not a readable .npz"):
        read_state_dict(str(bad))


@pytest.mark.slow
def test_convert_cli_writes_a_run_directory_that_predicts_like_the_model(state, state_npz,
                                                                         tmp_path):
    from mrcnn_tf.predict import load_model_dir

    out = tmp_path / "run"
    overrides = tp.parity_overrides(small=True)
    done = subprocess.run([sys.executable, "-m", "mrcnn_tf.tools.convert", "--checkpoint",
                           str(state_npz), "--output", str(out), "--set", *overrides],
                          check=True, cwd=REPO, capture_output=True, text=True)
    assert "found torchvision maskrcnn_resnet50_fpn (v1), resnet_small, 90 classes" in done.stdout
    wrong = subprocess.run([sys.executable, "-m", "mrcnn_tf.tools.convert", "--checkpoint",
                            str(state_npz), "--output", str(tmp_path / "no"), "--from",
                            "torchvision_v2"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "the checkpoint is torchvision maskrcnn_resnet50_fpn (v1)" \
        in wrong.stderr and not (tmp_path / "no").exists()
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels) == 90 and labels[0] == {"class": 1, "id": 1, "name": "person"}
    assert labels[11]["name"] == "N/A" and labels[89]["name"] == "toothbrush"
    assert json.loads((out / "config.json").read_text())["model"]["detection"][
        "mask_paste"] == "torchvision"
    predict, ids, names = load_model_dir(str(out))
    assert ids[17] == 18
    with np.load(FIXTURE) as f:
        image = f["image"]
    direct = build_model(tp.our_config(small=True))
    load_torchvision(direct, state)
    (a,) = predict([image])
    b = {k: v.numpy()[0] for k, v in direct(image[None]).items()}
    n = int(b["num_detections"])
    # Graph (tf.function) against eager execution: oneDNN may order sums differently.
    np.testing.assert_allclose(a["scores"], b["detection_scores"][:n], atol=1e-4)
    np.testing.assert_allclose(a["boxes"], b["detection_boxes"][:n], atol=1e-2)
    np.testing.assert_array_equal(a["classes"], b["detection_classes"][:n])
    assert a["masks"].shape == (n, *image.shape[:2])


@pytest.mark.slow
def test_converted_run_evaluates_in_torchvision_label_space(state_npz, tmp_path, shared_data):
    """A converted model predicts torchvision's 91-label space (class i = COCO id i), not the
    annotation file's 80 contiguous classes: evaluation must use the run's labels.json."""
    from mrcnn_tf.config import load_config
    from mrcnn_tf.evaluation.run import evaluate_model_dir
    from mrcnn_tf.tools.convert_torchvision import convert

    out = tmp_path / "run"
    overrides = tp.parity_overrides(small=True)
    convert(str(state_npz), str(out), None, overrides)
    tiny = shared_data / "coco_tiny16"
    config = load_config(REPO / "configs" / "torchvision_r50_fpn.yaml", overrides + [
        f"data.eval.annotation_file={tiny}/instances_train2017.json",
        f"data.eval.image_dir={tiny}/train2017", "eval.num_images=4"])
    results = evaluate_model_dir(config, str(out))
    assert results["step"] == 0 and results["num_images"] == 4
    assert 0.0 <= results["bbox"]["AP"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_exported_converted_model_serves_torchvision_detections(version, tmp_path):
    """convert -> export -> load the SavedModel: the served detections and full-size masks are
    torchvision's (the README's path to TF Serving), for each family."""
    import tensorflow as tf

    from mrcnn_tf.tools.convert import convert

    run = tmp_path / "run"
    path = tmp_path / "state.npz"
    np.savez(path, **_state(version))
    convert(str(path), str(run), None, tp.parity_overrides(small=True))
    assert json.loads((run / "config.json").read_text())["model"]["rpn"]["num_convs"] == (
        2 if version == "v2" else 1)
    subprocess.run([sys.executable, "export/export_saved_model.py", "--model_dir", str(run),
                    "--output", str(tmp_path / "export"), "--input_type", "image_tensor"],
                   check=True, cwd=REPO)
    with np.load(FIXTURES[version]) as f:
        image, ref_masks = f["image"], f["det_masks"]
        ref_scores, ref_classes = f["det_scores"], f["det_classes"]
    served = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["image_tensor"]
    out = served(images=tf.constant(image[None]))
    n = int(out["num_detections"][0])
    assert n == len(ref_scores) == 100
    np.testing.assert_array_equal(out["detection_classes"].numpy()[0, :n], ref_classes)
    np.testing.assert_allclose(out["detection_scores"].numpy()[0, :n], ref_scores, atol=1e-4)
    masks = out["detection_masks"].numpy()[0, :n].astype(bool)
    assert masks.shape == ref_masks.shape
    inter = (masks & ref_masks).sum(axis=(1, 2))
    union = np.maximum((masks | ref_masks).sum(axis=(1, 2)), 1)
    assert (inter / union).min() >= 0.99


# -- initial weights: model.backbone.weights ----------------------------------------------------

def _imagenet_state(state):
    """The fixture's ResNet as torchvision's ImageNet classifier stores it: the backbone's keys
    without "backbone.body.", plus a classifier that loading must ignore."""
    out = {k[len("backbone.body."):]: v for k, v in state.items()
           if k.startswith("backbone.body.")}
    out["fc.weight"] = np.zeros((1000, 512), np.float32)
    out["fc.bias"] = np.zeros(1000, np.float32)
    return out


def test_backbone_weights_equal_torchvision_resnet_on_a_real_image(state, tmp_path):
    """model.backbone.weights with a torchvision ResNet state dict (.npz here; .pth reads the
    same way through torch.load(weights_only=True)): C2..C5 of our backbone equal the
    torchvision ResNet's on the fixture's real COCO image."""
    from mrcnn_tf.training import initialise

    path = tmp_path / "resnet_small.npz"
    np.savez(path, **_imagenet_state(state))
    config = load_config(REPO / "configs" / "torchvision_r50_fpn.yaml",
                         tp.parity_overrides(small=True) + [f"model.backbone.weights={path}"])
    model = build_model(config)
    before = [w.numpy().copy() for w in model.fpn.weights]
    initialise(model, config)
    with np.load(FIXTURE) as f:
        feats = model.backbone(f["input"])
        for lv in range(2, 6):
            ref = f[f"c{lv}"]
            rel = np.abs(feats[f"c{lv}"].numpy() - ref).max() / np.abs(ref).max()
            assert rel <= 1e-4, (lv, rel)
    for a, b in zip(before, model.fpn.weights):  # only the backbone is initialised
        np.testing.assert_array_equal(a, b.numpy())


def test_backbone_weights_that_do_not_fit_are_refused_by_key(state, tmp_path):
    imagenet = _imagenet_state(state)
    del imagenet["layer3.0.bn2.running_var"]
    imagenet["layer5.0.conv1.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "broken.npz"
    np.savez(path, **imagenet)
    model = build_model(tp.our_config(small=True))
    with pytest.raises(WeightsError, match=r"layer3\.0\.bn2\.running_var.*layer5\.0\.conv1"):
        load_backbone_weights(model, str(path))
    deep = build_model(_with(tp.our_config(small=True), backbone=dataclasses.replace(
        tp.our_config(small=True).model.backbone, name="resnet50")))
    good = tmp_path / "good.npz"
    np.savez(good, **_imagenet_state(state))
    with pytest.raises(WeightsError, match=r"missing from the state dict: layer1\.1\."):  # R50
        load_backbone_weights(deep, str(good))
    gn = _with(tp.our_config(small=True), backbone=dataclasses.replace(
        tp.our_config(small=True).model.backbone, norm="group_norm", group_norm_groups=4))
    with pytest.raises(WeightsError, match="norm=group_norm"):
        load_backbone_weights(build_model(gn), str(good))


@pytest.mark.slow
def test_keras_applications_backbone_weights_take_rgb_images(tmp_path):
    """Keras Applications' ResNet-50 .h5 through model.backbone.weights: the config must use
    Keras' caffe preprocessing (refused otherwise, naming the keys), and our backbone on an RGB
    image equals Keras' network on the BGR image it was trained on."""
    import keras

    ref = keras.applications.ResNet50(include_top=False, weights=None,
                                      input_shape=(None, None, 3))
    path = str(tmp_path / "resnet50.weights.h5")
    ref.save_weights(path)
    base = load_config(REPO / "configs" / "coco_r50_fpn_1x.yaml",
                       ["model.backbone.stride_in_1x1=true"])
    with pytest.raises(WeightsError, match=r"model\.preprocess\.pixel_mean=\[0\.48"):
        load_backbone_weights(build_model(base), path)
    config = load_config(REPO / "configs" / "coco_r50_fpn_1x.yaml", [
        "model.backbone.stride_in_1x1=true",
        f"model.preprocess.pixel_mean={list(CAFFE_MEAN_RGB)}",
        f"model.preprocess.pixel_std={list(CAFFE_STD)}"])
    model = build_model(config)
    load_backbone_weights(model, path)
    rgb = np.random.default_rng(0).uniform(-50, 50, (1, 64, 96, 3)).astype(np.float32)
    ours = model.backbone(rgb)["c5"].numpy()
    probe = keras.Model(ref.input, ref.get_layer("conv5_block3_out").output)
    theirs = np.asarray(probe(rgb[..., ::-1]))
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()))


@pytest.mark.parametrize("overrides", [["model.roi_align.impl=gather"],
                                       ["model.nms_impl=static"],
                                       ["model.roi_align.impl=gather", "model.nms_impl=static"]])
def test_xla_compilable_ops_give_the_same_detections(state, overrides):
    """model.roi_align.impl=gather and model.nms_impl=static (the ops XLA compiles) in the
    whole model: the converted small torchvision model's 100 detections and masks are
    unchanged."""
    from mrcnn_tf.config import load_config

    with np.load(FIXTURE) as f:
        image, ref_classes = f["image"][None], f["det_classes"]
    outs = []
    for extra in ([], overrides):
        config = load_config(REPO / "configs" / "torchvision_r50_fpn.yaml",
                             tp.parity_overrides(small=True) + extra)
        model = build_model(config)
        load_torchvision(model, state)
        outs.append({k: v.numpy()[0] for k, v in model(image).items()})
    a, b = outs
    assert int(a["num_detections"]) == int(b["num_detections"]) == 100
    np.testing.assert_array_equal(b["detection_classes"][:100], ref_classes)
    np.testing.assert_array_equal(a["detection_classes"], b["detection_classes"])
    np.testing.assert_allclose(a["detection_boxes"], b["detection_boxes"], atol=1e-3)
    np.testing.assert_allclose(a["detection_masks"], b["detection_masks"], atol=1e-4)
