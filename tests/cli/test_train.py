"""train.py's mistakes end in exit 2 and one line naming the key and the fix, before a model
is built; the start-up lines a CPU-only machine printed are gone. In process (main(argv))
unless a fresh process is the point."""

import json
import os
import subprocess
import sys

import pytest

from mrcnn_tf.cli.train import main
from tests.conftest import REPO

SHAPES = str(REPO / "configs" / "shapes.yaml")
COCO = str(REPO / "configs" / "coco_r50_fpn_1x.yaml")


def _error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def test_data_mistakes_are_named_before_anything_is_built(shared_data, tmp_path, capsys):
    tiny = shared_data / "coco_tiny16"
    train = [f"data.train.annotation_file={tiny}/instances_train2017.json",
             f"data.train.image_dir={tiny}/train2017"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        # The default train-and-eval mode with only data.train.* set: COCO's val2017 default.
        (["--config", COCO, "--set", *train],
         ["data.eval.annotation_file: coco/annotations/instances_val2017.json not found",
          "--mode train"]),
        (["--config", COCO, "--mode", "train", "--set", "data.train.annotation_file=nope.json",
          "data.train.image_dir=."], ["data.train.annotation_file: nope.json not found"]),
        (["--config", COCO, "--mode", "train", "--set", *train[:1],
          "data.train.image_dir=nowhere"], ["data.train.image_dir: nowhere is not a directory"]),
        # A folder that exists but holds none of the JSON's images: one error, no 16 warnings.
        (["--config", SHAPES, "--mode", "train", "--set", "model.num_classes=80",
          "data.train.source=coco", *train[:1], f"data.train.image_dir={empty}"],
         ["no usable images: none of its 16 images is in the image folder", "image_dir"]),
        (["--config", SHAPES, "--mode", "train", "--set", "data.train.source=coco", *train],
         ["has 80 categories but model.num_classes is 3: set model.num_classes=80"]),
        (["--config", SHAPES, "--set", "train.step=10"],
         ["override 'train.step=10': unknown key 'train.step' (did you mean 'train.steps'?)"]),
    ]
    for i, (args, expected) in enumerate(cases):
        run = tmp_path / f"run{i}"
        assert main([*args[:2], "--model_dir", str(run), *args[2:]]) == 2, args
        line = _error_line(capsys)
        for part in expected:
            assert part in line, (args, line)
        assert not run.exists()


def test_mirrored_on_one_device_says_so_when_it_starts(tmp_path, capsys):
    assert main(["--strategy", "mirrored", "--model_dir", str(tmp_path / "run"), "--mode",
                 "eval"]) == 2  # no run to evaluate: stops right after the strategy
    out = capsys.readouterr()
    assert "--strategy mirrored: 1 replica" in out.out and "no GPU found" in out.out
    assert "no checkpoint" in out.err


def test_no_cuda_probe_lines_on_a_cpu_only_machine():
    """What a program prints before its own output: on a CPU-only machine TensorFlow's C++
    side writes about seven lines at import (CUDA's probe, among them "failed call to cuInit",
    oneDNN's notice); quiet() holds them back and says once that no GPU was found."""
    code = ("import sys; from mrcnn_tf.cli import quiet; quiet(); import tensorflow as tf; "
            "print(tf.constant(2) * 3); print('own line', file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU machine: no CUDA probe failure to hold back")
    assert lines[-1] == "own line"
    assert not [line for line in lines if "cuInit" in line or "oneDNN" in line
                or "absl::InitializeLog" in line or "cuda" in line.lower()
                and "no GPU found" not in line], lines
    assert len(lines) <= 2, lines  # "no GPU found" (where a CUDA build probed) and our own


def test_a_pth_without_torch_is_a_message(tmp_path, capsys):
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed")
    except ImportError:
        pass
    from mrcnn_tf.tools.convert import main as convert

    pth = tmp_path / "model.pth"
    pth.write_bytes(b"PK\x03\x04not really")
    assert convert(["--checkpoint", str(pth), "--output", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "needs torch (pip install torch)" in line


def test_a_resumed_run_refuses_a_model_key_naming_the_way_forward(tmp_path, capsys):
    """A resumed run's refusal names the keys and says how to start from its weights."""
    run = tmp_path / "run"
    run.mkdir()
    from mrcnn_tf.config import load_config
    from mrcnn_tf.rundir import write_config

    write_config(str(run), load_config(SHAPES))
    assert json.loads((run / "config.json").read_text())["model"]["num_classes"] == 3
    assert main(["--model_dir", str(run), "--set", "model.fpn.channels=8"]) == 2
    line = _error_line(capsys)
    assert "model.fpn.channels cannot change when it resumes" in line
    assert "model.init_from" in line
