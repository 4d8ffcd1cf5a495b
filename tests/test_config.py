import dataclasses

import pytest

from mrcnn_tf.config import Config, ConfigError, config_from_dict, describe, load_config, to_dict
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_folder_holds_the_required_files():
    names = {p.name for p in CONFIGS}
    assert {"shapes.yaml", "coco_r50_fpn_1x.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_reference_defaults():
    cfg = load_config()
    m = cfg.model
    assert m.anchors.sizes == (32.0, 64.0, 128.0, 256.0, 512.0)
    assert m.anchors.aspect_ratios == (0.5, 1.0, 2.0)
    assert (m.rpn.positive_iou, m.rpn.negative_iou) == (0.7, 0.3)
    assert (m.rpn.batch_size_per_image, m.rpn.positive_fraction) == (256, 0.5)
    assert (m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train) == (2000, 1000)
    assert (m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test) == (1000, 1000)
    assert (m.box_head.batch_size_per_image, m.box_head.positive_fraction) == (512, 0.25)
    assert m.box_head.box_coder_weights == (10.0, 10.0, 5.0, 5.0)
    assert (m.roi_align.box_output_size, m.roi_align.mask_output_size) == (7, 14)
    assert (m.detection.score_threshold, m.detection.nms_threshold) == (0.05, 0.5)
    assert cfg.train.decay_steps == (60000, 80000)


def test_every_option_is_documented():
    rows = describe()
    assert len(rows) > 100
    undocumented = [key for key, _, doc in rows if len(doc) < 8]
    assert not undocumented


def test_coco_recipe_values():
    cfg = load_config(str(REPO / "configs" / "coco_r50_fpn_1x.yaml"))
    assert cfg.model.backbone.name == "resnet50"
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.base_learning_rate) == (16, 90000,
                                                                                     0.02)
    assert cfg.data.train.source == "coco"


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(str(REPO / "configs" / "shapes.yaml"),
                      ["train.steps=100", "model.rpn.conv_channels=512",
                       "model.anchors.aspect_ratios=[1, 2]", "model.rpn.share_heads=false",
                       "data.eval.annotation_file=/x/y.json", "train.clip_norm=10"])
    assert cfg.train.steps == 100
    assert cfg.model.rpn.conv_channels == 512
    assert cfg.model.anchors.aspect_ratios == (1.0, 2.0)
    assert cfg.model.rpn.share_heads is False
    assert cfg.data.eval.annotation_file == "/x/y.json"
    assert cfg.train.clip_norm == 10.0
    assert cfg.model.num_classes == 3  # from the file


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 5


