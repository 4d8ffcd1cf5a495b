"""The training loop around ``model.fit``: strategy, datasets, checkpoints and resume."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import time

import keras
import tensorflow as tf

from mrcnn_tf import rundir
from mrcnn_tf.checkpoint import make_checkpoint
from mrcnn_tf.config import STRATEGIES, Config, ConfigError
from mrcnn_tf.data import DataError, build_dataset, source_info
from mrcnn_tf.model import LOSS_KEYS, build_model
from mrcnn_tf.rundir import weights_finite

logger = logging.getLogger("mrcnn_tf")


def make_strategy(name: str, cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """The tf.distribute strategy called ``name`` (create it before the model).

    ``multi_worker`` reads the cluster from ``TF_CONFIG``. ``cpu_replicas`` > 1 splits the CPU into
    that many logical devices and mirrors over them (``mirrored`` only; for testing distribution
    on a machine without GPUs). ``tpu`` connects to the TPU that ``TPUClusterResolver`` finds
    (on a Cloud TPU VM, or named by ``TPU_NAME``); the model must then have the settings XLA needs
    (:meth:`mrcnn_tf.model.MaskRCNN.xla_blockers`), which ``compile`` checks. The step
    compiles with XLA on CPU (tests); no TPU was available to run it on.
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
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise ValueError(f"--strategy tpu: no TPU found ({e})") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def check_xla_devices(strategy, jit_compile: bool):
    """Refuses XLA over several CPU devices (``--cpu_replicas``): XLA compiles each replica's
    step for the first CPU, where the other replicas' variables are not (plain Keras fails the
    same way; https://www.tensorflow.org/xla/known_issues). GPUs and TPUs are separate devices."""
    if not jit_compile or strategy.num_replicas_in_sync < 2:
        return  # (the default strategy has no worker_devices)
    devices = list(strategy.extended.worker_devices)
    if len(devices) > 1 and all("CPU" in d.upper() for d in devices):
        raise ValueError("train.jit_compile=true cannot run mirrored over logical CPU devices "
                         "(--cpu_replicas): XLA compiles for one CPU device and the other "
                         "replicas' variables live elsewhere; use one CPU replica, or GPUs")


def _is_tpu(strategy) -> bool:
    return isinstance(strategy, tf.distribute.TPUStrategy)


