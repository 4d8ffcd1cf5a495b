"""What TensorFlow's graph optimiser (grappler) costs and buys in the training step: its time
in the first step against its effect on every later step.

    python benchmarks/grappler_ab.py [--rounds 2] [--pairs 6] [--output FILE]

The first step instantiates the traced step, and grappler rewrites it then. The one public
switch for it,
``tf.config.optimizer.set_experimental_options``, is process-wide, so before turning it off one
has to know what the steady step loses. Host drift on a shared machine is larger than that
effect between processes, so both variants run in one process on one trace: the model's
``train_step`` under its strategy (what ``fit``'s function runs), on the batch of
``first_step.py`` (training mode, torchvision config, batch 1, 800x1088, float32, 2 threads).
The trace is instantiated once with TensorFlow's default rewrites and once with
``disable_meta_optimizer`` (an instantiation is keyed by the call's config, set per call through
TensorFlow's thread-local function call options: a private handle, used here to measure only),
then steps alternate between the two, ABAB then BABA. Each round is a fresh process; the variant
instantiated first alternates between rounds (the first one also pays the process' first-touch
page faults, so compare first steps across rounds, not within one).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import first_step  # noqa: E402  (the same batch, config and overrides)

VARIANTS = ("default", "no_grappler")


def worker(batch_path: str, data_dir: str, first: str, pairs: int) -> dict:
    sys.path.insert(0, str(first_step.REPO))
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import mrcnn_tf

    with np.load(batch_path) as f:
        batch = tf.nest.map_structure(tf.constant,
                                      first_step._unflatten({k: f[k] for k in f.files}))
    cfg = mrcnn_tf.load_config(first_step.REPO / first_step.CONFIG,
                               first_step._overrides(data_dir))
    model = mrcnn_tf.build_model(cfg)
    model.compile()
    model.optimizer.build(model.trainable_variables)
    traced = tf.function(lambda d: model.distribute_strategy.run(model.train_step, args=(d,)),
                         autograph=False)
    t0 = time.perf_counter()
    fn = traced.get_concrete_function(batch)
    trace_s = time.perf_counter() - t0
    ctx = context.context()
    default = config_pb2.ConfigProto()
    default.ParseFromString(ctx.function_call_options.config_proto_serialized)
    off = config_pb2.ConfigProto()
    off.CopyFrom(default)
    off.graph_options.rewrite_options.disable_meta_optimizer = True
    configs = {"default": default, "no_grappler": off}

    def step(variant):
        ctx.function_call_options = context.FunctionCallOptions(config_proto=configs[variant])
        t0 = time.perf_counter()
        float(fn(batch)["loss"])
        return time.perf_counter() - t0

    order = [first] + [v for v in VARIANTS if v != first]
    result = {"trace_s": trace_s, "first_instantiated": first,
              "first_s": {v: step(v) for v in order}, "steady_s": {v: [] for v in VARIANTS}}
    for i in range(pairs):
        for v in (order if i % 2 == 0 else order[::-1]):
            result["steady_s"][v].append(step(v))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=6, help="steady steps of each variant per round")
    p.add_argument("--data", default=str(first_step.REPO.parent / "shared" / "data" / "coco128"))
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--worker", nargs=2, metavar=("BATCH", "FIRST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = worker(args.worker[0], args.data, args.worker[1], args.pairs)
        print("@@" + json.dumps(out), flush=True)
        return
    batch_path = "/tmp/mrcnn_first_step_batch.npz"
    first_step.make_batch(args.data, batch_path)
    rounds = []
    for r in range(args.rounds):
        first = VARIANTS[r % 2]
        res = subprocess.run([sys.executable, __file__, "--worker", batch_path, first,
                              "--data", args.data, "--pairs", str(args.pairs)],
                             capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")]
        if res.returncode or not lines:
            sys.exit(f"round {r + 1} failed:\n{res.stderr[-3000:]}")
        rounds.append(json.loads(lines[-1][2:]))
        print(f"round {r + 1}/{args.rounds}: " + json.dumps(rounds[-1]), flush=True)
    print("| round | instantiated first | first step default / no grappler (s) | steady mean "
          "default / no grappler (s) | no grappler slower in pairs |\n|---|---|---|---|---|")
    ratios = []
    for i, x in enumerate(rounds):
        d, o = x["steady_s"]["default"], x["steady_s"]["no_grappler"]
        ratios.append(statistics.mean(o) / statistics.mean(d))
        slower = sum(b > a for a, b in zip(d, o))
        print(f"| {i + 1} | {x['first_instantiated']} | {x['first_s']['default']:.2f} / "
              f"{x['first_s']['no_grappler']:.2f} | {statistics.mean(d):.2f} / "
              f"{statistics.mean(o):.2f} | {slower} of {len(d)} |")
    print(f"steady step without grappler / with it, per round: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}")
    if args.output:
        commit = subprocess.run(["git", "-C", str(first_step.REPO), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.output, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "commit": commit, "steady_ratio_no_grappler_over_default": ratios,
                       "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
