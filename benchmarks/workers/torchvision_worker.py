"""Benchmark worker for torchvision's maskrcnn_resnet50_fpn (v1), run in the torch venv.

Random weights; the model is built as maskrcnn_resnet50_fpn builds it with pretrained weights
(FrozenBatchNorm2d, 3 trainable backbone stages), which is how users train and run it.
box_score_thresh=0 so that the mask head runs on 100 detections, as ours does in the same run.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from protocol import serve  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--measure", required=True, choices=("inference", "train"))
    p.add_argument("--inputs", required=True)
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


if __name__ == "__main__":
    main()
