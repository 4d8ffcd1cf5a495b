"""detectron2 weight conversion: parity with detectron2's own outputs, safe reading, clear errors.

The reference (tests/fixtures/detectron2_maskrcnn_small.npz) was written by
``tests/scripts/detectron2_parity.py reference --small`` with detectron2 built from source in the
torch venv: a reduced-width detectron2 Mask R-CNN R-FPN (its own blocks and config file) with
seeded random weights, its state dict in detectron2's key layout and each stage's outputs on a
real COCO photo. These tests need neither torch nor detectron2.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from mrcnn_tf.model import build_model
from mrcnn_tf.weights import WeightsError, load_torchvision
from mrcnn_tf.weights_detectron2 import (
    ArraysOnlyUnpickler,
    coco80_label_map,
    load_detectron2,
    read_detectron2,
)
from tests.conftest import REPO
from tests.parity import detectron2_inference as dp
from tests.parity import torchvision_inference as tp


@pytest.fixture(scope="module")
def state():
    with np.load(dp.SMALL_FIXTURE) as f:
        return {k[3:]: f[k] for k in f.files if k.startswith("sd/")}


@pytest.fixture(scope="module")
def model_zoo_pkl(state, tmp_path_factory):
    """The fixture's state dict as detectron2's model zoo stores it: a pickled
    {"model": {key: array}, "__author__": ...}."""
    path = tmp_path_factory.mktemp("d2") / "model_final_small.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    return path


@pytest.mark.parametrize("fixture", [dp.SMALL_FIXTURE, dp.SMALL_FIXTURE_X],
                         ids=["R50-FPN", "X101-32x8d-FPN"])
def test_small_model_equals_detectron2_stage_by_stage(fixture):
    """R50-FPN (MSRA: stride on the 1x1) and ResNeXt (grouped 3x3 convs, stride on the 3x3,
    its own pixel std), each reduced in width."""
    r = tp.check(str(fixture))
    print(json.dumps(r, indent=1))
    assert r["resized_size_equal"] and r["input_max_abs_diff"] < 1e-3
    for lv in range(2, 6):
        assert r[f"c{lv}_rel_diff"] <= 1e-4, lv
    for lv in range(2, 7):
        assert r[f"p{lv}_rel_diff"] <= 1e-4, lv
    assert r["proposals"][0] == r["proposals"][1] > 100
    assert r["proposals_matched_1e-3px"] >= 0.99
    assert r["class_logits_max_abs_diff"] <= 1e-4 * r["class_logits_scale"]
    assert r["box_deltas_max_abs_diff"] <= 1e-4
    assert r["detections"] == [100, 100] and r["detections_matched"] == 1.0
    assert r["det_score_max_abs_diff"] <= 1e-4
    assert r["mask_iou_min"] >= 0.99 and r["mask_pixels_differing_not_ties"] == 0
    assert tp.passes(r)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pickles_load_the_same_weights_as_the_state_dict(state, tmp_path, protocol):
    path = tmp_path / f"p{protocol}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f,
                    protocol=protocol)
    read = read_detectron2(str(path))
    assert set(read) == set(state)
    for k in state:
        np.testing.assert_array_equal(read[k], state[k])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.x": _Payload(marker)}}, f)
    with pytest.raises(WeightsError, match=r"evil\.pkl: refused to unpickle (posix|os|nt)\.system"):
        read_detectron2(str(path))
    assert not marker.exists()
    for obj, name in ((eval, "builtins.eval"), (pickle.loads, "_pickle.loads")):
        bad = tmp_path / "other.pkl"
        bad.write_bytes(pickle.dumps({"model": {"k": obj}}))
        with pytest.raises(WeightsError, match=f"refused to unpickle {name}"):
            read_detectron2(str(bad))
    with open(path, "rb") as f:
        with pytest.raises(WeightsError):
            ArraysOnlyUnpickler(f, str(path)).load()


def test_unreadable_and_odd_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        read_detectron2(str(tmp_path / "nope.pkl"))
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pickle.dumps({"model": {"a": np.zeros(100, np.float32)}})[:60])
    with pytest.raises(WeightsError, match="cut.pkl: not a readable pickle"):
        read_detectron2(str(cut))
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(WeightsError, match="expected a dict, got list"):
        read_detectron2(str(listed))


def test_missing_and_unexpected_keys_are_named_and_nothing_is_assigned(state):
    model = build_model(dp.our_config(small=True))
    before = [v.numpy().copy() for v in model.weights]
    broken = dict(state)
    del broken["roi_heads.box_head.fc2.bias"]
    broken["roi_heads.extra.weight"] = np.zeros(3, np.float32)
    broken["pixel_mean"] = np.zeros((3, 1, 1), np.float32)  # a buffer some files hold: ignored
    with pytest.raises(WeightsError, match=r"missing from the state dict: roi_heads\.box_head"
                       r"\.fc2\.bias; not used by the model: roi_heads\.extra\.weight$"):
        load_detectron2(model, broken)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_the_other_family_is_refused_both_ways(state):
    d2_model = build_model(dp.our_config(small=True))
    with np.load(tp.SMALL_FIXTURE) as f:
        tv_state = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
    with pytest.raises(WeightsError, match=r"torchvision's \(torchvision, keys backbone\.body"):
        load_detectron2(d2_model, tv_state)
    with pytest.raises(WeightsError, match=r"the state dict is detectron2's.*detectron2_r50_fpn"):
        load_torchvision(build_model(tp.our_config(small=True)), state)


def test_wrong_class_count_names_the_layer_and_the_fix(state):
    from mrcnn_tf.config import load_config

    config = load_config(dp.CONFIG, ["model.num_classes=90", "model.backbone.name=resnet_small",
                                     "model.fpn.channels=64", "model.rpn.conv_channels=64",
                                     "model.box_head.fc_dim=64", "model.mask_head.conv_dim=64"])
    with pytest.raises(WeightsError, match=r"cls_score\.weight: shape \(81, 64\).*"
                       r"model\.num_classes=80"):
        load_detectron2(build_model(config), state)


@pytest.mark.slow
def test_convert_finds_detectron2_and_its_labels(state, model_zoo_pkl, tmp_path):
    from mrcnn_tf.tools.convert import inspect

    found = inspect(state)
    assert (found.family, found.config) == ("detectron2", "detectron2_r50_fpn.yaml")
    with np.load(dp.SMALL_FIXTURE_X) as f:
        x_state = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
    x = inspect(x_state)
    assert x.config == "detectron2_x101_32x8d_fpn.yaml"
    assert "model.backbone.name=resnext_small" in x.overrides
    assert {"model.backbone.name=resnet_small", "model.num_classes=80", "model.fpn.channels=64",
            "model.box_head.fc_dim=64", "model.mask_head.conv_dim=64"} <= set(found.overrides)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mrcnn_tf.tools.convert", "--checkpoint",
                           str(model_zoo_pkl), "--output", str(out), "--set",
                           "model.detection.score_threshold=0.0"],
                          check=True, cwd=REPO, capture_output=True, text=True)
    assert "found detectron2 Mask R-CNN R-FPN, resnet_small, 80 classes" in done.stdout
    labels = json.loads((out / "labels.json").read_text())
    ids, names = coco80_label_map()
    assert len(labels) == 80 and labels[0] == {"class": 1, "id": 1, "name": "person"}
    assert labels[79] == {"class": 80, "id": 90, "name": "toothbrush"} and ids[79] == 90
    config = json.loads((out / "config.json").read_text())["model"]
    assert config["roi_align"]["sampling_ratio"] == 0 and config["backbone"]["stride_in_1x1"]


@pytest.mark.slow
def test_exported_converted_model_serves_detectron2_detections(model_zoo_pkl, tmp_path):
    """convert (.pkl) -> export -> load the SavedModel: the served detections and full-size
    masks are detectron2's, its classes reported as COCO category ids."""
    import tensorflow as tf

    from mrcnn_tf.tools.convert import convert

    run = tmp_path / "run"
    convert(str(model_zoo_pkl), str(run), None, dp.parity_overrides(small=True))
    subprocess.run([sys.executable, "export/export_saved_model.py", "--model_dir", str(run),
                    "--output", str(tmp_path / "export"), "--input_type", "image_tensor"],
                   check=True, cwd=REPO)
    with np.load(dp.SMALL_FIXTURE) as f:
        image, ref_masks = f["image"], f["det_masks"]
        ref_scores, ref_classes = f["det_scores"], f["det_classes"]
    served = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["image_tensor"]
    out = served(images=tf.constant(image[None]))
    n = int(out["num_detections"][0])
    assert n == len(ref_scores) == 100
    # The export reports COCO category ids (labels.json): class i is the i-th sorted id.
    ids = np.array(coco80_label_map()[0])
    np.testing.assert_array_equal(out["detection_classes"].numpy()[0, :n], ids[ref_classes - 1])
    np.testing.assert_allclose(out["detection_scores"].numpy()[0, :n], ref_scores, atol=1e-4)
    masks = out["detection_masks"].numpy()[0, :n].astype(bool)
    assert masks.shape == ref_masks.shape
    inter = (masks & ref_masks).sum(axis=(1, 2))
    union = (masks | ref_masks).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # both empty: equal
    assert iou.min() >= 0.99


def test_npz_and_dict_state_dicts_keep_detectron2_names(state, tmp_path):
    """detectron2's mask_head.mask_fcnK is not renamed as an old torchvision key would be."""
    from mrcnn_tf.tools.convert import read_checkpoint

    path = tmp_path / "d2.npz"
    np.savez(path, **state)
    for read in (read_checkpoint(str(path)), read_checkpoint(dict(state))):
        assert set(read) == set(state) and "roi_heads.mask_head.mask_fcn1.weight" in read
