"""First training step of one checkout of mrcnn_tf, or of two side by side: what a code change
does to the cost of tracing the step (the Python trace, grappler, the first run).

    python benchmarks/first_step.py --checkouts /path/to/old /path/to/new [--rounds 3]
    python benchmarks/first_step.py --checkouts . [--rounds 5]

One batch is taken once, from this checkout's ``build_dataset`` on coco128 (training mode, the
torchvision config, batch 1, the first batch on an 800x1088 canvas, seeded), and saved; then,
for each round, a fresh process per checkout (alternating, so host drift hits both) builds the
model, times the first call of ``make_train_function()`` on that batch (what ``fit`` runs first)
and two steady steps after it. Reported per checkout: every first call, split into the Python
trace of the step's graph (and its op count) and the first run (grappler's rewrites, first
allocations, the step), the steady steps, and first minus the faster steady step. The first
run is split further: grappler's rewrites (their wall time in the log TensorFlow writes with
``TF_CPP_VMODULE=meta_optimizer=1``, during the first run only), and the first run's user and
system CPU seconds and minor page faults against the faster steady step's (memory touched for
the first time). Float32, 2 threads.
"""

import argparse
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/torchvision_r50_fpn.yaml"
CANVAS = (800, 1088)


def _overrides(data_dir: str) -> list:
    return ["model.detection.score_threshold=0.0", "model.num_classes=80",
            "data.class_ids=contiguous", "data.train.source=coco",
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
        """-> (wall seconds, user CPU s, system CPU s, minor page faults) of one step."""
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        float(fn(iter([batch]))["loss"])
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        return (wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                r1.ru_minflt - r0.ru_minflt)

    # The first step in two parts: the Python trace of the step's graph, timed on the traced
    # function the train function holds (the call after it reuses that trace), then the first
    # run (grappler's rewrites, first allocations, the step itself). TensorFlow's log (fd 2)
    # goes to a file during the first run only: grappler's wall time is read from it.
    traced = _traced_step(fn)
    t0 = time.perf_counter()
    graph = traced.get_concrete_function(batch).graph
    trace = time.perf_counter() - t0
    with tempfile.TemporaryFile("w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            first_run = step()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        grappler = _grappler_seconds(log.read())
    steady = [step(), step()]
    fastest = min(steady)
    return {"first_s": trace + first_run[0], "trace_s": trace, "first_run_s": first_run[0],
            "ops": len(graph.get_operations()), "steady_s": [s[0] for s in steady],
            "first_minus_steady_s": trace + first_run[0] - fastest[0],
            "grappler_s": grappler,
            "first_run_user_s": first_run[1], "first_run_sys_s": first_run[2],
            "first_run_minflt": first_run[3], "steady_user_s": fastest[1],
            "steady_sys_s": fastest[2], "steady_minflt": fastest[3]}


def _grappler_seconds(log: str) -> float:
    """Grappler's wall time in TensorFlow's ``meta_optimizer`` log: for each grappler item, from
    "Starting optimization for grappler item" to "Optimized N functions", by the lines' own
    timestamps ("I0000 00:00:1796112544.396336 2904 meta_optimizer.cc:1059] ...")."""
    total, start = 0.0, None
    for stamp, text in re.findall(r"^\S+ \S*?([0-9]+\.[0-9]+)\s+\d+ meta_optimizer\.cc:\d+\] (.*)$",
                                  log, re.MULTILINE):
        if text.startswith("Starting optimization for grappler item"):
            start = float(stamp)
        elif start is not None and re.match(r"Optimized \d+ functions", text):
            total, start = total + float(stamp) - start, None
    return total


def _median(runs: list, key: str) -> float:
    return statistics.median(x[key] for x in runs)


def _traced_step(fn):
    """The ``tf.function`` inside ``make_train_function()``'s function: the step that
    ``mrcnn_tf.keras_compat.step_function`` traces once per canvas, held in its closure."""
    for cell in fn.__closure__ or ():
        if hasattr(cell.cell_contents, "get_concrete_function"):
            return cell.cell_contents
    raise RuntimeError("make_train_function() holds no traced step in its closure")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkouts", nargs="+", metavar="TREE",
                   help="one or two source trees of mrcnn_tf (e.g. a `git worktree` of the old "
                        "commit, then this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "coco128"))
    p.add_argument("--output", default=None, help="results JSON")
    p.add_argument("--worker", nargs=2, metavar=("CHECKOUT", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("@@" + json.dumps(worker(*args.worker, args.data)), flush=True)
        return
    if not args.checkouts or len(args.checkouts) > 2:
        p.error("--checkouts takes one or two source trees")
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
                                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
                                          TF_CPP_VMODULE="meta_optimizer=1"))
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")]
            if res.returncode or not lines:
                sys.exit(f"worker for {c} failed:\n{res.stderr[-3000:]}")
            results[c].append(json.loads(lines[-1][2:]))
            print(f"round {r + 1}/{args.rounds} {c}: " + json.dumps(results[c][-1]), flush=True)
    print("| checkout | ops | first step (s), each round | median | trace, median | first run, "
          "median | steady steps (s) | first - steady (s), median |\n"
          "|---|---|---|---|---|---|---|---|")
    for c, runs in results.items():
        steady = [round(s, 2) for x in runs for s in x["steady_s"]]
        each = ", ".join(f"{x['first_s']:.2f}" for x in runs)
        print(f"| {c} | {runs[0]['ops']} | {each} | {_median(runs, 'first_s'):.2f} | "
              f"{_median(runs, 'trace_s'):.2f} | {_median(runs, 'first_run_s'):.2f} | "
              f"{min(steady)}-{max(steady)} | {_median(runs, 'first_minus_steady_s'):.2f} |")
    print("\nThe first run against the faster steady step, medians: wall, grappler, CPU (user, "
          "system) and memory touched for the first time (minor faults x 4 KiB).\n\n"
          "| checkout | first run (s) | steady (s) | grappler (s) | user CPU, first / steady (s) | "
          "system CPU, first / steady (s) | first touch, first / steady (GiB) |\n"
          "|---|---|---|---|---|---|---|")
    for c, runs in results.items():
        fastest = statistics.median(min(x["steady_s"]) for x in runs)
        print(f"| {c} | {_median(runs, 'first_run_s'):.2f} | {fastest:.2f} "
              f"| {_median(runs, 'grappler_s'):.2f} | {_median(runs, 'first_run_user_s'):.1f} / "
              f"{_median(runs, 'steady_user_s'):.1f} | {_median(runs, 'first_run_sys_s'):.2f} / "
              f"{_median(runs, 'steady_sys_s'):.2f} | "
              f"{_median(runs, 'first_run_minflt') * 4 / 2**20:.2f} / "
              f"{_median(runs, 'steady_minflt') * 4 / 2**20:.2f} |")
    if args.output:
        with open(args.output, "w") as f:
            commits = {c: subprocess.run(["git", "-C", c, "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()
                       for c in args.checkouts}
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "commits": commits, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
