"""The run directory: what train.py writes and what evaluation, export and predict read.

    MODEL_DIR/config.json      the run's whole configuration (its model is the run's model),
                               and four keys for Keras (KERAS_POINTER) so that
                               keras.models.load_model(MODEL_DIR) says to use load_run
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

from mrcnn_tf.config import (
    INFERENCE_KEYS,
    Config,
    ConfigError,
    config_from_dict,
    is_inference_key,
    load_config,
    to_dict,
)

logger = logging.getLogger("mrcnn_tf")
CONFIG, LABELS, CHECKPOINTS, LOCK = "config.json", "labels.json", "checkpoints", ".lock"
# Sections a run's later uses may change (--set or a --config with the same model): how it
# trains, reads its data, evaluates and exports; and the model keys that change no weight
# (config.INFERENCE_KEYS: post-processing). The rest of the model is the run's.
CHANGEABLE = ("train", "data", "eval", "export")
# Keras reads a directory holding a config.json as a saved Keras model: these keys make
# keras.models.load_model(MODEL_DIR) build mrcnn_tf.model.RunDirectory, whose from_config raises
# an error naming mrcnn_tf.load_run, instead of failing on the missing weights file.
KERAS_POINTER = {"module": "mrcnn_tf.model", "class_name": "RunDirectory",
                 "registered_name": "mrcnn_tf>RunDirectory",
                 "config": {"what": "an mrcnn_tf run directory: load it with "
                                    "mrcnn_tf.load_run(model_dir)"}}


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
    write_json(os.path.join(model_dir, CONFIG), {**KERAS_POINTER, **to_dict(config)})


def read_config_dict(model_dir: str) -> dict | None:
    """The run's configuration as saved (without KERAS_POINTER's keys), or None when the
    directory has none."""
    path = os.path.join(model_dir, CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable run configuration ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a run configuration (a JSON object of sections)")
    return {k: v for k, v in saved.items() if k not in KERAS_POINTER}


def label_records(category_ids, class_names) -> list[dict]:
    """The ``labels.json`` schema (run directories, SavedModel assets, ONNX and LiteRT exports):
    one ``{"class": i + 1, "id": category id, "name": name}`` per model class."""
    return [{"class": i + 1, "id": int(c), "name": n}
            for i, (c, n) in enumerate(zip(category_ids, class_names))]


def write_labels(model_dir: str, category_ids, class_names) -> str:
    """Writes ``model_dir/labels.json`` (:func:`label_records`); returns its path."""
    path = os.path.join(model_dir, LABELS)
    write_json(path, label_records(category_ids, class_names))
    return path


def read_labels(model_dir: str):
    """(category_ids, class_names) from ``labels.json``: class i + 1 is ``category_ids[i]``."""
    with open(os.path.join(model_dir, LABELS), encoding="utf-8") as f:
        labels = json.load(f)
    return [entry["id"] for entry in labels], [entry["name"] for entry in labels]


def has_labels(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, LABELS))


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


def changeable(key: str) -> bool:
    """Whether a run's later uses may set the dotted ``key``: CHANGEABLE sections and the model
    keys that change no weight."""
    return key.split(".", 1)[0] in CHANGEABLE or is_inference_key(key)


def _allowed() -> str:
    return ", ".join([s + ".*" for s in CHANGEABLE]
                     + [k + "*" if k.endswith(".") else k for k in INFERENCE_KEYS])


def resolve_config(model_dir: str, config_path: str | None, overrides=(),
                   default_path: str | None = None, purpose: str = "resume"
                   ) -> tuple[Config, list[str]]:
    """The configuration of a run in ``model_dir``.

    A new directory takes ``config_path`` (or ``default_path``) with ``overrides``. A directory
    that already holds a run keeps that run's model: its ``config.json`` is the base, a
    ``config_path`` whose model differs is refused naming the keys, and ``overrides`` may change
    only what :func:`changeable` allows. ``purpose`` ("resume", or what uses the trained model:
    "evaluation", "export", "predict", "load_run") words the refusal. Returns (config, the
    dotted keys that differ from the run's saved configuration) so that the caller can log each
    change.
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
    refused = [k for k in changed if not changeable(k)]
    if refused and purpose == "resume":
        raise ConfigError(f"{model_dir} holds a run whose model is fixed: "
                          f"{', '.join(refused)} cannot change when it resumes (only "
                          f"{_allowed()} can); start a new --model_dir, with "
                          "model.init_from to start from this run's weights")
    if refused:
        raise ConfigError(f"{', '.join(refused)}: the model in {model_dir} was trained with "
                          f"the run's value{'s' if len(refused) > 1 else ''}, which "
                          f"{purpose} keeps; what can be set there: {_allowed()} (the "
                          "post-processing and implementations that change no weight)")
    return config, changed


def read_run(model_dir: str, overrides=(), purpose: str = "export"):
    """(config, latest checkpoint, category_ids, class_names) of a run directory; overrides may
    change what :func:`changeable` allows.

    Raises FileNotFoundError when ``model_dir`` is not a run directory or has no checkpoint
    yet, ConfigError for an override that would change the trained model."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model_dir {model_dir}: no such directory (a run directory "
                                "of train.py or mrcnn_tf.tools.convert)")
    if read_config_dict(model_dir) is None:
        raise FileNotFoundError(f"--model_dir {model_dir} has no {CONFIG}: not a run directory "
                                "of train.py or mrcnn_tf.tools.convert")
    config, _ = resolve_config(model_dir, None, overrides, purpose=purpose)
    latest = latest_checkpoint(model_dir)
    if latest is None:
        raise FileNotFoundError(f"--model_dir {model_dir}: no checkpoint in "
                                f"{checkpoint_dir(model_dir)} yet")
    if not has_labels(model_dir):
        raise FileNotFoundError(f"--model_dir {model_dir} has no {LABELS}: not a run directory "
                                "of train.py or mrcnn_tf.tools.convert")
    ids, names = read_labels(model_dir)
    return config, latest, ids, names


def weights_finite(model) -> bool:
    """Whether every weight of ``model`` (and its optimiser, if it has one) is finite."""
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights) + list(getattr(optimizer, "variables", None) or [])
    return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(v, tf.float32)))
                               for v in variables if "float" in str(v.dtype)]))


def restore_newest_finite(model, model_dir: str, optimizer=None) -> str | None:
    """Restores into ``model`` (and ``optimizer``) the newest checkpoint of ``model_dir`` whose
    weights are all finite (a NaN run of an older version may have saved non-finite ones after
    its last good step) and returns its path; None when the run has no checkpoint.

    Raises:
      ValueError: the run has checkpoints but none is finite.
    """
    from mrcnn_tf.checkpoint import restore

    state = tf.train.get_checkpoint_state(checkpoint_dir(model_dir))
    if state is None or not state.all_model_checkpoint_paths:
        return None
    paths = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    for path in reversed(paths):
        if not tf.io.gfile.exists(path + ".index"):
            continue
        restore(model, path, optimizer)
        if weights_finite(model):
            return path
        print(f"skipping {path}: its weights are not finite", flush=True)
    raise ValueError(f"no checkpoint in {checkpoint_dir(model_dir)} has finite weights; "
                     "start a new --model_dir (model.init_from can take an earlier run)")


def load_run(model_dir: str, overrides=None):
    """The trained model of a run directory (``train.py``'s ``--model_dir``, or one written by
    ``mrcnn_tf.tools.convert``): built from the run's own ``config.json``, with its newest
    finite checkpoint restored.

    ``overrides`` may set what changes no weight, e.g. ``["model.detection.score_threshold=0.3",
    "model.detection.max_detections=50"]`` (``mrcnn_tf.config.INFERENCE_KEYS``). The model's
    ``category_ids`` and ``class_names`` say what its classes 1..N are (``labels.json``).
    ``model.compile()`` then trains it further with the run's optimiser settings (from step 0;
    resuming the run itself is ``train.py --model_dir``).

    Raises:
      FileNotFoundError: ``model_dir`` is not a run directory, or has no checkpoint yet.
      ConfigError: an override that would change the trained model.
    """
    from mrcnn_tf.model import build_model

    config, _, ids, names = read_run(model_dir, overrides or (), purpose="load_run")
    model = build_model(config)
    path = restore_newest_finite(model, model_dir)
    logger.info("loaded %s", path)
    model.category_ids, model.class_names = tuple(ids), tuple(names)
    return model


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
