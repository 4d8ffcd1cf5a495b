"""Learning curves side by side: ours and torchvision v1 trained from the same seeded weights
with the same reference schedule, on ../shared/data/coco128 at a reduced size, sampling on.

    P=benchmarks/.venvs/torch/bin/python          # bash benchmarks/setup_peers.sh makes it
    $P benchmarks/learning_curves.py weights --out /tmp/lc/weights.npz
    $P benchmarks/learning_curves.py torch --weights /tmp/lc/weights.npz --seed 0 \
        --out /tmp/lc/torch-0.json
    python benchmarks/learning_curves.py ours --weights /tmp/lc/weights.npz --seed 0 \
        --out /tmp/lc/ours-0.json
    (the same with --seed 1 on each side)
    $P benchmarks/learning_curves.py plot /tmp/lc/*-?.json \
        --png benchmarks/results/learning_curves.png \
        --json benchmarks/results/DATE-learning-curves.json

``all --torch_python $P --dir /tmp/lc`` runs the five steps above in turn.

The weights: torchvision's ``maskrcnn_resnet50_fpn`` (FrozenBatchNorm2d backbone, conv1 and
layer1 frozen as ``trainable_backbone_layers=3``) with torchvision's own seeded initialisation
and the frozen norms' statistics set from two coco128 photos (no pretrained weights can be
downloaded here); ours loads the same state dict through ``mrcnn-convert``'s ``convert``.

The recipe on both sides: torchvision's references/detection recipe for this model (SGD
momentum 0.9, weight decay 1e-4 on every trainable weight, lr 0.02 at 16 images scaled
linearly to the batch of 2: 0.0025, linear warmup from 0.001) with its 26-epoch schedule scaled
to --steps: lr x0.1 at 16/26 and 22/26 of the run; warmup --warmup steps. Images: short side
512, long side at most 853 (800/1333 scaled), random horizontal flip, batches of two images of
one orientation, crowd and degenerate boxes dropped, images without annotations dropped,
sampling on (RPN 256 anchors at half positives, 512 RoIs at a quarter). Each side records the
five losses of every step; ``plot`` smooths them and compares the mean of the last 100 steps
against the spread between the two seeds of one side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "coco128")
SHORT, LONG, BATCH = 512, 853, 2
BASE_LR, REFERENCE_BATCH = 0.02, 16
# Our loss names and torchvision's.
LOSSES = {"loss_rpn_objectness": "loss_objectness", "loss_rpn_box": "loss_rpn_box_reg",
          "loss_box_class": "loss_classifier", "loss_box_reg": "loss_box_reg",
          "loss_mask": "loss_mask"}
CALIBRATION_PHOTOS = ("000000000049.jpg", "000000000113.jpg")


def schedule(steps: int) -> dict:
    """torchvision's 26-epoch schedule (lr steps at epochs 16 and 22) scaled to ``steps``."""
    return {"lr": BASE_LR * BATCH / REFERENCE_BATCH,
            "decay_steps": [round(steps * 16 / 26), round(steps * 22 / 26)]}


