"""The run directory: what train.py writes and what evaluation, export and predict read.

    MODEL_DIR/config.json      the run's whole configuration (its model is the run's model)
    MODEL_DIR/labels.json      [{"class": 1.., "id": dataset category id, "name": ...}]
    MODEL_DIR/checkpoints/     tf.train checkpoints (mrcnn_tf.checkpoint), ckpt-STEP
    MODEL_DIR/.lock            the training run that holds the directory (host, pid, start)
    MODEL_DIR/summary.json, metrics.json, tensorboard/, predictions/, export/N/

Everything that reads or writes these names does it here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import tensorflow as tf

from mrcnn_tf.config import Config, ConfigError, config_from_dict, load_config, to_dict

logger = logging.getLogger("mrcnn_tf")
CONFIG, LABELS, CHECKPOINTS, LOCK = "config.json", "labels.json", "checkpoints", ".lock"
# Sections a resumed run may change (--set or a --config with the same model): how it trains,
# reads its data, evaluates and exports. The model is the run's.
CHANGEABLE = ("train", "data", "eval", "export")


def write_json(path: str, value) -> None:
    """Writes strict JSON (no NaN or Infinity) atomically: a temporary file, then a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(model_dir, CHECKPOINTS)


def latest_checkpoint(model_dir: str) -> str | None:
    return tf.train.latest_checkpoint(checkpoint_dir(model_dir))


def write_config(model_dir: str, config: Config) -> None:
    write_json(os.path.join(model_dir, CONFIG), to_dict(config))


def read_config_dict(model_dir: str) -> dict | None:
    """The run's configuration as saved, or None when the directory has none."""
    path = os.path.join(model_dir, CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable run configuration ({e})") from None


def write_labels(model_dir: str, category_ids, class_names) -> None:
    write_json(os.path.join(model_dir, LABELS),
               [{"class": i + 1, "id": int(c), "name": n}
                for i, (c, n) in enumerate(zip(category_ids, class_names))])


def read_labels(model_dir: str):
    """(category_ids, class_names) from ``labels.json``."""
    with open(os.path.join(model_dir, LABELS)) as f:
        labels = json.load(f)
    return [entry["id"] for entry in labels], [entry["name"] for entry in labels]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def differing_keys(a: dict, b: dict, section: str | None = None) -> list[str]:
    """Dotted keys whose values differ between two config dicts (within ``section``)."""
    fa, fb = _flat(a), _flat(b)
    keys = sorted(set(fa) | set(fb))
    if section:
        keys = [k for k in keys if k.split(".", 1)[0] == section]
    return [k for k in keys if fa.get(k) != fb.get(k)]


def resolve_config(model_dir: str, config_path: str | None, overrides=(),
                   default_path: str | None = None) -> tuple[Config, list[str]]:
    """The configuration of a run in ``model_dir``.

    A new directory takes ``config_path`` (or ``default_path``) with ``overrides``. A directory
    that already holds a run keeps that run's model: its ``config.json`` is the base, a
    ``config_path`` whose model differs is refused naming the keys, and ``overrides`` may change
    only the sections in CHANGEABLE. Returns (config, the dotted keys that differ from the
    run's saved configuration) so that the caller can log each change.
    """
    saved = read_config_dict(model_dir)
    if saved is None:
        return load_config(config_path or default_path, list(overrides)), []
    base = to_dict(config_from_dict(saved))
    if config_path is not None:
        given = to_dict(load_config(config_path))
        model_diff = differing_keys(base, given, "model")
        if model_diff:
            raise ConfigError(
                f"{config_path} describes another model than the run in {model_dir} "
                f"({', '.join(model_diff[:8])}{' ...' if len(model_diff) > 8 else ''} differ); "
                f"resume without --config (the run's {CONFIG} is used) or start a new "
                "--model_dir")
        base = given
    config = config_from_dict(base, list(overrides))
    changed = differing_keys(to_dict(config_from_dict(saved)), to_dict(config))
    refused = [k for k in changed if k.split(".", 1)[0] not in CHANGEABLE]
    if refused:
        raise ConfigError(f"{model_dir} holds a run whose model is fixed: "
                          f"{', '.join(refused)} cannot change when it resumes (only "
                          f"{', '.join(s + '.*' for s in CHANGEABLE)} can); start a new "
                          "--model_dir, with model.init_from to start from this run's weights")
    return config, changed


def read_run(model_dir: str, overrides=()):
    """(config, latest checkpoint, category_ids, class_names) of a run directory; overrides may
    change the CHANGEABLE sections only.

    Raises FileNotFoundError when the run has no configuration or no checkpoint yet."""
    if read_config_dict(model_dir) is None:
        raise FileNotFoundError(f"{model_dir} has no {CONFIG}: not a run directory of train.py "
                                "or mrcnn_tf.tools.convert")
    config, _ = resolve_config(model_dir, None, overrides)
    latest = latest_checkpoint(model_dir)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(model_dir)}")
    ids, names = read_labels(model_dir)
    return config, latest, ids, names


class RunLockError(RuntimeError):
    """Another live run holds the directory."""


class RunLock:
    """One training run per directory: ``MODEL_DIR/.lock`` holds the host, pid and start time of
    the run that owns it, created atomically (O_EXCL). A lock left by a run that died is taken
    over: on the same host when its pid is gone, on another host (a shared file system) when its
    heartbeat, refreshed every ``heartbeat_s`` while the run lives, is older than ``stale_s``.
    Under MultiWorkerMirroredStrategy only the chief, the one writer, takes it.
    """

    def __init__(self, model_dir: str, heartbeat_s: float = 60.0, stale_s: float = 600.0):
        self.path = os.path.join(model_dir, LOCK)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.held = False
        self._timer = None

    def _stale(self, holder: dict) -> str | None:
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return f"its process {holder.get('pid')} is gone"
            except (PermissionError, ValueError):
                pass
            return None
        age = time.time() - os.path.getmtime(self.path)
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old"
        return None

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        holder = json.load(f)
                except (OSError, ValueError):
                    holder = {}
                reason = self._stale(holder) if holder else "it is unreadable"
                if reason is None:
                    raise RunLockError(
                        f"{os.path.dirname(self.path)} is in use by the run of process "
                        f"{holder.get('pid')} on {holder.get('host')} started "
                        f"{holder.get('start')} ({self.path}); wait for it to finish, or use "
                        "another --model_dir") from None
                logger.warning("taking over %s from a run that is no longer alive (%s): %s",
                               self.path, reason, holder)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            self._beat()
            return
        raise RunLockError(f"could not take {self.path}")

    def _beat(self) -> None:
        import threading

        if not self.held:
            return
        try:
            os.utime(self.path)
        except OSError:
            pass
        self._timer = threading.Timer(self.heartbeat_s, self._beat)
        self._timer.daemon = True
        self._timer.start()

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
