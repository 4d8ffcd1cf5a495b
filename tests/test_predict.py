import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mrcnn_tf
from mrcnn_tf.checkpoint import make_checkpoint
from mrcnn_tf.rundir import write_config, write_labels
from mrcnn_tf.serving import export_saved_model
from tests.conftest import REPO


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cfg = mrcnn_tf.load_config(str(REPO / "configs" / "shapes.yaml"),
                               ["model.detection.score_threshold=0.0"])
    model = mrcnn_tf.build_model(cfg)
    os.makedirs(root / "checkpoints")
    make_checkpoint(model).save(str(root / "checkpoints" / "ckpt"))
    write_config(str(root), cfg)
    write_labels(str(root), [1, 2, 3], ["square", "circle", "triangle"])
    export_saved_model(model, [1, 2, 3], ["square", "circle", "triangle"],
                       str(root / "export" / "1"), ("image_tensor",))
    return root


@pytest.mark.parametrize("source", ["model_dir", "saved_model"])
def test_predict_cli_on_a_real_image(shared_data, run_dir, tmp_path, source):
    from pycocotools.coco import COCO

    ann = shared_data / "coco_tiny16" / "instances_train2017.json"
    images = sorted((shared_data / "coco_tiny16" / "train2017").iterdir())[:2]
    arg = ["--model_dir", str(run_dir)] if source == "model_dir" else [
        "--saved_model", str(run_dir / "export" / "1")]
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "mrcnn_tf.predict", *arg, *map(str, images),
                          "--output_dir", str(out), "--score_threshold", "0.1"],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    for image in images:
        png = out / (image.stem + ".png")
        assert png.read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {int(p.stem) for p in images}
    gt = COCO(str(ann))
    dt = gt.loadRes(str(out / "results.json"))
    assert len(dt.getAnnIds()) == len(results)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert np.isfinite([r["score"] for r in results]).all()


def test_evaluating_the_saved_model_equals_the_keras_model(run_dir):
    from mrcnn_tf.checkpoint import restore
    from mrcnn_tf.evaluation.run import evaluate, model_predict_fn, saved_model_predict_fn

    cfg = mrcnn_tf.load_config(str(REPO / "configs" / "shapes.yaml"), [
        "model.detection.score_threshold=0.0", "data.eval.num_images=4", "eval.batch_size=2"])
    model = mrcnn_tf.build_model(cfg)
    restore(model, str(run_dir / "checkpoints" / "ckpt-1"))
    keras_res = evaluate(model_predict_fn(model), cfg)
    saved_res = evaluate(saved_model_predict_fn(str(run_dir / "export" / "1"), [1, 2, 3]), cfg)
    assert keras_res["num_images"] == saved_res["num_images"] == 4
    assert saved_res["bbox"]["AP50"] == pytest.approx(keras_res["bbox"]["AP50"], abs=1e-3)
    assert saved_res["segm"]["AP50"] == pytest.approx(keras_res["segm"]["AP50"], abs=0.02)
