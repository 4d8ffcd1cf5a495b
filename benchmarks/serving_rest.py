"""An exported SavedModel behind TF Serving's REST predict API, under load; and the size of a REST
response in each mask mode.

    python benchmarks/serving_rest.py load --export_dir EXPORT/1 [--clients 4 --requests 200]
    python benchmarks/serving_rest.py memory --export_dir EXPORT/1
    python benchmarks/serving_rest.py sizes [--config configs/torchvision_r50_fpn.yaml |
                                             --model_dir runs/shapes] [--photo IMAGE]

The real TF Serving binary cannot be installed here (no package registry has it), so ``load``
serves the SavedModel from a small in-process HTTP server that speaks TF Serving's REST predict
format: ``POST /v1/models/NAME[/versions/N]:predict`` with ``signature_name`` and ``instances``
(row) or ``inputs`` (columnar); ``{"b64": ...}`` for bytes in, and for string outputs whose name
ends in ``_bytes`` out; ``{"error": ...}`` with HTTP 400 for a failed request. It loads the model
with TensorFlow alone, as TF Serving does. Clients are threads that send a shuffled mix of request
types over loopback. Checked: the server answers every request and still answers after; every good
image gets the same detections as when it was sent alone before the run; RSS after the run is
within 10% of RSS after the warm-up. Reported: p50/p95 latency per request type.

``memory`` gives the peak RSS after serving a photo, a 97 KB PNG of 10000x10000 and a 6000x4000
JPEG, one after the other. ``sizes`` exports one model three times (mask_output full, box, png)
and measures the JSON response to one real photo in each.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import os
import pathlib
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parents[1]
# The real photos: ../shared/data beside the repository, or $MRCNN_SHARED_DATA (as the tests).
DATA = pathlib.Path(os.environ.get("MRCNN_SHARED_DATA",
                                   REPO.parent / "shared" / "data")) / "coco128"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- TF Serving's REST predict format --------------------------------------------------------------

def _decode_b64(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def _to_json(name: str, value: np.ndarray):
    """One output tensor as TF Serving writes it: numbers as JSON numbers, strings as text, or as
    {"b64": ...} when the output's name ends in ``_bytes``."""
    if value.dtype == object:
        if name.endswith("_bytes"):
            return np.vectorize(lambda b: {"b64": base64.b64encode(b).decode()},
                                otypes=[object])(value).tolist() if value.size else value.tolist()
        return np.vectorize(lambda b: b.decode("utf-8", "replace"),
                            otypes=[object])(value).tolist() if value.size else value.tolist()
    return value.tolist()


def request_to_tensors(body: dict, signature) -> dict:
    """The input tensors of one REST predict body, by TF Serving's rules: {"b64": ...} is base64
    bytes; "instances" (row format) lists one value per example for a single-input signature
    (or dicts of named inputs); "inputs" (columnar) gives the whole batch per input name, or the
    batch itself for one input."""
    import tensorflow as tf

    specs = signature.structured_input_signature[1]
    names = list(specs)
    if "instances" in body:
        rows = [_decode_b64(r) for r in body["instances"]]
        columns = ({names[0]: rows} if len(names) == 1 and not (rows and isinstance(rows[0], dict))
                   else {n: [r[n] for r in rows] for n in names})
    elif "inputs" in body:
        inputs = body["inputs"]
        columns = ({n: _decode_b64(inputs[n]) for n in names} if isinstance(inputs, dict)
                   else {names[0]: _decode_b64(inputs)})
    else:
        raise ValueError("Missing 'inputs' or 'instances' key")
    return {n: tf.constant(columns[n], tf.string) if specs[n].dtype == tf.string
            else tf.constant(np.asarray(columns[n], specs[n].dtype.as_numpy_dtype))
            for n in names}


def predict(loaded, body: dict) -> dict:
    """Runs one REST predict body on a loaded SavedModel; returns the response body."""
    name = body.get("signature_name", "serving_default")
    if name not in loaded.signatures:
        raise ValueError(f"Serving signature name: \"{name}\" not found in signature def")
    fn = loaded.signatures[name]
    out = {k: v.numpy() for k, v in fn(**request_to_tensors(body, fn)).items()}
    if "instances" in body:
        batch = len(body["instances"])
        return {"predictions": [{k: _to_json(k, np.array(v[i], dtype=v.dtype))
                                 for k, v in out.items()} for i in range(batch)]}
    return {"outputs": {k: _to_json(k, v) for k, v in out.items()}}


