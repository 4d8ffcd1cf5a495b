"""Benchmark worker for Model Garden's Mask R-CNN (tf-models-official 2.20, its own TF 2.20 and
tf_keras), run in its own venv.

The model is ``official.vision.modeling.factory.build_maskrcnn`` of the
``maskrcnn_resnetfpn_coco`` experiment (through MaskRCNNTask.build_model), random weights, float32
or, with ``--precision bf16``, mixed bfloat16 (the experiment's own runtime setting); without XLA
(the experiment enables it for TPUs; ours cannot use it either), detection score threshold 0 as
ours in the same run. ``--measure e2e``: its input pipeline on the coco128 TFRecords (1024x1024,
flips, no scale jitter) feeding its task's ``train_step``, batch after batch. Inference takes the
image already normalised (Model Garden
normalises in its input pipeline, ours inside the model). The training step is the task's own
``train_step`` on one batch of its own input pipeline (which also computes the RPN targets).
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from protocol import serve, training_steps  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--measure", required=True, choices=("inference", "train", "data", "e2e"))
    p.add_argument("--batch", type=int, default=1, help="images per step (measure=e2e)")
    p.add_argument("--steps", type=int, default=5, help="steps per run (measure=e2e)")
    p.add_argument("--warmup_steps", type=int, default=5,
                   help="steps of the second call, the warm-up (measure=e2e)")
    p.add_argument("--inputs", required=True)
    p.add_argument("--tfrecord", default=None, help="TFRecord pattern (train: one image; data)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=16, help="batches per data run")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: tf_keras mixed_bfloat16, what the experiment's runtime "
                        "mixed_precision_dtype='bfloat16' sets")
    args = p.parse_args()

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import tf_keras
    from official.core import exp_factory, task_factory
    from official.vision import registry_imports  # noqa: F401  (registers the experiments)
    from official.vision.ops import preprocess_ops

    if args.precision == "bf16":
        tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    exp = exp_factory.get_exp_config("maskrcnn_resnetfpn_coco")
    exp.task.init_checkpoint = None
    exp.task.model.detection_generator.pre_nms_score_threshold = 0.0
    for data in (exp.task.train_data, exp.task.validation_data):
        data.dtype = "float32"
    exp.task.train_data.input_path = args.tfrecord or ""
    exp.task.train_data.global_batch_size = {"data": 8, "e2e": args.batch}.get(args.measure, 1)
    exp.task.train_data.shuffle_buffer_size = 64
    # Like ours in the same run: no scale jitter (the experiment's default is 0.8-1.25), flips on.
    exp.task.train_data.parser.aug_scale_min = 1.0
    exp.task.train_data.parser.aug_scale_max = 1.0
    task = task_factory.get_task(exp.task)
    state = {}
    describe = {"experiment": "maskrcnn_resnetfpn_coco", "tf": tf.__version__,
                "precision": args.precision,
                "input_size": list(exp.task.model.input_size),
                "test_proposals": exp.task.model.roi_generator.test_num_proposals,
                "box_head_convs": exp.task.model.detection_head.num_convs}

    if args.measure == "data":
        def build():
            state["it"] = iter(task.build_inputs(exp.task.train_data).repeat())

        def run_once():
            for _ in range(args.batches):
                next(state["it"])
            return {"images": args.batches * 8}

        serve(run_once, build, describe)
        return

    if args.measure == "e2e":
        def build():
            state["model"] = task.build_model()
            state["opt"] = tf_keras.optimizers.SGD(learning_rate=0.02 * args.batch / 16,
                                                   momentum=0.9)
            state["it"] = iter(task.build_inputs(exp.task.train_data))
            state["step"] = tf.function(
                lambda inputs: task.train_step(inputs, state["model"], state["opt"]))

        def step():
            return float(state["step"](next(state["it"]))["loss"])

        run_once = training_steps(state, step, args.warmup_steps, args.steps, args.batch)
        serve(run_once, build, {**describe, "batch": args.batch, "steps_per_run": args.steps})
        return

    def build():
        state["model"] = task.build_model()
        if args.measure == "train":
            state["opt"] = tf_keras.optimizers.SGD(learning_rate=0.001, momentum=0.9)
            state["batch"] = next(iter(task.build_inputs(exp.task.train_data)))
            state["step"] = tf.function(
                lambda inputs: task.train_step(inputs, state["model"], state["opt"]))
        else:
            image = tf.constant(np.load(args.inputs)["image_1024"][None], tf.float32)
            state["image"] = preprocess_ops.normalize_image(image[0])[None]
            state["shape"] = tf.constant([[1024.0, 1024.0]])
            state["fn"] = tf.function(
                lambda x, s: state["model"](x, image_shape=s, training=False))

    def run_once():
        if args.measure == "inference":
            out = state["fn"](state["image"], state["shape"])
            return {"detections": int(out["num_detections"][0])}
        logs = state["step"](state["batch"])
        return {"loss": float(logs["loss"])}

    serve(run_once, build, describe)


if __name__ == "__main__":
    main()
