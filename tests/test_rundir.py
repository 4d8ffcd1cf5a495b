"""The run directory: one run per directory, and a run that keeps its own model."""

import json
import os
import socket
import time

import pytest

from mrcnn_tf.config import ConfigError, load_config
from mrcnn_tf.rundir import RunLock, RunLockError, resolve_config, write_config
from tests.conftest import REPO

SHAPES = str(REPO / "configs" / "shapes.yaml")
COCO = str(REPO / "configs" / "coco_r50_fpn_1x.yaml")


def test_a_live_run_holds_the_directory_and_a_dead_one_is_taken_over(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunLockError, match=rf"in use by the run of process {os.getpid()} on "
                                           rf"{socket.gethostname()} started "):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    # A lock left by a process that is gone (same host): taken over.
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 7,
                                                "start": "earlier"}))
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_of_another_host_is_stale_only_when_its_heartbeat_stops(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": "worker-7.example", "pid": 1, "start": "t"}))
    with pytest.raises(RunLockError, match="worker-7.example"):
        RunLock(str(tmp_path), stale_s=600).acquire()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with RunLock(str(tmp_path), stale_s=600) as taken:
        assert taken.held
        assert time.time() - os.path.getmtime(lock) < 60  # our heartbeat


def test_a_resumed_run_keeps_its_model_and_logs_what_changes(tmp_path):
    saved = load_config(SHAPES, ["model.fpn.channels=32", "model.rpn.conv_channels=32"])
    write_config(str(tmp_path), saved)
    # No --config: the run's own configuration, not the default file's.
    config, changed = resolve_config(str(tmp_path), None, [], default_path=SHAPES)
    assert config == saved and changed == []
    config, changed = resolve_config(str(tmp_path), None, ["train.steps=7", "eval.batch_size=3",
                                                            "data.hflip=false"])
    assert config.train.steps == 7 and config.model == saved.model
    assert changed == ["data.hflip", "eval.batch_size", "train.steps"]
    with pytest.raises(ConfigError, match=r"model\.rpn\.nms_threshold cannot change"):
        resolve_config(str(tmp_path), None, ["model.rpn.nms_threshold=0.6"])
    # A --config of another model is refused, naming the keys.
    with pytest.raises(ConfigError, match=r"another model.*model\.fpn\.channels, "
                                          r"model\.rpn\.conv_channels differ"):
        resolve_config(str(tmp_path), SHAPES, [])
    with pytest.raises(ConfigError, match=r"model\.backbone\.name.*differ"):
        resolve_config(str(tmp_path), COCO, [])
    # A new directory takes the file.
    config, changed = resolve_config(str(tmp_path / "new"), COCO, [])
    assert config.model.backbone.name == "resnet50" and changed == []


def test_post_processing_changes_on_an_existing_run_and_weights_do_not(tmp_path):
    """Keys that change no weight (model.detection.*, the test-time proposal counts, the
    implementations with the same numbers) may be set wherever a run's model is used; any
    other model key is refused, naming it, with wording for the use (export is no resume)."""
    saved = load_config(SHAPES)
    write_config(str(tmp_path), saved)
    allowed = ["model.detection.score_threshold=0.0", "model.detection.max_detections=7",
               "model.rpn.post_nms_topk_test=50", "model.nms_impl=static"]
    for purpose in ("resume", "export", "predict", "evaluation", "load_run"):
        config, changed = resolve_config(str(tmp_path), None, allowed, purpose=purpose)
        assert config.model.detection.score_threshold == 0.0
        assert config.model.detection.max_detections == 7
        assert config.model.rpn.post_nms_topk_test == 50 and config.model.nms_impl == "static"
        assert changed == ["model.detection.max_detections", "model.detection.score_threshold",
                           "model.nms_impl", "model.rpn.post_nms_topk_test"]
    with pytest.raises(ConfigError) as e:
        resolve_config(str(tmp_path), None, ["model.rpn.post_nms_topk_train=50"],
                       purpose="export")
    message = str(e.value)
    assert message.startswith("model.rpn.post_nms_topk_train: the model in ")
    assert "resume" not in message and "export keeps" in message
    assert "model.detection.*" in message
    with pytest.raises(ConfigError, match=r"model\.fpn\.channels cannot change when it resumes"):
        resolve_config(str(tmp_path), None, ["model.fpn.channels=8"])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A shapes run directory: config.json, labels.json, a checkpoint."""
    import mrcnn_tf
    from mrcnn_tf.checkpoint import make_checkpoint
    from mrcnn_tf.rundir import write_labels

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(SHAPES)
    model = mrcnn_tf.build_model(cfg)
    (root / "checkpoints").mkdir()
    make_checkpoint(model).save(str(root / "checkpoints" / "ckpt"))
    write_config(str(root), cfg)
    write_labels(str(root), [1, 2, 3], ["square", "circle", "triangle"])
    return root, model


def test_load_run_gives_the_trained_model_with_post_processing_overrides(small_run):
    import numpy as np

    import mrcnn_tf

    root, model = small_run
    loaded = mrcnn_tf.load_run(str(root), ["model.detection.score_threshold=0.25",
                                           "model.detection.max_detections=5"])
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.category_ids == (1, 2, 3)
    assert loaded.class_names == ("square", "circle", "triangle")
    assert loaded.detection_generator.score_threshold == 0.25
    out = loaded(np.zeros((1, 96, 128, 3), np.uint8))
    assert out["detection_boxes"].shape == (1, 5, 4)
    with pytest.raises(ConfigError, match=r"model\.backbone\.norm: the model in .* load_run"):
        mrcnn_tf.load_run(str(root), ["model.backbone.norm=group_norm"])
    with pytest.raises(FileNotFoundError, match=r"has no config\.json: not a run directory"):
        mrcnn_tf.load_run(str(root / "checkpoints"))


def test_keras_ways_of_loading_a_run_directory(small_run):
    """keras.models.load_model on a run directory says to use load_run (Keras reads a folder
    with a config.json as a saved Keras model); load_weights takes the run directory and a
    checkpoint prefix as well as Keras' own files."""
    import keras
    import numpy as np

    import mrcnn_tf

    root, model = small_run
    with pytest.raises(ValueError, match=r"mrcnn_tf run directory.*mrcnn_tf\.load_run"):
        keras.models.load_model(str(root))
    saved = json.loads((root / "config.json").read_text())
    assert saved["class_name"] == "RunDirectory" and saved["model"]["num_classes"] == 3
    for source in (root, root / "checkpoints" / "ckpt-1"):
        other = mrcnn_tf.build_model(load_config(SHAPES))
        other.load_weights(str(source))
        for a, b in zip(other.weights, model.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
