"""Benchmark worker for mrcnn_tf (our venv). See protocol.py.

    python benchmarks/workers/ours.py --measure inference|train|data|e2e
        --peer torchvision|modelgarden --inputs inputs.npz [--data_dir coco128]
    python benchmarks/workers/ours.py --measure order --peer torchvision --inputs inputs.npz
        --data_dir coco128 --batch B --count N --order_out order.json

``e2e`` reads coco128 in a seeded order (``data.deterministic=true``, ``train.seed``); ``order``
writes the image ids of the first N batches of that order, so that a peer can train on the same
photos in the same batches (``torchvision_worker.py --order``).
"""

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
REPO = pathlib.Path(__file__).resolve().parents[2]

from protocol import serve, training_steps  # noqa: E402

# Our model configured as each peer's architecture and counts, so that the comparison is of
# implementations rather than of model choices.
PEER_CONFIGS = {
    # torchvision maskrcnn_resnet50_fpn v1 at its default counts; score threshold 0 on both sides
    # so that both run the mask head on 100 detections.
    "torchvision": ("configs/torchvision_r50_fpn.yaml", [
        "model.detection.score_threshold=0.0"]),
    # Model Garden maskrcnn_resnetfpn_coco: 1024x1024, BN (trained) everywhere incl. FPN and the
    # 4conv1fc box head, nothing frozen, anchor offset 0.5, 2000/1000 train and 1000/1000 test
    # proposals, 512 RoIs, score threshold 0 (theirs set to 0 too).
    "modelgarden": ("configs/coco_r50_fpn_1x.yaml", [
        "model.num_classes=90", "model.backbone.norm=bn", "model.backbone.freeze_at=0",
        "model.fpn.norm=bn", "model.box_head.type=4conv1fc", "model.box_head.norm=bn",
        "model.mask_head.norm=bn", "model.anchors.offset=0.5", "model.rpn.pre_nms_topk_train=2000",
        "model.rpn.post_nms_topk_train=1000", "model.rpn.pre_nms_topk_test=1000",
        "model.rpn.post_nms_topk_test=1000", "model.detection.score_threshold=0.0",
        "model.preprocess.resize=square", "model.preprocess.square_size=1024",
        "data.image_size=1024", "data.canvas_long_sides=null"]),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--measure", required=True,
                   choices=("inference", "train", "data", "e2e", "order"))
    p.add_argument("--peer", required=True, choices=tuple(PEER_CONFIGS))
    p.add_argument("--inputs", required=True)
    p.add_argument("--data_dir", default=None, help="coco128 folder (measure=data)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=16, help="batches per data run")
    p.add_argument("--batch", type=int, default=1, help="images per step (measure=e2e)")
    p.add_argument("--steps", type=int, default=5, help="steps per run (measure=e2e)")
    p.add_argument("--warmup_steps", type=int, default=5,
                   help="steps of the second call, the warm-up (measure=e2e)")
    p.add_argument("--count", type=int, default=0, help="batches to list (measure=order)")
    p.add_argument("--order_out", default=None, help="JSON file (measure=order)")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: Keras mixed_bfloat16 (bfloat16 compute, float32 weights)")
    args = p.parse_args()

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import mrcnn_tf
    from mrcnn_tf.data import build_dataset

    if args.precision == "bf16":
        import keras

        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    path, overrides = PEER_CONFIGS[args.peer]
    overrides = list(overrides)
    if args.precision == "bf16":
        overrides.append("train.mixed_precision=mixed_bfloat16")
    if args.measure in ("data", "e2e", "order"):
        batch = 8 if args.measure == "data" else args.batch
        overrides += ["model.num_classes=80", "data.class_ids=contiguous",
                      "data.train.source=coco",
                      f"data.train.annotation_file={args.data_dir}/annotations/"
                      "instances_train2017.json",
                      f"data.train.image_dir={args.data_dir}/train2017",
                      f"train.batch_size={batch}", "data.cache=false"]
    if args.measure in ("e2e", "order"):
        overrides.append("data.deterministic=true")  # a seeded order, which `order` lists
    cfg = mrcnn_tf.load_config(REPO / path, overrides + args.set)
    if args.measure == "order":
        _write_order(cfg, args.count, args.order_out)
        return
    inputs = np.load(args.inputs)
    key = "800" if args.peer == "torchvision" else "1024"
    state = {}

    if args.measure == "data":
        def build():
            state["it"] = iter(build_dataset(cfg, training=True).repeat())

        def run_once():
            for _ in range(args.batches):
                next(state["it"])
            return {"images": args.batches * cfg.train.batch_size}

        serve(run_once, build, {"config": path, "batch": cfg.train.batch_size})
        return

    if args.measure == "e2e":
        # What train.py runs: build_dataset and the model's fit train function (one trace per
        # canvas), batch after batch from the same iterator.
        def build():
            state["it"] = iter(build_dataset(cfg, training=True))
            state["model"] = mrcnn_tf.build_model(cfg)
            state["model"].compile()
            state["fn"] = state["model"].make_train_function()

        def step():
            return float(state["fn"](state["it"])["loss"])

        import logging

        class CountTraces(logging.Handler):
            # keras_compat.step_function logs each trace of the train step (one per canvas).
            count = 0

            def emit(self, record):
                if "tracing the training step" in record.getMessage():
                    CountTraces.count += 1

        log = logging.getLogger("mrcnn_tf")
        log.addHandler(CountTraces())
        log.setLevel(logging.INFO)
        run_once = training_steps(state, step, args.warmup_steps, args.steps, args.batch,
                                  traces=lambda: CountTraces.count)
        serve(run_once, build, {"config": path, "overrides": overrides,
                                "precision": args.precision, "batch": args.batch,
                                "steps_per_run": args.steps, "pid": os.getpid()})
        return

    def build():
        state["model"] = mrcnn_tf.build_model(cfg)
        if args.measure == "train":
            state["model"].compile()
            state["step"] = tf.function(state["model"].train_step)
        else:
            state["fn"] = tf.function(lambda x: state["model"](x, training=False))

    image = inputs[f"image_{key}"]
    if args.measure == "inference":
        x = tf.constant(image[None])

        def run_once():
            out = state["fn"](x)
            return {"detections": int(out["num_detections"][0])}
    else:
        h, w = image.shape[:2]
        d = cfg.model.preprocess.size_divisibility
        ph, pw = -(-h // d) * d, -(-w // d) * d
        m = cfg.data.max_instances
        boxes, classes = inputs[f"boxes_{key}"], inputs["labels"]
        masks = inputs[f"masks_{key}"]
        n = len(classes)
        gt_boxes = np.zeros((1, m, 4), np.float32)
        gt_boxes[0, :n] = boxes
        gt_classes = -np.ones((1, m), np.int32)
        gt_classes[0, :n] = classes
        gt_masks = np.zeros((1, m, ph, pw), np.uint8)
        gt_masks[0, :n, :h, :w] = masks
        images = np.zeros((1, ph, pw, 3), np.float32)
        images[0, :h, :w] = image
        batch = (tf.constant(images), {
            "gt_boxes": tf.constant(gt_boxes), "gt_classes": tf.constant(gt_classes),
            "gt_masks": tf.constant(gt_masks),
            "image_info": {"image_size": tf.constant([[h, w]], tf.int32)}})

        def run_once():
            return {"loss": float(state["step"](batch)["loss"])}

    serve(run_once, build, {"config": path, "overrides": overrides, "precision": args.precision,
                            "input": list(image.shape), "pid": os.getpid()})


def _write_order(cfg, count: int, path: str):
    """The image ids of the first ``count`` training batches of ``cfg`` -> ``path`` (JSON list
    of lists). The dataset is read twice and must give the same ids both times: the order
    the e2e worker trains on is then this one."""
    import json

    from mrcnn_tf.data import build_dataset

    def ids():
        it = iter(build_dataset(cfg, training=True))
        return [next(it)[1]["image_info"]["image_id"].numpy().tolist() for _ in range(count)]

    first, second = ids(), ids()
    if first != second:
        sys.exit(f"order: two reads of the seeded dataset differ: {first[:4]} vs {second[:4]}")
    pathlib.Path(path).write_text(json.dumps(first))


if __name__ == "__main__":
    main()
