"""graph_when_eager: the dispatch of the ops whose loops are TensorFlow loops."""

import numpy as np
import tensorflow as tf

from mrcnn_tf.ops._graph import graph_when_eager
from mrcnn_tf.ops.masks import _roi_align_masks
from mrcnn_tf.ops.nms import _greedy_keep
from mrcnn_tf.ops.roi_align import _adaptive

seen: list = []  # tf.executing_eagerly() inside each run of the Python body


def _loop_sum(x, scale: float):
    seen.append(tf.executing_eagerly())
    return tf.map_fn(lambda row: tf.reduce_sum(row) * scale, x)


wrapped = graph_when_eager(_loop_sum)


def test_eager_call_runs_a_graph_function_and_keys_its_trace_on_python_args():
    seen.clear()
    x = tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_allclose(wrapped(x, 2.0).numpy(), [12.0, 44.0, 76.0])
    np.testing.assert_allclose(wrapped(x, 2.0).numpy(), [12.0, 44.0, 76.0])
    assert seen == [False]  # traced once, the body never ran eagerly
    np.testing.assert_allclose(wrapped(x, 1.0).numpy(), [6.0, 22.0, 38.0])
    assert seen == [False, False]  # a new Python argument is a new trace


def test_traced_call_is_plain_ops_not_a_nested_function():
    seen.clear()

    @tf.function(autograph=False)
    def outer(x):
        return wrapped(x, 3.0)

    graph = outer.get_concrete_function(tf.TensorSpec([None, 4], tf.float32)).graph
    op_types = {op.type for op in graph.get_operations()}
    assert seen == [False]
    assert not op_types & {"PartitionedCall", "StatefulPartitionedCall"}, op_types
    assert "While" in op_types or "StatelessWhile" in op_types  # the map_fn, inlined
    np.testing.assert_allclose(outer(tf.ones([2, 4])).numpy(), [12.0, 12.0])


def test_the_three_loop_ops_use_it():
    for fn in (_roi_align_masks, _greedy_keep, _adaptive):
        assert callable(getattr(fn, "python_function", None)), fn
