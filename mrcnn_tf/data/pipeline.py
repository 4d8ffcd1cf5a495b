"""tf.data input pipelines with static shapes: COCO JSON, TFRecord and synthetic shapes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from mrcnn_tf.config import Config, ConfigError, SourceConfig
from mrcnn_tf.data import shapes as shapes_lib
from mrcnn_tf.data.coco import CocoDataset, rasterize
from mrcnn_tf.data.report import DataError
from mrcnn_tf.data.tfrecord import parse_example
from mrcnn_tf.data.transforms import TransformParams, transform

logger = logging.getLogger("mrcnn_tf.data")
AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class SourceInfo:
    """What evaluation and export need to know about a source."""

    class_names: list[str]
    category_ids: list[int]  # dataset category id of contiguous class 1..N
    num_images: int | None
    coco: CocoDataset | None = None


def _check_source(src: SourceConfig, key: str) -> None:
    """The keys a source needs are set and name what exists (before anything is read)."""
    need = {"coco": ("annotation_file", "image_dir"), "tfrecord": ("tfrecord_pattern",),
            "shapes": ()}[src.source]
    for field in need:
        if not getattr(src, field):
            raise ConfigError(f"{key}.{field} is required when {key}.source={src.source}",
                              f"{key}.{field}")
    if src.annotation_file and not os.path.isfile(src.annotation_file):
        what = "is a directory" if os.path.isdir(src.annotation_file) else "not found"
        raise ConfigError(f"{key}.annotation_file: {src.annotation_file} {what}; set "
                          f"{key}.annotation_file=PATH to a COCO instances JSON",
                          f"{key}.annotation_file")
    if src.source == "coco" and not os.path.isdir(src.image_dir):
        raise ConfigError(f"{key}.image_dir: {src.image_dir} is not a directory; set "
                          f"{key}.image_dir=PATH to the folder of the images the JSON lists",
                          f"{key}.image_dir")
    if src.source == "tfrecord" and not tf.io.gfile.glob(src.tfrecord_pattern):
        raise ConfigError(f"{key}.tfrecord_pattern: no file matches {src.tfrecord_pattern!r}; "
                          "set it to a glob of the TFRecord shards (e.g. records/train-*)",
                          f"{key}.tfrecord_pattern")


def check_source(config: Config, training: bool) -> None:
    """Raises ConfigError naming the key when the train (or eval) source is not set or names a
    file or folder that does not exist: cheap, for programs to call before building a model."""
    spec = dataset_spec(config, training)
    _check_source(spec["source"], spec["key"])


def source_info(config: Config, training: bool, labels=None) -> SourceInfo:
    """Class names and category ids of the model's classes 1..N, and the train or eval source
    mapped onto them (reads the COCO JSON once).

    ``labels``: (category_ids, class_names) of the model's classes (a run's ``labels.json``);
    without it they come from the source and ``data.class_ids``: the JSON's categories in id
    order (contiguous; their number must be model.num_classes), or the category ids
    1..model.num_classes themselves (category_id, torchvision's COCO labels).
    """
    spec = dataset_spec(config, training)
    src, key, n = spec["source"], spec["key"], spec["num_classes"]
    _check_source(src, key)
    if src.source == "shapes":
        return SourceInfo(list(shapes_lib.CLASS_NAMES), [1, 2, 3], src.num_images)
    label_ids = list(labels[0]) if labels is not None else (
        list(range(1, n + 1)) if spec["class_ids"] == "category_id" else None)
    if src.source == "coco" or src.annotation_file:
        coco = CocoDataset(src.annotation_file, src.image_dir or "",
                           keep_empty_images=spec["keep_empty_images"],
                           max_instances=spec["max_instances"],
                           check_files=src.source == "coco", label_ids=label_ids)
        _check_categories(coco, spec, labels is not None)
        coco.report.log_summary()
        names = list(labels[1]) if labels is not None else coco.class_names
        return SourceInfo(names, coco.category_ids, len(coco.records), coco)
    if labels is not None:
        return SourceInfo(list(labels[1]), list(labels[0]), None)
    return SourceInfo([str(i) for i in range(1, n + 1)], list(range(1, n + 1)), None)


def _check_categories(coco: CocoDataset, spec: dict, from_run: bool) -> None:
    """Training data whose categories the model's classes cannot hold is refused, naming the
    fix; evaluation data may hold more (COCOeval scores those categories as not detected)."""
    key, n, where = spec["key"], spec["num_classes"], coco.annotation_file
    outside = [c for c in coco.json_category_ids if c not in coco.contiguous]
    if not spec["training"] or not outside:
        if spec["class_ids"] == "contiguous" and not from_run and \
                len(coco.json_category_ids) != n:
            raise ConfigError(
                f"{key}: {where} has {len(coco.json_category_ids)} categories but "
                f"model.num_classes is {n}: set model.num_classes="
                f"{len(coco.json_category_ids)} (each category a class, in id order), or "
                "data.class_ids=category_id where class i is category id i (torchvision's COCO "
                "models)", "model.num_classes")
        return
    listed = ", ".join(str(c) for c in outside[:5]) + (" ..." if len(outside) > 5 else "")
    if from_run:
        raise ConfigError(f"{key}: {where} has categories the model's classes (its run's "
                          f"labels.json) do not include: {listed}; train them in a new "
                          "--model_dir (model.init_from keeps every weight but the class layers)",
                          key)
    raise ConfigError(f"{key}: {where} has category ids above model.num_classes ({n}), which "
                      f"data.class_ids=category_id makes the classes: {listed}; set "
                      f"model.num_classes={max(outside)}, or data.class_ids=contiguous (the "
                      f"file's {len(coco.json_category_ids)} categories as classes 1..K, with "
                      f"model.num_classes={len(coco.json_category_ids)})", "data.class_ids")


def canvases(config: Config) -> tuple:
    """The training and evaluation canvases ((H, W), ...) by increasing area: one square of
    data.image_size, or, with data.canvas_long_sides, S x L and L x S for each long side L
    (S = model.preprocess.short_size rounded up to size_divisibility).

    Example: short 800, long sides (800, 1088, 1344) -> ((800, 800), (800, 1088), (1088, 800),
    (800, 1344), (1344, 800)).
    """
    d, pp = config.data, config.model.preprocess
    if d.canvas_long_sides is None:
        need = pp.square_size if pp.resize == "square" else pp.long_size
        if d.image_size < need:
            raise ConfigError(f"data.image_size ({d.image_size}) is smaller than the resized "
                              f"images (model.preprocess: {pp.resize}, up to {need} px); raise "
                              f"it to at least {need}")
        return ((d.image_size, d.image_size),)
    if pp.resize != "short_long":
        raise ConfigError("data.canvas_long_sides needs model.preprocess.resize=short_long (a "
                          "square resize fills one square canvas: set it to null)")
    div = pp.size_divisibility
    short = -(-pp.short_size // div) * div
    sides = list(d.canvas_long_sides)
    longest = -(-pp.long_size // div) * div
    if sides != sorted(set(sides)) or any(s % div or s < short for s in sides):
        raise ConfigError(f"data.canvas_long_sides {sides}: needs increasing multiples of "
                          f"model.preprocess.size_divisibility ({div}), each >= {short} (the "
                          "short side rounded up)")
    if sides[-1] < longest:
        raise ConfigError(f"data.canvas_long_sides: the largest ({sides[-1]}) must hold the "
                          f"longest resized side, model.preprocess.long_size rounded up: "
                          f"{longest}")
    out = {(short, side) for side in sides} | {(side, short) for side in sides}
    return tuple(sorted(out, key=lambda c: (c[0] * c[1], c[0])))


def transform_params(config: Config) -> TransformParams:
    d, pp = config.data, config.model.preprocess
    return TransformParams(canvases=canvases(config), resize=pp.resize,
                           short_size=pp.short_size, long_size=pp.long_size,
                           square_size=pp.square_size, max_instances=d.max_instances,
                           mask_mode=d.mask_mode, mask_resize=d.mask_resize,
                           mini_mask_size=d.mini_mask_size, hflip=d.hflip,
                           train_short_sizes=tuple(d.train_short_sizes or ()),
                           aug_scale_min=d.aug_scale_min, aug_scale_max=d.aug_scale_max,
                           image_dtype=d.image_dtype)


def grey_filled(data: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
    """Whether ``image``, decoded from the file bytes ``data``, is a JPEG cut short: libjpeg
    decodes a JPEG whose data ends early (an end marker appended to a truncated file, say)
    without an error, filling the missing blocks with zero coefficients, which decode to exactly
    (128, 128, 128). A photo whose whole last row and last 8x8 block are exactly that grey is
    taken for one."""
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")
    grey = tf.reduce_all(tf.equal(image[-1], 128)) & tf.reduce_all(tf.equal(image[-8:, -8:], 128))
    return is_jpeg & grey


def _coco_examples(info: SourceInfo, training, seed, input_context):
    records = info.coco.records
    report = info.coco.report
    paths = [r["file_name"] for r in records]
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(records)), paths))
    if input_context is not None:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)

    def targets(i):
        r = records[int(i)]
        masks = rasterize(r["segmentations"], r["height"], r["width"])
        return r["boxes"], r["classes"], masks, np.int64(r["image_id"])

    def load(i, path):
        data = tf.io.read_file(path)
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        boxes, classes, masks, image_id = tf.numpy_function(
            targets, [i], [tf.float32, tf.int32, tf.uint8, tf.int64], stateful=False)
        size = tf.shape(image)[:2]
        masks = tf.reshape(masks, tf.concat([[-1], size], 0))
        return {"image": image, "boxes": tf.reshape(boxes, [-1, 4]),
                "classes": tf.reshape(classes, [-1]), "masks": masks,
                "image_id": tf.reshape(image_id, []), "index": i,
                "cut_short": grey_filled(data, image)}

    warned = set()

    def warn(i):
        r = records[int(i)]
        if r["image_id"] not in warned:
            warned.add(r["image_id"])
            report.warn("image", r["image_id"], "truncated JPEG (its last blocks are libjpeg's "
                        f"grey fill for missing data): {r['file_name']}")
        return False

    def usable(e):
        return tf.cond(e["cut_short"], lambda: tf.numpy_function(warn, [e["index"]], tf.bool),
                       lambda: tf.constant(True))

    return ds.map(load, num_parallel_calls=AUTOTUNE).filter(usable)


def _tfrecord_examples(src, info, training, seed, input_context, deterministic, shuffle_buffer):
    files = tf.io.gfile.glob(src.tfrecord_pattern)
    if not files:
        raise DataError(f"data: no TFRecord files match {src.tfrecord_pattern!r}")
    ds = tf.data.Dataset.from_tensor_slices(sorted(files))
    if input_context is not None:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                       num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ids = info.category_ids if info.coco is not None else None
    return ds.map(lambda s: parse_example(s, ids), num_parallel_calls=AUTOTUNE)


def _shapes_examples(src, size, training, seed, input_context):
    ds = tf.data.Dataset.range(src.num_images)
    if input_context is not None:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(src.num_images, seed=seed, reshuffle_each_iteration=True)

    def gen(i):
        e = shapes_lib.make_example(src.seed, int(i), size)
        return e["image"], e["boxes"], e["classes"], e["masks"], e["image_id"]

    def load(i):
        image, boxes, classes, masks, image_id = tf.numpy_function(
            gen, [i], [tf.uint8, tf.float32, tf.int32, tf.uint8, tf.int64], stateful=False)
        return {"image": tf.reshape(image, [size, size, 3]), "boxes": tf.reshape(boxes, [-1, 4]),
                "classes": tf.reshape(classes, [-1]),
                "masks": tf.reshape(masks, [-1, size, size]), "image_id": tf.reshape(image_id, [])}

    return ds.map(load, num_parallel_calls=AUTOTUNE)


def dataset_spec(config: Config, training: bool) -> dict:
    """Everything :func:`build_dataset` takes from the configuration (its one reader of it)."""
    d, pp = config.data, config.model.preprocess
    src = d.train if training else d.eval
    return {
        "key": "data.train" if training else "data.eval", "source": src, "training": training,
        "num_classes": config.model.num_classes, "class_ids": d.class_ids,
        "transform": transform_params(config),
        "batch_size": config.train.batch_size if training else config.eval.batch_size,
        "deterministic": d.deterministic or not training,
        "seed": config.train.seed if d.deterministic else None,
        "cache": d.cache, "shuffle_buffer": d.shuffle_buffer,
        "shapes_size": pp.square_size if pp.resize == "square" else d.image_size,
        "keep_empty_images": not training or d.keep_empty_images,
        "max_instances": d.max_instances,
    }


def build_dataset(config: Config, training: bool, batch_size: int | None = None,
                  input_context: tf.distribute.InputContext | None = None,
                  info: SourceInfo | None = None) -> tf.data.Dataset:
    """The train (``training=True``) or eval dataset of ``config``: ``(images, targets)``.

    Reads ``config.data`` (sources, canvas, augmentation) and ``config.model.preprocess`` (the
    resize rule, so the pipeline's images are already at the model's scale).

    Yields:
      images: [B, H, W, 3] float32 (or uint8) 0..255, resized keeping the aspect ratio and
        padded to the batch's canvas (H, W), one of :func:`canvases` (static [B, S, S, 3] with
        one square canvas).
      targets: ``gt_boxes`` [B, M, 4] float32 (y1, x1, y2, x2) pixels of the padded frame;
        ``gt_classes`` [B, M] int32 (1..N, -1 padding); ``gt_masks`` [B, M, H, W] uint8 (or
        [B, M, m, m] mini-masks inside each box); ``image_info``: ``image_id`` [B] int64,
        ``original_size`` [B, 2], ``image_size`` [B, 2] (content size), ``resize_factor`` [B, 2]
        (resized / original).
      Training batches drop the remainder (static shapes); evaluation keeps every image.

    Args:
      batch_size: per-pipeline batch; default ``train.batch_size`` / ``eval.batch_size``, or
        the per-replica share of it when ``input_context`` is given.
      input_context: from ``strategy.distribute_datasets_from_function``: each input pipeline
        reads its own shard.
      info: a :func:`source_info` result to reuse (it reads the annotation file).
    """
    spec = dataset_spec(config, training)
    key, src = spec["key"], spec["source"]
    _check_source(src, key)
    info = info or source_info(config, training)
    if len(info.class_names) != spec["num_classes"]:
        raise ConfigError(f"{key} has {len(info.class_names)} classes but "
                          f"model.num_classes is {spec['num_classes']}: set "
                          f"model.num_classes={len(info.class_names)}", "model.num_classes")
    params = spec["transform"]
    if batch_size is None:
        batch_size = spec["batch_size"]
        if input_context is not None:
            batch_size = input_context.get_per_replica_batch_size(batch_size)
    deterministic, seed = spec["deterministic"], spec["seed"]

    if src.source == "coco":
        ds = _coco_examples(info, training, seed, input_context)
    elif src.source == "tfrecord":
        ds = _tfrecord_examples(src, info, training, seed, input_context, deterministic,
                                spec["shuffle_buffer"])
    else:
        ds = _shapes_examples(src, spec["shapes_size"], training, seed, input_context)
    # A file that passed the cheap checks but fails to decode is skipped, not fatal.
    ds = ds.ignore_errors(log_warning=True)
    if spec["cache"]:
        ds = ds.cache()
        if training:
            ds = ds.shuffle(spec["shuffle_buffer"], seed=seed, reshuffle_each_iteration=True)
    if training:
        ds = ds.repeat()
    ds = ds.map(lambda e: transform(e, params, training), num_parallel_calls=AUTOTUNE)
    if len(params.canvases) == 1:
        ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    else:
        # Batches of one canvas each (torchvision's GroupedBatchSampler, detectron2's
        # AspectRatioGroupedDataset, with a fixed set of shapes).
        ds = ds.group_by_window(
            key_func=lambda image, _: tf.cast(tf.shape(image)[0] * 100000 + tf.shape(image)[1],
                                              tf.int64),
            reduce_func=lambda _, window: window.batch(batch_size, drop_remainder=training),
            window_size=batch_size)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF if input_context is not None
        else tf.data.experimental.AutoShardPolicy.DATA)
    return ds.with_options(options).prefetch(AUTOTUNE)
