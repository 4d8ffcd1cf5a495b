"""The training loop around ``model.fit``: strategy, datasets, checkpoints and resume."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import keras
import tensorflow as tf

from mrcnn_tf.checkpoint import make_checkpoint, restore
from mrcnn_tf.config import Config, ConfigError, to_dict
from mrcnn_tf.data import build_dataset, source_info
from mrcnn_tf.model import LOSS_KEYS, build_model

logger = logging.getLogger("mrcnn_tf")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def make_strategy(name: str, tpu: str | None = None, cpu_replicas: int = 0
                  ) -> tf.distribute.Strategy:
    """The tf.distribute strategy called ``name`` (create it before the model).

    ``multi_worker`` reads the cluster from ``TF_CONFIG``; ``tpu`` resolves ``tpu`` (a name or
    grpc address, or the environment's TPU when None). ``cpu_replicas`` > 1 splits the CPU into
    that many logical devices and mirrors over them (``mirrored`` only; for testing distribution
    on a machine without GPUs).
    """
    if cpu_replicas > 1:
        if name != "mirrored":
            raise ValueError("--cpu_replicas needs --strategy mirrored")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        return tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker."""
    cfg = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = cfg.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and task.get("index", 0) == 0 and \
        "chief" not in cfg.get("cluster", {})


class CheckpointEvery(keras.callbacks.Callback):
    """Writes a checkpoint every ``every`` optimiser steps and at the end of training.

    tf.train.CheckpointManager writes the checkpoint files first and then replaces its index
    file atomically, so a process killed mid-write leaves the previous checkpoint as the latest.
    Under MultiWorkerMirroredStrategy every worker must take part in the save; non-chief workers
    write to a scratch directory that is deleted afterwards.
    """

    def __init__(self, manager: tf.train.CheckpointManager, every: int, total: int):
        super().__init__()
        self.manager, self.every, self.total = manager, every, total

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        step = self._step()
        if step % self.every == 0 or step >= self.total:
            self.manager.save(checkpoint_number=step)
            logger.info("checkpoint at step %d: %s", step, self.manager.latest_checkpoint)


class StopOnNaN(keras.callbacks.Callback):
    """Stops with a clear message as soon as a loss is NaN or Inf."""

    def __init__(self):
        super().__init__()
        self.bad = None

    def on_train_batch_end(self, batch, logs=None):
        for k, v in (logs or {}).items():
            if k.startswith("loss") and not math.isfinite(float(v)):
                step = int(self.model.optimizer.iterations.numpy())
                self.bad = f"{k} is {float(v)} at step {step}"
                print(f"\nstopping: {self.bad}; the last good checkpoint is kept. Lower "
                      "train.base_learning_rate or set train.clip_norm.", flush=True)
                self.model.stop_training = True
                return


def write_label_map(model_dir: str, category_ids, class_names) -> None:
    """``model_dir/labels.json``: [{"class": 1.., "id": dataset category id, "name": ...}]."""
    labels = [{"class": i + 1, "id": int(c), "name": n}
              for i, (c, n) in enumerate(zip(category_ids, class_names))]
    with open(os.path.join(model_dir, "labels.json"), "w") as f:
        json.dump(labels, f, indent=1)


def read_label_map(model_dir: str):
    """(category_ids, class_names) from ``model_dir/labels.json``."""
    with open(os.path.join(model_dir, "labels.json")) as f:
        labels = json.load(f)
    return [entry["id"] for entry in labels], [entry["name"] for entry in labels]


def read_run(model_dir: str, overrides=()):
    """(config, latest checkpoint, category_ids, class_names) of a train.py run directory.

    Raises FileNotFoundError when the run has no checkpoint yet."""
    from mrcnn_tf.config import config_from_dict

    with open(os.path.join(model_dir, "config.json")) as f:
        config = config_from_dict(json.load(f), list(overrides))
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {model_dir}/checkpoints")
    ids, names = read_label_map(model_dir)
    return config, latest, ids, names


def check_initialisation(config: Config) -> None:
    """Refuses a new run that would freeze random weights: a backbone with frozen BN or frozen
    stages (the references' fine-tuning setup) needs ``model.backbone.weights`` or
    ``model.init_from``. Call it when there is no checkpoint to resume."""
    m = config.model
    bb = m.backbone
    if (bb.norm == "frozen_bn" or bb.freeze_at > 0) and not (bb.weights or m.init_from):
        frozen = " and ".join(x for x in (
            "model.backbone.norm=frozen_bn" if bb.norm == "frozen_bn" else "",
            f"model.backbone.freeze_at={bb.freeze_at}" if bb.freeze_at > 0 else "") if x)
        raise ConfigError(
            f"{frozen} keep part of the backbone at its initial values, but this run has no "
            "model.backbone.weights, no model.init_from and no checkpoint to resume: it would "
            "train on top of frozen random weights. Set model.backbone.weights=PATH (ImageNet "
            "weights: torchvision's resnet50 .pth/.npz or Keras Applications' .h5), "
            "model.init_from=PATH (a run directory, checkpoint or .weights.h5), or train the "
            "whole backbone from scratch with model.backbone.norm=bn "
            "model.backbone.freeze_at=0")


def initialise(model, config: Config) -> None:
    """Initial weights of a new run: ``model.init_from`` or ``model.backbone.weights``."""
    from mrcnn_tf.weights import load_backbone_weights, load_initial_weights

    m = config.model
    if m.init_from:
        fresh = load_initial_weights(model, m.init_from)
        print(f"initialised from {m.init_from}"
              + (f"; re-initialised (shape differs): {', '.join(fresh)}" if fresh else ""),
              flush=True)
    elif m.backbone.weights:
        n = load_backbone_weights(model, m.backbone.weights)
        print(f"backbone initialised from {m.backbone.weights} ({n} tensors)", flush=True)


def _distributed_dataset(config: Config, strategy, training: bool):
    info = source_info(config, training)
    if strategy.num_replicas_in_sync == 1:
        return build_dataset(config, training, info=info), info
    return strategy.distribute_datasets_from_function(
        lambda ctx: build_dataset(config, training, input_context=ctx, info=info)), info


def train(config: Config, strategy: tf.distribute.Strategy, model_dir: str,
          verbose: int | str = "auto", extra_callbacks=(), final_weights: str | None = None
          ) -> dict:
    """Trains ``config`` under ``strategy`` into ``model_dir``, resuming from its latest
    checkpoint. Returns a summary dict (also written to ``model_dir/summary.json`` by the chief).
    """
    t = config.train
    replicas = strategy.num_replicas_in_sync
    if t.batch_size % replicas:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by the number of "
                         f"replicas ({replicas})")
    if replicas > 1 and "bn" in (config.model.backbone.norm, config.model.fpn.norm,
                                 config.model.mask_head.norm, config.model.box_head.norm):
        logger.warning("norm=bn under %d replicas: each replica keeps its own batch statistics; "
                       "use sync_bn (or frozen_bn) for identical models on every replica",
                       replicas)
    if t.mixed_precision != "float32":
        keras.mixed_precision.set_global_policy(t.mixed_precision)
    keras.utils.set_random_seed(t.seed)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if latest is None:
        check_initialisation(config)
    chief = is_chief()
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    if not chief:
        ckpt_dir = os.path.join(model_dir, "tmp_worker", str(os.getpid()))
    os.makedirs(ckpt_dir, exist_ok=True)

    with strategy.scope():
        model = build_model(config)
        model.compile()
        model.optimizer.build(model.trainable_variables)
    dataset, info = _distributed_dataset(config, strategy, training=True)

    checkpoint = make_checkpoint(model, model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=3)
    start = 0
    if latest:
        restore(model, latest, model.optimizer)
        start = int(model.optimizer.iterations.numpy())
        print(f"resumed from {latest} at step {start}", flush=True)
    else:
        initialise(model, config)
    if chief:
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(to_dict(config), f, indent=1)
        write_label_map(model_dir, info.category_ids, info.class_names)

    steps_per_epoch = math.gcd(t.steps, t.checkpoint_every)
    epochs = t.steps // steps_per_epoch
    nan_stop = StopOnNaN()
    callbacks = [CheckpointEvery(manager, t.checkpoint_every, t.steps), nan_stop, *extra_callbacks]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "tensorboard"),
                                                     update_freq=t.log_every))
    t0 = time.time()
    history = None
    if start < t.steps:
        history = model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                            initial_epoch=start // steps_per_epoch, callbacks=callbacks,
                            verbose=verbose)
    elapsed = time.time() - t0
    end = int(model.optimizer.iterations.numpy())
    if final_weights:
        model.save_weights(final_weights)
    last = {k: float(v[-1]) for k, v in (history.history if history else {}).items()}
    summary = {"model_dir": model_dir, "strategy": type(strategy).__name__,
               "replicas": replicas, "resumed_from_step": start, "final_step": end,
               "steps_run": end - start, "seconds": round(elapsed, 1),
               "seconds_per_step": round(elapsed / max(end - start, 1), 4),
               "latest_checkpoint": tf.train.latest_checkpoint(ckpt_dir),
               "final_logs": {k: last[k] for k in (*LOSS_KEYS, "loss", "learning_rate")
                              if k in last},
               "stopped_on_nan": nan_stop.bad}
    if chief:
        with open(os.path.join(model_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    else:
        tf.io.gfile.rmtree(ckpt_dir)
    summary["model"] = model
    summary["class_names"] = info.class_names
    return summary


def draw_validation_predictions(model, config: Config, model_dir: str, class_names,
                                num_images: int = 4) -> list[str]:
    """Draws the model's detections on the first validation images into
    ``model_dir/predictions/*.png``; returns the paths."""
    import numpy as np

    from mrcnn_tf.visualize import draw_detections, save_png

    out_dir = os.path.join(model_dir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for images, targets in build_dataset(config, training=False):
        sizes = targets["image_info"]["image_size"].numpy()
        det = model({"images": images, "image_sizes": sizes}, training=False)
        for b in range(images.shape[0]):
            h, w = sizes[b]
            image = images[b, :h, :w].numpy()
            one = {k: np.asarray(v[b]) for k, v in det.items()}
            drawn = draw_detections(image, one, class_names, score_threshold=0.5)
            image_id = int(targets["image_info"]["image_id"][b])
            path = os.path.join(out_dir, f"val_{image_id}.png")
            save_png(path, drawn)
            paths.append(path)
            if len(paths) >= num_images:
                return paths
    return paths
