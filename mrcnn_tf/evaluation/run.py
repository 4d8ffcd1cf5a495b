"""Evaluate a model over the eval dataset, during fit (callback) or from a model_dir."""

from __future__ import annotations

import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from mrcnn_tf import rundir
from mrcnn_tf.config import Config
from mrcnn_tf.data import build_dataset, source_info
from mrcnn_tf.evaluation.coco import CocoEvaluator
from mrcnn_tf.progress import Progress

logger = logging.getLogger("mrcnn_tf")


def make_evaluator(config: Config, info=None) -> tuple[CocoEvaluator, object]:
    """An evaluator for the eval source: COCO sources are scored against their annotation file,
    others against ground truth gathered from the pipeline."""
    info = info or source_info(config, training=False)
    gt = config.data.eval.annotation_file if config.data.eval.source == "coco" else None
    ev = CocoEvaluator(info.category_ids, info.class_names, gt,
                       config.model.detection.mask_threshold, config.model.detection.mask_paste)
    return ev, info


def evaluate(predict_fn, config: Config, info=None, max_images: int | None = None,
             results_path: str | None = None) -> dict:
    """Runs ``predict_fn`` over the eval dataset and scores it.

    Args:
      predict_fn: ``{"images": [B, S, S, 3], "image_sizes": [B, 2]} -> detections`` in the
        frame of the given images (a MaskRCNN, or a wrapper around a SavedModel).
      max_images: stop after this many images (default ``eval.num_images``, None = all).
      results_path: also write the COCO results JSON there.
    Returns: {"bbox": {...}, "segm": {...}, "per_class": {...}, "num_images": n, "seconds": t}.
    """
    ev, info = make_evaluator(config, info)
    limit = max_images if max_images is not None else config.eval.num_images
    t0 = time.time()
    seen = 0
    total = min(n for n in (limit, info.num_images) if n is not None) if (
        limit is not None or info.num_images is not None) else None
    progress = Progress(total, "evaluation")
    for images, targets in build_dataset(config, training=False, info=info):
        sizes = targets["image_info"]["image_size"]
        detections = predict_fn({"images": images, "image_sizes": sizes})
        ev.add_predictions(detections, targets["image_info"])
        if ev.gt is None:
            ev.add_ground_truth(targets, mini_masks=config.data.mask_mode == "mini")
        seen += int(images.shape[0])
        progress.update(int(images.shape[0]))
        if limit is not None and seen >= limit:
            break
    progress.close()
    results = ev.evaluate()
    if results_path:
        ev.write_results(results_path)
    results["num_images"] = seen
    results["seconds"] = round(time.time() - t0, 1)
    return results


def model_labels(model):
    """(category_ids, class_names) of a model's classes when it knows them (a model of
    ``load_run`` or ``train``), else None (the eval source's categories are the classes)."""
    ids, names = getattr(model, "category_ids", None), getattr(model, "class_names", None)
    return (list(ids), list(names)) if ids is not None and names is not None else None


def model_predict_fn(model):
    """A compiled (tf.function) inference function of a MaskRCNN."""
    fn = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)
    return lambda inputs: {k: v.numpy() for k, v in fn(inputs).items()}


def saved_model_predict_fn(export_dir: str, category_ids):
    """An inference function over an exported SavedModel's ``image_tensor`` signature, returning
    classes 1..N (mapped back from the dataset ids) and its full-frame masks."""
    sig = tf.saved_model.load(export_dir).signatures["image_tensor"]
    to_class = {int(c): i + 1 for i, c in enumerate(category_ids)}

    def fn(inputs):
        images = tf.cast(tf.clip_by_value(tf.round(inputs["images"]), 0, 255), tf.uint8).numpy()
        outs = []
        for b, (h, w) in enumerate(inputs["image_sizes"].numpy()):
            out = sig(images=tf.constant(images[b: b + 1, :h, :w]))
            outs.append({k: v.numpy() for k, v in out.items()})
        d = max(o["detection_masks"].shape[1] for o in outs)
        hh = max(o["detection_masks"].shape[2] for o in outs)
        ww = max(o["detection_masks"].shape[3] for o in outs)
        merged = {k: np.concatenate([o[k] for o in outs]) for k in
                  ("detection_boxes", "detection_scores", "detection_classes", "num_detections")}
        merged["detection_classes"] = np.vectorize(lambda c: to_class.get(int(c), 0))(
            merged["detection_classes"])
        masks = np.zeros((len(outs), d, hh, ww), np.uint8)
        for b, o in enumerate(outs):
            m = o["detection_masks"][0]
            masks[b, : m.shape[0], : m.shape[1], : m.shape[2]] = m
        merged["detection_masks"] = masks
        return merged

    return fn


