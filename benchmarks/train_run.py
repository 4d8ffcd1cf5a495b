"""A whole ``python train.py`` run, timed as a user runs it: wall time, peak memory and the
COCO AP it reaches, written to benchmarks/results/DATE-NAME.json.

    python benchmarks/train_run.py --name main-job                     # the README's main job
    python benchmarks/train_run.py --name coco-small-cpu --config configs/coco_small_cpu.yaml \
        --coco128 ../shared/data/coco128 --eval_tiny16 ../shared/data/coco_tiny16

It runs train.py in a fresh process on a fresh --model_dir (default: a temporary folder,
removed afterwards) with the given --set overrides, and reads the run's own summary.json and
metrics.json. ``--coco128 DIR`` points data.train (and, unless --eval_tiny16 is given,
data.eval: the training photos themselves) at ../shared/data/coco128. Wall time counts from the
process start (imports included) to its exit; peak memory is the process's maximum resident
set (ru_maxrss of the child). The machine, the command and the time of day go in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="results/DATE-NAME.json")
    p.add_argument("--config", default=None, help="train.py --config (default: its own)")
    p.add_argument("--coco128", default=None, help="train on this coco128 folder")
    p.add_argument("--eval_tiny16", default=None,
                   help="evaluate on this coco_tiny16 folder (held out from coco128)")
    p.add_argument("--model_dir", default=None, help="keep the run here")
    p.add_argument("--set", nargs="*", default=[], help="train.py --set overrides")
    args = p.parse_args()
    overrides = []
    if args.coco128:
        c = os.path.abspath(args.coco128)
        overrides += [f"data.train.annotation_file={c}/annotations/instances_train2017.json",
                      f"data.train.image_dir={c}/train2017"]
    if args.eval_tiny16:
        t = os.path.abspath(args.eval_tiny16)
        overrides += [f"data.eval.annotation_file={t}/instances_train2017.json",
                      f"data.eval.image_dir={t}/train2017"]
    elif args.coco128:  # the training photos themselves
        overrides += [f"data.eval.annotation_file={c}/annotations/instances_train2017.json",
                      f"data.eval.image_dir={c}/train2017"]
    overrides += args.set
    model_dir = args.model_dir or tempfile.mkdtemp(prefix="train_run_")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--model_dir", model_dir]
    if args.config:
        cmd += ["--config", args.config]
    if overrides:
        cmd += ["--set", *overrides]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    log = res.stdout
    print(log[-3000:])
    if res.returncode != 0:
        print(f"train.py exited {res.returncode}", file=sys.stderr)
        return res.returncode
    with open(os.path.join(model_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    out = {
        "name": args.name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "command": " ".join(["python", "benchmarks/train_run.py", *sys.argv[1:]]),
        "train_py": cmd[1:],
        "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
        "train_s": summary["seconds"], "steps": summary["steps_run"],
        "s_per_step": summary["seconds_per_step"],
        "evaluations": [{"step": m["step"], "bbox_AP": m["bbox"]["AP"],
                         "bbox_AP50": m["bbox"]["AP50"], "segm_AP": m["segm"]["AP"],
                         "segm_AP50": m["segm"]["AP50"], "images": m["num_images"]}
                        for m in metrics],
        "final_logs": summary["final_logs"],
    }
    day = datetime.date.today().isoformat()
    path = os.path.join(REPO, "benchmarks", "results", f"{day}-{args.name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("wall_s", "peak_rss_mb", "train_s", "s_per_step",
                                          "evaluations")}, indent=1))
    print(f"wrote {path}")
    if not args.model_dir:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
