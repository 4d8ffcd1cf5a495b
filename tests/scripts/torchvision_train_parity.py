"""Training-path parity with torchvision's maskrcnn_resnet50_fpn (v1) in training mode: the five
losses, the gradient of every trainable parameter, the sampled counts, and two optimiser steps of
torchvision's reference recipe (references/detection/train.py).

Three halves, because torch and TensorFlow live in different virtual environments:

  inputs (mrcnn_tf's venv): real COCO 2017 photos of different sizes and aspect ratios from
    ../shared/data/coco128 with their instances (boxes, COCO category ids, rasterised masks);
  reference (torch + torchvision): torchvision's model as built for pretrained weights
    (FrozenBatchNorm2d, conv1 and layer1 frozen), seeded random weights calibrated as in
    torchvision_parity.py, in training mode. It records, on the transformed (resized) inputs:
    the losses of each image with sampling off (every anchor, every proposal), padded as
    torchvision pads and padded to the canvas our grouped pipeline gives it, the sampled
    counts per image with sampling on, the gradients of one two-image batch, and the weights
    after two SGD steps of the reference recipe on that batch;
  check (mrcnn_tf): converts the state dict with load_torchvision, feeds our forward_train the
    same resized images and targets, and compares.

``--small`` uses the reduced-width model of torchvision_parity.py (short side 200, long 320) with
that script's committed weights; images are first resized to the size torchvision's transform
gives them, so that its transform leaves them unchanged and they can be stored as uint8. Its
reference is committed as tests/fixtures/torchvision_train_small.npz and checked by
tests/test_train_parity.py without torch. The full-size run is one command (about 10 minutes;
it writes 0.5 GB to /tmp)::

    python tests/scripts/torchvision_train_parity.py \
        --torch_python benchmarks/.venvs/torch/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.scripts import torchvision_parity as tp  # noqa: E402

SMALL_FIXTURE = REPO / "tests" / "fixtures" / "torchvision_train_small.npz"
DATA = REPO.parent / "shared" / "data" / "coco128"
# Portrait, tall portrait, square, very wide (long side capped), 4:3 and 2:1 landscapes.
IMAGES = ("000000000049.jpg", "000000000113.jpg", "000000000309.jpg", "000000000357.jpg",
          "000000000077.jpg", "000000000338.jpg")
BATCH = (4, 0)  # the two-image batch of the gradient and update checks: landscape + portrait
LR, MOMENTUM, WEIGHT_DECAY, WARMUP_FACTOR, WARMUP_ITERS = 0.02, 0.9, 1e-4, 0.001, 1000
LOSS_NAMES = {"loss_objectness": "loss_rpn_objectness", "loss_rpn_box_reg": "loss_rpn_box",
              "loss_classifier": "loss_box_class", "loss_box_reg": "loss_box_reg",
              "loss_mask": "loss_mask"}
OFF = 10 ** 7  # torchvision's batch_size_per_image that samples everything


# -- inputs (mrcnn_tf venv: pycocotools) ----------------------------------------------------------

def inputs(out_path: str, data_dir: str = str(DATA)) -> None:
    """Real photos and their non-crowd instances: boxes (x1, y1, x2, y2), COCO ids, masks."""
    from PIL import Image

    from mrcnn_tf.data.coco import CocoDataset, rasterize
    from mrcnn_tf.data.pipeline import canvases

    coco = CocoDataset(os.path.join(data_dir, "annotations", "instances_train2017.json"),
                       os.path.join(data_dir, "train2017"))
    records = {os.path.basename(r["file_name"]): r for r in coco.records}
    # Our pipeline's canvases (data.canvas_long_sides), for the losses on the grouped path.
    out = {f"canvases_{'small' if small else 'full'}": np.array(canvases(our_config(small, True)))
           for small in (True, False)}
    for i, name in enumerate(IMAGES):
        r = records[name]
        out[f"image{i}"] = np.asarray(Image.open(r["file_name"]).convert("RGB"))
        y1, x1, y2, x2 = r["boxes"].T
        out[f"boxes{i}"] = np.stack([x1, y1, x2, y2], 1)
        out[f"labels{i}"] = np.asarray([coco.category_ids[c - 1] for c in r["classes"]])
        out[f"masks{i}"] = rasterize(r["segmentations"], r["height"], r["width"])
    np.savez_compressed(out_path, **out)


# -- the torch half -----------------------------------------------------------------------------

def _sampling(model, rpn: int, rpn_fraction: float, box: int, box_fraction: float) -> None:
    model.rpn.fg_bg_sampler.batch_size_per_image = rpn
    model.rpn.fg_bg_sampler.positive_fraction = rpn_fraction
    model.roi_heads.fg_bg_sampler.batch_size_per_image = box
    model.roi_heads.fg_bg_sampler.positive_fraction = box_fraction


class _Counting:
    """A BalancedPositiveNegativeSampler that records, per image, the positive and negative
    candidates and how many of each it sampled."""

    def __init__(self, sampler, record: list):
        self.sampler, self.record = sampler, record

    def __call__(self, matched_idxs):
        pos, neg = self.sampler(matched_idxs)
        for labels, p, n in zip(matched_idxs, pos, neg):
            self.record.append([int((labels >= 1).sum()), int((labels == 0).sum()),
                                int(p.sum()), int(n.sum())])
        return pos, neg


def reference(inputs_path: str, out_path: str, small: bool, seed: int = 0) -> None:
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(seed)
    model = tp._torch_model(small)
    if small:
        # The inference fixture's weights; conv1 and layer1 frozen as _resnet_fpn_extractor(3).
        with np.load(tp.SMALL_FIXTURE) as f:
            model.load_state_dict({k[3:]: torch.from_numpy(f[k]) for k in f.files
                                   if k.startswith("sd/")})
        for name, p in model.backbone.body.named_parameters():
            p.requires_grad_(name.startswith(("layer2", "layer3", "layer4")))
    else:
        tp._randomise(model, seed)
    data = dict(np.load(inputs_path))
    canvases = data[f"canvases_{'small' if small else 'full'}"]
    out = {}
    images, targets = [], []
    for i in range(len(IMAGES)):
        image = torch.from_numpy(data[f"image{i}"]).permute(2, 0, 1)
        t = {"boxes": torch.from_numpy(data[f"boxes{i}"]).float(),
             "labels": torch.from_numpy(data[f"labels{i}"]).long(),
             "masks": torch.from_numpy(data[f"masks{i}"])}
        if small:  # to the size torchvision's transform gives it, so the transform is identity
            model.eval()
            (h, w), = model.transform([image.float() / 255])[0].image_sizes
            sy, sx = h / image.shape[1], w / image.shape[2]
            image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).byte()
            t["masks"] = F.interpolate(t["masks"][:, None].float(), size=(h, w))[:, 0].byte()
            t["boxes"] = t["boxes"] * torch.tensor([sx, sy, sx, sy])
        images.append(image.float() / 255)
        targets.append(t)
    if not small:
        model.eval()
        tp._calibrate(model, images[0])
        out.update({f"sd/{k}": v.numpy().copy() for k, v in model.state_dict().items()
                    if not k.endswith("num_batches_tracked")})
    out["meta"] = np.array(json.dumps({"small": small, "seed": seed, "images": IMAGES,
                                       "batch": BATCH, "torchvision": torchvision.__version__}))
    model.train()

    def transformed(idx):
        """torchvision's resized inputs and targets of images ``idx``, un-normalised."""
        ims, ts = model.transform([images[i] for i in idx], [dict(targets[i]) for i in idx])
        mean = torch.tensor(model.transform.image_mean)[:, None, None]
        std = torch.tensor(model.transform.image_std)[:, None, None]
        pixels = ((ims.tensors * std + mean) * 255.0).permute(0, 2, 3, 1).numpy()
        return pixels, np.array(ims.image_sizes), ts

    # Per image, sampling off: every anchor and every proposal (plus the ground truth).
    _sampling(model, OFF, 1.0, OFF, 1.0)
    for i in range(len(IMAGES)):
        pixels, sizes, (t,) = transformed([i])
        h, w = sizes[0]
        image = pixels[0, :h, :w]
        if small:  # stored as uint8: the transform was identity up to float rounding
            assert np.abs(image - np.round(image)).max() < 1e-3
            image = np.round(image).astype(np.uint8)
        out[f"image{i}"] = image
        out[f"boxes{i}"] = t["boxes"].numpy()[:, [1, 0, 3, 2]]
        out[f"labels{i}"] = t["labels"].numpy()
        out[f"masks{i}"] = t["masks"].numpy()
        with torch.no_grad():
            losses = model([images[i]], [dict(targets[i])])
            out[f"losses{i}"] = np.array([float(losses[k]) for k in LOSS_NAMES])
            canvas, losses = _on_canvas(model, images[i], targets[i], canvases)
        out[f"canvas{i}"] = np.array(canvas)
        out[f"canvas_losses{i}"] = np.array([float(losses[k]) for k in LOSS_NAMES])

    # Per image, sampling on (256 anchors at 1:1, 512 RoIs at 25%): candidate and sampled counts.
    _sampling(model, 256, 0.5, 512, 0.25)
    rpn_counts, roi_counts = [], []
    rpn_sampler, roi_sampler = model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler
    model.rpn.fg_bg_sampler = _Counting(rpn_sampler, rpn_counts)
    model.roi_heads.fg_bg_sampler = _Counting(roi_sampler, roi_counts)
    with torch.no_grad():
        for i in range(len(IMAGES)):
            model([images[i]], [dict(targets[i])])
    model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler = rpn_sampler, roi_sampler
    out["rpn_counts"] = np.array(rpn_counts)
    out["roi_counts"] = np.array(roi_counts)

    # One batch, sampling off: gradients, then two steps of the reference recipe.
    _sampling(model, OFF, 1.0, OFF, 1.0)
    batch = list(BATCH)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(params.values()), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_FACTOR,
                                                 total_iters=WARMUP_ITERS)
    before = {k: p.detach().clone() for k, p in params.items()}
    lrs = []
    for step in range(2):
        optimizer.zero_grad()
        losses = model([images[i] for i in batch], [dict(targets[i]) for i in batch])
        sum(losses.values()).backward()
        if step == 0:
            out["batch_losses"] = np.array([float(losses[k].detach()) for k in LOSS_NAMES])
            for k, p in params.items():
                out[f"grad/{k}"] = p.grad.numpy().copy()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    out["lrs"] = np.array(lrs)
    if not small:
        out.update(_imagenet_reference(torch, torchvision, seed, transformed([0])[0]))
    # The update is stored as torch.optim.SGD defines it, in float64 from the first step's
    # buffer (gradient + decay), the second step's buffer and the learning rates: read back from
    # float32 weights it would carry their rounding. That it is what torch applied is checked
    # here, within that rounding.
    worst = 0.0
    for k, p in params.items():
        buf = optimizer.state[p]["momentum_buffer"].numpy()
        out[f"buffer/{k}"] = buf
        w0 = before[k].numpy().astype(np.float64)
        update = (-lrs[0] * (out[f"grad/{k}"] + WEIGHT_DECAY * w0) - lrs[1] * buf)
        applied = (p.detach() - before[k]).numpy()
        floor = np.spacing(np.abs(before[k].numpy())) * 2
        worst = max(worst, float((np.abs(applied - update) / (floor + 1e-3 * np.abs(update)))
                                 .max()))
    assert worst <= 1.0, f"torch's applied update differs from its formula ({worst})"
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 1e6:.1f} MB)")