def append_metrics(model_dir: str, entry: dict) -> None:
    """Appends one entry to ``model_dir/metrics.json`` (a JSON list), rewriting it atomically."""
    path = os.path.join(model_dir, "metrics.json")
    entries = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    entries.append(entry)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, path)


def _entry(step: int, results: dict) -> dict:
    return {"step": step, "bbox": results["bbox"], "segm": results["segm"],
            "per_class": results["per_class"], "num_images": results["num_images"]}


class CocoEvalCallback(keras.callbacks.Callback):
    """Evaluates during ``fit`` every ``every_n_steps`` optimiser steps (and, with
    ``at_epoch_end``, after every epoch): appends {"step", "bbox", "segm", ...} to
    ``model_dir/metrics.json`` and writes to TensorBoard (``tensorboard/eval``) the AP
    scalars, a per-class AP table, the precision-recall curves and prediction overlays. Only
    the chief writes; under MirroredStrategy the model is called in cross-replica context."""

    def __init__(self, config: Config, model_dir: str, every_n_steps: int | None = None,
                 at_epoch_end: bool = False, write: bool = True):
        super().__init__()
        self.config, self.model_dir = config, model_dir
        self.every = every_n_steps or config.eval.every_n_steps
        self.at_epoch_end, self.write = at_epoch_end, write
        self.info = None  # read when evaluating first, with the model's classes
        self._fn = None
        self._last = -1
        self._writer = tf.summary.create_file_writer(
            os.path.join(model_dir, "tensorboard", "eval")) if write else None
        self.history: list[dict] = []

    def evaluate_now(self):
        step = int(self.model.optimizer.iterations.numpy())
        if step == self._last:
            return
        self._last = step
        if self._fn is None:
            self._fn = model_predict_fn(self.model)
        if self.info is None:
            self.info = source_info(self.config, training=False, labels=model_labels(self.model))
        results = evaluate(self._fn, self.config, self.info)
        entry = _entry(step, results)
        self.history.append(entry)
        print(f"\nstep {step}: bbox AP {results['bbox']['AP']:.4f}, segm AP "
              f"{results['segm']['AP']:.4f} ({results['num_images']} images, "
              f"{results['seconds']} s)", flush=True)
        if self.write:
            append_metrics(self.model_dir, entry)
            self._summaries(step, results)

    def _summaries(self, step: int, results: dict) -> None:
        """TensorBoard: AP scalars; per-class AP as a text table; the precision-recall curves
        as an image; the predictions on the first ``eval.tensorboard_images`` validation images
        (the same images every time)."""
        from mrcnn_tf.training import validation_overlays
        from mrcnn_tf.visualize import draw_pr_curves

        # record_if(True): during fit, Keras' TensorBoard callback records only every
        # train.log_every steps, and an evaluation at another step would be dropped silently.
        with self._writer.as_default(step=step), tf.summary.record_if(True):
            for kind in ("bbox", "segm"):
                for k, v in results[kind].items():
                    tf.summary.scalar(f"{kind}/{k}", v)
            per_class = results["per_class"]
            rows = [f"| {name} | {per_class['bbox'][name]:.4f} | "
                    f"{per_class['segm'].get(name, -1.0):.4f} |" for name in per_class["bbox"]]
            tf.summary.text("per_class_AP", "\n".join(
                ["| class | bbox AP | segm AP |", "|---|---|---|", *rows]))
            curves = {f"{kind} {iou}": p for kind in ("bbox", "segm")
                      for iou, p in results["pr_curves"][kind].items()}
            tf.summary.image("precision_recall", draw_pr_curves(curves)[None])
            for image_id, drawn in validation_overlays(
                    self.model, self.config, self.info.class_names,
                    self.config.eval.tensorboard_images, self.info):
                tf.summary.image(f"predictions/{image_id}", drawn[None])
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) % self.every == 0:
            self.evaluate_now()

    def on_epoch_end(self, epoch, logs=None):
        if self.at_epoch_end:
            self.evaluate_now()


