"""ONNX and LiteRT exports (export_saved_model.py --format onnx|litert) run by onnxruntime and
ai-edge-litert: the converted torchvision model's detections and masks on the fixture's real
COCO photo, against torchvision's own."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.parity import torchvision_inference as tp

ort = pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")


def _mask_iou_min(masks, ref_masks):
    inter = (masks & ref_masks).sum(axis=(1, 2))
    union = (masks | ref_masks).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).min()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from mrcnn_tf.tools.convert import convert

    with np.load(tp.SMALL_FIXTURE) as f:
        state = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
    run = tmp_path_factory.mktemp("onnx") / "run"
    convert(state, str(run), None, tp.parity_overrides(small=True))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("mask_output", ["full", "box"])
def test_onnx_model_gives_torchvision_detections(run_dir, tmp_path, mask_output):
    out = tmp_path / "export"
    subprocess.run([sys.executable, "export/export_saved_model.py", "--model_dir", str(run_dir),
                    "--output", str(out), "--format", "onnx", "--mask_output", mask_output],
                   check=True, cwd=REPO)
    path = out / "1" / "model.onnx"
    labels = json.loads((out / "1" / "labels.json").read_text())
    assert len(labels) == 90 and labels[0]["name"] == "person"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    with np.load(tp.SMALL_FIXTURE) as f:
        image, ref = f["image"], {k: f[k] for k in ("det_boxes", "det_scores", "det_classes",
                                                     "det_masks")}
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"images": image[None]})))
    n = int(got["num_detections"][0])
    assert n == len(ref["det_scores"]) == 100
    np.testing.assert_array_equal(got["detection_classes"][0, :n], ref["det_classes"])
    np.testing.assert_allclose(got["detection_boxes"][0, :n], ref["det_boxes"], atol=1e-2)
    np.testing.assert_allclose(got["detection_scores"][0, :n], ref["det_scores"], atol=1e-4)
    masks = got["detection_masks"][0, :n]
    if mask_output == "box":
        assert masks.shape == (n, 28, 28) and masks.dtype == np.float32
        return
    masks = masks.astype(bool)
    assert masks.shape == ref["det_masks"].shape
    assert _mask_iou_min(masks, ref["det_masks"]) >= 0.99


def test_png_masks_are_refused_for_onnx(run_dir, tmp_path):
    done = subprocess.run([sys.executable, "export/export_saved_model.py", "--model_dir",
                           str(run_dir), "--output", str(tmp_path / "e"), "--format", "onnx",
                           "--mask_output", "png"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "mask_output must be box or full; got 'png'" in done.stderr


@pytest.mark.slow
def test_litert_model_has_builtin_ops_only_and_gives_torchvision_detections(run_dir, tmp_path):
    """--format litert: builtin ops only (the converter is told to refuse others), run by
    ai-edge-litert's interpreter at the fixture photo's fixed size; the box masks pasted as the
    run pastes them equal torchvision's masks."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    from mrcnn_tf.ops.masks import paste_masks

    with np.load(tp.SMALL_FIXTURE) as f:
        image, ref = f["image"], {k: f[k] for k in ("det_boxes", "det_scores", "det_classes",
                                                     "det_masks")}
    out = tmp_path / "export"
    h, w = image.shape[:2]
    subprocess.run([sys.executable, "export/export_saved_model.py", "--model_dir", str(run_dir),
                    "--output", str(out), "--format", "litert", "--image_size", f"{h},{w}"],
                   check=True, cwd=REPO)
    interpreter = litert.Interpreter(model_path=str(out / "1" / "model.tflite"))
    got = interpreter.get_signature_runner()(images=image[None])
    n = int(got["num_detections"][0])
    assert n == len(ref["det_scores"]) == 100
    np.testing.assert_array_equal(got["detection_classes"][0, :n], ref["det_classes"])
    np.testing.assert_allclose(got["detection_boxes"][0, :n], ref["det_boxes"], atol=1e-2)
    np.testing.assert_allclose(got["detection_scores"][0, :n], ref["det_scores"], atol=1e-4)
    masks = paste_masks(got["detection_masks"][0, :n], got["detection_boxes"][0, :n], h, w,
                        method="torchvision").numpy().astype(bool)
    assert _mask_iou_min(masks, ref["det_masks"]) >= 0.99
    wrong = subprocess.run([sys.executable, "export/export_saved_model.py", "--model_dir",
                            str(run_dir), "--output", str(tmp_path / "e"), "--format", "litert"],
                           cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "--format litert needs --image_size H,W" in wrong.stderr


def test_converter_config_gives_the_implementations_each_format_converts():
    """A Python caller builds the model to export from converter_config (as the CLI does); a
    model built otherwise is refused with that instruction."""
    from types import SimpleNamespace

    from mrcnn_tf.config import load_config
    from mrcnn_tf.export_formats import converter_config, export_litert

    config = load_config(REPO / "configs" / "shapes.yaml")
    assert config.model.roi_align.impl == "crop_and_resize"
    onnx, litert = converter_config(config, "onnx"), converter_config(config, "litert")
    assert onnx.model.nms_impl == litert.model.nms_impl == "static"
    assert onnx.model.roi_align.impl == litert.model.roi_align.impl == "gather"
    assert onnx.model.roi_align.sampling_ratio == config.model.roi_align.sampling_ratio
    # Adaptive sampling (detectron2's sampling_ratio 0) has no gather form: ONNX keeps it.
    adaptive = load_config(REPO / "configs" / "detectron2_r50_fpn.yaml")
    assert adaptive.model.roi_align.sampling_ratio == 0
    assert converter_config(adaptive, "onnx").model.roi_align == adaptive.model.roi_align
    with pytest.raises(ValueError, match="fmt must be onnx or litert"):
        converter_config(config, "tflite")
    default = SimpleNamespace(proposal_generator=SimpleNamespace(nms_impl="tf"),
                              detection_generator=SimpleNamespace(nms_impl="tf"),
                              box_roi_align=SimpleNamespace(impl="crop_and_resize"))
    with pytest.raises(ValueError, match=r"converter_config\(config, 'litert'\)"):
        export_litert(default, [1], ["a"], "/nonexistent/x.tflite", (64, 64))