def _on_canvas(model, image, target, canvases):
    """torchvision's losses of one image padded, like our grouped batches, to the smallest of
    ``canvases`` [(H, W), ...] (by area) that holds its resized size."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    ims, ts = model.transform([image], [dict(target)])
    h, w = ims.image_sizes[0]
    canvas = min((c for c in canvases if c[0] >= h and c[1] >= w), key=lambda c: c[0] * c[1])
    tensors = torch.zeros(1, 3, int(canvas[0]), int(canvas[1]))
    tensors[:, :, : ims.tensors.shape[2], : ims.tensors.shape[3]] = ims.tensors
    padded = ImageList(tensors, ims.image_sizes)
    feats = model.backbone(padded.tensors)
    proposals, rpn_losses = model.rpn(padded, feats, ts)
    _, roi_losses = model.roi_heads(feats, proposals, padded.image_sizes, ts)
    return [int(c) for c in canvas], {**rpn_losses, **roi_losses}


def _imagenet_reference(torch, torchvision, seed: int, pixels) -> dict:
    """torchvision's ImageNet ResNet-50 (seeded random weights and BN statistics, eval mode):
    its state dict and C2..C5 on a real image, for model.backbone.weights."""
    net = torchvision.models.resnet50()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if "bn" in name or "downsample.1" in name:
                if name.endswith("running_var"):
                    t.copy_(torch.empty(t.shape).uniform_(0.5, 2.0, generator=gen))
                elif name.endswith(("running_mean", "bias")):
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
                elif name.endswith("weight"):
                    t.copy_(torch.empty(t.shape).uniform_(0.5, 1.5, generator=gen))
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (torch.from_numpy(pixels[0]).permute(2, 0, 1) / 255.0 - mean) / std
    out = {"imagenet_input": x.permute(1, 2, 0).numpy()[None]}
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x[None]))))
        for lv, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=2):
            y = layer(y)
            out[f"imagenet_c{lv}"] = y.permute(0, 2, 3, 1).numpy()
    out.update({f"imagenet/{k}": v.numpy() for k, v in net.state_dict().items()
                if not k.endswith("num_batches_tracked")})
    return out


# -- the TensorFlow half ------------------------------------------------------------------------

def our_config(small: bool, sampling: bool, overrides=()):
    from mrcnn_tf.config import load_config

    off = [] if sampling else ["model.rpn.batch_size_per_image=null",
                               "model.box_head.batch_size_per_image=null"]
    return load_config(REPO / "configs" / "torchvision_r50_fpn.yaml",
                       tp.parity_overrides(small) + off + list(overrides))


def _batch(ref: dict, idx, canvas=None) -> tuple:
    """Our data contract for images ``idx`` of the reference, padded as torchvision pads (or to
    ``canvas`` (H, W))."""
    ims = [ref[f"image{i}"].astype(np.float32) for i in idx]
    h = -(-max(im.shape[0] for im in ims) // 32) * 32
    w = -(-max(im.shape[1] for im in ims) // 32) * 32
    if canvas is not None:
        h, w = canvas
    m = max(len(ref[f"labels{i}"]) for i in idx)
    images = np.zeros((len(idx), h, w, 3), np.float32)
    boxes = np.zeros((len(idx), m, 4), np.float32)
    classes = -np.ones((len(idx), m), np.int32)
    masks = np.zeros((len(idx), m, h, w), np.uint8)
    sizes = np.zeros((len(idx), 2), np.int32)
    for b, (i, im) in enumerate(zip(idx, ims)):
        n = len(ref[f"labels{i}"])
        images[b, : im.shape[0], : im.shape[1]] = im
        boxes[b, :n] = ref[f"boxes{i}"]
        classes[b, :n] = ref[f"labels{i}"]
        masks[b, :n, : im.shape[0], : im.shape[1]] = ref[f"masks{i}"]
        sizes[b] = im.shape[:2]
    return images, {"gt_boxes": boxes, "gt_classes": classes, "gt_masks": masks,
                    "image_info": {"image_size": sizes}}


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _model(ref: dict, small: bool, sampling: bool, overrides=()):
    import keras

    from mrcnn_tf.model import build_model
    from mrcnn_tf.weights import load_torchvision

    keras.utils.set_random_seed(0)
    model = build_model(our_config(small, sampling, overrides))
    if small:
        with np.load(tp.SMALL_FIXTURE) as f:
            state = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
    else:
        state = {k[3:]: v for k, v in ref.items() if k.startswith("sd/")}
    load_torchvision(model, state)
    return model


def check(ref_path: str, overrides=(), losses_only: bool = False,
          inputs_path: str | None = None) -> dict:
    """Our training path on the reference's inputs; returns the measured differences.

    ``overrides`` change our config (tests use them to show that a recipe switch matters);
    ``losses_only`` stops after the per-image losses. With ``inputs_path`` (the original photos),
    also measures how our input pipeline's resizing differs from torchvision's transform."""
    import tensorflow as tf

    from mrcnn_tf.model import LOSS_KEYS
    from mrcnn_tf.weights import torchvision_mapping

    ref = dict(np.load(ref_path))
    meta = json.loads(str(ref["meta"]))
    small, n_images = meta["small"], len(meta["images"])
    r = {"images": [list(ref[f"image{i}"].shape[:2]) for i in range(n_images)]}

    model = _model(ref, small, sampling=False, overrides=overrides)

    def loss_diffs(canvas: bool) -> dict:
        rel = np.zeros((n_images, len(LOSS_KEYS)))
        for i in range(n_images):
            images, targets = _batch(ref, [i], ref[f"canvas{i}"] if canvas else None)
            losses = model.forward_train(tf.constant(images), targets, training=True)
            ours = np.array([float(losses[k]) for k in LOSS_KEYS])
            theirs = ref[f"canvas_losses{i}" if canvas else f"losses{i}"]
            rel[i] = np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-12)
        return {k: float(rel[:, j].max()) for j, k in enumerate(LOSS_KEYS)}

    r["loss_rel_diff_max"] = loss_diffs(canvas=False)
    if losses_only:
        return r
    # The same images on the canvases our grouped pipeline puts them on (both sides padded so).
    r["canvases"] = [ref[f"canvas{i}"].tolist() for i in range(n_images)]
    r["canvas_loss_rel_diff_max"] = loss_diffs(canvas=True)

    # Gradients of the two-image batch, parameter by parameter (torchvision's names).
    images, targets = _batch(ref, meta["batch"])
    entries = {var.path: (key, convert) for key, var, convert in torchvision_mapping(model)}
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        losses = model.forward_train(tf.constant(images), targets, training=True)
        total = tf.add_n(list(losses.values()))
    grads = tape.gradient(total, variables)
    r["batch_loss_rel_diff_max"] = float(max(
        abs(float(losses[k]) - ref["batch_losses"][j]) / abs(ref["batch_losses"][j])
        for j, k in enumerate(LOSS_KEYS)))
    ref_keys = {k[5:] for k in ref if k.startswith("grad/")}
    keys = {entries[v.path][0] for v in variables}
    r["trainable"] = [len(keys), len(ref_keys), len(keys ^ ref_keys)]
    grad_rel = {}
    for v, g in zip(variables, grads):
        key, convert = entries[v.path]
        grad_rel[key] = _rel(g.numpy(), convert(ref[f"grad/{key}"]))
    worst = max(grad_rel, key=grad_rel.get)
    r["grad_rel_diff_max"] = [worst, grad_rel[worst]]
    r["grad_rel_diff_median"] = float(np.median(list(grad_rel.values())))

    # Two optimiser steps of the recipe (our config: SGD 0.9, weight decay 1e-4 on every
    # parameter, warmup from 0.001 over 1000 steps, lr 0.02 at batch 16) on the same batch.
    model.compile()
    before = [v.numpy().copy() for v in variables]
    lrs = []
    for _ in range(2):
        lrs.append(float(model.optimizer.learning_rate))
        model.train_step((tf.constant(images), targets))
    r["lrs"] = [lrs, ref["lrs"].tolist()]
    opt = model.optimizer
    buffer_rel, update_rel, floor = {}, {}, {}
    lr0, lr1 = ref["lrs"]
    for v, b in zip(variables, before):
        key, convert = entries[v.path]
        buf = convert(ref[f"buffer/{key}"])
        buffer_rel[key] = _rel(opt.momentum_buffers[opt._get_variable_index(v)].numpy(), buf)
        # torch.optim.SGD's two steps: w2 = w0 - lr0 (g0 + wd w0) - lr1 buf1, in float64.
        w0 = b.astype(np.float64)
        ref_update = -lr0 * (convert(ref[f"grad/{key}"]) + WEIGHT_DECAY * w0) - lr1 * buf
        update_rel[key] = _rel(v.numpy() - w0, ref_update)
        # Our update read back from float32 weights carries their rounding, an ulp per element
        # (large against updates at lr 2e-5): the floor of this comparison.
        floor[key] = float(np.linalg.norm(np.spacing(np.abs(b))) / np.linalg.norm(ref_update))
    worst = max(buffer_rel, key=buffer_rel.get)
    r["momentum_buffer_rel_diff_max"] = [worst, buffer_rel[worst]]
    worst = max(update_rel, key=lambda k: update_rel[k] - 2 * floor[k])
    r["update_rel_diff_max"] = [worst, update_rel[worst], floor[worst]]

    # Sampling on: candidate and sampled counts per image follow torchvision's rule.
    model = _model(ref, small, sampling=True)
    rpn_counts, roi_counts = [], []
    for i in range(n_images):
        images, targets = _batch(ref, [i])
        _, t = model.forward_train(tf.constant(images), targets, training=True,
                                   return_targets=True)
        labels, sampled = t["rpn"]["match_labels"][0].numpy(), t["rpn"]["sampled"][0].numpy()
        rpn_counts.append([int((labels >= 1).sum()), int((labels == 0).sum()),
                           int((sampled & (labels >= 1)).sum()),
                           int((sampled & (labels == 0)).sum())])
        rois = t["rois"]
        cand = rois["match_labels"][0].numpy()
        fg, valid = rois["foreground"][0].numpy(), rois["valid"][0].numpy()
        roi_counts.append([int((cand >= 1).sum()), int((cand == 0).sum()), int(fg.sum()),
                           int((valid & ~fg).sum())])
    r["rpn_counts"] = [rpn_counts, ref["rpn_counts"].tolist()]
    r["roi_counts"] = [roi_counts, ref["roi_counts"].tolist()]
    if "imagenet_input" in ref:
        r["imagenet_c_rel_diff"] = _check_imagenet(ref, model)
    if inputs_path and not small:
        r.update(_check_data(ref, inputs_path, n_images))
    return r


def _check_imagenet(ref: dict, model) -> list:
    """model.backbone.weights with torchvision's ResNet-50 state dict: C2..C5 on a real image,
    each as max |ours - torchvision| / max |torchvision|."""
    import tempfile

    from mrcnn_tf.weights import load_backbone_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet50.npz")
        np.savez(path, **{k[9:]: v for k, v in ref.items() if k.startswith("imagenet/")})
        load_backbone_weights(model, path)
    feats = model.backbone(ref["imagenet_input"])
    return [float(np.abs(feats[f"c{lv}"].numpy() - ref[f"imagenet_c{lv}"]).max()
                  / np.abs(ref[f"imagenet_c{lv}"]).max()) for lv in range(2, 6)]


def _check_data(ref: dict, inputs_path: str, n_images: int) -> dict:
    """Our pipeline's resize (mrcnn_tf.data.transforms, the torchvision config) against
    torchvision's transform on the original photos: image values and mask pixels."""
    from mrcnn_tf.data.pipeline import transform_params
    from mrcnn_tf.data.transforms import transform

    params = transform_params(our_config(False, True))
    data = dict(np.load(inputs_path))
    image_diff, mask_diff = [], []
    for i in range(n_images):
        x1, y1, x2, y2 = data[f"boxes{i}"].T
        example = {"image": data[f"image{i}"], "masks": data[f"masks{i}"],
                   "boxes": np.stack([y1, x1, y2, x2], 1), "classes": data[f"labels{i}"],
                   "image_id": i}
        image, t = transform(example, params, training=False)
        h, w = t["image_info"]["image_size"].numpy()
        ref_image = ref[f"image{i}"]
        assert (h, w) == ref_image.shape[:2], ((h, w), ref_image.shape)
        image_diff.append(float(np.abs(image.numpy()[:h, :w] - ref_image).max()))
        n = len(data[f"labels{i}"])
        ours = t["gt_masks"].numpy()[:n, :h, :w].astype(bool)
        theirs = ref[f"masks{i}"].astype(bool)
        mask_diff.append(float((ours ^ theirs).sum() / theirs.sum()))
    return {"data_image_max_abs_diff": max(image_diff),
            "data_mask_pixels_differing": max(mask_diff)}