@pytest.mark.parametrize("override,pattern", [
    ("model.rpn.conv_channel=512", r"unknown key 'model\.rpn\.conv_channel'.*conv_channels"),
    ("modle.num_classes=3", r"unknown key 'modle'.*allowed keys: data, eval, export, model"),
    ("train.steps=ten", r"train\.steps: expected an integer, got 'ten'"),
    ("train.steps=1.5", r"train\.steps: expected an integer"),
    ("train.steps=0", r"train\.steps: 0 is out of range; allowed: >= 1"),
    ("model.rpn.positive_fraction=1.5", r"positive_fraction: 1\.5 is out of range"),
    ("model.rpn.positive_fraction=0", r"positive_fraction: 0\.0 is out of range; allowed: > 0"),
    ("model.backbone.norm=layer", r"model\.backbone\.norm: 'layer' is not one of 'frozen_bn'"),
    ("model.rpn.share_heads=1", r"model\.rpn\.share_heads: expected true or false"),
    ("model.anchors.sizes=[32, 64]", r"model\.anchors\.sizes has 2 entries"),
    ("model.anchors.aspect_ratios=[0.5, -1]", r"aspect_ratios\[1\]: -1\.0 is out of range"),
    ("train.decay_steps=[80000, 60000]", r"train\.decay_steps must be increasing"),
    ("model.rpn.negative_iou=0.8", r"negative_iou must be <="),
    ("model.rpn=3", r"model\.rpn: is a section; expected a mapping"),
    ("model.rpn.conv_channels.x=3", r"model\.rpn\.conv_channels: is an option, not a section"),
    ("steps", r"must look like section\.key=value"),
    ("train.base_learning_rate=.nan", r"expected a finite number"),
])
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_a_mistyped_key_names_the_override_and_the_key_meant(tmp_path):
    """A bad --set names the override, not the YAML file it was applied to, and the closest
    key; a mistyped key in a file names the file and the closest key."""
    shapes = str(REPO / "configs" / "shapes.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(shapes, ["train.step=10"])
    assert str(e.value).startswith("override 'train.step=10': unknown key 'train.step' (did you "
                                   "mean 'train.steps'?)")
    assert "shapes.yaml" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^override 'train\.steps=ten': train\.steps: "
                                          "expected an integer"):
        load_config(shapes, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="did you mean 'model.detection.score_threshold'"):
        load_config(shapes, ["model.detection.score_treshold=0.3"])
    with pytest.raises(ConfigError) as e:
        load_config(shapes, ["model.rpn.xyz=1"])
    assert "did you mean" not in str(e.value)  # nothing close: the allowed keys only
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  step: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.step' \(did you "
                                          r"mean 'train\.steps'\?\)"):
        load_config(str(bad))


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  rpn:\n    nms_thresh: 0.7\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.rpn\.nms_thresh'"):
        load_config(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))
    bad.write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("!!python/object/apply:os.system ['echo unsafe']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.yaml"))


def test_empty_file_gives_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(str(empty)) == load_config()


def test_yaml_reading_faults_are_messages_naming_the_file(tmp_path):
    from mrcnn_tf.config import ConfigError, load_config

    (tmp_path / "exp.yaml").write_text("train:\n  base_learning_rate: 1e-3\n"
                                       "  weight_decay: 5E-5\n")
    cfg = load_config(tmp_path / "exp.yaml")  # YAML 1.2 numbers, not strings
    assert cfg.train.base_learning_rate == 1e-3 and cfg.train.weight_decay == 5e-5
    assert load_config(None, ["train.base_learning_rate=2e-2"]).train.base_learning_rate == 0.02
    (tmp_path / "twice.yaml").write_text("train:\n  steps: 5\n  batch_size: 2\n  steps: 6\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: line 4: key 'steps' is given twice"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "latin1.yaml").write_bytes("train:\n  steps: 5 # \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not a UTF-8 text file"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match="is a directory; --config takes a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"model: is a section; expected a mapping"):
        load_config(None, ["model=[]"])
    with pytest.raises(ConfigError, match=r"train: is a section"):
        load_config(None, ["train=5"])


def test_base_files_are_read_first_and_overridden(tmp_path):
    """``_base_`` (detectron2's _BASE_): the shipped R101 and X101 configs are the R50 one with
    their backbone; a missing base or a cycle is named."""
    r50 = load_config(REPO / "configs" / "detectron2_r50_fpn.yaml")
    x101 = load_config(REPO / "configs" / "detectron2_x101_32x8d_fpn.yaml")
    r101 = load_config(REPO / "configs" / "detectron2_r101_fpn.yaml")
    assert (r101.model.backbone.name, x101.model.backbone.name) == ("resnet101",
                                                                    "resnext101_32x8d")
    assert x101.model.backbone.stride_in_1x1 is False and r50.model.backbone.stride_in_1x1
    assert x101.model.preprocess.pixel_std == (0.229, 0.224, 0.225)
    assert x101.model.preprocess.pixel_mean == r50.model.preprocess.pixel_mean
    assert x101.model.roi_align == r50.model.roi_align and x101.train == r50.train
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\ntrain:\n  steps: 5\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ a.yaml includes itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: nope.yaml\n")
    with pytest.raises(FileNotFoundError, match="c.yaml: _base_ nope.yaml not found"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("_base_: [1]\n")
    with pytest.raises(ConfigError, match="_base_ must be the path of a YAML file"):
        load_config(tmp_path / "d.yaml")
