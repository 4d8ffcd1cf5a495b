"""First training step of two checkouts of mrcnn_tf, side by side: what a code change does to the
cost of tracing the step (the Python trace, grappler, the first run).

    python benchmarks/first_step.py --checkouts /path/to/old /path/to/new [--rounds 3]

One batch is taken once, from this checkout's ``build_dataset`` on coco128 (training mode, the
torchvision config, batch 1, the first batch on an 800x1088 canvas, seeded), and saved; then,
for each round, a fresh process per checkout (alternating, so host drift hits both) builds the
model, times the first call of ``make_train_function()`` on that batch (what ``fit`` runs first)
and two steady steps after it. Reported per checkout: every first call, split into the Python
trace of the step's graph (and its op count) and the first run (grappler's rewrites, first
allocations, the step), the steady steps, and first minus the faster steady step. Float32,
2 threads.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/torchvision_r50_fpn.yaml"
CANVAS = (800, 1088)


def _overrides(data_dir: str) -> list:
    return ["model.detection.score_threshold=0.0", "model.num_classes=80",
            "data.train.source=coco",
            f"data.train.annotation_file={data_dir}/annotations/instances_train2017.json",
            f"data.train.image_dir={data_dir}/train2017", "train.batch_size=1",
            "data.cache=false", "data.deterministic=true"]


def _flatten(tree, prefix=""):
    """Nested tuples/dicts of arrays -> {"0", "1/gt_boxes", ...: array}."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (tuple, list)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def _unflatten(flat: dict):
    root: dict = {}
    for path, value in flat.items():
        node, parts = root, path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value

    def build(node):
        if not isinstance(node, dict):
            return node
        if all(k.isdigit() for k in node):
            return tuple(build(node[str(i)]) for i in range(len(node)))
        return {k: build(v) for k, v in node.items()}

    return build(root)


def make_batch(data_dir: str, path: str) -> None:
    import numpy as np
    import tensorflow as tf

    import mrcnn_tf
    from mrcnn_tf.data import build_dataset

    cfg = mrcnn_tf.load_config(REPO / CONFIG, _overrides(data_dir))
    for batch in build_dataset(cfg, training=True):
        if tuple(batch[0].shape[1:3]) == CANVAS:
            flat = _flatten(tf.nest.map_structure(lambda t: t.numpy(), batch))
            np.savez(path, **flat)
            return
    raise RuntimeError(f"no batch on a {CANVAS} canvas in {data_dir}")


def worker(checkout: str, batch_path: str, data_dir: str) -> dict:
    sys.path.insert(0, checkout)
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import mrcnn_tf

    where = pathlib.Path(mrcnn_tf.__file__).resolve()
    if not str(where).startswith(str(pathlib.Path(checkout).resolve())):
        raise RuntimeError(f"imported mrcnn_tf from {where}, not from {checkout}")
    with np.load(batch_path) as f:
        batch = tf.nest.map_structure(tf.constant, _unflatten({k: f[k] for k in f.files}))
    cfg = mrcnn_tf.load_config(pathlib.Path(checkout) / CONFIG, _overrides(data_dir))
    model = mrcnn_tf.build_model(cfg)
    model.compile()
    fn = model.make_train_function()

    def step():
        t0 = time.perf_counter()
        float(fn(iter([batch]))["loss"])
        return time.perf_counter() - t0

    # The first step in two parts: the Python trace of the step's graph, timed on the traced
    # function the train function holds (the call after it reuses that trace), then the first
    # run (grappler's rewrites, first allocations, the step itself).
    traced = _traced_step(fn)
    t0 = time.perf_counter()
    graph = traced.get_concrete_function(batch).graph
    trace = time.perf_counter() - t0
    first = trace + step()
    steady = [step(), step()]
    return {"first_s": first, "trace_s": trace, "first_run_s": first - trace,
            "ops": len(graph.get_operations()), "steady_s": steady,
            "first_minus_steady_s": first - min(steady)}


def _traced_step(fn):
    """The ``tf.function`` inside ``make_train_function()``'s function: the step that
    ``mrcnn_tf.keras_compat.step_function`` traces once per canvas, held in its closure."""
    for cell in fn.__closure__ or ():
        if hasattr(cell.cell_contents, "get_concrete_function"):
            return cell.cell_contents
    raise RuntimeError("make_train_function() holds no traced step in its closure")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkouts", nargs=2, metavar=("A", "B"),
                   help="two source trees of mrcnn_tf (e.g. a `git worktree` of the old commit)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "coco128"))
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--worker", nargs=2, metavar=("CHECKOUT", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("@@" + json.dumps(worker(*args.worker, args.data)), flush=True)
        return
    if not args.checkouts:
        p.error("--checkouts A B is required")
    for c in args.checkouts:
        if not (pathlib.Path(c) / "mrcnn_tf" / "__init__.py").is_file():
            p.error(f"--checkouts: {c} is not a source tree of mrcnn_tf")
    batch_path = "/tmp/mrcnn_first_step_batch.npz"
    make_batch(args.data, batch_path)
    results = {c: [] for c in args.checkouts}
    for r in range(args.rounds):
        for c in args.checkouts:
            res = subprocess.run([sys.executable, __file__, "--worker", c, batch_path,
                                  "--data", args.data], capture_output=True, text=True,
                                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")]
            if res.returncode or not lines:
                sys.exit(f"worker for {c} failed:\n{res.stderr[-3000:]}")
            results[c].append(json.loads(lines[-1][2:]))
            print(f"round {r + 1}/{args.rounds} {c}: " + json.dumps(results[c][-1]), flush=True)
    print("| checkout | ops | first step (s), each round | median | trace, median | first run, "
          "median | steady steps (s) | first - steady (s), median |\n"
          "|---|---|---|---|---|---|---|---|")
    for c, runs in results.items():
        def median(key, runs=runs):
            return statistics.median(x[key] for x in runs)

        steady = [round(s, 2) for x in runs for s in x["steady_s"]]
        each = ", ".join(f"{x['first_s']:.2f}" for x in runs)
        print(f"| {c} | {runs[0]['ops']} | {each} | {median('first_s'):.2f} | "
              f"{median('trace_s'):.2f} | {median('first_run_s'):.2f} | "
              f"{min(steady)}-{max(steady)} | {median('first_minus_steady_s'):.2f} |")
    if args.output:
        with open(args.output, "w") as f:
            commits = {c: subprocess.run(["git", "-C", c, "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()
                       for c in args.checkouts}
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "commits": commits, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
