"""Packaging: one PEP 621 pyproject.toml, a wheel that carries the configs and the licence, and
console scripts that run. (That the wheel, installed non-editable in a fresh environment, trains
the shapes job is ``tests/scripts/wheel_trains.sh``, run by hand on Python 3.11 and 3.12.)"""

import os
import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

from mrcnn_tf.config import load_config, packaged_config
from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_listed_packages_are_every_package_of_the_source_tree():
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "mrcnn_tf").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == found | {"mrcnn_tf.configs"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["mrcnn_tf.configs"] == "configs"


def test_metadata():
    project = PYPROJECT["project"]
    assert project["requires-python"] == ">=3.11"
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert any(d.startswith("keras>=3.15,<") for d in project["dependencies"])
    assert set(project["scripts"]) == {"mrcnn-train", "mrcnn-export", "mrcnn-predict",
                                       "mrcnn-convert"}


def test_wheel_carries_configs_licence_and_console_scripts(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("mrcnn_tf-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    configs = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {f"mrcnn_tf/configs/{c}" for c in configs} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert f"{script} = {target}" in entry_points


@pytest.mark.parametrize("script", ["mrcnn-train", "mrcnn-export", "mrcnn-predict",
                                    "mrcnn-convert"])
def test_console_script_runs(script):
    path = pathlib.Path(sys.executable).parent / script
    if not path.exists():
        pytest.skip(f"{script} not installed in this environment (pip install -e .)")
    res = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout


def test_a_missing_config_path_names_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    path = packaged_config("configs/coco_r50_fpn_1x.yaml")
    assert os.path.isfile(path) and path != "configs/coco_r50_fpn_1x.yaml"
    assert load_config(path).train.steps > 0
    assert packaged_config("configs/nope.yaml") == "configs/nope.yaml"
    (tmp_path / "mine.yaml").write_text("train:\n  steps: 7\n")
    assert packaged_config("mine.yaml") == "mine.yaml"  # a file that exists is taken as it is


def test_import_and_help_do_not_load_tensorflow():
    code = ("import sys, mrcnn_tf, mrcnn_tf.cli.train as t; before = 'tensorflow' in sys.modules;"
            " mrcnn_tf.load_config; print(before, 'tensorflow' in sys.modules,"
            " callable(mrcnn_tf.build_model), 'tensorflow' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "False", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import mrcnn_tf

        mrcnn_tf.nope  # noqa: B018
