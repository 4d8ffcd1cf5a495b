"""The Mask R-CNN model: one thin keras.Model composing the layers built by the factory."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mrcnn_tf import keras_compat
from mrcnn_tf import losses as L
from mrcnn_tf.config import Config, config_from_dict, to_dict
from mrcnn_tf.ops._graph import dims

DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "detection_masks",
                  "num_detections")
LOSS_KEYS = ("loss_rpn_objectness", "loss_rpn_box", "loss_box_class", "loss_box_reg",
             "loss_mask")


def _unpack(inputs):
    if isinstance(inputs, dict):
        unknown = set(inputs) - {"images", "image_sizes"}
        if unknown:
            raise ValueError(f"MaskRCNN inputs: unknown keys {sorted(unknown)}; expected "
                             "'images' and optionally 'image_sizes'")
        return inputs["images"], inputs.get("image_sizes")
    return inputs, None


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class MaskRCNN(keras.Model):
    """Mask R-CNN (He et al., 2017) with a ResNet-FPN backbone.

    ``model(images)`` takes [B, H, W, C] uint8 or float images in 0..255 of any size (or a dict
    ``{"images": ..., "image_sizes": [B, 2]}`` for a zero-padded batch of images of different
    sizes) and returns::

        detection_boxes   [B, D, 4] float32 (y1, x1, y2, x2) pixels of the images as given
        detection_scores  [B, D] float32
        detection_classes [B, D] int32 in 1..num_classes
        detection_masks   [B, D, 28, 28] float32 probabilities inside each box
        num_detections    [B] int32; rows past it are zero

    ``mrcnn_tf.paste_masks`` turns the masks into full-size binary masks.

    Build it with ``mrcnn_tf.build_model(config)``: ``mrcnn_tf/factory.py`` reads the config and
    hands this class its parts, which are also handles for fine-tuning (``backbone``, ``fpn``,
    ``rpn_head``, ``box_head``, ``mask_head``; e.g. ``model.backbone.trainable = False``):
    Keras layers, the ``anchor_generator``, the training ``targets`` (a
    :class:`~mrcnn_tf.targets.TargetAssigner`), the ``loss_terms`` (a
    :class:`~mrcnn_tf.losses.Losses`), the gradient ``clip_norm`` and a zero-argument
    ``optimizer_factory`` for ``compile()``. ``config`` is what ``get_config()`` saves; the model
    itself reads nothing of it.
    """

    def __init__(self, *, preprocessor, backbone, fpn, rpn_head, anchor_generator,
                 proposal_generator, box_roi_align, box_head, mask_roi_align, mask_head,
                 detection_generator, targets, loss_terms, clip_norm=None, optimizer_factory=None,
                 config=None, **kwargs):
        super().__init__(**kwargs)
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.fpn = fpn
        self.rpn_head = rpn_head
        self.anchor_generator = anchor_generator
        self.proposal_generator = proposal_generator
        self.box_roi_align = box_roi_align
        self.box_head = box_head
        self.mask_roi_align = mask_roi_align
        self.mask_head = mask_head
        self.detection_generator = detection_generator
        self.targets = targets
        self.loss_terms = loss_terms  # not ``losses``: Keras' regularisation losses
        self.clip_norm = clip_norm
        self.optimizer_factory = optimizer_factory
        self.config = config
        self.loss_trackers = {k: keras.metrics.Mean(name=k) for k in LOSS_KEYS + ("loss",)}
        self.xla = False  # compile(jit_compile=True)
        # What classes 1..N are, when known (mrcnn_tf.load_run sets them from labels.json).
        self.category_ids = self.class_names = None

    # -- the algorithm, one screen -----------------------------------------------------------

    def call(self, inputs, training=False):
        images, image_sizes = _unpack(inputs)
        original_sizes = self._original_sizes(images, image_sizes)
        # Without image_sizes every image fills the tensor: the preprocessor resizes the batch at
        # once.
        pre = self.preprocessor(images, image_sizes)
        features = self.fpn(self.backbone(pre["images"], training=training), training=training)
        rpn = self.rpn_head(features, training=training)
        anchors = self.anchors(features, dims(pre["images"])[1:3])
        proposals = self.proposal_generator(rpn["objectness"], rpn["deltas"], anchors,
                                            pre["image_sizes"], training=training)
        box = self.box_head(self.box_roi_align(features, proposals["boxes"]), training=training,
                            valid=proposals["valid"])
        detections = self.detection_generator(box["class_logits"], box["box_deltas"],
                                              proposals["boxes"], proposals["valid"],
                                              pre["image_sizes"])
        detections["detection_masks"] = self.predict_masks(features, detections, training)
        return self.postprocess(detections, pre["resize_factors"], original_sizes)

    def forward_train(self, images, targets, training=True, return_targets=False):
        """Losses of one batch from the data contract (mrcnn_tf.data.build_dataset).

        Args:
          images: [B, H, W, 3] at the model's scale (resized by the pipeline), each image's
            content at the top left.
          targets: ``gt_boxes`` [B, M, 4], ``gt_classes`` [B, M] (-1 padding), ``gt_masks``
            [B, M, H, W] or mini-masks [B, M, m, m], ``image_info["image_size"]`` [B, 2].
          return_targets: also return what the losses were computed against (for inspection).
        Returns:
          {loss_rpn_objectness, loss_rpn_box, loss_box_class, loss_box_reg, loss_mask}, each
          already weighted, float32; with ``return_targets``, (losses, {"rpn": anchor labels
          and samples (:meth:`TargetAssigner.rpn`), "rois": the sampled RoIs
          (:meth:`TargetAssigner.rois`), "mask_targets": [B, F, 28, 28]}).
        """
        gt_boxes = tf.cast(targets["gt_boxes"], tf.float32)
        gt_classes = tf.cast(targets["gt_classes"], tf.int32)
        gt_valid = gt_classes > 0
        pre = self.preprocessor(images, targets.get("image_info", {}).get("image_size"),
                                resize=False)
        features = self.fpn(self.backbone(pre["images"], training=training), training=training)
        rpn = self.rpn_head(features, training=training)
        anchors_by_level = self.anchors(features, dims(pre["images"])[1:3])
        anchors = tf.concat(anchors_by_level, 0)
        rpn_targets = self.targets.rpn(anchors, gt_boxes, gt_valid)
        proposals = self.proposal_generator(rpn["objectness"], rpn["deltas"], anchors_by_level,
                                            pre["image_sizes"], training=True)
        rois = self.targets.rois(proposals["boxes"], proposals["valid"], gt_boxes, gt_classes,
                                 gt_valid)
        box = self.box_head(self.box_roi_align(features, rois["boxes"]), training=training,
                            valid=rois["valid"])
        mask_logits = self.mask_head(self.mask_roi_align(features, rois["fg"]["boxes"]),
                                     training=training, valid=rois["fg"]["foreground"])
        mask_targets = self.targets.masks(targets["gt_masks"], gt_boxes, rois["fg"]["boxes"],
                                          rois["fg"]["matched"], pre["image_sizes"],
                                          mask_logits.shape[2])
        rpn_all = {k: tf.concat(v, axis=1) for k, v in rpn.items()}
        losses = self.loss_terms(rpn_all, rpn_targets, anchors, self.targets.rpn_coder, box,
                                 rois, mask_logits, mask_targets)
        if return_targets:
            return losses, {"rpn": rpn_targets, "rois": rois, "mask_targets": mask_targets}
        return losses

    # -- pieces --------------------------------------------------------------------------------

    @staticmethod
    def _original_sizes(images, image_sizes):
        if image_sizes is not None:
            return tf.cast(image_sizes, tf.int32)
        shape = tf.shape(images)
        return tf.tile(shape[None, 1:3], [shape[0], 1])

    def _grids(self, features):
        return {lv: tuple(dims(features[f"p{lv}"])[1:3]) for lv in self.rpn_head.levels}

    def anchors(self, features, image_size):
        """Anchors per RPN level, [H_l * W_l * A, 4] each, for the padded input size."""
        by_level = self.anchor_generator((image_size[0], image_size[1]), self._grids(features))
        return [by_level[lv] for lv in self.rpn_head.levels]

    def predict_masks(self, features, detections, training=False):
        """Mask probabilities [B, D, 28, 28] for each detection's class."""
        real = tf.range(tf.shape(detections["detection_boxes"])[1])[None, :] < (
            detections["num_detections"][:, None])
        logits = self.mask_head(self.mask_roi_align(features, detections["detection_boxes"]),
                                training=training, valid=real)
        if logits.shape[-1] == 1:
            picked = logits[..., 0]
        else:
            classes = tf.cast(detections["detection_classes"], tf.int32)
            picked = tf.gather(tf.transpose(logits, [0, 1, 4, 2, 3]), classes[..., None],
                               batch_dims=2)[:, :, 0]
        return tf.where(real[..., None, None], tf.sigmoid(tf.cast(picked, tf.float32)), 0.0)

    @staticmethod
    def postprocess(detections, resize_factors, original_sizes):
        """Maps boxes from the resized frame back to each original image: divided by each
        image's resize factor (resized / original per axis, torchvision's ratio)."""
        f = tf.tile(tf.cast(resize_factors, tf.float32), [1, 2])[:, None, :]  # (fy, fx, fy, fx)
        boxes = detections["detection_boxes"] / f
        size = tf.tile(tf.cast(original_sizes, tf.float32), [1, 2])[:, None, :]
        boxes = tf.clip_by_value(boxes, 0.0, size)
        out = dict(detections)
        out["detection_boxes"] = boxes
        return {k: out[k] for k in DETECTION_KEYS}

    # -- Keras training ------------------------------------------------------------------------

    def compile(self, optimizer=None, jit_compile=False, **kwargs):
        """Keras compile with this model's defaults: the optimiser of its config when none is
        given (its warmup and step schedule included), and XLA only when asked
        (``jit_compile=True``) and when every part has static shapes (:meth:`xla_blockers`);
        ``"auto"`` means no XLA, because the default implementations (crop_and_resize,
        TensorFlow's NMS kernels) have no XLA kernel.

        The model computes its own five losses and targets, so ``loss``, ``metrics`` and
        ``steps_per_execution`` > 1 are refused with the reason (COCO AP during ``fit``:
        :class:`mrcnn_tf.evaluation.CocoMetricCallback`)."""
        if jit_compile not in (False, None, "auto", True):
            raise ValueError(f"MaskRCNN.compile: jit_compile must be True or False, got "
                             f"{jit_compile!r}")
        for key in ("loss", "loss_weights"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"MaskRCNN.compile: {key}={kwargs[key]!r} is not used: the model computes "
                    "its five losses itself (loss_rpn_objectness, loss_rpn_box, loss_box_class, "
                    "loss_box_reg, loss_mask); weigh them with the config's "
                    "model.*.loss_weight keys")
        for key in ("metrics", "weighted_metrics"):
            if kwargs.get(key):
                raise ValueError(
                    f"MaskRCNN.compile: {key}={kwargs[key]!r} cannot be computed: the model's "
                    "outputs are detections, not the targets of a Keras metric. For COCO box "
                    "and mask AP in fit's logs and history (val_bbox_AP, val_segm_AP), pass "
                    "mrcnn_tf.evaluation.CocoMetricCallback(config) in fit's callbacks")
        if kwargs.get("steps_per_execution", 1) != 1:
            raise ValueError("MaskRCNN.compile: steps_per_execution must be 1 (each step is "
                             "traced for its own canvas shape and runs one batch)")
        if jit_compile is True:
            blockers = self.xla_blockers()
            if blockers:
                raise ValueError("MaskRCNN cannot be jit-compiled with these settings; set "
                                 + "; ".join(blockers))
        if optimizer is None:
            if self.optimizer_factory is None:
                raise ValueError("MaskRCNN.compile: pass an optimizer (this model was built "
                                 "without one; mrcnn_tf.build_model gives it the config's)")
            optimizer = self.optimizer_factory()
        super().compile(optimizer=optimizer, jit_compile=False, **kwargs)
        # Keras' own switch stays off: step_function compiles train_step and test_step itself.
        self.xla = jit_compile is True
        self.optimizer.build(self.trainable_variables)

    def xla_blockers(self) -> list[str]:
        """The config settings XLA needs (``jit_compile``, TPUs) that this model lacks, each as
        ``key=value (reason)``; empty when the whole training step and inference on a batch of
        one image size compile."""
        out = []
        if (self.box_roi_align.impl != "gather" or self.mask_roi_align.impl != "gather"
                or not self.targets.static_masks):
            out.append("model.roi_align.impl=gather (crop_and_resize and the mask targets' "
                       "per-RoI windows have no static shape)")
        if "tf" in (self.proposal_generator.nms_impl, self.detection_generator.nms_impl):
            out.append("model.nms_impl=static (NonMaxSuppressionV5 and "
                       "CombinedNonMaxSuppression have no XLA kernel)")
        if not self.targets.static_foreground:
            out.append("model.mask_head.static_rois=true (the batch's positives are a dynamic "
                       "count)")
        return out

    def fit(self, x=None, y=None, *args, callbacks=None, shuffle=None, **kwargs):
        """Keras ``fit``. A ``tf.data`` input is shuffled by its pipeline, so ``shuffle``
        defaults to False there (Keras would warn that it ignores True). Keras' callbacks that
        set the learning rate (LearningRateScheduler, ReduceLROnPlateau) need an optimiser
        with a settable rate: with the config's schedule (``compile()``'s default) they are
        refused before training, saying how to compile for them."""
        if shuffle is None:
            shuffle = not isinstance(x, tf.data.Dataset | tf.distribute.DistributedDataset)
        setters = (keras.callbacks.LearningRateScheduler, keras.callbacks.ReduceLROnPlateau)
        setting = [type(c).__name__ for c in callbacks or () if isinstance(c, setters)]
        if setting and self.optimizer is not None and _has_schedule(self.optimizer):
            raise ValueError(
                f"MaskRCNN.fit: keras.callbacks.{setting[0]} sets the optimiser's learning "
                "rate, but this model was compiled with the config's schedule (warmup, then "
                "steps: train.warmup_steps, train.decay_steps), which Keras cannot set. Compile "
                "with a constant rate for the callback to drive, e.g. model.compile(optimizer="
                "mrcnn_tf.optim.build_optimizer(config.train, schedule=False)), or drop the "
                "callback and keep the schedule")
        with keras_compat.quiet_end_of_data(kwargs.get("steps_per_epoch")):
            return super().fit(x, y, *args, callbacks=callbacks, shuffle=shuffle, **kwargs)

    def evaluate(self, x=None, y=None, *args, steps=None, **kwargs):
        """Keras ``evaluate``: the five losses on ``x`` (COCO AP:
        :func:`mrcnn_tf.evaluation.run.evaluate` or ``CocoMetricCallback``)."""
        with keras_compat.quiet_end_of_data(steps):
            return super().evaluate(x, y, *args, steps=steps, **kwargs)

    def predict(self, x, *args, steps=None, **kwargs):
        """Keras ``predict``: the detections of every batch of ``x``, concatenated."""
        with keras_compat.quiet_end_of_data(steps):
            return super().predict(x, *args, steps=steps, **kwargs)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras ``load_weights`` (``.weights.h5``), which also takes what ``train.py`` writes:
        a run directory (its newest finite checkpoint) or a checkpoint prefix
        (``RUN/checkpoints/ckpt-400``). For a run with its own configuration, use
        ``mrcnn_tf.load_run(model_dir)``, which also builds the run's model."""
        import os

        from mrcnn_tf import rundir
        from mrcnn_tf.checkpoint import restore

        path = os.fspath(filepath)
        if os.path.isdir(path) and os.path.isdir(rundir.checkpoint_dir(path)):
            if rundir.restore_newest_finite(self, path) is None:
                raise FileNotFoundError(f"{path}: no checkpoint in {rundir.checkpoint_dir(path)}")
            return None
        if os.path.exists(path + ".index"):
            return restore(self, path)
        return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def check_targets(self, data):
        """Refuses, before the step runs, a batch whose ``gt_classes`` exceed the model's
        classes (a user's own pipeline): the loss would fail deep inside TensorFlow. Eager;
        ``data`` is one batch, or its per-replica values under a strategy."""
        targets = data[1] if isinstance(data, tuple | list) and len(data) > 1 else None
        if not isinstance(targets, dict) or "gt_classes" not in targets:
            return
        classes = targets["gt_classes"]
        values = getattr(classes, "values", None) or (classes,)
        top = max(int(tf.reduce_max(tf.cast(v, tf.int32))) for v in values)
        limit = self.box_head.num_classes
        if top > limit:
            raise ValueError(
                f"targets['gt_classes'] holds class {top}, but the model has "
                f"{limit} classes (1..{limit}; 0 background, -1 padding): map the dataset's "
                f"categories to 1..{limit}, or build the model with model.num_classes={top} "
                "or more")

    def get_compile_config(self):
        return super().get_compile_config()

    def compile_from_config(self, config):
        """Compiles a model loaded from a ``.keras`` file with its saved optimiser (its state is
        restored afterwards, so ``fit`` continues at the saved step)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    def _log(self, losses, total, **extra):
        """Updates the trackers with values summed over replicas (identical on every one)."""
        for k, v in losses.items():
            self.loss_trackers[k].update_state(L.global_sum(v))
        self.loss_trackers["loss"].update_state(L.global_sum(total))
        logs = {k: t.result() for k, t in self.loss_trackers.items()}
        logs.update(extra)
        return keras_compat.multi_worker_logs(logs)

    def train_step(self, data):
        images, targets = data[0], data[1]
        variables = self.trainable_variables
        opt = self.optimizer
        with tf.GradientTape() as tape:
            losses = self.forward_train(images, targets, training=True)
            total = tf.add_n(list(losses.values()))
            scaled = opt.scale_loss(total) if hasattr(opt, "scale_loss") else total
        grads = tape.gradient(scaled, variables)
        if self.clip_norm:
            loss_scale = (tf.cast(opt.dynamic_scale, tf.float32) if hasattr(opt, "dynamic_scale")
                          else 1.0)
            grads = L.clip_by_global_norm(grads, self.clip_norm, loss_scale)
        opt.apply_gradients(zip(grads, variables))
        return self._log(losses, total, learning_rate=tf.cast(opt.learning_rate, tf.float32))

    def test_step(self, data):
        losses = self.forward_train(data[0], data[1], training=False)
        return self._log(losses, tf.add_n(list(losses.values())))

    def predict_step(self, data):
        if isinstance(data, (tuple, list)):
            data = data[0]
        return self(data, training=False)

    # -- Keras plumbing ------------------------------------------------------------------------

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = keras_compat.step_function(self, self.train_step, "training",
                                                             self.xla, self.check_targets)
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = keras_compat.step_function(self, self.test_step, "test",
                                                            self.xla, self.check_targets)
        return self.test_function

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if keras_compat.skip_symbolic_build(self):
            return None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None,
               **kwargs):
        """Keras' export, for raw uint8 images [B, H, W, C] of any size by default (the
        project's own TF Serving export, with image bytes, tf.Example inputs and pasted masks,
        is ``mrcnn_tf.serving.export_saved_model``)."""
        if input_signature is None and format == "tf_saved_model":
            channels = self.backbone.input_channels
            input_signature = [tf.TensorSpec([None, None, None, channels], tf.uint8, "images")]
        return super().export(filepath, format=format, verbose=verbose,
                              input_signature=input_signature, **kwargs)

    def build(self, input_shape=None):
        """Creates every weight by running the model once on a small blank image."""
        if self.built:
            return
        self.built = True  # before the call, or Keras would call build again
        channels = self.backbone.input_channels
        self(np.zeros((1, 64, 64, channels), np.uint8), training=False)

    def get_config(self):
        if self.config is None:
            raise NotImplementedError("a MaskRCNN assembled by hand has no config to save; "
                                      "build it with mrcnn_tf.build_model(config)")
        return {"config": to_dict(self.config), "name": self.name}

    @classmethod
    def from_config(cls, config):
        from mrcnn_tf.factory import model_parts

        cfg = config["config"]
        cfg = cfg if isinstance(cfg, Config) else config_from_dict(cfg)
        return cls(**model_parts(cfg), name=config.get("name", "mask_rcnn"))


def _has_schedule(optimizer) -> bool:
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    return isinstance(getattr(inner, "_learning_rate", None),
                      keras.optimizers.schedules.LearningRateSchedule)


@keras.saving.register_keras_serializable(package="mrcnn_tf")
class RunDirectory:
    """What ``keras.models.load_model(MODEL_DIR)`` builds for a run directory (its config.json
    names this class, ``mrcnn_tf.rundir.KERAS_POINTER``): an error saying how to load it."""

    def get_config(self):  # Keras registers only classes that have one
        return {}

    @classmethod
    def from_config(cls, config):
        raise ValueError("this is an mrcnn_tf run directory (train.py or mrcnn_tf.tools.convert), "
                         "not a Keras model file: load its trained model with "
                         "mrcnn_tf.load_run(model_dir), or model.load_weights(model_dir) into "
                         "a model of the same config")


def build_model(config: Config) -> MaskRCNN:
    """A built MaskRCNN for ``config`` (weights created, ready to load or train)."""
    model = MaskRCNN.from_config({"config": config, "name": "mask_rcnn"})
    model.build()
    return model


CLASS_DEPENDENT = ("box_head/class_logits", "box_head/box_deltas", "mask_head/mask_logits")


def with_num_classes(model: MaskRCNN, num_classes: int) -> MaskRCNN:
    """A new model for ``num_classes`` foreground classes carrying every weight of ``model``
    except the class-dependent output layers (box class logits and deltas, mask predictor),
    which are freshly initialised: the usual start of fine-tuning on a new dataset."""
    import dataclasses

    cfg = model.config
    new_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 num_classes=int(num_classes)))
    new = build_model(new_cfg)
    old = {weight_key(w.path): w for w in model.weights}
    for w in new.weights:
        path = weight_key(w.path)
        if any(path.startswith(p) for p in CLASS_DEPENDENT):
            continue
        w.assign(old[path])
    for name in ("backbone", "fpn", "rpn_head", "box_head", "mask_head"):
        getattr(new, name).trainable = getattr(model, name).trainable
    return new


def weight_key(path: str) -> str:
    """Weight path without the model's own name: 'box_head/fc1/kernel'."""
    return path.split("/", 1)[1] if "/" in path else path