def lr_at(step: int, steps: int, warmup: int, factor: float = 0.001) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warmup, then steps."""
    s = schedule(steps)
    lr = s["lr"] * 0.1 ** sum(step >= b for b in s["decay_steps"])
    if step < warmup:
        alpha = step / warmup
        lr *= factor * (1 - alpha) + alpha
    return lr


# -- torch side (the torch venv) ----------------------------------------------------------------

def _coco128(data_dir: str):
    """[(path, boxes xyxy float [N, 4], category ids [N], masks uint8 [N, H, W])]: coco128's
    images with at least one usable instance (torchvision's reference drops the rest)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    coco = COCO(os.path.join(data_dir, "annotations", "instances_train2017.json"))
    items = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        h, w = info["height"], info["width"]
        boxes, labels, masks = [], [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            box = [x, y, min(x + bw, w), min(y + bh, h)]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            rle = mask_utils.frPyObjects(a["segmentation"], h, w)
            m = mask_utils.decode(rle)
            boxes.append(box)
            labels.append(a["category_id"])
            masks.append(m.max(axis=2) if m.ndim == 3 else m)
        if boxes:
            items.append((os.path.join(data_dir, "train2017", info["file_name"]),
                          np.array(boxes, np.float32), np.array(labels, np.int64),
                          np.stack(masks).astype(np.uint8)))
    return items


def _torch_model():
    from tests.scripts import torchvision_parity as tp

    model = tp._torch_model(small=False, v2=False, frozen_backbone=True)
    for name, p in model.backbone.body.named_parameters():
        p.requires_grad_(name.startswith(("layer2", "layer3", "layer4")))
    model.transform.min_size, model.transform.max_size = (SHORT,), LONG
    return model


def make_weights(out: str, seed: int) -> None:
    """torchvision's own initialisation (seeded), with each FrozenBatchNorm2d's statistics set
    to those of its input on two coco128 photos (data-dependent: a random ResNet-50 with identity
    norms grows its activations layer by layer beyond what SGD at the reference lr survives)."""
    import torch
    from PIL import Image
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(seed)
    model = _torch_model()
    model.eval()

    def calibrate(module, inputs):  # runs before the norm: its statistics become the input's
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        module.weight.fill_(1.0)
        module.bias.zero_()

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    photos = []
    for name in CALIBRATION_PHOTOS:
        photo = Image.open(os.path.join(DATA, "train2017", name)).convert("RGB")
        photos.append(torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float() / 255)
    with torch.no_grad():
        model(photos)
    for h in hooks:
        h.remove()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, **{k: v.numpy() for k, v in model.state_dict().items()
                     if not k.endswith("num_batches_tracked")})


def train_torch(weights: str, seed: int, steps: int, warmup: int, out: str) -> None:
    import random

    import torch
    from PIL import Image

    torch.manual_seed(seed)
    rng = random.Random(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_model()
    with np.load(weights) as f:
        state = {k: torch.from_numpy(f[k]) for k in f.files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), missing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule(steps)["lr"], momentum=0.9, weight_decay=1e-4)
    items = _coco128(DATA)
    sizes = [Image.open(p).size for p, *_ in items]
    groups = {o: [i for i, (w, h) in enumerate(sizes) if (w >= h) == o] for o in (True, False)}

    def batches():
        while True:  # an epoch: each orientation shuffled, cut into pairs, pairs shuffled
            pairs = []
            for idx in groups.values():
                idx = idx[:]
                rng.shuffle(idx)
                pairs += [idx[i:i + BATCH] for i in range(0, len(idx) - BATCH + 1, BATCH)]
            rng.shuffle(pairs)
            yield from pairs

    rows, t0 = [], time.perf_counter()
    for step, idx in zip(range(steps), batches()):
        images, targets = [], []
        for i in idx:
            path, boxes, labels, masks = items[i]
            image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
            image = image.permute(2, 0, 1).float() / 255
            boxes, masks = torch.from_numpy(boxes.copy()), torch.from_numpy(masks.copy())
            if rng.random() < 0.5:  # references/detection RandomHorizontalFlip(0.5)
                w = image.shape[-1]
                image, masks = image.flip(-1), masks.flip(-1)
                boxes = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + \
                    torch.tensor([w, 0, w, 0])
            images.append(image)
            targets.append({"boxes": boxes, "labels": torch.from_numpy(labels), "masks": masks})
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, warmup)
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        row = {"step": step + 1, "learning_rate": lr_at(step, steps, warmup)}
        row.update({ours: losses[theirs].item() for ours, theirs in LOSSES.items()})
        rows.append(row)
        _progress("torch", seed, row, steps, t0)
    _write(out, "torchvision", seed, steps, warmup, rows, time.perf_counter() - t0)


# -- our side ---------------------------------------------------------------------------------

