"""Train (and evaluate) Mask R-CNN.

    python train.py                                   # configs/shapes.yaml into runs/shapes
    python train.py --config configs/coco_r50_fpn_1x.yaml --strategy mirrored \
        --model_dir runs/coco --set data.train.annotation_file=... data.train.image_dir=...
    mrcnn-train ...                                   # the same, installed as a console script

A --config path that does not exist names one of the configs shipped with the package when its
file name is one of theirs (``mrcnn-train --config configs/coco_r50_fpn_1x.yaml`` works in any
directory after ``pip install mrcnn_tf``).

Running it again with the same --model_dir resumes from the latest checkpoint, with the run's own
configuration (MODEL_DIR/config.json). Exit codes: 0 done, 2 configuration or data error,
3 stopped on a NaN or Inf loss, 4 the directory is in use by another run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mrcnn_tf.cli import quiet
from mrcnn_tf.config import STRATEGIES, packaged_config

DEFAULT_CONFIG = packaged_config("shapes.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train and evaluate Mask R-CNN (mrcnn_tf).")
    p.add_argument("--config", default=None,
                   help="YAML config (default: the run's own config.json in --model_dir, or "
                        "configs/shapes.yaml for a new run); on a resumed run it must describe "
                        "the same model")
    p.add_argument("--strategy", default="default",
                   choices=STRATEGIES,
                   help="tf.distribute strategy; tpu needs the XLA settings (README, "
                   "\"XLA and TPUs\"; compiled on CPU, never run on a TPU here)")
    p.add_argument("--cpu_replicas", type=int, default=0,
                   help="with --strategy mirrored: mirror over this many logical CPU devices")
    p.add_argument("--final_weights", default=None,
                   help="also save the final weights to this .weights.h5 file (every worker)")
    p.add_argument("--model_dir", default=None, help="default: runs/<config name>")
    p.add_argument("--mode", default="train_and_eval", choices=("train", "eval", "train_and_eval"),
                   help="train_and_eval (default) evaluates every eval.every_n_steps and at the "
                        "end, and draws predictions on a few validation images")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=100; a resumed run may change "
                        "train.*, data.*, eval.* and export.* only")
    p.add_argument("--verbose", default="auto",
                   help="auto (default): progress in steps, a line every train.log_every steps "
                        "(one line rewritten in place on a terminal); 0: none; 1 or 2: Keras' "
                        "own per-epoch output")
    return p.parse_args(argv)


def export_run(model, config, model_dir: str) -> str:
    """Exports the trained model for TF Serving into MODEL_DIR/export/N (the next version), in
    float32 also when it trained under a mixed policy (the server's CPU may have no bfloat16)."""
    from mrcnn_tf.model import build_model
    from mrcnn_tf.rundir import read_labels
    from mrcnn_tf.serving import export_saved_model, next_version, serving_options

    if model.compute_dtype != "float32":
        trained, model = model, build_model(config)
        model.set_weights(trained.get_weights())
    base = os.path.join(model_dir, "export")
    path = os.path.join(base, str(next_version(base)))
    ids, names = read_labels(model_dir)
    export_saved_model(model, ids, names, path, **serving_options(config))
    return path


def check_data(config, mode: str) -> None:
    """Refuses, before a model is built, a source that the mode needs and is not set or names
    nothing that exists (ConfigError naming the key)."""
    from mrcnn_tf.config import ConfigError
    from mrcnn_tf.data.pipeline import check_source

    if mode in ("train", "train_and_eval"):
        check_source(config, training=True)
    if mode in ("eval", "train_and_eval"):
        try:
            check_source(config, training=False)
        except ConfigError as e:
            if mode == "eval":
                raise
            raise ConfigError(f"{e} (train_and_eval evaluates on data.eval; --mode train "
                              "trains without evaluating)", e.key) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    from mrcnn_tf.config import ConfigError
    from mrcnn_tf.data import DataError
    from mrcnn_tf.rundir import RunLockError, resolve_config
    from mrcnn_tf.weights import WeightsError

    if args.config is not None:
        args.config = packaged_config(args.config)
    name = os.path.splitext(os.path.basename(args.config or DEFAULT_CONFIG))[0]
    model_dir = args.model_dir or os.path.join("runs", name)
    try:
        config, changed = resolve_config(model_dir, args.config, args.set, DEFAULT_CONFIG,
                                         purpose="evaluation" if args.mode == "eval"
                                         else "resume")
        check_data(config, args.mode)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key in changed:
        print(f"config: {key} differs from the run's config.json: now {_get(config, key)!r}",
              flush=True)

    from mrcnn_tf.training import is_chief, make_strategy, train

    try:
        strategy = make_strategy(args.strategy, args.cpu_replicas)  # before the model
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.strategy in ("mirrored", "multi_worker", "tpu"):
        devices = getattr(strategy.extended, "worker_devices", ())
        print(f"--strategy {args.strategy}: {strategy.num_replicas_in_sync} replica"
              f"{'s' if strategy.num_replicas_in_sync > 1 else ''}"
              + (f" ({', '.join(devices)})" if devices else "")
              + (" (no GPU found: one CPU replica, as --strategy default; --cpu_replicas N "
                 "splits the CPU)" if strategy.num_replicas_in_sync == 1 else ""), flush=True)
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    if args.mode == "eval":
        from mrcnn_tf.evaluation.run import evaluate_model_dir

        try:
            results = evaluate_model_dir(config, model_dir, strategy)
        except (ConfigError, DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        results.pop("per_class")
        results.pop("pr_curves")
        print("evaluation: " + json.dumps(results, indent=1), flush=True)
        return 0

    callbacks = []
    if args.mode == "train_and_eval":
        from mrcnn_tf.evaluation.run import CocoEvalCallback

        callbacks.append(CocoEvalCallback(config, model_dir, write=is_chief()))
    try:
        model, summary = train(config, strategy, model_dir, verbose=verbose,
                               extra_callbacks=callbacks, final_weights=args.final_weights)
    except RunLockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except (ConfigError, WeightsError, DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["stopped_on_nan"]:
        print("run summary: " + json.dumps(summary, indent=1), flush=True)
        return 3
    if callbacks:
        from mrcnn_tf.rundir import read_labels
        from mrcnn_tf.training import draw_validation_predictions

        evaluator = callbacks[0]
        evaluator.set_model(model)
        evaluator.evaluate_now()  # the final evaluation (skipped if this step was just done)
        if evaluator.history:
            last = evaluator.history[-1]
            summary["eval"] = {"step": last["step"], "bbox_AP": last["bbox"]["AP"],
                               "segm_AP": last["segm"]["AP"]}
        if is_chief():
            _, class_names = read_labels(model_dir)
            summary["predictions"] = draw_validation_predictions(model, config, model_dir,
                                                                 class_names)
            summary["saved_model"] = export_run(model, config, model_dir)
    print("run summary: " + json.dumps(summary, indent=1), flush=True)
    if summary.get("predictions"):
        print(f"\npredictions drawn on {len(summary['predictions'])} validation images: "
              f"{os.path.dirname(summary['predictions'][0])}/; SavedModel: "
              f"{summary['saved_model']}; metrics: {os.path.join(model_dir, 'metrics.json')}",
              flush=True)
    return 0


def _get(config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


if __name__ == "__main__":
    sys.exit(main())
