"""Side-by-side benchmark of mrcnn_tf against torchvision and Model Garden, in one run.

    bash benchmarks/setup_peers.sh          # once: the peers' own virtual environments
    python benchmarks/compare.py            # everything; --only inference,train,data

Each implementation runs in its own worker process (benchmarks/workers/), in its own virtual
environment, with 2 intra-op and 2 inter-op threads. A pair (ours, peer) is measured together:
both workers build their model and time their first call (one after the other), then warm up, then
take turns A B A B ... for ``--rounds`` rounds, so machine drift hits both; at the end each reports
its process's peak resident memory. Pairs:

- inference, batch 1: torchvision maskrcnn_resnet50_fpn on an 800x1333 image at its default
  proposal/detection counts vs ours with configs/torchvision_r50_fpn.yaml (same counts);
  Model Garden maskrcnn_resnetfpn_coco at 1024x1024 vs ours configured as that model (1024
  square, BN heads, 4conv1fc box head, same counts: workers/ours.py PEER_CONFIGS);
- training step, batch 1 (forward + backward + SGD update), the same pairs and inputs;
- data pipeline images/s at 1024 px on ../shared/data/coco128 (batch 8, training mode), ours vs
  Model Garden's (reading TFRecords that mrcnn_tf.data.create_tfrecord writes from the same JSON);
  pipelines prefetch in background threads, so these run one process at a time instead;
- end-to-end training (``e2e``), what users run, batch 1 and 2 on the coco128 photos, one process
  at a time like the pipelines: ours is build_dataset + the model's fit train function (its
  canvases, one trace per canvas), torchvision its reference loop (DataLoader with 2 workers,
  aspect-ratio grouped batches, its in-model resize and batch padding; first the same batches of
  the same photos as ours, whose seeded order is listed beforehand), Model Garden its input
  pipeline + its task's train_step (1024 square, ours configured as that model). Each process
  times its first step, then ``--e2e_warmup`` warm-up steps and ``--e2e_steps`` timed steps.
  Ours traces a graph the first time a batch of a new canvas arrives (at most 8 per run); a
  timed step that traced is flagged and left out of the median, and the count is reported.
  Reported: median seconds per step, images/s over all timed steps, peak RSS. ``e2e_square``:
  ours on its canvases against ours on one 1344 square, the canvases' gain.

Prints a markdown table with ratios ours/peer and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKERS = REPO / "benchmarks" / "workers"
VENVS = pathlib.Path(os.environ.get("MRCNN_BENCH_VENVS", REPO / "benchmarks" / ".venvs"))


# -- inputs --------------------------------------------------------------------------------------

def prepare_inputs(data_dir: pathlib.Path, work: pathlib.Path) -> dict:
    """One real coco128 image with its instances at 800x1333 (torchvision's input: its resize
    then keeps it as it is) and long side 1024 on a 1024x1024 canvas (Model Garden's input), plus
    TFRecords of coco128 and of that one image."""
    import numpy as np
    import tensorflow as tf

    from mrcnn_tf.data.coco import rasterize
    from mrcnn_tf.data.create_tfrecord import main as create_tfrecord

    work.mkdir(parents=True, exist_ok=True)
    out = work / "inputs.npz"
    ann_path = data_dir / "annotations" / "instances_train2017.json"
    with open(ann_path) as f:
        coco = json.load(f)
    by_image = {}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            by_image.setdefault(a["image_id"], []).append(a)
    # The image with the most instances among the first 20 with at least 5: a busy scene.
    image = max((im for im in coco["images"][:20] if len(by_image.get(im["id"], [])) >= 5),
                key=lambda im: len(by_image[im["id"]]))
    anns = by_image[image["id"]]
    pixels = tf.io.decode_image(tf.io.read_file(str(data_dir / "train2017" /
                                                    image["file_name"])), channels=3,
                                expand_animations=False)
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    masks = rasterize([a["segmentation"] for a in anns], h, w)
    boxes = np.array([[a["bbox"][1], a["bbox"][0], a["bbox"][1] + a["bbox"][3],
                       a["bbox"][0] + a["bbox"][2]] for a in anns], np.float32)
    arrays = {"labels": np.array([a["category_id"] for a in anns], np.int64),
              "image_id": np.array(image["id"])}
    for key, (nh, nw, canvas) in {"800": (800, 1333, None),
                                  "1024": (round(h * 1024 / max(h, w)),
                                           round(w * 1024 / max(h, w)), 1024)}.items():
        img = tf.cast(tf.round(tf.image.resize(pixels, (nh, nw))), tf.uint8).numpy()
        m = tf.image.resize(masks[..., None], (nh, nw), "nearest").numpy()[..., 0]
        b = boxes * np.array([nh / h, nw / w, nh / h, nw / w], np.float32)
        if canvas:
            img = np.pad(img, ((0, canvas - nh), (0, canvas - nw), (0, 0)))
            m = np.pad(m, ((0, 0), (0, canvas - nh), (0, canvas - nw)))
        arrays[f"image_{key}"], arrays[f"masks_{key}"], arrays[f"boxes_{key}"] = img, m, b
    np.savez(out, **arrays)
    one = {**coco, "images": [image], "annotations": anns}
    with open(work / "one_image.json", "w") as f:
        json.dump(one, f)
    if not (work / "coco128-00000-of-00001.tfrecord").exists():
        create_tfrecord(["--annotations", str(ann_path), "--images", str(data_dir / "train2017"),
                         "--output", str(work / "coco128"), "--workers", "2"])
    if not (work / "one-00000-of-00001.tfrecord").exists():
        create_tfrecord(["--annotations", str(work / "one_image.json"), "--images",
                         str(data_dir / "train2017"), "--output", str(work / "one"),
                         "--workers", "1"])
    return {"inputs": str(out), "image_id": image["id"], "instances": len(anns),
            "original_size": [h, w], "coco128_tfrecord": str(work / "coco128-*"),
            "one_tfrecord": str(work / "one-*")}


# -- workers -------------------------------------------------------------------------------------

class Worker:
    def __init__(self, name: str, cmd: list[str], log_path: pathlib.Path):
        self.name, self.log_path = name, log_path
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "2",
               "PYTHONPATH": str(REPO)}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=REPO)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                msg = json.loads(line[2:])
                if "error" in msg:
                    raise RuntimeError(f"{self.name}: {msg['error']}")
                return msg
        self.log.flush()
        tail = pathlib.Path(self.log_path).read_text()[-3000:]
        raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}); log "
                           f"{self.log_path}:\n{tail}")

    def send(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        msg = self.send("quit")
        self.proc.wait(timeout=120)
        self.log.close()
        return msg


def _stats(values):
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "p25": q[0], "p75": q[2], "n": len(values), "all": values}


def run_pair(name: str, workers: list[tuple[str, list[str]]], rounds: int, warmup: int,
             log_dir: pathlib.Path) -> dict:
    """Starts the workers one after the other (first calls do not overlap), then alternates."""
    started, result = [], {}
    try:
        for label, cmd in workers:
            print(f"[{name}] starting {label}", flush=True)
            w = Worker(label, cmd, log_dir / f"{name}-{label}.log")
            started.append(w)
            ready = w.read()
            result[label] = {"build_s": ready["build_s"], "first_call_s": ready["first_call_s"],
                             "describe": ready.get("describe"), "runs": []}
            print(f"[{name}] {label}: first call {ready['first_call_s']:.1f} s", flush=True)
        for _ in range(warmup):
            for w in started:
                w.send("run")
        for r in range(rounds):
            for w in started:
                msg = w.send("run")
                result[w.name]["runs"].append(msg["seconds"])
                result[w.name]["last"] = {k: v for k, v in msg.items() if k != "seconds"}
            print(f"[{name}] round {r + 1}/{rounds}: " + ", ".join(
                f"{w.name} {result[w.name]['runs'][-1]:.3f}" for w in started), flush=True)
        for w in started:
            result[w.name]["peak_rss_mb"] = w.close()["peak_rss_mb"]
            result[w.name]["stats"] = _stats(result[w.name]["runs"])
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.kill()
    return result


def run_sequential(name: str, workers: list[tuple[str, list[str]]], rounds: int,
                   log_dir: pathlib.Path) -> dict:
    """For input pipelines, whose background threads keep prefetching while idle: one process at a
    time (A alone, then B alone, repeated), each round a fresh process: one warm-up run, then one
    timed run; images/s per timed run (and seconds per step when the worker reports steps), the
    first call and peak memory from each process."""
    result = {label: {"runs": [], "first_calls": [], "rss": [], "step_times": [], "traced": []}
              for label, _ in workers}
    for r in range(rounds):
        for label, cmd in workers:
            w = Worker(label, cmd, log_dir / f"{name}-{label}-{r}.log")
            try:
                ready = w.read()
                w.send("run")
                msg = w.send("run")
                res = result[label]
                res["runs"].append(msg["images"] / msg["seconds"])
                res["step_times"] += msg.get("step_times", [])
                res["traced"] += msg.get("traced_steps", [False] * len(msg.get("step_times", [])))
                res["first_calls"].append(ready["first_call_s"])
                res["describe"] = ready.get("describe")
                res["rss"].append(w.close()["peak_rss_mb"])
            finally:
                if w.proc.poll() is None:
                    w.proc.kill()
        print(f"[{name}] round {r + 1}/{rounds}: " + ", ".join(
            f"{label} {result[label]['runs'][-1]:.1f} img/s" for label, _ in workers), flush=True)
    for res in result.values():
        if res["step_times"]:
            # Steady state: the median over timed steps that traced no new graph (ours traces
            # once per new canvas, a one-time cost per run, counted in "traced_steps").
            res["images_per_s"] = _stats(res["runs"])
            res["all_steps"] = _stats(res["step_times"])
            res["traced_steps"] = sum(res["traced"])
            res["runs"] = [t for t, tr in zip(res["step_times"], res["traced"])
                           if not tr] or res["step_times"]
        res["stats"] = _stats(res["runs"])
        res["first_call_s"] = statistics.median(res["first_calls"])
        res["peak_rss_mb"] = max(res["rss"])
    return result


# -- the table ------------------------------------------------------------------------------------

def table(results: dict) -> str:
    rows = ["| measure | implementation | first call (s) | median | p25-p75 | min-max | "
            "peak RSS (MiB) | ours/peer (median) | ours/peer (first call) | ours/peer (RSS) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        unit = "img/s" if name.startswith("data") else "s/step" if name.startswith("e2e") \
            else "s"
        labels = list(res)
        ours, peer = res[labels[0]], res[labels[1]]
        for label in labels:
            r = res[label]
            s = r["stats"]
            ratio = ["", "", ""]
            if label != labels[0]:
                ratio = [f"{ours['stats']['median'] / s['median']:.2f}",
                         f"{ours['first_call_s'] / r['first_call_s']:.2f}",
                         f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}"]
            ips = ""
            if "images_per_s" in r:
                n = len(r["step_times"])
                ips = (f" ({r['images_per_s']['median']:.3f} img/s over all {n} steps; "
                       f"{r['traced_steps']} traced, excluded from the median)")
            rows.append(f"| {name} | {label} | {r['first_call_s']:.1f} | {s['median']:.3f} {unit}"
                        f"{ips} "
                        f"| {s['p25']:.3f}-{s['p75']:.3f} | {s['min']:.3f}-{s['max']:.3f} | "
                        f"{r['peak_rss_mb']:.0f} | " + " | ".join(ratio) + " |")
        del peer
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="inference,train,data,e2e",
                   help="comma list of inference, train, data, e2e, e2e_square (ours on its "
                        "aspect-ratio canvases against ours on one square 1344 canvas)")
    p.add_argument("--batches", default="1,2", help="e2e: images per step, comma list")
    p.add_argument("--e2e_steps", type=int, default=6, help="e2e: timed steps per process")
    p.add_argument("--e2e_warmup", type=int, default=6,
                   help="e2e: warm-up steps per process after the first (new canvases trace)")
    p.add_argument("--e2e_rounds", type=int, default=2,
                   help="e2e: fresh processes per implementation, one at a time")
    p.add_argument("--peers", default="torchvision,modelgarden")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (inference, data)")
    p.add_argument("--train_rounds", type=int, default=5)
    p.add_argument("--data_rounds", type=int, default=3,
                   help="data pipelines: fresh processes, one at a time")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "coco128"))
    p.add_argument("--work_dir", default="/tmp/mrcnn_bench")
    p.add_argument("--ours_python", default=sys.executable)
    p.add_argument("--torch_python", default=str(VENVS / "torch" / "bin" / "python"))
    p.add_argument("--modelgarden_python", default=str(VENVS / "modelgarden" / "bin" / "python"))
    p.add_argument("--precision", default="fp32,bf16",
                   help="comma list: fp32 (all float32) and/or bf16 (each implementation's mixed "
                        "bfloat16: Keras mixed_bfloat16 for ours and Model Garden, torch.autocast "
                        "for torchvision)")
    p.add_argument("--output", default=None, help="JSON results (default WORK_DIR/results.json)")
    args = p.parse_args(argv)
    only, peers = args.only.split(","), args.peers.split(",")
    work = pathlib.Path(args.work_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for peer, py in (("torchvision", args.torch_python), ("modelgarden", args.modelgarden_python)):
        if peer in peers and not os.path.exists(py):
            sys.exit(f"{peer}: no interpreter at {py}; run bash benchmarks/setup_peers.sh or pass "
                     f"--{'torch' if peer == 'torchvision' else peer}_python")
    info = prepare_inputs(pathlib.Path(args.data), work)
    inputs = info["inputs"]

    plan, prepare = [], []
    for precision in args.precision.split(","):
        p_plan, p_prepare = _plan(args, precision, only, peers, info, inputs, work)
        plan += p_plan
        prepare += p_prepare
    t0 = time.time()
    for cmd in prepare:  # the photo order both sides of an e2e pair train on
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    results = {}
    for name, measure, workers in plan:
        tag = "-".join([measure, workers[1][0]] + [part.replace(" ", "") for part in
                                                   name.split("(")[1].rstrip(")").split(", ")[1:]])
        if measure in ("data", "e2e"):
            rounds = args.data_rounds if measure == "data" else args.e2e_rounds
            results[name] = run_sequential(tag, workers, rounds, logs)
            continue
        rounds = args.train_rounds if measure == "train" else args.rounds
        results[name] = run_pair(tag, workers, rounds, args.warmup, logs)
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "wall_s": round(time.time() - t0)}
    out = pathlib.Path(args.output or work / "results.json")
    out.write_text(json.dumps({"machine": machine, "inputs": info, "results": results},
                              indent=1))
    print()
    print(f"machine: {machine}")
    print(table(results))
    print(f"\nraw numbers: {out}")
    return 0


def _plan(args, precision, only, peers, info, inputs, work):
    """(name, measure, [(label, command), ...]) of every pair at one precision, and the commands
    to run before them (each writes the photo order of an e2e pair)."""
    def ours(measure, peer, *extra):
        return [args.ours_python, str(WORKERS / "ours.py"), "--measure", measure, "--peer", peer,
                "--inputs", inputs, "--precision", precision, *extra]

    plan, prepare = [], []
    if ("e2e" in only or "e2e_square" in only) and precision == "fp32":
        for batch in args.batches.split(","):
            e2e = ["--measure", "e2e", "--batch", batch, "--steps", str(args.e2e_steps),
                   "--warmup_steps", str(args.e2e_warmup), "--inputs", inputs, "--data_dir",
                   args.data]
            if "e2e" in only and "torchvision" in peers:
                # Ours reads the photos in a seeded order; torchvision trains on the same
                # batches in the same order, listed beforehand.
                order = str(work / f"order-batch{batch}.json")
                count = 1 + args.e2e_warmup + args.e2e_steps
                prepare.append(ours("order", "torchvision", "--batch", batch, "--count",
                                    str(count), "--order_out", order, "--data_dir", args.data))
                plan.append((f"e2e (torchvision, coco128, batch {batch}, {precision})", "e2e", [
                    ("ours", ours("e2e", "torchvision", *e2e[2:8], "--data_dir", args.data)),
                    ("torchvision", [args.torch_python, str(WORKERS / "torchvision_worker.py"),
                                     *e2e, "--order", order])]))
            if "e2e_square" in only:
                plan.append((f"e2e (ours square, coco128, batch {batch}, {precision})", "e2e", [
                    ("ours", ours("e2e", "torchvision", *e2e[2:8], "--data_dir", args.data)),
                    ("square1344", ours("e2e", "torchvision", *e2e[2:8], "--data_dir", args.data,
                                        "--set", "data.canvas_long_sides=null",
                                        "data.image_size=1344"))]))
            if "e2e" in only and "modelgarden" in peers:
                plan.append((f"e2e (Model Garden, coco128, 1024, batch {batch}, {precision})",
                             "e2e", [
                                 ("ours", ours("e2e", "modelgarden", *e2e[2:8], "--data_dir",
                                               args.data)),
                                 ("modelgarden", [args.modelgarden_python,
                                                  str(WORKERS / "modelgarden_worker.py"),
                                                  "--tfrecord", info["coco128_tfrecord"],
                                                  *e2e[:8], "--inputs", inputs])]))
    if "torchvision" in peers:
        tv = [args.torch_python, str(WORKERS / "torchvision_worker.py"), "--inputs", inputs,
              "--precision", precision]
        for m in ("inference", "train"):
            if m in only:
                plan.append((f"{m} (torchvision, 800x1333, {precision})", m,
                             [("ours", ours(m, "torchvision")),
                              ("torchvision", tv + ["--measure", m])]))
    if "modelgarden" in peers:
        mg = [args.modelgarden_python, str(WORKERS / "modelgarden_worker.py"), "--inputs", inputs,
              "--precision", precision]
        if "inference" in only:
            plan.append((f"inference (Model Garden, 1024x1024, {precision})", "inference",
                         [("ours", ours("inference", "modelgarden")),
                          ("modelgarden", mg + ["--measure", "inference"])]))
        if "train" in only:
            plan.append((f"train (Model Garden, 1024x1024, {precision})", "train",
                         [("ours", ours("train", "modelgarden")),
                          ("modelgarden", mg + ["--measure", "train", "--tfrecord",
                                                info["one_tfrecord"]])]))
        if "data" in only and precision == "fp32":  # the pipelines do not depend on precision
            plan.append(("data pipeline (coco128, 1024, batch 8, fp32)", "data",
                         [("ours", ours("data", "modelgarden", "--data_dir", args.data)),
                          ("modelgarden", mg + ["--measure", "data", "--tfrecord",
                                                info["coco128_tfrecord"]])]))
    return plan, prepare


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
