"""The load test of issue 16 (slow tier): an exported model behind a TF Serving-style REST server
on loopback, 4 concurrent clients, 200 mixed requests (good photos of several sizes, garbage,
corrupt and oversized images, malformed Examples, bad tensors). ``benchmarks/serving_rest.py``
is the tool; this runs it and checks its verdicts."""

import json
import os
import subprocess
import sys

import pytest

import mrcnn_tf
from mrcnn_tf.serving import export_saved_model
from tests.conftest import REPO


@pytest.mark.slow
def test_rest_server_under_mixed_load(tmp_path, shared_data):
    cfg = mrcnn_tf.load_config(str(REPO / "configs" / "shapes.yaml"),
                               ["model.detection.score_threshold=0.0"])
    model = mrcnn_tf.build_model(cfg)
    export_dir = export_saved_model(model, [1, 2, 3], ["square", "circle", "triangle"],
                                    str(tmp_path / "export" / "1"), mask_output="png")
    out = tmp_path / "load.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving_rest.py"), "load",
                          "--export_dir", export_dir, "--clients", "4", "--requests", "200",
                          "--out", str(out)], capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                  MRCNN_SHARED_DATA=str(shared_data)))
    assert out.exists(), res.stderr[-3000:]
    result = json.loads(out.read_text())
    print(json.dumps(result["latency_seconds"]), result["rss_growth"])
    assert result["requests"] == 200 and result["failed_connections"] == 0
    assert result["server_alive_after"]
    assert result["wrong_answers"] == []
    assert result["good_mismatches"] == []
    assert result["rss_growth"] <= 0.10
    assert {"good", "corrupt", "oversized", "example", "bad_tensor"} <= set(result["statuses"])
    assert res.returncode == 0
