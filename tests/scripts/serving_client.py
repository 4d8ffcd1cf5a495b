"""A fresh process that imports only TensorFlow: loads a SavedModel, runs named requests from an
.npz file and writes the outputs to another .npz. Usage: serving_client.py EXPORT_DIR IN OUT.

The input file maps "<signature>__<name>" to the request tensor; outputs are stored as
"<signature>__<name>__<output key>". A request that fails stores its error message under
"<signature>__<name>__error". It prints, as JSON, the load time, each request's time and the
process's peak RSS (MB) after each request.
"""

import json
import resource
import sys
import time

import numpy as np
import tensorflow as tf

export_dir, in_path, out_path = sys.argv[1:4]
t0 = time.time()
loaded = tf.saved_model.load(export_dir)
load_seconds = time.time() - t0
# The requests file is written by the test itself (byte strings need object arrays: numpy's
# fixed-width bytes dtype would strip trailing NUL bytes).
requests = dict(np.load(in_path, allow_pickle=True))
out = {}
timings = {}
peak_mb = {"load": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
for key, value in requests.items():
    signature, _name = key.split("__", 1)
    fn = loaded.signatures[signature]
    arg = list(fn.structured_input_signature[1])[0]
    t0 = time.time()
    try:
        result = fn(**{arg: tf.constant(value.tolist(), tf.string) if value.dtype == object
                       else tf.constant(value)})
        for k, v in result.items():
            v = v.numpy()
            out[f"{key}__{k}"] = v.astype(bytes) if v.dtype == object else v
    except tf.errors.OpError as e:
        out[f"{key}__error"] = np.array(f"{type(e).__name__}: {e.message}")
    timings[key] = time.time() - t0
    peak_mb[key] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
np.savez(out_path, **out)
print(json.dumps({"load_seconds": load_seconds, "timings": timings, "peak_mb": peak_mb,
                  "mrcnn_tf_imported": any(m.startswith("mrcnn_tf") for m in sys.modules)}))