class _Handler(http.server.BaseHTTPRequestHandler):
    loaded = None

    def do_POST(self):  # noqa: N802 (http.server's name)
        try:
            if not self.path.endswith(":predict"):
                raise ValueError(f"unsupported path {self.path}")
            length = int(self.headers.get("Content-Length", 0))
            response, status = predict(self.loaded, json.loads(self.rfile.read(length))), 200
        except Exception as e:  # what TF Serving does: the error goes back in the body
            message = getattr(e, "message", None) or str(e)
            response, status = {"error": f"{type(e).__name__}: {message}"}, 400
        payload = json.dumps(response).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def serve(export_dir: str):
    """Starts the REST server on a free loopback port; returns (server, base URL)."""
    import tensorflow as tf

    handler = type("Handler", (_Handler,), {"loaded": tf.saved_model.load(export_dir)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1/models/mrcnn:predict"


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, dict, int]:
    """(HTTP status, response body, response size in bytes)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw), len(raw)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw), len(raw)


# -- requests -------------------------------------------------------------------------------------

def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _example(feature: dict) -> bytes:
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def request_kinds(data_dir: pathlib.Path, good_count: int = 6):
    """Request bodies by type: {kind: [(body, index of the good image or None), ...]} and the good
    images' bytes. Good photos come at their own size, downscaled, upscaled and as portraits."""
    import tensorflow as tf
    from PIL import Image

    paths = sorted(data_dir.rglob("*.jpg"))[:good_count]
    if not paths:
        sys.exit(f"error: no .jpg photos under {data_dir}: set MRCNN_SHARED_DATA to the folder "
                 "that holds coco128")
    goods = []
    for k, p in enumerate(paths):
        image = np.asarray(Image.open(p).convert("RGB"))
        if k % 3 == 1:
            image = np.asarray(Image.fromarray(image).resize(
                (image.shape[1] // 2, image.shape[0] // 2)))
        elif k % 3 == 2:
            image = np.ascontiguousarray(np.rot90(image))  # portrait
        goods.append(_jpeg(image))
    corrupt = goods[0][:2] + bytes(len(goods[0]) - 4) + goods[0][-2:]
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, "PNG")
    bomb = buf.getvalue()
    bytes_int = _example({"image/encoded": tf.train.Feature(
        int64_list=tf.train.Int64List(value=[1, 2]))})
    good_example = _example({"image/encoded": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[goods[1]]))})
    kinds = {
        "good": [({"signature_name": "image_bytes", "instances": [_b64(g)]}, i)
                 for i, g in enumerate(goods)],
        "good+garbage": [({"signature_name": "image_bytes",
                           "instances": [_b64(goods[2]), _b64(os.urandom(3000))]}, 2)],
        "corrupt": [({"signature_name": "image_bytes", "instances": [_b64(corrupt)]}, None)],
        "oversized": [({"signature_name": "image_bytes", "instances": [_b64(bomb)]}, None)],
        "example": [({"signature_name": "tf_example",
                      "instances": [_b64(good_example), _b64(bytes_int),
                                    _b64(b"\x0a\xff\xff\xff\xff")]}, 1)],
        "bad_tensor": [({"signature_name": "image_tensor",
                         "instances": np.zeros((4, 5, 3), np.uint8).tolist()}, None)],
    }
    return kinds, goods


def _detections(response: dict, row: int) -> dict:
    p = response["predictions"][row]
    n = p["num_detections"]
    keys = [k for k in p if k.startswith("detection_")]
    return {"n": n, **{k: p[k][:n] for k in keys}}


def _same(a: dict, b: dict, atol: float) -> bool:
    if a["n"] != b["n"] or a["detection_classes"] != b["detection_classes"]:
        return False
    for k in ("detection_scores", "detection_boxes"):
        if not np.allclose(a[k], b[k], atol=atol):
            return False
    return True


# What each request type must get: HTTP status and each instance's errors entry (a prefix).
EXPECTED = {
    "good": (200, [""]),
    "good+garbage": (200, ["", "not a JPEG, PNG, GIF, BMP or WebP image"]),
    "corrupt": (200, ["corrupt JPEG data"]),
    "oversized": (200, ["image of 10000x10000 pixels is over export.max_image_pixels"]),
    "example": (200, ["", "image/encoded is an int64 list", "not a serialized tf.train.Example"]),
    "bad_tensor": (400, "image_tensor: images must be uint8 [batch, height, width, 3]"),
}


def _expected_answer(kind: str, status: int, response: dict) -> bool:
    want_status, want = EXPECTED[kind]
    if status != want_status:
        return False
    if status != 200:
        return want in response.get("error", "")
    errors = [p["errors"] for p in response["predictions"]]
    return len(errors) == len(want) and all(
        e.startswith(w) and (w or not e) for e, w in zip(errors, want))


def load_test(export_dir: str, clients: int, total: int, seed: int = 0) -> dict:
    kinds, goods = request_kinds(DATA)
    server, url = serve(export_dir)
    try:
        # Warm-up: each request once (traces every signature); the good images alone.
        alone = {}
        for kind, items in kinds.items():
            for body, good in items:
                status, response, _ = post(url, body)
                if kind == "good":
                    assert status == 200, response
                    alone[good] = _detections(response, 0)
        rss_warm = _rss_mb()
        schedule = [(kind, item) for kind, items in kinds.items() for item in items]
        rng = random.Random(seed)
        plan = [rng.choice(schedule) for _ in range(total)]
        results, lock = [], threading.Lock()

        def client(jobs):
            for kind, (body, good) in jobs:
                t0 = time.perf_counter()
                try:
                    status, response, size = post(url, body)
                except Exception as e:  # the server died or hung up
                    status, response, size = -1, {"error": repr(e)}, 0
                seconds = time.perf_counter() - t0
                with lock:
                    results.append((kind, status, seconds, size, response, good))

        threads = [threading.Thread(target=client, args=(plan[i::clients],))
                   for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = _rss_mb()
        alive, _, _ = post(url, kinds["good"][0][0])
    finally:
        server.shutdown()
    mismatches, wrong, statuses, latency = [], [], {}, {}
    for kind, status, seconds, _, response, good in results:
        if not _expected_answer(kind, status, response):
            wrong.append((kind, status, str(response)[:300]))
        statuses.setdefault(kind, {}).setdefault(str(status), 0)
        statuses[kind][str(status)] += 1
        latency.setdefault(kind, []).append(seconds)
        # The good image is the first instance of its request.
        if good is not None and (status != 200 or not _same(_detections(response, 0),
                                                            alone[good], atol=1e-3)):
            mismatches.append(kind)
    return {
        "export_dir": export_dir, "clients": clients, "requests": len(results),
        "wall_seconds": round(wall, 1), "server_alive_after": alive == 200,
        "failed_connections": sum(s == -1 for _, s, *_ in results),
        "statuses": statuses, "good_mismatches": mismatches, "wrong_answers": wrong,
        "rss_mb_after_warmup": round(rss_warm), "rss_mb_after_run": round(rss_after),
        "rss_growth": round(rss_after / rss_warm - 1, 4),
        "latency_seconds": {k: {"count": len(v), "p50": round(float(np.percentile(v, 50)), 3),
                                "p95": round(float(np.percentile(v, 95)), 3)}
                            for k, v in sorted(latency.items())},
    }


def response_sizes(config: str, overrides: list[str], photo: pathlib.Path,
                   model_dir: str | None = None) -> dict:
    """Exports a model with each mask mode and measures the REST response to ``photo``: the
    model of ``config`` with random weights (score threshold 0, so it returns
    model.detection.max_detections detections), or the trained run ``model_dir``."""
    sys.path.insert(0, str(REPO))
    import mrcnn_tf
    from mrcnn_tf.serving import export_saved_model, serving_options

    if model_dir:
        from mrcnn_tf.checkpoint import restore
        from mrcnn_tf.rundir import read_run

        cfg, checkpoint, ids, names = read_run(model_dir, overrides)
        model = mrcnn_tf.build_model(cfg)
        restore(model, checkpoint)
        config = model_dir
    else:
        cfg = mrcnn_tf.load_config(config, ["model.detection.score_threshold=0.0"] + overrides)
        model = mrcnn_tf.build_model(cfg)
        classes = cfg.model.num_classes
        ids, names = list(range(1, classes)), [f"class{i}" for i in range(1, classes)]
    body = {"signature_name": "image_bytes", "instances": [_b64(photo.read_bytes())]}
    out = {"config": config, "overrides": overrides, "photo": photo.name}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "box", "png"):
            options = {**serving_options(cfg), "input_types": ("image_bytes",),
                       "mask_output": mode}
            path = export_saved_model(model, ids, names, os.path.join(tmp, mode), **options)
            server, url = serve(path)
            try:
                post(url, body)
                t0 = time.perf_counter()
                status, response, size = post(url, body)
                seconds = time.perf_counter() - t0
            finally:
                server.shutdown()
            assert status == 200, response
            p = response["predictions"][0]
            out[mode] = {"response_bytes": size, "detections": p["num_detections"],
                         "image_shape": p["image_shape"], "seconds": round(seconds, 2)}
            print(mode, out[mode], flush=True)
    return out


def peak_memory(export_dir: str, photo: pathlib.Path, side: tuple[int, int] = (6000, 4000)
                ) -> dict:
    """Peak RSS (MB) of this process after serving, in order: ``photo``; a 97 KB PNG of
    10000x10000 (over any sensible ``export.max_image_pixels``); ``photo`` resized to ``side``
    (width, height) as a JPEG. The growth of the peak is what each request cost."""
    import resource

    import tensorflow as tf
    from PIL import Image

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, "PNG")
    bomb = buf.getvalue()
    big = _jpeg(np.asarray(Image.open(photo).convert("RGB").resize(side)))
    fn = tf.saved_model.load(export_dir).signatures["image_bytes"]
    out = {"export_dir": export_dir, "load": round(peak())}
    for name, data in (("photo", photo.read_bytes()), ("bomb_10000x10000_png", bomb),
                       (f"jpeg_{side[0]}x{side[1]}", big)):
        t0 = time.perf_counter()
        result = fn(images=tf.constant([data]))
        out[name] = {"peak_rss_mb": round(peak()), "seconds": round(time.perf_counter() - t0, 2),
                     "errors": result["errors"].numpy()[0].decode(),
                     "detections": int(result["num_detections"][0])}
    print(json.dumps(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="the load test")
    load.add_argument("--export_dir", required=True, help="a SavedModel (EXPORT_BASE/N)")
    load.add_argument("--clients", type=int, default=4)
    load.add_argument("--requests", type=int, default=200)
    load.add_argument("--out", help="write the results JSON here")
    sizes = sub.add_parser("sizes", help="REST response size per mask mode")
    sizes.add_argument("--config", default=str(REPO / "configs" / "torchvision_r50_fpn.yaml"))
    sizes.add_argument("--model_dir", help="a trained run directory instead of --config")
    sizes.add_argument("--set", nargs="*", default=[], help="config overrides")
    sizes.add_argument("--photo", default=str(DATA / "train2017" / "000000000071.jpg"))
    sizes.add_argument("--out", help="write the results JSON here")
    memory = sub.add_parser("memory", help="peak RSS of a photo, a bomb and a 6000x4000 JPEG")
    memory.add_argument("--export_dir", required=True)
    memory.add_argument("--photo", default=str(DATA / "train2017" / "000000000071.jpg"))
    memory.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    if args.command == "load":
        result = load_test(args.export_dir, args.clients, args.requests)
    elif args.command == "memory":
        result = peak_memory(args.export_dir, pathlib.Path(args.photo))
    else:
        result = response_sizes(args.config, args.set, pathlib.Path(args.photo), args.model_dir)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    ok = args.command != "load" or (
        result["server_alive_after"] and not result["good_mismatches"]
        and not result["wrong_answers"]
        and result["failed_connections"] == 0 and result["rss_growth"] <= 0.10)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
