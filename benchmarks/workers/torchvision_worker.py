"""Benchmark worker for torchvision's maskrcnn_resnet50_fpn (v1), run in the torch venv.

Random weights; the model is built as maskrcnn_resnet50_fpn builds it with pretrained weights
(FrozenBatchNorm2d, 3 trainable backbone stages), which is how users train and run it.
box_score_thresh=0 so that the mask head runs on 100 detections, as ours does in the same run.

``--measure e2e`` is torchvision's reference training loop (references/detection) on the coco128
photos: COCO JSON read with pycocotools, images without annotations dropped, PIL decode, polygon
and RLE masks rasterised, random horizontal flip, batches of images of one aspect-ratio group
(its GroupedBatchSampler, 3 bins per side), a DataLoader with 2 worker processes, the model's own
resize (short 800, long <= 1333) and batch padding (multiple of 32), SGD (momentum 0.9, weight
decay 1e-4, lr 0.02 * batch / 16). With ``--order`` (a JSON list of batches of COCO image ids,
from ``ours.py --measure order``) it trains on those batches first, in that order: the photos
ours trains on in the same run; grouped random batches follow.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from protocol import serve, training_steps  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--measure", required=True, choices=("inference", "train", "e2e"))
    p.add_argument("--inputs", required=True)
    p.add_argument("--data_dir", default=None, help="coco128 folder (measure=e2e)")
    p.add_argument("--batch", type=int, default=1, help="images per step (measure=e2e)")
    p.add_argument("--steps", type=int, default=5, help="steps per run (measure=e2e)")
    p.add_argument("--warmup_steps", type=int, default=5,
                   help="steps of the second call, the warm-up (measure=e2e)")
    p.add_argument("--order", default=None,
                   help="JSON list of batches of image ids to train on first (measure=e2e)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: torch.autocast('cpu', dtype=torch.bfloat16) around the forward")
    args = p.parse_args()

    import numpy as np
    import torch
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(0)
    inputs = np.load(args.inputs)
    image = torch.from_numpy(inputs["image_800"]).permute(2, 0, 1).float() / 255.0
    state = {}

    if args.measure == "e2e":
        serve(*_e2e(args, torch), {"torch": torch.__version__, "batch": args.batch,
                                   "steps_per_run": args.steps,
                                   "threads": torch.get_num_threads()})
        return

    def build():
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
        model = MaskRCNN(backbone, num_classes=91, box_score_thresh=0.0)
        if args.measure == "train":
            model.train()
            params = [q for q in model.parameters() if q.requires_grad]
            state["opt"] = torch.optim.SGD(params, lr=0.001, momentum=0.9, weight_decay=1e-4)
            b = inputs["boxes_800"][:, [1, 0, 3, 2]]  # (y1, x1, y2, x2) -> (x1, y1, x2, y2)
            state["target"] = {"boxes": torch.from_numpy(b).float(),
                               "labels": torch.from_numpy(inputs["labels"]).long(),
                               "masks": torch.from_numpy(inputs["masks_800"])}
        else:
            model.eval()
        state["model"] = model

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def run_once():
        model = state["model"]
        if args.measure == "inference":
            with torch.no_grad(), autocast():
                out = model([image])[0]
            return {"detections": int(len(out["scores"]))}
        with autocast():
            losses = model([image], [state["target"]])
        loss = sum(v.float() for v in losses.values())
        state["opt"].zero_grad()
        loss.backward()
        state["opt"].step()
        return {"loss": float(loss.detach())}

    serve(run_once, build, {"torch": torch.__version__, "input": list(image.shape),
                            "precision": args.precision,
                            "threads": torch.get_num_threads()})


class CocoPhotos:
    """coco128 as torchvision's reference reads COCO: (image tensor [3, H, W] in 0..1, target)
    with boxes (x1, y1, x2, y2), COCO category ids as labels and [n, H, W] uint8 masks; crowd
    regions dropped, random horizontal flip."""

    def __init__(self, data_dir, torch):
        from pycocotools.coco import COCO

        self.torch = torch
        self.root = f"{data_dir}/train2017"
        self.coco = COCO(f"{data_dir}/annotations/instances_train2017.json")
        self.ids = [i for i in sorted(self.coco.imgs)
                    if any(not a["iscrowd"] for a in self.coco.imgToAnns[i])]

    def __len__(self):
        return len(self.ids)

    def aspect_ratio(self, index):
        info = self.coco.imgs[self.ids[index]]
        return info["width"] / info["height"]

    def __getitem__(self, index):
        import numpy as np
        from PIL import Image
        from pycocotools import mask as mask_utils

        torch = self.torch
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        image = Image.open(f"{self.root}/{info['file_name']}").convert("RGB")
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        masks = []
        for a in anns:
            seg = a["segmentation"]
            rle = (mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list)
                   else mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list)
                   else seg)
            masks.append(mask_utils.decode(rle))
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        target = {"boxes": boxes[keep],
                  "labels": torch.tensor([a["category_id"] for a in anns])[keep],
                  "masks": torch.from_numpy(np.stack(masks))[keep]}
        if torch.rand(1) < 0.5:  # horizontal flip
            x = x.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
            target["masks"] = target["masks"].flip(-1)
        return x, target


def _grouped_batches(dataset, batch, torch, order=None):
    """Batches of images of one aspect-ratio group, forever: the group of each image is its bin
    among 2 ** linspace(-1, 1, 7) (torchvision's create_aspect_ratio_groups with k=3), images in
    random order, a group emitting a batch once it holds ``batch`` images. ``order``, a list of
    batches of image ids, comes first, as it is."""
    import bisect

    import numpy as np

    if order:
        where = {image_id: i for i, image_id in enumerate(dataset.ids)}
        missing = sorted({j for ids in order for j in ids} - set(where))
        if missing:
            raise SystemExit(f"--order: image ids not among the annotated photos: {missing[:5]}")
        for ids in order:
            yield [where[j] for j in ids]

    bins = (2 ** np.linspace(-1, 1, 7)).tolist()
    groups = [bisect.bisect_right(bins, dataset.aspect_ratio(i)) for i in range(len(dataset))]
    pending = {}
    while True:
        for i in torch.randperm(len(dataset)).tolist():
            pending.setdefault(groups[i], []).append(i)
            if len(pending[groups[i]]) == batch:
                yield pending.pop(groups[i])


def _e2e(args, torch):
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    state = {}

    def build():
        dataset = CocoPhotos(args.data_dir, torch)
        order = None
        if args.order:
            import json

            order = json.loads(pathlib.Path(args.order).read_text())
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_grouped_batches(dataset, args.batch, torch, order),
            num_workers=2,
            collate_fn=lambda items: tuple(zip(*items)), persistent_workers=True)
        state["data"] = iter(loader)
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
        model = MaskRCNN(backbone, num_classes=91)
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        state["opt"] = torch.optim.SGD(params, lr=0.02 * args.batch / 16, momentum=0.9,
                                       weight_decay=1e-4)
        state["model"] = model

    def step():
        images, targets = next(state["data"])
        losses = state["model"](list(images), list(targets))
        loss = sum(losses.values())
        state["opt"].zero_grad()
        loss.backward()
        state["opt"].step()
        return float(loss.detach())

    run_once = training_steps(state, step, args.warmup_steps, args.steps, args.batch)
    return run_once, build


if __name__ == "__main__":
    main()
