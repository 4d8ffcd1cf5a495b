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
