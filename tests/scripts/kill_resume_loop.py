"""Kills train.py with SIGKILL at random points, several times, some of them while a checkpoint
is being written, and resumes it each time; prints one JSON line.

    python tests/scripts/kill_resume_loop.py MODEL_DIR [KILLS] [SEED]

Checked after every kill: the latest checkpoint is complete and finite (it restores), it is not
older than the last checkpoint the run announced before it died (so at most
``train.checkpoint_every`` steps are lost), and the resumed run says it resumed from it. The last
run goes to the end.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVERY = 2


def command(model_dir, steps):
    return [sys.executable, os.path.join(REPO, "train.py"), "--model_dir", model_dir,
            "--verbose", "0", "--mode", "train", "--set", f"train.steps={steps}",
            f"train.checkpoint_every={EVERY}", "train.batch_size=2", "data.train.num_images=16"]


def latest(model_dir):
    import tensorflow as tf

    return tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))


def checkpoint_ok(path) -> bool:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    return all(np.isfinite(reader.get_tensor(n)).all()
               for n, d in reader.get_variable_to_dtype_map().items() if d.is_floating)


def run_until_killed(model_dir, log_path, rng, during_write: bool) -> dict:
    """Starts train.py and kills it at a random time after its first checkpoint (or as soon
    as a checkpoint write is under way); returns what the run announced."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(model_dir, 400), stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env, start_new_session=True)
        start_ckpt = latest(model_dir)
        deadline = time.time() + 300
        armed_at = None
        while time.time() < deadline and proc.poll() is None:
            now = latest(model_dir)
            if armed_at is None and now != start_ckpt:
                armed_at = time.time() + rng.uniform(0.0, 4.0)  # a random moment from here
            if armed_at is not None:
                writing = glob.glob(os.path.join(model_dir, "checkpoints", "*_temp*"))
                if (during_write and writing) or (not during_write and time.time() >= armed_at):
                    break
            time.sleep(0.002 if during_write else 0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = bool(glob.glob(os.path.join(model_dir, "checkpoints", "*_temp*")))
    with open(log_path) as f:
        announced = [int(line.split("checkpoint at step ")[1].split(":")[0])
                     for line in f if "checkpoint at step " in line]
    return {"announced": max(announced, default=0), "killed_during_write": partial}


def main() -> int:
    model_dir = sys.argv[1]
    kills = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    rounds = []
    for k in range(kills):
        r = run_until_killed(model_dir, os.path.join(model_dir + f".log{k}"), rng,
                             during_write=k % 2 == 1)
        path = latest(model_dir)
        step = int(path.rsplit("-", 1)[1]) if path else 0
        r.update(step=step, complete=bool(path) and checkpoint_ok(path),
                 lost_at_most_every=step >= r["announced"])
        rounds.append(r)
    final_steps = rounds[-1]["step"] + 2 * EVERY
    res = subprocess.run(command(model_dir, final_steps), capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    with open(os.path.join(model_dir, "summary.json")) as f:
        summary = json.load(f)
    print(json.dumps({"rounds": rounds, "final_exit": res.returncode,
                      "resumed_line": f"at step {rounds[-1]['step']}" in res.stdout,
                      "final_step": summary["final_step"], "expected_final": final_steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