def train_ours(weights: str, seed: int, steps: int, warmup: int, out: str, work: str) -> None:
    import keras

    from mrcnn_tf.config import load_config
    from mrcnn_tf.tools.convert import convert
    from mrcnn_tf.training import make_strategy, train

    converted = os.path.join(work, "converted")
    if not os.path.exists(os.path.join(converted, "config.yaml")):
        with np.load(weights) as f:
            convert({k: f[k] for k in f.files}, converted)
    s = schedule(steps)
    overrides = [
        f"data.train.annotation_file={DATA}/annotations/instances_train2017.json",
        f"data.train.image_dir={DATA}/train2017", f"model.init_from={converted}",
        f"model.preprocess.short_size={SHORT}", f"model.preprocess.long_size={LONG}",
        "data.canvas_long_sides=[640,768,864]", f"train.batch_size={BATCH}",
        f"train.steps={steps}", f"train.warmup_steps={warmup}",
        f"train.decay_steps={s['decay_steps']}", "train.checkpoint_every=50",
        f"train.seed={seed}", "train.log_every=10"]
    config = load_config(os.path.join(REPO, "configs", "torchvision_r50_fpn.yaml"), overrides)

    class Recorder(keras.callbacks.Callback):
        """Each step's five losses, from the loss trackers' running sums."""

        def __init__(self):
            super().__init__()
            self.rows, self.prev, self.t0 = [], {}, time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.prev = {}

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            # Keras logs the rate after the update, the next step's: this step's is the one before.
            row = {"step": step, "learning_rate": lr_at(step - 1, steps, warmup),
                   "next_learning_rate": float(logs["learning_rate"])}
            for k in LOSSES:
                tracker = self.model.loss_trackers[k]
                total, count = float(tracker.total.numpy()), float(tracker.count.numpy())
                pt, pc = self.prev.get(k, (0.0, 0.0))
                row[k] = (total - pt) / (count - pc)
                self.prev[k] = (total, count)
            self.rows.append(row)
            _progress("ours", seed, row, steps, self.t0)

    recorder = Recorder()
    run = os.path.join(work, f"ours-{seed}")
    train(config, make_strategy("default"), run, verbose=0, extra_callbacks=[recorder])
    _write(out, "mrcnn_tf", seed, steps, warmup, recorder.rows,
           time.perf_counter() - recorder.t0)


def _progress(side, seed, row, steps, t0):
    if row["step"] % 10 == 0 or row["step"] == steps:
        rate = (time.perf_counter() - t0) / row["step"]
        print(f"{side} seed {seed} step {row['step']}/{steps} " + " ".join(
            f"{k.removeprefix('loss_')} {row[k]:.4f}" for k in LOSSES) + f" {rate:.2f} s/step",
            flush=True)


def _write(out, side, seed, steps, warmup, rows, seconds):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"side": side, "seed": seed, "steps": steps, "warmup": warmup,
                   "schedule": schedule(steps), "short": SHORT, "long": LONG, "batch": BATCH,
                   "seconds": round(seconds, 1), "machine": platform.processor() or
                   platform.machine(), "cpus": os.cpu_count(),
                   "date": datetime.date.today().isoformat(), "rows": rows}, f)


# -- comparison and figure ------------------------------------------------------------------------

def _smooth(values, window: int = 20):
    v = np.asarray(values, np.float64)
    kernel = np.ones(window) / window
    return np.convolve(np.pad(v, (window - 1, 0), mode="edge"), kernel, mode="valid")


def compare(runs: list[dict], last: int = 100) -> dict:
    """Per loss: each run's mean over the last ``last`` steps; the seed spread within each side
    (|mean seed 0 - mean seed 1|); the difference between the sides' means; and, with two seeds
    on each side, the tolerance, twice the larger within-side spread (what two seeds of one
    implementation already differ by), which the difference passes or not."""
    sides = {}
    for r in runs:
        sides.setdefault(r["side"], []).append(r)
    result = {}
    for k in LOSSES:
        means = {s: [float(np.mean([row[k] for row in r["rows"][-last:]])) for r in rs]
                 for s, rs in sides.items()}
        spread = {s: (max(m) - min(m)) if len(m) > 1 else None for s, m in means.items()}
        side_mean = {s: float(np.mean(m)) for s, m in means.items()}
        entry = {"means": means, "seed_spread": spread, "side_mean": side_mean}
        if len(side_mean) == 2:
            a, b = side_mean.values()
            entry["difference"] = abs(a - b)
            entry["relative_difference"] = abs(a - b) / max(abs(a), abs(b), 1e-12)
        if len(side_mean) == 2 and all(v is not None for v in spread.values()):
            entry["tolerance"] = 2 * max(spread.values())
            entry["within"] = entry["difference"] <= entry["tolerance"]
        result[k] = entry
    return result


