import contextlib
import io
import json
import os
import subprocess
import sys
import types

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
                       str(root / "export" / "1"), ("image_tensor", "image_bytes"))
    return root


@pytest.mark.slow
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


def _predict(*args):
    """mrcnn_tf.predict's main in this process (a separate process is what
    test_predict_cli_on_a_real_image is about): its exit code and what it printed."""
    from mrcnn_tf.predict import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_folders_globs_and_same_names(shared_data, run_dir, tmp_path):
    """Directories (recursive), quoted globs and files; two images called 1.jpg in different
    folders; overlays keep their relative paths, every image gets its own id, and batches of
    several images (of different sizes) give the detections of one at a time."""
    photos = sorted((shared_data / "coco_tiny16" / "train2017").iterdir())[:4]
    tree = tmp_path / "in"
    for rel, src in (("a/1.jpg", photos[0]), ("b/1.jpg", photos[1]),
                     ("b/sub/2.jpg", photos[2]), ("c/x.jpg", photos[3])):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(src.read_bytes())
    (tree / "a" / "notes.txt").write_text("not an image")
    inputs = [tree / "a", str(tree / "b" / "**" / "*.jpg"), tree / "c" / "x.jpg",
              tree / "a" / "1.jpg"]  # given twice: once through its folder
    outs = {}
    for name, source, batch in (("one", ["--model_dir", run_dir], 1),
                                ("batched", ["--model_dir", run_dir], 3),
                                ("saved", ["--saved_model", run_dir / "export" / "1"], 2)):
        out = tmp_path / name
        res = _predict(*source, *inputs, "--output_dir", out, "--batch_size", batch,
                       "--score_threshold", "0.05")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "[4/4]" in res.stdout
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
        assert written == ["a/1.png", "b/1.png", "b/sub/2.png", "c/x.png"]
        ids = json.loads((out / "image_ids.json").read_text())
        assert sorted(ids.values()) == [1, 2, 3, 4]
        assert ids[str(tree / "c" / "x.jpg")] == 4
        outs[name] = json.loads((out / "results.json").read_text())
    for name in ("batched", "saved"):
        assert len(outs[name]) == len(outs["one"]) > 0
        for a, b in zip(outs["one"], outs[name]):
            assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
            np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.05)


def test_ids_from_annotations_and_inputs_that_name_nothing(shared_data, run_dir, tmp_path):
    from mrcnn_tf.evaluation.coco import evaluate_results_json

    ann = shared_data / "coco_tiny16" / "instances_train2017.json"
    folder = tmp_path / "renamed"
    folder.mkdir()
    photos = sorted((shared_data / "coco_tiny16" / "train2017").iterdir())[:2]
    for p in photos:  # same file names, another folder: the ids come from the file names
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    res = _predict("--model_dir", run_dir, folder, "--output_dir", out, "--annotations", ann,
                   "--score_threshold", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    images = {im["file_name"]: im["id"] for im in json.loads(ann.read_text())["images"]}
    ids = json.loads((out / "image_ids.json").read_text())
    assert {os.path.basename(k): v for k, v in ids.items()} == {
        p.name: images[p.name] for p in photos}
    scores = evaluate_results_json(str(ann), str(out / "results.json"))
    assert -1.0 <= scores["bbox"]["AP"] <= 1.0
    (folder / "stray.jpg").write_bytes(photos[0].read_bytes())
    res = _predict("--model_dir", run_dir, folder, "--output_dir", out, "--annotations", ann)
    assert res.returncode == 2 and "no image named stray.jpg" in res.stderr
    for bad in (tmp_path / "missing.jpg", str(tmp_path / "*.png"), tmp_path / "out" / "a"):
        res = _predict("--model_dir", run_dir, bad, "--output_dir", out)
        assert res.returncode == 2 and str(bad) in res.stderr, res.stderr[-500:]


def test_evaluating_the_saved_model_equals_the_keras_model(run_dir, capsys):
    from mrcnn_tf.checkpoint import restore
    from mrcnn_tf.evaluation.run import evaluate, model_predict_fn, saved_model_predict_fn

    cfg = mrcnn_tf.load_config(str(REPO / "configs" / "shapes.yaml"), [
        "model.detection.score_threshold=0.0", "data.eval.num_images=4", "eval.batch_size=2"])
    model = mrcnn_tf.build_model(cfg)
    restore(model, str(run_dir / "checkpoints" / "ckpt-1"))
    keras_res = evaluate(model_predict_fn(model), cfg)
    progress = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("evaluation: ")]
    assert progress and progress[-1].startswith("evaluation: 4/4 images")
    saved_res = evaluate(saved_model_predict_fn(str(run_dir / "export" / "1"), [1, 2, 3]), cfg)
    assert keras_res["num_images"] == saved_res["num_images"] == 4
    assert saved_res["bbox"]["AP50"] == pytest.approx(keras_res["bbox"]["AP50"], abs=1e-3)
    assert saved_res["segm"]["AP50"] == pytest.approx(keras_res["segm"]["AP50"], abs=0.02)


def test_post_processing_set_at_predict_and_mistakes_that_exit_2(shared_data, run_dir, tmp_path,
                                                                 capsys):
    """In process (main(argv)): --set changes a run's post-processing, a SavedModel's base
    folder serves its highest version as TF Serving does, and each mistake exits 2 with one
    line naming the flag or file: a folder that is not a run, a model key, --set with a
    SavedModel, and inputs of which none is an image."""
    from mrcnn_tf.predict import main

    photos = sorted((shared_data / "coco_tiny16" / "train2017").iterdir())[:2]
    out = tmp_path / "out"
    assert main(["--model_dir", str(run_dir), *map(str, photos), "--output_dir", str(out),
                 "--score_threshold", "0", "--set", "model.detection.max_detections=2",
                 "model.detection.score_threshold=0.0"]) == 0
    results = json.loads((out / "results.json").read_text())
    per_image = [sum(r["image_id"] == int(p.stem) for r in results) for p in photos]
    assert per_image == [2, 2]  # the shapes model returns 20 at score threshold 0 otherwise
    capsys.readouterr()
    assert main(["--saved_model", str(run_dir / "export"), str(photos[0]),
                 "--output_dir", str(tmp_path / "base")]) == 0
    assert (tmp_path / "base" / (photos[0].stem + ".png")).exists()
    not_an_image = tmp_path / "notes" / "a.jpg"
    not_an_image.parent.mkdir()
    not_an_image.write_text("text, not a JPEG")
    cases = [
        (["--model_dir", str(tmp_path)], "has no config.json: not a run directory"),
        (["--model_dir", str(run_dir), "--set", "model.fpn.channels=8"],
         "model.fpn.channels: the model in"),
        (["--saved_model", str(tmp_path)], "neither a SavedModel"),
        (["--model_dir", str(run_dir), str(not_an_image)], "none of the 1 input files"),
    ]
    for args, expected in cases:
        capsys.readouterr()
        inputs = [] if any(a.endswith(".jpg") for a in args) else [str(photos[0])]
        assert main([*inputs, *args, "--output_dir", str(tmp_path / "x")]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("error: ")]
        assert len(err) == 1 and expected in err[0], (args, err)
    with pytest.raises(SystemExit) as e:
        main(["--saved_model", str(run_dir / "export"), str(photos[0]), "--output_dir",
              str(tmp_path / "x"), "--set", "model.detection.max_detections=2"])
    assert e.value.code == 2
    assert "--set applies to --model_dir" in capsys.readouterr().err
