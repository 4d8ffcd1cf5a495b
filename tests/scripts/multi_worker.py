"""Starts two `train.py --strategy multi_worker` processes on 127.0.0.1 and prints whether their
final weights are identical. Each process is bounded in time and always cleaned up.

    python tests/scripts/multi_worker.py MODEL_DIR [steps]
"""

import json
import os
import signal
import socket
import subprocess
import sys

import h5py
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main():
    model_dir, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
        log = open(os.path.join(model_dir, f"worker{i}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "train.py"), "--strategy", "multi_worker",
             "--model_dir", os.path.join(model_dir, "run"), "--final_weights",
             os.path.join(model_dir, f"w{i}.weights.h5"), "--verbose", "2", "--set",
             f"train.steps={steps}", "train.checkpoint_every=2", "train.batch_size=4",
             "model.backbone.norm=sync_bn"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    result = {"exit_codes": codes}
    if codes == [0, 0]:
        a = h5py.File(os.path.join(model_dir, "w0.weights.h5"), "r")
        b = h5py.File(os.path.join(model_dir, "w1.weights.h5"), "r")
        diffs = []
        a.visititems(lambda name, obj: diffs.append(float(np.abs(obj[()] - b[name][()]).max()))
                     if isinstance(obj, h5py.Dataset) else None)
        result.update(num_weights=len(diffs), max_abs_diff=max(diffs))
        with open(os.path.join(model_dir, "run", "summary.json")) as f:
            result["final_step"] = json.load(f)["final_step"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