def plot(paths: list[str], png: str, out_json: str | None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    fig, axes = plt.subplots(1, len(LOSSES), figsize=(4 * len(LOSSES), 3.4))
    colours = {"mrcnn_tf": "tab:blue", "torchvision": "tab:orange"}
    for ax, k in zip(axes, LOSSES):
        for r in runs:
            steps = [row["step"] for row in r["rows"]]
            ax.plot(steps, _smooth([row[k] for row in r["rows"]]), color=colours[r["side"]],
                    linestyle="-" if r["seed"] == min(x["seed"] for x in runs) else "--",
                    linewidth=1.2, label=f"{r['side']} seed {r['seed']}")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    steps = runs[0]["steps"]
    fig.suptitle(f"coco128 at short side {SHORT}, batch {BATCH}, {steps} steps, the same seeded "
                 "torchvision v1 weights; 20-step moving average", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=90)
    result = compare(runs)
    for k, e in result.items():
        print(k, json.dumps(e))
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"benchmark": "learning_curves", "date": datetime.date.today().isoformat(),
                       "runs": [{k: r[k] for k in r if k != "rows"} for r in runs],
                       "last_100": result, "png": os.path.relpath(png, REPO)}, f, indent=1)
    return 0 if all(e.get("within", False) for e in result.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("weights", help="(torch venv) the seeded torchvision weights")
    w.add_argument("--out", required=True)
    w.add_argument("--seed", type=int, default=0)
    for side in ("torch", "ours"):
        s = sub.add_parser(side, help=f"train {side} and record every step's losses")
        s.add_argument("--weights", required=True)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--steps", type=int, default=300)
        s.add_argument("--warmup", type=int, default=50)
        s.add_argument("--out", required=True)
        if side == "ours":
            s.add_argument("--work", default=None, help="run directories (default: beside --out)")
    pl = sub.add_parser("plot", help="the figure and the last-100-step comparison")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--png", required=True)
    pl.add_argument("--json", default=None)
    a = sub.add_parser("all", help="weights, two seeds per side, plot")
    a.add_argument("--torch_python", required=True)
    a.add_argument("--dir", required=True)
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--warmup", type=int, default=50)
    a.add_argument("--png", default=os.path.join(REPO, "benchmarks", "results",
                                                  "learning_curves.png"))
    args = p.parse_args(argv)
    if args.cmd == "weights":
        make_weights(args.out, args.seed)
    elif args.cmd == "torch":
        train_torch(args.weights, args.seed, args.steps, args.warmup, args.out)
    elif args.cmd == "ours":
        train_ours(args.weights, args.seed, args.steps, args.warmup, args.out,
                   args.work or os.path.dirname(os.path.abspath(args.out)))
    elif args.cmd == "plot":
        return plot(args.runs, args.png, args.json)
    else:
        me, d = os.path.abspath(__file__), args.dir
        weights = os.path.join(d, "weights.npz")
        common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        if not os.path.exists(weights):
            subprocess.run([args.torch_python, me, "weights", "--out", weights], check=True)
        for seed in (0, 1):
            for side, python in (("ours", sys.executable), ("torch", args.torch_python)):
                out = os.path.join(d, f"{side}-{seed}.json")
                if not os.path.exists(out):
                    subprocess.run([python, me, side, "--weights", weights, "--seed", str(seed),
                                    "--out", out, *common], check=True)
        date = datetime.date.today().isoformat()
        runs = [os.path.join(d, f"{s}-{i}.json") for i in (0, 1) for s in ("ours", "torch")]
        out = os.path.join(REPO, "benchmarks", "results", f"{date}-learning-curves.json")
        # matplotlib is in the torch venv (setup_peers.sh), not a project dependency.
        return subprocess.run([args.torch_python, me, "plot", *runs, "--png", args.png,
                               "--json", out]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