TOLERANCES = {"loss": 1e-4, "grad": 1e-3, "update": 1e-3}


def passes(r: dict) -> bool:
    """Losses within 1e-4 relative; every parameter's gradient, momentum buffer and two-step
    update within 1e-3 of torchvision's, relative to that parameter's gradient, buffer or
    update norm (the update also within twice its float32 floor); same learning rates and
    counts."""
    _, update, floor = r["update_rel_diff_max"]
    return (all(v <= TOLERANCES["loss"] for v in r["loss_rel_diff_max"].values())
            and all(v <= TOLERANCES["loss"] for v in r["canvas_loss_rel_diff_max"].values())
            and r["batch_loss_rel_diff_max"] <= TOLERANCES["loss"]
            and r["trainable"][2] == 0
            and r["grad_rel_diff_max"][1] <= TOLERANCES["grad"]
            and r["momentum_buffer_rel_diff_max"][1] <= TOLERANCES["update"]
            and update <= TOLERANCES["update"] + 2 * floor
            and np.allclose(r["lrs"][0], r["lrs"][1], rtol=1e-6)
            and r["rpn_counts"][0] == r["rpn_counts"][1]
            and r["roi_counts"][0] == r["roi_counts"][1]
            and all(d <= 1e-4 for d in r.get("imagenet_c_rel_diff", [])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", choices=("inputs", "reference", "check", "all"),
                   default="all")
    p.add_argument("--small", action="store_true", help="the reduced-width model")
    p.add_argument("--inputs", default="/tmp/torchvision_train_inputs.npz")
    p.add_argument("--reference", help="reference .npz; default: the committed small fixture "
                   "or /tmp for the full model")
    p.add_argument("--data", default=str(DATA), help="the coco128 folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_python", default=sys.executable,
                   help="interpreter with torch and torchvision for the reference half")
    args = p.parse_args(argv)
    path = args.reference or (str(SMALL_FIXTURE) if args.small
                              else "/tmp/torchvision_train_full.npz")
    if args.mode in ("inputs", "all"):
        inputs(args.inputs, args.data)
    if args.mode == "reference":
        reference(args.inputs, path, args.small, args.seed)
    if args.mode == "all":
        subprocess.run([args.torch_python, __file__, "reference", "--inputs", args.inputs,
                        "--reference", path, "--seed", str(args.seed)]
                       + (["--small"] if args.small else []), check=True)
    if args.mode in ("check", "all"):
        result = check(path, inputs_path=args.inputs if os.path.exists(args.inputs) else None)
        print(json.dumps(result, indent=1))
        return 0 if passes(result) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