def native_bfloat16_cpu(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The flag by which this CPU computes bfloat16 natively (``amx_bf16``, ``avx512_bf16``), or
    None: another CPU, or no /proc/cpuinfo (not Linux). oneDNN runs bfloat16 convolutions and
    matmuls natively on such CPUs; elsewhere it converts, and float32 is faster."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def dtype_policy(mixed_precision: str) -> str:
    """``train.mixed_precision`` as a Keras dtype policy name. ``auto``: ``mixed_bfloat16`` on a
    CPU with native bfloat16 and no GPU (the shapes step takes about 0.7x float32's time on an
    AVX512-BF16 EPYC), ``float32`` elsewhere."""
    if mixed_precision != "auto":
        return mixed_precision
    if tf.config.list_physical_devices("GPU") or native_bfloat16_cpu() is None:
        return "float32"
    return "mixed_bfloat16"


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
    """Writes a checkpoint every ``every`` optimiser steps and at the end of training, never of
    weights that are not finite (after a NaN step): rotation (``max_to_keep``) then only ever
    removes checkpoints older than a finite one.

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
            if not weights_finite(self.model):
                print(f"not saving a checkpoint at step {step}: the weights are not finite; "
                      f"the last checkpoint is {self.manager.latest_checkpoint}", flush=True)
                return
            try:
                self.manager.save(checkpoint_number=step)
            except (tf.errors.OpError, OSError) as e:
                message = getattr(e, "message", str(e))
                raise OSError(f"could not write the checkpoint of step {step} to "
                              f"{self.manager.directory} ({message}); the checkpoints before "
                              f"it are intact, the latest: {self.manager.latest_checkpoint}"
                              ) from None
            logger.info("checkpoint at step %d: %s", step, self.manager.latest_checkpoint)


class StepLogger(keras.callbacks.Callback):
    """Training progress in optimiser steps (not Keras' epochs, which a step-based run only uses
    to schedule checkpoints): on a terminal one line rewritten every step; otherwise (a log file)
    one compact line every ``every`` steps and at the last step: step, losses, learning rate,
    s/step and ETA."""

    KEYS = ("loss", *LOSS_KEYS)

    def __init__(self, every: int, total: int, stream=None):
        super().__init__()
        self.every, self.total = every, total
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = self._start = None

    def on_train_begin(self, logs=None):
        self._t0 = time.perf_counter()
        self._start = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if not (self.tty or step % self.every == 0 or step == self.total):
            return
        logs = logs or {}
        rate = (time.perf_counter() - self._t0) / max(step - self._start, 1)
        eta = int(rate * max(self.total - step, 0))
        parts = [f"{k.removeprefix('loss_')} {float(logs[k]):.4f}" for k in self.KEYS if k in logs]
        if "learning_rate" in logs:
            parts.append(f"lr {float(logs['learning_rate']):.3g}")
        line = (f"step {step}/{self.total} " + " ".join(parts)
                + f" {rate:.2f} s/step ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def on_train_end(self, logs=None):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


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
                print(f"\nstopping: {self.bad}; no checkpoint is written from here, and the "
                      "run resumes from its last finite one. Lower train.base_learning_rate "
                      "or set train.clip_norm.", flush=True)
                self.model.stop_training = True
                return


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


def train(config: Config, strategy: tf.distribute.Strategy, model_dir: str,
          verbose: int | str = "auto", extra_callbacks=(), final_weights: str | None = None):
    """Trains ``config`` under ``strategy`` into ``model_dir``, resuming from its newest finite
    checkpoint, holding the directory's lock (the chief) while it runs.

    Returns (model, summary): the trained model and the summary the chief also writes to
    ``model_dir/summary.json``.

    Raises:
      ConfigError: a frozen backbone without initial weights (before anything is built).
      rundir.RunLockError: another live run holds ``model_dir``.
      DataError: the training source yields no usable image.
    """
    t = config.train
    replicas = strategy.num_replicas_in_sync
    if t.batch_size % replicas:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by the number of "
                         f"replicas ({replicas})")
    if rundir.latest_checkpoint(model_dir) is None:
        check_initialisation(config)
    # The data, before anything is built or written. A resumed run maps its data onto the
    # classes it was trained with (its labels.json).
    labels = rundir.read_labels(model_dir) if rundir.has_labels(model_dir) else None
    info = source_info(config, training=True, labels=labels)
    require_data(config, info)
    chief = is_chief()
    os.makedirs(model_dir, exist_ok=True)
    lock = rundir.RunLock(model_dir) if chief else None
    if lock:
        lock.acquire()
    policy = dtype_policy(t.mixed_precision)
    if t.mixed_precision == "auto":
        logger.info("train.mixed_precision auto: %s (%s)", policy,
                    f"this CPU computes bfloat16 natively: {native_bfloat16_cpu()}"
                    if policy != "float32" else "a GPU, or no native bfloat16 on this CPU")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        return _train(config, strategy, model_dir, chief, verbose, extra_callbacks,
                      final_weights, info)
    finally:
        # The model keeps its policy; what is built afterwards (an export) is not mixed.
        keras.mixed_precision.set_global_policy(previous)
        if lock:
            lock.release()


def _train(config, strategy, model_dir, chief, verbose, extra_callbacks, final_weights, info):
    t = config.train
    replicas = strategy.num_replicas_in_sync
    if replicas > 1 and "bn" in (config.model.backbone.norm, config.model.fpn.norm,
                                 config.model.mask_head.norm, config.model.box_head.norm):
        logger.warning("norm=bn under %d replicas: each replica keeps its own batch statistics; "
                       "use sync_bn (or frozen_bn) for identical models on every replica",
                       replicas)
    keras.utils.set_random_seed(t.seed)
    ckpt_dir = rundir.checkpoint_dir(model_dir)
    if chief:
        _remove_partial_checkpoints(ckpt_dir)
    else:
        ckpt_dir = os.path.join(model_dir, "tmp_worker", str(os.getpid()))
    os.makedirs(ckpt_dir, exist_ok=True)

    jit = config.train.jit_compile or _is_tpu(strategy)
    check_xla_devices(strategy, jit)
    with strategy.scope():
        model = build_model(config)
        model.compile(jit_compile=jit)
        model.optimizer.build(model.trainable_variables)
    model.category_ids, model.class_names = tuple(info.category_ids), tuple(info.class_names)
    dataset = _distributed_dataset(config, strategy, info)
    manager = tf.train.CheckpointManager(make_checkpoint(model, model.optimizer), ckpt_dir,
                                         max_to_keep=3)
    start = restore_finite(model, model_dir)
    if start is None:
        start = 0
        initialise(model, config)
    if chief:
        rundir.write_config(model_dir, config)
        rundir.write_labels(model_dir, info.category_ids, info.class_names)

    steps_per_epoch = math.gcd(t.steps, t.checkpoint_every)
    epochs = t.steps // steps_per_epoch
    nan_stop = StopOnNaN()
    callbacks = [nan_stop, CheckpointEvery(manager, t.checkpoint_every, t.steps),
                 *extra_callbacks]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "tensorboard"),
                                                     update_freq=t.log_every))
    if verbose == "auto":  # log in steps; an explicit 1 or 2 keeps Keras' per-epoch output
        verbose = 0
        if chief:
            callbacks.append(StepLogger(t.log_every, t.steps))
    t0 = time.time()
    history = None
    if start < t.steps:
        history = model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                            initial_epoch=start // steps_per_epoch, callbacks=callbacks,
                            verbose=verbose, shuffle=False)  # the pipeline shuffles
    elapsed = time.time() - t0
    end = int(model.optimizer.iterations.numpy())
    if final_weights and nan_stop.bad is None:
        model.save_weights(final_weights)
    last = {k: float(v[-1]) for k, v in (history.history if history else {}).items()}
    summary = {"model_dir": model_dir, "strategy": type(strategy).__name__,
               "replicas": replicas, "resumed_from_step": start, "final_step": end,
               "steps_run": end - start, "seconds": round(elapsed, 1),
               "seconds_per_step": round(elapsed / max(end - start, 1), 4),
               "latest_checkpoint": tf.train.latest_checkpoint(ckpt_dir),
               # Strict JSON: a NaN or Inf loss is null (stopped_on_nan says which).
               "final_logs": {k: last[k] if math.isfinite(last[k]) else None
                              for k in (*LOSS_KEYS, "loss", "learning_rate") if k in last},
               "stopped_on_nan": nan_stop.bad}
    if chief:
        rundir.write_json(os.path.join(model_dir, "summary.json"), summary)
    else:
        tf.io.gfile.rmtree(ckpt_dir)
    return model, summary


def _remove_partial_checkpoints(ckpt_dir: str) -> None:
    """Deletes what a save killed part-way leaves behind (``ckpt-N_temp/``): it is never
    referenced, and the previous checkpoint is intact."""
    for path in tf.io.gfile.glob(os.path.join(ckpt_dir, "*_temp*")):
        logger.warning("removing %s, left by a checkpoint write that did not finish", path)
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)


def restore_finite(model, model_dir: str) -> int | None:
    """Restores the newest checkpoint of ``model_dir`` whose weights are all finite, with the
    optimiser's state, and returns its step; None when the run has no checkpoint
    (:func:`mrcnn_tf.rundir.restore_newest_finite`).

    Raises:
      ValueError: the run has checkpoints but none is finite.
    """
    path = rundir.restore_newest_finite(model, model_dir, model.optimizer)
    if path is None:
        return None
    step = int(model.optimizer.iterations.numpy())
    print(f"resumed from {path} at step {step}", flush=True)
    return step


def require_data(config: Config, info) -> None:
    """Raises DataError, naming the source and counting the reasons, when the training source
    yields no usable image (every file fails to decode, say): training would otherwise run on
    nothing and stop without a word."""
    for _ in build_dataset(config, True, batch_size=1, info=info).take(1):
        return
    src = config.data.train
    where = src.annotation_file or src.tfrecord_pattern or src.source
    reasons = collections.Counter()
    for record in (info.coco.records if info.coco is not None else []):
        try:
            tf.io.decode_image(tf.io.read_file(record["file_name"]), channels=3,
                               expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            reasons[str(e.message).split(";")[0].split("[")[0].strip()[:80]] += 1
    detail = "; ".join(f"{n} x {r}" for r, n in reasons.most_common()) or "no image decoded"
    raise DataError(f"data.train: {where} yields no usable image ({detail})")


def _distributed_dataset(config: Config, strategy, info):
    if strategy.num_replicas_in_sync == 1:
        return build_dataset(config, True, info=info)
    return strategy.distribute_datasets_from_function(
        lambda ctx: build_dataset(config, True, input_context=ctx, info=info))


def validation_overlays(model, config: Config, class_names, num_images: int = 4,
                        info=None) -> list[tuple[int, object]]:
    """The model's detections drawn on the first ``num_images`` validation images (the eval
    pipeline's order, which is fixed): [(image_id, [H, W, 3] uint8)]."""
    import numpy as np

    from mrcnn_tf.visualize import draw_detections

    out = []
    if num_images < 1:
        return out
    for images, targets in build_dataset(config, training=False, info=info):
        sizes = targets["image_info"]["image_size"].numpy()
        det = model({"images": images, "image_sizes": sizes}, training=False)
        for b in range(images.shape[0]):
            h, w = sizes[b]
            image = images[b, :h, :w].numpy()
            one = {k: np.asarray(v[b]) for k, v in det.items()}
            out.append((int(targets["image_info"]["image_id"][b]),
                        draw_detections(image, one, class_names, score_threshold=0.5)))
            if len(out) >= num_images:
                return out
    return out


def draw_validation_predictions(model, config: Config, model_dir: str, class_names,
                                num_images: int = 4) -> list[str]:
    """Draws the model's detections on the first validation images into
    ``model_dir/predictions/*.png``; returns the paths."""
    from mrcnn_tf.visualize import save_png

    out_dir = os.path.join(model_dir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for image_id, drawn in validation_overlays(model, config, class_names, num_images):
        path = os.path.join(out_dir, f"val_{image_id}.png")
        save_png(path, drawn)
        paths.append(path)
    return paths