class CocoMetricCallback(keras.callbacks.Callback):
    """COCO box and mask AP as Keras metrics of ``fit``: at the end of every ``every_n_epochs``
    epoch it evaluates the model on the config's eval source (``data.eval``, at most
    ``num_images`` images) and writes ``val_bbox_AP``, ``val_bbox_AP50``, ``val_bbox_AP75``,
    ``val_bbox_APs/m/l`` and the same for ``val_segm_`` into the epoch's logs. Place it before
    the callbacks that read them; ``fit``'s History gets them too::

        model.fit(train, epochs=10, steps_per_epoch=500, callbacks=[
            CocoMetricCallback(config),
            keras.callbacks.EarlyStopping(monitor="val_segm_AP", mode="max", patience=2),
            keras.callbacks.ModelCheckpoint("best.weights.h5", monitor="val_segm_AP",
                                            mode="max", save_best_only=True,
                                            save_weights_only=True)])

    The classes are the model's (``model.category_ids``, set by ``mrcnn_tf.load_run`` and
    ``train.py``), else the eval source's categories.
    """

    def __init__(self, config: Config, every_n_epochs: int = 1, num_images: int | None = None,
                 prefix: str = "val_"):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"CocoMetricCallback: every_n_epochs must be >= 1, got "
                             f"{every_n_epochs}")
        from mrcnn_tf.data.pipeline import check_source

        check_source(config, training=False)  # a missing eval source fails before fit starts
        self.config, self.every, self.num_images = config, int(every_n_epochs), num_images
        self.prefix = prefix
        self.info = self._fn = None
        self.history: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        if self._fn is None:
            self._fn = model_predict_fn(self.model)
            self.info = source_info(self.config, training=False, labels=model_labels(self.model))
        results = evaluate(self._fn, self.config, self.info, max_images=self.num_images)
        metrics = {f"{self.prefix}{kind}_{k}": float(v) for kind in ("bbox", "segm")
                   for k, v in results[kind].items()}
        self.history.append({"epoch": epoch, **metrics})
        if logs is not None:
            logs.update(metrics)


def evaluate_model_dir(config: Config, model_dir: str, strategy=None) -> dict:
    """Restores the latest checkpoint of ``model_dir``, evaluates it and appends the result to
    ``model_dir/metrics.json``."""
    from mrcnn_tf.model import build_model

    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(config)
        model.compile()
    latest = rundir.restore_newest_finite(model, model_dir, model.optimizer)
    if latest is None:
        raise FileNotFoundError(f"--model_dir {model_dir}: no checkpoint in "
                                f"{rundir.checkpoint_dir(model_dir)} to evaluate")
    step = int(model.optimizer.iterations.numpy())
    logger.info("evaluating %s (step %d)", latest, step)
    # The model's classes mean what its label map says (e.g. a converted torchvision model
    # predicts COCO's 91-label space, not the annotation file's 80 contiguous classes).
    labels = rundir.read_labels(model_dir) if rundir.has_labels(model_dir) else None
    info = source_info(config, training=False, labels=labels)
    results = evaluate(model_predict_fn(model), config, info)
    append_metrics(model_dir, _entry(step, results))
    return {"checkpoint": latest, "step": step, **results}
