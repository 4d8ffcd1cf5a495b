"""Converts a COCO instances file and its images to sharded TFRecords (Object Detection API /
Model Garden schema), in parallel.

    python -m mrcnn_tf.data.create_tfrecord --annotations instances_train2017.json \
        --images train2017/ --output out/train --shards 32 [--workers 8]

writes out/train-00000-of-00032.tfrecord ... Crowd instances are kept with is_crowd=1 (readers
drop them from the targets); images and annotations that cannot be used are skipped with a
warning naming them, and a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from queue import Empty

from mrcnn_tf.data.coco import CocoDataset, rasterize
from mrcnn_tf.progress import Progress


def shard_path(prefix: str, index: int, shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{shards:05d}.tfrecord"


def _write_shard(args):
    """Writes one shard from records already read and checked by the parent (the annotation file
    is read, and the image files checked, once). Reports progress on ``queue`` (or calls it)."""
    records, category_ids, names, path, queue = args
    # Imported here so that the parent process stays light and workers start cleanly (spawn).
    import tensorflow as tf

    from mrcnn_tf.data.tfrecord import make_example

    report = queue if callable(queue) else queue.put
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for rec in records:
            with open(rec["file_name"], "rb") as f:
                encoded = f.read()
            fmt = "png" if encoded.startswith(b"\x89PNG") else "jpeg"
            masks = rasterize(rec["segmentations"], rec["height"], rec["width"])
            cat_ids = [category_ids[c - 1] for c in rec["classes"]]
            writer.write(make_example(encoded, fmt, rec["height"], rec["width"], rec["image_id"],
                                      os.path.basename(rec["file_name"]), rec["boxes"], cat_ids,
                                      [names[c - 1] for c in rec["classes"]], rec["is_crowd"],
                                      masks))
            count += 1
            report(1)
    return count


def convert(annotations: str, images: str, output: str, shards: int = 1,
            workers: int | None = None) -> int:
    """Writes ``shards`` TFRecord files; returns the number of images written."""
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    coco = CocoDataset(annotations, images, keep_empty_images=True, include_crowd=True)
    print(coco.report.summary(), file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    records = coco.records
    progress = Progress(len(records), "create_tfrecord")
    jobs = [(records[i::shards], coco.category_ids, coco.class_names,
             shard_path(output, i, shards)) for i in range(shards)]
    workers = min(workers or os.cpu_count() or 1, shards)
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, context.Pool(workers) as pool:
            queue = manager.Queue()
            result = pool.map_async(_write_shard, [job + (queue,) for job in jobs])
            while not (result.ready() and queue.empty()):
                try:
                    progress.update(queue.get(timeout=0.2))
                except Empty:
                    pass
            counts = result.get()
    else:
        counts = [_write_shard(job + (progress.update,)) for job in jobs]
    progress.close()
    return sum(counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="COCO instances JSON + images -> sharded TFRecords")
    p.add_argument("--annotations", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--output", required=True, help="output prefix, e.g. out/train")
    p.add_argument("--shards", type=int, default=1, help="number of output files")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    args = p.parse_args(argv)
    from mrcnn_tf.cli import quiet

    quiet()
    n = convert(args.annotations, args.images, args.output, args.shards, args.workers)
    print(f"wrote {n} images to {args.shards} shard(s) at {args.output}-*-of-"
          f"{args.shards:05d}.tfrecord")
    return 0


if __name__ == "__main__":
    sys.exit(main())
